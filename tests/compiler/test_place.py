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


BOTH = {"neupims": "llama2-7b", "pim-gpt": "smollm2-135m", "trimem-all": "llama2-7b",
        "trimem-small": None}
"""The presets with both an MXU and PIM banks, and a model of the size each is built for
(None: the tiny LLaMA)."""


def quant_for(hw):
    return "w4a8kv4" if 4 in load_config(hw).fpga.weight_bits else "w8a8kv8"


@pytest.mark.parametrize("hw", BOTH)
def test_batch1_decode_linears_run_in_the_pim_banks(tiny_llama, hw):
    graph = placed(BOTH[hw] or tiny_llama, hw, rows=1, phase="decode", quant=quant_for(hw),
                   ctx=1024 if BOTH[hw] else 64)
    on_mxu = [op for op in graph.ops if op.kind is OpKind.LINEAR and op.engine != "PIM"]
    assert all(op.annotations["place"]["reason"].startswith("PIM banks full") for op in on_mxu)
    assert len(on_mxu) < len(graph.linears()) / 2
    note = graph.op("layers.0.mlp.up").annotations["place"]
    assert note["seconds"]["PIM"] <= note["seconds"]["MXU"]


@pytest.mark.parametrize("hw, source, rows", [("neupims", "llama2-7b", 512),
                                              ("neupims", "llama2-7b", 64),
                                              ("trimem-small", None, 64)])
def test_large_batch_gemms_run_on_the_mxu(tiny_llama, hw, source, rows):
    graph = placed(source or tiny_llama, hw, rows=rows, phase="prefill", ctx=max(rows, 64))
    assert engines(graph, OpKind.LINEAR) == {"MXU"}
    note = graph.op("layers.0.attn.q").annotations["place"]
    assert note["seconds"]["MXU"] < note["seconds"]["PIM"] or \
        place.traffic(graph.op("layers.0.attn.q"), "MXU") < \
        place.traffic(graph.op("layers.0.attn.q"), "PIM")


def test_neupims_turns_decode_linears_from_pim_to_the_mxu_as_the_batch_grows():
    chosen = {rows: placed("llama2-7b", "neupims", rows, "decode", ctx=1024)
              .op("layers.0.mlp.up").engine for rows in (1, 4, 16, 64)}
    assert chosen == {1: "PIM", 4: "PIM", 16: "MXU", 64: "MXU"}


def test_small_models_leave_the_pim_banks_once_their_inputs_outweigh_the_weights():
    chosen = {rows: placed("smollm2-135m", "trimem-all", rows, "decode", quant="w4a8kv4",
                           ctx=1024).op("layers.0.mlp.up").engine for rows in (1, 8)}
    assert chosen == {1: "PIM", 8: "MXU"}


@pytest.mark.parametrize("hw, model", [("pim-gpt", "smollm2-135m"), ("trimem-all", "llama2-7b")])
def test_pim_banks_whose_peak_exceeds_the_mxus_keep_even_large_batches(hw, model):
    cfg = load_config(hw)
    assert cfg.pim.peak_macs_per_s > 10 * cfg.fpga.peak_macs_per_s
    graph = placed(model, hw, rows=512, phase="prefill", quant=quant_for(hw), ctx=1024)
    assert engines(graph, OpKind.LINEAR) == {"PIM"}
    note = graph.op("layers.0.attn.q").annotations["place"]
    ratio = note["seconds"]["MXU"] / note["seconds"]["PIM"]
    assert ratio > 2 and note["reason"] == f"{ratio:.3g}x faster than MXU"


