"""trimem.dram: the PIM constraint table as data, the GEMV bank mapping, and the flash closed
forms, each checked against a hand derivation or a brute-force count."""
import random
import re
from pathlib import Path

import numpy as np
import pytest

from trimem import dram, layout
from trimem.config import load_config_dict
from trimem.dram import Cmd, Scope

pytestmark = pytest.mark.unit


def pim(**over):
    return load_config_dict({"inherits": "trimem-small", "name": "t", "pim": over}).pim


def csd(**over):
    return load_config_dict({"inherits": "trimem-small", "name": "t", "csd": over}).csd


# ---- the table -----------------------------------------------------------------------------

def test_every_row_names_a_pim_config_field_or_a_derived_parameter():
    names = {row.param for row in dram.TABLE}
    assert names <= dram.PIM_FIELDS | set(dram.DERIVED)
    assert {"tRCD", "tRP", "tRAS", "tRTP", "tRRD_S", "tRRD_L", "tFAW", "tCCD_S", "tCCD_L",
            "tRFC"} <= names


def test_unknown_parameter_name_is_rejected_with_its_name():
    with pytest.raises(ValueError, match=r"^timing row .* names parameter 'tRCDX', which is "
                                         r"neither a pim config field nor one of \['tMAC'\]"):
        dram.build_table([(Cmd.ACT, Cmd.MAC, Scope.BANK, "tRCDX")])


def test_a_window_on_anything_but_activates_is_rejected():
    with pytest.raises(ValueError, match=r"^timing row .* has a window over MAC -> MAC in "
                                         r"scope 'channel'; windows are supported on ACT -> "
                                         r"ACT over the channel only"):
        dram.build_table([(Cmd.MAC, Cmd.MAC, Scope.CHANNEL, "tCCD_S", 4)])


def test_a_row_that_is_not_commands_and_a_scope_is_a_type_error():
    with pytest.raises(TypeError, match=r"^timing row \('ACT', .*\) must be \(Cmd, Cmd, Scope"):
        dram.build_table([("ACT", Cmd.MAC, Scope.BANK, "tRCD")])


@pytest.mark.parametrize("bits, lanes, cycles", [(8, 32, 1), (4, 32, 2), (8, 8, 4), (4, 8, 8)])
def test_tMAC_is_the_lane_cycles_of_one_burst(bits, lanes, cycles):
    assert dram.Timing(pim(burst_bytes=32, mac_lanes=lanes), bits).values["tMAC"] == cycles


def test_act_order_alternates_bank_groups():
    assert dram.act_order(pim(bank_groups=2, banks_per_group=3)) == (0, 3, 1, 4, 2, 5)
    assert dram.act_order(pim(bank_groups=1, banks_per_group=3)) == (0, 1, 2)


def test_clean_activate_follows_tRRD_and_the_four_activate_window():
    t = dram.Timing(pim(bank_groups=2, banks_per_group=4, tRRD_S=2, tRRD_L=5, tFAW=12), 8)
    # groups alternate: tRRD_S apart, tRRD_L within a group (0 -> 2: 4 < 5, so 5), and the
    # fifth ACT waits for the first + tFAW
    assert t.offsets == (0, 2, 5, 7, 12, 14, 17, 19)


def test_column_runs_are_spaced_by_the_widest_rule():
    t = dram.Timing(pim(tCCD_S=1, tCCD_L=3, burst_bytes=32, mac_lanes=8), 4)
    assert (t.step[Cmd.MAC], t.step[Cmd.RES]) == (8, 3)


# ---- the GEMV mapping ------------------------------------------------------------------------

def gemv(**over):
    return {**dict(m=2, n=5, k=64, bits=4, group_log2=4, ch_mask=1, w_addr=0), **over}


def test_gemv_shape_maps_the_largest_tile_to_rows_and_bursts():
    p = pim(row_bytes=64, burst_bytes=16)
    shape = dram.gemv_shape(p, gemv(w_addr=128), layout.DENSE)
    # 2 banks: ceil(5 / 2) = 3 rows of 64 int4 (96 B), 4 group bytes each, 8 B requant each
    assert (shape.units, shape.local_rows) == (2, 3)
    assert shape.tile_bytes == 3 * 32 + 3 * 4 + 3 * 8 == 132
    assert (shape.first_row, shape.rows, shape.row_cols, shape.last_cols) == (2, 3, 4, 1)
    assert list(shape.row_bursts()) == [(2, 4), (3, 4), (4, 1)]
    assert shape.macs == 2 * 5 * 64
    requests = list(dram.gemv_requests(shape))
    assert len(requests) == 2 * (9 + 3)
    assert requests[:12] == [(Cmd.MAC, 2)] * 4 + [(Cmd.MAC, 3)] * 4 + [(Cmd.MAC, 4)] + \
        [(Cmd.RES, None)] * 3


