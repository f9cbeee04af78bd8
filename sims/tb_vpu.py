"""Testbench of the VPU top: every VPU op the RTL builds (`trimem.hdl.vpu_top.BUILT`: ADD,
SILUMUL, ROPE, QUANT, RMSNORM), against the emulator.

Rows are drawn at three scales (small fx values, values near the int32 limits so that ADD,
SILUMUL and ROPE saturate, and full-range values), with row lengths below, at and above the
lane count and not a multiple of it, several rows per instruction, unaligned addresses, an
all-zero row (QUANT's smallest scale code) and a row holding INT32_MIN (the largest |x|),
each quantized and normalized; RMSNORM gets full-range gamma and an epsilon of 0, 1e-6,
1e-5 or the largest code;
ROPE rows sit at random positions of a table from `trimem.special.rope_table`, position 0
included, with head_dim a multiple of 2 * lanes (the RTL's chunks tile half heads). Outputs
are compared bit for bit and every issue cycle exactly.
"""
from __future__ import annotations

import cocotb
import numpy as np

from trimem import isa, layout, special
from trimem.hdl.vpu_top import BUILT
from trimem.numerics import INT32_MAX, INT32_MIN
from trimem.sims import testbench
from trimem.sims.diff import Region
from trimem.sims.tb_mxu import Allocator

ROPE_BASE = 10000.0
"""RoPE frequency base of the drawn tables (LLaMA's)."""
ROPE_POSITIONS = 64
EPS_CODES = (0, special.quantize_eps(1e-6), special.quantize_eps(1e-5), special.EPS_MAX)
"""RMSNORM epsilon codes drawn from: none, common model values, the largest."""
SCALES = (1 << 14, 1 << 30, None)
"""|x| bounds of the drawn rows: fx values near 4.0, near the int32 limits, the full range."""


def rows(rng, m: int, n: int, scale) -> np.ndarray:
    """m x n fx rows with |x| below `scale` (None: anywhere in int32)."""
    if scale is None:
        return rng.integers(INT32_MIN, INT32_MAX, (m, n), dtype=np.int64, endpoint=True) \
            .astype(np.int32)
    return rng.integers(-scale, scale, (m, n)).astype(np.int32)


def rope_table(head_dim: int) -> np.ndarray:
    """ROPE_POSITIONS rows of cos then sin (int16) for `head_dim`, as VPU.ROPE reads them."""
    inv_freq = ROPE_BASE ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    cos, sin = special.rope_table(inv_freq, ROPE_POSITIONS)
    return np.concatenate([cos, sin], axis=1).astype("<i2")


class Case:
    """A VPU program under construction: operands in SRAM, instructions, output regions."""

    def __init__(self, rng, cfg):
        self.rng, self.cfg = rng, cfg
        self.alloc = Allocator(rng, cfg.fpga.sram_bytes)
        self.program, self.images, self.regions = [], [], []

    def put(self, data: np.ndarray) -> int:
        addr = self.alloc.take(data.nbytes)
        self.images.append(("SRAM", addr, data.tobytes()))
        return addr

    def output(self, dtype: str, shape: tuple) -> int:
        addr = self.alloc.take(int(np.prod(shape)) * np.dtype(dtype).itemsize)
        self.regions.append(Region(f"out{len(self.regions)}", "SRAM", addr, dtype, shape,
                                   ("VPU", len(self.program))))
        return addr

    def binary(self, name: str, a: np.ndarray, b: np.ndarray) -> None:
        m, n = a.shape
        fields = {"m": m, "n": n, "a_addr": self.put(a.astype("<i4")),
                  "b_addr": self.put(b.astype("<i4"))}
        fields["o_addr"] = self.output("<i4", (m, n))
        self.program.append(isa.encode(name, **fields))

    def quant(self, x: np.ndarray) -> None:
        m, n = x.shape
        fields = {"m": m, "n": n, "x_addr": self.put(x.astype("<i4"))}
        fields["o_addr"] = self.output("i1", (m, n))
        fields["s_addr"] = self.output("u1", (m, layout.SCALE_CODE_BYTES))
        self.program.append(isa.encode("VPU.QUANT", **fields))

    def rmsnorm(self, x: np.ndarray) -> None:
        m, n = x.shape
        gamma = rows(self.rng, 1, n, None)[0]
        eps = EPS_CODES[int(self.rng.integers(len(EPS_CODES)))]
        fields = {"m": m, "n": n, "x_addr": self.put(x.astype("<i4")),
                  "g_addr": self.put(np.append(gamma, eps).astype("<i4"))}
        fields["o_addr"] = self.output("i1", (m, n))
        fields["s_addr"] = self.output("u1", (m, layout.SCALE_CODE_BYTES))
        self.program.append(isa.encode("VPU.RMSNORM", **fields))

    def rope(self, x: np.ndarray, heads: int, head_dim: int) -> None:
        m = x.shape[0]
        pos = self.rng.integers(0, ROPE_POSITIONS, m).astype("<i4")
        pos[0] = 0
        fields = {"m": m, "heads": heads, "head_dim": head_dim,
                  "x_addr": self.put(x.astype("<i4")), "pos_addr": self.put(pos),
                  "table_addr": self.put(rope_table(head_dim))}
        fields["o_addr"] = self.output("<i4", x.shape)
        self.program.append(isa.encode("VPU.ROPE", **fields))


def make_case(seed: int, cfg) -> dict:
    """Each built op at each scale with a random shape, QUANT and RMSNORM on a zero row and on
    INT32_MIN, a NOP, and the emulator's outputs and issue cycles."""
    rng = np.random.default_rng(seed)
    lanes = cfg.fpga.vpu_lanes
    case = Case(rng, cfg)
    for name in BUILT:
        for scale in SCALES:
            m = int(rng.integers(1, 4))
            if name == "VPU.ROPE":
                heads, head_dim = int(rng.integers(1, 3)), 2 * lanes * int(rng.integers(1, 3))
                case.rope(rows(rng, m, heads * head_dim, scale), heads, head_dim)
                continue
            n = int(rng.integers(1, 4 * lanes))
            if name == "VPU.QUANT":
                case.quant(rows(rng, m, n, scale))
            elif name == "VPU.RMSNORM":
                case.rmsnorm(rows(rng, m, n, scale))
            else:
                case.binary(name, rows(rng, m, n, scale), rows(rng, m, n, scale))
        if len(case.program) == len(SCALES):
            case.program.append("NOP")
    edge = rows(rng, 3, lanes + 3, 1 << 20)
    edge[0] = 0
    edge[1, int(rng.integers(lanes + 3))] = INT32_MIN
    case.quant(edge)
    case.rmsnorm(edge)
    return testbench.emulator_case(cfg, isa.Engine.VPU, case.program, case.images,
                                   case.regions)


@cocotb.test()
async def vpu_matches_emulator(dut):
    """Every output bit-exact, every issue cycle exact."""
    await testbench.check_sram_top(dut)
