from types import SimpleNamespace

import numpy as np
import pytest

from trimem import numerics as nu
from trimem.compiler import frontend as fe
from trimem.compiler import quantize as qz
from trimem.compiler import sparsify as spz
from trimem.compiler.ir import CompileError, OpKind
from trimem.compiler.reference import float_forward

pytestmark = pytest.mark.unit


def hardware(weight_bits=(4, 8), nm_patterns=((1, 1), (2, 4))):
    """The part of a hardware config these passes read."""
    return SimpleNamespace(fpga=SimpleNamespace(weight_bits=weight_bits, nm_patterns=nm_patterns))


def blocks_of(w, m):
    w = np.asarray(w)
    return w.reshape(w.shape[0], -1, m)


# ---- QuantSpec -------------------------------------------------------------------------------

@pytest.mark.parametrize("text,fields", [
    ("w4a8kv4", (4, 4, 64, 32, None)),
    ("w8a8kv8", (8, 8, 64, 32, None)),
    ("W8G128A8KV8G64", (8, 8, 128, 64, None)),
    ("w4a8kv4h8", (4, 4, 64, 32, 8)),
])
def test_quant_spec_parses_bits_groups_and_head_bits(text, fields):
    qs = qz.QuantSpec.parse(text)
    assert (qs.w_bits, qs.kv_bits, qs.w_group, qs.kv_group, qs.head_bits) == fields
    assert qz.QuantSpec.parse(str(qs)) == qs


@pytest.mark.parametrize("text", ["w4a8kv", "w4a8", "int4", "w4a8kv4g"])
def test_malformed_quant_spec_quotes_the_text_and_the_form(text):
    with pytest.raises(CompileError, match=rf"^quant spec '{text}' is not of the form w"):
        qz.QuantSpec.parse(text)


def test_unsupported_widths_name_the_field():
    with pytest.raises(CompileError, match=r"^quant w_bits 2 is not supported; use one of "):
        qz.QuantSpec.parse("w2a8kv4")
    with pytest.raises(CompileError, match=r"^quant a_bits 4 is not supported; activations "):
        qz.QuantSpec.parse("w4a4kv4")


# ---- the quantize pass -----------------------------------------------------------------------

def test_quantize_sets_bits_and_groups_and_fills_every_quantized_weight(tiny_qwen2):
    graph = qz.run(fe.from_hf(tiny_qwen2), None, {"quant": "w4a8kv8h8"})
    assert graph.quantized and graph.meta["quant"] == qz.QuantSpec.parse("w4a8kv8h8")
    for op in graph.ops:
        a = op.attrs
        if op.kind is OpKind.LINEAR:
            assert (a["bits"], a["group"]) == (4, 64)
            qw = graph.quant[a["weight"]]
            assert isinstance(qw, nu.QuantWeight) and qw.q.shape == (a["n"], a["k"])
        if op.kind is OpKind.LM_HEAD:
            assert graph.quant["lm_head"].bits == a["bits"] == 8
        if op.kind in (OpKind.KV_APPEND, OpKind.ATTENTION):
            assert (a["kv_bits"], a["kv_group"]) == (8, 16)
        if op.kind is OpKind.RMSNORM:
            assert a["eps_code"] == 168  # round(1e-5 * 2**24)
            assert graph.quant[a["weight"]].dtype == np.int32
    assert graph.quant["layers.0.attn.q.bias"].dtype == np.int32
    assert isinstance(graph.quant["embed"], qz.QuantEmbedding)


def test_quantized_weights_stay_close_to_the_float_weights(tiny_llama):
    graph = qz.run(fe.from_hf(tiny_llama), None, {"quant": "w8a8kv8"})
    w = graph.weights["layers.1.mlp.down"]
    err = nu.dequantize_weight(graph.quant["layers.1.mlp.down"]) - w
    assert np.abs(err).max() < 0.02 * np.abs(w).max()


def test_quantize_leaves_the_input_graph_unchanged(tiny_llama):
    graph = fe.from_hf(tiny_llama)
    qz.run(graph)
    assert not graph.quantized and not graph.quant
    assert "bits" not in graph.op("layers.0.attn.q").attrs


def test_quantizing_twice_is_rejected(tiny_llama):
    graph = qz.run(fe.from_hf(tiny_llama))
    with pytest.raises(CompileError, match=r"^graph is already quantized; run the quantize "):
        qz.run(graph)


def test_weight_group_that_does_not_divide_the_row_names_the_op():
    graph = fe.from_config({"model_type": "llama", "num_hidden_layers": 1, "hidden_size": 48,
                            "num_attention_heads": 4, "intermediate_size": 96,
                            "vocab_size": 64})
    with pytest.raises(CompileError, match=r"^op 'layers\.0\.attn\.q' \(layer 0\): weight "
                                           r"group 32 does not divide 48; .* e\.g\. 16$"):
        qz.run(graph, None, {"quant": "w4g32a8kv4"})


