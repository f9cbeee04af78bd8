"""The placement pass: every op to the engine whose roofline suits it.

Linears and the LM head go to the engine that runs them soonest on a roofline. For each engine
that can hold the op, time = max(ops / the engine's peak, bytes / the engine's bandwidth to its
weights), with the peaks and bandwidths `trimem hw show` prints (`trimem.config`):

- MXU: the FPGA's dense-equivalent MAC/s for the op's N:M pattern, reading the packed weights
  and the activations once from HBM;
- PIM: the MAC/s and row-buffer bandwidth of the banks each tile's channels hold (pruned
  weights are not multiplied), streaming the packed weights once per input row (PIM.GEMV runs
  its m vectors one after another), and no faster than the DMA that copies each tile's a8 rows
  into the GBUF of every channel and its fx results out of PRES over the channel buses.

So a GEMV of a large weight, read once, runs in the PIM banks at row-buffer bandwidth, and a
batched GEMM, which reuses each weight across its rows, runs on the DSP chains where their
peak is the higher (NeuPIMs, ASPLOS'24: GEMM to the NPU, GEMV to PIM). Equal times go to the
engine that moves fewer bytes to and from its weights. The ridge point of each engine,
2 * peak MAC/s / bandwidth, is noted beside the op's Op/B, the intensity the MXU sees.

The KV cache has one home for every entry of a bundle: FLASH when the machine has a CSD, so
KV append and attention run inside the drive at internal flash bandwidth (InstInfer), else
HBM with the VPU's attention. Embedding, norms, RoPE and the element-wise ops run on the VPU.
An override per op kind, {"linear": "mxu", "attention": "csd"}, wins over the rule wherever
that engine can run the op; where it cannot, the error says why.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

from trimem import layout
from trimem.compiler.ir import CompileError, Graph, OpKind, option
from trimem.compiler.tile import FX_BYTES, LINEARS, pim_offsets, pim_tiles, weight_bytes
from trimem.layout import SCALE_CODE_BYTES

KV_OPS = (OpKind.KV_APPEND, OpKind.ATTENTION)
CHOICES = {OpKind.LINEAR: ("MXU", "PIM"), OpKind.LM_HEAD: ("MXU", "PIM"),
           OpKind.KV_APPEND: ("VPU", "CSD"), OpKind.ATTENTION: ("VPU", "CSD")}
"""The engines that can run each op kind; every other kind runs on the VPU."""
SECTION = {"MXU": "fpga", "VPU": "fpga", "PIM": "pim", "CSD": "csd"}
"""The config section each engine needs."""
KV_HOME = {"VPU": "HBM", "CSD": "FLASH"}
"""Where the KV cache lives when its ops run on each engine."""
TIE = 1e-9
"""Relative difference under which two roofline times count as equal."""


# ---- sizes and intensities -----------------------------------------------------------------

def nm_index(cfg, op) -> int:
    """Index of the op's N:M pattern in `fpga.nm_patterns`; CompileError when it is missing."""
    pattern = tuple(op.attrs["nm"])
    patterns = [tuple(p) for p in cfg.fpga.nm_patterns] if cfg.fpga else [layout.DENSE]
    if pattern not in patterns:
        raise CompileError(f"{op.where}: N:M pattern {pattern[0]}:{pattern[1]} is not one of "
                           f"the hardware's fpga.nm_patterns {patterns!r}; sparsify with a "
                           f"listed pattern or pick another preset")
    return patterns.index(pattern)


def kv_bytes(op) -> int:
    """Bytes of the K and V cache that one attention step reads at its context bucket."""
    a = op.attrs
    token = layout.kv_token_bytes(a["head_dim"], a["kv_bits"], a["kv_group"])
    return 2 * a["kv_heads"] * a["ctx"] * token


def linear_ops(op, m=None, n=None) -> int:
    """Dense-equivalent operations of a linear: 2 per MAC of [m, k] x [k, n] (by default the
    op's own m and n; a tile's when given)."""
    a = op.attrs
    return 2 * (a["m"] if m is None else m) * (a["n"] if n is None else n) * a["k"]


