"""Scenario studies: the seed papers' mechanisms rebuilt from the presets' numbers.

Each study lives in `trimem.host.study_<name>` and has `run(**settings) -> StudyResult` and
`plot(result, fig)`. Where the mechanism lives in the compiler and the emulator (sub-batch
interleaving, dual row buffers, N:M and W4 weight streams, in-storage attention, top-k V
skipping) the study compiles the model timing-only and runs it on the emulator; GPU and CPU
baselines are analytic rooflines of the same graph (`trimem.host.roofline`). Nothing is fitted:
every number comes from a preset, a cited data sheet, or a stated model choice.

Decoder layers of one model are identical, so `emulate` compiles one and two layers and
extrapolates linearly to the whole depth: X(L) = X(1) + (L - 1) * (X(2) - X(1)) for time,
energy and bytes, which is exact when each layer costs the same and the embedding and LM head
are a fixed part.
"""
from __future__ import annotations

import functools
import importlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from trimem import isa
from trimem.compiler import frontend, pipeline, place
from trimem.compiler.ir import Graph, Step
from trimem.config import ENGINES, load_config, load_config_dict
from trimem.emulator import stats
from trimem.emulator.machine import Machine
from trimem.emulator.runner import run_bundle
from trimem.host import roofline

STUDIES = {"flightllm": "study_flightllm", "neupims": "study_neupims",
           "pim-gpt": "study_pimgpt", "instinfer": "study_instinfer",
           "spatten": "study_spatten", "duplex": "study_duplex", "marlin": "study_marlin"}
"""Study name -> module in trimem.host."""


@dataclass
class StudyResult:
    """What a study measured.

    Members
    -------
    name, title : the study and one line saying what it compares.
    columns, rows : the printed table.
    ratios : name -> float, the figures a paper reports (docs/studies.md lists the claims).
    notes : how it was measured: model choices, scaling, what the baseline is.
    data : series for the plot, plain JSON data.
    """
    name: str
    title: str
    columns: list
    rows: list
    ratios: dict
    notes: list = field(default_factory=list)
    data: dict = field(default_factory=dict)

    def table(self) -> str:
        """The rows as an aligned text table."""
        cells = [list(map(str, self.columns))] + [[_cell(v) for v in r] for r in self.rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(self.columns))]
        lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join([self.title, *lines])

    def to_json(self) -> dict:
        return {"study": self.name, **{k: v for k, v in asdict(self).items() if k != "name"}}


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def study_module(name: str):
    """The module of study `name`; ValueError listing the studies otherwise."""
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}; choose one of {', '.join(STUDIES)}")
    return importlib.import_module(f"trimem.host.{STUDIES[name]}")


def run_study(name: str, out_dir=None, **settings) -> StudyResult:
    """Run study `name`; with `out_dir`, write NAME.json and NAME.png there."""
    module = study_module(name)
    result = module.run(**settings)
    if out_dir is not None:
        write_outputs(result, module.plot, out_dir)
    return result


def write_outputs(result: StudyResult, plot, out_dir) -> tuple[Path, Path]:
    """NAME.json (the result) and NAME.png (its plot) in `out_dir`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path_json = out / f"{result.name}.json"
    path_json.write_text(json.dumps(result.to_json(), indent=1) + "\n")
    fig = plt.figure(figsize=(11, 4.5))
    plot(result, fig)
    fig.tight_layout()
    path_png = out / f"{result.name}.png"
    fig.savefig(path_png, dpi=110)
    plt.close(fig)
    return path_json, path_png


# ---- hardware variants and power -----------------------------------------------------------

def variant(hw, changes: dict, suffix: str | None = None):
    """The config `hw` with dotted keys changed ({"pim.dual_row_buffer": False}); the name
    gets `suffix` so the variant never passes for the preset."""
    cfg = load_config(hw)
    if not changes:
        return cfg
    data = cfg.to_dict()
    for key, value in changes.items():
        section, _, name = key.partition(".")
        if not isinstance(data.get(section), dict) or name not in data[section]:
            raise ValueError(f"config key {key!r} is not in {cfg.name!r}; write section.key, "
                             f"e.g. 'fpga.dsp_chains'")
        data[section][name] = value
    tag = suffix or "-".join(f"{k}={v}" for k, v in changes.items())
    data["name"] = f"{cfg.name}+{tag}"
    return load_config_dict(data, source=f"{cfg.name} with {changes!r}")


def board_power_w(cfg, engines=ENGINES) -> float:
    """Sum of the data-sheet power of the config's engine sections among `engines`."""
    return sum(getattr(cfg, e).power_w for e in engines if getattr(cfg, e) is not None)


def board_price_usd(cfg, engines=ENGINES) -> float:
    """Sum of the price of the config's engine sections among `engines`."""
    return sum(getattr(cfg, e).price_usd for e in engines if getattr(cfg, e) is not None)


def geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


# ---- compile + timing-only emulation -------------------------------------------------------

@dataclass(frozen=True)
class Emulated:
    """One step of a whole model on the emulator (extrapolated from one and two layers).

    seconds, energy_j : the step's time and emulated energy (per-op and per-byte costs).
    rows : tokens the step produces (the decode batch).
    bytes : bytes per memory and link.
    busy_s : busy seconds per engine.
    """
    seconds: float
    energy_j: float
    rows: int
    bytes: dict
    busy_s: dict

    @property
    def tokens_per_s(self) -> float:
        return self.rows / self.seconds


