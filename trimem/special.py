"""Fixed-point special functions and attention: the golden VPU and CSD arithmetic.

Exp, softmax with its online (split-K) pieces, RMSNorm with an integer rsqrt, SiLU, RoPE,
the saturating residual add and causal GQA attention over a quantized KV cache. Every
runtime function is integer-only and written once against `trimem.xp`, so numpy and torch
(CPU or CUDA) give the same bits. Formulas, roundings and overflow bounds: `docs/special.md`.
Float math appears only in the compile-time table builders, whose outputs are integers.
"""
from __future__ import annotations

import math

import numpy as np

from trimem.numerics import (ACT_FRAC, ACT_QMAX, INT32_MAX, INT32_MIN, _require_int,
                             effective_weight, encode_requant, kv_dequant, kv_levels,
                             quantize_act, rshift_round, sat, wrap32)
from trimem.xp import namespace

# ---- formats -------------------------------------------------------------------------------

EXP_FRAC = 15
"""exp_fx output is Q0.EXP_FRAC: 1.0 = 2**EXP_FRAC, exactly at x = 0."""
EXP_LUT_BITS = 10
"""Fraction bits of -x * log2(e) that index the 2**-f table (1024 entries of 18 bits)."""
EXP_LUT_GUARD = 2
"""Extra fraction bits of the table entries beyond EXP_FRAC."""
LOG2E_SHIFT = 20
LOG2E_MULT = round(2**LOG2E_SHIFT / math.log(2))
"""log2(e) as LOG2E_MULT / 2**LOG2E_SHIFT."""
EXP_INPUT_MIN = -(16 << ACT_FRAC)
"""exp_fx clamps its fx input to >= -16.0; the output is already 0 below -11.8."""
PROB_FRAC = 30
"""Probabilities and merge weights are Q0.PROB_FRAC; a row sums to 2**PROB_FRAC up to rounding."""
SIGMOID_FRAC = 16
"""The sigmoid inside SiLU is Q0.SIGMOID_FRAC."""
GAMMA_FRAC = 16
"""RMSNorm gamma is int32 Q15.GAMMA_FRAC: |gamma| < 2**15."""
EPS_FRAC = 2 * ACT_FRAC
"""RMSNorm epsilon is an integer in units of 2**-EPS_FRAC (the square of the fx unit)."""
EPS_MAX = INT32_MAX
RMS_IN_BITS = 15
"""RMSNorm shifts each row so that max |x| lies in [2**14, 2**15] before squaring."""
RSQRT_BITS = 30
"""rsqrt normalises the mean square to m in [2**(RSQRT_BITS-2), 2**RSQRT_BITS] and returns
floor(2**RSQRT_BITS / sqrt(m)), a 16- or 17-bit integer."""
ROPE_FRAC = 14
"""RoPE cos/sin tables are int16 Q1.ROPE_FRAC."""
LOGIT_PRESHIFT = 9
"""Attention drops this many bits of s * mant_q * mant_k before the softmax-scale multiply."""
MAX_CONTEXT_BITS = 17
MAX_CONTEXT = 1 << MAX_CONTEXT_BITS
"""Longest KV sequence attention accepts: the overflow bounds in docs/special.md assume it."""
MAX_HEAD_DIM = 256
"""Largest head_dim attention accepts: scores then stay below 2**26."""
SUM_MAX = MAX_CONTEXT << EXP_FRAC
"""Largest softmax denominator l: MAX_CONTEXT tokens of weight 1.0."""

_LIMB_BITS = 16  # values enter P @ V as 16-bit limbs so each float64 GEMM on CUDA stays exact
_SQRT_STEPS = RSQRT_BITS // 2 + 2  # bits of isqrt(n) for the n <= 2**(RSQRT_BITS + 2) it sees


def _exp_lut():
    """round(2**(EXP_FRAC + EXP_LUT_GUARD - k / 2**EXP_LUT_BITS)) for each table index k."""
    k = np.arange(1 << EXP_LUT_BITS, dtype=np.float64)
    power = EXP_FRAC + EXP_LUT_GUARD - k / (1 << EXP_LUT_BITS)
    return np.floor(np.exp2(power) + 0.5).astype(np.int32)


