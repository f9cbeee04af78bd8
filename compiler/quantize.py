"""The quantize pass: float weights -> the integer formats of `trimem.numerics`.

Weights are W4 or W8 with two-level per-group scales (`quantize_weight`), activations A8 per
token (the RMSNORM and QUANT ops produce them at run time), the KV cache KV4 or KV8 per
(token, head) with groups along head_dim (`quantize_kv` at KV append). Optionally a
SmoothQuant migration (Xiao et al., arXiv:2211.10438) first moves activation outliers into
the weights, folding per-input-channel scales into the preceding RMSNorm gamma. The pass only
converts numbers: it never changes which ops run.
"""
from __future__ import annotations

import functools
import math
import os
import re
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from trimem import numerics as nu
from trimem import special as sp
from trimem.compiler.ir import CompileError, Graph, OpKind, option
from trimem.compiler.reference import float_forward

_SPEC = re.compile(r"w(\d+)(?:g(\d+))?a(\d+)kv(\d+)(?:g(\d+))?(?:h(\d+))?")
SMOOTH_MIN = 1e-5
"""Floor of the SmoothQuant per-channel statistics, so all-zero channels keep scale 1."""
CALIB_TEXT = ("Rivers shape the land they cross. Over thousands of years, water carries sand "
              "and stone from the mountains to the sea, cutting valleys and building wide plains "
              "where farms and towns grow. People have always settled near rivers for fresh "
              "water, food and trade, and many of the oldest cities in the world stand on their "
              "banks. Today rivers also turn turbines that make electricity, and scientists "
              "study them to understand floods, droughts and the fish and birds that need them.")
"""The default calibration prompt, in the model's own tokenizer where it has one."""
CALIB_TOKENS = 32
"""Length of the fallback calibration prompt (fixed-seed random ids) without a tokenizer."""


@dataclass(frozen=True)
class QuantSpec:
    """Bit widths and group sizes of one quantization.

    Members
    -------
    w_bits : weight bits of the decoder linears, 4 or 8.
    kv_bits : KV cache bits, 4 or 8.
    w_group : input elements per weight group multiplier (clamped to the row length).
    kv_group : head_dim elements per KV group multiplier (clamped to head_dim).
    a_bits : activation bits; the hardware has int8 activations only.
    head_bits : LM head weight bits; None means w_bits.

    The text form is `w{bits}[g{group}]a8kv{bits}[g{group}][h{bits}]`, e.g. "w4a8kv4",
    "w8g128a8kv8g64" or "w4a8kv4h8".
    """
    w_bits: int = 4
    kv_bits: int = 4
    w_group: int = 64
    kv_group: int = 32
    a_bits: int = 8
    head_bits: int | None = None

    def __post_init__(self):
        for key in ("w_bits", "kv_bits") + (("head_bits",) if self.head_bits else ()):
            if getattr(self, key) not in nu.WEIGHT_BITS:
                raise CompileError(f"quant {key} {getattr(self, key)!r} is not supported; "
                                   f"use one of {nu.WEIGHT_BITS!r}")
        if self.a_bits != 8:
            raise CompileError(f"quant a_bits {self.a_bits!r} is not supported; activations "
                               "are int8 (a8)")
        for key in ("w_group", "kv_group"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise CompileError(f"quant {key} {value!r} must be a positive integer")

    @classmethod
    def parse(cls, text: str) -> QuantSpec:
        """QuantSpec from its text form, e.g. "w4a8kv4" or "w8g128a8kv8g64h8"."""
        match = _SPEC.fullmatch(text.strip().lower()) if isinstance(text, str) else None
        if match is None:
            raise CompileError(f"quant spec {text!r} is not of the form "
                               "w{4|8}[g<group>]a8kv{4|8}[g<group>][h{4|8}], e.g. 'w4a8kv4'")
        w, wg, a, kv, kvg, head = (None if g is None else int(g) for g in match.groups())
        fields = {"w_bits": w, "a_bits": a, "kv_bits": kv, "head_bits": head}
        if wg is not None:
            fields["w_group"] = wg
        if kvg is not None:
            fields["kv_group"] = kvg
        return cls(**fields)

    @classmethod
    def coerce(cls, value) -> QuantSpec:
        """A QuantSpec from a QuantSpec or its text form."""
        return value if isinstance(value, cls) else cls.parse(value)

    def __str__(self):
        head = f"h{self.head_bits}" if self.head_bits else ""
        return (f"w{self.w_bits}g{self.w_group}a{self.a_bits}"
                f"kv{self.kv_bits}g{self.kv_group}{head}")


DEFAULT = QuantSpec()
"""W4A8KV4, weight groups of 64, KV groups of 32."""


class QuantEmbedding(NamedTuple):
    """The int8 embedding table with one scale code per row (`numerics.quantize_embedding`)."""
    q: np.ndarray
    mant: np.ndarray
    exp: np.ndarray


# ---- calibration ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def _text_ids(folder: str):
    """CALIB_TEXT in the tokenizer stored in `folder` (a GGUF or tokenizer files), or None."""
    from transformers import AutoTokenizer

    gguf = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf[0] if gguf else None,
                                            local_files_only=True)
    except (OSError, ValueError):
        return None
    return tuple(tok(CALIB_TEXT)["input_ids"])


