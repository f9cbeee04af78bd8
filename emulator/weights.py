"""Unpacked weight tiles, remembered by the digest of their packed bytes.

A decode step of a whole model unpacks every weight tile (N:M indices, int4 nibbles, group
multipliers) before its GEMM or GEMV, and the next step unpacks the very same bytes again.
`unpack` runs `layout.unpack_weight_tile` once per distinct tile content and returns what the
integer linear needs. The key is the tile's shape and a BLAKE2b digest of its bytes, so a
changed byte anywhere (a new layer streamed into the same SRAM slot, a rewritten bank) is a
different tile; no memory write ever has to invalidate anything.

A PIM.GEMV spreads its output channels over many banks, one small tile each; `merge_tiles`
joins same-shaped tiles into one, so a whole GEMV unpacks in one or two calls.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import NamedTuple

import numpy as np

from trimem import layout

BUDGET_BYTES = 1 << 30
"""Unpacked bytes kept before the least recently used tiles are dropped: SmolLM2-135M's
weights take about 270 MB as int16 w_eff per tiling, MXU tiles for prefill and PIM bank tiles
for decode."""


class Unpacked(NamedTuple):
    """What `numerics.linear` takes of a weight tile: w_eff int16 [n, k], mult int32 [n] and
    shift uint8 [n]."""
    w_eff: np.ndarray
    mult: np.ndarray
    shift: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.w_eff.nbytes + self.mult.nbytes + self.shift.nbytes

    def take(self, rows: np.ndarray) -> Unpacked:
        """The output channels `rows`, in that order."""
        return Unpacked(self.w_eff[rows], self.mult[rows], self.shift[rows])


def merge_tiles(tiles: np.ndarray, n: int, k: int, bits: int, nm, group: int) -> np.ndarray:
    """G packed [n, k] tiles (uint8 [G, tile bytes]) -> one packed [G * n, k] tile whose rows
    are tile 0's, then tile 1's, ...: each section of the layout (values, indices, groups,
    requant) holds whole rows, so sections are joined section by section."""
    sections = layout.weight_tile_sections(n, k, bits, nm, group).values()
    return np.concatenate([tiles[:, off:off + size].reshape(-1) for off, size in sections])


class TileCache:
    """Unpacked tiles by (shape, digest of the packed bytes), least recently used dropped
    first once the unpacked bytes pass `budget`."""

    def __init__(self, budget: int = BUDGET_BYTES):
        self.budget = budget
        self.entries: OrderedDict = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def unpack(self, buf: np.ndarray, n: int, k: int, bits: int, nm, group: int) -> Unpacked:
        """`layout.unpack_weight_tile(buf, ...)` as an Unpacked, from the cache when the same
        bytes were unpacked before; its errors pass through and nothing is kept then."""
        buf = np.ascontiguousarray(buf, np.uint8)
        key = (n, k, bits, tuple(nm), group, hashlib.blake2b(buf, digest_size=16).digest())
        found = self.entries.get(key)
        if found is not None:
            self.entries.move_to_end(key)
            self.hits += 1
            return found
        self.misses += 1
        qw = layout.unpack_weight_tile(buf, n, k, bits, nm, group)
        found = Unpacked(qw.w_eff, qw.mult, qw.shift)
        for array in found:
            array.flags.writeable = False
        self.entries[key] = found
        self.nbytes += found.nbytes
        while self.nbytes > self.budget and len(self.entries) > 1:
            _, dropped = self.entries.popitem(last=False)
            self.nbytes -= dropped.nbytes
        return found


TILES = TileCache()
"""The process's tile cache, shared by every Machine: a tile's content is its key, so runs of
different models or configs never see each other's tiles."""