def test_roofline_time_is_the_slower_of_compute_and_weight_traffic():
    cfg = load_config("neupims")
    graph = placed("llama2-7b", cfg, rows=4, phase="decode", ctx=1024)
    op = graph.op("layers.0.mlp.up")
    m, n, k = 4, 11008, 4096
    weights = n * (k + k // 64 + 8)
    acts = m * (k + 4 + 4 * n)
    mxu = max(m * n * k / cfg.fpga.peak_macs_per_s, (weights + acts) / (cfg.fpga.hbm_gbps * 1e9))
    assert [len(t.channels) for t in place.pim_tiles(cfg, op)] == [32]
    pim = max(m * n * k / cfg.pim.peak_macs_per_s, m * weights / (cfg.pim.internal_gbps * 1e9),
              m * (32 * (k + 4) + 4 * n) / (cfg.pim.channel_gbps * 1e9))
    note = op.annotations["place"]
    assert note["seconds"] == pytest.approx({"MXU": mxu, "PIM": pim})
    assert note["ridge"] == pytest.approx({"MXU": cfg.fpga.ridge_op_per_byte,
                                           "PIM": cfg.pim.ridge_op_per_byte})
    assert op.engine == "PIM" and note["reason"] == f"{mxu / pim:.3g}x faster than MXU"


def test_equal_times_go_to_the_engine_that_moves_fewer_bytes(tiny_llama):
    cfg = load_config("trimem-small")
    assert cfg.pim.peak_macs_per_s == cfg.fpga.peak_macs_per_s
    for rows, phase, engine in ((1, "decode", "PIM"), (64, "prefill", "MXU")):
        op = placed(tiny_llama, cfg, rows=rows, phase=phase).linears()[0]
        note = op.annotations["place"]
        assert note["seconds"]["MXU"] == pytest.approx(note["seconds"]["PIM"])
        assert op.engine == engine
        assert note["reason"].startswith(f"ties {'MXU' if engine == 'PIM' else 'PIM'}, moves")


def test_gemv_stays_on_the_mxu_when_one_row_overflows_the_pim_global_buffer(tmp_path):
    hw = tmp_path / "small-gbuf.yaml"
    hw.write_text("name: small-gbuf\ndescription: neupims with 2 KiB global buffers\n"
                  "inherits: neupims\npim:\n  gbuf_bytes: 2048\n")
    graph = placed("llama2-7b", hw, rows=1, phase="decode", ctx=1024)
    note = graph.op("layers.0.attn.q").annotations["place"]
    assert graph.op("layers.0.attn.q").engine == "MXU"
    assert note["reason"] == "PIM unfit: one a8 row of k=4096 needs 4100 B of GBUF per " \
                             "channel but pim.gbuf_bytes is 2048"
    assert set(note["seconds"]) == set(note["ridge"]) == {"MXU"} and "PIM" in note["unfit"]
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


def test_overrides_win_over_the_roofline(tiny_llama):
    graph = placed(tiny_llama, "trimem-all", rows=1, phase="decode",
                   placement={"linear": "mxu", "attention": "vpu"})
    assert engines(graph, OpKind.LINEAR) == {"MXU"}
    assert engines(graph, OpKind.KV_APPEND) == {"VPU"} and graph.meta["kv_home"] == "HBM"
    assert graph.op("layers.1.attn.o").annotations["place"]["reason"] == "override"


@pytest.mark.parametrize("hw, rows, phase", [("neupims", 512, "prefill"),
                                              ("trimem-all", 1, "decode")])
def test_an_override_per_op_kind_wins_over_the_faster_engine(hw, rows, phase):
    auto = placed("llama2-7b", hw, rows=rows, phase=phase, ctx=1024)
    other = "pim" if engines(auto, OpKind.LINEAR) == {"MXU"} else "mxu"
    graph = placed("llama2-7b", hw, rows=rows, phase=phase, ctx=1024,
                   placement={"linear": other})
    assert engines(graph, OpKind.LINEAR) == {other.upper()}
    assert engines(graph, OpKind.LM_HEAD) == engines(auto, OpKind.LM_HEAD)


def test_placement_that_is_not_a_mapping_is_rejected(tiny_llama):
    with pytest.raises(CompileError, match=r"^placement 'linear=mxu' is not a dict of op kind "
                                           r"to engine; write e\.g\. \{'linear': 'mxu'\}$"):
        placed(tiny_llama, "trimem-all", 1, "decode", placement="linear=mxu")


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


def test_linears_beyond_the_pim_banks_capacity_go_to_the_mxu_and_say_why(tiny_llama, tmp_path):
    """trimem-small's banks hold a few of the tiny model's weights, not all: placement fills
    them in op order and the rest compiles on the MXU instead of overflowing a bank."""
    from trimem.compiler.pipeline import compile_model

    bundle = compile_model(tiny_llama, "trimem-small", layers=2, buckets="decode:1@16",
                           with_tests=False, out=tmp_path / "b")
    graph = placed(tiny_llama, "trimem-small", rows=1, phase="decode")
    notes = [op.annotations["place"] for op in graph.linears()]
    full = [n for n in notes if n["reason"].startswith("PIM banks full")]
    assert full and all(n["engine"] == "MXU" for n in full)
    assert any(n["engine"] == "PIM" for n in notes)
    assert bundle.entries