EXP_LUT = _exp_lut()
"""int32 [2**EXP_LUT_BITS]: the 2**-f table of exp_fx, strictly decreasing, EXP_LUT[0] = 2**17."""


# ---- helpers -------------------------------------------------------------------------------

def _div_round(a, b):
    """a / b rounded half up, for a >= 0 and b >= 1 (int64)."""
    return (a + (b >> 1)) // b


def _on(xp, table, like):
    """A compile-time table as an array of like's kind and device."""
    return xp.asarray(table, device=like.device)


def _is_bool(x):
    return str(getattr(x, "dtype", "")) in ("bool", "torch.bool")


def _shift_sat32(v, s):
    """sat32(v / 2**s) rounded half up, for int64 |v| < 2**62 and any shift s (left if < 0).

    A left shift could leave int64, so v is first clamped to +-2**31: any value beyond that
    saturates after a left shift anyway, and 2**31 << 31 still fits.
    """
    xp = namespace(v, s)
    v = xp.where(s < 0, xp.clip(v, INT32_MIN, -INT32_MIN), v)
    return sat(rshift_round(v, xp.maximum(s, -31)), 32)


def _isqrt(n):
    """floor(sqrt(n)) of int64 0 <= n < 2**34, one result bit per step (restoring square root)."""
    xp = namespace(n)
    root = n * 0
    for bit in reversed(range(_SQRT_STEPS)):
        trial = root + (1 << bit)
        root = xp.where(trial * trial <= n, trial, root)
    return root


def _valid(logits, mask, lengths):
    """The bool mask of valid positions of logits [..., T] from a mask, lengths or neither."""
    xp = namespace(logits)
    t_len = logits.shape[-1]
    if mask is not None and lengths is not None:
        raise ValueError("give mask or lengths, not both")
    if mask is not None:
        if not _is_bool(mask):
            raise TypeError(f"mask must be a bool array, got {getattr(mask, 'dtype', mask)!r}")
        return mask
    index = xp.arange(t_len, device=logits.device)
    if lengths is None:
        return index >= 0
    _require_int("lengths", lengths)
    if tuple(lengths.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"lengths must have shape {tuple(logits.shape[:-1])!r} (logits without "
                         f"the last axis), got {tuple(lengths.shape)!r}")
    return index < xp.astype(lengths, xp.int64)[..., None]


# ---- exp and softmax -----------------------------------------------------------------------

def exp_fx(x):
    """e**x for fx x <= 0 -> int32 Q0.EXP_FRAC, monotone, exactly 2**EXP_FRAC at 0.

    v = rshift_round(-max(x, EXP_INPUT_MIN) * LOG2E_MULT, LOG2E_SHIFT + ACT_FRAC - EXP_LUT_BITS)
    is -x * log2(e) in units of 2**-EXP_LUT_BITS; with n = v >> EXP_LUT_BITS and
    k = v mod 2**EXP_LUT_BITS, exp = rshift_round(EXP_LUT[k], n + EXP_LUT_GUARD).
    """
    xp = namespace(x)
    _require_int("x", x)
    x = xp.astype(x, xp.int64)
    if bool((x > 0).any()):
        raise ValueError(f"exp_fx takes x <= 0, got a maximum of {int(xp.amax(x))!r}; "
                         "subtract the row maximum first")
    u = -xp.maximum(x, EXP_INPUT_MIN)
    v = rshift_round(u * LOG2E_MULT, LOG2E_SHIFT + ACT_FRAC - EXP_LUT_BITS)
    lut = _on(xp, EXP_LUT, x)
    y = rshift_round(lut[v & ((1 << EXP_LUT_BITS) - 1)], (v >> EXP_LUT_BITS) + EXP_LUT_GUARD)
    return xp.astype(y, xp.int32)


