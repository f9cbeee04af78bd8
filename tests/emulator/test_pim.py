"""The PIM engine: hand-derived DRAM command schedules, the closed form against the
command-level reference, blocked vs dual-row-buffer sharing, and bit-exact GEMV results.

Hand-derived schedules use `ONE_BANK` (one channel of one bank; 64 B rows of two 32 B bursts;
tRCD 4, tRP 4, tRAS 8, tCCD_L 2, tCCD_S 1, tRTP 2; 32 MAC lanes, so tMAC = 1 at 8 bits).
"""
import random

import numpy as np
import pytest

from trimem import dram, isa, layout, numerics
from trimem.config import load_config_dict
from trimem.dram import Cmd
from trimem.emulator.machine import EmulatorError, Machine
from trimem.emulator.pim import DramChannel

pytestmark = pytest.mark.unit


def config(name="pim-test", **pim):
    """trimem-small with `pim` overrides."""
    return load_config_dict({"inherits": "trimem-small", "name": name, "pim": pim})


def changed(cfg, **pim):
    """`cfg` with `pim` overrides."""
    d = cfg.to_dict()
    return load_config_dict({**d, "pim": {**d["pim"], **pim}})


ONE_BANK = config(channels=1, bank_groups=1, banks_per_group=1, row_bytes=64, burst_bytes=32,
                  mac_lanes=32, tRCD=4, tRP=4, tRAS=8, tCCD_L=2, tCCD_S=1, tRTP=2, tRRD_S=1,
                  tRRD_L=1, tFAW=4, tRFC=20, tREFI=100_000)


def gemv(**over):
    """PIM.GEMV fields: one vector of k = 32 at 8 bits on channel 0 (a 41-byte tile)."""
    f = dict(m=1, n=1, k=32, x_addr=0, s_addr=0x80, w_addr=0, o_addr=0, ch_mask=1, bits=8,
             nm=0, group_log2=0)
    return {**f, **over}


def both(pim, f, start=0):
    """(closed form, reference, reference channel) timings of one GEMV from `start`."""
    t = dram.Timing(pim, f["bits"])
    shape = dram.gemv_shape(pim, f, layout.DENSE)
    channel = DramChannel(pim)
    _, fast = dram.gemv_channel(t, dram.ChannelState(t), shape, start)
    return fast, channel.gemv(t, shape, start), channel


def cmds(channel, kind):
    return [cycle for cycle, cmd, _ in channel.log if cmd is kind]


# ---- hand-derived schedules ------------------------------------------------------------------

def test_row_hit_stream_issues_macs_tCCD_L_apart_behind_one_activate():
    fast, ref, channel = both(ONE_BANK.pim, gemv(m=3))
    # ACT 0; per vector MAC, MAC, RES 2 apart; PREA at RES + 1; quiet tRP later
    assert cmds(channel, Cmd.ACT) == [0]
    assert cmds(channel, Cmd.MAC) == [4, 6, 10, 12, 16, 18]
    assert cmds(channel, Cmd.RES) == [8, 14, 20]
    assert cmds(channel, Cmd.PREA) == [21]
    assert fast == ref
    assert ref.end == 25
    assert (ref.counts["row_hits"], ref.counts["row_misses"]) == (5, 1)


def test_row_miss_stream_pays_precharge_and_activate_per_burst():
    pim = changed(ONE_BANK, row_bytes=32, rows=128).pim
    fast, ref, channel = both(pim, gemv(m=2))
    # each 32 B row holds one burst: PREA waits for ACT + tRAS, ACT for PREA + tRP
    assert cmds(channel, Cmd.ACT) == [0, 12, 24, 36]
    assert cmds(channel, Cmd.MAC) == [4, 16, 28, 40]
    assert cmds(channel, Cmd.PREA) == [8, 20, 32, 44]
    assert cmds(channel, Cmd.RES) == [18, 42]
    assert fast == ref
    assert ref.end == 48
    assert (ref.counts["row_hits"], ref.counts["row_misses"]) == (0, 4)


@pytest.mark.parametrize("tFAW, acts", [(10, [0, 1, 2, 3, 10, 11, 12, 13]),
                                        (4, [0, 1, 2, 3, 4, 5, 6, 7])])
