"""`trimem sim` and `trimem cosim` from the command line."""
import json

import pytest

from trimem.host.cli import main


@pytest.mark.unit
def test_sim_rejects_an_unknown_component_with_the_known_ones(capsys):
    assert main(["sim", "gpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("trimem sim: error: no testbench for component 'gpu'; choose one of")


@pytest.mark.unit
def test_sim_lists_its_components_in_its_help(capsys):
    with pytest.raises(SystemExit):
        main(["sim", "--help"])
    out = capsys.readouterr().out
    assert "dsp_chain" in out and "mxu" in out and "--waves" in out


@pytest.mark.cosim
@pytest.mark.slow
def test_cosim_json_reports_exactness_cycles_and_speed(linear_bundles, capsys):
    assert main(["cosim", str(linear_bundles[1]), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["bit_exact"] is True and report["cycle_exact"] is True
    assert report["rtl_cycles"] == report["emulator_cycles"] > 0
    assert report["wall_s"] > 0 and report["cycles_per_s"] > 0


@pytest.mark.cosim
@pytest.mark.slow
def test_cosim_prints_the_verdict_for_a_person(linear_bundles, capsys):
    assert main(["cosim", str(linear_bundles[0])]) == 0
    out = capsys.readouterr().out
    assert "outputs bit-exact with the emulator: yes" in out
    assert "(equal)" in out


@pytest.mark.cosim
@pytest.mark.slow
def test_sim_runs_a_testbench_and_can_write_a_waveform(tmp_path, capsys):
    assert main(["sim", "vpu", "--seed", "2", "--waves", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("vpu (seed 2): passed, bit-exact")
    assert (tmp_path / "dump.vcd").stat().st_size > 0
