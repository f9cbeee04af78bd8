"""`trimem run BUNDLE` and the runner: inputs in, outputs out, reports, traces and checks."""
import argparse
import json

import numpy as np
import pytest

from trimem import isa, special
from trimem.bundle import Bundle, BundleError, Entry, TensorSpec, write_bundle
from trimem.emulator.cli import add_run_parser
from trimem.emulator.engine import EmulatorError
from trimem.emulator.runner import run_bundle

pytestmark = pytest.mark.unit

SHAPE = (2, 20)
NBYTES = 2 * 20 * 4


def copy(src, src_addr, dst, dst_addr):
    return (f"DMA.COPY src_space={src} src_addr={src_addr:#x} dst_space={dst} "
            f"dst_addr={dst_addr:#x} nbytes={NBYTES}")


def add_bundle(path, *, expected_delta=0, vectors=True, hardware=None):
    """A one-entry bundle: the DMA brings a and b from the host, the VPU adds them, the DMA
    takes the sum back."""
    dma = "\n".join([copy("HOST", 0x0, "SRAM", 0x0), copy("HOST", 0x100, "SRAM", 0x100),
                     "PUSH dst=VPU", "POP src=VPU", copy("SRAM", 0x200, "HOST", 0x200), "HALT"])
    vpu = "POP src=DMA\nVPU.ADD m=2 n=20 a_addr=0x0 b_addr=0x100 o_addr=0x200\nPUSH dst=DMA\nHALT"
    entry = Entry("step", "decode", {"dma": isa.assemble(dma, "DMA"),
                                     "vpu": isa.assemble(vpu, "VPU")},
                  inputs=[TensorSpec("a", "HOST", 0x0, "int32", SHAPE),
                          TensorSpec("b", "HOST", 0x100, "int32", SHAPE)],
                  outputs=[TensorSpec("sum", "HOST", 0x200, "int32", SHAPE)])
    rng = np.random.default_rng(0)
    a, b = (rng.integers(-1 << 30, 1 << 30, SHAPE, dtype=np.int32) for _ in range(2))
    tests = {"step": {"inputs": {"a": a, "b": b},
                      "expected": {"sum": special.add_sat(a, b) + expected_delta}}}
    bundle = Bundle({"name": "add"}, hardware or {"preset": "trimem-small"}, {}, {"step": entry},
                    tests=tests if vectors else {})
    return write_bundle(bundle, path)


def trimem_run(*argv):
    parser = argparse.ArgumentParser(prog="trimem")
    add_run_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["run", *map(str, argv)])
    return args.func(args)


def test_run_json_reports_cycles_engines_bytes_energy_and_a_match(tmp_path, capsys):
    path = add_bundle(tmp_path / "b")
    assert trimem_run(path, "--json", "--trace", tmp_path / "t.json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["outputs_match"] is True and report["entry"] == "step"
    assert {"cycles", "seconds", "per_engine", "bytes", "energy_j"} <= report.keys()
    assert set(report["per_engine"]) == {"DMA", "VPU"}
    assert report["bytes"]["HOST"] == report["bytes"]["pcie"] == 3 * NBYTES
    assert report["per_engine"]["DMA"]["bytes"]["pcie"] == 3 * NBYTES
    assert report["per_engine"]["VPU"]["bytes"] == {"SRAM": 3 * NBYTES}
    assert report["cycles"] > 0 and report["energy_j"] > 0


def test_trace_has_a_track_per_engine_and_resource_with_timed_events(tmp_path, capsys):
    path = add_bundle(tmp_path / "b")
    trimem_run(path, "--trace", tmp_path / "t.json")
    events = json.loads((tmp_path / "t.json").read_text())["traceEvents"]
    tracks = {e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert {"DMA", "VPU", "pcie", "hbm0"} <= tracks
    spans = [e for e in events if e["ph"] == "X"]
    assert {e["name"] for e in spans} >= {"DMA.COPY", "VPU.ADD", "POP", "DMA[0]"}
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in spans)


def test_output_that_differs_from_expected_exits_1_and_says_where(tmp_path, capsys):
    path = add_bundle(tmp_path / "b", expected_delta=1)
    assert trimem_run(path, "--json") == 1
    report = json.loads(capsys.readouterr().out)
    assert report["outputs_match"] is False
    assert report["outputs"]["sum"]["mismatches"] == 40
    assert report["outputs"]["sum"]["first"]["index"] == [0, 0]


def test_timing_only_run_counts_the_same_cycles_and_reads_no_outputs(tmp_path, capsys):
    path = add_bundle(tmp_path / "b")
    trimem_run(path, "--json")
    full = json.loads(capsys.readouterr().out)
    trimem_run(path, "--json", "--timing-only")
    timing = json.loads(capsys.readouterr().out)
    assert timing["cycles"] == full["cycles"] and "outputs_match" not in timing


def test_table_output_names_every_engine_and_the_check(tmp_path, capsys):
    trimem_run(add_bundle(tmp_path / "b"), "--entry", "step")
    out = capsys.readouterr().out
    assert out.startswith("entry step on trimem-small: ")
    assert "\nDMA " in out and "\nVPU " in out and out.rstrip().endswith("outputs match expected")


def test_runner_takes_inputs_from_the_caller(tmp_path):
    path = add_bundle(tmp_path / "b", vectors=False)
    a, b = np.full(SHAPE, 5, np.int32), np.full(SHAPE, -7, np.int32)
    result = run_bundle(path, inputs={"a": a, "b": b})
    assert np.array_equal(result.outputs["sum"], np.full(SHAPE, -2))
    assert "outputs_match" not in result.report


def test_missing_input_is_rejected_in_functional_mode(tmp_path):
    with pytest.raises(EmulatorError, match=r"^entry 'step' needs input 'a'; pass it in inputs "
                                            r"or compile the bundle with test vectors$"):
        run_bundle(add_bundle(tmp_path / "b", vectors=False))


def test_input_of_the_wrong_shape_is_rejected(tmp_path):
    with pytest.raises(EmulatorError, match=r"^input 'a' has shape \(3,\), the entry expects "
                                            r"\(2, 20\)$"):
        run_bundle(add_bundle(tmp_path / "b"), inputs={"a": np.zeros(3), "b": np.zeros(SHAPE)})


def test_bundle_compiled_for_another_config_hash_is_rejected(tmp_path):
    path = add_bundle(tmp_path / "b", hardware={"preset": "trimem-small", "hash": "0" * 64})
    with pytest.raises(EmulatorError, match=r"^bundle was compiled for hardware hash 0{64} but "
                                            r"config 'trimem-small' now hashes to [0-9a-f]{64}; "
                                            r"recompile"):
        run_bundle(path)


def test_unknown_entry_is_rejected_with_the_entries_there_are(tmp_path):
    with pytest.raises(BundleError, match=r"^bundle has no entry 'prefill'; it has step$"):
        run_bundle(add_bundle(tmp_path / "b"), "prefill")
