"""The placement pass: every op to the engine whose roofline suits it.

Linears and the LM head go by arithmetic intensity, Op/B = 2*M*N*K / (weight + activation
bytes), against the ridge point of the FPGA (its peak MAC/s for the op's N:M pattern against
HBM bandwidth). At or above the ridge a GEMM is compute-bound and runs on the MXU DSP chains;
below it the op streams weights (a GEMV) and runs in the PIM banks when the machine has them
and the op fits their buffers (NeuPIMs, ASPLOS'24: GEMM to the NPU, GEMV to PIM).

The KV cache has one home for every entry of a bundle: FLASH when the machine has a CSD, so
KV append and attention run inside the drive at internal flash bandwidth (InstInfer), else
HBM with the VPU's attention. Embedding, norms, RoPE and the element-wise ops run on the VPU.
An override per op kind, {"linear": "mxu", "attention": "csd"}, wins over the rule wherever
that engine can run the op; where it cannot, the error says why.
"""
from __future__ import annotations

from trimem import layout
from trimem.compiler.ir import CompileError, Graph, OpKind, option
from trimem.compiler.tile import FX_BYTES, LINEARS, pim_tiles, weight_bytes
from trimem.layout import SCALE_CODE_BYTES

KV_OPS = (OpKind.KV_APPEND, OpKind.ATTENTION)
CHOICES = {OpKind.LINEAR: ("MXU", "PIM"), OpKind.LM_HEAD: ("MXU", "PIM"),
           OpKind.KV_APPEND: ("VPU", "CSD"), OpKind.ATTENTION: ("VPU", "CSD")}
"""The engines that can run each op kind; every other kind runs on the VPU."""
SECTION = {"MXU": "fpga", "VPU": "fpga", "PIM": "pim", "CSD": "csd"}
"""The config section each engine needs."""
KV_HOME = {"VPU": "HBM", "CSD": "FLASH"}
"""Where the KV cache lives when its ops run on each engine."""


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


def intensity(op) -> float | None:
    """Op/B of a linear or an attention (2 ops per MAC); None for the other kinds."""
    a = op.attrs
    if op.kind in LINEARS:
        acts = a["m"] * (a["k"] + SCALE_CODE_BYTES + a["n"] * FX_BYTES)
        return 2 * a["m"] * a["n"] * a["k"] / (weight_bytes(op) + acts)
    if op.kind is OpKind.ATTENTION:
        width = a["heads"] * a["head_dim"]
        macs = 2 * a["m"] * width * a["ctx"]
        return 2 * macs / (kv_bytes(op) + 2 * a["m"] * width * FX_BYTES)
    return None


def ridge(cfg, op) -> float:
    """The FPGA ridge point for the op's N:M pattern: 2 * effective MAC/s / HBM B/s."""
    fpga = cfg.fpga
    return 2 * fpga.effective_macs_per_s(nm_index(cfg, op)) / (fpga.hbm_gbps * 1e9)


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
    PIM.GEMV: one a8 row per channel's GBUF, at least one output channel per bank)."""
    pim, a = cfg.pim, op.attrs
    if pim is None:
        return "the machine has no pim section"
    if cfg.fpga is None:
        return "PIM.GEMV inputs are quantized by the VPU, and the machine has no fpga section"
    if a["k"] + SCALE_CODE_BYTES > pim.gbuf_bytes:
        return f"one a8 row of k={a['k']} needs {a['k'] + SCALE_CODE_BYTES} B of GBUF per " \
               f"channel but pim.gbuf_bytes is {pim.gbuf_bytes}"
    try:
        pim_tiles(cfg, op)
    except CompileError as err:
        return str(err).split(": ", 1)[1]
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
    out = {}
    kinds = {kind.value: kind for kind in CHOICES}
    for key, engine in dict(overrides or {}).items():
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

def _place_linear(cfg, op, forced: str | None) -> dict:
    op_b, unfit = intensity(op), {e: _unfit(cfg, op, e) for e in CHOICES[op.kind]}
    if forced is not None:
        if unfit[forced]:
            raise CompileError(f"{op.where}: placement override puts it on {forced} but "
                               f"{unfit[forced]}; drop the override")
        return {"engine": forced, "op_b": op_b, "reason": "override"}
    if cfg.fpga is None:
        raise CompileError(f"{op.where}: the machine has no fpga section, so nothing "
                           "quantizes activations; pick a preset with an FPGA")
    line = ridge(cfg, op)
    if unfit["PIM"] is None and (op_b < line or unfit["MXU"]):
        why = f"Op/B {op_b:.3g} < ridge {line:.3g}" if op_b < line else unfit["MXU"]
        return {"engine": "PIM", "op_b": op_b, "ridge": line, "reason": why}
    if unfit["MXU"] is not None:
        raise CompileError(f"{op.where}: no engine can run it: MXU: {unfit['MXU']}; PIM: "
                           f"{unfit['PIM']}; change --quant or the preset")
    why = f"Op/B {op_b:.3g} >= ridge {line:.3g}" if op_b >= line else \
        f"memory-bound but PIM unfit: {unfit['PIM']}"
    return {"engine": "MXU", "op_b": op_b, "ridge": line, "reason": why}


def run(graph: Graph, cfg, options=None) -> Graph:
    """Set `op.engine` of every op and note the decision in `op.annotations["place"]`.

    Options: "placement", a dict of overrides per op kind ({"linear": "pim"}).
    """
    overrides = parse_overrides(option(options, "placement", None))
    kv = kv_engine(cfg, overrides)
    out = graph.clone()
    for op in out.ops:
        if op.kind in LINEARS:
            decision = _place_linear(cfg, op, overrides.get(op.kind))
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