def calibration_ids(graph: Graph, calib_ids=None) -> np.ndarray:
    """The calibration prompt: `calib_ids` when given, else CALIB_TEXT in the tokenizer next to
    the source model, else CALIB_TOKENS fixed-seed random ids."""
    if calib_ids is None:
        source = graph.meta.get("source")
        folder = getattr(getattr(source, "config", None), "name_or_path", "") or ""
        calib_ids = _text_ids(os.path.abspath(folder)) if os.path.isdir(folder) else None
    if calib_ids is None:
        return np.random.default_rng(0).integers(graph.spec.vocab, size=CALIB_TOKENS)
    ids = np.asarray(calib_ids, dtype=np.int64)
    if ids.ndim != 1 or not ids.size or ids.min() < 0 or ids.max() >= graph.spec.vocab:
        raise CompileError(f"calibration ids {calib_ids!r} must be a non-empty 1-D sequence in "
                           f"[0, {graph.spec.vocab}), the model's vocab; pass calib_ids in it")
    return ids


def calibrate(graph: Graph, names, calib_ids=None):
    """(prompt ids, {value: float activations [tokens, n]}) of the float graph over the
    calibration prompt (`calibration_ids`), for the values in `names`."""
    ids = calibration_ids(graph, calib_ids)
    _, acts = float_forward(graph, ids, capture=list(dict.fromkeys(names)))
    return ids, acts


# ---- SmoothQuant ---------------------------------------------------------------------------

def _smoothed_pairs(graph):
    """(norm op, linears it feeds) for every RMSNorm inside a layer."""
    pairs = []
    for norm in graph.ops:
        if norm.kind is OpKind.RMSNORM and norm.layer is not None:
            users = [op for op in graph.ops if op.kind is OpKind.LINEAR
                     and op.inputs == (norm.name,)]
            pairs.append((norm, users))
    return pairs


def smooth(graph: Graph, alpha: float, calib_ids=None) -> Graph:
    """Migrate activation outliers into the weights, keeping the float function.

    For each in-layer RMSNorm and the linears it feeds, per input channel j:
    s_j = max|X_j|**alpha / max|W_:,j|**(1 - alpha) over the calibration prompt
    (`calibration_ids`), then gamma_j /= s_j and W_:,j *= s_j. The final norm is left alone
    (its linear may be the tied embedding). Returns a new graph; zeros of pruned weights stay
    zero.
    """
    if not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise CompileError(f"smooth alpha {alpha!r} must be a number in [0, 1]")
    if graph.timing_only:
        raise CompileError("smoothing needs weights and calibration; drop smooth_alpha for a "
                           "timing-only graph")
    pairs = _smoothed_pairs(graph)
    calib_ids, acts = calibrate(graph, [norm.name for norm, _ in pairs], calib_ids)
    out = graph.clone()
    for norm, users in pairs:
        act = np.maximum(np.abs(acts[norm.name]).max(axis=0), SMOOTH_MIN)
        mats = [np.asarray(graph.weights[op.attrs["weight"]], np.float64) for op in users]
        wmax = np.maximum(np.abs(np.concatenate(mats)).max(axis=0), SMOOTH_MIN)
        scale = act**alpha / wmax ** (1 - alpha)
        out.weights[norm.attrs["weight"]] = (np.asarray(graph.weights[norm.attrs["weight"]],
                                                        np.float64) / scale)
        for op, mat in zip(users, mats):
            out.weights[op.attrs["weight"]] = mat * scale[None, :]
    out.meta["smooth"] = {"alpha": float(alpha), "calib_tokens": len(calib_ids)}
    return out


