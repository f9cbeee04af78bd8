import math

import numpy as np
import pytest
import torch

from trimem import special as sp
from trimem.numerics import (INT32_MAX, INT32_MIN, from_fx, kv_dequant, quantize_act,
                             quantize_kv, to_fx)

pytestmark = pytest.mark.unit

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DELTA = 3.43e-4
"""Relative error of exp_fx from its log2 step (docs/special.md)."""
ETA = 2**-16 + 2**-18
"""Absolute error of exp_fx from its table and output rounding (docs/special.md)."""
LSB = 2.0**-12


def _to_torch(a, device):
    if isinstance(a, np.ndarray):
        return torch.as_tensor(a, device=device)
    if isinstance(a, (tuple, list)):
        return type(a)(_to_torch(x, device) for x in a)
    return a


def _flat(out):
    return out if isinstance(out, tuple) else (out,)


def both(fn, *args, **kwargs):
    """fn on numpy and on torch inputs on every device; asserts the same bits and dtypes.

    Returns the numpy outputs.
    """
    want = fn(*args, **kwargs)
    for device in DEVICES:
        got = fn(*_to_torch(args, device), **kwargs)
        assert len(_flat(got)) == len(_flat(want))
        for a, b in zip(_flat(want), _flat(got)):
            assert b.device.type == device
            assert str(a.dtype) == str(b.dtype).removeprefix("torch.")
            np.testing.assert_array_equal(a, b.cpu().numpy())
    return want


def fx(rng, shape, scale=1.0):
    return to_fx(rng.normal(size=shape) * scale)


def cosine(a, b):
    a, b = np.ravel(a), np.ravel(b)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def kv(rng, heads, t_len, d, bits, group=16, scale=1.0):
    """Float K or V [heads, T, d] with a scale per token, and its quantize_kv fields."""
    real = rng.normal(size=(heads, t_len, d)) * scale * rng.uniform(0.2, 3, (heads, t_len, 1))
    return real, quantize_kv(to_fx(real), bits, group)


# ---- exp -----------------------------------------------------------------------------------

DOMAIN = np.arange(sp.EXP_INPUT_MIN - 64, 1, dtype=np.int64)


def test_exp_is_one_at_zero_monotone_and_zero_below_the_clamp():
    y = sp.exp_fx(DOMAIN)
    assert y[-1] == 1 << sp.EXP_FRAC
    assert np.all(np.diff(y) >= 0)
    assert np.all(y[DOMAIN <= -math.ceil(11.8 * 2**12)] == 0)
    assert sp.exp_fx(np.array([INT32_MIN]))[0] == 0


def test_exp_error_is_within_the_declared_bound_everywhere():
    y = sp.exp_fx(DOMAIN) / 2.0**sp.EXP_FRAC
    exact = np.exp(from_fx(DOMAIN))
    assert np.all(np.abs(y - exact) <= DELTA * exact + ETA)


def test_exp_table_entries_are_correctly_rounded_powers_of_two():
    size = 1 << sp.EXP_LUT_BITS
    top = (sp.EXP_FRAC + sp.EXP_LUT_GUARD + 1) * size
    for k, entry in enumerate(sp.EXP_LUT.tolist()):
        # entry = round(2**(17 - k/1024))  <=>  (2 entry - 1)**1024 <= 2**(18*1024 - k) < ...
        assert (2 * entry - 1) ** size <= 1 << (top - k) < (2 * entry + 1) ** size
    assert np.all(np.diff(sp.EXP_LUT) < 0)


def test_exp_gives_the_same_bits_in_numpy_and_torch():
    rng = np.random.default_rng(0)
    x = np.concatenate([-rng.integers(0, 1 << 31, 500), [0, -1, sp.EXP_INPUT_MIN,
                                                         sp.EXP_INPUT_MIN - 1, INT32_MIN]])
    both(sp.exp_fx, x.astype(np.int32))


def test_exp_of_a_positive_input_is_rejected_with_the_fix():
    with pytest.raises(ValueError, match=r"^exp_fx takes x <= 0, got a maximum of 1; "
                                         r"subtract the row maximum first$"):
        sp.exp_fx(np.array([-5, 1]))


