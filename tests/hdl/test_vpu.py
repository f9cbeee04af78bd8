"""The VPU RTL: ADD, SILUMUL, ROPE, QUANT and RMSNORM against trimem.special / numerics, and
timing."""
from dataclasses import replace

import numpy as np
import pytest
from amaranth.hdl import Module, Signal
from amaranth.sim import Simulator

from trimem import isa, layout, numerics, special, timing
from trimem.config import load_config
from trimem.hdl.frontend import simulate_sram_top
from trimem.hdl.vpu import VectorUnit, encode_amax, rsqrt
from trimem.hdl.vpu_top import BUILT, PASSES, VpuEngine, vpu_top
from tests.hdl.rejects import rejects

SMALL = load_config("trimem-small")
A_ADDR, B_ADDR, O_ADDR, S_ADDR = 0x104, 0x1002, 0x2001, 0x3003
INT32_MIN, INT32_MAX = -2**31, 2**31 - 1



def fx_rows(rng, m, n, *, spread=True):
    """Random fx rows; with `spread`, each element scaled down by a random power of two, so
    small, large and saturating values all occur."""
    x = rng.integers(-2**31, 2**31, size=(m, n))
    if spread:
        x >>= rng.integers(0, 31, size=(m, n))
    return x.astype(np.int32)


def run_vpu(words, sram, reads, cycles):
    return simulate_sram_top(vpu_top(SMALL, words, sram=sram.tobytes()), reads,
                             max_cycles=cycles + 10)


def assert_quantized_rows(out, cycles, n, a8, mant, exp):
    """`run_vpu` halted cleanly in `cycles`, its first read the a8 rows and its second their
    scale codes, bit for bit."""
    assert (out["halted"], out["error"], out["cycles"]) == (1, 0, cycles)
    got = layout.unpack_a8_rows(np.frombuffer(out["data"][0], np.uint8), n)
    np.testing.assert_array_equal(got, a8)
    got_mant, got_exp = layout.unpack_scale_codes(np.frombuffer(out["data"][1], np.uint8))
    np.testing.assert_array_equal(got_mant, mant)
    np.testing.assert_array_equal(got_exp, exp)


@pytest.mark.sim
def test_encode_amax_in_hardware_gives_numerics_scale_codes():
    amax = np.array([0, 1, 2, 32767, 32768, 32769, 65535, 65536, 2**31 - 1, 2**31, 12345678])
    m = Module()
    value = Signal(33)
    mant, exp = encode_amax(m, value)
    got = []

    async def bench(ctx):
        for a in amax:
            ctx.set(value, int(a))
            got.append((ctx.get(mant), ctx.get(exp)))

    sim = Simulator(m)
    sim.add_testbench(bench)
    sim.run()
    want_mant, want_exp = numerics.encode_amax(amax)
    assert got == list(zip(want_mant.tolist(), want_exp.tolist()))


BINARY = {"VPU.ADD": (special.add_sat, (2, 13), False),
          "VPU.SILUMUL": (special.silu_mul, (3, 11), True)}


@pytest.mark.sim
@pytest.mark.parametrize("name", BINARY)
def test_binary_ops_match_special_bit_for_bit_in_the_cycles_timing_gives(name):
    fn, (m, n), spread = BINARY[name]
    rng = np.random.default_rng(5)
    a, b = fx_rows(rng, m, n, spread=spread), fx_rows(rng, m, n, spread=spread)
    a[0, :4] = [0, -1, 2**31 - 1, -2**31]
    sram = np.zeros(SMALL.fpga.sram_bytes, np.uint8)
    sram[A_ADDR:A_ADDR + 4 * m * n] = layout.pack_fx_rows(a)
    sram[B_ADDR:B_ADDR + 4 * m * n] = layout.pack_fx_rows(b)
    fields = dict(m=m, n=n, a_addr=A_ADDR, b_addr=B_ADDR, o_addr=O_ADDR)
    cycles = timing.vpu_cycles(SMALL.fpga, name, fields)
    out = run_vpu([isa.encode(name, **fields), isa.encode("HALT")], sram,
                  [(O_ADDR, 4 * m * n)], cycles)
    assert (out["halted"], out["error"], out["cycles"]) == (1, 0, cycles)
    got = layout.unpack_fx_rows(np.frombuffer(out["data"][0], np.uint8), n)
    np.testing.assert_array_equal(got, fn(a, b))