def act_bytes(op) -> int:
    """Bytes of a linear's a8 input rows (with their scale codes) and fx output rows."""
    a = op.attrs
    return a["m"] * (a["k"] + SCALE_CODE_BYTES + a["n"] * FX_BYTES)


def intensity(op) -> float | None:
    """Op/B of a linear (weights and activations read once) or an attention (2 ops per MAC);
    None for the other kinds."""
    a = op.attrs
    if op.kind in LINEARS:
        return linear_ops(op) / (weight_bytes(op) + act_bytes(op))
    if op.kind is OpKind.ATTENTION:
        width = a["heads"] * a["head_dim"]
        macs = 2 * a["m"] * width * a["ctx"]
        return 2 * macs / (kv_bytes(op) + 2 * a["m"] * width * FX_BYTES)
    return None


# ---- rooflines of a linear -----------------------------------------------------------------

def peak_macs(cfg, op, engine: str) -> float:
    """Dense-equivalent MAC/s of `engine` on linear `op`: both engines multiply only the n kept
    weights of every m, so an n:m pattern looks m/n times faster."""
    if engine == "MXU":
        return cfg.fpga.effective_macs_per_s(nm_index(cfg, op))
    n, m = op.attrs["nm"]
    return cfg.pim.peak_macs_per_s * m / n


def weight_gbps(cfg, engine: str) -> float:
    """GB/s between `engine` and its weights: HBM for the MXU, the row buffers for PIM."""
    return cfg.fpga.hbm_gbps if engine == "MXU" else cfg.pim.internal_gbps


def traffic(op, engine: str) -> int:
    """Bytes `engine` moves to and from its weights for linear `op`: the MXU reads weights and
    activations once, PIM streams the weights through the banks once per input row
    (`dram.gemv_requests`)."""
    if engine == "MXU":
        return weight_bytes(op) + act_bytes(op)
    return op.attrs["m"] * weight_bytes(op)


def ridge(cfg, op, engine: str = "MXU") -> float:
    """Op/B at which `engine` turns from bandwidth- to compute-bound on `op`'s N:M pattern."""
    return 2 * peak_macs(cfg, op, engine) / (weight_gbps(cfg, engine) * 1e9)


def gemv_seconds(cfg, op, m: int, tile) -> float:
    """PIM.GEMV of m rows on one `tile.PimTile`: compute or weight stream, the slower, on the
    banks of the tile's channels only (their share of the peak and the row-buffer bandwidth)."""
    share = len(tile.channels) / cfg.pim.channels
    return max(linear_ops(op, m, tile.n) / (2 * peak_macs(cfg, op, "PIM") * share),
               m * weight_bytes(op, tile.n) / (weight_gbps(cfg, "PIM") * 1e9 * share))


def gemv_io_seconds(cfg, op, m: int, tile) -> float:
    """The DMA around a PIM.GEMV tile: the a8 rows into the GBUF of each of its channels, the
    fx results out of PRES, over `pim.channel_gbps`."""
    k = op.attrs["k"]
    nbytes = m * (len(tile.channels) * (k + SCALE_CODE_BYTES) + tile.n * FX_BYTES)
    return nbytes / (cfg.pim.channel_gbps * 1e9)


def seconds(cfg, op, engine: str) -> float:
    """Roofline time of linear `op` on `engine`: compute or the traffic to its weights, the
    slower; on PIM summed over its tiles (one PIM.GEMV after another), each also bounded by
    the transfer of its inputs and outputs."""
    if engine == "MXU":
        return max(linear_ops(op) / (2 * peak_macs(cfg, op, engine)),
                   traffic(op, engine) / (weight_gbps(cfg, engine) * 1e9))
    m = op.attrs["m"]
    return sum(max(gemv_seconds(cfg, op, m, t), gemv_io_seconds(cfg, op, m, t))
               for t in pim_tiles(cfg, op))