def test_exp_of_a_float_input_is_rejected():
    with pytest.raises(TypeError, match=r"^x must be an integer array"):
        sp.exp_fx(np.array([-0.5]))


# ---- softmax, partial, merge ---------------------------------------------------------------

def softmax_bound(p_exact, t_len):
    """Per-element bound of |p - P| from docs/special.md."""
    spread = 1 - DELTA - t_len * ETA
    return (2 * DELTA * p_exact + ETA + p_exact * t_len * ETA) / spread + 2.0**-31


def test_softmax_is_within_the_declared_bound_of_float_and_sums_to_one():
    rng = np.random.default_rng(1)
    logits = fx(rng, (6, 50), 3.0)
    p = both(sp.softmax, logits)
    exact = np.exp(from_fx(logits) - from_fx(logits).max(-1, keepdims=True))
    exact /= exact.sum(-1, keepdims=True)
    assert np.all(np.abs(p / 2.0**sp.PROB_FRAC - exact) <= softmax_bound(exact, 50))
    assert np.all(np.abs(p.sum(-1, dtype=np.int64) - (1 << sp.PROB_FRAC)) <= 25)


def test_softmax_of_masked_rows_single_tokens_and_ties():
    logits = np.array([[5, -7, 9], [4, 4, 4], [INT32_MAX, INT32_MIN, 0], [1, 2, 3]], np.int32)
    mask = np.array([[False] * 3, [True] * 3, [True] * 3, [False, True, False]])
    p = both(sp.softmax, logits, mask)
    one = 1 << sp.PROB_FRAC
    np.testing.assert_array_equal(p[0], [0, 0, 0])
    np.testing.assert_array_equal(p[1], [round(one / 3)] * 3)
    np.testing.assert_array_equal(p[2], [one, 0, 0])
    np.testing.assert_array_equal(p[3], [0, one, 0])


def test_softmax_lengths_mean_the_same_prefix_mask():
    rng = np.random.default_rng(2)
    logits = fx(rng, (2, 3, 9), 2.0)
    lengths = np.array([[0, 1, 9], [4, 5, 2]])
    mask = np.arange(9) < lengths[..., None]
    got = both(lambda x, n: sp.softmax(x, lengths=n), logits, lengths)
    np.testing.assert_array_equal(got, sp.softmax(logits, mask))


def test_softmax_rejects_a_mask_and_lengths_together_and_non_bool_masks():
    logits = np.zeros((2, 3), np.int32)
    with pytest.raises(ValueError, match=r"^give mask or lengths, not both$"):
        sp.softmax(logits, logits == 0, lengths=np.array([1, 2]))
    with pytest.raises(TypeError, match=r"^mask must be a bool array, got dtype\('int32'\)$"):
        sp.softmax(logits, logits)
    with pytest.raises(ValueError, match=r"^lengths must have shape \(2,\)"):
        sp.softmax(logits, lengths=np.array([1, 2, 3]))


def split_bound(t_len, vmax):
    """Bound of |split - unsplit| in fx LSBs from docs/special.md."""
    spread = 1 - 2 * DELTA - 2 * t_len * ETA
    return (8 * DELTA + 10 * t_len * ETA) * vmax / spread + 2


def test_merged_partials_of_contiguous_splits_are_within_the_declared_bound():
    rng = np.random.default_rng(3)
    t_len = 40
    logits, values = fx(rng, (5, t_len), 2.0), fx(rng, (5, t_len, 8), 4.0)
    whole = sp.partial(logits, values)
    for cut in ([0, 13, 40], [0, 1, 2, 30, 40], list(range(41))):
        parts = [sp.partial(logits, values, (np.arange(t_len) >= a) & (np.arange(t_len) < b))
                 for a, b in zip(cut, cut[1:])]
        o, m, l = both(sp.merge, parts)
        np.testing.assert_array_equal(m, whole[1])
        diff = np.abs(o.astype(np.int64) - whole[0])
        assert diff.max() <= split_bound(t_len, np.abs(values).max())
    np.testing.assert_array_equal(o, whole[0])  # one token per split is exact
    np.testing.assert_array_equal(l, whole[2])


