"""RTL-vs-emulator diffing: first differing element, instruction and stream length."""
import re

import numpy as np
import pytest

from trimem import isa
from trimem.sims import diff

pytestmark = pytest.mark.unit

PROGRAMS = {"MXU": isa.assemble("NOP\nNOP\nHALT", "MXU")}


def test_equal_tensors_have_no_divergence():
    a = np.arange(12, dtype=np.int32).reshape(3, 4)
    assert diff.diff_tensors({"o": a.copy()}, {"o": a}) is None


def test_first_differing_element_is_named_with_both_values_and_its_neighbours():
    want = np.arange(12, dtype=np.int32).reshape(3, 4)
    got = want.copy()
    got[1, 2] = 99
    got[2, 3] = -1
    found = diff.diff_tensors({"o": got}, {"o": want}, writers={"o": ("MXU", 1)},
                              programs=PROGRAMS)
    assert found.kind == "tensor"
    assert found.where == "o[1, 2]"
    assert found.detail == "rtl 99 != emulator 6"
    assert found.instruction == "MXU[1] `NOP`"
    text = found.text()
    assert re.search(r"^  rtl      \[3:10\] = \[3, 4, 5, 99, 7, 8, 9\]$", text, re.M)
    assert re.search(r"^  2 of 12 elements differ$", text, re.M)


def test_a_missing_or_misshapen_tensor_is_a_divergence():
    want = np.zeros((2, 2), np.int32)
    found = diff.diff_tensors({"o": np.zeros(3, np.int32)}, {"o": want})
    assert re.match(r"^shape \(3,\) != expected \(2, 2\)$", found.detail)
    assert diff.diff_tensors({}, {"o": want}).where == "o"


def test_the_earliest_late_instruction_over_all_streams_is_reported():
    programs = {"MXU": PROGRAMS["MXU"], "VPU": isa.assemble("NOP\nNOP\nHALT", "VPU")}
    rtl = {"MXU": [0, 1, 9], "VPU": [0, 5, 6]}
    emulator = {"MXU": [0, 1, 2], "VPU": [0, 1, 2]}
    found = diff.diff_issues(rtl, emulator, programs)
    assert found.where == "VPU[1]"
    assert found.detail == "issues at cycle 5 in the RTL, 1 in the emulator"
    assert found.instruction == "VPU[1] `NOP`"
    assert found.context == ["VPU[0] issued at 0 in both"]


def test_an_instruction_the_rtl_never_issues_is_reported():
    found = diff.diff_issues({"MXU": [0]}, {"MXU": [0, 1, 2]}, PROGRAMS)
    assert found.where == "MXU[1]"
    assert re.match(r"^never issues in the RTL \(the emulator issues it at cycle 1\)$",
                    found.detail)


def test_equal_schedules_and_lengths_have_no_divergence():
    assert diff.diff_issues({"MXU": [0, 1, 2]}, {"MXU": [0, 1, 2]}, PROGRAMS) is None
    assert diff.diff_totals({"MXU": 7}, {"MXU": 7}) is None


def test_a_stream_of_another_length_is_reported_in_cycles():
    found = diff.diff_totals({"MXU": 48}, {"MXU": 47})
    assert found.text() == ("first difference (cycles) at MXU: the stream takes 48 cycles in "
                            "the RTL, 47 in the emulator")


def test_regions_round_trip_through_plain_data_and_view_their_bytes():
    region = diff.Region("o", "SRAM", 0x40, "<i4", (2, 3), ("MXU", 0))
    assert diff.Region.from_dict(region.to_dict()) == region
    assert region.nbytes == 24
    values = np.arange(6, dtype="<i4")
    assert region.view(values.tobytes()).tolist() == [[0, 1, 2], [3, 4, 5]]
