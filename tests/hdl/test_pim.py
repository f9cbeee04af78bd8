"""PIM banks, channel controller and top in Amaranth's simulator, against trimem's models.

Timing is compared command for command with the command-level reference
`trimem.emulator.pim.DramChannel`; results bit for bit with `trimem.numerics.linear`.
"""
import dataclasses

import numpy as np
import pytest
from amaranth.back import verilog
from amaranth.hdl import Elaboratable, Fragment, Module, Signal
from amaranth.lib import wiring
from amaranth.sim import Simulator

from trimem import dram, isa, layout, numerics
from trimem.config import load_config
from trimem.dram import Cmd
from trimem.emulator.pim import DramChannel
from trimem.hdl.pim import BankTimer, PimChannel, requant
from trimem.hdl.pim_top import PimTop
from trimem.hdl.system import ByteRam
from tests.hdl.rejects import rejects

pytestmark = pytest.mark.sim

SMALL = load_config("trimem-small").pim
GROUPED = dataclasses.replace(SMALL, channels=2, bank_groups=2, banks_per_group=2, rows=16)
"""Two channels of two bank groups of two banks: exercises tRRD_S/L, tFAW and ch_mask."""


# ---- stimulus ---------------------------------------------------------------------------------

def gemv_case(pim, *, n, k, bits, group_log2, m, ch_mask=1, w_addr=0, seed=0):
    """(bank images per channel, GBUF bytes, instruction fields, expected [m, n] fx)."""
    rng = np.random.default_rng(seed)
    group = isa.group_size(group_log2, k)
    qw = numerics.quantize_weight(rng.normal(size=(n, k)), bits, group)
    chans = [c for c in range(pim.channels) if ch_mask >> c & 1]
    units = len(chans) * pim.banks_per_channel
    images = [[[] for _ in range(pim.banks_per_channel)] for _ in range(pim.channels)]
    for u in range(units):
        rows = np.arange(u, n, units)
        tile = numerics.QuantWeight(qw.q[rows], qw.g[rows], qw.mult[rows], qw.shift[rows],
                                    bits, group)
        blob = layout.pack_weight_tile(tile, layout.DENSE)
        bank = np.zeros(pim.bank_bytes, np.uint8)
        bank[w_addr:w_addr + blob.size] = blob
        c, b = chans[u // pim.banks_per_channel], u % pim.banks_per_channel
        images[c][b] = [int.from_bytes(bank[i:i + pim.burst_bytes].tobytes(), "little")
                        for i in range(0, pim.bank_bytes, pim.burst_bytes)]
    a8, mant, exp = numerics.quantize_act(numerics.to_fx(rng.normal(size=(m, k))))
    gbuf = np.zeros(pim.gbuf_bytes, np.uint8)
    gbuf[:m * k] = layout.pack_a8_rows(a8)
    gbuf[m * k:m * k + 4 * m] = layout.pack_scale_codes(mant, exp)
    fields = dict(m=m, n=n, k=k, x_addr=0, s_addr=m * k, w_addr=w_addr, o_addr=0,
                  ch_mask=ch_mask, bits=bits, nm=0, group_log2=group_log2)
    expect = numerics.linear(a8, mant, exp, qw.w_eff, qw.mult, qw.shift)
    return images, gbuf.tobytes(), fields, expect



def word(fields, name="PIM.GEMV"):
    return int.from_bytes(isa.encode(name, **fields), "little")


class ChannelBench(Elaboratable):
    """One PimChannel with its global buffer and a result buffer."""

    def __init__(self, pim, images, gbuf):
        self.pim = pim
        self.channel = PimChannel(pim, init=images[0])
        self.gbuf = ByteRam(pim.gbuf_bytes, reads=(pim.mac_lanes, 4), init=gbuf)
        self.pres = ByteRam(pim.result_total_bytes, reads=(4,),
                            writes=(pim.banks_per_channel * 4,))

    def elaborate(self, platform):
        m = Module()
        m.submodules.channel, m.submodules.gbuf, m.submodules.pres = \
            self.channel, self.gbuf, self.pres
        wiring.connect(m, self.channel.gbuf, self.gbuf.read0)
        wiring.connect(m, self.channel.scale, self.gbuf.read1)
        wiring.connect(m, self.channel.o_result, self.pres.write0)
        return m


async def read_words(ctx, port, count):
    out = []
    for i in range(count):
        ctx.set(port.addr, 4 * i)
        await ctx.tick()
        out.append(ctx.get(port.data))
    return np.array(out, np.uint32).view(np.int32)


def run_channel(pim, case, start):
    """Issue the case's PIM.GEMV to a lone channel at cycle `start`; return (command log as
    (cycle, Cmd, bank), take cycle, end cycle, results)."""
    images, gbuf, fields, expect = case
    bench = ChannelBench(pim, images, gbuf)
    ch = bench.channel
    got = {"log": []}
    value = word(fields) & ((1 << len(ch.i_instr.payload.as_value())) - 1)

    async def testbench(ctx):
        cycle, taken = 0, None
        while True:
            if cycle == start:
                ctx.set(ch.i_instr.payload.as_value(), value)
                ctx.set(ch.i_instr.valid, 1)
            if ctx.get(ch.o_command.valid):
                kind = Cmd(ctx.get(ch.o_command.payload.kind))
                got["log"].append((cycle, kind, ctx.get(ch.o_command.payload.bank)
                                   if kind is Cmd.ACT else None))
            ready = ctx.get(ch.i_instr.ready)
            if taken is not None and ready:
                break
            if taken is None and ready and ctx.get(ch.i_instr.valid):
                taken = cycle
                await ctx.tick()
                ctx.set(ch.i_instr.valid, 0)
            else:
                await ctx.tick()
            cycle += 1
            assert cycle < 5000, "the GEMV never ended"
        got["taken"], got["end"] = taken, cycle
        got["out"] = await read_words(ctx, bench.pres.read0, expect.size)
        got["error"] = ctx.get(ch.error)

    sim = Simulator(bench)
    sim.add_clock(1e-8)
    sim.add_testbench(testbench)
    sim.run()
    return got


def reference(pim, fields, start):
    """The command-level model's log and end cycle of one GEMV on a fresh channel."""
    ref = DramChannel(pim)
    shape = dram.gemv_shape(pim, fields, layout.DENSE)
    timing = ref.gemv(dram.Timing(pim, fields["bits"]), shape, start)
    return [(c, cmd, b) for c, cmd, b in ref.log], timing.end


# ---- bank timing --------------------------------------------------------------------------

async def _step_timer(ctx, timer, kind, row=0):
    ctx.set(timer.cmd.kind, kind)
    ctx.set(timer.cmd.row, row)
    ctx.set(timer.issue, 1)
    await ctx.tick()
    ctx.set(timer.issue, 0)


def _timer_trace(script, cycles):
    """Allowed bits of a BankTimer for `cycles` cycles, issuing script[cycle] = Cmd."""
    timer = BankTimer(SMALL)
    trace = []

    async def testbench(ctx):
        ctx.set(timer.bits, 8)
        for cycle in range(cycles):
            trace.append(ctx.get(timer.allowed))
            if cycle in script:
                await _step_timer(ctx, timer, script[cycle])
            else:
                await ctx.tick()

    sim = Simulator(timer)
    sim.add_clock(1e-8)
    sim.add_testbench(testbench)
    sim.run()
    return [{cmd: bool(bits >> int(cmd) & 1) for cmd in Cmd} for bits in trace]


def test_bank_timer_blocks_mac_until_trcd_after_activate():
    trace = _timer_trace({2: Cmd.ACT}, 2 + SMALL.tRCD + 2)
    assert not trace[2 + SMALL.tRCD - 1][Cmd.MAC]
    assert trace[2 + SMALL.tRCD][Cmd.MAC]


def test_bank_timer_blocks_precharge_until_tras_after_activate():
    trace = _timer_trace({1: Cmd.ACT}, 1 + SMALL.tRAS + 2)
    assert not trace[1 + SMALL.tRAS - 1][Cmd.PREA]
    assert trace[1 + SMALL.tRAS][Cmd.PREA]


def test_bank_timer_blocks_activate_until_trp_after_precharge():
    pre = 1 + SMALL.tRAS
    trace = _timer_trace({1: Cmd.ACT, pre: Cmd.PREA}, pre + SMALL.tRP + 2)
    assert not trace[pre + SMALL.tRP - 1][Cmd.ACT]
    assert trace[pre + SMALL.tRP][Cmd.ACT]


def test_bank_timer_spaces_macs_by_tmac_and_holds_precharge_for_trtp():
    t_mac = dram.DERIVED["tMAC"](SMALL, 8)
    mac = 1 + SMALL.tRAS
    trace = _timer_trace({0: Cmd.ACT, mac: Cmd.MAC}, mac + max(t_mac, SMALL.tRTP) + 2)
    assert not trace[mac + t_mac - 1][Cmd.MAC] and trace[mac + t_mac][Cmd.MAC]
    assert not trace[mac + SMALL.tRTP - 1][Cmd.PREA] and trace[mac + SMALL.tRTP][Cmd.PREA]


def test_bank_timer_refuses_mac_with_the_row_buffer_closed():
    assert not any(bits[Cmd.MAC] for bits in _timer_trace({}, 4))


# ---- requantization -----------------------------------------------------------------------

def test_requant_expression_equals_numerics_linear_output_stage():
    rng = np.random.default_rng(3)
    acc = rng.integers(-2**31, 2**31, 24, dtype=np.int64)
    mult = rng.integers(0, 2**15, 24)
    shift = rng.integers(numerics.REQUANT_SHIFT_MIN, numerics.REQUANT_SHIFT_MAX + 1, 24)
    mant = rng.integers(1, 2**15, 24)
    exp = rng.integers(0, numerics.ACT_EXP_MAX + 1, 24)
    acc[:3] = [numerics.INT32_MAX, numerics.INT32_MIN, 0]
    ins = [Signal(32, name=n) for n in ("acc", "mult", "mant")] + \
        [Signal(8, name=n) for n in ("shift", "exp")]
    out = Signal(32)
    m = Module()
    m.d.comb += out.eq(requant(ins[0], ins[1], ins[3], ins[2], ins[4]))
    got = []

    async def testbench(ctx):
        for values in zip(acc, mult, mant, shift, exp):
            for sig, v in zip(ins, values):
                ctx.set(sig, int(v) & ((1 << len(sig)) - 1))
            got.append(ctx.get(out))

    sim = Simulator(m)
    sim.add_testbench(testbench)
    sim.run()
    scale = mult * mant
    want = numerics.sat(numerics.rshift_round(acc * scale, shift - exp), 32)
    assert np.array_equal(np.array(got, np.uint32).view(np.int32), want.astype(np.int32))


# ---- channel: timing and numerics against the models ---------------------------------------

@pytest.mark.parametrize("shape", [
    dict(n=4, k=64, bits=8, group_log2=5, m=1),
    dict(n=5, k=128, bits=4, group_log2=0, m=1),
    dict(n=5, k=64, bits=8, group_log2=4, m=3),
], ids=["int8", "int4-one-group", "three-vectors-uneven-banks"])
def test_gemv_issues_the_reference_commands_and_computes_linear(shape):
    case = gemv_case(SMALL, **shape)
    got = run_channel(SMALL, case, start=3)
    log, end = reference(SMALL, case[2], got["taken"])
    assert got["log"] == log
    assert got["end"] == end
    assert np.array_equal(got["out"].reshape(case[3].shape), case[3])
    assert not got["error"]


@pytest.mark.parametrize("start", [505, pytest.param(512, marks=pytest.mark.slow)],
                         ids=["mid-activate", "at-due"])
def test_refresh_is_inserted_where_the_reference_puts_it(start):
    case = gemv_case(SMALL, n=4, k=192, bits=8, group_log2=3, m=1)
    got = run_channel(SMALL, case, start=start)
    log, end = reference(SMALL, case[2], got["taken"])
    assert any(cmd is Cmd.REF for _, cmd, _ in got["log"])
    assert got["log"] == log and got["end"] == end
    assert np.array_equal(got["out"].reshape(case[3].shape), case[3])


def test_bank_groups_respect_trrd_and_tfaw_like_the_reference():
    case = gemv_case(GROUPED, n=8, k=64, bits=8, group_log2=4, m=1)
    got = run_channel(GROUPED, case, start=2)
    log, end = reference(GROUPED, case[2], got["taken"])
    acts = [c for c, cmd, _ in got["log"] if cmd is Cmd.ACT]
    assert len(acts) == GROUPED.banks_per_channel
    assert got["log"] == log and got["end"] == end
    assert np.array_equal(got["out"].reshape(case[3].shape), case[3])


def test_sparse_gemv_sets_error_and_keeps_the_reference_timing():
    images, gbuf, fields, expect = gemv_case(SMALL, n=2, k=32, bits=8, group_log2=3, m=1)
    fields = dict(fields, nm=1)
    got = run_channel(SMALL, (images, gbuf, fields, expect), start=2)
    log, end = reference(SMALL, dict(fields, nm=0), got["taken"])
    assert got["error"] == 1
    assert got["end"] == end


# ---- top: a program of two GEMVs ---------------------------------------------------------

class TopBench(Elaboratable):
    def __init__(self, pim, program, image, gbufs):
        self.top = PimTop(pim, program=program, image=image)
        self.gbufs = [ByteRam(pim.gbuf_bytes, reads=(pim.mac_lanes, 4), init=g) for g in gbufs]
        self.pres = ByteRam(pim.result_total_bytes, reads=(4,),
                            writes=(pim.banks_per_channel * 4,) * pim.channels)

    def elaborate(self, platform):
        m = Module()
        m.submodules.top, m.submodules.pres = self.top, self.pres
        for c, g in enumerate(self.gbufs):
            m.submodules[f"gbuf{c}"] = g
            wiring.connect(m, getattr(self.top, f"gbuf{c}"), g.read0)
            wiring.connect(m, getattr(self.top, f"scale{c}"), g.read1)
            wiring.connect(m, getattr(self.top, f"pres{c}"), getattr(self.pres, f"write{c}"))
        return m


def _image(pim, images):
    out = bytearray()
    for chan in images:
        for bank in chan:
            data = b"".join(w.to_bytes(pim.burst_bytes, "little") for w in bank)
            out += data + bytes(pim.bank_bytes - len(data))
    return bytes(out)


@pytest.mark.parametrize("pim, mask", [(SMALL, 1), pytest.param(GROUPED, 3,
                                                                  marks=pytest.mark.slow)],
                         ids=["one-channel", "two-channels"])
def test_top_runs_a_program_of_two_gemvs_in_the_reference_cycle_count(pim, mask):
    n = 2 * pim.banks_per_channel * bin(mask).count("1")
    case = gemv_case(pim, n=n, k=32, bits=8, group_log2=3, m=1, ch_mask=mask)
    second = dict(case[2], o_addr=4 * n)
    program = [isa.encode("PIM.GEMV", **case[2]), isa.encode("PIM.GEMV", **second),
               isa.encode("HALT")]
    bench = TopBench(pim, program, _image(pim, case[0]), [case[1]] * pim.channels)
    got = {}

    async def testbench(ctx):
        ctx.set(bench.top.run, 1)
        while not ctx.get(bench.top.halted):
            await ctx.tick()
        got["cycles"], got["error"] = ctx.get(bench.top.cycles), ctx.get(bench.top.error)
        got["out"] = await read_words(ctx, bench.pres.read0, 2 * n)

    sim = Simulator(bench)
    sim.add_clock(1e-8)
    sim.add_testbench(testbench)
    sim.run()
    channels = [DramChannel(pim) for _ in range(pim.channels)]
    t = dram.Timing(pim, case[2]["bits"])
    start = 2
    for fields in (case[2], second):
        shape = dram.gemv_shape(pim, fields, layout.DENSE)
        start = max(ch.gemv(t, shape, start).end for ch in channels)
    assert got["cycles"] == start - 2
    assert not got["error"]
    assert np.array_equal(got["out"][:n], case[3][0])
    assert np.array_equal(got["out"][n:], case[3][0])


# ---- building ----------------------------------------------------------------------------

@pytest.mark.parametrize("pim", [SMALL, GROUPED, dataclasses.replace(SMALL, mac_lanes=16,
                                                                       dual_row_buffer=True)],
                         ids=["trimem-small", "two-groups", "wide-lanes"])
def test_pim_top_elaborates(pim):
    top = PimTop(pim, program=[isa.encode("HALT")])
    Fragment.get(top, None).prepare()
    assert len(top.channels) == pim.channels


@pytest.mark.slow
def test_pim_top_emits_verilog():
    text = verilog.convert(PimTop(SMALL, program=[isa.encode("HALT")]), name="pim_top",
                           emit_src=False)
    assert "module pim_top" in text and "bank1" in text


@pytest.mark.unit
def test_a_pim_too_big_to_build_is_rejected_with_the_fix():
    rejects(r"^this PIM needs \d+ bits .* build a small preset",
            lambda: PimTop(load_config("neupims").pim))


@pytest.mark.unit
def test_rows_that_are_not_a_power_of_two_are_rejected():
    pim = dataclasses.replace(SMALL, row_bytes=96, burst_bytes=32)
    rejects(r"^pim\.row_bytes = 96 is not a power of two", lambda: PimChannel(pim))


@pytest.mark.unit
def test_a_channel_index_outside_the_pim_is_rejected():
    rejects(r"^channel must be an int in \[0, 1\), got 1$", lambda: PimChannel(SMALL, channel=1))
