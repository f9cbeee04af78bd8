"""Cycle counts of the CTRL, DMA, MXU and VPU instructions: the one definition of FPGA timing.

The emulator charges these cycles and the RTL reproduces them, so each formula is written once
here as a pure function of the hardware config and an instruction's decoded fields, and
`docs/timing.md` spells them out. Cycles are of the clock of the engine that runs the
instruction (`fpga.clock_mhz` for DMA, MXU, VPU and the CTRL instructions in their streams).
Bandwidths in GB/s mean 10**9 bytes per second; byte streams round up to whole cycles.
"""
from __future__ import annotations

from fractions import Fraction

from trimem import isa, layout

# ---------------------------------------------------------------------------------------------
# CTRL
# ---------------------------------------------------------------------------------------------

NOP_CYCLES = 1
PUSH_CYCLES = 1
"""The token is visible to the receiver when the PUSH ends."""
POP_CYCLES = 1
"""A POP ends this many cycles after its token is available (or after it issues, if later)."""
HALT_CYCLES = 0
"""HALT only marks the end of the stream: the stream ends when its last instruction does."""
CTRL_CYCLES = {"NOP": NOP_CYCLES, "HALT": HALT_CYCLES, "PUSH": PUSH_CYCLES, "POP": POP_CYCLES}

# ---------------------------------------------------------------------------------------------
# MXU: sparse DSP chains (FlightLLM, FPGA'24, section 4)
# ---------------------------------------------------------------------------------------------

REQUANT_STAGES = 3
"""Pipeline stages after a chain's last MAC: multiply by mult * mant, round-shift, saturate."""


def mxu_fill(fpga) -> int:
    """Cycles to fill and drain the MXU pipeline: a chain of L cascaded DSPs adds one cycle of
    latency per DSP, then the requant stages."""
    return fpga.chain_length + REQUANT_STAGES


def nm_pattern(fpga, nm: int) -> tuple[int, int]:
    """The (n_keep, m) pattern that index `nm` names; ValueError if the config lacks it."""
    patterns = fpga.nm_patterns
    if not 0 <= nm < len(patterns):
        raise ValueError(f"nm = {nm!r} indexes no N:M pattern of this FPGA; its patterns are "
                         f"{', '.join(f'{i}={n}:{m}' for i, (n, m) in enumerate(patterns))}")
    n_keep, m = patterns[nm]
    return int(n_keep), int(m)


def check_weight_bits(fpga, bits: int) -> None:
    """ValueError unless the MXU supports `bits`-bit weights."""
    if bits not in fpga.weight_bits:
        raise ValueError(f"bits = {bits!r} is not a weight width of this FPGA; it supports "
                         f"{', '.join(map(str, fpga.weight_bits))}")


def mxu_kept(fpga, k: int, nm: int) -> int:
    """Kept (compressed) reduction length of a GEMM: k * n_keep / m."""
    n_keep, m = nm_pattern(fpga, nm)
    if k % m:
        raise ValueError(f"k = {k!r} is not a multiple of m = {m} of the {n_keep}:{m} pattern; "
                         f"pad K to a multiple of {m}")
    return k // m * n_keep


