"""compare: Trimem against the float PyTorch model, its report and plots; the quality bars on
the real SmolLM2-135M."""
import json
import math

import numpy as np
import pytest

from trimem.compiler.quantize import SMOOTH_ALPHA
from trimem.host import compare as cmp
from trimem.host.session import Session

HW = "flightllm-u280"
BUCKETS = "prefill:16@64,decode:1@64"


class ByteTokenizer:
    """Characters to ids modulo the tiny vocabulary: enough to feed the tiny random models."""

    def __call__(self, text):
        return {"input_ids": [ord(c) % 256 for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(32 + i % 95) for i in ids)


PROMPTS = ("abc def", "hello there")
TEXT = "a short text to score"


@pytest.fixture(scope="module")
def report(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return cmp.compare(tiny_llama, HW, "w8a8kv8", backend="emulator", device="cpu",
                       prompts=PROMPTS, text=TEXT, new_tokens=4, buckets=BUCKETS,
                       tokenizer=ByteTokenizer(), out=out), out


@pytest.mark.unit
def test_report_covers_every_layer_and_measure(report):
    rep, _ = report
    assert rep["smooth_alpha"] == SMOOTH_ALPHA
    assert [layer["layer"] for layer in rep["layers"]] == [0, 1]
    assert all(0.9 < layer["cosine"] <= 1 for layer in rep["layers"])
    assert rep["top1_positions"] == sum(len(p) + 4 for p in PROMPTS)
    assert 0 <= rep["top1_agreement"] <= 1
    assert math.isfinite(rep["perplexity"]["float"]) and math.isfinite(
        rep["perplexity"]["trimem"])
    assert rep["speed"]["float"]["tokens_per_s"] > 0
    assert rep["speed"]["trimem"]["tokens_per_s"] > 0
    assert rep["speed"]["trimem"]["energy_per_token_j"] > 0


@pytest.mark.unit
def test_emulator_logits_are_checked_against_the_integer_reference(report):
    rep, _ = report
    assert rep["backend"] == "emulator" and rep["backend_matches_reference"] is True


@pytest.mark.unit
def test_report_files_are_written(report):
    rep, out = report
    assert json.loads((out / "report.json").read_text())["top1_agreement"] == \
        rep["top1_agreement"]
    md = (out / "report.md").read_text()
    assert md.startswith("# Trimem vs PyTorch") and "| 1 | " in md
    for name in ("layers.png", "speed.png", "engines.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.unit
def test_perplexity_is_the_exp_of_the_mean_negative_log_likelihood():
    logits = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]]))
    assert np.exp(cmp.nll(logits, [0, 1, 1]).mean()) == pytest.approx(
        math.exp(-(math.log(0.25) + math.log(0.8)) / 2))


@pytest.mark.unit
def test_first_diverging_layer_and_largest_drop():
    layers = [{"layer": i, "cosine": c} for i, c in enumerate((0.999, 0.995, 0.95, 0.94))]
    assert cmp._largest_drop(layers) == 2


@pytest.mark.unit
def test_cuda_without_a_gpu_names_the_fix(tiny_llama, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^device 'cuda' was asked for but torch sees no "
                                         r"CUDA GPU; use --device cpu"):
        cmp.float_model(tiny_llama, "cuda", "float32")


@pytest.mark.unit
def test_unknown_dtype_is_rejected(tiny_llama):
    with pytest.raises(ValueError, match=r"^dtype 'float8' is not one of "):
        cmp.float_model(tiny_llama, "cpu", "float8")


@pytest.mark.unit
def test_float_model_copy_leaves_the_cached_model_alone(tiny_llama):
    import torch

    copy = cmp.float_model(tiny_llama, "cpu", "bfloat16")
    assert copy.dtype == torch.bfloat16 and tiny_llama.dtype == torch.float32