def test_tFAW_window_holds_the_fifth_activate(tFAW, acts):
    pim = config(bank_groups=2, banks_per_group=4, tRRD_S=1, tRRD_L=1, tFAW=tFAW, tREFI=10_000,
                 tRFC=20).pim
    fast, ref, channel = both(pim, gemv(n=8, k=16))
    assert cmds(channel, Cmd.ACT) == acts
    assert cmds(channel, Cmd.MAC)[0] == acts[-1] + pim.tRCD
    assert [bank for _, cmd, bank in channel.log if cmd is Cmd.ACT] == \
        [0, 4, 1, 5, 2, 6, 3, 7]
    assert fast == ref


def test_no_refresh_happens_before_tREFI():
    pim = changed(ONE_BANK, tREFI=100).pim
    fast, ref, channel = both(pim, gemv(m=16))
    # vector v: MACs at 4 + 6v and 6 + 6v, RES at 8 + 6v; the last RES is at 98 < 100
    assert cmds(channel, Cmd.REF) == []
    assert fast == ref
    assert (ref.end, ref.counts["refresh_stall"]) == (103, 0)


def test_refresh_due_at_tREFI_precharges_refreshes_and_stalls_the_stream():
    pim = changed(ONE_BANK, tREFI=100).pim
    fast, ref, channel = both(pim, gemv(m=18))
    # the MAC due at 100 yields: PREA 100, REF at PREA + tRP, ACT at REF + tRFC, MAC tRCD on
    assert cmds(channel, Cmd.PREA)[0] == 100
    assert cmds(channel, Cmd.REF) == [104]
    assert cmds(channel, Cmd.ACT) == [0, 124]
    assert cmds(channel, Cmd.MAC)[32] == 128
    assert fast == ref
    assert ref.counts["refresh_stall"] == 128 - 100
    assert ref.end == 115 + 28
    assert ref.counts["row_misses"] == 2


def test_refresh_due_between_instructions_delays_the_next_one():
    pim = changed(ONE_BANK, tREFI=100).pim
    t = dram.Timing(pim, 8)
    shape = dram.gemv_shape(pim, gemv(), layout.DENSE)
    channel, state = DramChannel(pim), dram.ChannelState(t)
    first = channel.gemv(t, shape, 0)
    state, fast_first = dram.gemv_channel(t, state, shape, 0)
    second = channel.gemv(t, shape, 110)
    state, fast_second = dram.gemv_channel(t, state, shape, 110)
    # the refresh due at 100 falls in the idle gap: REF at 100, next ACT at 100 + tRFC
    assert (first, second) == (fast_first, fast_second)
    assert cmds(channel, Cmd.REF) == [100]
    assert cmds(channel, Cmd.ACT) == [0, 120]
    assert second.counts["refresh_stall"] == 10


# ---- closed form == command-level model --------------------------------------------------------

def random_pim(rng):
    groups, per_group = rng.choice([1, 2, 4]), rng.choice([1, 2, 3])
    tRCD, tCCD_S, tRRD_S, tRFC = (rng.randint(1, 6), rng.randint(1, 3), rng.randint(1, 4),
                                  rng.randint(1, 40))
    burst = rng.choice([16, 32])
    return config(channels=1, bank_groups=groups, banks_per_group=per_group,
                  row_bytes=rng.choice([64, 128, 256]), burst_bytes=burst,
                  mac_lanes=rng.choice([lanes for lanes in (4, 8, 16) if lanes <= burst]),
                  tRCD=tRCD, tRP=rng.randint(1, 8), tRAS=tRCD + rng.randint(0, 8),
                  tCCD_S=tCCD_S, tCCD_L=tCCD_S + rng.randint(0, 3), tRRD_S=tRRD_S,
                  tRRD_L=tRRD_S + rng.randint(0, 3), tFAW=tRRD_S + rng.randint(0, 30),
                  tRTP=rng.randint(1, 6), tRFC=tRFC, tREFI=tRFC + rng.randint(1, 300)).pim


def test_closed_form_equals_the_command_level_model_cycle_for_cycle():
    rng = random.Random(2024)
    for _ in range(100):
        pim = random_pim(rng)
        banks = pim.banks_per_channel
        channel, state, start = DramChannel(pim), None, rng.randint(0, 50)
        timings = {bits: dram.Timing(pim, bits) for bits in (4, 8)}
        for _ in range(rng.randint(1, 4)):
            f = gemv(m=rng.randint(1, 6), n=rng.randint(banks, 3 * banks),
                     k=rng.choice([16, 32, 64, 128]), bits=rng.choice([4, 8]),
                     w_addr=pim.row_bytes * rng.randint(0, 3))
            t = timings[f["bits"]]
            shape = dram.gemv_shape(pim, f, layout.DENSE)
            state = state or dram.ChannelState(t)
            ref = channel.gemv(t, shape, start)
            state, fast = dram.gemv_channel(t, state, shape, start)
            assert fast == ref, (pim, f, start)
            start = ref.end + rng.choice([0, 1, 5, 100, 1000, 5000])


