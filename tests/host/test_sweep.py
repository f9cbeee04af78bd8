"""Design-space sweeps: spec parsing, point expansion, failure records, resume, Pareto, Ray."""
import importlib.util
import re
import sys

import pytest
import yaml

from trimem.config import load_config
from trimem.host import cli, sweep

pytestmark = pytest.mark.unit

TINY = {"hw": "flightllm-u280", "params": {"fpga.dsp_chains": [96, 192]},
        "models": ["smollm2-135m"], "quant": ["w4a8kv4"], "ctx": [128]}
"""Two cheap points: SmolLM2-135M decode at a 128-token context."""
FAKE = {"tokens_per_s": 10.0, "seconds_per_token": 0.1, "energy_j_per_token": 1.0,
        "tokens_per_j": 1.0, "area_mm2": 5.0, "hbm_bytes_per_token": 1.0}


def test_grid_spec_expands_to_every_combination_with_distinct_hashes():
    spec = sweep.parse_spec({**TINY, "quant": ["w4a8kv4", "w8a8kv8"], "batch": [1, 4]})
    pts = sweep.points(spec)
    assert len(pts) == 2 * 2 * 2
    assert len({p["hash"] for p in pts}) == len(pts)
    assert {(p["params"]["fpga.dsp_chains"], p["quant"], p["batch"]) for p in pts} == {
        (c, q, b) for c in (96, 192) for q in ("w4a8kv4", "w8a8kv8") for b in (1, 4)}


def test_random_search_draws_the_same_points_for_the_same_seed():
    data = {**TINY, "search": "random", "samples": 5, "seed": 3,
            "params": {"fpga.dsp_chains": {"low": 32, "high": 256},
                       "fpga.hbm_gbps_per_channel": {"low": 5.0, "high": 40.0, "log": True}}}
    first, again = (sweep.points(sweep.parse_spec(data)) for _ in range(2))
    other = sweep.points(sweep.parse_spec({**data, "seed": 4}))
    assert first == again and first != other
    for p in first:
        assert isinstance(p["params"]["fpga.dsp_chains"], int)
        assert 32 <= p["params"]["fpga.dsp_chains"] <= 256
        assert 5.0 <= p["params"]["fpga.hbm_gbps_per_channel"] <= 40.0


def test_unknown_spec_key_is_rejected_with_its_name():
    with pytest.raises(ValueError, match=r"^sweep spec: unknown key 'modles'; valid keys"):
        sweep.parse_spec({**TINY, "modles": ["llama2-7b"]})


def test_params_key_outside_the_config_is_rejected_with_its_name():
    with pytest.raises(ValueError, match=r"^sweep spec: params key 'fpga\.dsp_chain' is not a "
                                         r"config key of the base preset"):
        sweep.parse_spec({**TINY, "params": {"fpga.dsp_chain": [1]}})


def test_a_range_needs_random_search():
    with pytest.raises(ValueError, match=r"^sweep spec: params 'fpga\.dsp_chains': a range"):
        sweep.parse_spec({**TINY, "params": {"fpga.dsp_chains": {"low": 1, "high": 2}}})


def test_area_estimate_grows_with_the_dsp_chains():
    small, large = (sweep.point_config({"hw": "flightllm-u280", "hash": "x",
                                        "params": {"fpga.dsp_chains": c}}) for c in (96, 192))
    assert sweep.area_mm2(large) - sweep.area_mm2(small) == pytest.approx(
        96 * 32 * sweep.MAC_UM2 / 1e6)


def test_a_failing_point_is_recorded_with_its_error_and_the_sweep_goes_on(tmp_path):
    spec = sweep.parse_spec({**TINY, "params": {"fpga.dsp_chains": [100000, 96]}})
    rows = sweep.run_sweep(spec, tmp_path, progress=lambda line: None)
    by = {r["fpga.dsp_chains"]: r for r in rows}
    assert by[100000]["status"] == "error"
    assert re.match(r"^ConfigError: flightllm-u280 with \{'fpga\.dsp_chains': 100000\}: "
                    r"fpga\.dsp_chains: 100000 chains x chain_length 32", by[100000]["error"])
    assert by[96]["status"] == "ok" and by[96]["tokens_per_s"] > 0
    assert by[96]["energy_j_per_token"] > 0 and by[96]["area_mm2"] > 0
    assert (tmp_path / "pareto.png").is_file()


