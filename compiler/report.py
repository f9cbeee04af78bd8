"""The compile report: where each op runs and why, memory use, instruction counts, and a
roofline estimate of the cycles per entry.

The estimate charges every instruction to its engine at that engine's roofline (compute at
its peak MAC rate, or bytes at its bandwidth, whichever is slower) using the cycle formulas
of `trimem.timing` where they exist, in cycles of the FPGA clock. Engines overlap, so the
busiest engine bounds an entry from below; the emulator gives the exact count.
"""
from __future__ import annotations

import math

from trimem import layout, timing
from trimem.compiler.ir import OpKind
from trimem.compiler import place
from trimem.compiler.place import CHOICES, nm_index

LINK_GBPS = {"HOST": lambda cfg: cfg.links.pcie_gbps, "CDRAM": lambda cfg: cfg.links.p2p_gbps,
             "HBM": lambda cfg: cfg.fpga.hbm_gbps, "GBUF": lambda cfg: cfg.pim.channel_gbps,
             "PRES": lambda cfg: cfg.pim.channel_gbps, "PIMDRAM": lambda cfg: cfg.pim.channel_gbps}
"""GB/s of the path a DMA takes on each side; SRAM is on chip and adds none."""
PLACED = CHOICES[OpKind.LINEAR]
"""The engines whose ridge point and roofline time the placement table shows per linear."""


def _cycles(cfg, seconds: float) -> float:
    return seconds * cfg.fpga.clock_hz


def dma_cycles(cfg, src: str, dst: str, nbytes: int) -> float:
    """A DMA.COPY at the slower side's bandwidth (HOST to CDRAM crosses PCIe only)."""
    sides = [s for s in (src, dst) if s in LINK_GBPS]
    if {src, dst} == {"HOST", "CDRAM"}:
        sides = ["HOST"]
    gbps = min((LINK_GBPS[s](cfg) for s in sides), default=math.inf)
    return 0.0 if gbps == math.inf else _cycles(cfg, nbytes / (gbps * 1e9))


def gemm_cycles(cfg, op, m: int, n: int) -> float:
    """MXU.GEMM: the DSP-chain formula of `timing.mxu_gemm_cycles` (weights come by DMA)."""
    a = op.attrs
    return timing.mxu_gemm_cycles(cfg.fpga, {"m": m, "n": n, "k": a["k"], "bits": a["bits"],
                                             "nm": nm_index(cfg, op)})


def gemv_cycles(cfg, op, m: int, tile) -> float:
    """PIM.GEMV: m vectors, each streaming the tile's weights through the MACs of its
    channels' banks (`place.gemv_seconds`)."""
    return _cycles(cfg, place.gemv_seconds(cfg, op, m, tile))


def vpu_cycles(cfg, name: str, fields: dict) -> float:
    """A VPU op on SRAM rows (`timing.vpu_cycles`), EMBED streaming its rows from HBM."""
    fpga = cfg.fpga
    if name == "VPU.EMBED":
        stream = fields["m"] * (fields["n"] + layout.SCALE_CODE_BYTES) / fpga.hbm_bytes_per_cycle
        compute = timing.vpu_compute_cycles(fpga, name, fields)
        return timing.vpu_stream_cycles(fpga, math.ceil(stream), compute)
    if name == "VPU.KVAPP":
        return timing.vpu_compute_cycles(fpga, name, fields) + timing.VPU_FILL
    return timing.vpu_cycles(fpga, name, fields)


def _token_bytes(op) -> int:
    a = op.attrs
    return layout.kv_token_bytes(a["head_dim"], a["kv_bits"], a["kv_group"])


def kv_append_cycles(cfg, op, m: int) -> float:
    """CSD.KVAPP: m tokens of K and V written at internal flash bandwidth."""
    nbytes = m * 2 * op.attrs["kv_heads"] * _token_bytes(op)
    return _cycles(cfg, nbytes / (cfg.csd.internal_gbps * 1e9))


def attention_cycles(cfg, op, m: int, engine: str) -> float:
    """Attention of m query rows over the context bucket: MACs against KV bytes read."""
    a = op.attrs
    f = {"m": m, "q_heads": a["heads"], "kv_heads": a["kv_heads"], "head_dim": a["head_dim"],
         "topk": a["topk"]}
    ctxs = [a["ctx"]] * m
    k_tokens, v_tokens = timing.attn_tokens(f, ctxs)
    nbytes = a["kv_heads"] * (k_tokens + v_tokens) * _token_bytes(op)
    if engine == "VPU":
        fpga = cfg.fpga
        stream = math.ceil(nbytes / fpga.hbm_bytes_per_cycle)
        compute = timing.attn_compute_cycles(fpga, f, ctxs)
        return timing.vpu_stream_cycles(fpga, stream, compute)
    csd = cfg.csd
    seconds = max(timing.attn_macs(f, ctxs) / csd.peak_macs_per_s,
                  nbytes / (csd.internal_gbps * 1e9))
    return _cycles(cfg, seconds)