def test_closed_form_skips_repeats_yet_counts_every_command():
    pim = config(channels=1, tREFI=512, tRFC=16).pim
    f = gemv(m=40, n=2, k=256)
    fast, ref, channel = both(pim, f)
    assert fast == ref
    assert ref.counts["mac"] == 40 * dram.gemv_shape(pim, f, layout.DENSE).cols_per_vector
    assert ref.counts["ref"] == len(cmds(channel, Cmd.REF)) > 0


# ---- the engine ------------------------------------------------------------------------------

def place_gemv(m, f, rng, nm=layout.DENSE):
    """Random inputs in every selected channel's GBUF and weight tiles in the banks, as
    docs/contract.md maps them; return the expected fx outputs."""
    pim = m.config.pim
    n, k, rows = f["n"], f["k"], f["m"]
    w = rng.normal(size=(n, k))
    if nm != layout.DENSE:
        w *= numerics.nm_prune_mask(w, *nm)
    group = isa.group_size(f["group_log2"], k)
    qw = numerics.quantize_weight(w, f["bits"], group)
    channels = dram.mask_channels(pim, f["ch_mask"])
    units = len(channels) * pim.banks_per_channel
    gbuf, banks = m.memory("GBUF"), m.memory("PIMDRAM")
    a8, mant, exp = numerics.quantize_act(rng.integers(-1 << 16, 1 << 16, (rows, k)))
    for i, c in enumerate(channels):
        gbuf.write(c * pim.gbuf_bytes + f["x_addr"], layout.pack_a8_rows(a8))
        gbuf.write(c * pim.gbuf_bytes + f["s_addr"], layout.pack_scale_codes(mant, exp))
        for b in range(pim.banks_per_channel):
            u = i * pim.banks_per_channel + b
            part = numerics.QuantWeight(qw.q[u::units], qw.g[u::units], qw.mult[u::units],
                                        qw.shift[u::units], f["bits"], group)
            banks.write((c * pim.banks_per_channel + b) * pim.bank_bytes + f["w_addr"],
                        layout.pack_weight_tile(part, nm))
    return numerics.linear(a8, mant, exp, qw.w_eff, qw.mult, qw.shift)


def run(m, fields, others=None):
    """Run PIM.GEMVs with `fields` (and the `others` programs, engine -> words) on `m`."""
    words = [isa.encode("PIM.GEMV", **f) for f in fields] + [isa.encode("HALT")]
    m.run({isa.Engine.PIM: words, **(others or {})})
    return m


TWO_CHANNELS = config(channels=3, bank_groups=2, banks_per_group=2, gbuf_bytes=1024,
                      result_bytes=1024)


@pytest.mark.parametrize("bits, nm, group_log2", [(8, 0, 0), (4, 0, 4), (4, 1, 3), (8, 1, 5)])
def test_gemv_outputs_equal_numerics_linear_on_the_unpacked_weights(bits, nm, group_log2):
    m = Machine(TWO_CHANNELS)
    f = gemv(m=3, n=21, k=64, bits=bits, nm=nm, group_log2=group_log2, x_addr=0x40,
             s_addr=0x100, w_addr=2 * 256, o_addr=0x10, ch_mask=0b101)
    want = place_gemv(m, f, np.random.default_rng(bits + nm),
                      m.config.fpga.nm_patterns[nm])
    run(m, [f])
    got = layout.unpack_fx_rows(m.memory("PRES").read(0x10, 3 * 21 * 4), 21)
    np.testing.assert_array_equal(got, want)
    assert m.engine(isa.Engine.PIM).stats.macs == 3 * 21 * 64 * \
        m.config.fpga.nm_patterns[nm][0] // m.config.fpga.nm_patterns[nm][1]


def test_timing_only_and_command_level_runs_count_the_same_cycles():
    f = gemv(m=5, n=21, k=128, bits=4, ch_mask=0b011, s_addr=0x300)
    runs = []
    for timing_only, command_level in ((False, False), (True, False), (True, True)):
        m = Machine(TWO_CHANNELS, timing_only=timing_only)
        m.engine(isa.Engine.PIM).command_level = command_level
        if not timing_only:
            place_gemv(m, f, np.random.default_rng(0))
        run(m, [f, {**f, "o_addr": 0x200}])
        stats = m.engine(isa.Engine.PIM).stats
        runs.append((m.end_ps, dict(stats.counters), stats.energy_pj))
    assert runs[0] == runs[1] == runs[2]
    assert runs[0][1]["pim_mac"] > 0