def mxu_gemm_cycles(fpga, f: dict) -> int:
    """MXU.GEMM: MXU_FILL + m * ceil(n / C) * ceil(kc / L).

    C = fpga.dsp_chains chains share the activation row and each computes another output
    channel; each chain does one L = fpga.chain_length wide step of the compressed dot
    product per cycle (N:M index metadata selects the activations, so sparse weights load
    compressed and compute dense).
    """
    check_weight_bits(fpga, f["bits"])
    kc = mxu_kept(fpga, f["k"], f["nm"])
    chains, length = fpga.dsp_chains, fpga.chain_length
    return mxu_fill(fpga) + f["m"] * -(-f["n"] // chains) * -(-kc // length)


def mxu_gemm_macs(fpga, f: dict) -> int:
    """MACs the DSPs perform: m * n * kc (pruned weights cost nothing)."""
    return f["m"] * f["n"] * mxu_kept(fpga, f["k"], f["nm"])

# ---------------------------------------------------------------------------------------------
# VPU: vector / special-function unit with fpga.vpu_lanes lanes
# ---------------------------------------------------------------------------------------------


VPU_FILL = 4
"""Model choice: VPU pipeline depth (operand read, function/LUT, round-saturate, write back)."""

VPU_PASSES = {
    "VPU.EMBED": 1,      # dequantize each gathered row as it streams in
    "VPU.RMSNORM": 3,    # sum of squares; normalize x gamma and row amax; quantize
    "VPU.QUANT": 2,      # row amax; quantize
    "VPU.ADD": 1,        # one saturating add per element
    "VPU.SILUMUL": 1,    # silu LUT and the multiply are pipelined
    "VPU.ROPE": 1,       # each lane rotates one (i, i + d/2) pair element per cycle
    "VPU.KVAPP": 2,      # row and group amax; quantize (K and V rows both)
}
"""Passes over the data per VPU op: each pass streams every element through the lanes once."""


def vpu_row_elements(name: str, f: dict) -> int:
    """Elements of one row that a VPU op passes through its lanes."""
    if name == "VPU.ROPE":
        return f["heads"] * f["head_dim"]
    if name == "VPU.KVAPP":
        return 2 * f["kv_heads"] * f["head_dim"]
    return f["n"]


def vpu_compute_cycles(fpga, name: str, f: dict) -> int:
    """Lane cycles of an element-wise VPU op: m * ceil(elements / vpu_lanes) * passes(op)."""
    return f["m"] * -(-vpu_row_elements(name, f) // fpga.vpu_lanes) * VPU_PASSES[name]


def vpu_cycles(fpga, name: str, f: dict) -> int:
    """RMSNORM, QUANT, ADD, SILUMUL, ROPE (SRAM only): VPU_FILL + compute cycles."""
    return VPU_FILL + vpu_compute_cycles(fpga, name, f)


def attn_kept(ctx: int, topk: int) -> int:
    """Keys whose V rows one query row reads: all `ctx` valid keys, or the top-k of them."""
    return min(ctx, topk) if topk else ctx


def attn_macs(f: dict, ctxs) -> int:
    """VPU.ATTN MACs: q_heads * head_dim * (ctx + kept) per query row (scores over every valid
    key, then the weighted sum over the kept V rows); 2 * q_heads * ctx * head_dim per row when
    nothing is pruned."""
    per_key = f["q_heads"] * f["head_dim"]
    return sum(per_key * (ctx + attn_kept(ctx, f["topk"])) for ctx in ctxs)


def attn_compute_cycles(fpga, f: dict, ctxs) -> int:
    """VPU.ATTN lane cycles: ceil(macs / vpu_lanes)."""
    return -(-attn_macs(f, ctxs) // fpga.vpu_lanes)


def attn_tokens(f: dict, ctxs) -> tuple[int, int]:
    """(K tokens, V tokens) one VPU.ATTN streams per kv head: the keys of the longest row, and
    of V at most m * topk of them (the kept sets are data dependent; this bound is not)."""
    ctx = max(ctxs)
    return ctx, min(ctx, f["m"] * f["topk"]) if f["topk"] else ctx


def kv_layout(config, space, f: dict) -> dict:
    """Keyword arguments of `layout.kv_offset` for a KVAPP or ATTN instruction's fields, with
    the cache in `space` (docs/contract.md, "Operand conventions"): pages are csd.page_bytes
    in FLASH, and in HBM the smallest multiple of fpga.hbm_interleave_bytes holding a token,
    so successive pages stripe over the channels."""
    head_dim, bits = f["head_dim"], f["kv_bits"]
    group = isa.group_size(f["kv_group_log2"], head_dim)
    if space == isa.Space.FLASH:
        page_bytes = config.csd.page_bytes
    else:
        step = config.fpga.hbm_interleave_bytes
        page_bytes = -(-layout.kv_token_bytes(head_dim, bits, group) // step) * step
    return {"layers": f["layers"], "kv_heads": f["kv_heads"], "max_ctx": 1 << f["ctx_log2"],
            "head_dim": head_dim, "bits": bits, "group": group, "page_bytes": page_bytes}


def vpu_stream_cycles(fpga, stream: int, compute: int) -> int:
    """EMBED, KVAPP and ATTN (touch HBM): hbm_latency_cycles + max(stream, compute) + VPU_FILL.

    `stream` is the HBM transfer time (the busiest channel touched, `hbm_stream_cycles`),
    `compute` the lane cycles; rows are processed as they stream, so the two overlap.
    """
    return fpga.hbm_latency_cycles + max(stream, compute) + VPU_FILL

# ---------------------------------------------------------------------------------------------
# Memories and links
# ---------------------------------------------------------------------------------------------


def cycles_per_byte(gbps, clock_mhz) -> Fraction:
    """Exact cycles of a `clock_mhz` clock per byte of a `gbps` GB/s stream."""
    return Fraction(str(clock_mhz)) / (Fraction(str(gbps)) * 1000)


def stream_cycles(nbytes: int, per_byte: Fraction) -> int:
    """Whole cycles to move `nbytes` at `per_byte` cycles per byte: ceil(nbytes * per_byte)."""
    return -(-nbytes * per_byte.numerator // per_byte.denominator)


def latency_cycles(us, clock_mhz) -> int:
    """Whole cycles of a `clock_mhz` clock covering `us` microseconds."""
    cycles = Fraction(str(us)) * Fraction(str(clock_mhz))
    return -(-cycles.numerator // cycles.denominator)


def _channel_prefix(x: int, step: int, channels: int) -> list[int]:
    """Bytes of [0, x) in each HBM channel: whole interleave periods give `step` bytes to
    every channel, and the last partial period fills the channels in order."""
    rounds, rest = divmod(x, step * channels)
    full, part = divmod(rest, step)
    base = rounds * step
    return [base + step] * full + [base + part] + [base] * (channels - full - 1)


def hbm_channel_bytes(fpga, addr: int, nbytes: int) -> list[int]:
    """Bytes per HBM channel (a list of hbm_channels ints) of the range [addr, addr + nbytes)
    (docs/contract.md: channel = (addr // hbm_interleave_bytes) % hbm_channels)."""
    step, channels = fpga.hbm_interleave_bytes, fpga.hbm_channels
    end = _channel_prefix(addr + nbytes, step, channels)
    return [b - a for a, b in zip(_channel_prefix(addr, step, channels), end)]


def hbm_stream_cycles(channel_bytes: list[int], per_byte: Fraction) -> int:
    """Cycles to move bytes spread over HBM channels that run in parallel: the busiest one."""
    return stream_cycles(max(channel_bytes, default=0), per_byte)
