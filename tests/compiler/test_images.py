"""Weight image packing: the fast paths of `trimem.layout` give the bytes of the generic ones."""
import numpy as np
import pytest

from trimem import layout
from trimem.numerics import nm_pack, nm_prune_mask

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("nbits", range(9))
@pytest.mark.parametrize("shape", [(3, 1), (2, 7), (5, 64), (0, 4), (2, 3, 9)])
def test_bit_packing_by_whole_bytes_equals_packing_bit_by_bit(nbits, shape):
    values = np.random.default_rng(nbits).integers(0, 1 << nbits, size=shape)
    got = layout.pack_bits(values, nbits)
    want = layout._pack_any_bits(values, nbits)
    assert got.dtype == want.dtype == np.uint8
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(layout.unpack_bits(got, nbits, shape[-1]), values)


@pytest.mark.parametrize("keep, m", [(1, 1), (1, 2), (2, 4), (1, 4), (3, 4), (4, 8), (2, 8),
                                     (2, 16)])
def test_nm_split_by_pattern_table_equals_nm_pack(keep, m):
    rng = np.random.default_rng(m * 10 + keep)
    w = rng.integers(-7, 8, size=(48, 4 * m)).astype(np.int8)
    w[rng.random(w.shape) < 0.3] = 0
    q = np.where(nm_prune_mask(w, keep, m), w, 0).astype(np.int8)
    for got, want in zip(layout.nm_split(q, keep, m), nm_pack(q, keep, m)):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


def test_nm_split_names_a_block_with_too_many_nonzeros_as_nm_pack_does():
    q = np.ones((2, 8), np.int8)
    with pytest.raises(ValueError, match=r"^row 0 block 0 has 4 nonzeros, more than 2:4 "
                                         r"allows; prune with nm_prune_mask first$"):
        layout.nm_split(q, 2, 4)
