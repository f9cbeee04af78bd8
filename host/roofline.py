"""Rooflines: each engine's peak rate against its bandwidth, the GPU/CPU baselines, and where
every op of a compiled model sits under them.

A roof is a peak rate (Op/s, one MAC = 2 Op) and the bandwidth that feeds it (B/s); an op of
intensity I (Op/B) reaches at most min(peak, I * bandwidth), and the ridge point peak /
bandwidth separates memory-bound from compute-bound ops (Williams, Waterman, Patterson,
"Roofline", CACM 2009). The engines' numbers are the config's derived properties; op
intensities of linears and attention are the compiler's (`trimem.compiler.place.intensity`).

Baselines (GPU or CPU hosts) run the same graph as one kernel per IR op, each taking
max(FLOPs / peak, bytes / bandwidth) plus the host's kernel launch overhead, with tensors in
the baseline's own number formats (`HostFormat`): bytes per token over bandwidth, FLOPs over
peak, launch overhead, and nothing fitted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from trimem import layout, timing
from trimem.compiler import place
from trimem.compiler.ir import Graph, OpKind

OPS_PER_MAC = 2
"""A multiply-accumulate counts as two operations (config.py: Op/B comparisons)."""
FORMAT_BYTES = {"fx": place.FX_BYTES, "a8": 1, "ids": 4, "pos": 4}
"""Bytes per element of each IR value format (docs/contract.md, Number formats)."""
VPU_INSTRUCTION = {OpKind.EMBED: "VPU.EMBED", OpKind.RMSNORM: "VPU.RMSNORM",
                   OpKind.QUANT: "VPU.QUANT", OpKind.ADD: "VPU.ADD",
                   OpKind.SILU_MUL: "VPU.SILUMUL", OpKind.ROPE: "VPU.ROPE",
                   OpKind.KV_APPEND: "VPU.KVAPP"}
"""The VPU instruction each vector op lowers to; its passes count the op's lane operations."""


@dataclass(frozen=True)
class Roof:
    """One roofline: `peak_ops` Op/s fed by `bytes_per_s` B/s."""
    name: str
    peak_ops: float
    bytes_per_s: float

    def __post_init__(self):
        for key in ("peak_ops", "bytes_per_s"):
            value = getattr(self, key)
            if not value > 0:
                raise ValueError(f"roof {self.name!r}: {key} must be positive, got {value!r}")

    @property
    def ridge(self) -> float:
        """Op/B at which the roof turns from bandwidth-bound to compute-bound."""
        return self.peak_ops / self.bytes_per_s

    def attainable(self, op_b: float) -> float:
        """The most Op/s an op of intensity `op_b` reaches under this roof."""
        return min(self.peak_ops, op_b * self.bytes_per_s)

    def seconds(self, ops: float, nbytes: float) -> float:
        """Time of `ops` operations over `nbytes` bytes when compute and transfer overlap."""
        return max(ops / self.peak_ops, nbytes / self.bytes_per_s)

    def bound(self, op_b: float) -> str:
        return "compute" if op_b >= self.ridge else "memory"


def vpu_macs_per_s(fpga) -> float:
    """VPU lanes x clock: each lane does one MAC or element operation per cycle
    (`timing.attn_compute_cycles`, `timing.vpu_compute_cycles`)."""
    return fpga.vpu_lanes * fpga.clock_hz


def engine_roofs(cfg, nm: int = 0) -> dict[str, Roof]:
    """The roof of every engine of `cfg`, plus its host, by engine name.

    MXU and VPU are fed by HBM, PIM by its row buffers (internal bandwidth), CSD by its flash
    channels; `nm` picks the MXU's N:M pattern (its dense-equivalent peak).
    """
    roofs = {}
    if (f := cfg.fpga) is not None:
        hbm = f.hbm_gbps * 1e9
        roofs["MXU"] = Roof("MXU", OPS_PER_MAC * f.effective_macs_per_s(nm), hbm)
        roofs["VPU"] = Roof("VPU", OPS_PER_MAC * vpu_macs_per_s(f), hbm)
    if (p := cfg.pim) is not None:
        roofs["PIM"] = Roof("PIM", OPS_PER_MAC * p.peak_macs_per_s, p.internal_gbps * 1e9)
    if (c := cfg.csd) is not None:
        roofs["CSD"] = Roof("CSD", OPS_PER_MAC * c.peak_macs_per_s, c.internal_gbps * 1e9)
    roofs["HOST"] = host_roof(cfg.host)
    return roofs