def test_an_interrupted_sweep_resumes_without_redoing_finished_points(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(sweep, "evaluate", lambda point: calls.append(point["hash"]) or FAKE)
    spec = sweep.parse_spec({**TINY, "params": {"fpga.dsp_chains": [32, 64, 96]}})
    sweep.run_sweep(spec, tmp_path, progress=lambda line: None)
    assert len(calls) == 3
    path = tmp_path / sweep.RESULTS
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2]) + "\n" + lines[2][:20])
    calls.clear()
    rows = sweep.run_sweep(spec, tmp_path, progress=lambda line: None)
    assert len(calls) == 2 and lines[1].split(",")[0] not in calls
    assert sorted(r["hash"] for r in rows) == sorted(p["hash"] for p in sweep.points(spec))
    assert len(path.read_text().splitlines()) == 4


def test_failed_points_are_retried_only_when_asked(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "evaluate", lambda point: 1 / 0)
    spec = sweep.parse_spec(TINY)
    sweep.run_sweep(spec, tmp_path, progress=lambda line: None)
    calls = []
    monkeypatch.setattr(sweep, "evaluate", lambda point: calls.append(1) or FAKE)
    sweep.run_sweep(spec, tmp_path, progress=lambda line: None)
    assert calls == []
    rows = sweep.run_sweep(spec, tmp_path, retry_errors=True, progress=lambda line: None)
    assert len(calls) == 2 and all(r["status"] == "ok" for r in rows)


def test_results_of_a_sweep_with_other_columns_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "evaluate", lambda point: FAKE)
    sweep.run_sweep(sweep.parse_spec(TINY), tmp_path, progress=lambda line: None)
    other = sweep.parse_spec({**TINY, "params": {"fpga.vpu_lanes": [64]}})
    with pytest.raises(ValueError, match=r"results\.csv was written by a sweep with other "
                                         r"columns"):
        sweep.run_sweep(other, tmp_path, progress=lambda line: None)


def test_pareto_keeps_the_points_no_other_beats_on_speed_energy_and_area():
    def row(t, e, a, status="ok"):
        return {"status": status, "tokens_per_s": t, "energy_j_per_token": e, "area_mm2": a}

    rows = [row(10, 1, 1), row(5, 2, 2), row(20, 3, 1), row(1, 1, 0.5), row(0, 0, 0, "error")]
    assert sweep.pareto(rows) == [True, False, True, True, False]


def test_the_ray_backend_without_ray_asks_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ValueError, match=r"^the Ray backend needs the ray package: install ray"):
        sweep.run_sweep(sweep.parse_spec(TINY), tmp_path, ray="local", progress=print)


def test_sweep_command_prints_the_table_and_writes_results(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sweep, "evaluate", lambda point: FAKE)
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(TINY))
    assert cli.main(["sweep", str(spec), "-o", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^2 ok \(\d+ Pareto-optimal\), 0 failed$", out, re.M)
    assert len(sweep.read_results(tmp_path / "out" / sweep.RESULTS)) == 2


def test_example_spec_parses_and_varies_real_config_keys():
    spec = sweep.load_spec("examples/sweep.yaml")
    base = load_config(spec.hw).to_dict()
    for key in spec.params:
        section, name = key.split(".")
        assert name in base[section]
    assert len(sweep.points(spec)) > 1


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed")
def test_a_local_ray_sweep_gives_the_process_pool_results(tmp_path):
    spec = sweep.parse_spec({**TINY, "params": {"fpga.dsp_chains": [96, 100000]}})
    pool = sweep.run_sweep(spec, tmp_path / "pool", workers=2, progress=lambda line: None)
    ray = sweep.run_sweep(spec, tmp_path / "ray", ray="local", workers=2,
                          progress=lambda line: None)
    keep = [c for c in spec.columns if c != "wall_s"]
    assert sorted([r[c] for c in keep] for r in pool) == sorted([r[c] for c in keep] for r in ray)
    assert {r["status"] for r in ray} == {"ok", "error"}
