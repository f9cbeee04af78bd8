import numpy as np
import pytest
import torch

from trimem import numerics as nu

pytestmark = pytest.mark.unit

INT32_MIN, INT32_MAX = nu.INT32_MIN, nu.INT32_MAX


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def both(fn, *args):
    """fn on numpy and on torch inputs on every device; asserts the same bits and dtype.

    Returns the numpy outputs.
    """
    out_np = fn(*args)
    for device in DEVICES:
        out_t = fn(*(torch.as_tensor(a, device=device) if isinstance(a, np.ndarray) else a
                     for a in args))
        pairs = zip(out_np, out_t) if isinstance(out_np, tuple) else [(out_np, out_t)]
        for a, b in pairs:
            assert b.device.type == device
            assert str(a.dtype) == str(b.dtype).removeprefix("torch.")
            np.testing.assert_array_equal(a, b.cpu().numpy())
    return out_np


def fx_rows(rng, shape, scale=1.0):
    return nu.to_fx(rng.normal(size=shape) * scale)


def cosine(a, b):
    a, b = np.ravel(a), np.ravel(b)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


# ---- rounding, saturation, wrap --------------------------------------------------------------

def test_rshift_round_rounds_ties_half_up_for_both_signs():
    x = np.array([-5, -3, -1, 1, 3, 5, 6, -6])
    np.testing.assert_array_equal(both(nu.rshift_round, x, 1), [-2, -1, 0, 1, 2, 3, 3, -3])
    np.testing.assert_array_equal(both(nu.rshift_round, x * 2, 2), [-2, -1, 0, 1, 2, 3, 3, -3])


def test_rshift_round_with_non_positive_shift_shifts_left():
    x = np.array([3, -3, 7])
    np.testing.assert_array_equal(both(nu.rshift_round, x, np.array([0, -2, -5])),
                                  [3, -12, 224])


def test_rshift_round_matches_exact_rounding_on_random_values():
    rng = np.random.default_rng(1)
    x = rng.integers(-(1 << 61), 1 << 61, size=2000)
    s = rng.integers(-1, 62, size=2000)
    got = both(nu.rshift_round, x, s)
    want = [xi << -si if si <= 0 else (2 * xi + (1 << si)) // (2 << si)
            for xi, si in zip(x.tolist(), s.tolist())]
    np.testing.assert_array_equal(got, want)


def test_sat_clamps_at_the_signed_limits():
    x = np.array([INT32_MIN - 1, INT32_MIN, -1, INT32_MAX, INT32_MAX + 1], dtype=np.int64)
    np.testing.assert_array_equal(both(nu.sat, x, 32),
                                  [INT32_MIN, INT32_MIN, -1, INT32_MAX, INT32_MAX])
    np.testing.assert_array_equal(both(nu.sat, np.array([-300, 300]), 8), [-128, 127])


def test_wrap32_wraps_like_a_32_bit_register():
    x = np.array([INT32_MAX + 1, INT32_MIN - 1, 1 << 40, -(1 << 40) - 5, 7], dtype=np.int64)
    got = both(nu.wrap32, x)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, [INT32_MIN, INT32_MAX, 0, -5, 7])


def test_to_fx_rounds_half_up_and_saturates():
    half = 0.5 / 2**nu.ACT_FRAC
    np.testing.assert_array_equal(nu.to_fx([half, -half, 1.0, 1e9, -1e9]),
                                  [1, 0, 1 << nu.ACT_FRAC, INT32_MAX, INT32_MIN])
    assert nu.from_fx(np.int32(3 << nu.ACT_FRAC)) == 3.0


def test_to_fx_rejects_nan():
    with pytest.raises(ValueError, match=r"^to_fx got NaN"):
        nu.to_fx([np.nan])


# ---- scale codes and activations -----------------------------------------------------------

def test_encode_amax_gives_the_smallest_code_that_covers_amax():
    amax = np.array([1, 2, 32767, 32768, 32769, 65535, 65537, INT32_MAX, 1 << 31, 12345678])
    mant, exp = both(nu.encode_amax, amax)
    full = mant.astype(np.int64) << exp
    assert np.all(full >= amax) and np.all(mant < 1 << nu.SCALE_MANT_BITS)
    assert np.all(full - amax < (1 << exp.astype(np.int64)))
    assert exp.max() == nu.ACT_EXP_MAX
    np.testing.assert_array_equal(mant[:4], [1, 2, 32767, 16384])


def test_encode_amax_of_zero_is_the_code_of_one():
    mant, exp = both(nu.encode_amax, np.array([0, 0]))
    np.testing.assert_array_equal(mant, [1, 1])
    np.testing.assert_array_equal(exp, [0, 0])


