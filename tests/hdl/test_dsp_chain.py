"""The MXU RTL: DSP chain sums, requant, and MXU.GEMM against numerics.linear and timing."""
from dataclasses import replace

import numpy as np
import pytest
from amaranth.sim import Simulator

from trimem import isa, layout, numerics, timing
from trimem.config import load_config
from trimem.hdl.dsp_chain import ChainArray, DspChain, Requant
from trimem.hdl.frontend import simulate_sram_top
from trimem.hdl.mxu_top import MxuEngine, mxu_top
from tests.hdl.rejects import rejects

SMALL = load_config("trimem-small")
S_ADDR, A_ADDR = 0x42, 0x101
"""Deliberately unaligned SRAM addresses; the weight tile and the output follow A."""



def simulate(dut, bench):
    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()


@pytest.mark.sim
def test_a_chain_sums_each_dot_product_with_int32_wrap_and_length_cycles_of_latency():
    length, rng = 4, np.random.default_rng(0)
    dut = DspChain(length)
    steps = [(rng.integers(-127, 128, length), rng.integers(-1905, 1906, length))
             for _ in range(7)]
    runs = [(0, 3), (3, 4), (4, 7)]          # three dot products of 3, 1 and 3 steps
    got = []

    async def bench(ctx):
        ctx.set(dut.o_dot.ready, 1)
        for cycle in range(len(steps) + length + 2):
            if cycle < len(steps):
                a, w = steps[cycle]
                for i in range(length):
                    ctx.set(dut.i_step.payload.a[i], int(a[i]))
                    ctx.set(dut.i_step.payload.w[i], int(w[i]))
                ctx.set(dut.i_step.payload.first, any(cycle == lo for lo, _ in runs))
                ctx.set(dut.i_step.payload.last, any(cycle == hi - 1 for _, hi in runs))
            ctx.set(dut.i_step.valid, cycle < len(steps))
            if ctx.get(dut.o_dot.valid):
                got.append((cycle, ctx.get(dut.o_dot.payload)))
            await ctx.tick()

    simulate(dut, bench)
    want = [(hi - 1 + length, int(sum(int(a @ w) for a, w in steps[lo:hi]))) for lo, hi in runs]
    assert got == want


@pytest.mark.sim
def test_a_chain_accumulator_wraps_like_numerics_accumulate():
    length = 2
    dut = DspChain(length)
    a = np.full((1, 40), 127, np.int8)
    w = np.full((1, 40), 1905, np.int16)
    got = []

    async def bench(ctx):
        ctx.set(dut.o_dot.ready, 1)
        for cycle in range(20 + length + 1):
            for i in range(length):
                ctx.set(dut.i_step.payload.a[i], 127)
                ctx.set(dut.i_step.payload.w[i], 1905)
            ctx.set(dut.i_step.payload.first, cycle == 0)
            ctx.set(dut.i_step.payload.last, cycle == 19)
            ctx.set(dut.i_step.valid, cycle < 20)
            if ctx.get(dut.o_dot.valid):
                got.append(ctx.get(dut.o_dot.payload))
            await ctx.tick()

    simulate(dut, bench)
    assert got == [int(numerics.accumulate(a, w)[0, 0])]


@pytest.mark.sim
def test_requant_rounds_half_up_and_saturates_like_numerics_linear():
    rng = np.random.default_rng(1)
    acc = np.concatenate([rng.integers(-2**31, 2**31, 60), [-2**31, 2**31 - 1, 0, 3, -3, 1]])
    scale = np.concatenate([rng.integers(0, 2**30, 60), [2**30 - 1, 2**30 - 1, 5, 1, 1, 1]])
    amount = np.concatenate([rng.integers(0, 63, 60), [17, 17, 0, 1, 1, 1]])
    want = numerics.sat(numerics.rshift_round(acc * scale, amount), 32)
    dut = Requant()
    got = []

    async def bench(ctx):
        ctx.set(dut.o_value.ready, 1)
        for i in range(len(acc) + 1):
            if i < len(acc):
                ctx.set(dut.i_value.payload.acc, int(acc[i]))
                ctx.set(dut.i_value.payload.scale, int(scale[i]))
                ctx.set(dut.i_value.payload.amount, int(amount[i]))
            ctx.set(dut.i_value.valid, i < len(acc))
            if ctx.get(dut.o_value.valid):
                got.append(ctx.get(dut.o_value.payload))
            await ctx.tick()

    simulate(dut, bench)
    assert got == want.tolist()