def test_weight_bits_outside_the_hardware_are_rejected(tiny_llama):
    with pytest.raises(CompileError, match=r"^quant w4g64a8kv4g32: weight bits 4 are not in "
                                           r"the hardware's fpga\.weight_bits \(8,\)"):
        qz.run(fe.from_hf(tiny_llama), hardware(weight_bits=(8,)))


def test_timing_only_graph_gets_attrs_but_no_data():
    graph = qz.run(fe.from_config("llama2-7b"), hardware(), {"quant": "w8a8kv4"})
    assert graph.quant == {} and graph.timing_only
    assert graph.op("layers.31.mlp.down").attrs["bits"] == 8
    assert graph.op("layers.0.attn.attention").attrs["kv_group"] == 32


# ---- calibration ----------------------------------------------------------------------------

def test_calibration_statistics_match_the_float64_forward_pass(tiny_qwen2):
    graph = fe.from_hf(tiny_qwen2)
    calib = qz.calibrate(graph, [5, 9, 200, 31, 7, 7, 64])
    ops = graph.linears()
    _, acts = float_forward(graph, calib.ids, capture=[op.inputs[0] for op in ops])
    assert sorted(calib.absmax) == sorted(calib.norm) == sorted(op.name for op in ops)
    for op in ops:
        x = acts[op.inputs[0]]
        np.testing.assert_allclose(calib.absmax[op.name], np.abs(x).max(axis=0), rtol=1e-4,
                                   atol=1e-5)
        np.testing.assert_allclose(calib.norm[op.name], np.linalg.norm(x, axis=0), rtol=1e-4,
                                   atol=1e-5)


def test_calibration_carried_by_the_graph_is_reused_for_the_same_prompt(tiny_llama):
    graph = fe.from_hf(tiny_llama)
    graph.meta["calibration"] = known = qz.calibrate(graph, [1, 2, 3])
    assert qz.calibrate(graph, [1, 2, 3]) is known
    assert qz.calibrate(graph, [1, 2, 4]) is not known


def test_calibrating_a_timing_only_graph_is_rejected():
    with pytest.raises(CompileError, match=r"^calibration needs weights; load the model with "):
        qz.calibrate(fe.from_config("llama2-7b"))


# ---- SmoothQuant -----------------------------------------------------------------------------

def test_smoothquant_of_every_kind_keeps_the_float_function(tiny_qwen2):
    graph = fe.from_hf(tiny_qwen2)
    ids = np.random.default_rng(5).integers(256, size=16)
    smooth = qz.smooth(graph, 0.5)
    before, _ = float_forward(graph, ids)
    after, _ = float_forward(smooth, ids)
    np.testing.assert_allclose(after, before, atol=1e-4 * np.abs(before).max())
    changed = [name for name in graph.weights if smooth.weights[name] is not graph.weights[name]]
    assert {"layers.1.attn.v.bias", "layers.1.mlp.up", "layers.0.attn.o", "norm",
            "lm_head"} <= set(changed) and "embed" not in changed
    assert smooth.meta["smooth"] == {"alpha": 0.5, "calib_tokens": qz.CALIB_TOKENS}
    assert "calibration" not in smooth.meta


def test_norm_smoothing_moves_the_scale_into_gamma(tiny_qwen2):
    graph = fe.from_hf(tiny_qwen2)
    smooth = qz.smooth(graph, {"gate_up": 0.5})
    scale = graph.weights["layers.0.mlp_norm"] / smooth.weights["layers.0.mlp_norm"]
    assert not np.allclose(scale, 1)
    for name in ("layers.0.mlp.up", "layers.0.mlp.gate"):
        np.testing.assert_allclose(smooth.weights[name], graph.weights[name] * scale, rtol=1e-6)
    assert smooth.weights["layers.0.attn_norm"] is graph.weights["layers.0.attn_norm"]


def test_down_smoothing_moves_the_scale_into_the_rows_of_up(tiny_llama):
    graph = fe.from_hf(tiny_llama)
    smooth = qz.smooth(graph, {"down": 0.5})
    scale = smooth.weights["layers.1.mlp.down"] / graph.weights["layers.1.mlp.down"]
    np.testing.assert_allclose(scale, scale[:1].repeat(len(scale), 0), rtol=1e-6)
    np.testing.assert_allclose(smooth.weights["layers.1.mlp.up"],
                               graph.weights["layers.1.mlp.up"] / scale[0][:, None], rtol=1e-6)
    assert smooth.weights["layers.1.mlp.gate"] is graph.weights["layers.1.mlp.gate"]