# ---- what each engine can run --------------------------------------------------------------

def mxu_unfit(cfg, op) -> str | None:
    """Why the MXU cannot run linear `op`, or None when it can."""
    if cfg.fpga is None:
        return "the machine has no fpga section"
    if op.attrs["bits"] not in cfg.fpga.weight_bits:
        return f"{op.attrs['bits']}-bit weights are not in fpga.weight_bits " \
               f"{list(cfg.fpga.weight_bits)!r}"
    return None


def pim_unfit(cfg, op) -> str | None:
    """Why the PIM banks cannot run linear `op`, or None when they can (docs/contract.md,
    PIM.GEMV: one a8 row per channel's GBUF, at least one output channel per bank, each
    bank's share of a tile inside the bank)."""
    pim, a = cfg.pim, op.attrs
    if pim is None:
        return "the machine has no pim section"
    if cfg.fpga is None:
        return "PIM.GEMV inputs are quantized by the VPU, and the machine has no fpga section"
    if a["k"] + SCALE_CODE_BYTES > pim.gbuf_bytes:
        return f"one a8 row of k={a['k']} needs {a['k'] + SCALE_CODE_BYTES} B of GBUF per " \
               f"channel but pim.gbuf_bytes is {pim.gbuf_bytes}"
    try:
        tiles = pim_tiles(cfg, op)
    except CompileError as err:
        return str(err).split(": ", 1)[1]
    share = max(t.bank_rows for t in tiles) * pim.row_bytes
    if share > pim.bank_bytes:
        return f"a bank's share of a tile, {share} B, exceeds the {pim.bank_bytes} B bank"
    return None


def _unfit(cfg, op, engine) -> str | None:
    if engine == "MXU":
        return mxu_unfit(cfg, op)
    if engine == "PIM":
        return pim_unfit(cfg, op)
    section = SECTION[engine]
    return None if getattr(cfg, section) is not None else f"the machine has no {section} section"


# ---- overrides -----------------------------------------------------------------------------

def parse_overrides(overrides) -> dict:
    """{OpKind: engine} from {"linear": "mxu", ...}; errors name the bad key or engine."""
    if overrides is not None and not isinstance(overrides, Mapping):
        raise CompileError(f"placement {overrides!r} is not a dict of op kind to engine; write "
                           f"e.g. {{'linear': 'mxu'}}")
    out = {}
    kinds = {kind.value: kind for kind in CHOICES}
    for key, engine in (overrides or {}).items():
        if key not in kinds:
            raise CompileError(f"placement override {key!r} names no op kind with a choice of "
                               f"engine; use one of {sorted(kinds)!r}")
        kind = kinds[key]
        name = str(engine).upper()
        if name not in CHOICES[kind]:
            raise CompileError(f"placement override {key}={engine!r}: {key} runs on "
                               f"{' or '.join(e.lower() for e in CHOICES[kind])}")
        out[kind] = name
    kv = {out[k] for k in KV_OPS if k in out}
    if len(kv) > 1:
        raise CompileError(f"placement overrides put kv_append and attention on different "
                           f"engines {sorted(kv)!r}; both follow the one KV cache home")
    return out


def kv_engine(cfg, overrides: dict) -> str:
    """The engine of KV append and attention for every entry: CSD when the machine has one."""
    chosen = next((overrides[k] for k in KV_OPS if k in overrides), None)
    engine = chosen or ("CSD" if cfg.csd is not None else "VPU")
    why = _unfit(cfg, None, engine)
    if why is not None:
        raise CompileError(f"attention cannot run on {engine}: {why}; pick another placement "
                           f"or preset")
    return engine


# ---- the pass ------------------------------------------------------------------------------

def _fastest(times: dict, moved: dict) -> str:
    """The engine of least time; within TIE of it, the one that moves fewer bytes."""
    best = min(times.values())
    close = [e for e, t in times.items() if t <= best * (1 + TIE)]
    return min(close, key=lambda e: moved[e])