def gemm_case(cfg, rng, *, m, n, k, bits, nm, group_log2, extreme=False):
    """(fields, SRAM image, expected fx output) of one MXU.GEMM."""
    keep, block = cfg.fpga.nm_patterns[nm]
    group = isa.group_size(group_log2, k)
    x = rng.integers(-2**20, 2**20, size=(m, k)).astype(np.int32)
    a8, mant, exp = numerics.quantize_act(x)
    w = rng.normal(size=(n, k))
    if block > 1:
        w = w * numerics.nm_prune_mask(w, keep, block)
    qw = numerics.quantize_weight(w, bits, group)
    if extreme:
        a8 = np.where(a8 >= 0, 127, -127).astype(np.int8)
        qw = replace(qw, q=np.where(qw.q >= 0, numerics.qmax(bits), -numerics.qmax(bits))
                     .astype(np.int8), g=np.full_like(qw.g, numerics.GROUP_MAX))
    tile = layout.pack_weight_tile(qw, (keep, block))
    w_addr = A_ADDR + m * k + 3
    o_addr = w_addr + tile.size + 5
    sram = np.zeros(cfg.fpga.sram_bytes, np.uint8)
    sram[A_ADDR:A_ADDR + m * k] = layout.pack_a8_rows(a8)
    sram[S_ADDR:S_ADDR + 4 * m] = layout.pack_scale_codes(mant, exp)
    sram[w_addr:w_addr + tile.size] = tile
    fields = dict(m=m, n=n, k=k, a_addr=A_ADDR, s_addr=S_ADDR, w_addr=w_addr, o_addr=o_addr,
                  bits=bits, nm=nm, group_log2=group_log2)
    return fields, sram, numerics.linear(a8, mant, exp, qw.w_eff, qw.mult, qw.shift)


def run_gemms(cfg, cases, extra_words=()):
    """Run the GEMMs of `cases` back to back on the last case's SRAM image; return the
    simulator's result and the last case's output as fx."""
    words = [isa.encode("MXU.GEMM", **fields) for fields, _, _ in cases]
    words += list(extra_words) + [isa.encode("HALT")]
    fields, sram, want = cases[-1]
    m, n = want.shape
    budget = sum(timing.mxu_gemm_cycles(cfg.fpga, f) for f, _, _ in cases) + 10
    out = simulate_sram_top(mxu_top(cfg, words, sram=sram.tobytes()),
                            [(fields["o_addr"], 4 * m * n)], max_cycles=budget)
    return out, layout.unpack_fx_rows(np.frombuffer(out["data"][0], np.uint8), n)


GEMMS = {
    "dense int8, one group per row": dict(m=2, n=5, k=32, bits=8, nm=0, group_log2=0),
    "dense int4, groups of 8": dict(m=1, n=3, k=24, bits=4, nm=0, group_log2=3),
    "2:4 int4, groups of 2": dict(m=3, n=4, k=48, bits=4, nm=1, group_log2=1),
    "2:4 int8, a partial last step": dict(m=2, n=3, k=20, bits=8, nm=1, group_log2=2),
    "2:4 int8, one step per row": dict(m=4, n=2, k=16, bits=8, nm=1, group_log2=0),
}


@pytest.mark.sim
@pytest.mark.parametrize("name", GEMMS)
def test_mxu_gemm_matches_linear_bit_for_bit_in_the_cycles_timing_gives(name):
    fields, sram, want = case = gemm_case(SMALL, np.random.default_rng(2), **GEMMS[name])
    out, got = run_gemms(SMALL, [case])
    assert (out["halted"], out["error"]) == (1, 0)
    assert out["cycles"] == timing.mxu_gemm_cycles(SMALL.fpga, fields)
    np.testing.assert_array_equal(got, want)