def test_o_smoothing_shares_one_scale_per_kv_channel_across_its_query_heads(tiny_llama):
    """4 query heads over 2 KV heads of 16: head h reads KV head h // 2."""
    graph = fe.from_hf(tiny_llama)
    smooth = qz.smooth(graph, {"o": 0.5})
    cols = (smooth.weights["layers.0.attn.o"] / graph.weights["layers.0.attn.o"])[0]
    rows = (graph.weights["layers.0.attn.v"] / smooth.weights["layers.0.attn.v"])[:, 0]
    np.testing.assert_allclose(cols.reshape(2, 2, 16), np.stack([rows.reshape(2, 16)] * 2, 1),
                               rtol=1e-6)
    assert not np.allclose(rows, 1)


def test_smoothing_through_the_pass_then_quantizes(tiny_llama):
    graph = qz.run(fe.from_hf(tiny_llama), None, {"smooth_alpha": 0.5, "calib_ids": [1, 2, 3]})
    assert graph.quantized and graph.meta["smooth"]["calib_tokens"] == 3


@pytest.mark.parametrize("alpha", [1.5, -0.1, "0.5", True, {"down": 2}])
def test_smooth_alpha_outside_zero_to_one_is_rejected(tiny_llama, alpha):
    with pytest.raises(CompileError, match=r"^smooth alpha .* must be a number in \[0, 1\]$"):
        qz.smooth(fe.from_hf(tiny_llama), alpha)


def test_unknown_smooth_kind_lists_the_kinds(tiny_llama):
    with pytest.raises(CompileError, match=r"^smooth kind 'mlp' is not one of \['qkv', "):
        qz.smooth(fe.from_hf(tiny_llama), {"mlp": 0.5})


# ---- N:M sparsity ----------------------------------------------------------------------------

def test_nm_pruning_keeps_exactly_n_of_every_m_in_the_selected_linears(tiny_llama):
    graph = spz.run(fe.from_hf(tiny_llama), hardware(), {"sparsity": "2:4"})
    for op in graph.linears():
        w = graph.weights[op.attrs["weight"]]
        if op.attrs["block"] == "mlp":
            assert op.attrs["nm"] == (2, 4)
            assert np.all(np.count_nonzero(blocks_of(w, 4), axis=-1) == 2)
        else:
            assert op.attrs["nm"] == (1, 1) and np.count_nonzero(w) == w.size


def test_pruned_then_quantized_weights_round_trip_through_nm_pack(tiny_llama):
    graph = spz.run(fe.from_hf(tiny_llama), None, {"sparsity": "2:4", "sparse_blocks": "all"})
    graph = qz.run(graph, None, {"quant": "w4a8kv4"})
    for op in graph.linears():
        if op.kind is OpKind.LM_HEAD:
            assert op.attrs["nm"] == (1, 1)
            continue
        q = graph.quant[op.attrs["weight"]].q
        assert np.all(np.count_nonzero(blocks_of(q, 4), axis=-1) <= 2)
        values, idx = nu.nm_pack(q, 2, 4)
        np.testing.assert_array_equal(nu.nm_unpack(values, idx, 2, 4, q.shape[1]), q)


def test_sparsify_after_quantize_is_rejected(tiny_llama):
    graph = qz.run(fe.from_hf(tiny_llama))
    with pytest.raises(CompileError, match=r"^sparsify must run before quantize: prune the "):
        spz.run(graph, None, {"sparsity": "2:4"})


def test_pattern_missing_from_the_hardware_is_rejected(tiny_llama):
    with pytest.raises(CompileError, match=r"^sparsity 1:4 is not in the hardware's "
                                           r"fpga\.nm_patterns"):
        spz.run(fe.from_hf(tiny_llama), hardware(), {"sparsity": "1:4"})


@pytest.mark.parametrize("value", ["2-4", (4, 2), "0:4"])
def test_malformed_pattern_is_rejected(value):
    with pytest.raises(CompileError, match=r"^sparsity .* is not an N:M pattern; write it as "):
        spz.parse_nm(value)


def test_row_length_not_a_multiple_of_m_names_the_op(tiny_llama):
    with pytest.raises(CompileError, match=r"^op 'layers\.0\.mlp\.gate' \(layer 0\): k=64 is "
                                           r"not a multiple of m=48"):
        spz.run(fe.from_hf(tiny_llama), None, {"sparsity": "2:48"})


def test_unknown_sparse_blocks_choice_lists_the_choices(tiny_llama):
    with pytest.raises(CompileError, match=r"^sparse_blocks 'ffn' is not one of \['all', "):
        spz.run(fe.from_hf(tiny_llama), None, {"sparsity": "2:4", "sparse_blocks": "ffn"})
