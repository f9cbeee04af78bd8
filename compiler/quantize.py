"""The quantize pass: float weights -> the integer formats of `trimem.numerics`.

Weights are W4 or W8 with two-level per-group scales (`quantize_weight`), activations A8 per
token (the RMSNORM and QUANT ops produce them at run time), the KV cache KV4 or KV8 per
(token, head) with groups along head_dim (`quantize_kv` at KV append). Optionally a
SmoothQuant migration (Xiao et al., arXiv:2211.10438) first moves activation outliers into
the weights: per input channel of every linear, folded into whatever produces that input (an
RMSNorm gamma, the rows of up before the SiLU-gated product, the rows of v before attention).
The pass only converts numbers: it never changes which ops run.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from trimem import numerics as nu
from trimem import special as sp
from trimem.compiler.ir import CompileError, Graph, OpKind, option
from trimem.compiler.frontend import prompt_ids

_SPEC = re.compile(r"w(\d+)(?:g(\d+))?a(\d+)kv(\d+)(?:g(\d+))?(?:h(\d+))?")
SMOOTH_MIN = 1e-5
"""Floor of the SmoothQuant per-channel statistics, so all-zero channels keep scale 1."""
SMOOTH_ALPHA = 0.5
"""SmoothQuant strength of every kind: the best of alphas 0.4 to 0.8 on SmolLM2-135M at
W8A8KV8 in top-1 agreement (docs/accuracy.md), and the SmoothQuant paper's default."""
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

class Calibration(NamedTuple):
    """Per input channel statistics of every linear's input over the calibration prompt.

    Members
    -------
    ids : the prompt's token ids.
    absmax : linear op name -> max over tokens of |X_j|, float64 [k] (SmoothQuant).
    norm : linear op name -> ||X_j||_2 over tokens, float64 [k] (Wanda).
    """
    ids: np.ndarray
    absmax: dict
    norm: dict


def calibration_ids(graph: Graph, calib_ids=None) -> np.ndarray:
    """The calibration prompt: `calib_ids` when given, else CALIB_TEXT in the tokenizer of the
    source model (`frontend.prompt_ids`), else CALIB_TOKENS fixed-seed random ids."""
    if calib_ids is None:
        calib_ids = prompt_ids(graph, CALIB_TEXT)
    if calib_ids is None:
        return np.random.default_rng(0).integers(graph.spec.vocab, size=CALIB_TOKENS)
    ids = np.asarray(calib_ids, dtype=np.int64)
    if ids.ndim != 1 or not ids.size or ids.min() < 0 or ids.max() >= graph.spec.vocab:
        raise CompileError(f"calibration ids {calib_ids!r} must be a non-empty 1-D sequence in "
                           f"[0, {graph.spec.vocab}), the model's vocab; pass calib_ids in it")
    return ids


def calibrate(graph: Graph, calib_ids=None) -> Calibration:
    """Statistics of every linear's input on the float graph over the calibration prompt.

    One torch float32 pass on the CPU. A graph that carries a Calibration of the same prompt
    in `meta["calibration"]` returns it instead: the sparsify pass leaves the statistics of the
    unpruned model there for the quantize pass, as both Wanda and SmoothQuant read them.
    """
    if graph.timing_only:
        raise CompileError("calibration needs weights; load the model with weights")
    ids = calibration_ids(graph, calib_ids)
    known = graph.meta.get("calibration")
    if known is not None and np.array_equal(known.ids, ids):
        return known
    absmax, norm = {}, {}
    for name, x in _linear_inputs(graph, ids):
        absmax[name] = x.abs().amax(0).double().numpy()
        norm[name] = x.double().norm(dim=0).numpy()
    return Calibration(ids, absmax, norm)


