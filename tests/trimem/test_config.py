"""Hardware config: presets, derived figures, validation messages, inherits, hash, `hw` commands."""
import argparse
import copy
import json
import re
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

import trimem
from trimem import hwcli
from trimem.config import (SECTION_TYPES, ConfigError, HardwareConfig, list_presets, load_config,
                           load_config_dict)

pytestmark = pytest.mark.unit

PRESETS = ("flightllm-u280", "flightllm-vhk158", "neupims", "pim-gpt", "instinfer",
           "trimem-small", "trimem-all")
DOCS = Path(__file__).resolve().parents[2] / "docs" / "config.md"


def small() -> dict:
    """A fresh, fully resolved dict of trimem-small to break in one place."""
    return copy.deepcopy(load_config("trimem-small").to_dict())


def bad(d: dict, pattern: str):
    with pytest.raises(ConfigError, match=pattern):
        load_config_dict(d)


def run_hw(argv):
    parser = argparse.ArgumentParser()
    hwcli.add_hw_parser(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


# ---- presets -------------------------------------------------------------------------------------

def test_every_required_preset_ships():
    assert set(PRESETS) <= set(list_presets())


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads_with_its_own_name(name):
    cfg = load_config(name)
    assert isinstance(cfg, HardwareConfig) and cfg.name == name and cfg.engines


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_number_has_a_citation_or_model_choice_comment(name):
    text = (Path(trimem.__file__).parent / "presets" / f"{name}.yaml").read_text()
    for line in text.splitlines():
        if re.match(r"^\s+\w+: ", line):
            assert " # " in line, f"{name}: no source comment on {line.strip()!r}"


def test_presets_have_the_engines_their_papers_describe():
    engines = {n: load_config(n).engines for n in PRESETS}
    assert engines["flightllm-u280"] == ("fpga",)
    assert engines["flightllm-vhk158"] == ("fpga",)
    assert engines["neupims"] == ("fpga", "pim")
    assert engines["pim-gpt"] == ("fpga", "pim")
    assert engines["instinfer"] == ("csd",)
    assert engines["trimem-all"] == engines["trimem-small"] == ("fpga", "pim", "csd")
    neupims = load_config("neupims").pim
    assert neupims.shared_with_hbm and neupims.dual_row_buffer


def test_drives_stream_as_instinfer_and_the_co_simulated_preset_runs_the_rtl_schedule():
    engines = {n: load_config(n).csd.engine for n in ("instinfer", "trimem-all", "trimem-small")}
    assert engines == {"instinfer": "streaming", "trimem-all": "streaming",
                       "trimem-small": "sequential"}


def test_trimem_small_is_small_enough_for_co_simulation():
    cfg = load_config("trimem-small")
    assert cfg.fpga.macs_per_cycle == 16 and cfg.fpga.sram_bytes == 64 << 10
    assert cfg.fpga.hbm_bytes == 2 << 20
    assert cfg.pim.capacity_bytes == 1 * 1 * 2 * 64 * 256
    assert cfg.csd.capacity_bytes <= 1 << 20 and cfg.csd.page_bytes == 512


# ---- derived figures, by hand --------------------------------------------------------------------

def test_fpga_derived_figures_of_flightllm_u280_match_hand_computation():
    f = load_config("flightllm-u280").fpga
    assert f.macs_per_cycle == 192 * 32 == 6144
    assert f.peak_macs_per_s == pytest.approx(6144 * 225e6)
    assert f.effective_macs_per_s(0) == f.peak_macs_per_s
    assert f.effective_macs_per_s(1) == pytest.approx(2 * 6144 * 225e6)  # 2:4
    assert f.hbm_bytes == 8 << 30
    assert f.hbm_gbps == pytest.approx(460.0)
    assert f.hbm_bytes_per_cycle == pytest.approx(460e9 / 225e6)
    assert f.ridge_op_per_byte == pytest.approx(2 * 6144 * 225e6 / 460e9)


def test_out_of_range_nm_index_names_the_valid_range():
    with pytest.raises(ValueError, match=r"^N:M index 3 out of range; .* use 0\.\.2$"):
        load_config("flightllm-u280").fpga.effective_macs_per_s(3)


def test_pim_derived_figures_of_neupims_match_hand_computation():
    p = load_config("neupims").pim
    assert p.banks_per_channel == 32 and p.total_banks == 32 * 32
    assert p.bank_bytes == 32768 * 1024 == 32 << 20
    assert p.capacity_bytes == 32 << 30
    assert p.peak_macs_per_s == pytest.approx(1024 * 16 * 1e9)
    assert p.internal_gbps == pytest.approx(1024 * 64 * 1e9 / 1e9)
    assert p.external_gbps == pytest.approx(32 * 32.0)
    assert p.ridge_op_per_byte == pytest.approx(2 * 16 / 64)
    assert p.refresh_fraction == pytest.approx(260 / 3900)
    assert p.gbuf_total_bytes == 32 * 32768 and p.result_total_bytes == 32 * 4096


def test_csd_derived_figures_of_instinfer_match_hand_computation():
    c = load_config("instinfer").csd
    assert c.pages == 16 * 4 * 2 * 2048 * 512
    assert c.capacity_bytes == 2 << 40
    assert c.internal_gbps == pytest.approx(12.8)
    assert c.array_gbps == pytest.approx(16 * 4 * 2 * 16384 / 50e3)
    assert c.pcie_gbps == pytest.approx(4 * 1.969)
    assert c.peak_macs_per_s == pytest.approx(256 * 250e6)
    assert c.ridge_op_per_byte == pytest.approx(2 * 256 * 250e6 / 12.8e9)


def test_host_ridge_point_is_peak_flops_over_bandwidth():
    h = load_config("instinfer").host
    assert h.ridge_op_per_byte == pytest.approx(154.8e12 / 768e9)


# ---- validation messages -------------------------------------------------------------------------

def test_unknown_key_is_rejected_with_the_closest_valid_key():
    d = small()
    d["pim"]["tRDC"] = d["pim"].pop("tRCD")
    bad(d, r"^<dict>: pim\.tRDC: unknown key; did you mean 'tRCD'\?$")


def test_unknown_key_matches_case_insensitively():
    d = small()
    d["fpga"]["Clock_MHz"] = d["fpga"].pop("clock_mhz")
    bad(d, r"^<dict>: fpga\.Clock_MHz: unknown key; did you mean 'clock_mhz'\?$")


def test_unknown_top_level_section_is_rejected_with_a_suggestion():
    d = small()
    d["fgpa"] = d.pop("fpga")
    bad(d, r"^<dict>: fgpa: unknown key; did you mean 'fpga'\?$")


def test_integer_written_as_float_is_rejected_with_the_fix():
    d = small()
    d["pim"]["rows"] = 64.0
    bad(d, r"^<dict>: pim\.rows: expected an integer, got 64\.0 \(float\); "
           r"write 64 without a decimal point$")


def test_integer_given_for_a_bool_is_rejected():
    d = small()
    d["pim"]["dual_row_buffer"] = 1
    bad(d, r"^<dict>: pim\.dual_row_buffer: expected true or false, got 1 \(int\)")


def test_bool_given_for_an_integer_is_rejected():
    d = small()
    d["csd"]["channels"] = True
    bad(d, r"^<dict>: csd\.channels: expected an integer, got True \(bool\)")


def test_yaml_exponent_read_as_text_gets_a_hint():
    d = small()
    d["csd"]["energy_pj_per_page_read"] = "4e6"
    bad(d, r"^<dict>: csd\.energy_pj_per_page_read: expected a number, got '4e6' \(str\); "
           r"YAML reads an exponent")


def test_scalar_given_for_a_list_is_rejected():
    d = small()
    d["fpga"]["weight_bits"] = 8
    bad(d, r"^<dict>: fpga\.weight_bits: expected a list, got 8 \(int\)")


@pytest.mark.parametrize("section,key,value", [("fpga", "sram_bytes", 0),
                                               ("pim", "channels", -1),
                                               ("csd", "tR_us", 0.0),
                                               ("links", "pcie_gbps", -3.0)])
def test_non_positive_sizes_are_rejected(section, key, value):
    d = small()
    d[section][key] = value
    bad(d, rf"^<dict>: {section}\.{key}: must be > 0, got {re.escape(repr(value))}; ")


def test_zero_latency_is_allowed():
    d = small()
    d["links"]["p2p_latency_us"] = 0
    assert load_config_dict(d).links.p2p_latency_us == 0.0


def test_nm_pattern_keeping_more_than_its_block_is_rejected():
    d = small()
    d["fpga"]["nm_patterns"] = [[1, 1], [4, 2]]
    bad(d, r"^<dict>: fpga\.nm_patterns\[1\]: \[4, 2\] is not an N:M pattern \(need 1 <= n <= m")


def test_nm_pattern_keeping_nothing_is_rejected():
    d = small()
    d["fpga"]["nm_patterns"] = [[1, 1], [0, 4]]
    bad(d, r"^<dict>: fpga\.nm_patterns\[1\]: \[0, 4\] is not an N:M pattern")


def test_nm_patterns_must_start_dense():
    d = small()
    d["fpga"]["nm_patterns"] = [[2, 4], [1, 1]]
    bad(d, r"^<dict>: fpga\.nm_patterns: must start with the dense pattern \[1, 1\] .*; "
           r"put \[1, 1\] first$")


def test_unsupported_weight_width_is_rejected():
    d = small()
    d["fpga"]["weight_bits"] = [4, 6]
    bad(d, r"^<dict>: fpga\.weight_bits: got \[4, 6\]; list each supported width once")


def test_chains_beyond_the_device_dsp_count_are_rejected():
    d = small()
    d["fpga"]["dsp_chains"] = 20
    bad(d, r"^<dict>: fpga\.dsp_chains: 20 chains x chain_length 8 = 160 DSPs exceeds "
           r"dsp_total = 156")


def test_sram_size_must_be_whole_chains():
    d = small()
    d["fpga"]["sram_bytes"] = 65540
    bad(d, r"^<dict>: fpga\.sram_bytes: 65540 is not a multiple of chain_length = 8")


@pytest.mark.parametrize("key,value,pattern", [
    ("tRAS", 3, r"pim\.tRAS: 3 is less than pim\.tRCD = 4 .*; set tRAS >= tRCD$"),
    ("tFAW", 1, r"pim\.tFAW: 1 is less than pim\.tRRD_S = 2 .*; set tFAW >= tRRD_S$"),
    ("tCCD_L", 0, r"pim\.tCCD_L: must be > 0"),
    ("tREFI", 16, r"pim\.tREFI: 16 is not more than pim\.tRFC = 16 .*; set tREFI > tRFC$"),
])
def test_inconsistent_dram_timing_is_rejected(key, value, pattern):
    d = small()
    d["pim"][key] = value
    bad(d, rf"^<dict>: {pattern}")


def test_burst_must_divide_the_row_and_feed_the_lanes():
    d = small()
    d["pim"]["burst_bytes"] = 48
    bad(d, r"^<dict>: pim\.burst_bytes: 48 does not divide pim\.row_bytes = 256")
    d = small()
    d["pim"]["mac_lanes"] = 64
    bad(d, r"^<dict>: pim\.mac_lanes: 64 int8 lanes exceed the 32 bytes")


def test_flash_page_must_be_a_power_of_two():
    d = small()
    d["csd"]["page_bytes"] = 500
    bad(d, r"^<dict>: csd\.page_bytes: 500 is not a power of two")


def test_unknown_csd_engine_is_rejected_with_the_choices():
    d = small()
    d["csd"]["engine"] = "pipelined"
    bad(d, r"^<dict>: csd\.engine: unknown engine 'pipelined'; use one of sequential, "
           r"streaming$")


def test_csd_engine_must_be_text():
    d = small()
    d["csd"]["engine"] = 1
    bad(d, r"^<dict>: csd\.engine: expected non-empty text, got 1; write a quoted string$")


def test_unknown_pcie_generation_is_rejected():
    d = small()
    d["csd"]["pcie_gen"] = 7
    bad(d, r"^<dict>: csd\.pcie_gen: unknown PCIe generation 7; use one of \[1, 2, 3, 4, 5, 6\]$")


def test_missing_key_is_named():
    d = small()
    del d["pim"]["tRCD"]
    bad(d, r"^<dict>: pim: missing 'tRCD'; add every key of the section")


def test_missing_host_section_is_named():
    d = small()
    del d["host"]
    bad(d, r"^<dict>: host: missing section; add `host:`")


def test_config_without_any_engine_is_rejected():
    d = small()
    d["fpga"] = d["pim"] = d["csd"] = None
    bad(d, r"^<dict>: fpga\|pim\|csd: the config has no engine section")


def test_pim_sharing_hbm_needs_matching_fpga_channels():
    d = small()
    d["pim"]["shared_with_hbm"] = True
    bad(d, r"^<dict>: pim\.shared_with_hbm: PIM channels are 1 x 32768 B but fpga has "
           r"2 x 1048576 B; make fpga\.hbm_channels")


# ---- files, inherits, presets by name ------------------------------------------------------------

def test_inherits_overrides_only_the_given_keys(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("inherits: trimem-small\nname: mine\nfpga:\n  clock_mhz: 150.0\n")
    cfg = load_config(f)
    base = load_config("trimem-small")
    assert cfg.name == "mine" and cfg.fpga.clock_mhz == 150.0
    assert cfg.fpga.dsp_chains == base.fpga.dsp_chains and cfg.pim == base.pim


def test_inherits_applies_a_list_left_to_right():
    cfg = load_config("trimem-all")
    assert cfg.fpga == load_config("flightllm-u280").fpga
    assert cfg.csd.channels == load_config("instinfer").csd.channels
    assert cfg.pim.rows == load_config("neupims").pim.rows and not cfg.pim.shared_with_hbm


def test_null_section_removes_an_inherited_engine(tmp_path):
    f = tmp_path / "no-csd.yaml"
    f.write_text("inherits: trimem-small\nname: no-csd\ncsd: null\n")
    assert load_config(f).engines == ("fpga", "pim")


def test_inheriting_file_must_give_its_own_name(tmp_path):
    f = tmp_path / "anon.yaml"
    f.write_text("inherits: trimem-small\nfpga:\n  clock_mhz: 150.0\n")
    with pytest.raises(ConfigError, match=r"anon\.yaml: name: missing key; a config that inherits"):
        load_config(f)


def test_inherits_cycle_is_reported(tmp_path):
    (tmp_path / "a.yaml").write_text("inherits: b.yaml\nname: a\n")
    (tmp_path / "b.yaml").write_text("inherits: a.yaml\nname: b\n")
    cycle = r"/b\.yaml: inherits: cycle \S+/a\.yaml -> \S+/b\.yaml -> \S+/a\.yaml; remove"
    with pytest.raises(ConfigError, match=cycle):
        load_config(tmp_path / "a.yaml")


def test_errors_in_a_file_name_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("inherits: trimem-small\nname: bad\npim:\n  tRAS: 2\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(f))}: pim\.tRAS: 2 is less than"):
        load_config(f)


def test_duplicate_yaml_key_is_rejected(tmp_path):
    f = tmp_path / "dup.yaml"
    f.write_text("inherits: trimem-small\nname: dup\nfpga:\n  clock_mhz: 1.0\n  clock_mhz: 2.0\n")
    with pytest.raises(ConfigError, match=r": line 5: key 'clock_mhz' is given twice; keep one$"):
        load_config(f)


def test_missing_file_is_reported_with_the_presets():
    with pytest.raises(ConfigError, match=r"^nowhere\.yaml: no such file; .*trimem-small"):
        load_config("nowhere.yaml")


def test_unknown_preset_suggests_the_closest_name():
    with pytest.raises(ConfigError, match=r"^unknown hardware preset 'trimem-smal'; "
                                          r"did you mean 'trimem-small'\?"):
        load_config("trimem-smal")


def test_to_dict_round_trips_through_yaml():
    cfg = load_config("trimem-all")
    again = load_config_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    assert again == cfg


def test_loaded_config_passes_through_unchanged():
    cfg = load_config("neupims")
    assert load_config(cfg) is cfg


# ---- hash ----------------------------------------------------------------------------------------

def test_hash_is_stable_and_changes_with_any_value():
    cfg = load_config("trimem-small")
    assert cfg.config_hash() == load_config_dict(small()).config_hash()
    assert re.fullmatch(r"[0-9a-f]{64}", cfg.config_hash())
    d = small()
    d["pim"]["tWR"] += 1
    assert load_config_dict(d).config_hash() != cfg.config_hash()


def test_hash_does_not_depend_on_key_order():
    d = small()
    reordered = {k: d[k] for k in reversed(list(d))}
    assert load_config_dict(reordered).config_hash() == load_config_dict(d).config_hash()


# ---- hw commands ---------------------------------------------------------------------------------

def test_hw_list_prints_every_preset(capsys):
    assert run_hw(["hw", "list"]) == 0
    out = capsys.readouterr().out
    for name in PRESETS:
        assert re.search(rf"^{re.escape(name)} ", out, re.M)


def test_hw_show_json_parses_and_carries_config_hash_and_derived(capsys):
    assert run_hw(["hw", "show", "neupims", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    cfg = load_config("neupims")
    assert doc["sha256"] == cfg.config_hash()
    assert load_config_dict(doc["config"]) == cfg
    assert doc["derived"]["pim"]["internal_gbps"] == pytest.approx(cfg.pim.internal_gbps * 1e9)
    assert doc["derived"]["fpga"]["ridge_op_per_byte"] == pytest.approx(256.0)


def test_hw_show_prints_every_field_and_the_derived_table(capsys):
    assert run_hw(["hw", "show", "trimem-all"]) == 0
    out = capsys.readouterr().out
    for key, cls in SECTION_TYPES.items():
        for f in fields(cls):
            assert re.search(rf"^  {f.name} +\S", out, re.M), f"{key}.{f.name} not shown"
    assert re.search(r"^  pim +internal \(row buffer\) bandwidth +65\.5 TB/s$", out, re.M)
    assert re.search(r"^  csd +PCIe bandwidth +15\.8 GB/s$", out, re.M)


def test_hw_show_of_an_unknown_preset_raises_for_the_cli_to_report():
    with pytest.raises(ConfigError, match=r"^unknown hardware preset 'nope'"):
        run_hw(["hw", "show", "nope"])


def test_hw_check_fails_with_the_message_on_a_bad_file(tmp_path, capsys):
    f = tmp_path / "bad.yaml"
    f.write_text("inherits: trimem-small\nname: bad\npim:\n  rows: 64.0\n")
    assert run_hw(["hw", "check", str(f)]) == 1
    err = capsys.readouterr().err
    assert re.search(r"^invalid: .*bad\.yaml: pim\.rows: expected an integer, got 64\.0", err)


def test_hw_check_accepts_a_good_file(tmp_path, capsys):
    f = tmp_path / "good.yaml"
    f.write_text("inherits: trimem-small\nname: good\n")
    assert run_hw(["hw", "check", str(f)]) == 0
    assert capsys.readouterr().out.startswith(f"ok: {f} is 'good'")


# ---- docs ----------------------------------------------------------------------------------------

def test_docs_table_lists_every_field_with_its_unit():
    text = DOCS.read_text()
    for key, cls in SECTION_TYPES.items():
        section = re.search(rf"^### `{key}`\n(.*?)(?=^#)", text, re.M | re.S)
        assert section, f"docs/config.md has no ### `{key}` section"
        for f in fields(cls):
            row = rf"^\| `{f.name}` \| {re.escape(f.metadata['unit'])} \| \w"
            assert re.search(row, section.group(1), re.M), f"no docs row for {key}.{f.name}"
