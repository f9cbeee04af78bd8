import os

import numpy as np
import pytest
import torch

from trimem import numerics as nu
from trimem.compiler import frontend as fe
from trimem.compiler import quantize as qz
from trimem.compiler import sparsify as spz
from trimem.compiler.ir import CompileError
from trimem.compiler.reference import Reference, cosine, float_forward, float_logits

pytestmark = pytest.mark.unit

PROMPT = np.random.default_rng(1).integers(256, size=24)
"""A held-out prompt for the tiny models; their default calibration is other random ids."""
OUTLIERS = (3, 17, 40)
LOUDNESS = 8.0


def blocks_of(w, m):
    w = np.asarray(w)
    return w.reshape(w.shape[0], -1, m)


def with_outlier_channels(model, loudness=LOUDNESS):
    """`model` with hidden channels OUTLIERS amplified `loudness` times by every norm gamma, the
    few loud activation channels real LLMs have (Dettmers et al., "LLM.int8()",
    arXiv:2208.07339) and random weights lack."""
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[list(OUTLIERS)] *= loudness
    return model


# ---- the score -------------------------------------------------------------------------------

def test_wanda_keeps_small_weights_on_loud_channels_where_magnitude_keeps_large_ones():
    w = np.array([[1.0, 0.9, 0.2, 0.1], [-0.3, 0.5, -0.06, 0.4]])
    x_norm = np.array([1.0, 1.0, 10.0, 20.0])
    np.testing.assert_array_equal(spz.prune(w, 2, 4) != 0, [[1, 1, 0, 0], [0, 1, 0, 1]])
    np.testing.assert_array_equal(spz.prune(w, 2, 4, x_norm),
                                  [[0, 0, 0.2, 0.1], [0, 0, -0.06, 0.4]])


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8)])
def test_wanda_keeps_exactly_n_of_every_m_in_the_selected_linears(tiny_llama, nm):
    graph = spz.run(fe.from_hf(tiny_llama), None, {"sparsity": nm})
    for op in graph.linears():
        w = graph.weights[op.attrs["weight"]]
        if op.attrs["block"] == "mlp":
            assert op.attrs["nm"] == nm
            assert np.all(np.count_nonzero(blocks_of(w, nm[1]), axis=-1) == nm[0])
        else:
            assert op.attrs["nm"] == (1, 1) and np.count_nonzero(w) == w.size


def test_wanda_scores_each_weight_by_its_input_channel_norm_over_the_calibration_prompt(
        tiny_llama):
    graph = fe.from_hf(tiny_llama)
    calib = [5, 9, 200, 31, 7, 7, 64]
    pruned = spz.run(graph, None, {"sparsity": "2:4", "calib_ids": calib})
    _, acts = float_forward(graph, calib, capture=["layers.1.mlp_norm", "layers.1.mlp.act"])
    for name, value in (("layers.1.mlp.up", "layers.1.mlp_norm"),
                        ("layers.1.mlp.down", "layers.1.mlp.act")):
        norm = np.sqrt((acts[value] ** 2).sum(axis=0))
        want = spz.prune(graph.weights[name], 2, 4, norm)
        np.testing.assert_array_equal(pruned.weights[name], want)
        assert not np.array_equal(want, spz.prune(graph.weights[name], 2, 4))
    assert pruned.meta["sparsity"] == {"nm": (2, 4), "blocks": "mlp", "metric": "wanda",
                                       "calib_tokens": len(calib)}


def test_wanda_keeps_the_weights_of_loud_input_channels_in_nearly_every_row(tiny_model):
    """Measured: wanda keeps 380 of the 384 loud weights (the 4 others are 100x smaller than
    their neighbours), magnitude about half."""
    graph = fe.from_hf(with_outlier_channels(tiny_model("llama"), loudness=100.0))
    wanda = spz.run(graph, None, {"sparsity": "2:4"}).weights["layers.0.mlp.gate"]
    magnitude = spz.run(graph, None, {"sparsity": "2:4", "prune_metric": "magnitude"}
                        ).weights["layers.0.mlp.gate"]
    loud = list(OUTLIERS)
    assert np.mean(wanda[:, loud] != 0) > 0.97
    assert np.mean(magnitude[:, loud] != 0) < 0.6


def test_without_a_tokenizer_wanda_calibrates_on_fixed_seed_random_ids(tiny_llama):
    graph = fe.from_hf(tiny_llama)
    ids = qz.calibration_ids(graph)
    assert len(ids) == qz.CALIB_TOKENS and ids.max() < 256
    a, b = (spz.run(graph, None, {"sparsity": "2:4"}) for _ in range(2))
    np.testing.assert_array_equal(a.weights["layers.0.mlp.down"], b.weights["layers.0.mlp.down"])
    assert a.meta["sparsity"]["calib_tokens"] == qz.CALIB_TOKENS


def test_wanda_leaves_its_calibration_for_smoothquant_to_reuse(tiny_llama, monkeypatch):
    passes = []
    forward = qz._linear_inputs
    monkeypatch.setattr(qz, "_linear_inputs",
                        lambda graph, ids: passes.append(len(ids)) or forward(graph, ids))
    pruned = spz.run(fe.from_hf(tiny_llama), None, {"sparsity": "2:4", "calib_ids": [1, 2, 3]})
    assert pruned.meta["calibration"].ids.tolist() == [1, 2, 3]
    qz.run(pruned, None, {"smooth_alpha": 0.5, "calib_ids": [1, 2, 3]})
    assert passes == [3]


