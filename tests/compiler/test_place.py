"""Placement: linears by arithmetic intensity against the ridge point, attention by KV home."""
import pytest

from trimem.compiler import frontend, place, quantize
from trimem.compiler.ir import CompileError, OpKind
from trimem.config import load_config

pytestmark = pytest.mark.unit


def placed(source, hw, rows, phase, quant="w8a8kv8", placement=None, ctx=64):
    """A timing-only graph of `source` (a tiny model or a known config name), placed."""
    if isinstance(source, str):
        graph = frontend.from_config(source, rows=rows, phase=phase, ctx=ctx)
    else:
        spec = frontend.spec_from_config(source.config)
        graph = frontend.lower(spec, None, rows=rows, phase=phase, ctx=ctx)
    cfg = load_config(hw)
    graph = quantize.run(graph, cfg, {"quant": quant})
    return place.run(graph, cfg, {"placement": placement})


def engines(graph, kind):
    return {op.engine for op in graph.ops if op.kind is kind}


@pytest.mark.parametrize("hw", ["neupims", "trimem-all"])
def test_batch1_decode_linears_run_in_the_pim_banks(tiny_llama, hw):
    graph = placed(tiny_llama, hw, rows=1, phase="decode")
    assert engines(graph, OpKind.LINEAR) == {"PIM"}
    op = graph.op("layers.0.mlp.up")
    assert op.annotations["place"]["op_b"] < op.annotations["place"]["ridge"]


@pytest.mark.parametrize("hw, rows", [("neupims", 512), ("trimem-all", 64)])
def test_large_batch_gemms_run_on_the_mxu(hw, rows):
    graph = placed("llama2-7b", hw, rows=rows, phase="prefill", ctx=1024)
    assert engines(graph, OpKind.LINEAR) == {"MXU"}
    note = graph.op("layers.0.attn.q").annotations["place"]
    assert note["op_b"] >= note["ridge"]


def test_gemv_stays_on_the_mxu_when_one_row_overflows_the_pim_global_buffer(tmp_path):
    hw = tmp_path / "small-gbuf.yaml"
    hw.write_text("name: small-gbuf\ndescription: neupims with 2 KiB global buffers\n"
                  "inherits: neupims\npim:\n  gbuf_bytes: 2048\n")
    graph = placed("llama2-7b", hw, rows=1, phase="decode", ctx=1024)
    note = graph.op("layers.0.attn.q").annotations["place"]
    assert graph.op("layers.0.attn.q").engine == "MXU"
    assert "needs 4100 B of GBUF per channel but pim.gbuf_bytes is 2048" in note["reason"]
    assert placed("llama2-7b", "neupims", 1, "decode", ctx=1024).op("layers.0.attn.q") \
        .engine == "PIM"


def test_machines_without_pim_run_every_linear_on_the_mxu(tiny_llama):
    graph = placed(tiny_llama, "flightllm-u280", rows=1, phase="decode")
    assert engines(graph, OpKind.LINEAR) == engines(graph, OpKind.LM_HEAD) == {"MXU"}


def test_attention_and_kv_append_run_in_the_drive_when_the_machine_has_a_csd(tiny_llama):
    graph = placed(tiny_llama, "trimem-all", rows=1, phase="decode")
    assert engines(graph, OpKind.ATTENTION) == engines(graph, OpKind.KV_APPEND) == {"CSD"}
    assert graph.meta["kv_home"] == "FLASH"
    plain = placed(tiny_llama, "flightllm-u280", rows=1, phase="decode")
    assert engines(plain, OpKind.ATTENTION) == {"VPU"} and plain.meta["kv_home"] == "HBM"


def test_overrides_win_over_the_ridge_rule(tiny_llama):
    graph = placed(tiny_llama, "trimem-all", rows=1, phase="decode",
                   placement={"linear": "mxu", "attention": "vpu"})
    assert engines(graph, OpKind.LINEAR) == {"MXU"}
    assert engines(graph, OpKind.KV_APPEND) == {"VPU"} and graph.meta["kv_home"] == "HBM"
    assert graph.op("layers.1.attn.o").annotations["place"]["reason"] == "override"


def test_unknown_override_key_is_rejected_with_its_name(tiny_llama):
    with pytest.raises(CompileError, match=r"^placement override 'mlp' names no op kind"):
        placed(tiny_llama, "trimem-all", 1, "decode", placement={"mlp": "pim"})


def test_override_to_an_engine_the_op_kind_cannot_use_is_rejected(tiny_llama):
    with pytest.raises(CompileError, match=r"^placement override attention='mxu': attention "
                                           r"runs on vpu or csd$"):
        placed(tiny_llama, "trimem-all", 1, "decode", placement={"attention": "mxu"})


def test_override_to_an_engine_the_machine_lacks_names_the_op(tiny_llama):
    with pytest.raises(CompileError, match=r"^op 'layers\.0\.attn\.q' \(layer 0\): placement "
                                           r"override puts it on PIM but the machine has no "
                                           r"pim section"):
        placed(tiny_llama, "flightllm-u280", 1, "decode", placement={"linear": "pim"})


def test_intensity_counts_weight_and_activation_bytes(tiny_llama):
    graph = placed(tiny_llama, "flightllm-u280", rows=4, phase="decode")
    op = graph.op("layers.0.mlp.up")
    m, n, k = 4, 128, 64
    weights = n * (k + k // 64 + 8)
    acts = m * (k + 4 + 4 * n)
    assert place.intensity(op) == pytest.approx(2 * m * n * k / (weights + acts))


def test_sparse_patterns_raise_the_ridge_point(tiny_llama):
    cfg = load_config("flightllm-u280")
    graph = placed(tiny_llama, "flightllm-u280", rows=1, phase="decode")
    op = graph.op("layers.0.mlp.up")
    dense = place.ridge(cfg, op)
    op.attrs["nm"] = (2, 4)
    assert place.ridge(cfg, op) == pytest.approx(2 * dense)
