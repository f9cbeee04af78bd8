"""Rooflines: engine roofs from the config, op intensities, the GPU/CPU baselines, and
`trimem roofline`."""
import json
import re

import pytest

from trimem.compiler.ir import OpKind
from trimem.config import load_config
from trimem.host import cli, roofline, studies

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("engine, section", [("MXU", "fpga"), ("PIM", "pim"), ("CSD", "csd"),
                                             ("HOST", "host")])
def test_each_engine_roof_has_the_ridge_point_its_config_section_derives(engine, section):
    cfg = load_config("trimem-all")
    roof = roofline.engine_roofs(cfg)[engine]
    assert roof.ridge == pytest.approx(getattr(cfg, section).ridge_op_per_byte)


def test_an_nm_pattern_raises_the_mxu_roof_by_m_over_n():
    cfg = load_config("flightllm-u280")
    dense, sparse = (roofline.engine_roofs(cfg, nm)["MXU"] for nm in (0, 1))
    assert sparse.peak_ops == pytest.approx(2 * dense.peak_ops)
    assert sparse.bytes_per_s == dense.bytes_per_s


def test_attainable_rate_follows_bandwidth_below_the_ridge_and_peak_above():
    roof = roofline.Roof("x", peak_ops=100.0, bytes_per_s=10.0)
    assert roof.ridge == 10.0
    assert roof.attainable(2.0) == 20.0 and roof.bound(2.0) == "memory"
    assert roof.attainable(50.0) == 100.0 and roof.bound(50.0) == "compute"
    assert roof.seconds(ops=100.0, nbytes=20.0) == 2.0


def test_a_roof_without_bandwidth_is_rejected_with_its_value():
    with pytest.raises(ValueError, match=r"^roof 'x': bytes_per_s must be positive, got 0\.0$"):
        roofline.Roof("x", peak_ops=1.0, bytes_per_s=0.0)


def test_batch_one_decode_on_a_gpu_is_weight_bytes_over_bandwidth_plus_launches():
    host = load_config("flightllm-u280").host
    step = studies.baseline_step(host, "llama2-7b", roofline.FP16, ctx=128)
    assert step.kernels == len(studies.model_graph("llama2-7b", 128).ops)
    assert step.launch_s == pytest.approx(step.kernels * host.kernel_launch_us * 1e-6)
    streaming = step.bytes / (host.mem_gbps * 1e9)
    assert step.seconds == pytest.approx(streaming + step.launch_s, rel=0.01)
    assert step.bytes > 2 * 6.5e9


def test_four_bit_weights_cut_the_gpu_decode_time_and_eight_bit_lie_between():
    host = load_config("neupims").host
    seconds = [studies.baseline_step(host, "llama2-7b", fmt, ctx=128).seconds
               for fmt in (roofline.FP16, roofline.W8A8, roofline.W4A16)]
    assert seconds[0] > seconds[1] > seconds[2]


def test_decode_attention_reads_one_kv_cache_per_row_and_prefill_shares_one():
    graph = studies.model_graph("llama2-7b", 256)
    op = next(o for o in graph.ops if o.kind is OpKind.ATTENTION)
    op.attrs["m"] = 4
    _, decode = roofline.host_op_work(op, "decode", roofline.FP16)
    _, prefill = roofline.host_op_work(op, "prefill", roofline.FP16)
    kv = 2 * 32 * 128 * 256 * 2
    assert decode - prefill == pytest.approx(3 * kv)


def test_roofline_report_puts_every_op_under_its_engine_roof():
    report = roofline.roofline_report("flightllm-u280", "smollm2-135m", sparsity="2:4", ctx=256)
    graph = studies.placed_graph("flightllm-u280", "smollm2-135m", sparsity="2:4", ctx=256)
    assert len(report["ops"]) == len(graph.ops)
    assert "MXU 2:4" in report["engines"]
    for point in report["ops"]:
        roof = report["engines"][point["roof"]]
        assert point["attainable"][point["roof"]] <= roof["peak_ops"] * (1 + 1e-12)
        assert point["op_b"] == pytest.approx(point["ops"] / point["bytes"])
    sparse = [p for p in report["ops"] if p["roof"] == "MXU 2:4"]
    assert sparse and all(p["kind"] == "linear" for p in sparse)


def test_roofline_command_writes_png_and_json(tmp_path, capsys):
    assert cli.main(["roofline", "--hw", "flightllm-u280", "smollm2-135m", "--ctx", "128",
                     "-o", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^linear\s+MXU\s+\d+", out, re.M)
    data = json.loads((tmp_path / "roofline.json").read_text())
    assert data["hw"] == "flightllm-u280" and data["engines"]["MXU"]["ridge"] > 1
    assert (tmp_path / "roofline.png").stat().st_size > 10_000


def test_roofline_command_names_an_unknown_preset(capsys, tmp_path):
    assert cli.main(["roofline", "--hw", "no-such", "llama2-7b", "-o", str(tmp_path)]) == 1
    assert re.match(r"^trimem roofline: error: unknown hardware preset 'no-such'",
                    capsys.readouterr().err)