def test_merge_of_one_partial_returns_it_unchanged():
    rng = np.random.default_rng(4)
    mask = rng.random((3, 20)) < 0.7
    mask[0] = False
    part = sp.partial(fx(rng, (3, 20), 5.0), fx(rng, (3, 20, 4), 100.0), mask)
    for a, b in zip(both(sp.merge, [part]), part):
        np.testing.assert_array_equal(a, b)


def test_empty_partials_change_nothing_in_a_merge():
    rng = np.random.default_rng(5)
    logits, values = fx(rng, (2, 10)), fx(rng, (2, 10, 3))
    parts = [sp.partial(logits[:, :4], values[:, :4]), sp.partial(logits[:, 4:], values[:, 4:])]
    empty = sp.partial(logits[:, :4], values[:, :4], np.zeros(4, bool))
    np.testing.assert_array_equal(empty[0], 0)
    assert np.all(empty[1] == INT32_MIN) and np.all(empty[2] == 0)
    for a, b in zip(both(sp.merge, [empty, parts[0], empty, parts[1]]), sp.merge(parts)):
        np.testing.assert_array_equal(a, b)


def test_partial_gives_the_same_bits_in_numpy_and_torch_at_the_int32_limits():
    rng = np.random.default_rng(6)
    values = rng.choice([INT32_MIN, INT32_MAX, 0, -1], size=(3, 7, 5)).astype(np.int32)
    logits = rng.choice([INT32_MIN, INT32_MAX, 0], size=(3, 7)).astype(np.int32)
    o, m, l = both(sp.partial, logits, values)
    assert o.dtype == np.int32 and m.dtype == np.int32 and l.dtype == np.int64


def test_merge_rejects_sums_beyond_sum_max():
    part = (np.zeros((1, 2), np.int32), np.zeros(1, np.int32), np.array([sp.SUM_MAX]))
    with pytest.raises(ValueError, match=r"^partial sums l must be >= 0 and total at most "):
        sp.merge([part, part])


# ---- RMSNorm -------------------------------------------------------------------------------

def rmsnorm_float(x, gamma, eps):
    x = from_fx(x)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * gamma / 2.0**sp.GAMMA_FRAC


def rmsnorm_rows(rng):
    rows = [fx(rng, (1, 96), s) for s in (1e-3, 0.05, 1.0, 30.0, 4000.0)]
    rows.append(rng.choice([INT32_MIN, INT32_MAX], size=(1, 96)).astype(np.int32))
    rows.append(np.eye(1, 96, 7, dtype=np.int32))
    return np.concatenate(rows)


def test_rmsnorm_is_within_the_declared_bound_of_float():
    rng = np.random.default_rng(7)
    x = rmsnorm_rows(rng)
    gamma = sp.quantize_gamma(rng.uniform(-3, 3, 96))
    for eps in (0.0, 1e-5):
        y = from_fx(both(sp.rmsnorm, x, gamma, sp.quantize_eps(eps)))
        want = rmsnorm_float(x, gamma, sp.quantize_eps(eps) / 2.0**sp.EPS_FRAC)
        bound = 2.0**-13 * np.abs(want).max(-1, keepdims=True) + LSB
        assert np.all(np.abs(y - want) <= bound)