def test_quantize_act_matches_its_integer_formula_and_torch():
    rng = np.random.default_rng(2)
    x = np.concatenate([fx_rows(rng, (6, 48), 3.0), fx_rows(rng, (2, 48), 3e4)])
    x[7, 5] = INT32_MIN
    a8, mant, exp = both(nu.quantize_act, x)
    for row in range(len(x)):
        recip = (127 << nu.RECIP_SHIFT) // int(mant[row])
        shift = nu.RECIP_SHIFT + int(exp[row])
        want = [max(-127, min(127, (v * recip + (1 << shift - 1)) >> shift))
                for v in x[row].tolist()]
        np.testing.assert_array_equal(a8[row], want)


def test_quantize_act_uses_the_full_int8_range_and_never_minus_128():
    rng = np.random.default_rng(3)
    x = fx_rows(rng, (32, 64))
    x[0] = INT32_MAX
    x[1] = INT32_MIN
    a8, _, _ = both(nu.quantize_act, x)
    assert a8.min() >= -127
    np.testing.assert_array_equal(np.abs(a8).max(axis=-1), 127)


def test_quantize_act_of_a_zero_row_is_zero_with_the_code_of_one():
    a8, mant, exp = both(nu.quantize_act, np.zeros((2, 16), dtype=np.int32))
    assert not a8.any()
    np.testing.assert_array_equal(mant, [1, 1])
    np.testing.assert_array_equal(exp, [0, 0])


def test_quantize_act_round_trips_within_half_a_step():
    rng = np.random.default_rng(4)
    x = fx_rows(rng, (8, 64), 10.0)
    a8, mant, exp = nu.quantize_act(x)
    back = both(nu.dequantize_act, a8, mant, exp)
    step = (mant.astype(np.int64) << exp) / 127.0
    assert np.all(np.abs(back - x) <= step[:, None] / 2 + 1)


def test_float_activations_are_rejected_with_a_hint():
    with pytest.raises(TypeError, match=r"^x must be an integer array, got .*to_fx"):
        nu.quantize_act(np.ones((2, 4)))


# ---- weights ------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_weight_uses_the_largest_group_multiplier_once_per_row(bits):
    rng = np.random.default_rng(5)
    qw = nu.quantize_weight(rng.normal(size=(16, 128)), bits, 32)
    np.testing.assert_array_equal(qw.g.max(axis=1), nu.GROUP_MAX)
    assert np.abs(qw.q).max() == nu.qmax(bits)
    assert np.all(qw.mult >= 1 << (nu.SCALE_MANT_BITS - 1))


@pytest.mark.parametrize("bits", [4, 8])
def test_dequantized_weight_is_within_half_a_step(bits):
    rng = np.random.default_rng(6)
    w = rng.normal(size=(8, 64)) * 0.02
    qw = nu.quantize_weight(w, bits, 16)
    step = np.repeat(qw.g, 16, axis=1) * qw.step[:, None]
    assert np.all(np.abs(nu.dequantize_weight(qw) - w) <= step / 2 * (1 + 1e-9))


def test_zero_weight_rows_quantize_to_zero():
    w = np.zeros((3, 8))
    w[1] = 1.0
    qw = nu.quantize_weight(w, 4, 4)
    assert not qw.q[[0, 2]].any() and not qw.mult[[0, 2]].any()
    np.testing.assert_array_equal(qw.g[[0, 2]], 1)
    np.testing.assert_allclose(nu.dequantize_weight(qw)[1], 1.0, rtol=2**-14)


def test_k_not_a_multiple_of_group_is_rejected():
    with pytest.raises(ValueError, match=r"^group 32 must be a positive integer that divides "
                                         r"the row length 48;"):
        nu.quantize_weight(np.ones((2, 48)), 4, 32)


def test_unsupported_bit_width_is_rejected():
    with pytest.raises(ValueError, match=r"^bits must be one of \(4, 8\), got 3$"):
        nu.quantize_weight(np.ones((2, 8)), 3, 4)


def test_weights_too_large_for_the_requant_shift_are_rejected():
    with pytest.raises(ValueError, match=r"^requant factor .* \(row 1\) must be below 0\.25"):
        nu.quantize_weight(np.array([[1.0, 0.0], [1e6, 0.0]]), 8, 2)


def test_encode_requant_keeps_fifteen_bits_and_clamps_tiny_factors():
    mult, shift = nu.encode_requant([0.1, 1e-30, 0.0, 0.2499])
    assert mult[0] / 2.0 ** shift[0] == pytest.approx(0.1, rel=2**-15)
    np.testing.assert_array_equal(shift[1:3], nu.REQUANT_SHIFT_MAX)
    np.testing.assert_array_equal(mult[1:3], 0)
    assert mult.max() < 1 << nu.SCALE_MANT_BITS and shift.min() >= nu.REQUANT_SHIFT_MIN


