"""The golden integer numerics: quantization, requantization, integer linear, N:M sparsity.

This module is the executable definition of the number formats in `docs/contract.md`; the
formulas are spelled out in `docs/numerics.md`. The emulator runs these functions, the
compiler folds constants with them and the RTL tests compare against them. Runtime functions
are written once against `trimem.xp`, so numpy and torch (CPU or CUDA) give the same bits.
Functions that take float weights run at compile time and are numpy-only.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trimem.xp import namespace

ACT_FRAC = 12
"""Fraction bits of the fixed-point (`fx`) int32 activations: value = int / 2**ACT_FRAC."""
ACT_QMAX = 127
"""Quantized activations (a8) are int8 in [-ACT_QMAX, ACT_QMAX]; -128 is never produced."""
SCALE_MANT_BITS = 15
"""A scale code is `mant << exp` with 1 <= mant < 2**SCALE_MANT_BITS."""
ACT_EXP_MAX = 32 - SCALE_MANT_BITS
"""Largest scale exponent of an int32 row: amax <= 2**31 needs exp <= 17."""
GROUP_SCALE_BITS = 4
GROUP_MAX = 2**GROUP_SCALE_BITS - 1
"""Group multipliers g are unsigned integers in [1, GROUP_MAX]."""
WEIGHT_BITS = (4, 8)
"""Bit widths of weights and of the KV cache."""
RECIP_SHIFT = 32
"""Fraction bits of the per-row integer reciprocals used to quantize and dequantize rows."""
REQUANT_SHIFT_MIN = ACT_EXP_MAX
"""Smallest requant shift: `shift - exp` of a linear output is then never negative."""
REQUANT_SHIFT_MAX = 62
"""Largest requant shift: `1 << (shift - 1)` and `acc * mult * mant` stay inside int64."""

INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1


def qmax(bits):
    """Largest integer of a symmetric `bits`-bit weight or KV value: 2**(bits-1) - 1."""
    if bits not in WEIGHT_BITS:
        raise ValueError(f"bits must be one of {WEIGHT_BITS}, got {bits!r}")
    return 2 ** (bits - 1) - 1


def kv_levels(bits):
    """Integer KV value (q * g) that stands for the full scale amax' of its token row."""
    return qmax(bits) * GROUP_MAX


def _require_int(name, x):
    if not namespace(x).is_integer(x):
        kind = getattr(x, "dtype", type(x).__name__)
        raise TypeError(f"{name} must be an integer array, got {kind!r}; "
                        "convert floats with to_fx() or quantize them first")


def _check_group(k, group):
    if not isinstance(group, (int, np.integer)) or group < 1 or k % group:
        raise ValueError(f"group {group!r} must be a positive integer that divides the row "
                         f"length {k!r}; pick a group size that divides it")


# ---- the one rounding rule, saturation and wrap -------------------------------------------

def rshift_round(x, s):
    """x / 2**s rounded half up (arithmetic shift); s <= 0 shifts left. Returns int64.

    `s` is an int or an array broadcasting against x, with |s| < 63.
    """
    xp = namespace(x, s)
    x = xp.astype(x, xp.int64)
    if isinstance(s, (int, np.integer)):
        right, left = max(int(s), 0), max(-int(s), 0)
    else:
        s = xp.astype(s, xp.int64)
        right, left = xp.maximum(s, 0), xp.maximum(-s, 0)
    half = (1 << right) >> 1
    return ((x + half) >> right) << left


def sat(x, bits):
    """Clamp to the signed `bits`-bit range [-2**(bits-1), 2**(bits-1) - 1]. Returns int64."""
    xp = namespace(x)
    return xp.clip(xp.astype(x, xp.int64), -(1 << (bits - 1)), (1 << (bits - 1)) - 1)


def wrap32(x):
    """Two's complement wrap of int64 to int32, as a 32-bit accumulator overflows."""
    xp = namespace(x)
    x = xp.astype(x, xp.int64)
    return xp.astype(((x - INT32_MIN) & 0xFFFFFFFF) + INT32_MIN, xp.int32)


def to_fx(x):
    """Float array -> fx int32, rounded half up and saturated (host and compiler only)."""
    x = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError("to_fx got NaN or infinite values; clean the input first")
    return np.clip(np.floor(x * 2.0**ACT_FRAC + 0.5), INT32_MIN, INT32_MAX).astype(np.int32)