def rmsnorm_spec(row, gamma, eps):
    """docs/special.md's RMSNorm steps in Python integers, with math.isqrt as the rsqrt."""
    def shift(x, s):
        return (x + (1 << s >> 1)) >> s if s > 0 else x << -s

    n, sh = len(row), max(abs(v) for v in row).bit_length() - sp.RMS_IN_BITS
    xs = [shift(v, sh) for v in row]
    ms = max((sum(v * v for v in xs) + n // 2) // n + shift(eps, 2 * sh), 1)
    e = (ms.bit_length() - 29) >> 1
    r = math.isqrt((1 << 60) // shift(ms, 2 * e))
    return [min(max(shift(v * r * g, 34 + e), INT32_MIN), INT32_MAX) for v, g in zip(xs, gamma)]


def test_rmsnorm_follows_its_integer_definition_exactly():
    rng = np.random.default_rng(21)
    x, gamma = rmsnorm_rows(rng), sp.quantize_gamma(rng.uniform(-3, 3, 96))
    for eps in (0, 168, 1 << 30):
        want = [rmsnorm_spec(row, gamma.tolist(), eps) for row in x.tolist()]
        np.testing.assert_array_equal(sp.rmsnorm(x, gamma, eps), want)


def test_rmsnorm_of_a_zero_row_is_zero_with_or_without_eps():
    x = np.zeros((2, 16), np.int32)
    gamma = sp.quantize_gamma(np.ones(16))
    for eps in (0, 168, sp.EPS_MAX):
        np.testing.assert_array_equal(both(sp.rmsnorm, x, gamma, eps), 0)


def test_rmsnorm_saturates_large_gains():
    x = np.array([[1 << 20, -(1 << 20)] + [0] * 1022], np.int32)  # x / rms = +-sqrt(512)
    y = both(sp.rmsnorm, x, sp.quantize_gamma(np.full(1024, 30000.0)), 0)
    assert y[0, 0] == INT32_MAX and y[0, 1] == INT32_MIN


def test_rmsnorm_quant_is_quantize_act_of_rmsnorm():
    rng = np.random.default_rng(8)
    x, gamma = fx(rng, (4, 64), 2.0), sp.quantize_gamma(rng.uniform(0.5, 2, 64))
    got = both(sp.rmsnorm_quant, x, gamma, 168)
    for a, b in zip(got, quantize_act(sp.rmsnorm(x, gamma, 168))):
        np.testing.assert_array_equal(a, b)


def test_rmsnorm_parameters_out_of_range_are_rejected():
    with pytest.raises(ValueError, match=r"^gamma must be finite with \|gamma\| < 32768, got "):
        sp.quantize_gamma([1.0, 32768 - 2**-18])
    with pytest.raises(ValueError, match=r"^eps must be finite, >= 0 and below .*, got -1e-05$"):
        sp.quantize_eps(-1e-5)
    x, gamma = np.zeros((1, 4), np.int32), np.zeros(4, np.int32)
    with pytest.raises(ValueError, match=r"^eps must be an int in \[0, 2147483647\] .*, got "
                                         r"1e-05; convert a float with quantize_eps\(\)$"):
        sp.rmsnorm(x, gamma, 1e-5)
    with pytest.raises(ValueError, match=r"^gamma must have shape \(4,\) like the rows, got "
                                         r"\(3,\)$"):
        sp.rmsnorm(x, gamma[:3], 0)


# ---- SiLU and residual add -----------------------------------------------------------------

def test_silu_is_within_the_declared_bound_of_float():
    x = np.concatenate([np.arange(-20 << 12, 20 << 12, 3), [INT32_MIN, INT32_MAX, 1 << 28]])
    y = from_fx(sp.silu(x))
    real = from_fx(x)
    assert np.all(np.abs(y - real * (1 + np.tanh(real / 2)) / 2) <= 6e-4)
    assert sp.silu(np.array([0]))[0] == 0


def test_silu_mul_and_add_saturate_at_the_int32_limits():
    big = np.array([INT32_MAX, INT32_MIN, 1 << 20, -(1 << 20)], np.int32)
    np.testing.assert_array_equal(both(sp.silu_mul, big, big), [INT32_MAX, 0, 1 << 28, 0])
    np.testing.assert_array_equal(both(sp.add_sat, big, big),
                                  [INT32_MAX, INT32_MIN, 1 << 21, -(1 << 21)])


def test_silu_family_gives_the_same_bits_in_numpy_and_torch():
    rng = np.random.default_rng(9)
    a, b = fx(rng, (5, 33), 6.0), fx(rng, (5, 33), 50.0)
    both(sp.silu, a)
    y = both(sp.silu_mul, a, b)
    np.testing.assert_array_equal(y, np.clip(
        (sp.silu(a).astype(np.int64) * b + (1 << 11)) >> 12, INT32_MIN, INT32_MAX))
    both(sp.add_sat, a, b)


# ---- RoPE ----------------------------------------------------------------------------------

INV_FREQ = 10000.0 ** (-np.arange(0, 64, 2) / 64)


def test_rope_table_starts_at_cos_one_and_sin_zero():
    cos, sin = sp.rope_table(INV_FREQ, 50)
    assert cos.shape == sin.shape == (50, 32) and cos.dtype == np.int16
    assert np.all(cos[0] == 1 << sp.ROPE_FRAC) and np.all(sin[0] == 0)


def test_rope_is_the_hf_rotate_half_rotation_within_the_declared_bound():
    rng = np.random.default_rng(10)
    cos, sin = sp.rope_table(INV_FREQ, 4096)
    x, pos = fx(rng, (2, 6, 3, 64), 8.0), rng.integers(0, 4096, (2, 6))
    y = from_fx(both(sp.rope, x, pos, cos, sin))
    real, angle = from_fx(x), pos[..., None, None] * INV_FREQ
    x1, x2 = real[..., :32], real[..., 32:]
    want = np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle),
                           x2 * np.cos(angle) + x1 * np.sin(angle)], -1)
    bound = (np.abs(x1) + np.abs(x2)) * 2.0 ** -(sp.ROPE_FRAC + 1) + LSB / 2
    assert np.all(np.abs(y - want) <= np.concatenate([bound, bound], -1) + 1e-12)


