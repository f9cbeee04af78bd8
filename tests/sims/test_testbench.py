"""cocotb testbenches: the cases the emulator expects, their checks, and every component's
testbench on Verilator with a few seeds."""
import re

import numpy as np
import pytest

from trimem import isa
from trimem.sims import (runner, tb_csd, tb_dma, tb_dsp_chain, tb_mxu, tb_pim, tb_vpu,
                         testbench)

SEEDS = (0, 1)


@pytest.fixture(scope="module")
def mxu_case(small):
    return tb_mxu.make_case(0, small)


@pytest.mark.unit
def test_an_unknown_component_is_rejected_with_the_known_ones():
    with pytest.raises(ValueError, match=r"^no testbench for component 'gpu'; choose one of "
                                         r"dsp_chain, mxu, vpu, pim, csd, dma$"):
        testbench.component("gpu")


@pytest.mark.unit
def test_mxu_cases_cover_every_pattern_width_saturation_and_wrap(small, mxu_case):
    gemms = [isa.decode(bytes.fromhex(w)) for w in mxu_case["program"]]
    gemms = [g.fields for g in gemms if g.name == "MXU.GEMM"]
    assert {(g["nm"], g["bits"]) for g in gemms} >= {(nm, b) for nm in range(2) for b in (4, 8)}
    assert any(g["k"] == tb_mxu.WRAP_K for g in gemms)
    assert any(g["n"] % small.fpga.dsp_chains for g in gemms)
    assert mxu_case["cycles"] == mxu_case["issues"][-1] > 0
    saturated = [np.frombuffer(bytes.fromhex(mxu_case["expected"][r["name"]]), "<i4")
                 for r in mxu_case["regions"]]
    assert any(np.isin(v, [2**31 - 1, -2**31]).any() for v in saturated)


@pytest.mark.unit
def test_a_wrong_output_byte_is_reported_with_its_element_and_instruction(mxu_case):
    region = mxu_case["regions"][1]
    got = {r["name"]: bytes.fromhex(mxu_case["expected"][r["name"]])
           for r in mxu_case["regions"]}
    bad = bytearray(got[region["name"]])
    bad[4] ^= 1
    got[region["name"]] = bytes(bad)
    timing, found = testbench.check_case(mxu_case, got, mxu_case["issues"], mxu_case["cycles"])
    assert timing is None
    assert found.kind == "tensor" and found.where == f"{region['name']}[0, 1]"
    assert re.match(r"^MXU\[2\] `MXU\.GEMM m=", found.instruction)


@pytest.mark.unit
def test_a_late_instruction_is_reported_as_a_timing_difference(mxu_case):
    issues = list(mxu_case["issues"])
    issues[3] += 1
    found, _ = testbench.check_case(mxu_case, {}, issues, mxu_case["cycles"])
    assert found.kind == "cycles" and found.where == "MXU[3]"


@pytest.mark.unit
def test_vpu_cases_run_every_op_the_rtl_builds(small):
    from trimem.hdl.vpu_top import BUILT

    case = tb_vpu.make_case(0, small)
    names = {isa.decode(bytes.fromhex(w)).name for w in case["program"]}
    assert set(BUILT) <= names and "NOP" in names


@pytest.mark.unit
def test_dma_cases_copy_between_every_pair_of_spaces_the_engine_runs(small):
    case = tb_dma.make_case(0, small)
    copies = [isa.decode(bytes.fromhex(w)) for w in case["program"]]
    copies = [c.fields for c in copies if c.name == "DMA.COPY"]
    pairs = {(isa.Space(c["src_space"]).name, isa.Space(c["dst_space"]).name) for c in copies}
    assert pairs == set(tb_dma.pairs(case["sizes"])) and len(pairs) == 34
    assert any(c["nbytes"] == 1 for c in copies)
    assert any(c["nbytes"] > 2 * tb_dma.DMA_BYTES and c["src_addr"] % 4 for c in copies)
    overlapping = [c for c in copies if c["src_space"] == c["dst_space"] == isa.Space.HBM
                   and abs(c["dst_addr"] - c["src_addr"]) < c["nbytes"]]
    assert {c["dst_addr"] > c["src_addr"] for c in overlapping} == {True, False}