def _linear_inputs(graph, ids):
    """(linear op name, its float32 input [tokens, k]) in graph order, over one prompt at
    positions 0..M-1: the float function of `reference.float_forward`, in torch."""
    import torch
    import torch.nn.functional as F

    def weight(name):
        return torch.from_numpy(np.require(graph.weights[name], np.float32, ["W"]))

    rows, spec = len(ids), graph.spec
    angle = torch.arange(rows, dtype=torch.float64)[:, None] * torch.from_numpy(spec.inv_freq)
    cos, sin = (f(angle).float()[:, None, :] for f in (torch.cos, torch.sin))

    def rope(x, heads):
        x1, x2 = x.reshape(rows, heads, -1).chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).reshape(rows, -1)

    env = {"ids": torch.as_tensor(ids)}
    with torch.no_grad():
        for op in graph.ops:
            a, args = op.attrs, [env.get(n) for n in op.inputs]
            if op.kind in (OpKind.LINEAR, OpKind.LM_HEAD):
                yield op.name, args[0]
                if op.kind is OpKind.LM_HEAD:
                    return
                y = args[0] @ weight(a["weight"]).T
                y = y if a["bias"] is None else y + weight(a["bias"])
            elif op.kind is OpKind.EMBED:
                y = weight(a["weight"])[args[0]]
            elif op.kind is OpKind.RMSNORM:
                y = F.rms_norm(args[0], (a["n"],), weight(a["weight"]), a["eps"])
            elif op.kind is OpKind.ROPE:
                y = rope(args[0], a["heads"])
            elif op.kind is OpKind.KV_APPEND:
                y = tuple(x.reshape(rows, a["kv_heads"], -1).transpose(0, 1) for x in args[:2])
            elif op.kind is OpKind.ATTENTION:
                q = args[0].reshape(rows, a["heads"], -1).transpose(0, 1)
                k, v = (x.repeat_interleave(a["heads"] // a["kv_heads"], 0) for x in args[1])
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                y = y.transpose(0, 1).reshape(rows, -1)
            elif op.kind is OpKind.SILU_MUL:
                y = F.silu(args[0]) * args[1]
            elif op.kind is OpKind.ADD:
                y = args[0] + args[1]
            else:
                y = args[0]
            env[op.name] = y


# ---- SmoothQuant ---------------------------------------------------------------------------

SMOOTH_KINDS = ("qkv", "gate_up", "down", "o", "head")
"""The smoothed inputs, named by the linears reading them: q/k/v and gate/up (the scales fold
into the RMSNorm gamma before them), down (into the output rows of up: silu(gate) * up is
linear in up), o (into the output rows of v, one scale per KV-head channel, shared by the
query heads of its group) and the LM head (into the final RMSNorm gamma)."""


class _Pair(NamedTuple):
    """One smoothed value: the weight whose axis 0 takes 1/s and the linears whose columns
    take s."""
    kind: str
    producer: str
    bias: str | None
    users: list
    heads: tuple | None


def _pairs(graph):
    """Every smoothable value, found by tracing each linear's input back through QUANT."""
    ops = {op.name: op for op in graph.ops}
    readers: dict = {}
    for op in graph.linears():
        src = ops[op.inputs[0]]
        while src.kind is OpKind.QUANT:
            src = ops[src.inputs[0]]
        readers.setdefault(src.name, []).append(op)
    pairs = []
    for name, users in readers.items():
        src = ops[name]
        if src.kind is OpKind.RMSNORM:
            kind = {"attn": "qkv", "mlp": "gate_up"}.get(users[0].attrs["block"], "head")
            pairs.append(_Pair(kind, src.attrs["weight"], None, users, None))
        elif src.kind is OpKind.SILU_MUL:
            up = ops[src.inputs[1]]
            if up.kind is OpKind.LINEAR:
                pairs.append(_Pair("down", up.attrs["weight"], up.attrs["bias"], users, None))
        elif src.kind is OpKind.ATTENTION:
            v, a = ops[ops[src.inputs[1]].inputs[1]], src.attrs
            heads = (a["kv_heads"], a["heads"] // a["kv_heads"], a["head_dim"])
            if v.kind is OpKind.LINEAR:
                pairs.append(_Pair("o", v.attrs["weight"], v.attrs["bias"], users, heads))
    return pairs


def smooth_alphas(alpha) -> dict:
    """{kind: alpha} of a smoothing: one number for every kind of SMOOTH_KINDS, or a mapping
    from some of them to numbers (the others stay as they are)."""
    alphas = alpha if isinstance(alpha, dict) else dict.fromkeys(SMOOTH_KINDS, alpha)
    for kind, value in alphas.items():
        if kind not in SMOOTH_KINDS:
            raise CompileError(f"smooth kind {kind!r} is not one of {list(SMOOTH_KINDS)!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise CompileError(f"smooth alpha {value!r} must be a number in [0, 1]")
    return {kind: float(value) for kind, value in alphas.items()}


def _scale(pair, graph, calib, alpha):
    """(s over the producer's rows, s over the users' columns) of one pair."""
    act = np.maximum(calib.absmax[pair.users[0].name], SMOOTH_MIN)
    wmax = np.max([np.abs(graph.weights[op.attrs["weight"]]).max(axis=0)
                   for op in pair.users], axis=0)
    wmax = np.maximum(wmax, SMOOTH_MIN)
    if pair.heads is None:
        s = act**alpha / wmax ** (1 - alpha)
        return s, s
    kv_heads, rep, dim = pair.heads
    act, wmax = (x.reshape(kv_heads, rep, dim).max(axis=1) for x in (act, wmax))
    s = act**alpha / wmax ** (1 - alpha)
    return s.ravel(), np.broadcast_to(s[:, None, :], (kv_heads, rep, dim)).ravel()


def smooth(graph: Graph, alpha, calib_ids=None) -> Graph:
    """Migrate activation outliers into the weights, keeping the float function.

    For each smoothed value X (`SMOOTH_KINDS`) and the linears W reading it, per channel j:
    s_j = max|X_j|**alpha / max|W_:,j|**(1 - alpha) over the calibration prompt (`calibrate`),
    then W_:,j *= s_j and the producer of X divides its channel j by s_j. `alpha` is one
    number or a {kind: alpha} mapping (`smooth_alphas`). Every scale comes from the input
    graph, so the result does not depend on the order of the pairs. Returns a new graph;
    zeros of pruned weights stay zero.
    """
    alphas = smooth_alphas(alpha)
    if graph.timing_only:
        raise CompileError("smoothing needs weights and calibration; drop smooth_alpha for a "
                           "timing-only graph")
    calib = calibrate(graph, calib_ids)
    out = graph.clone()
    for pair in _pairs(graph):
        if pair.kind not in alphas:
            continue
        rows, cols = _scale(pair, graph, calib, alphas[pair.kind])
        for name in (pair.producer, pair.bias):
            if name is not None:
                w = np.asarray(out.weights[name], np.float64)
                out.weights[name] = w / rows.reshape((-1,) + (1,) * (w.ndim - 1))
        for op in pair.users:
            name = op.attrs["weight"]
            out.weights[name] = np.asarray(out.weights[name], np.float64) * cols[None, :]
    out.meta.pop("calibration", None)
    out.meta["smooth"] = {"alpha": alpha, "calib_tokens": len(calib.ids)}
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
    smoothing; a number or {kind: number} for `smooth`, e.g. SMOOTH_ALPHA) and "calib_ids"
    (calibration token ids, default `calibration_ids`). With a hardware config `cfg`, the
    weight bits must be among `cfg.fpga.weight_bits`.
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