def _weights(x, mask):
    """(p, m, l) of fx logits x [..., T] over mask: the integer softmax with its max and sum.

    m = max of x over mask, e = exp_fx(x - m) (0 off the mask), l = sum e and
    p = round(e * 2**PROB_FRAC / l). A row with nothing valid gets p = 0, m = INT32_MIN, l = 0.
    """
    xp = namespace(x, mask)
    x = xp.astype(x, xp.int64)
    m = xp.amax(xp.where(mask, x, INT32_MIN), axis=-1, keepdims=True)
    e = xp.where(mask, xp.astype(exp_fx(xp.where(mask, x - m, 0)), xp.int64), 0)
    l = xp.sum(e, axis=-1, keepdims=True)
    p = _div_round(e << PROB_FRAC, xp.maximum(l, 1))
    return p, xp.astype(m[..., 0], xp.int32), l[..., 0]


def _mix(p, v):
    """sat32(rshift_round(p @ v, PROB_FRAC)) for probabilities p [..., R, T], fx v [..., T, d].

    Exact in int64 because sum p <= 2**PROB_FRAC + T / 2; v is split into 16-bit limbs so
    each product sum stays below 2**53, where a float64 GEMM on CUDA is still exact.
    """
    xp = namespace(p, v)
    v = xp.astype(v, xp.int64)
    high, low = v >> _LIMB_BITS, v & ((1 << _LIMB_BITS) - 1)
    acc = (xp.matmul_exact(p, high) << _LIMB_BITS) + xp.matmul_exact(p, low)
    return xp.astype(sat(rshift_round(acc, PROB_FRAC), 32), xp.int32)


def softmax(logits, mask=None, *, lengths=None):
    """Integer softmax of fx logits [..., T] -> int32 Q0.PROB_FRAC probabilities.

    Valid positions come from a bool `mask` (broadcasting against logits) or integer
    `lengths` [...] (the first lengths[...] positions), else all. p = round(e * 2**PROB_FRAC / l)
    with e = exp_fx(x - max) and l = sum e over the valid positions; invalid positions and
    rows with no valid position give 0.
    """
    xp = namespace(logits)
    _require_int("logits", logits)
    p, _, _ = _weights(logits, _valid(logits, mask, lengths))
    return xp.astype(p, xp.int32)


def partial(logits, values, mask=None, *, lengths=None):
    """One split of online softmax attention -> (o int32 [..., d], m int32 [...], l int64 [...]).

    logits fx [..., T] and fx values [..., T, d] (leading axes broadcast as in matmul), valid
    positions as in softmax. o = sat32(rshift_round(sum_t p_t * v_t, PROB_FRAC)) is the
    normalised output of this split, m its largest valid logit and l = sum exp_fx(x - m), the
    weight of the split in Q.EXP_FRAC. An empty split gives o = 0, m = INT32_MIN, l = 0.
    """
    _require_int("logits", logits)
    _require_int("values", values)
    if values.shape[-2] != logits.shape[-1]:
        raise ValueError(f"values must be [..., T, d] with T = {logits.shape[-1]!r} like the "
                         f"logits, got shape {tuple(values.shape)!r}")
    p, m, l = _weights(logits, _valid(logits, mask, lengths))
    return _mix(p[..., None, :], values)[..., 0, :], m, l


def merge(partials):
    """Merge split results (o, m, l) of the same rows -> one (o, m, l) of the same form.

    M = max m_i, a_i = rshift_round(l_i * exp_fx(m_i - M), EXP_FRAC), A = sum a_i,
    w_i = round(a_i * 2**PROB_FRAC / A) and o = sat32(rshift_round(sum_i w_i * o_i, PROB_FRAC));
    the result is (o, M, A). Merging one partial returns it unchanged; empty partials (l = 0)
    change nothing. The l_i must not exceed SUM_MAX in total.
    """
    if not partials:
        raise ValueError("merge needs at least one partial (o, m, l)")
    xp = namespace(*[a for part in partials for a in part])
    o, m, l = (xp.stack([xp.astype(part[i], xp.int64) for part in partials]) for i in range(3))
    if bool((l < 0).any()) or bool((xp.sum(l, axis=0) > SUM_MAX).any()):
        raise ValueError(f"partial sums l must be >= 0 and total at most SUM_MAX = {SUM_MAX!r} "
                         f"(MAX_CONTEXT tokens), got {int(xp.amax(l))!r} at most")
    top = xp.amax(m, axis=0)
    a = rshift_round(l * xp.astype(exp_fx(m - top), xp.int64), EXP_FRAC)
    total = xp.sum(a, axis=0)
    w = _div_round(a << PROB_FRAC, xp.maximum(total, 1))
    acc = xp.sum(w[..., None] * o, axis=0)
    out = xp.astype(sat(rshift_round(acc, PROB_FRAC), 32), xp.int32)
    return out, xp.astype(top, xp.int32), total


