"""Known model shapes as Hugging Face style config dicts (no weights), for timing-only compiles.

Each entry carries the fields of the model's published `config.json` that the frontend reads;
`trimem.compiler.frontend.from_config` lowers them like a loaded model without weights.
"""
from __future__ import annotations

import copy

_LLAMA2 = {"model_type": "llama", "hidden_act": "silu", "vocab_size": 32000,
           "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
           "tie_word_embeddings": False}
_LLAMA3 = {"model_type": "llama", "hidden_act": "silu", "vocab_size": 128256,
           "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
           "rope_theta": 500000.0, "tie_word_embeddings": False}
_SMOLLM2 = {"model_type": "llama", "hidden_act": "silu", "vocab_size": 49152,
            "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
            "tie_word_embeddings": True}

MODELS = {
    # Touvron et al., "Llama 2", arXiv:2307.09288, Table 1; meta-llama/Llama-2-*-hf config.json
    "llama2-7b": {**_LLAMA2, "hidden_size": 4096, "intermediate_size": 11008,
                  "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32},
    "llama2-13b": {**_LLAMA2, "hidden_size": 5120, "intermediate_size": 13824,
                   "num_hidden_layers": 40, "num_attention_heads": 40,
                   "num_key_value_heads": 40},
    "llama2-70b": {**_LLAMA2, "hidden_size": 8192, "intermediate_size": 28672,
                   "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8},
    # meta-llama/Meta-Llama-3-8B and Llama-3.1-8B config.json (3.1 adds llama3 RoPE scaling)
    "llama3-8b": {**_LLAMA3, "max_position_embeddings": 8192},
    "llama3.1-8b": {**_LLAMA3, "max_position_embeddings": 131072,
                    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 8192}},
    # TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T config.json
    "tinyllama-1.1b": {**_LLAMA2, "hidden_size": 2048, "intermediate_size": 5632,
                       "num_hidden_layers": 22, "num_attention_heads": 32,
                       "num_key_value_heads": 4, "max_position_embeddings": 2048},
    # HuggingFaceTB/SmolLM2-135M and -360M config.json
    "smollm2-135m": {**_SMOLLM2, "hidden_size": 576, "intermediate_size": 1536,
                     "num_hidden_layers": 30, "num_attention_heads": 9,
                     "num_key_value_heads": 3},
    "smollm2-360m": {**_SMOLLM2, "hidden_size": 960, "intermediate_size": 2560,
                     "num_hidden_layers": 32, "num_attention_heads": 15,
                     "num_key_value_heads": 5},
    # Qwen/Qwen2-0.5B config.json: q, k, v biases, tied embeddings
    "qwen2-0.5b": {"model_type": "qwen2", "hidden_act": "silu", "vocab_size": 151936,
                   "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                   "num_attention_heads": 14, "num_key_value_heads": 2,
                   "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
                   "rope_theta": 1000000.0, "tie_word_embeddings": True,
                   "use_sliding_window": False},
}
"""Known configs by name: HF config.json fields, enough to build a ModelSpec."""


def list_models() -> list:
    """Names of the known configs, sorted."""
    return sorted(MODELS)


def model_config(name: str) -> dict:
    """A fresh copy of the known config `name`; ValueError listing the names otherwise."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known configs: {list_models()!r}, or pass a "
                         "model directory or a .gguf file")
    return copy.deepcopy(MODELS[name])
