"""Testbench of the MXU top: MXU.GEMM streams on the sparse DSP chains, against the emulator.

Every case runs the edge cases below with values drawn from the seed, then a few GEMMs of
random shape: every N:M pattern of the config with 4- and 8-bit weights; n not a multiple
of the chain count and kept lengths not a multiple of the chain length (partial steps);
one group per row and groups of 2 to 16; unaligned operand addresses; saturation (full-scale
operands with the smallest requant shift); and an int32 accumulator that wraps (a long row
of full-scale products). Outputs are compared bit for bit and every issue cycle exactly.
"""
from __future__ import annotations

import cocotb
import numpy as np

from trimem import isa, layout, numerics
from trimem.numerics import (ACT_EXP_MAX, ACT_QMAX, GROUP_MAX, REQUANT_SHIFT_MAX,
                             REQUANT_SHIFT_MIN, SCALE_MANT_BITS, qmax)
from trimem.sims import testbench
from trimem.sims.diff import Region

WRAP_K = 8896
"""A row long enough that full-scale products wrap the int32 accumulator:
8896 * 127 * (127 * 15) > 2**31."""
RANDOM_GEMMS = 3


class Allocator:
    """Consecutive SRAM regions, each at a random offset of 0-3 bytes (unaligned windows)."""

    def __init__(self, rng, size: int):
        self.rng, self.size, self.at = rng, size, 0

    def take(self, nbytes: int) -> int:
        addr = self.at + int(self.rng.integers(0, 4))
        self.at = addr + nbytes
        if self.at > self.size:
            raise ValueError(f"the case needs {self.at} bytes of SRAM but the config has "
                             f"{self.size}; shrink the case")
        return addr


def operands(rng, shape: dict, pattern, extreme: str = ""):
    """(a8, mant, exp, QuantWeight) of one GEMM; `extreme`: "" random, "saturate" or "wrap"."""
    m, n, k, bits = shape["m"], shape["n"], shape["k"], shape["bits"]
    keep, block = pattern
    group = isa.group_size(shape["group_log2"], k)
    limit = qmax(bits)
    if extreme:
        a8 = np.full((m, k), ACT_QMAX, np.int8) * rng.choice([-1, 1], (m, 1)).astype(np.int8)
        q = np.full((n, k), limit, np.int8)
        g = np.full((n, k // group), GROUP_MAX, np.uint8)
    else:
        a8 = rng.integers(-ACT_QMAX, ACT_QMAX + 1, (m, k)).astype(np.int8)
        q = rng.integers(-limit, limit + 1, (n, k)).astype(np.int8)
        g = rng.integers(1, GROUP_MAX + 1, (n, k // group)).astype(np.uint8)
    q = np.where(numerics.nm_prune_mask(q, keep, block), q, 0).astype(np.int8)
    if extreme == "saturate":
        mant = np.full(m, (1 << SCALE_MANT_BITS) - 1, np.int32)
        exp = np.full(m, ACT_EXP_MAX, np.int32)
        mult = np.full(n, (1 << SCALE_MANT_BITS) - 1, np.int32)
        shift = np.full(n, REQUANT_SHIFT_MIN, np.uint8)
    else:
        mant = rng.integers(1, 1 << SCALE_MANT_BITS, m).astype(np.int32)
        exp = rng.integers(0, ACT_EXP_MAX + 1, m).astype(np.int32)
        mult = rng.integers(0, 1 << SCALE_MANT_BITS, n).astype(np.int32)
        shift = rng.integers(REQUANT_SHIFT_MIN, REQUANT_SHIFT_MAX + 1, n).astype(np.uint8)
    return a8, mant, exp, numerics.QuantWeight(q, g, mult, shift, bits, group)


def shapes(rng, fpga) -> list:
    """(fields, extreme) of the GEMMs of a case: edge cases, then random shapes."""
    chains, length = fpga.dsp_chains, fpga.chain_length
    out = []
    for nm, (keep, block) in enumerate(fpga.nm_patterns):
        for bits in fpga.weight_bits:
            k = block * (2 * length // keep + 2)
            out.append(({"m": int(rng.integers(1, 4)), "n": chains * 2 + 1, "k": k,
                         "bits": bits, "nm": nm, "group_log2": 0 if bits == 4 else 1}, ""))
        k = 16 * block
        out.append(({"m": 2, "n": 2, "k": k, "bits": fpga.weight_bits[-1], "nm": nm,
                     "group_log2": 4}, "saturate"))
    out.append(({"m": 1, "n": chains, "k": WRAP_K, "bits": 8, "nm": 0, "group_log2": 0},
                "wrap"))
    for _ in range(RANDOM_GEMMS):
        nm = int(rng.integers(len(fpga.nm_patterns)))
        block = fpga.nm_patterns[nm][1]
        group_log2 = int(rng.choice([0, 2, 3, 4, 5]))
        unit = max(block, 1 << group_log2)
        out.append(({"m": int(rng.integers(1, 5)), "n": int(rng.integers(1, 4 * chains + 1)),
                     "k": unit * int(rng.integers(1, 8)),
                     "bits": int(rng.choice(fpga.weight_bits)), "nm": nm,
                     "group_log2": group_log2}, ""))
    return out


def make_case(seed: int, cfg) -> dict:
    """GEMMs of `shapes`, their operands in SRAM, a NOP between two of them, and the
    emulator's outputs and issue cycles."""
    rng = np.random.default_rng(seed)
    fpga = cfg.fpga
    alloc = Allocator(rng, fpga.sram_bytes)
    program, images, regions = [], [], []
    for i, (shape, extreme) in enumerate(shapes(rng, fpga)):
        pattern = tuple(fpga.nm_patterns[shape["nm"]])
        a8, mant, exp, qw = operands(rng, shape, pattern, extreme)
        tile = layout.pack_weight_tile(qw, pattern)
        parts = {"a_addr": layout.pack_a8_rows(a8),
                 "s_addr": layout.pack_scale_codes(mant, exp), "w_addr": tile}
        fields = dict(shape)
        for name, data in parts.items():
            fields[name] = alloc.take(data.size)
            images.append(("SRAM", fields[name], data.tobytes()))
        fields["o_addr"] = alloc.take(4 * shape["m"] * shape["n"])
        if i == 1:
            program.append("NOP")
        regions.append(Region(f"O{i}", "SRAM", fields["o_addr"], "<i4",
                              (shape["m"], shape["n"]), ("MXU", len(program))))
        program.append(isa.encode("MXU.GEMM", **fields))
    return testbench.emulator_case(cfg, isa.Engine.MXU, program, images, regions)


@cocotb.test()
async def mxu_matches_emulator(dut):
    """Every GEMM output bit-exact, every issue cycle exact."""
    await testbench.check_sram_top(dut)
