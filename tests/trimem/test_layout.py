import numpy as np
import pytest

from trimem import layout as lay
from trimem import numerics as nu

pytestmark = pytest.mark.unit

NM_PATTERNS = [(1, 1), (1, 2), (2, 4), (1, 4), (2, 8), (4, 8)]


def quant_weight(n, k, bits, nm, group, seed=0):
    w = np.random.default_rng(seed).normal(size=(n, k))
    return nu.quantize_weight(w * nu.nm_prune_mask(w, *nm), bits, group)


def assert_same_weight(a, b):
    for name in ("q", "g", "mult", "shift"):
        got, want = getattr(b, name), getattr(a, name)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    assert (a.bits, a.group) == (b.bits, b.group)


# ---- bit fields ----------------------------------------------------------------------------

@pytest.mark.parametrize("nbits", range(9))
def test_pack_bits_round_trips_rows_of_odd_length(nbits):
    values = np.random.default_rng(nbits).integers(0, 1 << nbits, size=(3, 7), dtype=np.uint8)
    packed = lay.pack_bits(values, nbits)
    assert packed.shape == (3, -(-7 * nbits // 8))
    np.testing.assert_array_equal(lay.unpack_bits(packed, nbits, 7), values)


def test_pack_bits_is_lsb_first_and_pads_each_row():
    np.testing.assert_array_equal(lay.pack_bits([[1, 2, 3], [3, 0, 0]], 2),
                                  [[0b111001], [0b000011]])


def test_pack_int4_puts_the_first_element_in_the_low_nibble():
    np.testing.assert_array_equal(lay.pack_int4([1, -1, -8, 7]), [0xF1, 0x78])
    values = np.arange(-8, 8, dtype=np.int8)
    np.testing.assert_array_equal(lay.unpack_int4(lay.pack_int4(values), 16), values)


def test_pack_int4_rejects_values_outside_four_bits():
    with pytest.raises(ValueError, match=r"^int4 values must lie in \[-8, 7\], got values in "
                                         r"\[0, 8\]$"):
        lay.pack_int4([0, 8])


# ---- weight tiles --------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("nm", NM_PATTERNS)
def test_weight_tile_round_trips_and_has_the_declared_size(bits, nm):
    qw = quant_weight(6, 64, bits, nm, 16)
    buf = lay.pack_weight_tile(qw, nm)
    assert buf.dtype == np.uint8 and buf.ndim == 1
    assert buf.size == lay.weight_tile_bytes(6, 64, bits, nm, 16)
    back = lay.unpack_weight_tile(buf, 6, 64, bits, nm, 16)
    assert_same_weight(qw, back)
    np.testing.assert_array_equal(back.w_eff, qw.w_eff)


def test_weight_tile_sections_follow_each_other_in_contract_order():
    sections = lay.weight_tile_sections(4, 32, 4, (2, 4), 8)
    assert list(sections) == ["values", "indices", "groups", "requant"]
    assert sections == {"values": (0, 4 * 8), "indices": (32, 4 * 4), "groups": (48, 4 * 4),
                        "requant": (64, 4 * 8)}


def test_weight_tile_bytes_match_a_hand_packed_dense_int4_tile():
    q = np.array([[1, -1, 2, -2, 3, -3], [7, -7, 0, 0, 0, 1]], dtype=np.int8)
    g = np.array([[15, 1, 2], [3, 4, 5]], dtype=np.uint8)
    mult = np.array([0x1234, 0x4000], dtype=np.int32)
    shift = np.array([20, 62], dtype=np.uint8)
    qw = nu.QuantWeight(q, g, mult, shift, 4, 2)
    want = [0xF1, 0xE2, 0xD3, 0x97, 0x00, 0x10,
            15, 1, 2, 3, 4, 5,
            0x34, 0x12, 0, 0, 20, 0, 0, 0,
            0x00, 0x40, 0, 0, 62, 0, 0, 0]
    np.testing.assert_array_equal(lay.pack_weight_tile(qw, lay.DENSE), want)


def test_int4_rows_of_odd_kept_length_are_padded_to_a_byte():
    qw = quant_weight(3, 4, 4, (1, 4), 4)
    assert lay.weight_tile_sections(3, 4, 4, (1, 4), 4)["values"] == (0, 3)
    assert_same_weight(qw, lay.unpack_weight_tile(lay.pack_weight_tile(qw, (1, 4)),
                                                  3, 4, 4, (1, 4), 4))


def test_weight_tile_of_the_wrong_size_is_rejected():
    buf = lay.pack_weight_tile(quant_weight(2, 16, 8, (1, 1), 8), lay.DENSE)
    with pytest.raises(ValueError, match=r"^weight tile is 51 bytes, expected 52 for \[2, 16\]"):
        lay.unpack_weight_tile(buf[:-1], 2, 16, 8, lay.DENSE, 8)


def test_weight_tile_with_nonzero_reserved_bytes_is_rejected():
    buf = lay.pack_weight_tile(quant_weight(2, 16, 8, (1, 1), 8), lay.DENSE)
    buf[-1] = 1
    with pytest.raises(ValueError, match=r"^requant section has nonzero reserved bytes"):
        lay.unpack_weight_tile(buf, 2, 16, 8, lay.DENSE, 8)


def test_pack_weight_tile_rejects_a_pattern_the_weight_does_not_follow():
    qw = quant_weight(2, 16, 8, (1, 1), 8)
    with pytest.raises(ValueError, match=r"^row 0 block 0 has \d nonzeros, more than 2:4 allows"):
        lay.pack_weight_tile(qw, (2, 4))


def test_weight_tile_geometry_must_divide():
    with pytest.raises(ValueError, match=r"^k=30 must be a multiple of m and of group=8"):
        lay.weight_tile_bytes(2, 30, 4, (2, 4), 8)


# ---- scale codes and activation rows -------------------------------------------------------

def test_scale_codes_are_mant_le_then_exp_then_zero():
    buf = lay.pack_scale_codes(np.array([0x1234, 1]), np.array([5, 17]))
    np.testing.assert_array_equal(buf, [0x34, 0x12, 5, 0, 1, 0, 17, 0])
    mant, exp = lay.unpack_scale_codes(buf)
    np.testing.assert_array_equal(mant, [0x1234, 1])
    np.testing.assert_array_equal(exp, [5, 17])


def test_scale_codes_round_trip_quantize_act_output():
    x = nu.to_fx(np.random.default_rng(1).normal(size=(9, 16)) * 100)
    _, mant, exp = nu.quantize_act(x)
    back = lay.unpack_scale_codes(lay.pack_scale_codes(mant, exp))
    np.testing.assert_array_equal(back[0], mant)
    np.testing.assert_array_equal(back[1], exp)


def test_activation_rows_round_trip_and_fx_is_little_endian():
    a8 = np.array([[-127, 0, 127], [1, -1, 5]], dtype=np.int8)
    np.testing.assert_array_equal(lay.unpack_a8_rows(lay.pack_a8_rows(a8), 3), a8)
    fx = np.array([[1, -2], [nu.INT32_MAX, nu.INT32_MIN]], dtype=np.int32)
    buf = lay.pack_fx_rows(fx)
    np.testing.assert_array_equal(buf[:8], [1, 0, 0, 0, 0xFE, 0xFF, 0xFF, 0xFF])
    np.testing.assert_array_equal(lay.unpack_fx_rows(buf, 2), fx)


# ---- KV cache ------------------------------------------------------------------------------

GEOMETRY = dict(layers=3, kv_heads=2, max_ctx=37, head_dim=64, bits=4, group=32,
                page_bytes=512)


def test_kv_token_bytes_are_values_groups_and_a_scale_code():
    assert lay.kv_token_bytes(64, 4, 32) == 32 + 2 + 4
    assert lay.kv_token_bytes(128, 8, 16) == 128 + 8 + 4


def test_kv_tokens_never_straddle_a_page_and_never_overlap():
    tb = lay.kv_token_bytes(64, 4, 32)
    page = GEOMETRY["page_bytes"]
    offsets = [lay.kv_offset(s, layer, h, kind, t, **GEOMETRY)
               for s in range(2) for layer in range(3) for h in range(2) for kind in "KV"
               for t in range(37)]
    assert all(off // page == (off + tb - 1) // page for off in offsets)
    assert len(set(offsets)) == len(offsets)
    assert max(offsets) + tb <= lay.kv_cache_bytes(2, **GEOMETRY)
    assert lay.kv_offset(0, 0, 0, "K", 14, **GEOMETRY) == page + tb


def test_kv_offset_follows_the_documented_formula():
    tpp = lay.tokens_per_page(64, 4, 32, 512)
    region = lay.kv_region_bytes(37, 64, 4, 32, 512)
    assert (tpp, region) == (13, 3 * 512)
    index = ((1 * 3 + 2) * 2 + 1) * 2 + 1
    assert lay.kv_offset(1, 2, 1, 1, 30, **GEOMETRY) == index * region + 2 * 512 + 4 * 38
    assert lay.kv_offset(1, 2, 1, "V", 30, **GEOMETRY) == lay.kv_offset(1, 2, 1, 1, 30,
                                                                         **GEOMETRY)


def test_kv_offset_rejects_a_token_past_max_ctx():
    with pytest.raises(ValueError, match=r"^token 37 is out of range \[0, 37\)"):
        lay.kv_offset(0, 0, 0, "K", 37, **GEOMETRY)


def test_kv_offset_rejects_an_unknown_kind():
    with pytest.raises(ValueError, match=r"^kind 'Q' is out of range \[0, 2\)"):
        lay.kv_offset(0, 0, 0, "Q", 0, **GEOMETRY)


def test_pages_too_small_for_one_token_are_rejected():
    with pytest.raises(ValueError, match=r"^page_bytes 16 cannot hold one token of 38 bytes"):
        lay.tokens_per_page(64, 4, 32, 16)


@pytest.mark.parametrize("bits", [4, 8])
def test_kv_tokens_round_trip_quantize_kv_output(bits):
    x = nu.to_fx(np.random.default_rng(2).normal(size=(5, 64)) * 3)
    q, g, mant, exp = nu.quantize_kv(x, bits, 16)
    buf = lay.pack_kv_tokens(q, g, mant, exp, bits)
    assert buf.shape == (5, lay.kv_token_bytes(64, bits, 16))
    for got, want in zip(lay.unpack_kv_tokens(buf, 64, bits, 16), (q, g, mant, exp)):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