def host_roof(host) -> Roof:
    """The roof of a `HostConfig` (GPU or CPU)."""
    return Roof(host.name, host.peak_flops, host.mem_gbps * 1e9)


# ---- the compiled model's ops ----------------------------------------------------------------

def value_bytes(value) -> int:
    """Bytes of one IR value: elements at their format's size, a8 rows with their scale
    codes."""
    rows = value.shape[0] if value.fmt == "a8" else 0
    return math.prod(value.shape) * FORMAT_BYTES[value.fmt] + rows * layout.SCALE_CODE_BYTES


def op_work(graph: Graph, op) -> tuple[float, float]:
    """(operations, bytes) of one op of a quantized graph in the hardware's formats.

    Linears and attention: 2 Op per MAC over the bytes the compiler's intensity counts
    (packed weight tiles or the KV cache at its bits, plus activations). Vector ops: each
    element passes through a VPU lane `timing.VPU_PASSES` times, over the bytes of the values
    they read and write: a KV append writes K and V at the cache's bits, the embedding reads
    its rows of the int8 table.
    """
    a = op.attrs
    if op.kind in place.LINEARS:
        ops = OPS_PER_MAC * a["m"] * a["n"] * a["k"]
        return ops, ops / place.intensity(op)
    if op.kind is OpKind.ATTENTION:
        macs = timing.attn_macs({"q_heads": a["heads"], "head_dim": a["head_dim"], "topk": 0},
                                [a["ctx"]] * a["m"])
        ops = OPS_PER_MAC * macs
        return ops, ops / place.intensity(op)
    name = VPU_INSTRUCTION[op.kind]
    ops = a["m"] * timing.vpu_row_elements(name, a) * timing.VPU_PASSES[name]
    values = graph.values()
    nbytes = sum(value_bytes(values[n]) for n in op.inputs)
    if op.kind is OpKind.KV_APPEND:
        token = layout.kv_token_bytes(a["head_dim"], a["kv_bits"], a["kv_group"])
        return ops, nbytes + a["m"] * 2 * a["kv_heads"] * token
    if op.kind is OpKind.EMBED:
        nbytes += a["m"] * (a["n"] + layout.SCALE_CODE_BYTES)
    return ops, nbytes + value_bytes(values[op.name])


def op_points(graph: Graph, roofs: dict) -> list[dict]:
    """One record per op of a placed graph: its work, Op/B, the roof it runs under (its
    engine's, or the MXU's at its N:M pattern when `roofs` has "MXU n:m") and what each roof
    allows."""
    points = []
    for op in graph.ops:
        ops, nbytes = op_work(graph, op)
        op_b = ops / nbytes if nbytes else float("inf")
        nm = tuple(op.attrs.get("nm", layout.DENSE))
        sparse = f"{op.engine} {nm[0]}:{nm[1]}"
        points.append({
            "name": op.name, "kind": op.kind.value, "layer": op.layer, "engine": op.engine,
            "roof": sparse if sparse in roofs else op.engine, "ops": ops, "bytes": nbytes,
            "op_b": op_b,
            "attainable": {e: r.attainable(op_b) for e, r in roofs.items()},
            "bound": {e: r.bound(op_b) for e, r in roofs.items()}})
    return points


# ---- GPU and CPU baselines -----------------------------------------------------------------

@dataclass(frozen=True)
class HostFormat:
    """How a baseline stores tensors: weight and KV bits, activation bytes per element."""
    name: str
    weight_bits: float
    act_bytes: float
    kv_bits: float