@pytest.mark.sim
@pytest.mark.parametrize("m, n", [(3, 13), (1, 5), (2, 16)])
def test_quant_matches_quantize_act_bit_for_bit_in_the_cycles_timing_gives(m, n):
    rng = np.random.default_rng(m * 100 + n)
    x = (rng.integers(-2**31, 2**31, size=(m, n)) >> rng.integers(0, 31, size=(m, 1)))
    x = x.astype(np.int32)
    x[0, 0] = -2**31
    sram = np.zeros(SMALL.fpga.sram_bytes, np.uint8)
    sram[A_ADDR:A_ADDR + 4 * m * n] = layout.pack_fx_rows(x)
    fields = dict(m=m, n=n, x_addr=A_ADDR, o_addr=O_ADDR, s_addr=S_ADDR)
    cycles = timing.vpu_cycles(SMALL.fpga, "VPU.QUANT", fields)
    out = run_vpu([isa.encode("VPU.QUANT", **fields), isa.encode("HALT")], sram,
                  [(O_ADDR, m * n), (S_ADDR, 4 * m)], cycles)
    assert_quantized_rows(out, cycles, n, *numerics.quantize_act(x))


@pytest.mark.sim
def test_ops_back_to_back_take_the_sum_of_their_cycles():
    rng = np.random.default_rng(6)
    m, n = 2, 9
    x = fx_rows(rng, m, n)
    sram = np.zeros(SMALL.fpga.sram_bytes, np.uint8)
    sram[A_ADDR:A_ADDR + 4 * m * n] = layout.pack_fx_rows(x)
    add = dict(m=m, n=n, a_addr=A_ADDR, b_addr=A_ADDR, o_addr=B_ADDR)
    quant = dict(m=m, n=n, x_addr=B_ADDR, o_addr=O_ADDR, s_addr=S_ADDR)
    words = [isa.encode("VPU.ADD", **add), isa.encode("VPU.QUANT", **quant),
             isa.encode("HALT")]
    cycles = (timing.vpu_cycles(SMALL.fpga, "VPU.ADD", add)
              + timing.vpu_cycles(SMALL.fpga, "VPU.QUANT", quant))
    out = run_vpu(words, sram, [(O_ADDR, m * n)], cycles)
    assert out["cycles"] == cycles
    a8, _, _ = numerics.quantize_act(special.add_sat(x, x))
    np.testing.assert_array_equal(layout.unpack_a8_rows(np.frombuffer(out["data"][0], np.uint8),
                                                        n), a8)