def from_fx(x):
    """fx integers -> float64 (host and compiler only)."""
    return np.asarray(x, dtype=np.float64) / 2.0**ACT_FRAC


# ---- scale codes and row quantization ------------------------------------------------------

def encode_amax(amax):
    """Smallest scale code (mant, exp) with mant << exp >= max(amax, 1), as int32 arrays.

    exp = max(bit_length(amax) - SCALE_MANT_BITS, 0) and mant = ceil(amax / 2**exp); a
    mantissa that rounds up to 2**SCALE_MANT_BITS is halved and exp incremented. An all-zero
    row gets the code of 1 (mant 1, exp 0); its quantized values are all zero.
    """
    xp = namespace(amax)
    _require_int("amax", amax)
    amax = xp.maximum(xp.astype(amax, xp.int64), 1)
    exp = xp.maximum(xp.bit_length(amax) - SCALE_MANT_BITS, 0)
    mant = (amax + (1 << exp) - 1) >> exp
    carry = mant >> SCALE_MANT_BITS
    return xp.astype(mant >> carry, xp.int32), xp.astype(exp + carry, xp.int32)


def _row_amax(x):
    xp = namespace(x)
    return xp.amax(xp.abs(xp.astype(x, xp.int64)), axis=-1)


def _reciprocal(levels, divisor):
    """floor((levels << RECIP_SHIFT) / divisor): the one integer division per row or group."""
    xp = namespace(divisor)
    return (levels << RECIP_SHIFT) // xp.astype(divisor, xp.int64)


def _quantize(x, recip, exp, limit):
    """clip(rshift_round(x * recip, RECIP_SHIFT + exp), -limit, limit) as int8."""
    xp = namespace(x)
    q = rshift_round(xp.astype(x, xp.int64) * recip, RECIP_SHIFT + xp.astype(exp, xp.int64))
    return xp.astype(xp.clip(q, -limit, limit), xp.int8)