def test_rope_at_position_zero_is_the_identity_and_saturates_at_the_limits():
    cos, sin = sp.rope_table(INV_FREQ, 8)
    x = np.random.default_rng(11).integers(INT32_MIN, INT32_MAX, (4, 2, 64)).astype(np.int32)
    np.testing.assert_array_equal(both(sp.rope, x, np.zeros(4, np.int64), cos, sin), x)
    corner = np.full((1, 1, 64), INT32_MAX, np.int32)
    y = both(sp.rope, corner, np.array([3]), cos, sin)
    grows = cos[3].astype(int) + sin[3] > 1 << sp.ROPE_FRAC  # x2 c + x1 s > x2
    assert grows.any() and np.all(y[0, 0, 32:][grows] == INT32_MAX)


def test_rope_rejects_positions_beyond_the_table_and_odd_widths():
    cos, sin = sp.rope_table(INV_FREQ, 8)
    x = np.zeros((2, 1, 64), np.int32)
    with pytest.raises(ValueError, match=r"^positions must lie in \[0, 8\) of the table, got "
                                         r"values up to 8; build a longer table$"):
        sp.rope(x, np.array([0, 8]), cos, sin)
    with pytest.raises(ValueError, match=r"^x must be \[..., heads, d\] with even d"):
        sp.rope(np.zeros((2, 1, 63), np.int32), np.array([0, 1]), cos, sin)
    with pytest.raises(ValueError, match=r"^inv_freq must be a non-empty finite 1-D array"):
        sp.rope_table([], 8)


# ---- attention -----------------------------------------------------------------------------

def setup(rng, rows=4, heads=6, kv_heads=2, d=64, t_len=40, bits=8, q_scale=1.0):
    q_real = rng.normal(size=(rows, heads, d)) * q_scale
    k_real, k_cache = kv(rng, kv_heads, t_len, d, bits)
    v_real, v_cache = kv(rng, kv_heads, t_len, d, bits)
    pos = np.sort(rng.integers(0, t_len, rows))
    pos[-1] = t_len - 1
    return (q_real, k_real, v_real), (to_fx(q_real), k_cache, v_cache, pos)


@pytest.mark.parametrize("bits, t_len, splits, topk", [
    (8, 40, 1, 0), (4, 40, 3, 0), (8, 1, 1, 0), (4, 5, 9, 0), (8, 40, 4, 1),
    (8, 40, 2, 40), (4, 40, 5, 7), (8, 17, 3, 100)])
