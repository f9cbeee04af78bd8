"""Unpacked weights kept between runs: merged tiles, the tile cache, gathers, and PIM weights
kept with PIMDRAM until it is written."""
import numpy as np
import pytest

from trimem import layout, numerics
from trimem.emulator.engine import CHUNK_BYTES, EmulatorError, Memory
from trimem.emulator.machine import Machine
from trimem.emulator.weights import TileCache, merge_tiles

from .test_pim import TWO_CHANNELS, gemv, place_gemv, run

pytestmark = pytest.mark.unit

NM = (2, 4)


def packed(rng, n, k=32, bits=4, group=8):
    """A random [n, k] 2:4 weight, quantized, and its packed tile."""
    w = rng.normal(size=(n, k))
    qw = numerics.quantize_weight(w * numerics.nm_prune_mask(w, *NM), bits, group)
    return qw, layout.pack_weight_tile(qw, NM)


def test_merged_tiles_unpack_as_the_stacked_weights():
    rng = np.random.default_rng(0)
    parts = [packed(rng, 3) for _ in range(4)]
    merged = merge_tiles(np.stack([tile for _, tile in parts]), 3, 32, 4, NM, 8)
    got = layout.unpack_weight_tile(merged, 12, 32, 4, NM, 8)
    np.testing.assert_array_equal(got.w_eff, np.concatenate([qw.w_eff for qw, _ in parts]))
    np.testing.assert_array_equal(got.mult, np.concatenate([qw.mult for qw, _ in parts]))
    np.testing.assert_array_equal(got.shift, np.concatenate([qw.shift for qw, _ in parts]))


def test_cache_unpacks_each_content_once_and_a_changed_byte_is_a_new_tile():
    cache = TileCache()
    qw, tile = packed(np.random.default_rng(1), 5)
    first = cache.unpack(tile, 5, 32, 4, NM, 8)
    np.testing.assert_array_equal(first.w_eff, qw.w_eff)
    assert cache.unpack(tile.copy(), 5, 32, 4, NM, 8) is first
    changed = tile.copy()
    changed[0] ^= 0x11
    other = cache.unpack(changed, 5, 32, 4, NM, 8)
    assert other is not first and not np.array_equal(other.w_eff, first.w_eff)
    assert (cache.hits, cache.misses) == (1, 2)
    with pytest.raises(ValueError, match="read-only"):
        first.w_eff[0, 0] = 1


def test_cache_drops_the_least_recently_used_tile_past_its_budget():
    rng = np.random.default_rng(2)
    tiles = [packed(rng, 4)[1] for _ in range(3)]
    cache = TileCache(budget=1)
    kept = [cache.unpack(t, 4, 32, 4, NM, 8) for t in tiles]
    assert len(cache.entries) == 1 and cache.nbytes == kept[-1].nbytes
    assert cache.unpack(tiles[-1], 4, 32, 4, NM, 8) is kept[-1]


def test_cache_passes_layout_errors_through_and_keeps_nothing():
    _, tile = packed(np.random.default_rng(3), 2)
    tile[-1] = 1
    cache = TileCache()
    with pytest.raises(ValueError, match=r"^requant section has nonzero reserved bytes"):
        cache.unpack(tile, 2, 32, 4, NM, 8)
    assert not cache.entries


def test_gather_reads_each_range_like_read_across_chunks_and_unwritten_bytes():
    mem = Memory("HBM", 4 * CHUNK_BYTES)
    mem.write(CHUNK_BYTES - 3, np.arange(10, dtype=np.uint8))
    addrs = [CHUNK_BYTES - 5, 0, CHUNK_BYTES + 2, 3 * CHUNK_BYTES]
    got = mem.gather(addrs, 8)
    np.testing.assert_array_equal(got, np.stack([mem.read(a, 8) for a in addrs]))
    with pytest.raises(EmulatorError, match=r"^HBM access of 8 bytes at 0x3ffffc is out of "):
        mem.gather([4 * CHUNK_BYTES - 4], 8)


def test_derived_values_are_dropped_by_the_next_write():
    mem = Memory("PIMDRAM", CHUNK_BYTES)
    mem.derived["w"] = 1
    mem.write(0, b"\x00")
    assert mem.derived == {}


def test_each_channel_multiplies_the_inputs_in_its_own_global_buffer():
    f = gemv(m=2, n=21, k=64, bits=4, group_log2=4, x_addr=0x40, s_addr=0x100, w_addr=2 * 256,
             o_addr=0x10, ch_mask=0b101)
    rng = np.random.default_rng(4)
    a8, mant, exp = numerics.quantize_act(rng.integers(-1 << 16, 1 << 16, (2, 64)))
    outs = []
    for channels in ((), (0, 2), (2,)):
        m = Machine(TWO_CHANNELS)
        place_gemv(m, f, np.random.default_rng(5))
        for c in channels:
            base = c * m.config.pim.gbuf_bytes
            m.memory("GBUF").write(base + f["x_addr"], layout.pack_a8_rows(a8))
            m.memory("GBUF").write(base + f["s_addr"], layout.pack_scale_codes(mant, exp))
        run(m, [f])
        outs.append(layout.unpack_fx_rows(m.memory("PRES").read(0x10, 2 * 21 * 4), 21))
    banks = TWO_CHANNELS.pim.banks_per_channel
    second = np.arange(21) % (2 * banks) >= banks
    np.testing.assert_array_equal(outs[2], np.where(second, outs[1], outs[0]))
    assert not np.array_equal(outs[0], outs[1])


def test_pim_weights_written_between_runs_are_unpacked_again():
    f = gemv(m=1, n=21, k=64, bits=8, x_addr=0x40, s_addr=0x100, w_addr=2 * 256, o_addr=0x10,
             ch_mask=0b011)
    memories = None
    for seed in (6, 7):
        m = Machine(TWO_CHANNELS)
        if memories is not None:
            m.memories = memories
        want = place_gemv(m, f, np.random.default_rng(seed))
        run(m, [f])
        got = layout.unpack_fx_rows(m.memory("PRES").read(0x10, 21 * 4), 21)
        np.testing.assert_array_equal(got, want)
        assert m.memory("PIMDRAM").derived
        memories = m.memories