def model_graph(model, ctx: int | None = None) -> Graph:
    """A timing-only graph of a known config name, or of an HF-style config dict; the model's
    max_position_embeddings is raised to `ctx` when shorter (no shape depends on it)."""
    if isinstance(model, Graph):
        return model
    cfg = frontend.model_config(model) if isinstance(model, str) else dict(model)
    name = model if isinstance(model, str) else cfg.get("_name_or_path", "model")
    return _graph(json.dumps(cfg, sort_keys=True), name, ctx)


@functools.lru_cache(maxsize=64)
def _graph(config_json: str, name: str, ctx: int | None) -> Graph:
    cfg = json.loads(config_json)
    if ctx is not None and cfg.get("max_position_embeddings", 0) < ctx:
        cfg["max_position_embeddings"] = ctx
    return frontend.lower(frontend.spec_from_config(cfg, name), None, ctx=ctx)


@functools.lru_cache(maxsize=256)
def _emulate_layers(cfg, graph, layers, quant, sparsity, sparse_layers, bucket, placement,
                    interleave) -> dict:
    bundle = pipeline.compile_model(
        graph, cfg, quant=quant, sparsity=sparsity, sparse_layers=sparse_layers,
        buckets=bucket, layers=layers, timing_only=True, placement=dict(placement) or None,
        interleave=interleave)
    report = run_bundle(bundle, timing_only=True).report
    busy = {name: e["busy"] / (e["clock_mhz"] * 1e6) for name, e in report["per_engine"].items()}
    return {"seconds": report["seconds"], "energy_j": report["energy_j"],
            "bytes": dict(report["bytes"]), "busy_s": busy}


def emulate(hw, model, *, quant="w4a8kv4", sparsity=None, sparse_layers="mlp", batch=1,
            ctx=512, placement=None, interleave=None) -> Emulated:
    """One decode step of `batch` sequences at context `ctx`, compiled timing-only for `hw`
    and run on the emulator; one- and two-layer runs extrapolated to the model's depth."""
    cfg = load_config(hw)
    graph = model_graph(model, ctx)
    args = (quant, sparsity, sparse_layers, f"decode:{batch}@{ctx}",
            tuple(sorted((placement or {}).items())), interleave)
    one, two = (_emulate_layers(cfg, graph, n, *args) for n in (1, 2))
    scale = graph.spec.layers - 1

    def grow(a, b):
        if isinstance(a, dict):
            return {k: grow(a.get(k, 0), b.get(k, 0)) for k in sorted({*a, *b})}
        return a + scale * (b - a)

    total = grow(one, two)
    return Emulated(seconds=total["seconds"], energy_j=total["energy_j"], rows=batch,
                    bytes=total["bytes"], busy_s=total["busy_s"])


# ---- one attention instruction on the emulator ---------------------------------------------

ATTENTION_SPACE = {"VPU": "SRAM", "CSD": "CDRAM"}
"""Where each attention engine finds q, positions and o (docs/contract.md, Instructions)."""


def attention_run(hw, engine: str, *, q_heads: int, kv_heads: int, head_dim: int, ctx: int,
                  seqs: int = 1, topk: int = 0, splits: int = 1, kv_bits: int = 8,
                  kv_group: int = 32) -> dict:
    """The emulator's report for decode attention of `seqs` sequences (one query row each, at
    position ctx - 1) on "VPU" (KV cache in HBM) or "CSD" (KV cache in flash), timing-only.
    `kv_group` is a power of two."""
    if engine not in ATTENTION_SPACE:
        raise ValueError(f"attention engine {engine!r} is not one of {sorted(ATTENTION_SPACE)}")
    positions = np.full(seqs, ctx - 1, dtype="<i4")
    q_addr = positions.nbytes
    o_addr = q_addr + place.FX_BYTES * q_heads * head_dim
    fields = {"m": 1, "layer": 0, "q_heads": q_heads, "kv_heads": kv_heads,
              "head_dim": head_dim, "q_addr": q_addr, "o_addr": o_addr, "kv_base": 0,
              "layers": 1, "ctx_log2": max(ctx - 1, 1).bit_length(), "kv_bits": kv_bits,
              "kv_group_log2": kv_group.bit_length() - 1, "splits": splits, "topk": topk}
    lines = [f"{engine}.ATTN " + " ".join(
        f"{k}={v}" for k, v in {**fields, "seq": s, "pos_addr": s * positions.itemsize}.items())
        for s in range(seqs)]
    machine = Machine(load_config(hw), timing_only=True)
    machine.memory(ATTENTION_SPACE[engine]).write_array(0, positions)
    machine.run({isa.stream_engine(engine): isa.assemble("\n".join(lines + ["HALT"]), engine)})
    return stats.report(machine)


def placed_graph(hw, model, *, quant="w8a8kv8", sparsity=None, batch=1, ctx=512,
                 placement=None) -> Graph:
    """The model's decode graph at `batch` rows and context `ctx` after the compiler's model
    passes (N:M `sparsity` on the MLP linears) and its placement pass; nothing is emitted."""
    cfg = load_config(hw)
    options = {"quant": quant, "sparsity": sparsity, "placement": placement}
    graph = pipeline.restep(model_graph(model, ctx), Step(batch, "decode", ctx))
    for _, run in pipeline.MODEL_PASSES:
        graph = run(graph, cfg, options)
    return place.run(graph, cfg, options)


def baseline_step(host, model, fmt, *, batch=1, ctx=512, skip=()):
    """A baseline host (a `HostConfig`) running one decode step of `batch` sequences at
    context `ctx` (without the op kinds in `skip`), as `trimem.host.roofline.host_step`."""
    graph = pipeline.restep(model_graph(model, ctx), Step(batch, "decode", ctx))
    return roofline.host_step(graph, host, fmt, skip)