# ---- RMSNorm -------------------------------------------------------------------------------

def quantize_gamma(gamma):
    """Float RMSNorm weights -> int32 Q15.GAMMA_FRAC, rounded half up (compile time)."""
    gamma = np.asarray(gamma, dtype=np.float64)
    code = np.floor(gamma * 2.0**GAMMA_FRAC + 0.5)
    if not np.all(np.isfinite(code)) or np.any(np.abs(code) > INT32_MAX):
        raise ValueError(f"gamma must be finite with |gamma| < {2 ** (31 - GAMMA_FRAC)!r}, "
                         f"got values up to {float(np.max(np.abs(gamma)))!r}")
    return code.astype(np.int32)


def quantize_eps(eps):
    """Float RMSNorm epsilon -> int in units of 2**-EPS_FRAC, rounded half up (compile time)."""
    code = math.floor(float(eps) * 2.0**EPS_FRAC + 0.5) if math.isfinite(eps) else -1
    if not 0 <= code <= EPS_MAX:
        raise ValueError(f"eps must be finite, >= 0 and below {(EPS_MAX + 1) / 2**EPS_FRAC!r}, "
                         f"got {eps!r}")
    return code


def rmsnorm(x, gamma, eps):
    """RMSNorm of fx rows [..., n] times int32 gamma [n] (Q15.GAMMA_FRAC) -> fx int32.

    eps is an int in units of 2**-EPS_FRAC (quantize_eps). Per row: sh = bits(max|x|) -
    RMS_IN_BITS, x' = rshift_round(x, sh) (a left shift if sh < 0), ms = round(sum x'**2 / n)
    + rshift_round(eps, 2 sh); e = (bits(ms) - 29) >> 1, m = rshift_round(ms, 2 e) in
    [2**28, 2**30], r = floor(2**30 / sqrt(m)) exactly, and
    y = sat32(rshift_round(x' * r * gamma, 30 + e + GAMMA_FRAC - ACT_FRAC)).
    """
    xp = namespace(x, gamma)
    _require_int("x", x)
    _require_int("gamma", gamma)
    n = x.shape[-1]
    if tuple(gamma.shape) != (n,):
        raise ValueError(f"gamma must have shape {(n,)!r} like the rows, got "
                         f"{tuple(gamma.shape)!r}")
    if not isinstance(eps, (int, np.integer)) or not 0 <= eps <= EPS_MAX:
        raise ValueError(f"eps must be an int in [0, {EPS_MAX}] (units of 2**-{EPS_FRAC}), "
                         f"got {eps!r}; convert a float with quantize_eps()")
    x = xp.astype(x, xp.int64)
    top = xp.amax(xp.abs(x), axis=-1, keepdims=True)
    sh = xp.bit_length(top) - RMS_IN_BITS
    xs = rshift_round(x, sh)
    eps_row = rshift_round(xp.full(tuple(sh.shape), int(eps), dtype=xp.int64, device=x.device),
                           2 * sh)
    ms = xp.maximum(_div_round(xp.sum(xs * xs, axis=-1, keepdims=True), n) + eps_row, 1)
    e = (xp.bit_length(ms) - (RSQRT_BITS - 1)) >> 1
    r = _isqrt((1 << 2 * RSQRT_BITS) // rshift_round(ms, 2 * e))
    y = rshift_round(xs * r * xp.astype(gamma, xp.int64), RSQRT_BITS + e + GAMMA_FRAC - ACT_FRAC)
    return xp.astype(sat(y, 32), xp.int32)


def rmsnorm_quant(x, gamma, eps):
    """The fused VPU.RMSNORM: quantize_act(rmsnorm(x, gamma, eps)) -> (a8, mant, exp)."""
    return quantize_act(rmsnorm(x, gamma, eps))


# ---- SiLU and residual add -----------------------------------------------------------------

def _sigmoid(x):
    """sigmoid of int64 fx x -> Q0.SIGMOID_FRAC, exactly symmetric: s(-x) = 2**16 - s(x)."""
    xp = namespace(x)
    e = xp.astype(exp_fx(-xp.abs(x)), xp.int64)
    low = _div_round(e << SIGMOID_FRAC, (1 << EXP_FRAC) + e)
    return xp.where(x >= 0, (1 << SIGMOID_FRAC) - low, low)


def silu(x):
    """x * sigmoid(x) of fx x -> fx int32: rshift_round(x * sigmoid_q16(x), SIGMOID_FRAC)."""
    xp = namespace(x)
    _require_int("x", x)
    x = xp.astype(x, xp.int64)
    return xp.astype(rshift_round(x * _sigmoid(x), SIGMOID_FRAC), xp.int32)


def silu_mul(a, b):
    """The fused VPU.SILUMUL: sat32(rshift_round(silu(a) * b, ACT_FRAC)) of fx a, b."""
    xp = namespace(a, b)
    _require_int("b", b)
    prod = xp.astype(silu(a), xp.int64) * xp.astype(b, xp.int64)
    return xp.astype(sat(rshift_round(prod, ACT_FRAC), 32), xp.int32)


def add_sat(a, b):
    """Residual add of fx a, b: sat32(a + b)."""
    xp = namespace(a, b)
    _require_int("a", a)
    _require_int("b", b)
    return xp.astype(sat(xp.astype(a, xp.int64) + xp.astype(b, xp.int64), 32), xp.int32)


# ---- RoPE ----------------------------------------------------------------------------------

def rope_table(inv_freq, max_pos):
    """Float64 inverse frequencies [d/2] -> (cos, sin) int16 [max_pos, d/2] in Q1.ROPE_FRAC.

    cos[p, i] = round_half_up(cos(p * inv_freq[i]) * 2**ROPE_FRAC), likewise sin (compile time).
    """
    inv_freq = np.asarray(inv_freq, dtype=np.float64)
    if inv_freq.ndim != 1 or inv_freq.size == 0 or not np.all(np.isfinite(inv_freq)):
        raise ValueError(f"inv_freq must be a non-empty finite 1-D array, got shape "
                         f"{inv_freq.shape!r}")
    if not isinstance(max_pos, (int, np.integer)) or max_pos < 1:
        raise ValueError(f"max_pos must be a positive int, got {max_pos!r}")
    angle = np.arange(max_pos, dtype=np.float64)[:, None] * inv_freq[None, :]

    def fixed(t):
        return np.floor(t * 2.0**ROPE_FRAC + 0.5).astype(np.int16)

    return fixed(np.cos(angle)), fixed(np.sin(angle))


def rope(x, pos, cos, sin):
    """Rotate fx x [..., heads, d] by the table rows at positions pos [...] -> fx int32.

    Rotate-half convention (HF LLaMA): pair (i, i + d/2) with c, s = cos[pos, i], sin[pos, i]:
    y_i = x_i c - x_{i+d/2} s, y_{i+d/2} = x_{i+d/2} c + x_i s, each
    sat32(rshift_round(., ROPE_FRAC)).
    """
    xp = namespace(x, pos)
    _require_int("x", x)
    _require_int("pos", pos)
    if x.ndim < 2 or x.shape[-1] % 2:
        raise ValueError(f"x must be [..., heads, d] with even d, got shape {tuple(x.shape)!r}")
    half = x.shape[-1] // 2
    if tuple(cos.shape) != tuple(sin.shape) or len(cos.shape) != 2 or cos.shape[1] != half:
        raise ValueError(f"cos and sin must both be [max_pos, {half}] for d = {2 * half}, got "
                         f"{tuple(cos.shape)!r} and {tuple(sin.shape)!r}")
    if tuple(pos.shape) != tuple(x.shape[:-2]):
        raise ValueError(f"pos must have shape {tuple(x.shape[:-2])!r} (x without heads and d), "
                         f"got {tuple(pos.shape)!r}")
    pos = xp.astype(pos, xp.int64)
    if bool((pos < 0).any()) or bool((pos >= cos.shape[0]).any()):
        raise ValueError(f"positions must lie in [0, {cos.shape[0]}) of the table, got values "
                         f"up to {int(xp.amax(pos))!r}; build a longer table")
    c = xp.astype(_on(xp, cos, x)[pos], xp.int64)[..., None, :]
    s = xp.astype(_on(xp, sin, x)[pos], xp.int64)[..., None, :]
    x = xp.astype(x, xp.int64)
    x1, x2 = x[..., :half], x[..., half:]
    y = xp.concat([x1 * c - x2 * s, x2 * c + x1 * s], -1)
    return xp.astype(sat(rshift_round(y, ROPE_FRAC), 32), xp.int32)


# ---- attention -----------------------------------------------------------------------------

def encode_sm_scale(sm_scale, kv_bits):
    """Softmax scale -> (mult, shift) taking s * mant_q * mant_k to fx logits (compile time).

    The factor sm_scale / (ACT_QMAX * kv_levels(kv_bits) * 2**ACT_FRAC) undoes the a8 and KV
    integer scales and the extra fx fraction of the product, encoded by encode_requant.
    """
    if not isinstance(sm_scale, (int, float)) or not 0 < sm_scale < math.inf:
        raise ValueError(f"sm_scale must be a finite number > 0, got {sm_scale!r}")
    factor = sm_scale / (ACT_QMAX * kv_levels(kv_bits) * 2.0**ACT_FRAC)
    mult, shift = encode_requant(factor)
    return int(mult), int(shift)


def _by_kv_head(x, kv_heads):
    """[M, Hq, ...] -> [kv_heads, M, Hq // kv_heads, ...]: query heads grouped by their KV head."""
    rows, heads = x.shape[:2]
    return x.reshape(rows, kv_heads, heads // kv_heads, *x.shape[2:]).swapaxes(0, 1)


def _logits(s, q_mant, q_exp, k_mant, k_exp, mult, shift):
    """fx logits [Hkv, M, G, T] from scores s and the q (per row, head) and k (per token) codes.

    u = s * mant_q * mant_k is exact (< 2**56); logit = sat32(rshift_round(rshift_round(u,
    LOGIT_PRESHIFT) * mult, shift - LOGIT_PRESHIFT - exp_q - exp_k)).
    """
    xp = namespace(s)
    i64 = xp.int64
    qm, qe = xp.astype(q_mant, i64)[..., None], xp.astype(q_exp, i64)[..., None]
    km, ke = xp.astype(k_mant, i64)[:, None, None, :], xp.astype(k_exp, i64)[:, None, None, :]
    u = xp.astype(s, i64) * (qm * km)
    return _shift_sat32(rshift_round(u, LOGIT_PRESHIFT) * mult, shift - LOGIT_PRESHIFT - qe - ke)


def _topk_keep(logits, valid, topk):
    """Keep mask [Hkv, M, 1, T]: the topk most important valid tokens per (KV head, row).

    Importance is the largest logit over the KV head's query heads; ties keep the lower index,
    through the unique key (importance << MAX_CONTEXT_BITS) + (MAX_CONTEXT - 1 - t).
    """
    xp = namespace(logits, valid)
    t_len = logits.shape[-1]
    if topk == 0 or topk >= t_len:
        return valid
    importance = xp.amax(logits, axis=2, keepdims=True)
    rank = MAX_CONTEXT - 1 - xp.arange(t_len, dtype=xp.int64, device=logits.device)
    key = xp.where(valid, (importance << MAX_CONTEXT_BITS) + rank, -(1 << 62))
    kth = xp.sort(key, axis=-1)[..., t_len - topk:t_len - topk + 1]
    return valid & (key >= kth)


def _cache_len(name, cache, kv_heads, d):
    """T of quantize_kv fields (q, g, mant, exp), checked against [kv_heads, T, d]."""
    if len(cache) != 4:
        raise ValueError(f"{name} must be the quantize_kv fields (q, g, mant, exp), got "
                         f"{len(cache)!r} arrays")
    kq, kg, mant, exp = cache
    t_len = kq.shape[1] if kq.ndim == 3 else 0
    groups = kg.shape[-1] if kg.ndim == 3 else 0
    if not (1 <= t_len <= MAX_CONTEXT and groups and d % groups == 0
            and tuple(kq.shape) == (kv_heads, t_len, d)
            and tuple(kg.shape) == (kv_heads, t_len, groups)
            and tuple(mant.shape) == tuple(exp.shape) == (kv_heads, t_len)):
        raise ValueError(f"{name} must be q [{kv_heads}, T, {d}], g [{kv_heads}, T, d/group], "
                         f"mant and exp [{kv_heads}, T] with 1 <= T <= {MAX_CONTEXT}, got "
                         f"shapes {[tuple(a.shape) for a in cache]!r}")
    return t_len


def _check_attention(q, k_cache, v_cache, positions, kv_heads, splits, topk):
    """Raise on attention arguments outside the supported ranges; return T."""
    _require_int("q", q)
    _require_int("positions", positions)
    if q.ndim != 3:
        raise ValueError(f"q must be [M, heads, d], got shape {tuple(q.shape)!r}")
    rows, heads, d = q.shape
    if not isinstance(kv_heads, int) or kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"kv_heads {kv_heads!r} must be a positive int dividing the "
                         f"{heads!r} query heads")
    if d > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {d!r} exceeds MAX_HEAD_DIM = {MAX_HEAD_DIM!r}, beyond which "
                         "the attention bounds do not hold")
    t_len = _cache_len("k_cache", k_cache, kv_heads, d)
    if _cache_len("v_cache", v_cache, kv_heads, d) != t_len:
        raise ValueError(f"k_cache and v_cache must hold the same tokens, got T = {t_len!r} "
                         f"and {v_cache[0].shape[1]!r}")
    if tuple(positions.shape) != (rows,):
        raise ValueError(f"positions must have shape {(rows,)!r}, got "
                         f"{tuple(positions.shape)!r}")
    if bool((positions < 0).any()) or bool((positions >= t_len).any()):
        xp = namespace(positions)
        raise ValueError(f"positions must lie in [0, {t_len}) of the cache, got values in "
                         f"[{-int(xp.amax(-positions))!r}, {int(xp.amax(positions))!r}]")
    if not isinstance(splits, int) or splits < 1:
        raise ValueError(f"splits must be an int >= 1, got {splits!r}")
    if not isinstance(topk, int) or topk < 0:
        raise ValueError(f"topk must be an int >= 0 (0 keeps every token), got {topk!r}")
    return t_len


