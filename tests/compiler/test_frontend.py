import numpy as np
import pytest
import torch

from trimem.compiler import frontend as fe
from trimem.compiler.ir import CompileError, Graph, OpKind, Step
from trimem.compiler.models import MODELS, list_models, model_config
from trimem.compiler.reference import float_forward, float_logits

pytestmark = pytest.mark.unit

OPS_PER_LAYER = 18


def tiny_dict(**overrides):
    """An HF-style config dict of the tiny model shape, for config-only checks."""
    return {"model_type": "llama", "hidden_act": "silu", "num_hidden_layers": 2,
            "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
            "intermediate_size": 128, "vocab_size": 256, "max_position_embeddings": 256,
            **overrides}


# ---- lowering --------------------------------------------------------------------------------

def test_tiny_llama_lowers_to_eighteen_ops_per_layer_plus_embed_norm_and_head(tiny_llama):
    graph = fe.from_hf(tiny_llama)
    assert len(graph.ops) == 2 * OPS_PER_LAYER + 3
    assert [op.kind for op in graph.ops[:2]] == [OpKind.EMBED, OpKind.RMSNORM]
    assert [op.kind for op in graph.ops[-2:]] == [OpKind.RMSNORM, OpKind.LM_HEAD]
    assert len({op.name for op in graph.ops}) == len(graph.ops)
    assert [op.layer for op in graph.ops].count(1) == OPS_PER_LAYER
    assert graph.step == Step(1, "decode", 256)


def test_linear_shapes_follow_heads_kv_heads_and_intermediate(tiny_llama):
    graph = fe.from_hf(tiny_llama, rows=5, phase="prefill", ctx=32)
    shapes = {op.name.split(".", 2)[-1]: (op.attrs["m"], op.attrs["n"], op.attrs["k"])
              for op in graph.linears() if op.layer == 0}
    assert shapes == {"attn.q": (5, 64, 64), "attn.k": (5, 32, 64), "attn.v": (5, 32, 64),
                      "attn.o": (5, 64, 64), "mlp.gate": (5, 128, 64),
                      "mlp.up": (5, 128, 64), "mlp.down": (5, 64, 128)}
    assert graph.op("lm_head").attrs["n"] == 256
    assert graph.values()["lm_head"].shape == (5, 256)
    assert graph.op("layers.1.attn.attention").attrs["ctx"] == 32


def test_qwen2_biases_are_carried_on_q_k_and_v_only(tiny_qwen2):
    graph = fe.from_hf(tiny_qwen2)
    biased = {op.name for op in graph.linears() if op.attrs["bias"] is not None}
    assert biased == {f"layers.{i}.attn.{r}" for i in range(2) for r in "qkv"}
    assert graph.spec.arch == "qwen2" and graph.spec.attention_bias
    np.testing.assert_array_equal(graph.weights["layers.1.attn.k.bias"],
                                  tiny_qwen2.model.layers[1].self_attn.k_proj.bias.detach())


def test_tied_embeddings_share_one_array_between_embed_and_lm_head(tiny_model):
    graph = fe.from_hf(tiny_model("llama", tie_word_embeddings=True))
    assert graph.weights["lm_head"] is graph.weights["embed"]
    assert graph.op("lm_head").attrs["tied"] is True


def test_untied_lm_head_keeps_its_own_weights(tiny_llama):
    graph = fe.from_hf(tiny_llama)
    assert not np.array_equal(graph.weights["lm_head"], graph.weights["embed"])


def test_mqa_model_lowers_with_one_kv_head(tiny_model):
    graph = fe.from_hf(tiny_model("llama", num_key_value_heads=1))
    kv = graph.op("layers.0.attn.kv").attrs
    assert (kv["kv_heads"], kv["head_dim"]) == (1, 16)
    assert graph.op("layers.0.attn.k").attrs["n"] == 16
    assert graph.spec.group_size == 4


@pytest.mark.parametrize("arch,overrides", [("llama", {}), ("qwen2", {}),
                                            ("llama", {"tie_word_embeddings": True}),
                                            ("llama", {"num_key_value_heads": 1})])
def test_lowered_graph_in_float_matches_the_transformers_model(tiny_model, arch, overrides):
    graph = fe.from_hf(tiny_model(arch, **overrides))
    ids = np.random.default_rng(3).integers(256, size=12)
    got, _ = float_forward(graph, ids)
    np.testing.assert_allclose(got, float_logits(graph, ids), atol=1e-4)


def test_printable_ir_has_a_header_and_one_line_per_op(tiny_llama):
    graph = fe.from_hf(tiny_llama)
    lines = str(graph).splitlines()
    assert lines[0].startswith("graph ") and lines[1].startswith("step decode rows=1")
    assert len(lines) == 2 + len(graph.ops)
    assert lines[4] == ("%layers.0.attn.q = LINEAR(%layers.0.attn_norm) m=1 n=64 k=64 "
                        "weight=layers.0.attn.q block=attn nm=1:1")