def test_stats_count_commands_and_energy_per_channel():
    m = run(Machine(TWO_CHANNELS, timing_only=True), [gemv(n=16, ch_mask=0b011)])
    pim, stats = m.config.pim, m.engine(isa.Engine.PIM).stats
    counters = stats.counters
    # two channels of 4 banks: 2 outputs per bank, an 82-byte tile of three 32 B bursts
    assert (counters["pim_act"], counters["pim_mac"], counters["pim_res"]) == (8, 6, 4)
    assert (counters["pim_pre"], counters["pim_row_misses"], counters["pim_row_hits"]) == \
        (2, 2, 4)
    assert m.traffic["PIMDRAM"] == 6 * 4 * 32
    # energy: the ACTs, the useful MACs, and the results crossing each channel (4 B per bank)
    assert stats.energy_pj == pytest.approx(8 * pim.energy_pj_per_act + 16 * 32
                                            * pim.energy_pj_per_mac
                                            + 4 * 4 * 4 * pim.energy_pj_per_byte)


SHARED = load_config_dict({"inherits": "trimem-small", "name": "shared", "pim": {
    "channels": 2, "rows": 2048, "shared_with_hbm": True}})
"""PIM channels that are the FPGA's two HBM channels (2 banks x 2048 rows x 256 B = 1 MiB)."""
COPY = ("NOP\nDMA.COPY src_space=HBM src_addr=0x0 dst_space=SRAM dst_addr=0x0 nbytes=256\n"
        "HALT")
"""256 bytes of HBM channel 0, from cycle 1: 8 cycles of latency and 16 of stream."""


@pytest.mark.parametrize("dual", [False, True])
def test_blocked_gemv_holds_the_hbm_channel_and_dual_row_buffers_overlap_a_copy(dual):
    m = Machine(changed(SHARED, dual_row_buffer=dual), timing_only=True)
    run(m, [gemv(n=2)], {isa.Engine.DMA: isa.assemble(COPY, "DMA")})
    gemv_end = m.streams[isa.Engine.PIM].ends[0]
    copy_end = m.streams[isa.Engine.DMA].ends[1]
    assert copy_end == (gemv_end + 16 if not dual else 1 + 8 + 16)
    assert m.engine(isa.Engine.DMA).stats.stall_mem == (gemv_end - 9 if not dual else 0)


def test_blocked_gemv_waits_for_a_copy_already_on_its_channel():
    cfg = changed(SHARED, dual_row_buffer=False)
    alone = Machine(cfg, timing_only=True)
    run(alone, [gemv(n=2)])
    m = Machine(cfg, timing_only=True)
    copy = COPY.replace("NOP\n", "")
    run(m, [gemv(n=2)], {isa.Engine.DMA: isa.assemble(copy, "DMA")})
    pim = m.engine(isa.Engine.PIM)
    assert m.streams[isa.Engine.PIM].starts[0] == 0
    assert pim.stats.stall_mem == 8 + 16
    assert m.streams[isa.Engine.PIM].ends[0] == alone.streams[isa.Engine.PIM].ends[0] + 24


# ---- errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("over, message", [
    ({"w_addr": 100}, r"^PIM\[0\] `PIM\.GEMV .*`: w_addr 0x64 is not row-aligned"),
    ({"ch_mask": 0b1000}, r"^PIM\[0\] .*: ch_mask 0x8 selects channel\(s\) \[3\] but this PIM "
                          r"has channels 0\.\.2"),
    ({"n": 3, "ch_mask": 0b11}, r"^PIM\[0\] .*: n = 3 output channels leave banks idle"),
    ({"x_addr": 1000}, r"^PIM\[0\] .*: x_addr 0x3e8 \+ 32 bytes overruns the 1024-byte "
                       r"global buffer"),
    ({"w_addr": 63 * 256, "k": 512}, r"^PIM\[0\] .*: the weight tile of 1042 bytes at w_addr "
                                     r"0x3f00 overruns the 16384-byte bank"),
])
def test_bad_gemv_fields_are_rejected_with_the_fix(over, message):
    with pytest.raises(EmulatorError, match=message):
        run(Machine(TWO_CHANNELS, timing_only=True), [gemv(**{"n": 8, **over})])