def _place_linear(cfg, op, forced: str | None) -> dict:
    unfit = {e: _unfit(cfg, op, e) for e in CHOICES[op.kind]}
    fits = [e for e, why in unfit.items() if why is None]
    note = {"op_b": intensity(op), "ridge": {e: ridge(cfg, op, e) for e in fits},
            "seconds": {e: seconds(cfg, op, e) for e in fits},
            "unfit": {e: why for e, why in unfit.items() if why is not None}}
    if forced is not None:
        if unfit[forced]:
            raise CompileError(f"{op.where}: placement override puts it on {forced} but "
                               f"{unfit[forced]}; drop the override")
        return {"engine": forced, **note, "reason": "override"}
    if cfg.fpga is None:
        raise CompileError(f"{op.where}: the machine has no fpga section, so nothing "
                           "quantizes activations; pick a preset with an FPGA")
    if not fits:
        raise CompileError(f"{op.where}: no engine can run it: " + "; ".join(
            f"{e}: {why}" for e, why in unfit.items()) + "; change --quant or the preset")
    if len(fits) == 1:
        (engine,) = fits
        other = next(e for e in unfit if e != engine)
        return {"engine": engine, **note, "reason": f"{other} unfit: {unfit[other]}"}
    times = note["seconds"]
    engine = _fastest(times, {e: traffic(op, e) for e in fits})
    other = next(e for e in fits if e != engine)
    if math.isclose(times[engine], times[other], rel_tol=TIE):
        why = f"ties {other}, moves fewer bytes"
    else:
        why = f"{times[other] / times[engine]:.3g}x faster than {other}"
    return {"engine": engine, **note, "reason": why}


class BankFill:
    """The PIM banks as the placement fills them, weight by weight in op order: a linear the
    roofline sends to PIM whose tiles no longer fit the banks goes to the MXU instead (stacked
    as `tile.plan_memory` stacks them)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.tops = [0] * cfg.pim.channels if cfg.pim is not None else []
        self.placed: set = set()

    def admit(self, op, decision: dict) -> dict:
        weight, cfg = op.attrs["weight"], self.cfg
        if decision["engine"] != "PIM" or weight in self.placed:
            return decision
        tops = list(self.tops)
        end = max(e for _, _, e in pim_offsets(cfg, pim_tiles(cfg, op), tops))
        if end <= cfg.pim.bank_bytes or decision["reason"] == "override" \
                or "MXU" not in decision["seconds"]:
            self.tops = tops
            self.placed.add(weight)
            return decision
        return {**decision, "engine": "MXU",
                "reason": f"PIM banks full ({end} of {cfg.pim.bank_bytes} B per bank)"}


def run(graph: Graph, cfg, options=None) -> Graph:
    """Set `op.engine` of every op and note the decision in `op.annotations["place"]`.

    Options: "placement", a dict of overrides per op kind ({"linear": "pim"}). A linear's note
    holds its Op/B, and per engine that can run it the ridge point and roofline seconds
    ("ridge", "seconds") or why it cannot ("unfit").
    """
    overrides = parse_overrides(option(options, "placement", None))
    kv = kv_engine(cfg, overrides)
    out = graph.clone()
    banks = BankFill(cfg)
    for op in out.ops:
        if op.kind in LINEARS:
            decision = banks.admit(op, _place_linear(cfg, op, overrides.get(op.kind)))
        elif op.kind in KV_OPS:
            op_b = intensity(op)
            decision = {"engine": kv, "op_b": op_b, "reason": f"KV cache in {KV_HOME[kv]}"}
        else:
            if cfg.fpga is None:
                raise CompileError(f"{op.where}: {op.kind.name} runs on the VPU, and the "
                                   "machine has no fpga section; pick a preset with an FPGA")
            decision = {"engine": "VPU", "op_b": None, "reason": "vector op"}
        op.engine = decision["engine"]
        op.annotations["place"] = decision
    out.meta["kv_home"] = KV_HOME[kv]
    return out.verify()