def test_local_checkpoint_directory_lowers_like_the_model_object(tiny_qwen2, tmp_path):
    tiny_qwen2.save_pretrained(tmp_path)
    graph = fe.load(tmp_path)
    want = fe.from_hf(tiny_qwen2)
    assert str(graph).splitlines()[2:] == str(want).splitlines()[2:]
    for name, w in want.weights.items():
        np.testing.assert_array_equal(graph.weights[name], w, err_msg=name)


def test_missing_checkpoint_path_is_rejected(tmp_path):
    with pytest.raises(CompileError, match=r"^model path '.*nowhere' is not a directory or "):
        fe.load(tmp_path / "nowhere")


# ---- rope ------------------------------------------------------------------------------------

def test_linear_rope_scaling_divides_the_frequencies():
    plain = fe.inv_freq(tiny_dict(), 16)
    scaled = fe.inv_freq(tiny_dict(rope_scaling={"rope_type": "linear", "factor": 4.0}), 16)
    np.testing.assert_allclose(scaled, plain / 4)
    np.testing.assert_allclose(plain, 10000.0 ** (-np.arange(0, 16, 2) / 16))


def test_llama3_rope_scaling_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
               "rope_theta": 500000.0}
    cfg = LlamaConfig(**{k: v for k, v in tiny_dict().items() if k != "model_type"},
                      rope_parameters=scaling)
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    got = fe.spec_from_config(cfg).inv_freq
    np.testing.assert_allclose(got, want.double().numpy(), rtol=1e-6)
    assert not np.allclose(got, fe.inv_freq(tiny_dict(rope_theta=500000.0), 16))


def test_unknown_rope_type_names_the_rope_op():
    with pytest.raises(CompileError, match=r"^op 'layers\.0\.attn\.rope_q' \(layer 0\): "
                                           r"rope_type 'yarn' is not supported"):
        fe.spec_from_config(tiny_dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}))


# ---- unsupported models ----------------------------------------------------------------------

def test_non_silu_activation_names_the_mlp_op_and_layer():
    with pytest.raises(CompileError, match=r"^op 'layers\.0\.mlp\.act' \(layer 0\): "
                                           r"activation 'gelu' is not supported; "):
        fe.spec_from_config(tiny_dict(hidden_act="gelu"))


def test_sliding_window_layer_is_rejected_with_its_layer():
    cfg = tiny_dict(model_type="qwen2", layer_types=["full_attention", "sliding_attention"])
    with pytest.raises(CompileError, match=r"^op 'layers\.1\.attn\.attention' \(layer 1\): "
                                           r"attention type 'sliding_attention'"):
        fe.spec_from_config(cfg)


def test_mistral_sliding_window_shorter_than_the_context_is_rejected():
    with pytest.raises(CompileError, match=r"^op 'layers\.0\.attn\.attention' \(layer 0\): "
                                           r"sliding-window attention \(sliding_window=64\)"):
        fe.spec_from_config(tiny_dict(model_type="mistral", sliding_window=64))


def test_mixture_of_experts_config_is_rejected():
    with pytest.raises(CompileError, match=r"^op 'layers\.0\.mlp' \(layer 0\): "
                                           r"mixture-of-experts MLP \(num_local_experts=8\)"):
        fe.spec_from_config(tiny_dict(num_local_experts=8))


def test_unknown_architecture_lists_the_supported_ones():
    with pytest.raises(CompileError, match=r"^model 'x': architecture 'gpt2' is not "
                                           r"supported; .*\('llama', 'qwen2', 'mistral'\)"):
        fe.spec_from_config(tiny_dict(model_type="gpt2"), "x")


def test_layernorm_in_a_layer_names_the_norm_op_and_layer(tiny_model):
    model = tiny_model("llama")
    model.model.layers[1].post_attention_layernorm = torch.nn.LayerNorm(64)
    with pytest.raises(CompileError, match=r"^op 'layers\.1\.mlp_norm' \(layer 1\): "
                                           r"normalization 'LayerNorm' is not supported"):
        fe.from_hf(model)


def test_extra_query_norm_parameter_names_the_attention_and_layer(tiny_model):
    model = tiny_model("llama")
    model.model.layers[1].self_attn.q_norm = torch.nn.Linear(16, 1, bias=False)
    with pytest.raises(CompileError, match=r"^op 'layers\.1\.attn' \(layer 1\): per-head "
                                           r"query/key normalization \('model\.layers\.1\."
                                           r"self_attn\.q_norm\.weight'\) is not supported"):
        fe.from_hf(model)


# ---- config-only graphs and known models -----------------------------------------------------

