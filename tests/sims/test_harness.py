"""The batched harness: generated port bindings, stimulus tables, and issue cycles."""
import numpy as np
import pytest

from trimem.sims import harness, tops

pytestmark = pytest.mark.unit

VTOP = """
    VL_IN8(&clk,0,0);
    VL_IN8(&host_wr___05Fen,0,0);
    VL_INW(&i_load___05Fpayload,265,0,9);
    VL_OUT64(&cycles,47,0);
"""
ROOT = """
        SData/*8:0*/ mxu__DOT__frontend__DOT__pc;
        CData/*0:0*/ mxu__DOT__frontend__DOT__halted;
        CData/*0:0*/ mxu__DOT__halted;
        IData/*31:0*/ mxu__DOT__engine__DOT__pcin;
        VlUnpacked<VlWide<8>/*255:0*/, 64> mxu__DOT__frontend__DOT__imem;
"""


def test_glue_binds_every_port_by_its_verilog_name_and_the_program_counters(tmp_path):
    (tmp_path / "Vtop.h").write_text(VTOP)
    (tmp_path / "Vtop___024root.h").write_text(ROOT)
    harness.glue(tmp_path)
    text = (tmp_path / "ports.h").read_text()
    assert text.startswith("// AUTO-GENERATED — DO NOT EDIT.")
    assert "#define TM_PORT_COUNT 6" in text and "#define TM_MEM_COUNT 1" in text
    assert '"host_wr__en",' in text and '"frontend.pc",' in text
    assert "p[2] = port(&top->i_load___05Fpayload, 266, true);" in text
    assert "p[3] = port(&top->cycles, 48, false);" in text
    assert "p[4] = port(&top->rootp->mxu__DOT__frontend__DOT__pc, 9, false);" in text
    assert "p[5] = port(&top->rootp->mxu__DOT__frontend__DOT__halted, 1, false);" in text
    assert "m[0] = mem(&top->rootp->mxu__DOT__frontend__DOT__imem, 256);" in text
    assert "pcin" not in text and "mxu__DOT__halted" not in text


def test_control_makes_probes_readable_and_every_memory_writable():
    verilog = ("module \\top.fe (clk);\n  reg [255:0] imem [63:0];\nendmodule\n"
               "module top (clk);\n  reg [7:0] lane0 [511:0];\nendmodule\n")
    text = harness.control(verilog)
    assert text.startswith("`verilator_config\n")
    assert 'public_flat_rd -module "*" -var "pc"' in text
    assert 'public_flat_rw -module "top.fe" -var "imem"' in text
    assert 'public_flat_rw -module "top" -var "lane0"' in text


def test_verilated_names_demangle_to_verilog_ones():
    assert harness.demangle("i_load___05Fpayload") == "i_load__payload"
    assert harness.demangle("plain") == "plain"


def test_wide_values_split_into_little_endian_words_and_back():
    value = (0xDEAD << 200) | 0x1234_5678_9ABC
    words = harness.to_words([value, 1], 266)
    assert words.shape == (2, 9) and words.dtype == np.uint32
    assert harness.from_words(words) == [value, 1]
    narrow = harness.to_words(np.array([0x1_0000_0002], np.uint64), 48)
    assert narrow.tolist() == [[2, 1]]
    assert harness.from_words(narrow).tolist() == [0x1_0000_0002]


def test_split_words_of_the_wrong_width_are_rejected():
    with pytest.raises(ValueError, match=r"^a 266-bit port takes 9 words per cycle, got 2$"):
        harness.to_words(np.zeros((3, 2), np.uint32), 266)


def test_issue_cycles_count_from_the_streams_cycle_0_and_end_at_halt(small):
    top = tops.SystemTop(small)
    events = [(2, "fe_mxu.pc", 1), (6, "fe_mxu.pc", 2), (4, "pim.frontend.halted", 1),
              (8, "fe_mxu.halted", 0), (11, "fe_mxu.halted", 1)]
    issues = top.issues(events)
    assert issues["MXU"] == [0, 4, 9]
    assert issues["PIM"] == [2] and issues["CSD"] == []


def test_entries_run_on_the_smallest_top_that_holds_them():
    assert tops.choose({"mxu": []}, {"SRAM"}) is tops.MxuTop
    assert tops.choose({"vpu": []}, {"SRAM"}) is tops.VpuTop
    assert tops.choose({"pim": []}, {"GBUF", "PRES", "PIMDRAM"}) is tops.PimTop
    assert tops.choose({"mxu": [], "pim": []}, {"SRAM", "GBUF"}) is tops.SystemTop
    assert tops.choose({"csd": []}, {"CDRAM", "FLASH"}) is tops.SystemTop
    assert tops.choose({"mxu": [], "dma": []}, {"SRAM", "HOST"}) is tops.SystemTop
    assert tops.choose({"mxu": []}, {"SRAM", "HBM"}) is tops.SystemTop
    assert tops.choose({"mxu": []}, {"SRAM", "DISK"}) is None


class FakeLanes:
    """A harness with one ByteRam of four byte lanes, as `tops.ram_access` sees it."""

    def __init__(self):
        self.lanes = {f"ram.lane{j}": bytearray(8) for j in range(4)}
        self.memories = {**self.lanes, "other.lane0": None}

    def mem_write(self, name, addr, data):
        self.lanes[name][addr:addr + len(data)] = data

    def mem_read(self, name, addr, nbytes):
        return bytes(self.lanes[name][addr:addr + nbytes])


def test_byte_rams_are_written_and_read_lane_by_lane():
    h = FakeLanes()
    tops.ram_access(h, "ram", 3, np.arange(1, 8, dtype=np.uint8))
    assert h.lanes["ram.lane3"][:2] == bytes([1, 5])
    assert h.lanes["ram.lane0"][:3] == bytes([0, 2, 6])
    assert h.lanes["ram.lane1"][:3] == bytes([0, 3, 7])
    assert h.lanes["ram.lane2"][:2] == bytes([0, 4])
    back = tops.ram_access(h, "ram", 2, np.zeros(6, np.uint8), read=True)
    assert back.tolist() == [0, 1, 2, 3, 4, 5]