FP16 = HostFormat("fp16", 16, 2, 16)
"""Half precision throughout: the plain GPU serving baseline."""
W8A8 = HostFormat("w8a8", 8, 2, 16)
"""SmoothQuant W8A8 (Xiao et al., arXiv:2211.10438): int8 weights, fp16 activations between
kernels and fp16 KV cache."""
W4A16 = HostFormat("w4a16", 4 + 16 / 128, 2, 16)
"""MARLIN (Frantar et al., arXiv:2408.11743): int4 weights with an fp16 scale per group of
128, fp16 activations and KV."""


def same_format(quant) -> HostFormat:
    """The accelerator's own formats (weights and KV at its bits, int8 activations), so a
    ratio against this baseline measures the architecture, not the quantization."""
    return HostFormat(str(quant), quant.w_bits, 1, quant.kv_bits)


def host_op_work(op, phase: str, fmt: HostFormat) -> tuple[float, float]:
    """(FLOPs, bytes) of one op on a baseline host in format `fmt`.

    Decode attention reads each row's own KV cache (every row is another sequence); prefill
    rows share one. Element-wise ops are charged the bytes they read and write; their
    arithmetic is negligible against a GPU's or CPU's peak and counted as zero.
    """
    a, act, m = op.attrs, fmt.act_bytes, op.attrs["m"]
    if op.kind in place.LINEARS:
        weights = a["n"] * a["k"] * fmt.weight_bits / 8
        return OPS_PER_MAC * m * a["n"] * a["k"], weights + m * (a["k"] + a["n"]) * act
    if op.kind is OpKind.ATTENTION:
        macs = timing.attn_macs({"q_heads": a["heads"], "head_dim": a["head_dim"], "topk": 0},
                                [a["ctx"]] * m)
        seqs = m if phase == "decode" else 1
        kv = seqs * 2 * a["kv_heads"] * a["head_dim"] * a["ctx"] * fmt.kv_bits / 8
        return OPS_PER_MAC * macs, kv + 2 * m * a["heads"] * a["head_dim"] * act
    if op.kind is OpKind.KV_APPEND:
        width = a["kv_heads"] * a["head_dim"]
        return 0.0, 2 * m * width * (act + fmt.kv_bits / 8)
    width = {OpKind.ROPE: a.get("heads", 0) * a.get("head_dim", 0)}.get(op.kind, a.get("n", 0))
    reads = 2 if op.kind in (OpKind.ADD, OpKind.SILU_MUL, OpKind.ROPE) else 1
    return 0.0, (reads + 1) * m * width * act


@dataclass(frozen=True)
class HostStep:
    """One step of a graph on a baseline host: time, kernels, bytes, FLOPs and energy."""
    host: str
    fmt: str
    rows: int
    seconds: float
    kernels: int
    flops: float
    bytes: float
    launch_s: float
    energy_j: float

    @property
    def tokens_per_s(self) -> float:
        """Decode tokens per second: one per row per step."""
        return self.rows / self.seconds


def host_step(graph: Graph, host, fmt: HostFormat, skip=()) -> HostStep:
    """The step of `graph` on `host` (a `HostConfig`): one kernel per op, each
    max(FLOPs / peak, bytes / bandwidth) + `host.kernel_launch_us`; energy is the host's board
    power over that time. Ops of the kinds in `skip` run elsewhere and are left out."""
    roof = host_roof(host)
    launch = host.kernel_launch_us * 1e-6
    ops = [op for op in graph.ops if op.kind not in skip]
    seconds = flops = nbytes = 0.0
    for op in ops:
        f, b = host_op_work(op, graph.step.phase, fmt)
        seconds += roof.seconds(f, b) + launch
        flops += f
        nbytes += b
    return HostStep(host.name, fmt.name, graph.step.rows, seconds, len(ops), flops, nbytes,
                    len(ops) * launch, host.power_w * seconds)


# ---- `trimem roofline` ---------------------------------------------------------------------