def test_attention_gives_the_same_bits_in_numpy_and_torch(bits, t_len, splits, topk):
    rng = np.random.default_rng(12 + t_len + splits)
    _, args = setup(rng, t_len=t_len, bits=bits, q_scale=3.0)
    out = both(sp.attention, *args, kv_heads=2, kv_bits=bits, splits=splits, topk=topk)
    assert out.shape == (4, 6, 64) and out.dtype == np.int32


@pytest.mark.parametrize("bits, floor", [(8, 0.99), (4, 0.95)])
def test_attention_cosine_to_float_attention_exceeds_the_floor(bits, floor):
    rng = np.random.default_rng(13)
    (q, k, v), args = setup(rng, rows=5, heads=8, t_len=128, bits=bits, q_scale=2.0)
    for splits in (1, 4):
        out = from_fx(sp.attention(*args, kv_heads=2, kv_bits=bits, splits=splits))
        assert cosine(out, sp.attention_reference_float(q, k, v, args[3], kv_heads=2)) > floor


def test_split_attention_is_within_the_declared_bound_of_the_unsplit_result():
    rng = np.random.default_rng(14)
    _, args = setup(rng, t_len=40, q_scale=4.0)
    whole = sp.attention(*args, kv_heads=2, kv_bits=8).astype(np.int64)
    vmax = np.abs(kv_dequant(*args[2], 8, 16)).max()
    for splits in (2, 3, 7):
        diff = np.abs(sp.attention(*args, kv_heads=2, kv_bits=8, splits=splits) - whole)
        assert diff.max() <= split_bound(40, vmax)


def test_split_attention_is_exact_with_one_token_per_split_or_one_row_token():
    rng = np.random.default_rng(15)
    _, args = setup(rng, t_len=12)
    whole = sp.attention(*args, kv_heads=2, kv_bits=8)
    np.testing.assert_array_equal(sp.attention(*args, kv_heads=2, kv_bits=8, splits=12), whole)
    np.testing.assert_array_equal(sp.attention(*args, kv_heads=2, kv_bits=8, splits=50), whole)
    first = args[:3] + (np.zeros(4, np.int64),)
    np.testing.assert_array_equal(sp.attention(*first, kv_heads=2, kv_bits=8, splits=3),
                                  sp.attention(*first, kv_heads=2, kv_bits=8))


def test_top1_attention_returns_the_kept_tokens_value_for_any_split():
    rng = np.random.default_rng(16)
    _, args = setup(rng, rows=1, heads=2, kv_heads=1, t_len=30, q_scale=3.0)
    v = kv_dequant(*args[2], 8, 16)
    outs = [sp.attention(*args, kv_heads=1, kv_bits=8, splits=s, topk=1) for s in (1, 4)]
    np.testing.assert_array_equal(outs[0], outs[1])
    token = [np.flatnonzero(np.all(v[0] == outs[0][0, h], axis=-1)) for h in (0, 1)]
    assert len(token[0]) == 1 and token[0] == token[1]


def test_topk_ties_keep_the_lower_index():
    rng = np.random.default_rng(17)
    _, (q, k_cache, v_cache, _) = setup(rng, rows=1, heads=2, kv_heads=1, t_len=6)
    k_cache = tuple(np.repeat(a[:, :1], 6, axis=1) for a in k_cache)  # six equal keys
    pruned = sp.attention(q, k_cache, v_cache, np.array([5]), kv_heads=1, kv_bits=8, topk=2)
    first2 = sp.attention(q, tuple(a[:, :2] for a in k_cache), tuple(a[:, :2] for a in v_cache),
                          np.array([1]), kv_heads=1, kv_bits=8)
    np.testing.assert_array_equal(pruned, first2)


def test_topk_of_at_least_the_valid_count_keeps_every_token():
    rng = np.random.default_rng(18)
    _, args = setup(rng, t_len=20)
    whole = sp.attention(*args, kv_heads=2, kv_bits=4)
    for topk in (20, 21, 1000):
        np.testing.assert_array_equal(sp.attention(*args, kv_heads=2, kv_bits=4, topk=topk), whole)