def test_quant_weight_rejects_fields_out_of_range():
    qw = nu.quantize_weight(np.ones((2, 8)), 4, 4)
    g = qw.g.copy()
    g[0, 0] = 0
    with pytest.raises(ValueError, match=r"^g must lie in \[1, 15\], got values in \[0, 15\]$"):
        nu.QuantWeight(qw.q, g, qw.mult, qw.shift, 4, 4)
    with pytest.raises(ValueError, match=r"^q must lie in \[-7, 7\]"):
        nu.QuantWeight(qw.q * 2, qw.g, qw.mult, qw.shift, 4, 4)


def test_effective_weight_is_q_times_the_repeated_group_multiplier():
    q = np.array([[127, -127, 1, -1]], dtype=np.int8)
    g = np.array([[15, 2]], dtype=np.uint8)
    w = both(nu.effective_weight, q, g, 2)
    assert w.dtype == np.int16
    np.testing.assert_array_equal(w, [[1905, -1905, 2, -2]])


# ---- integer linear -------------------------------------------------------------------------

def test_accumulators_wrap_at_32_bits():
    k = 9000
    a8 = np.full((2, k), 127, dtype=np.int8)
    a8[1] = -127
    w = np.full((1, k), 1905, dtype=np.int16)
    acc = both(nu.accumulate, a8, w)
    true = 127 * 1905 * k
    np.testing.assert_array_equal(acc[:, 0], [(true + (1 << 31)) % (1 << 32) - (1 << 31),
                                              (-true + (1 << 31)) % (1 << 32) - (1 << 31)])


def test_linear_saturates_at_the_int32_limits():
    a8 = np.array([[127] * 4, [-127] * 4], dtype=np.int8)
    w = np.full((1, 4), 1905, dtype=np.int16)
    mant, exp = np.array([32767, 32767]), np.array([17, 17])
    mult, shift = np.array([32767], dtype=np.int32), np.array([17], dtype=np.uint8)
    y = both(nu.linear, a8, mant, exp, w, mult, shift)
    np.testing.assert_array_equal(y[:, 0], [INT32_MAX, INT32_MIN])


def test_linear_matches_its_integer_formula_and_torch():
    rng = np.random.default_rng(7)
    x = fx_rows(rng, (5, 64), 4.0)
    qw = nu.quantize_weight(rng.normal(size=(12, 64)) * 0.1, 4, 16)
    a8, mant, exp = nu.quantize_act(x)
    y = both(nu.linear, a8, mant, exp, qw.w_eff, qw.mult, qw.shift)
    acc = a8.astype(np.int64) @ qw.w_eff.astype(np.int64).T
    for i, j in np.ndindex(y.shape):
        s = int(qw.shift[j]) - int(exp[i])
        prod = int(acc[i, j]) * int(qw.mult[j]) * int(mant[i])
        assert y[i, j] == (prod + (1 << s - 1)) >> s


@pytest.mark.parametrize("bits, nm, bound", [(8, (1, 1), 0.99), (4, (1, 1), 0.95),
                                             (4, (2, 4), 0.95)])
def test_linear_tracks_the_float_reference(bits, nm, bound):
    rng = np.random.default_rng(8)
    x = rng.normal(size=(16, 256))
    w = rng.normal(size=(64, 256)) * 0.05
    w = w * nu.nm_prune_mask(w, *nm)
    qw = nu.quantize_weight(w, bits, 32)
    a8, mant, exp = nu.quantize_act(nu.to_fx(x))
    y = nu.from_fx(nu.linear(a8, mant, exp, qw.w_eff, qw.mult, qw.shift))
    assert cosine(y, x @ w.T) > bound


# ---- N:M sparsity ---------------------------------------------------------------------------

def test_nm_prune_mask_keeps_the_largest_and_breaks_ties_by_lower_index():
    w = np.array([[1.0, -1.0, 1.0, 1.0, 0.1, -3.0, 2.0, 0.5]])
    np.testing.assert_array_equal(nu.nm_prune_mask(w, 2, 4),
                                  [[True, True, False, False, False, True, True, False]])