@pytest.mark.sim
def test_mxu_gemm_of_a_larger_dense_preset_matches_linear_in_the_cycles_timing_gives():
    cfg = load_config("pim-gpt")
    fields, sram, want = case = gemm_case(cfg, np.random.default_rng(7), m=2, n=6, k=48,
                                          bits=8, nm=0, group_log2=4)
    out, got = run_gemms(cfg, [case])
    assert out["cycles"] == timing.mxu_gemm_cycles(cfg.fpga, fields)
    np.testing.assert_array_equal(got, want)


@pytest.mark.sim
def test_mxu_accumulators_wrap_on_overflow_like_numerics():
    # 127 * 1905 * 9000 > 2**31: the int32 sums wrap, and requant sees the wrapped value
    case = gemm_case(SMALL, np.random.default_rng(3), m=1, n=2, k=9000, bits=8, nm=0,
                     group_log2=0, extreme=True)
    out, got = run_gemms(SMALL, [case])
    assert out["cycles"] == timing.mxu_gemm_cycles(SMALL.fpga, case[0])
    np.testing.assert_array_equal(got, case[2])


@pytest.mark.sim
def test_back_to_back_gemms_and_ctrl_words_take_the_sum_of_their_cycles():
    rng = np.random.default_rng(4)
    first = gemm_case(SMALL, rng, m=1, n=3, k=16, bits=8, nm=1, group_log2=0)
    second = gemm_case(SMALL, rng, m=2, n=2, k=16, bits=4, nm=0, group_log2=0)
    shared = second[1].copy()
    tile_at = 0x4001
    fields = dict(first[0], w_addr=tile_at, o_addr=tile_at + 0x200)
    size = layout.weight_tile_bytes(3, 16, 8, SMALL.fpga.nm_patterns[1], 16)
    shared[tile_at:tile_at + size] = first[1][first[0]["w_addr"]:first[0]["w_addr"] + size]
    cases = [(fields, shared, None), (second[0], shared, second[2])]
    out, got = run_gemms(SMALL, cases, extra_words=[isa.encode("NOP")])
    expected = (timing.mxu_gemm_cycles(SMALL.fpga, fields)
                + timing.mxu_gemm_cycles(SMALL.fpga, second[0]) + timing.NOP_CYCLES)
    assert out["cycles"] == expected
    np.testing.assert_array_equal(got, second[2])


@pytest.mark.sim
def test_an_nm_index_beyond_the_config_stops_the_stream_with_error():
    fields = dict(GEMMS["dense int8, one group per row"], a_addr=0, s_addr=0, w_addr=0,
                  o_addr=0, nm=len(SMALL.fpga.nm_patterns))
    words = [isa.encode("MXU.GEMM", **fields), isa.encode("HALT")]
    out = simulate_sram_top(mxu_top(SMALL, words), max_cycles=20)
    assert (out["halted"], out["error"]) == (1, 1)


@pytest.mark.unit
def test_chain_shapes_the_rtl_cannot_build_are_rejected_with_the_reason():
    rejects(r"^chain_length 6 must be a power of two in \[2, 64\]; the RTL steps K by whole "
            r"chains$", lambda: DspChain(6))
    rejects(r"^chain_length 128 must be a power of two", lambda: DspChain(128))
    rejects(r"^N:M pattern 2:6 has m = 6, not a power of two",
            lambda: ChainArray(2, 8, [(1, 1), (2, 6)]))
    rejects(r"^N:M pattern 3:4 does not fit chain_length 8: a step must hold whole blocks",
            lambda: ChainArray(2, 8, [(1, 1), (3, 4)]))
    rejects(r"^dsp_chains must be a positive int, got 0$", lambda: ChainArray(0, 8, [(1, 1)]))


@pytest.mark.unit
def test_presets_beyond_simulation_sizes_are_rejected_with_a_smaller_preset_to_use():
    big = load_config("flightllm-u280").fpga
    rejects(r"^192 chains x 32 = 6144 DSPs exceeds the 1024 the RTL builds; use a smaller "
            r"preset such as trimem-small or pim-gpt$", lambda: MxuEngine(big))
    sram = replace(SMALL.fpga, sram_bytes=1 << 21)
    rejects(r"^sram_bytes = 2097152 exceeds the 1048576 bytes", lambda: MxuEngine(sram))