@pytest.mark.parametrize("name", list_models())
def test_every_known_config_lowers_to_a_timing_only_graph(name):
    graph = fe.from_config(name)
    cfg = MODELS[name]
    assert graph.timing_only and graph.spec.name == name
    assert len(graph.ops) == cfg["num_hidden_layers"] * OPS_PER_LAYER + 3
    assert graph.spec.kv_heads == cfg["num_key_value_heads"]
    assert graph.spec.hidden == cfg["hidden_size"]


def test_llama2_70b_has_gqa_eight_kv_heads_and_80_layers():
    spec = fe.from_config("llama2-70b", rows=16, phase="prefill", ctx=1024).spec
    assert (spec.layers, spec.heads, spec.kv_heads, spec.head_dim) == (80, 64, 8, 128)
    assert (spec.intermediate, spec.vocab, spec.max_ctx) == (28672, 32000, 4096)


def test_unknown_config_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"^unknown model 'llama9'; known configs: \["):
        model_config("llama9")


def test_context_bucket_beyond_the_model_is_rejected():
    with pytest.raises(CompileError, match=r"^context bucket 8192 exceeds the model's max_ctx "
                                           r"4096; "):
        fe.from_config("llama2-7b", ctx=8192)


def test_step_rejects_an_unknown_phase():
    with pytest.raises(CompileError, match=r"^step phase 'train' is not one of "):
        Step(1, "train", 16)


# ---- the IR spec check -----------------------------------------------------------------------

def _broken(graph, edit):
    graph = graph.clone()
    edit(graph.ops)
    return graph


def test_verify_rejects_an_input_used_before_it_is_defined():
    ops = fe.from_config(tiny_dict()).ops
    graph = fe.from_config(tiny_dict())
    bad = _broken(graph, lambda o: o.insert(1, o.pop(5)))
    with pytest.raises(CompileError, match=rf"^op '{ops[5].name}' \(layer 0\): input "
                                           r"'layers\.0\.attn\.q' is not defined before use"):
        bad.verify()


def test_verify_rejects_a_duplicate_op_name():
    graph = fe.from_config(tiny_dict())
    bad = _broken(graph, lambda o: setattr(o[3], "name", o[2].name))
    with pytest.raises(CompileError, match=r"^op 'layers\.0\.attn\.q' \(layer 0\): the name "
                                           r"is already defined"):
        bad.verify()


def test_verify_rejects_a_shape_that_disagrees_with_the_producer():
    graph = fe.from_config(tiny_dict())
    bad = _broken(graph, lambda o: o[2].attrs.update(k=32))
    with pytest.raises(CompileError, match=r"^op 'layers\.0\.attn\.q' \(layer 0\): input "
                                           r"'layers\.0\.attn_norm' has shape \(1, 64\), "
                                           r"expected \(1, 32\)"):
        bad.verify()


def test_verify_rejects_a_missing_attr_and_a_wrong_input_format():
    graph = fe.from_config(tiny_dict())
    with pytest.raises(CompileError, match=r"^op 'layers\.0\.attn\.rope_q' \(layer 0\): ROPE "
                                           r"is missing attrs \['heads'\]"):
        _broken(graph, lambda o: o[5].attrs.pop("heads")).verify()
    with pytest.raises(CompileError, match=r"^op 'layers\.0\.attn\.o' \(layer 0\): input "
                                           r"'layers\.0\.attn\.attention' is 'fx', expected "
                                           r"'a8'"):
        _broken(graph, lambda o: setattr(o[10], "inputs", (o[8].name,))).verify()


def test_verify_returns_the_graph_and_clone_shares_weight_arrays(tiny_llama):
    graph = fe.from_hf(tiny_llama)
    assert isinstance(graph.verify(), Graph)
    copy = graph.clone()
    assert copy.weights["embed"] is graph.weights["embed"]
    copy.ops[0].attrs["n"] = 1
    assert graph.ops[0].attrs["n"] == 64


# ---- the real SmolLM2-135M -------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.e2e
def test_smollm2_gguf_lowers_with_30_layers_gqa_and_tied_embeddings(smollm2_graph):
    graph = smollm2_graph
    spec = graph.spec
    assert (spec.layers, spec.hidden, spec.heads, spec.kv_heads) == (30, 576, 9, 3)
    assert (spec.head_dim, spec.intermediate, spec.vocab) == (64, 1536, 49152)
    assert spec.tied_embeddings and graph.weights["lm_head"] is graph.weights["embed"]
    assert len(graph.ops) == 30 * OPS_PER_LAYER + 3
    ids = [1, 504, 3458, 314, 260, 1135]
    got, _ = float_forward(graph, ids)
    want = float_logits(graph, ids)
    assert np.abs(got - want).max() < 1e-3 * np.abs(want).max()