@pytest.mark.sim
@pytest.mark.parametrize("heads, head_dim", [(2, 16), (3, 32)])
def test_rope_matches_special_rope_bit_for_bit_in_the_cycles_timing_gives(heads, head_dim):
    rng = np.random.default_rng(heads)
    m, max_pos = 3, 40
    x = fx_rows(rng, m, heads * head_dim)
    pos = np.array([0, 39, 17], np.int32)
    cos, sin = special.rope_table(1.0 / 10000 ** (np.arange(head_dim // 2) / (head_dim // 2)),
                                  max_pos)
    table = np.concatenate([cos, sin], axis=1).astype("<i2").view(np.uint8).reshape(-1)
    pos_addr, table_addr = 0x5001, 0x6003
    sram = np.zeros(SMALL.fpga.sram_bytes, np.uint8)
    sram[A_ADDR:A_ADDR + x.size * 4] = layout.pack_fx_rows(x)
    sram[pos_addr:pos_addr + 4 * m] = pos.astype("<i4").view(np.uint8)
    sram[table_addr:table_addr + table.size] = table
    fields = dict(m=m, heads=heads, head_dim=head_dim, x_addr=A_ADDR, pos_addr=pos_addr,
                  table_addr=table_addr, o_addr=O_ADDR)
    cycles = timing.vpu_cycles(SMALL.fpga, "VPU.ROPE", fields)
    out = run_vpu([isa.encode("VPU.ROPE", **fields), isa.encode("HALT")], sram,
                  [(O_ADDR, x.size * 4)], cycles)
    assert (out["halted"], out["error"], out["cycles"]) == (1, 0, cycles)
    want = special.rope(x.reshape(m, heads, head_dim), pos, cos, sin).reshape(m, -1)
    got = layout.unpack_fx_rows(np.frombuffer(out["data"][0], np.uint8), heads * head_dim)
    np.testing.assert_array_equal(got, want)


@pytest.mark.sim
def test_rsqrt_in_hardware_gives_rmsnorms_isqrt_of_2_to_the_60_over_m():
    lo, hi = 1 << special.RSQRT_BITS - 2, 1 << special.RSQRT_BITS
    rng = np.random.default_rng(8)
    norms = [lo, lo + 1, lo + 2, 2 * lo - 1, 2 * lo, 3 * lo, hi - 1, hi,
             *rng.integers(lo, hi + 1, 24).tolist()]
    m = Module()
    value = Signal(special.RSQRT_BITS + 1)
    root = rsqrt(m, value, "r")
    got = []

    async def bench(ctx):
        for v in norms:
            ctx.set(value, v)
            got.append(ctx.get(root))

    sim = Simulator(m)
    sim.add_testbench(bench)
    sim.run()
    want = special._isqrt(np.int64(1 << 2 * special.RSQRT_BITS) // np.array(norms, np.int64))
    assert got == want.tolist()


def rms_rows(rng, m, n):
    """fx rows for RMSNORM: random spreads, then a zero row, a row at the int32 limits and a
    row small enough to shift left (max |x| below 2**14), as far as m allows."""
    x = fx_rows(rng, m, n)
    edges = [np.zeros(n), np.where(np.arange(n) % 2, INT32_MAX, INT32_MIN),
             rng.integers(-2**9, 2**9, n)]
    for row, edge in zip(x[1:], edges):
        row[:] = edge
    return x


RMS_CASES = {"rows of one chunk and eps 1e-5": (1, 5, 168),
             "rows not a multiple of the lanes with extremes": (4, 13, 168),
             "eps 0": (3, 16, 0), "the largest eps": (3, 9, special.EPS_MAX),
             "one element": (2, 1, 17)}


@pytest.mark.sim
@pytest.mark.parametrize("m, n, eps", RMS_CASES.values(), ids=RMS_CASES)
def test_rmsnorm_matches_rmsnorm_quant_bit_for_bit_in_the_cycles_timing_gives(m, n, eps):
    rng = np.random.default_rng(m * 100 + n)
    x = rms_rows(rng, m, n)
    gamma = fx_rows(rng, 1, n)[0]
    gamma[:2] = [INT32_MIN, INT32_MAX][:n]
    sram = np.zeros(SMALL.fpga.sram_bytes, np.uint8)
    sram[A_ADDR:A_ADDR + 4 * m * n] = layout.pack_fx_rows(x)
    sram[B_ADDR:B_ADDR + 4 * (n + 1)] = np.append(gamma, eps).astype("<i4").view(np.uint8)
    fields = dict(m=m, n=n, x_addr=A_ADDR, g_addr=B_ADDR, o_addr=O_ADDR, s_addr=S_ADDR)
    cycles = timing.vpu_cycles(SMALL.fpga, "VPU.RMSNORM", fields)
    out = run_vpu([isa.encode("VPU.RMSNORM", **fields), isa.encode("HALT")], sram,
                  [(O_ADDR, m * n), (S_ADDR, 4 * m)], cycles)
    assert_quantized_rows(out, cycles, n, *special.rmsnorm_quant(x, gamma, eps))


@pytest.mark.sim
@pytest.mark.parametrize("m, n", [(5, 3), (4, 8), (3, 9)])
def test_quant_rows_of_one_chunk_back_to_back_keep_each_rows_reciprocal(m, n):
    """A row's reciprocal may change two cycles after its last AMAX chunk."""
    rng = np.random.default_rng(m + n)
    x = (rng.integers(-2**31, 2**31, size=(m, n)) >> rng.integers(0, 31, size=(m, 1)))
    x = x.astype(np.int32)
    sram = np.zeros(SMALL.fpga.sram_bytes, np.uint8)
    sram[A_ADDR:A_ADDR + 4 * m * n] = layout.pack_fx_rows(x)
    fields = dict(m=m, n=n, x_addr=A_ADDR, o_addr=O_ADDR, s_addr=S_ADDR)
    cycles = timing.vpu_cycles(SMALL.fpga, "VPU.QUANT", fields)
    out = run_vpu([isa.encode("VPU.QUANT", **fields), isa.encode("HALT")], sram,
                  [(O_ADDR, m * n), (S_ADDR, 4 * m)], cycles)
    assert_quantized_rows(out, cycles, n, *numerics.quantize_act(x))


@pytest.mark.sim
@pytest.mark.parametrize("n", [5, 19])
def test_rmsnorm_rows_at_every_row_shift_match_rmsnorm_quant(n):
    """Rows whose max |x| has 1 to 32 bits: every sum of squares the lanes keep is used."""
    rng = np.random.default_rng(n)
    tops = list(range(1, 33))
    m = len(tops)
    x = np.zeros((m, n), np.int64)
    for r, top in enumerate(tops):
        lo = -(1 << top - 1)
        row = rng.integers(lo, -lo, n) >> rng.integers(0, 4, n)
        row[rng.integers(n)] = lo if r % 2 else -lo - 1
        x[r] = row
    x = x.astype(np.int32)
    gamma = rng.integers(-2**31, 2**31, n).astype(np.int32) >> rng.integers(0, 20, n)
    gamma = gamma.astype(np.int32)
    eps = 168
    sram = np.zeros(SMALL.fpga.sram_bytes, np.uint8)
    sram[A_ADDR:A_ADDR + 4 * m * n] = layout.pack_fx_rows(x)
    sram[B_ADDR:B_ADDR + 4 * (n + 1)] = np.append(gamma, eps).astype("<i4").view(np.uint8)
    fields = dict(m=m, n=n, x_addr=A_ADDR, g_addr=B_ADDR, o_addr=O_ADDR + 0x1000,
                  s_addr=S_ADDR + 0x1000)
    cycles = timing.vpu_cycles(SMALL.fpga, "VPU.RMSNORM", fields)
    out = run_vpu([isa.encode("VPU.RMSNORM", **fields), isa.encode("HALT")], sram,
                  [(O_ADDR + 0x1000, m * n), (S_ADDR + 0x1000, 4 * m)], cycles)
    assert_quantized_rows(out, cycles, n, *special.rmsnorm_quant(x, gamma, eps))


@pytest.mark.sim
@pytest.mark.parametrize("word", [
    isa.encode("VPU.EMBED", m=1, n=8, ids_addr=0, table_addr=0, o_addr=0),
    isa.encode("VPU.ROPE", m=1, heads=1, head_dim=8, x_addr=0, pos_addr=0, table_addr=0,
               o_addr=0)], ids=["embed", "rope with half heads shorter than the lanes"])
def test_a_vpu_word_the_rtl_does_not_run_stops_the_stream_with_error(word):
    out = run_vpu([word, isa.encode("HALT")], np.zeros(SMALL.fpga.sram_bytes, np.uint8), [], 10)
    assert (out["halted"], out["error"]) == (1, 1)


@pytest.mark.unit
def test_every_built_op_streams_its_rows_as_many_times_as_timing_counts_passes():
    got = {name: len(PASSES.get(op, (op,))) for name, op in BUILT.items()}
    assert got == {name: timing.VPU_PASSES[name] for name in BUILT}


@pytest.mark.unit
def test_lane_counts_the_rtl_cannot_build_are_rejected():
    rejects(r"^vpu_lanes must be an int in \[1, 256\], got 0$", lambda: VectorUnit(0))
    rejects(r"^vpu_lanes = 1024 must be a power of two in \[1, 256\] for the RTL",
            lambda: VpuEngine(replace(SMALL.fpga, vpu_lanes=1024)))
    rejects(r"^vpu_lanes = 12 must be a power of two", lambda: VpuEngine(replace(SMALL.fpga,
                                                                               vpu_lanes=12)))