@pytest.mark.parametrize("nm", [(1, 1), (1, 2), (2, 4), (1, 4), (2, 8), (4, 8)])
def test_nm_pack_round_trips_pruned_weights(nm):
    rng = np.random.default_rng(9)
    q = rng.integers(-7, 8, size=(5, 32)).astype(np.int8)
    q = q * nu.nm_prune_mask(q, *nm)
    values, idx = nu.nm_pack(q, *nm)
    assert values.shape == idx.shape == (5, 32 * nm[0] // nm[1])
    assert idx.dtype == np.uint8
    np.testing.assert_array_equal(nu.nm_unpack(values, idx, *nm, 32), q)


def test_nm_pack_fills_sparse_blocks_with_the_lowest_zero_positions():
    values, idx = nu.nm_pack(np.array([[0, 0, 0, 5, 0, 0, 0, 0]]), 2, 4)
    np.testing.assert_array_equal(idx, [[0, 3, 0, 1]])
    np.testing.assert_array_equal(values, [[0, 5, 0, 0]])


def test_nm_pack_rejects_unpruned_input():
    with pytest.raises(ValueError, match=r"^row 0 block 1 has 3 nonzeros, more than 2:4 allows"):
        nu.nm_pack(np.array([[1, 0, 0, 0, 1, 1, 1, 0]]), 2, 4)


def test_nm_unpack_rejects_repeated_indices():
    with pytest.raises(ValueError, match=r"^idx must be strictly ascending"):
        nu.nm_unpack(np.array([[1, 2]]), np.array([[1, 1]]), 2, 4, 4)


def test_k_not_a_multiple_of_m_is_rejected():
    with pytest.raises(ValueError, match=r"^row length 6 is not a multiple of m=4"):
        nu.nm_prune_mask(np.ones((1, 6)), 2, 4)


# ---- KV cache and embedding -----------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_kv_is_bit_exact_in_torch_and_within_half_a_step(bits):
    rng = np.random.default_rng(10)
    x = fx_rows(rng, (2, 3, 7, 64), 5.0)
    x[0, 0, 0] = 0
    x[1, 2, 6, :32] = INT32_MAX
    q, g, mant, exp = both(nu.quantize_kv, x, bits, 32)
    assert q.shape == x.shape and g.shape == (2, 3, 7, 2) and mant.shape == (2, 3, 7)
    assert np.abs(q).max() == nu.qmax(bits) and g.max() == nu.GROUP_MAX and g.min() >= 1
    assert not q[0, 0, 0].any()
    back = both(nu.kv_dequant, q, g, mant, exp, bits, 32)
    full = (mant.astype(np.int64) << exp)[..., None]
    step = np.repeat(g, 32, axis=-1) * full / nu.kv_levels(bits)
    assert np.all(np.abs(back.astype(np.int64) - x) <= step / 2 + 1)


def test_embedding_lookup_is_bit_exact_in_torch_and_close_to_the_table():
    rng = np.random.default_rng(11)
    table = rng.normal(size=(50, 32)) * 0.05
    table[3] = 0.0
    q, mant, exp = nu.quantize_embedding(table)
    ids = np.array([[3, 7, 49], [0, 0, 1]])
    rows = both(nu.embed, ids, q, mant, exp)
    assert rows.shape == (2, 3, 32)
    assert not rows[0, 0].any()
    step = (mant.astype(np.int64) << exp)[ids] / 127.0 / 2**nu.ACT_FRAC
    assert np.all(np.abs(nu.from_fx(rows) - table[ids]) <= step[..., None] / 2 + 2**-nu.ACT_FRAC)


def test_ops_table_lists_the_runtime_functions():
    assert nu.OPS["linear"] is nu.linear and nu.OPS["quantize_kv"] is nu.quantize_kv
    assert all(callable(fn) for fn in nu.OPS.values())


@pytest.mark.parametrize("a_max,b_max,k", [(127, 127, 4096), (1 << 31, 1 << 15, 256),
                                           (1 << 40, 1 << 12, 5), (1 << 50, 1 << 10, 3)],
                         ids=["one-chunk", "chunks-of-128", "chunks-of-2", "int64-fallback"])
def test_exact_matmul_equals_python_integers_in_numpy_and_torch(a_max, b_max, k):
    """float64 BLAS in chunks of K must give exactly the integer products and sums."""
    from trimem import xp

    rng = np.random.default_rng(k)
    a = rng.integers(-a_max, a_max, (3, k), dtype=np.int64, endpoint=True)
    b = rng.integers(-b_max, b_max, (k, 2), dtype=np.int64, endpoint=True)
    a[0, :] = a_max
    b[:, 0] = b_max
    exact = np.array([[sum(int(x) * int(y) for x, y in zip(row, col)) for col in b.T]
                      for row in a], dtype=object)
    wrapped = ((exact + (1 << 63)) % (1 << 64) - (1 << 63)).astype(np.int64)
    np.testing.assert_array_equal(xp.NUMPY.matmul_exact(a, b), wrapped)
    np.testing.assert_array_equal(xp.TORCH.matmul_exact(torch.as_tensor(a), torch.as_tensor(b))
                                  .numpy(), wrapped)