# ---- the report ----------------------------------------------------------------------------

def _round(value):
    return None if value is None or not math.isfinite(value) else round(float(value), 3)


def entry_report(graph, entry) -> dict:
    """Per entry: ops and instructions per engine, Op/B and placement per op, the roofline."""
    ops: dict = {}
    for op in graph.ops:
        engines = op.annotations.get("sub_engines") or (op.engine,)
        for engine in dict.fromkeys(engines):
            ops[engine] = ops.get(engine, 0) + 1
    placement = {}
    for op in graph.ops:
        note = op.annotations["place"]
        if note["op_b"] is not None:
            placement[op.name] = {
                "engine": "+".join(op.annotations.get("sub_engines") or (op.engine,)),
                "op_b": _round(note["op_b"]),
                "ridge": {e: _round(v) for e, v in note.get("ridge", {}).items()},
                "us": {e: _round(v * 1e6) for e, v in note.get("seconds", {}).items()},
                "reason": note["reason"]}
    words = {e: len(w) for e, w in entry.programs.items()}
    roofline = entry.meta["roofline_cycles"]
    bound = max(roofline.values(), default=0)
    return {"ops_per_engine": ops, "instructions": words,
            "instructions_total": sum(words.values()), "roofline_cycles": roofline,
            "estimate_cycles": bound, "peak_bytes": entry.meta["peak_bytes"],
            "placement": placement}


def build(cfg, graphs, entries, memory, image_bytes: dict) -> dict:
    """The bundle report (plain data for the manifest)."""
    return {"hardware": cfg.name, "clock_mhz": cfg.fpga.clock_mhz,
            "kv_home": graphs[0].meta["kv_home"], "kv": dict(memory.kv),
            "memory_bytes": memory.used(), "image_bytes": image_bytes,
            "entries": {e.name: entry_report(g, e) for g, e in zip(graphs, entries)}}


def _layer0(name: str) -> bool:
    return not name.startswith("layers.") or name.startswith("layers.0.")


def format_report(rep: dict) -> str:
    """The report as text tables (layer 0 and the ops outside layers; others are alike)."""
    mhz = rep["clock_mhz"]
    lines = [f"hardware {rep['hardware']}: KV cache in {rep['kv_home']}, "
             f"max_ctx {rep['kv']['max_ctx']}, kv{rep['kv']['bits']}"]
    lines.append("memory: " + ", ".join(f"{space} {nbytes / 2**20:.2f} MiB"
                                        for space, nbytes in sorted(rep["memory_bytes"].items())))
    for name, e in rep["entries"].items():
        cycles = e["estimate_cycles"]
        lines.append(f"\nentry {name}: {e['instructions_total']} instructions, roofline "
                     f"estimate {cycles} cycles ({cycles / mhz:.1f} us at {mhz:g} MHz)")
        lines.append(f"  {'engine':<6} {'ops':>6} {'instrs':>8} {'cycles':>12}")
        engines = sorted(set(e["ops_per_engine"]) | set(e["instructions"]) |
                         set(e["roofline_cycles"]))
        for eng in engines:
            lines.append(f"  {eng:<6} {e['ops_per_engine'].get(eng, 0):>6} "
                         f"{e['instructions'].get(eng, 0):>8} "
                         f"{e['roofline_cycles'].get(eng, 0):>12}")
        lines.append("  peak scratch: " + ", ".join(f"{s} {b} B" for s, b in
                                                   e["peak_bytes"].items()))
        heads = [f"{key} {eng}" for key in ("ridge", "us") for eng in PLACED]
        lines.append(f"  {'op':<24} {'engine':<8} {'Op/B':>7} " +
                     " ".join(f"{h:>9}" for h in heads) + "  why")
        for op, p in e["placement"].items():
            if _layer0(op):
                cells = [_cell(p["op_b"])] + [_cell(p[key].get(eng)) for key in ("ridge", "us")
                                              for eng in PLACED]
                lines.append(f"  {op:<24} {p['engine']:<8} {cells[0]:>7} " +
                             " ".join(f"{c:>9}" for c in cells[1:]) + f"  {p['reason']}")
    return "\n".join(lines)


def _cell(value) -> str:
    return "-" if value is None else f"{value:.3g}"