def test_attention_ignores_tokens_after_each_rows_position():
    rng = np.random.default_rng(19)
    _, (q, k_cache, v_cache, _) = setup(rng, t_len=16)
    pos = np.array([0, 5, 9, 9])
    out = sp.attention(q, k_cache, v_cache, pos, kv_heads=2, kv_bits=8, splits=3, topk=4)
    noisy = [tuple(a.copy() for a in cache) for cache in (k_cache, v_cache)]
    for cache in noisy:
        cache[0][:, 10:] = rng.integers(-127, 128, cache[0][:, 10:].shape)
        cache[2][:, 10:] = 1 << 14
    np.testing.assert_array_equal(
        sp.attention(q, *noisy, pos, kv_heads=2, kv_bits=8, splits=3, topk=4), out)


def test_attention_reference_of_one_token_returns_its_value():
    v = np.arange(8.0).reshape(1, 1, 8)
    out = sp.attention_reference_float(np.ones((1, 2, 8)), np.ones((1, 1, 8)), v, [0],
                                       kv_heads=1)
    np.testing.assert_allclose(out, np.repeat(v, 2, axis=1))


@pytest.mark.parametrize("change, message", [
    (dict(positions=np.array([0, 40])), r"^positions must lie in \[0, 40\) of the cache, got "
                                        r"values in \[0, 40\]$"),
    (dict(kv_heads=4), r"^kv_heads 4 must be a positive int dividing the 6 query heads$"),
    (dict(splits=0), r"^splits must be an int >= 1, got 0$"),
    (dict(topk=-1), r"^topk must be an int >= 0 \(0 keeps every token\), got -1$"),
    (dict(kv_bits=5), r"^bits must be one of \(4, 8\), got 5$"),
    (dict(sm_scale=-1.0), r"^sm_scale must be a finite number > 0, got -1.0$"),
    (dict(q=np.zeros((2, 6, 264), np.int32)), r"^head_dim 264 exceeds MAX_HEAD_DIM = 256"),
    (dict(v_cache=(np.zeros((2, 40, 64), np.int8),) * 3), r"^v_cache must be the quantize_kv "
                                                          r"fields \(q, g, mant, exp\), got 3"),
    (dict(k_cache=(np.zeros((2, 40, 64), np.int8), np.ones((2, 40, 5), np.uint8),
                   np.ones((2, 40), np.int32), np.ones((2, 40), np.int32))),
     r"^k_cache must be q \[2, T, 64\], g \[2, T, d/group\], mant and exp \[2, T\] with "),
])
def test_attention_arguments_out_of_range_are_rejected(change, message):
    rng = np.random.default_rng(20)
    _, (q, k_cache, v_cache, pos) = setup(rng, rows=2)
    args = dict(q=q, k_cache=k_cache, v_cache=v_cache, positions=pos[:2], kv_heads=2, kv_bits=8,
                splits=1, topk=0)
    with pytest.raises(ValueError, match=message):
        sp.attention(**(args | change))


def test_attention_rejects_caches_longer_than_max_context():
    t_len = sp.MAX_CONTEXT + 1
    cache = (np.zeros((1, t_len, 2), np.int8), np.ones((1, t_len, 1), np.uint8),
             np.ones((1, t_len), np.int32), np.zeros((1, t_len), np.int32))
    with pytest.raises(ValueError, match=r"^k_cache must be q \[1, T, 2\].* with 1 <= T <= "
                                         r"131072, got shapes"):
        sp.attention(np.zeros((1, 1, 2), np.int32), cache, cache, np.array([0]), kv_heads=1,
                     kv_bits=8)


def test_ops_registers_every_runtime_function():
    assert set(sp.OPS) == {"exp_fx", "softmax", "partial", "merge", "rmsnorm", "rmsnorm_quant",
                           "silu", "silu_mul", "add_sat", "rope", "attention"}
    assert all(sp.OPS[name] is getattr(sp, name) for name in sp.OPS)