# ---- the pass ------------------------------------------------------------------------------

def _group(op, group, length, what):
    """The group size used for rows of `length`: `group` clamped to the row, dividing it."""
    group = min(group, length)
    if length % group:
        raise CompileError(f"{op.where}: {what} group {group!r} does not divide {length!r}; "
                           f"pick a group size that divides it, e.g. {math.gcd(group, length)!r}")
    return group


def _set_attrs(op, qs):
    a = op.attrs
    if op.kind is OpKind.RMSNORM:
        a["eps_code"] = sp.quantize_eps(a["eps"])
    elif op.kind in (OpKind.LINEAR, OpKind.LM_HEAD):
        head = op.kind is OpKind.LM_HEAD and qs.head_bits
        a["bits"] = qs.head_bits if head else qs.w_bits
        a["group"] = _group(op, qs.w_group, a["k"], "weight")
    elif op.kind in (OpKind.KV_APPEND, OpKind.ATTENTION):
        a["kv_bits"] = qs.kv_bits
        a["kv_group"] = _group(op, qs.kv_group, a["head_dim"], "KV")


def _quantize_data(graph):
    """graph.quant from the float weights, by weight name."""
    for op in graph.ops:
        a = op.attrs
        if op.kind is OpKind.EMBED:
            graph.quant[a["weight"]] = QuantEmbedding(*nu.quantize_embedding(
                graph.weights[a["weight"]]))
        elif op.kind is OpKind.RMSNORM:
            graph.quant[a["weight"]] = sp.quantize_gamma(graph.weights[a["weight"]])
        elif op.kind in (OpKind.LINEAR, OpKind.LM_HEAD):
            try:
                graph.quant[a["weight"]] = nu.quantize_weight(graph.weights[a["weight"]],
                                                              a["bits"], a["group"])
            except ValueError as err:
                raise CompileError(f"{op.where}: {err}") from err
            if a["bias"] is not None:
                graph.quant[a["bias"]] = nu.to_fx(graph.weights[a["bias"]])


def run(graph: Graph, cfg=None, options=None) -> Graph:
    """Quantize a graph; returns a new, verified graph with `quantized` set.

    Options: "quant" (QuantSpec or text, default "w4a8kv4"), "smooth_alpha" (None = no
    smoothing, typically 0.5) and "calib_ids" (calibration token ids, default
    `calibration_ids`). With a hardware config `cfg`, the weight bits must be among
    `cfg.fpga.weight_bits`.
    """
    qs = QuantSpec.coerce(option(options, "quant", DEFAULT))
    if graph.quantized:
        raise CompileError("graph is already quantized; run the quantize pass once")
    if cfg is not None:
        for bits in {qs.w_bits, qs.head_bits or qs.w_bits}:
            if bits not in cfg.fpga.weight_bits:
                raise CompileError(f"quant {qs}: weight bits {bits!r} are not in the hardware's "
                                   f"fpga.weight_bits {cfg.fpga.weight_bits!r}; pick another "
                                   "spec or preset")
    alpha = option(options, "smooth_alpha", None)
    if alpha is not None:
        graph = smooth(graph, alpha, option(options, "calib_ids", None))
    else:
        graph = graph.clone()
    for op in graph.ops:
        _set_attrs(op, qs)
    if not graph.timing_only:
        _quantize_data(graph)
    graph.quantized = True
    graph.meta["quant"] = qs
    return graph.verify()