def roofline_report(hw, model, *, quant="w4a8kv4", sparsity=None, batch=1, ctx=1024) -> dict:
    """Every op of `model` compiled for `hw` (placed, not emitted) against every engine's roof:
    plain data for the JSON file and the plot."""
    from trimem.config import load_config
    from trimem.host.studies import placed_graph

    cfg = load_config(hw)
    graph = placed_graph(cfg, model, quant=quant, sparsity=sparsity, batch=batch, ctx=ctx)
    roofs = engine_roofs(cfg)
    if cfg.fpga is not None:
        for i, (n, m) in enumerate(cfg.fpga.nm_patterns):
            if i and any(tuple(op.attrs.get("nm", ())) == (n, m) for op in graph.ops):
                roofs[f"MXU {n}:{m}"] = engine_roofs(cfg, i)["MXU"]
    return {"hw": cfg.name, "model": graph.spec.name, "quant": quant, "sparsity": sparsity,
            "batch": batch, "ctx": ctx,
            "engines": {name: {"peak_ops": r.peak_ops, "bytes_per_s": r.bytes_per_s,
                               "ridge": r.ridge} for name, r in roofs.items()},
            "ops": op_points(graph, roofs)}


def summary_table(report: dict) -> str:
    """Ops grouped by kind and engine: count, Op/B range, and what bounds them there."""
    groups: dict = {}
    for p in report["ops"]:
        groups.setdefault((p["kind"], p["roof"]), []).append(p)
    lines = [f"{report['model']} on {report['hw']} ({report['quant']}, batch {report['batch']}, "
             f"context {report['ctx']})",
             f"{'kind':<10} {'roof':<8} {'ops':>5} {'Op/B min':>9} {'Op/B max':>9}  bound",
             "-" * 54]
    for (kind, roof), pts in sorted(groups.items()):
        op_bs = [p["op_b"] for p in pts]
        bounds = sorted({p["bound"][roof] for p in pts})
        lines.append(f"{kind:<10} {roof:<8} {len(pts):>5} {min(op_bs):>9.3g} "
                     f"{max(op_bs):>9.3g}  {'/'.join(bounds)}")
    lines.append("ridges: " + ", ".join(f"{e} {v['ridge']:.3g} Op/B"
                                        for e, v in report["engines"].items()))
    return "\n".join(lines)


def write_roofline(report: dict, out_dir) -> tuple:
    """roofline.json and roofline.png in `out_dir`: one log-log panel per engine with its
    roof, its ridge point marked, and every op at its intensity (filled where it runs)."""
    import json
    from pathlib import Path

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "roofline.json", out / "roofline.png"
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    engines = report["engines"]
    cols = min(3, len(engines))
    rows = -(-len(engines) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.flat[len(engines):]:
        ax.set_visible(False)
    op_bs = [p["op_b"] for p in report["ops"] if 0 < p["op_b"] < float("inf")]
    lo, hi = min(op_bs + [0.01]) / 2, max(op_bs + [1000]) * 2
    kinds = sorted({p["kind"] for p in report["ops"]})
    colors = dict(zip(kinds, plt.cm.tab10.colors))
    for ax, (name, e) in zip(axes.flat, engines.items()):
        xs = [lo, e["ridge"], hi]
        ax.plot(xs, [min(e["peak_ops"], x * e["bytes_per_s"]) for x in xs], color="k")
        ax.axvline(e["ridge"], ls="--", color="grey", lw=0.8)
        ax.annotate(f"ridge {e['ridge']:.3g}", (e["ridge"], e["peak_ops"]), fontsize=7,
                    textcoords="offset points", xytext=(4, -12))
        for kind in kinds:
            pts = [p for p in report["ops"] if p["kind"] == kind and p["op_b"] > 0]
            here = [p for p in pts if p["roof"] == name]
            away = [p for p in pts if p["roof"] != name]
            ax.scatter([p["op_b"] for p in away], [p["attainable"][name] for p in away],
                       s=10, facecolors="none", edgecolors=colors[kind], alpha=0.4)
            ax.scatter([p["op_b"] for p in here], [p["attainable"][name] for p in here],
                       s=18, color=colors[kind], label=kind if here else None)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("Op/B")
        ax.set_ylabel("attainable Op/s")
        handles, labels = ax.get_legend_handles_labels()
        if labels:
            ax.legend(fontsize=6, loc="lower right")
    fig.suptitle(f"{report['model']} on {report['hw']}: ops on each engine's roofline "
                 f"(filled: placed there)", fontsize=10)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return json_path, png_path