@pytest.mark.unit
def test_a_dma_copy_that_needs_the_cycle_it_waits_gets_a_nop_before_it():
    wrote = tb_dma.Copy("SRAM", 0, "GBUF", 0, 4)      # its one chunk lands in its end cycle
    copies = [wrote, tb_dma.Copy("GBUF", 0, "SRAM", 8, 8), tb_dma.Copy("SRAM", 8, "GBUF", 16, 4)]
    program, kept = tb_dma.schedule(copies, [1, 2, 1])
    assert program == [copies[0].text(), copies[1].text(), "NOP", copies[2].text()]
    assert [i for i, _ in kept] == [0, 1, 3]
    program, kept = tb_dma.schedule([wrote, tb_dma.Copy("HOST", 0, "SRAM", 0, 4096)], [1, 60])
    assert program == [wrote.text()] and len(kept) == 1


@pytest.mark.unit
def test_chain_results_are_checked_in_value_and_cycle(small):
    case = tb_dsp_chain.make_case(0, small)

    def payload(ys):
        return sum((y & 0xFFFFFFFF) << (32 * c) for c, y in enumerate(ys)) \
            | len(ys) << case["count_offset"]

    taken = [(c, payload(y)) for c, y in zip(case["cycles"], case["expected"])]
    assert tb_dsp_chain.check(case, taken, cycles=True) == ""
    late = [(c + 1, p) for c, p in taken]
    assert re.match(r"^result 0 leaves at cycle \d+, expected \d+$",
                    tb_dsp_chain.check(case, late, cycles=True))
    assert tb_dsp_chain.check(case, late, cycles=False) == ""
    wrong = [(taken[0][0], payload([v + 1 for v in case["expected"][0]]))] + taken[1:]
    assert re.match(r"^result 0: rtl \[", tb_dsp_chain.check(case, wrong, cycles=True))
    assert re.match(r"^\d+ results came out, expected \d+$",
                    tb_dsp_chain.check(case, taken[:-1], cycles=True))


@pytest.mark.unit
def test_layouts_pack_fields_at_their_offsets():
    from amaranth.lib import data

    layout = data.StructLayout({"a": data.ArrayLayout(8, 2), "b": 4})
    assert tb_dsp_chain.pack(layout, {"a": [1, -1], "b": 3}) == 0x3FF01


@pytest.mark.cosim
@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", list(testbench.COMPONENTS))
def test_every_component_matches_the_emulator_bit_and_cycle_exactly(name, seed, small,
                                                                    tmp_path):
    report = testbench.run_component(name, seed=seed, cfg=small, workdir=tmp_path)
    assert report["passed"]
    if "emulator_cycles" in report:
        assert report["cycles"] == report["emulator_cycles"] > 0


@pytest.mark.cosim
@pytest.mark.slow
def test_a_testbench_failure_carries_the_first_difference(small, tmp_path, monkeypatch):
    original = tb_mxu.make_case

    def wrong(seed, cfg):
        case = original(seed, cfg)
        case["cycles"] += 1
        return case

    monkeypatch.setattr(tb_mxu, "make_case", wrong)
    with pytest.raises(runner.SimError, match=r"first difference \(cycles\) at MXU: the stream "
                                              r"takes \d+ cycles in the RTL, \d+ in the"):
        testbench.run_component("mxu", cfg=small, workdir=tmp_path)


@pytest.mark.unit
def test_pim_cases_refresh_inside_gemvs_and_miss_rows(small):
    case = tb_pim.make_case(0, small)
    counters = case["counters"]
    assert counters["pim_ref"] >= 2 and counters["pim_refresh_stall"] > 0
    assert counters["pim_row_misses"] > 0 and counters["pim_row_hits"] > 0


@pytest.mark.unit
def test_csd_cases_mask_rows_and_prune_some_tokens(small):
    case = tb_csd.make_case(0, small)
    attns = [isa.decode(bytes.fromhex(w)).fields for w in case["program"][:-1]]
    assert {a["kv_bits"] for a in attns} == {4, 8}
    assert any(a["m"] > 1 for a in attns) and any(a["splits"] > 1 for a in attns)
    assert any(0 < a["topk"] < 1 << a["ctx_log2"] for a in attns)
    assert any(a["q_heads"] > a["kv_heads"] for a in attns)