def attention(q, k_cache, v_cache, positions, *, kv_heads, kv_bits, splits=1, topk=0,
              sm_scale=None):
    """Causal GQA attention of fx queries q [M, Hq, d] over one sequence's quantized KV cache.

    k_cache and v_cache are the quantize_kv fields (q [Hkv, T, d], g [Hkv, T, d/group],
    mant, exp [Hkv, T]) of tokens 0..T-1 with kv_bits 4 or 8. Row i attends to tokens
    0..positions[i]; query head h reads KV head h // (Hq // kv_heads). Steps: quantize_act
    of q per (row, head); int32 scores against the effective K ints; fx logits by one requant
    with encode_sm_scale(sm_scale or 1/sqrt(d)); optional top-k pruning; `splits` contiguous
    chunks of ceil((positions[i]+1) / splits) tokens, a partial per chunk over the V ints
    dequantized by kv_dequant, then merge. Returns fx int32 [M, Hq, d].
    """
    xp = namespace(q, positions, *k_cache, *v_cache)
    t_len = _check_attention(q, k_cache, v_cache, positions, kv_heads, splits, topk)
    rows, heads, d = q.shape
    group = d // k_cache[1].shape[-1]
    mult, shift = encode_sm_scale(1 / math.sqrt(d) if sm_scale is None else sm_scale, kv_bits)

    a8, q_mant, q_exp = quantize_act(q)
    a8 = _by_kv_head(a8, kv_heads)
    w_k = effective_weight(k_cache[0], k_cache[1], group)
    scores = wrap32(xp.matmul_exact(a8.reshape(kv_heads, -1, d), w_k.swapaxes(-1, -2)))
    logits = _logits(scores.reshape(*a8.shape[:3], t_len), _by_kv_head(q_mant, kv_heads),
                     _by_kv_head(q_exp, kv_heads), k_cache[2], k_cache[3], mult, shift)

    pos = xp.astype(positions, xp.int64)[:, None]
    index = xp.arange(t_len, dtype=xp.int64, device=pos.device)
    valid = (index <= pos)[None, :, None, :]
    keep = _topk_keep(logits, valid, topk)
    size = (pos + splits) // splits
    chunk = (index // size)[None, :, None, :]
    v = kv_dequant(*v_cache, kv_bits, group)
    parts = []
    for j in range(min(splits, t_len)):
        # tokens outside every row's chunk j weigh 0, so only the span that holds them is read
        lo = -int(xp.amax(-j * size))
        hi = int(xp.amax(xp.minimum((j + 1) * size, pos + 1)))
        if lo >= hi:
            continue
        p, m, l = _weights(logits[..., lo:hi], keep[..., lo:hi] & (chunk[..., lo:hi] == j))
        o = _mix(p.reshape(kv_heads, -1, hi - lo), v[:, lo:hi]).reshape(*p.shape[:3], d)
        parts.append((o, m, l))
    out, _, _ = merge(parts)
    return out.swapaxes(0, 1).reshape(rows, heads, d)


def attention_reference_float(q, k, v, positions, *, kv_heads, topk=0, sm_scale=None):
    """Float64 causal GQA attention with the same top-k rule, for tests and host comparisons.

    q [M, Hq, d], k and v [Hkv, T, d] (numpy, real units), positions [M] -> [M, Hq, d] float64.
    Not a runtime op: the integer `attention` is bounded against it.
    """
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    positions = np.asarray(positions)
    rows, heads, d = q.shape
    rep, t_len = heads // kv_heads, k.shape[1]
    scale = 1 / math.sqrt(d) if sm_scale is None else sm_scale
    logits = np.einsum("mhd,htd->mht", q, np.repeat(k, rep, axis=0)) * scale
    valid = np.arange(t_len)[None, None, :] <= positions[:, None, None]
    keep = np.broadcast_to(valid, logits.shape)
    if 0 < topk < t_len:
        importance = logits.reshape(rows, kv_heads, rep, t_len).max(axis=2)
        importance = np.where(valid, importance, -np.inf)
        order = np.argsort(-importance, axis=-1, kind="stable")[..., :topk]
        top = np.zeros(importance.shape, dtype=bool)
        np.put_along_axis(top, order, True, axis=-1)
        keep = np.repeat(top & valid, rep, axis=1)
    logits = np.where(keep, logits, -np.inf)
    w = np.exp(logits - logits.max(axis=-1, keepdims=True))
    w /= w.sum(axis=-1, keepdims=True)
    return np.einsum("mht,htd->mhd", w, np.repeat(v, rep, axis=0))


OPS = {
    "exp_fx": exp_fx,
    "softmax": softmax,
    "partial": partial,
    "merge": merge,
    "rmsnorm": rmsnorm,
    "rmsnorm_quant": rmsnorm_quant,
    "silu": silu,
    "silu_mul": silu_mul,
    "add_sat": add_sat,
    "rope": rope,
    "attention": attention,
}
"""The runtime special-function ops (integer, numpy or torch), by name."""
