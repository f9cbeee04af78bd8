"""Byte layouts of tensors in memory, shared by the compiler (writes) and the emulator (reads).

Every layout here is a pure numpy function and its exact inverse; `docs/numerics.md` draws
the byte diagrams and `docs/contract.md` lists which memory holds what. All multi-byte
integers are little-endian.
"""
from __future__ import annotations

import numpy as np

from trimem.numerics import QuantWeight, nm_index_bits, nm_pack, nm_unpack, qmax

DENSE = (1, 1)
"""The N:M pattern of a dense weight: every value kept, no index bits."""
SCALE_CODE_BYTES = 4
"""A scale code in memory: mant u16 LE, exp u8, one zero byte."""
REQUANT_BYTES = 8
"""A channel requant pair in memory: mult i32 LE, shift u8, three zero bytes."""
KV_KINDS = ("K", "V")


def _row_bytes(length, nbits):
    return -(-length * nbits // 8)


def _as_u8(buf):
    buf = np.asarray(buf)
    if buf.dtype != np.uint8:
        raise TypeError(f"buffer must be a uint8 array, got {buf.dtype.name!r}")
    return buf


def _check_range(name, values, lo, hi):
    if values.size and (values.min() < lo or values.max() > hi):
        raise ValueError(f"{name} must lie in [{lo}, {hi}], got values in "
                         f"[{values.min().item()!r}, {values.max().item()!r}]")


def _check_reserved(name, reserved):
    if np.any(reserved):
        raise ValueError(f"{name} has nonzero reserved bytes; the buffer is not this layout "
                         "or is misaligned")


# ---- bit fields ----------------------------------------------------------------------------

def pack_bits(values, nbits):
    """Unsigned values [..., L] < 2**nbits -> uint8 [..., ceil(L*nbits/8)], LSB first.

    Value i of a row occupies bits [i*nbits, (i+1)*nbits) of the row, bit j of byte b being
    bit 8*b + j; each row is padded with zero bits to a whole byte.
    """
    values = np.asarray(values)
    if not 0 <= nbits <= 8:
        raise ValueError(f"nbits must be in [0, 8], got {nbits!r}")
    _check_range("values", values, 0, (1 << nbits) - 1)
    if nbits and 8 % nbits == 0:
        return _pack_whole_bytes(values, nbits)
    return _pack_any_bits(values, nbits)


def _pack_whole_bytes(values, nbits):
    """pack_bits for widths that divide 8: 8 // nbits values shifted into each byte."""
    *lead, length = values.shape
    per = 8 // nbits
    v = values.astype(np.uint8)
    pad = -length % per
    if pad:
        v = np.concatenate([v, np.zeros((*lead, pad), dtype=np.uint8)], axis=-1)
    v = v.reshape(*lead, (length + pad) // per, per)
    out = v[..., 0].copy()
    for i in range(1, per):
        out |= v[..., i] << np.uint8(nbits * i)
    return out


def _pack_any_bits(values, nbits):
    """pack_bits for any width, one bit at a time."""
    *lead, length = values.shape
    bits = (values.astype(np.uint8)[..., None] >> np.arange(nbits, dtype=np.uint8)) & 1
    bits = bits.reshape(*lead, length * nbits)
    pad = _row_bytes(length, nbits) * 8 - length * nbits
    bits = np.concatenate([bits, np.zeros((*lead, pad), dtype=np.uint8)], axis=-1)
    return np.packbits(bits, axis=-1, bitorder="little")


def unpack_bits(buf, nbits, length):
    """uint8 [..., ceil(length*nbits/8)] from pack_bits -> uint8 values [..., length]."""
    buf = _as_u8(buf)
    if not 0 <= nbits <= 8:
        raise ValueError(f"nbits must be in [0, 8], got {nbits!r}")
    *lead, nbytes = buf.shape
    if nbytes != _row_bytes(length, nbits):
        raise ValueError(f"rows of {nbytes!r} bytes do not hold {length!r} values of "
                         f"{nbits!r} bits; expected {_row_bytes(length, nbits)!r} bytes")
    bits = np.unpackbits(buf, axis=-1, bitorder="little")[..., :length * nbits]
    bits = bits.reshape(*lead, length, nbits)
    return (bits << np.arange(nbits, dtype=np.uint8)).sum(axis=-1, dtype=np.uint8)


def pack_int4(values):
    """int4 values [..., L] in [-8, 7] -> uint8 [..., ceil(L/2)], low nibble first."""
    values = np.asarray(values)
    _check_range("int4 values", values, -8, 7)
    return pack_bits(values.astype(np.int64) & 0xF, 4)


def unpack_int4(buf, length):
    """uint8 [..., ceil(length/2)] from pack_int4 -> int8 [..., length] (sign-extended)."""
    nibbles = unpack_bits(buf, 4, length).astype(np.int8)
    return np.where(nibbles > 7, nibbles - 16, nibbles).astype(np.int8)


def _pack_values(values, bits):
    limit = qmax(bits)
    _check_range(f"int{bits} values", values, -limit, limit)
    return pack_int4(values) if bits == 4 else values.astype(np.int8).view(np.uint8)


def _unpack_values(buf, bits, length):
    return unpack_int4(buf, length) if bits == 4 else buf.view(np.int8).copy()


def _check_counts(**counts):
    for name, value in counts.items():
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


# ---- weight tiles --------------------------------------------------------------------------

def weight_tile_sections(n, k, bits, nm, group):
    """(offset, nbytes) of each section of a packed [n, k] weight tile, in order."""
    keep, m = nm
    qmax(bits)
    _check_counts(n=n, k=k, group=group, keep=keep, m=m)
    if k % m or k % group or keep > m:
        raise ValueError(f"k={k!r} must be a multiple of m and of group={group!r}, and the "
                         f"N:M pattern {nm!r} must have 1 <= n <= m")
    kept = k // m * keep
    sizes = {"values": n * _row_bytes(kept, bits),
             "indices": n * _row_bytes(kept, nm_index_bits(m)),
             "groups": n * (k // group),
             "requant": n * REQUANT_BYTES}
    offsets = np.cumsum([0, *sizes.values()])
    return {name: (int(off), size) for (name, size), off in zip(sizes.items(), offsets)}


def weight_tile_bytes(n, k, bits, nm, group):
    """Size in bytes of a packed [n, k] weight tile (see weight_tile_sections)."""
    offset, size = weight_tile_sections(n, k, bits, nm, group)["requant"]
    return offset + size


LOOKUP_M = 8
"""Largest block size whose nonzero patterns `nm_split` tabulates (2**m of them)."""


def nm_split(q, keep, m):
    """`numerics.nm_pack(q, keep, m)`, by table lookup for blocks of up to LOOKUP_M.

    The kept positions of a block depend only on which of its m values are nonzero, so
    nm_pack runs once per nonzero pattern and every block gathers its pattern's row: the same
    result without a sort per block. Blocks with more than `keep` nonzeros go to nm_pack,
    which names the first.
    """
    q = np.asarray(q)
    rows, k = q.shape
    if not isinstance(m, (int, np.integer)) or not 1 <= m <= LOOKUP_M or k % m:
        return nm_pack(q, keep, m)
    if (keep, m) == DENSE:
        return q.copy(), np.zeros(q.shape, dtype=np.uint8)
    blocks = q.reshape(rows, k // m, m)
    code = np.zeros(blocks.shape[:-1], dtype=np.intp)
    for j in range(m):
        code |= (blocks[..., j] != 0).astype(np.intp) << j
    patterns = (np.arange(1 << m)[:, None] >> np.arange(m)) & 1
    fits = patterns.sum(axis=1) <= keep
    if not fits[code].all():
        return nm_pack(q, keep, m)
    table = np.zeros((1 << m, keep), dtype=np.uint8)
    table[fits] = nm_pack(patterns[fits], keep, m)[1]
    idx = table[code]
    values = np.take_along_axis(blocks, idx.astype(np.intp), axis=-1)
    return values.reshape(rows, -1), idx.reshape(rows, -1)


def pack_weight_tile(qw, nm):
    """QuantWeight -> uint8 blob `values | indices | groups | requant` (docs/numerics.md)."""
    if not isinstance(qw, QuantWeight):
        raise TypeError(f"pack_weight_tile takes a QuantWeight, got {type(qw).__name__!r}")
    n, k = qw.q.shape
    keep, m = nm
    values, idx = nm_split(qw.q, keep, m)
    requant = np.zeros((n, REQUANT_BYTES), dtype=np.uint8)
    requant[:, :4] = qw.mult.astype("<i4").view(np.uint8).reshape(n, 4)
    requant[:, 4] = qw.shift
    parts = [_pack_values(values, qw.bits), pack_bits(idx, nm_index_bits(m)), qw.g, requant]
    return np.concatenate([part.reshape(-1) for part in parts])


def unpack_weight_tile(buf, n, k, bits, nm, group):
    """Packed weight tile -> QuantWeight (exact inverse of pack_weight_tile).

    The dense reconstruction is `.w_eff` (int16 [n, k]); `.mult` and `.shift` are the
    channel requant pairs.
    """
    buf = _as_u8(buf).reshape(-1)
    sections = weight_tile_sections(n, k, bits, nm, group)
    total = weight_tile_bytes(n, k, bits, nm, group)
    if buf.size != total:
        raise ValueError(f"weight tile is {buf.size!r} bytes, expected {total!r} for "
                         f"[{n}, {k}] bits={bits} nm={nm!r} group={group}")
    part = {name: buf[off:off + size].reshape(n, size // n)
            for name, (off, size) in sections.items()}
    keep, m = nm
    kept = k // m * keep
    values = _unpack_values(part["values"], bits, kept)
    idx = unpack_bits(part["indices"], nm_index_bits(m), kept)
    requant = part["requant"]
    _check_reserved("requant section", requant[:, 5:])
    mult = requant[:, :4].copy().view("<i4").reshape(n).astype(np.int32)
    q = nm_unpack(values, idx, keep, m, k)
    return QuantWeight(q, part["groups"].copy(), mult, requant[:, 4].copy(), bits, group)


# ---- scale codes and activation rows -------------------------------------------------------

def pack_scale_codes(mant, exp):
    """Scale codes [rows] -> uint8 [rows * 4]: mant u16 LE, exp u8, 0."""
    mant, exp = np.asarray(mant).reshape(-1), np.asarray(exp).reshape(-1)
    _check_range("mant", mant, 0, 0xFFFF)
    _check_range("exp", exp, 0, 0xFF)
    out = np.zeros((mant.size, SCALE_CODE_BYTES), dtype=np.uint8)
    out[:, :2] = mant.astype("<u2").view(np.uint8).reshape(-1, 2)
    out[:, 2] = exp
    return out.reshape(-1)


def unpack_scale_codes(buf):
    """uint8 [rows * 4] -> (mant int32 [rows], exp int32 [rows])."""
    codes = _as_u8(buf).reshape(-1)
    if codes.size % SCALE_CODE_BYTES:
        raise ValueError(f"scale codes take {SCALE_CODE_BYTES} bytes each, got {codes.size!r} "
                         "bytes")
    codes = codes.reshape(-1, SCALE_CODE_BYTES)
    _check_reserved("scale codes", codes[:, 3])
    mant = codes[:, :2].copy().view("<u2").reshape(-1).astype(np.int32)
    return mant, codes[:, 2].astype(np.int32)


def pack_a8_rows(a8):
    """int8 rows [rows, n] -> uint8 [rows * n], row-major."""
    return np.ascontiguousarray(np.asarray(a8, dtype=np.int8)).view(np.uint8).reshape(-1)


def unpack_a8_rows(buf, n):
    """uint8 [rows * n] -> int8 [rows, n]."""
    return _as_u8(buf).reshape(-1, n).view(np.int8).copy()


def pack_fx_rows(fx):
    """int32 rows [rows, n] -> uint8 [rows * n * 4], row-major, each value LE."""
    return np.ascontiguousarray(np.asarray(fx, dtype="<i4")).view(np.uint8).reshape(-1)


def unpack_fx_rows(buf, n):
    """uint8 [rows * n * 4] -> int32 [rows, n]."""
    return _as_u8(buf).reshape(-1, n * 4).copy().view("<i4").astype(np.int32)


# ---- KV cache ------------------------------------------------------------------------------

def kv_token_bytes(head_dim, bits, group):
    """Bytes of one cached token of one kv head: values | group multipliers | scale code."""
    qmax(bits)
    _check_counts(head_dim=head_dim, group=group)
    if head_dim % group:
        raise ValueError(f"kv group {group!r} must divide head_dim {head_dim!r}")
    return _row_bytes(head_dim, bits) + head_dim // group + SCALE_CODE_BYTES


def tokens_per_page(head_dim, bits, group, page_bytes):
    """Whole tokens in one page; tokens never straddle a page boundary."""
    count = page_bytes // kv_token_bytes(head_dim, bits, group)
    if count < 1:
        raise ValueError(f"page_bytes {page_bytes!r} cannot hold one token of "
                         f"{kv_token_bytes(head_dim, bits, group)!r} bytes; use larger pages")
    return count


def kv_region_bytes(max_ctx, head_dim, bits, group, page_bytes):
    """Bytes of one (seq, layer, kv_head, kind) region: whole pages for max_ctx tokens."""
    _check_counts(max_ctx=max_ctx)
    return -(-max_ctx // tokens_per_page(head_dim, bits, group, page_bytes)) * page_bytes


def kv_cache_bytes(seqs, *, layers, kv_heads, max_ctx, head_dim, bits, group, page_bytes):
    """Bytes of a KV cache for `seqs` sequences."""
    _check_counts(layers=layers, kv_heads=kv_heads)
    region = kv_region_bytes(max_ctx, head_dim, bits, group, page_bytes)
    return seqs * layers * kv_heads * len(KV_KINDS) * region


def kv_offset(seq, layer, kv_head, kind, token, *, layers, kv_heads, max_ctx, head_dim, bits,
              group, page_bytes):
    """Byte offset of one cached token from the cache base.

    region = ((seq * layers + layer) * kv_heads + kv_head) * 2 + kind  (K = 0, V = 1)
    offset = region * kv_region_bytes + (token // tpp) * page_bytes + (token % tpp) * token_bytes
    """
    _check_counts(layers=layers, kv_heads=kv_heads)
    kind = KV_KINDS.index(kind) if kind in KV_KINDS else kind
    bounds = {"seq": (seq, None), "layer": (layer, layers), "kv_head": (kv_head, kv_heads),
              "kind": (kind, len(KV_KINDS)), "token": (token, max_ctx)}
    for name, (value, limit) in bounds.items():
        if not isinstance(value, (int, np.integer)) or value < 0 or (limit and value >= limit):
            raise ValueError(f"{name} {value!r} is out of range [0, {limit}); kind is 'K' or "
                             "'V' and every index a non-negative int below its count")
    tpp = tokens_per_page(head_dim, bits, group, page_bytes)
    region = ((seq * layers + layer) * kv_heads + kv_head) * len(KV_KINDS) + kind
    return (region * kv_region_bytes(max_ctx, head_dim, bits, group, page_bytes)
            + token // tpp * page_bytes + token % tpp * kv_token_bytes(head_dim, bits, group))


def pack_kv_tokens(q, g, mant, exp, bits):
    """Quantized KV rows (from quantize_kv) [T, d] -> uint8 [T, kv_token_bytes]."""
    q, g = np.asarray(q), np.asarray(g, dtype=np.uint8)
    codes = pack_scale_codes(mant, exp).reshape(-1, SCALE_CODE_BYTES)
    return np.concatenate([_pack_values(q, bits).reshape(len(q), -1), g, codes], axis=-1)


def unpack_kv_tokens(buf, head_dim, bits, group):
    """uint8 [T, kv_token_bytes] -> (q int8 [T, d], g uint8 [T, d // group], mant, exp [T])."""
    nbytes = kv_token_bytes(head_dim, bits, group)
    rows = _as_u8(buf).reshape(-1, nbytes)
    value_bytes = _row_bytes(head_dim, bits)
    groups_end = value_bytes + head_dim // group
    q = _unpack_values(rows[:, :value_bytes], bits, head_dim)
    mant, exp = unpack_scale_codes(rows[:, groups_end:])
    return q, rows[:, value_bytes:groups_end].copy(), mant, exp