def test_sparse_tiles_count_only_kept_macs():
    shape = dram.gemv_shape(pim(), gemv(n=4), (2, 4))
    assert shape.macs == 2 * 4 * 32


@pytest.mark.parametrize("over, message", [
    ({"w_addr": 8}, r"^w_addr 0x8 is not row-aligned; PIM tiles start on a row boundary"),
    ({"w_addr": 63 * 256, "k": 1024}, r"^the weight tile of \d+ bytes at w_addr 0x3f00 "
                                      r"overruns the 16384-byte bank"),
    ({"ch_mask": 0b10}, r"^ch_mask 0x2 selects channel\(s\) \[1\] but this PIM has channels "
                        r"0\.\.0; clear those bits$"),
    ({"n": 1}, r"^n = 1 output channels leave banks idle: ch_mask 0x1 selects 2 banks"),
])
def test_bad_gemv_mappings_are_rejected_with_the_fix(over, message):
    with pytest.raises(ValueError, match=message):
        dram.gemv_shape(pim(), gemv(**over), layout.DENSE)


def test_quiet_cycle_is_the_latest_constraint_to_expire():
    t = dram.Timing(pim(tRP=4, tRFC=16), 8)
    last = [dram.NEVER] * len(Cmd)
    last[Cmd.PREA], last[Cmd.REF] = 10, 3
    assert dram.quiet_cycle(t, last, (), 10) == 3 + 16
    last[Cmd.REF] = dram.NEVER
    assert dram.quiet_cycle(t, last, (), 10) == 10 + 4


# ---- flash -------------------------------------------------------------------------------------

def test_flash_pages_stripe_over_channels_then_dies_then_planes():
    drive = csd(channels=2, dies=3, planes=2)
    assert [dram.flash_location(drive, p) for p in (0, 1, 2, 5, 6, 13)] == \
        [(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 2, 0), (0, 0, 1), (1, 0, 0)]


def test_range_counts_equal_a_page_by_page_count():
    rng = random.Random(5)
    drive = csd(channels=3, dies=2, planes=2)
    for _ in range(20):
        starts = [rng.randint(0, 200) for _ in range(4)]
        counts = [rng.randint(0, 50) for _ in range(4)]
        want = np.zeros((3, 2), np.int64)
        for s, n in zip(starts, counts):
            for p in range(s, s + n):
                channel, die, _ = dram.flash_location(drive, p)
                want[channel, die] += 1
        np.testing.assert_array_equal(dram.flash_range_counts(drive, starts, counts), want)
        pages = [p for s, n in zip(starts, counts) for p in range(s, s + n)]
        np.testing.assert_array_equal(dram.flash_page_counts(drive, pages), want)


def test_flash_latencies_are_whole_cycles_of_the_drive_clock():
    ft = dram.FlashTiming(csd(clock_mhz=100.0, tR_us=1.0, tPROG_us=4.0, channel_mbps=100.0,
                              page_bytes=512))
    assert (ft.read, ft.program, ft.transfer) == (100, 400, 512)


def test_page_reads_are_bus_bound_or_die_bound():
    ft = dram.FlashTiming(csd(tR_us=1.0, tPROG_us=40.0, channel_mbps=100.0, planes=2))
    per_die = np.array([[4, 0], [1, 1], [0, 0]])
    # channel 0: one die, 2 reads of 2 planes; the bus moves 4 pages: 100 + 4 x 512
    # channel 1: 100 + 2 x 512; channel 2 reads nothing
    np.testing.assert_array_equal(ft.read_cycles(per_die), [2148, 1124, 0])
    # programs: 4 x 512 + 4000 vs 512 + 2 x 4000 -> the die bounds channel 0
    np.testing.assert_array_equal(ft.program_cycles(per_die), [8512, 5024, 0])


def test_pages_are_programmed_when_their_last_slot_is_written():
    assert [dram.flash_pages(ctx, 10, 25) for ctx in (0, 9, 10, 24, 25)] == [0, 0, 1, 2, 3]
    np.testing.assert_array_equal(dram.page_fills(np.array([8, 9, 19, 23, 24]), 10, 25),
                                  [False, True, True, False, True])


def test_the_constraint_table_in_docs_timing_matches_the_code():
    text = (Path(__file__).parents[2] / "docs" / "timing.md").read_text()
    section = text.split("\n## PIM\n")[1].split("\n## CSD\n")[0]
    rows = re.findall(r"^\| (\w+) \| (\w+) \| (\w+) \| (\w+)(?: \(window (\d+)\))? \|$",
                      section, re.M)
    assert rows[1:] == [(r.prev.name, r.next.name, r.scope.value, r.param,
                         str(r.window) if r.window > 1 else "") for r in dram.TABLE]