# ---- magnitude -------------------------------------------------------------------------------

def test_magnitude_metric_keeps_the_largest_magnitudes(tiny_llama):
    graph = fe.from_hf(tiny_llama)
    w = blocks_of(graph.weights["layers.0.attn.v"], 4)
    pruned = spz.run(graph, None, {"sparsity": (2, 4), "sparse_blocks": "attn",
                                   "prune_metric": "magnitude"})
    kept = blocks_of(pruned.weights["layers.0.attn.v"], 4)
    kept_min = np.where(kept != 0, np.abs(w), np.inf).min(axis=-1)
    dropped_max = np.where(kept == 0, np.abs(w), -np.inf).max(axis=-1)
    assert np.all(kept_min >= dropped_max)
    assert pruned.meta["sparsity"] == {"nm": (2, 4), "blocks": "attn", "metric": "magnitude"}


# ---- accuracy --------------------------------------------------------------------------------

def test_wanda_pruned_model_stays_closer_to_the_float_model_than_magnitude(tiny_model):
    """Measured on the tiny LLaMA (seed 0) with loud channels, 2:4 on the MLP, float64:
    logits cosine wanda 0.884, magnitude 0.796."""
    graph = fe.from_hf(with_outlier_channels(tiny_model("llama")))
    want, _ = float_forward(graph, PROMPT)
    got = {metric: cosine(float_forward(spz.run(graph, None, {"sparsity": "2:4",
                                                                "prune_metric": metric}),
                                        PROMPT)[0], want)
           for metric in spz.METRICS}
    assert got["wanda"] > got["magnitude"] + 0.05, got


# ---- options ---------------------------------------------------------------------------------

def test_unknown_prune_metric_lists_the_metrics(tiny_llama):
    with pytest.raises(CompileError, match=r"^prune_metric 'l2' is not one of \['wanda', "
                                           r"'magnitude'\]$"):
        spz.run(fe.from_hf(tiny_llama), None, {"sparsity": "2:4", "prune_metric": "l2"})


@pytest.mark.parametrize("calib", [[3, 256], [], [[1, 2]]])
def test_calibration_ids_outside_the_vocab_are_rejected(tiny_llama, calib):
    with pytest.raises(CompileError, match=r"^calibration ids .* must be a non-empty 1-D "
                                           r"sequence in \[0, 256\), the model's vocab"):
        spz.run(fe.from_hf(tiny_llama), None, {"sparsity": "2:4", "calib_ids": calib})


def test_timing_only_graph_gets_the_pattern_without_calibration():
    graph = spz.run(fe.from_config("llama2-7b"), None, {"sparsity": "2:4"})
    assert graph.op("layers.31.mlp.down").attrs["nm"] == (2, 4)
    assert graph.meta["sparsity"] == {"nm": (2, 4), "blocks": "mlp", "metric": "wanda"}


def test_dense_sparsity_leaves_the_weights_alone(tiny_llama):
    graph = fe.from_hf(tiny_llama)
    dense = spz.run(graph, None, {"sparsity": None})
    assert dense.weights["layers.0.mlp.up"] is graph.weights["layers.0.mlp.up"]
    assert "sparsity" not in dense.meta


# ---- the real SmolLM2-135M -------------------------------------------------------------------

SENTENCE = [504, 3575, 282, 4649, 314, 7042, 30, 378, 3575, 282, 4521, 314, 11452, 30, 378,
            3575, 282, 7158, 314]
"""SmolLM2 token ids of "The capital of France is Paris. The capital of Germany is Berlin.
The capital of Italy is"."""


@pytest.mark.slow
@pytest.mark.e2e
def test_smollm2_wanda_2_4_mlp_beats_magnitude_at_w8a8kv8(smollm2_graph):
    """Measured (benchmarks/bench_accuracy.py): logits cosine magnitude 0.462, wanda 0.576;
    top-1 agreement 5/19 and 13/19; calibration on CALIB_TEXT in the GGUF's tokenizer."""
    from transformers import AutoTokenizer

    graph = smollm2_graph
    folder, gguf = os.path.split(fe.smollm2_gguf())
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf, local_files_only=True)
    np.testing.assert_array_equal(qz.calibration_ids(graph), tok(qz.CALIB_TEXT)["input_ids"])
    want = float_logits(graph, SENTENCE)
    got = {}
    for metric in spz.METRICS:
        pruned = spz.run(graph, None, {"sparsity": "2:4", "prune_metric": metric})
        ref = Reference(qz.run(pruned, None, {"quant": "w8a8kv8"}))
        logits = nu.from_fx(np.asarray(ref.step(SENTENCE, np.arange(len(SENTENCE))).logits))
        got[metric] = (cosine(logits, want), np.sum(logits.argmax(-1) == want.argmax(-1)))
    assert got["wanda"][0] > got["magnitude"][0] + 0.05, got
    assert got["wanda"][1] >= got["magnitude"][1] + 5, got