def _dequantize(v, mant, exp, levels):
    """fx = sat32(rshift_round(v * mant * round(2**RECIP_SHIFT / levels), RECIP_SHIFT - exp))."""
    xp = namespace(v)
    recip = ((1 << RECIP_SHIFT) + levels // 2) // levels
    scaled = xp.astype(v, xp.int64) * (xp.astype(mant, xp.int64)[..., None] * recip)
    shift = RECIP_SHIFT - xp.astype(exp, xp.int64)[..., None]
    return xp.astype(sat(rshift_round(scaled, shift), 32), xp.int32)


def quantize_act(x):
    """fx rows [..., K] -> (a8 int8 [..., K], mant int32 [...], exp int32 [...]).

    Per row: (mant, exp) = encode_amax(max |x|), R = floor((127 << RECIP_SHIFT) / mant) and
    a8 = clip(rshift_round(x * R, RECIP_SHIFT + exp), -127, 127), i.e. round(x * 127 / amax').
    """
    _require_int("x", x)
    mant, exp = encode_amax(_row_amax(x))
    recip = _reciprocal(ACT_QMAX, mant)
    return _quantize(x, recip[..., None], exp[..., None], ACT_QMAX), mant, exp


def dequantize_act(a8, mant, exp):
    """a8 rows and their scale codes -> fx int32: round(a8 * (mant << exp) / 127), saturated."""
    _require_int("a8", a8)
    return _dequantize(a8, mant, exp, ACT_QMAX)


# ---- weights: two-level symmetric quantization ---------------------------------------------

@dataclass(frozen=True, eq=False)
class QuantWeight:
    """A quantized [N, K] weight: real W[c, k] = q * g[c, k // group] * mult[c] * 127 / 2**shift[c].

    Members
    -------
    q : int8 [N, K], in [-qmax(bits), qmax(bits)].
    g : uint8 [N, K // group], group multipliers in [1, GROUP_MAX].
    mult : int32 [N], in [0, 2**SCALE_MANT_BITS).
    shift : uint8 [N], in [REQUANT_SHIFT_MIN, REQUANT_SHIFT_MAX].
    bits : 4 or 8.
    group : input elements per group multiplier.
    """
    q: np.ndarray
    g: np.ndarray
    mult: np.ndarray
    shift: np.ndarray
    bits: int
    group: int

    def __post_init__(self):
        limit = qmax(self.bits)
        if self.q.ndim != 2:
            raise ValueError(f"q must be [N, K], got shape {self.q.shape!r}")
        n, k = self.q.shape
        _check_group(k, self.group)
        fields = {"q": (np.int8, (n, k), -limit, limit),
                  "g": (np.uint8, (n, k // self.group), 1, GROUP_MAX),
                  "mult": (np.int32, (n,), 0, (1 << SCALE_MANT_BITS) - 1),
                  "shift": (np.uint8, (n,), REQUANT_SHIFT_MIN, REQUANT_SHIFT_MAX)}
        for name, (dtype, shape, lo, hi) in fields.items():
            value = getattr(self, name)
            if value.dtype != dtype or value.shape != shape:
                raise ValueError(f"{name} must be {np.dtype(dtype).name} {shape!r}, "
                                 f"got {value.dtype.name} {value.shape!r}")
            if value.size and (value.min() < lo or value.max() > hi):
                raise ValueError(f"{name} must lie in [{lo}, {hi}], got values in "
                                 f"[{value.min().item()!r}, {value.max().item()!r}]")

    @property
    def w_eff(self):
        """Effective integer weight q * g, int16 [N, K]."""
        return effective_weight(self.q, self.g, self.group)

    @property
    def step(self):
        """Real weight per unit of w_eff, per channel: s_c = mult * 127 / 2**shift (float64)."""
        return self.mult * float(ACT_QMAX) / np.exp2(self.shift.astype(np.float64))


def encode_requant(factor):
    """Real per-channel factors >= 0 -> (mult int32, shift uint8) with mult / 2**shift ~ factor.

    mult = round_half_up(factor * 2**shift) with the largest shift <= REQUANT_SHIFT_MAX that
    keeps mult < 2**SCALE_MANT_BITS. Factors that need shift < REQUANT_SHIFT_MIN are rejected.
    """
    factor = np.asarray(factor, dtype=np.float64)
    if not np.all(np.isfinite(factor) & (factor >= 0)):
        raise ValueError(f"requant factors must be finite and >= 0, got {factor!r}")
    _, e = np.frexp(factor)
    shift = np.where(factor > 0, np.minimum(SCALE_MANT_BITS - e, REQUANT_SHIFT_MAX),
                     REQUANT_SHIFT_MAX)
    mult = np.floor(np.ldexp(factor, shift) + 0.5).astype(np.int64)
    carry = mult >> SCALE_MANT_BITS
    mult, shift = mult >> carry, shift - carry
    if np.any(shift < REQUANT_SHIFT_MIN):
        bad = int(np.argmax(shift < REQUANT_SHIFT_MIN))
        limit = 2.0 ** (SCALE_MANT_BITS - REQUANT_SHIFT_MIN)
        raise ValueError(f"requant factor {float(factor.flat[bad])!r} (row {bad}) must be "
                         f"below {limit!r}; scale the weights down")
    return mult.astype(np.int32), shift.astype(np.uint8)


def quantize_weight(w, bits, group):
    """Float weight [N, K] -> QuantWeight (compile time, numpy).

    Per channel c the step s_c makes its largest group use g = GROUP_MAX:
    s_c = max|W[c]| / (qmax * GROUP_MAX), stored as the requant pair of s_c / 127 (and used
    as encoded). Then g = clip(ceil(group_amax / (qmax * s_c)), 1, GROUP_MAX) and
    q = clip(round_half_up(W / (g * s_c)), -qmax, qmax). All-zero rows get q = 0, g = 1, mult = 0.
    """
    w = np.asarray(w, dtype=np.float64)
    if w.ndim != 2:
        raise ValueError(f"w must be [N, K], got shape {w.shape!r}")
    if not np.all(np.isfinite(w)):
        raise ValueError("w has NaN or infinite values; clean the weights first")
    limit = qmax(bits)
    n, k = w.shape
    _check_group(k, group)
    group_amax = np.abs(w).reshape(n, k // group, group).max(axis=-1, initial=0.0)
    mult, shift = encode_requant(group_amax.max(axis=-1, initial=0.0) / (limit * GROUP_MAX)
                                 / ACT_QMAX)
    step = (mult * float(ACT_QMAX) / np.exp2(shift.astype(np.float64)))[:, None]
    live = step > 0
    step = np.where(live, step, 1.0)
    g = np.where(live, np.clip(np.ceil(group_amax / (limit * step)), 1, GROUP_MAX), 1)
    q = np.floor(w / (np.repeat(g, group, axis=1) * step) + 0.5)
    q = np.where(live, np.clip(q, -limit, limit), 0)
    return QuantWeight(q.astype(np.int8), g.astype(np.uint8), mult, shift, bits, group)


def dequantize_weight(qw):
    """QuantWeight -> the float weight it stands for, [N, K] float64 (tests and compiler)."""
    return qw.w_eff * qw.step[:, None]


def effective_weight(q, g, group):
    """Effective integer weight w = q * g (g repeated over its group): int16 [..., K]."""
    xp = namespace(q, g)
    _require_int("q", q)
    _require_int("g", g)
    *lead, k = q.shape
    _check_group(k, group)
    w = xp.astype(q, xp.int16).reshape(*lead, k // group, group)
    return (w * xp.astype(g, xp.int16)[..., None]).reshape(*lead, k)


# ---- integer linear -----------------------------------------------------------------------

def accumulate(a8, w_eff):
    """int32 accumulators a8 [..., K] x w_eff [N, K]^T -> [..., N], wrapping on overflow."""
    xp = namespace(a8, w_eff)
    _require_int("a8", a8)
    _require_int("w_eff", w_eff)
    return wrap32(xp.matmul_exact(a8, w_eff.T))


def linear(a8, mant, exp, w_eff, mult, shift):
    """Integer linear to fx int32 [..., N]: sat32(rshift_round(acc * mult * mant, shift - exp)).

    a8 [..., K] with scale codes mant, exp [...]; w_eff [N, K]; mult, shift [N].
    """
    xp = namespace(a8, mant, exp, w_eff, mult, shift)
    acc = xp.astype(accumulate(a8, w_eff), xp.int64)
    i64 = xp.int64
    scale = xp.astype(mult, i64) * xp.astype(mant, i64)[..., None]
    amount = xp.astype(shift, i64) - xp.astype(exp, i64)[..., None]
    return xp.astype(sat(rshift_round(acc * scale, amount), 32), xp.int32)


# ---- N:M sparsity (compile time, numpy) ---------------------------------------------------

def nm_index_bits(m):
    """Bits of one N:M position index: ceil(log2 m) (0 for dense)."""
    return (m - 1).bit_length()


def _check_nm(n, m, k):
    if not (isinstance(n, (int, np.integer)) and isinstance(m, (int, np.integer))
            and 1 <= n <= m <= 256):
        raise ValueError(f"N:M pattern {n!r}:{m!r} must have 1 <= n <= m <= 256")
    if k % m:
        raise ValueError(f"row length {k!r} is not a multiple of m={m!r}; pad K to a multiple")


def nm_prune_mask(w, n, m):
    """Keep mask [N, K] of the n largest |w| in each block of m along K; ties keep lower index."""
    w = np.asarray(w, dtype=np.float64)
    if w.ndim != 2 or not np.all(np.isfinite(w)):
        raise ValueError(f"w must be a finite [N, K] array, got shape {w.shape!r}")
    rows, k = w.shape
    _check_nm(n, m, k)
    blocks = np.abs(w).reshape(rows, k // m, m)
    order = np.argsort(-blocks, axis=-1, kind="stable")
    mask = np.zeros(blocks.shape, dtype=bool)
    np.put_along_axis(mask, order[..., :n], True, axis=-1)
    return mask.reshape(rows, k)


def nm_pack(q, n, m):
    """Pruned [N, K] -> (values [N, K*n//m], idx uint8 same shape): n kept per m-block.

    The kept positions of a block are its nonzeros, filled up with its lowest-index zeros
    when it has fewer than n, listed in ascending order.
    """
    q = np.asarray(q)
    rows, k = q.shape
    _check_nm(n, m, k)
    blocks = q.reshape(rows, k // m, m)
    nonzero = blocks != 0
    count = nonzero.sum(axis=-1)
    if np.any(count > n):
        row, block = np.argwhere(count > n)[0]
        raise ValueError(f"row {row} block {block} has {count[row, block]} nonzeros, more "
                         f"than {n}:{m} allows; prune with nm_prune_mask first")
    idx = np.sort(np.argsort(~nonzero, axis=-1, kind="stable")[..., :n], axis=-1)
    values = np.take_along_axis(blocks, idx, axis=-1)
    return values.reshape(rows, -1), idx.astype(np.uint8).reshape(rows, -1)


def nm_unpack(values, idx, n, m, k):
    """(values, idx) from nm_pack -> dense [N, k] with zeros at the pruned positions."""
    values, idx = np.asarray(values), np.asarray(idx)
    _check_nm(n, m, k)
    rows = values.shape[0]
    if values.shape != (rows, k // m * n) or idx.shape != values.shape:
        raise ValueError(f"values {values.shape!r} and idx {idx.shape!r} must both be "
                         f"{(rows, k // m * n)!r} for {n}:{m} over K={k!r}")
    pos = idx.astype(np.int64).reshape(rows, k // m, n)
    if np.any(pos >= m) or np.any(np.diff(pos, axis=-1) <= 0):
        raise ValueError(f"idx must be strictly ascending within each block and below m={m!r}")
    dense = np.zeros((rows, k // m, m), dtype=values.dtype)
    np.put_along_axis(dense, pos, values.reshape(rows, k // m, n), axis=-1)
    return dense.reshape(rows, k)


# ---- KV cache ------------------------------------------------------------------------------

def quantize_kv(x, bits, group):
    """fx K or V rows [..., T, d] -> (q int8 [..., T, d], g uint8 [..., T, d // group],
    mant int32 [..., T], exp int32 [..., T]); integer-only, runs at KV append.

    Per token row: (mant, exp) = encode_amax(max |x|), amax' = mant << exp. Per group:
    g = clip(ceil(GROUP_MAX * group_amax / amax'), 1, GROUP_MAX),
    R = floor((kv_levels(bits) << RECIP_SHIFT) / (g * mant)) and
    q = clip(rshift_round(x * R, RECIP_SHIFT + exp), -qmax, qmax), i.e.
    round(x * kv_levels / (g * amax')). The row means x ~ q * g * amax' / kv_levels(bits).
    """
    xp = namespace(x)
    _require_int("x", x)
    limit, levels = qmax(bits), kv_levels(bits)
    *lead, d = x.shape
    _check_group(d, group)
    grouped = xp.astype(x, xp.int64).reshape(*lead, d // group, group)
    mant, exp = encode_amax(_row_amax(x))
    full = (xp.astype(mant, xp.int64) << xp.astype(exp, xp.int64))[..., None]
    group_amax = _row_amax(grouped)
    g = xp.clip((GROUP_MAX * group_amax + full - 1) // full, 1, GROUP_MAX)
    recip = _reciprocal(levels, g * xp.astype(mant, xp.int64)[..., None])
    q = _quantize(grouped, recip[..., None], exp[..., None, None], limit)
    return q.reshape(*lead, d), xp.astype(g, xp.uint8), mant, exp


def kv_dequant(q, g, mant, exp, bits, group):
    """Quantized KV rows -> fx int32 [..., T, d]: round(q * g * amax' / kv_levels(bits))."""
    return _dequantize(effective_weight(q, g, group), mant, exp, kv_levels(bits))


# ---- embedding -----------------------------------------------------------------------------

def quantize_embedding(table):
    """Float table [V, D] -> (q int8 [V, D], mant, exp int32 [V]) in fx units (compile time).

    amax_fx = ceil(max |row| * 2**ACT_FRAC), code = encode_amax(amax_fx) and
    q = clip(round_half_up(row * 2**ACT_FRAC * 127 / amax'), -127, 127).
    """
    table = np.asarray(table, dtype=np.float64)
    if table.ndim != 2 or not np.all(np.isfinite(table)):
        raise ValueError(f"table must be a finite [V, D] array, got shape {table.shape!r}")
    scaled = table * 2.0**ACT_FRAC
    amax = np.ceil(np.abs(scaled).max(axis=-1, initial=0.0)).astype(np.int64)
    mant, exp = encode_amax(np.minimum(amax, 1 << 31))
    full = (mant.astype(np.int64) << exp.astype(np.int64)).astype(np.float64)[:, None]
    q = np.clip(np.floor(scaled * ACT_QMAX / full + 0.5), -ACT_QMAX, ACT_QMAX)
    return q.astype(np.int8), mant, exp


def embed(ids, q, mant, exp):
    """Rows `ids` of a quantized embedding table -> fx int32 [..., D] (dequantize_act)."""
    _require_int("ids", ids)
    return dequantize_act(q[ids], mant[ids], exp[ids])


OPS = {
    "rshift_round": rshift_round,
    "sat": sat,
    "wrap32": wrap32,
    "encode_amax": encode_amax,
    "quantize_act": quantize_act,
    "dequantize_act": dequantize_act,
    "effective_weight": effective_weight,
    "accumulate": accumulate,
    "linear": linear,
    "quantize_kv": quantize_kv,
    "kv_dequant": kv_dequant,
    "embed": embed,
}
"""The runtime ops (integer, numpy or torch), by name."""