# ---- the real model ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2():
    from trimem.host.session import load_source, load_tokenizer

    return load_source("smollm2-135m"), load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def w8a8kv8_report(smollm2):
    rep = cmp.compare("smollm2-135m", "trimem-all", "w8a8kv8", backend="torch", device="cpu",
                      buckets="prefill:64@128,decode:1@128", tokenizer=smollm2[1],
                      free_running=0)
    print(json.dumps({k: rep[k] for k in ("top1_agreement", "perplexity",
                                          "first_diverging_layer")}))
    return rep


@pytest.mark.e2e
@pytest.mark.slow
def test_w8a8kv8_dense_smollm2_stays_above_its_floor(w8a8kv8_report):
    """Below 0.90 top-1 or 5% more perplexity than the float model is a regression; SmoothQuant
    alphas 0.4 to 0.8 all measured 0.917 to 0.953 (docs/accuracy.md)."""
    assert w8a8kv8_report["top1_agreement"] >= 0.90
    assert w8a8kv8_report["perplexity"]["trimem"] < 1.05 * w8a8kv8_report["perplexity"]["float"]


@pytest.mark.e2e
@pytest.mark.slow
def test_w8a8kv8_dense_smollm2_agrees_with_float_pytorch(w8a8kv8_report):
    """The 95% top-1 bar of the host issue. Measured on the CPU against float32 PyTorch, with
    SmoothQuant alpha 0.5 on every linear input: 0.953 (183 of 192 positions), perplexity
    20.74 -> 20.78, last-layer hidden-state cosine 0.998; 0.880 without smoothing."""
    assert w8a8kv8_report["top1_agreement"] >= 0.95
    assert w8a8kv8_report["smooth_alpha"] == SMOOTH_ALPHA


@pytest.mark.e2e
@pytest.mark.slow
def test_w4a8kv4_sparse_smollm2_is_measured_per_layer(smollm2, tmp_path):
    """Measured on the CPU with SmoothQuant alpha 0.5: top-1 0.182, perplexity 20.74 ->
    209.5, hidden-state cosine 0.97 at layer 27 and -0.30 at layer 28; the float model pruned
    alike is at 0.406 (docs/accuracy.md)."""
    rep = cmp.compare("smollm2-135m", "trimem-all", "w4a8kv4", "2:4", backend="torch",
                      device="cpu", buckets="prefill:64@128,decode:1@128",
                      tokenizer=smollm2[1], out=tmp_path)
    print(json.dumps({k: rep[k] for k in ("top1_agreement", "perplexity",
                                          "first_diverging_layer", "largest_drop_layer")}))
    print("\n".join(f"layer {l['layer']}: cosine {l['cosine']:.4f}" for l in rep["layers"]))
    assert len(rep["layers"]) == 30 and (tmp_path / "report.md").is_file()
    assert all(math.isfinite(l["cosine"]) for l in rep["layers"])


@pytest.mark.e2e
@pytest.mark.slow
def test_exported_safetensors_model_loads_without_gguf(smollm2, tmp_path):
    from trimem.compiler.frontend import load_model

    out = cmp.export_hf("smollm2-135m", tmp_path / "hf", tokenizer=smollm2[1])
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    again = load_model(str(out))
    ids = [1, 504, 3575, 282]
    a, _ = cmp.float_pass(smollm2[0], ids)
    b, _ = cmp.float_pass(again, ids)
    np.testing.assert_array_equal(a, b)


@pytest.mark.e2e
@pytest.mark.slow
def test_backends_agree_bit_for_bit_on_smollm2(smollm2):
    emu = Session("smollm2-135m", "trimem-all", "w4a8kv4", "2:4", backend="emulator",
                  buckets="prefill:16@64,decode:1@64", tokenizer=smollm2[1])
    ref = Session("smollm2-135m", backend="torch", bundle=emu.bundle, device="cpu",
                  tokenizer=smollm2[1])
    ids = list(smollm2[1]("The capital of France is")["input_ids"])
    (a,), (b,) = (s.prefill(ids).logits.values() for s in (emu, ref))
    np.testing.assert_array_equal(a, b)
    for _ in range(2):
        (a,), (b,) = (s.decode_step().logits.values() for s in (emu, ref))
        np.testing.assert_array_equal(a, b)
