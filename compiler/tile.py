"""Tiling and memory mapping: tile sizes from buffer sizes and engine geometry, and where every
tensor lives.

MXU linears are cut along N into tiles whose packed weights fit one of two SRAM weight slots
(K is never split: `MXU.GEMM` requantizes at the end); tiles are sized in whole DSP-chain
groups and stored one after another in HBM, where the address interleave spreads them over the
channels. PIM linears are cut along N so one tile's outputs fit the PIM result buffers; each
tile spreads its output channels over the banks of the channels it uses (docs/contract.md,
"PIM weight mapping") and every bank holds its share at the same row-aligned offset. Tile sizes
depend on the config and the op alone, so every entry of a bundle shares one weight image.

`plan_memory` lays out the shared images (embedding table, norm and bias tables, the RoPE
table, weights) and the KV cache in HBM, PIMDRAM and FLASH; `Arena` allocates the scratch
memories (SRAM, GBUF, PRES, CDRAM) of one entry. Every allocation is checked against its
capacity, and an overflow names the buffer and the missing bytes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from trimem import isa, layout
from trimem.compiler.ir import CompileError, Graph, OpKind, option

FX_BYTES = 4
"""Bytes of one fx (int32) element, token id or position."""
ALIGN = 64
"""Byte alignment of every allocation: whole HBM bursts and SRAM lines."""
WEIGHT_SLOT_SHARE = 8
"""Default weight slot: 1/8 of the SRAM, two slots for double buffering leave 3/4 to
activations."""
LINEARS = (OpKind.LINEAR, OpKind.LM_HEAD)


def align(nbytes: int, to: int = ALIGN) -> int:
    """`nbytes` rounded up to a multiple of `to`."""
    return -(-nbytes // to) * to


def weight_bytes(op, n=None) -> int:
    """Bytes of the op's packed weight tile of `n` output channels (all by default)."""
    a = op.attrs
    return layout.weight_tile_bytes(a["n"] if n is None else n, a["k"], a["bits"],
                                    tuple(a["nm"]), a["group"])


def group_log2(op) -> int:
    """The `group_log2` field of the op's weights: 0 for one group per row, else log2(group)."""
    group, k = op.attrs["group"], op.attrs["k"]
    if group == k:
        return 0
    if group & (group - 1):
        raise CompileError(f"{op.where}: weight group {group!r} is not a power of two and not "
                           f"the whole row k={k!r}; the instructions encode group_log2")
    return group.bit_length() - 1


def _split(n: int, count: int) -> list:
    """[(start, stop)] of `count` balanced pieces of range(n), larger pieces first."""
    base, extra = divmod(n, count)
    bounds, start = [], 0
    for i in range(count):
        stop = start + base + (i < extra)
        bounds.append((start, stop))
        start = stop
    return bounds


# ---- MXU tiles -----------------------------------------------------------------------------

def slot_bytes(cfg, options=None) -> int:
    """Bytes of one SRAM weight slot (option "weight_slot_bytes")."""
    return option(options, "weight_slot_bytes", None) or cfg.fpga.sram_bytes // WEIGHT_SLOT_SHARE


def mxu_tiles(cfg, op, options=None) -> list:
    """[(n0, n1)] output-channel tiles of an MXU linear, each fitting one weight slot.

    A packed tile grows by the same bytes per output channel, so a slot holds
    slot // bytes-per-channel of them; that count is cut to a multiple of `fpga.dsp_chains`
    where the op is wide enough, so every chain gets an output channel on each pass, and the
    last tile takes the rest.
    """
    n, slot, chains = op.attrs["n"], slot_bytes(cfg, options), cfg.fpga.dsp_chains
    one = weight_bytes(op, 1)
    if one > slot:
        raise CompileError(f"{op.where}: SRAM buffer 'weight slot' overflows by {one - slot} "
                           f"bytes: one output channel of k={op.attrs['k']} packs to {one} B, "
                           f"a slot holds {slot} B; raise weight_slot_bytes or the SRAM")
    gemm = isa.lookup("MXU.GEMM")
    rows = min(n, slot // one, gemm.fields[gemm.field_names.index("n")].max)
    if rows < n and rows >= chains:
        rows -= rows % chains
    return [(n0, min(n, n0 + rows)) for n0 in range(0, n, rows)]


# ---- PIM tiles -----------------------------------------------------------------------------

@dataclass(frozen=True)
class PimTile:
    """One PIM.GEMV tile: output channels [n0, n1) over the banks of the channels in `mask`.

    `local_rows[u]` output channels go to unit u (channel-major over the masked channels);
    each bank keeps its packed share in `bank_rows` DRAM rows from the tile's offset.
    """
    n0: int
    n1: int
    channels: tuple
    local_rows: tuple
    bank_rows: int

    @property
    def mask(self) -> int:
        return sum(1 << c for c in self.channels)

    @property
    def n(self) -> int:
        return self.n1 - self.n0


def pim_channels(cfg) -> int:
    """PIM channels a PIM.GEMV can name: those below the width of its `ch_mask` field."""
    instr = isa.lookup("PIM.GEMV")
    return min(cfg.pim.channels, instr.fields[instr.field_names.index("ch_mask")].width)


def pim_tile_limit(cfg) -> int:
    """Most output channels of one PIM tile: one fx row of them fills the result buffers."""
    return cfg.pim.result_total_bytes // FX_BYTES


def pim_tiles(cfg, op) -> list:
    """The PimTiles of a PIM linear; tiles rotate over the channels to spread bank use."""
    pim, n = cfg.pim, op.attrs["n"]
    per_channel = pim.banks_per_channel
    count = -(-n // pim_tile_limit(cfg))
    if n // count < per_channel:
        raise CompileError(f"{op.where}: n={n} output channels in {count} tile(s) leave "
                           f"banks idle ({per_channel} banks per channel); run it on the MXU")
    tiles, start = [], 0
    reach = pim_channels(cfg)
    for n0, n1 in _split(n, count):
        used = min(reach, (n1 - n0) // per_channel)
        channels = tuple(sorted((start + c) % reach for c in range(used)))
        start = (start + used) % reach
        units = used * per_channel
        local = tuple(-(-(n1 - n0 - u) // units) for u in range(units))
        share = max(weight_bytes(op, r) for r in set(local))
        tiles.append(PimTile(n0, n1, channels, local, -(-share // pim.row_bytes)))
    return tiles


# ---- the pass ------------------------------------------------------------------------------

def engines_of(op) -> tuple:
    """Every engine the op runs on in its graph: its placement and any sub-batch engines."""
    return tuple(dict.fromkeys((op.engine, *op.annotations.get("sub_engines", ()))))


def run(graph: Graph, cfg, options=None) -> Graph:
    """Note in `op.annotations["tiles"]` the tiles of every linear on each of its engines."""
    out = graph.clone()
    for op in out.ops:
        if op.kind not in LINEARS:
            continue
        group_log2(op)
        tiles = {}
        for engine in engines_of(op):
            tiles[engine] = mxu_tiles(cfg, op, options) if engine == "MXU" else \
                pim_tiles(cfg, op)
        op.annotations["tiles"] = tiles
    return out.verify()


# ---- shared images and the KV cache --------------------------------------------------------

@dataclass(frozen=True)
class Region:
    """A named byte range of one memory space."""
    name: str
    space: str
    addr: int
    nbytes: int


class Bump:
    """Allocates the regions of one persistent memory space upwards from address 0."""

    def __init__(self, space: str, capacity: int | None, what: str):
        self.space, self.capacity, self.what, self.top = space, capacity, what, 0
        self.regions: list = []

    def take(self, name: str, nbytes: int) -> Region:
        region = Region(name, self.space, self.top, nbytes)
        self.top = align(self.top + nbytes)
        if self.capacity is not None and self.top > self.capacity:
            raise CompileError(f"{self.space} buffer {name!r} ({nbytes} B) overflows "
                               f"{self.what} by {self.top - self.capacity} bytes; use a "
                               f"preset with more memory, fewer --layers or shorter contexts")
        self.regions.append(region)
        return region


@dataclass
class MemoryMap:
    """Where the shared tensors of a bundle live.

    Members
    -------
    regions : name -> Region of every table, weight and cache region.
    mxu : weight name -> [(n0, n1, HBM address)] of its MXU tiles.
    pim : weight name -> [(PimTile, bank offset in bytes)].
    kv : the `layout.kv_offset` keywords besides the instruction's fields (bundle model.kv).
    kv_region : the Region of the KV cache (HBM or FLASH).
    norms : norm weight name -> HBM address of its gamma + eps words.
    biases : bias name -> HBM address of its fx words.
    """
    regions: dict = field(default_factory=dict)
    mxu: dict = field(default_factory=dict)
    pim: dict = field(default_factory=dict)
    kv: dict = field(default_factory=dict)
    kv_region: Region | None = None
    norms: dict = field(default_factory=dict)
    biases: dict = field(default_factory=dict)

    def used(self) -> dict:
        """Bytes placed per memory space."""
        out: dict = {}
        for region in self.regions.values():
            out[region.space] = out.get(region.space, 0) + region.nbytes
        return out


def kv_page_bytes(cfg, home: str, token_bytes: int) -> int:
    """KV page size: the flash page in FLASH; in HBM the smallest multiple of the channel
    interleave that holds one token, so successive pages stripe over the channels."""
    if home == "FLASH":
        return cfg.csd.page_bytes
    return align(token_bytes, cfg.fpga.hbm_interleave_bytes)


def kv_fields(kv: dict, head_dim: int) -> dict:
    """The KV geometry fields of KVAPP and ATTN for the cache described by `kv`."""
    group = kv["group"]
    return {"layers": kv["layers"], "ctx_log2": kv["max_ctx"].bit_length() - 1,
            "kv_bits": kv["bits"], "kv_group_log2": 0 if group == head_dim
            else group.bit_length() - 1}


def _kv(graphs, cfg) -> tuple:
    """(kv keywords, home, bytes) of the one KV cache all entries share; its max_ctx is the
    longest context bucket rounded up to a power of two (the instructions carry its log2)."""
    op = next(op for op in graphs[0].ops if op.kind is OpKind.ATTENTION)
    a, home = op.attrs, graphs[0].meta["kv_home"]
    group = a["kv_group"]
    if group != a["head_dim"] and group & (group - 1):
        raise CompileError(f"{op.where}: KV group {group!r} is not a power of two and not "
                           f"head_dim {a['head_dim']!r}; the instructions encode its log2")
    token = layout.kv_token_bytes(a["head_dim"], a["kv_bits"], group)
    longest = max(g.step.ctx for g in graphs)
    kv = {"layers": graphs[0].spec.layers, "max_ctx": 1 << (longest - 1).bit_length(),
          "bits": a["kv_bits"], "group": group, "page_bytes": kv_page_bytes(cfg, home, token)}
    seqs = max(g.step.rows if g.step.phase == "decode" else 1 for g in graphs)
    nbytes = layout.kv_cache_bytes(seqs, kv_heads=a["kv_heads"], head_dim=a["head_dim"], **kv)
    return kv, home, nbytes


def _linears(graphs) -> dict:
    """weight name -> (op, {engine: tiles}) over every graph."""
    out: dict = {}
    for graph in graphs:
        for op in graph.linears():
            _, tiles = out.setdefault(op.attrs["weight"], (op, {}))
            tiles.update(op.annotations["tiles"])
    return out


def pim_offsets(cfg, tiles, tops: list) -> list:
    """(tile, offset, end) of each PIM tile stacked on the channels' bank tops `tops` (updated
    in place): the same row-aligned offset in every bank of a tile's channels."""
    out = []
    for tile in tiles:
        offset = max(tops[c] for c in tile.channels)
        end = offset + tile.bank_rows * cfg.pim.row_bytes
        for c in tile.channels:
            tops[c] = end
        out.append((tile, offset, end))
    return out


def _place_pim(cfg, name, op, tiles, tops, memory) -> None:
    """Give each PIM tile the same row-aligned offset in every bank of its channels."""
    placed = pim_offsets(cfg, tiles, tops)
    for tile, _, end in placed:
        if end > cfg.pim.bank_bytes:
            raise CompileError(f"PIMDRAM buffer {name!r} tile [{tile.n0}, {tile.n1}) "
                               f"overflows a bank by {end - cfg.pim.bank_bytes} bytes; use "
                               f"fewer --layers, more PIM channels or run it on the MXU")
    memory.pim[name] = [(tile, offset) for tile, offset, _ in placed]


def plan_memory(graphs: list, cfg) -> MemoryMap:
    """Lay out the images and the KV cache that all entries (`graphs`) share."""
    memory = MemoryMap()
    fpga, pim, csd = cfg.fpga, cfg.pim, cfg.csd
    hbm = Bump("HBM", fpga.hbm_bytes, f"fpga HBM ({fpga.hbm_bytes} B)")
    spec, first = graphs[0].spec, graphs[0]
    memory.regions["embed"] = hbm.take("embed", spec.vocab * (spec.hidden
                                                              + layout.SCALE_CODE_BYTES))
    for op in first.ops:
        if op.kind is OpKind.RMSNORM:
            name = op.attrs["weight"]
            memory.regions[f"norm:{name}"] = region = hbm.take(name, (op.attrs["n"] + 1)
                                                               * FX_BYTES)
            memory.norms[name] = region.addr
        bias = op.attrs.get("bias")
        if bias is not None:
            memory.regions[f"bias:{bias}"] = region = hbm.take(bias, op.attrs["n"] * FX_BYTES)
            memory.biases[bias] = region.addr
    kv, home, kv_bytes = _kv(graphs, cfg)
    memory.kv = kv
    memory.regions["rope"] = hbm.take("rope", kv["max_ctx"] * spec.head_dim * 2)
    tops = [0] * (pim.channels if pim else 0)
    for name, (op, tiles) in _linears(graphs).items():
        if "MXU" in tiles:
            addrs = []
            for n0, n1 in tiles["MXU"]:
                region = hbm.take(f"{name}[{n0}:{n1}]", weight_bytes(op, n1 - n0))
                addrs.append((n0, n1, region.addr))
            memory.mxu[name] = addrs
            memory.regions[f"mxu:{name}"] = Region(name, "HBM", addrs[0][2],
                                                   hbm.top - addrs[0][2])
        if "PIM" in tiles:
            _place_pim(cfg, name, op, tiles["PIM"], tops, memory)
    if pim is not None and any(tops):
        used = max(tops) * pim.total_banks
        memory.regions["pim"] = Region("pim", "PIMDRAM", 0, used)
        if pim.shared_with_hbm and hbm.top + used > fpga.hbm_bytes:
            raise CompileError(f"PIMDRAM buffer 'pim weights' ({used} B) and the HBM data "
                               f"({hbm.top} B) share the HBM channels and overflow them by "
                               f"{hbm.top + used - fpga.hbm_bytes} bytes; use fewer --layers")
    if home == "FLASH":
        flash = Bump("FLASH", csd.capacity_bytes, f"the CSD flash ({csd.capacity_bytes} B)")
        memory.kv_region = flash.take("kv", kv_bytes)
    else:
        memory.kv_region = hbm.take("kv", kv_bytes)
    memory.regions["kv"] = memory.kv_region
    return memory


# ---- scratch memories of one entry ---------------------------------------------------------

@dataclass(eq=False)
class Buffer:
    """An allocation in a scratch memory: what it holds, where, and how big."""
    name: str
    space: str
    addr: int
    nbytes: int

    def at(self, offset: int = 0) -> int:
        """The address `offset` bytes into the buffer."""
        return self.addr + offset


class Arena:
    """First-fit allocator of one scratch memory; tracks the peak and rejects overflow.

    `on_alloc` and `on_free` let the scheduler carry buffer hazards across reuse.
    """

    def __init__(self, space: str, capacity: int, what: str, on_alloc=None, on_free=None,
                 align_to: int = ALIGN):
        self.space, self.capacity, self.what, self.align_to = space, capacity, what, align_to
        self.free_spans = [(0, capacity)]
        self.live: dict = {}
        self.peak = 0
        self.on_alloc, self.on_free = on_alloc, on_free

    def alloc(self, name: str, nbytes: int) -> Buffer:
        size = align(max(nbytes, 1), self.align_to)
        for i, (start, stop) in enumerate(self.free_spans):
            if stop - start >= size:
                self.free_spans[i] = (start + size, stop)
                buf = Buffer(name, self.space, start, nbytes)
                self.live[id(buf)] = (buf, size)
                self.peak = max(self.peak, start + size)
                if self.on_alloc:
                    self.on_alloc(buf)
                return buf
        in_use = sum(size for _, size in self.live.values())
        largest = max((b - a for a, b in self.free_spans), default=0)
        raise CompileError(f"{self.space} buffer {name!r} ({nbytes} B) overflows {self.what} "
                           f"by {size - largest} bytes ({in_use} B in use of {self.capacity} "
                           f"B); use a smaller prefill chunk or batch (--buckets) or a preset "
                           f"with more memory")

    def free(self, buf: Buffer) -> None:
        _, size = self.live.pop(id(buf))
        if self.on_free:
            self.on_free(buf)
        spans = sorted(self.free_spans + [(buf.addr, buf.addr + size)])
        merged = [spans[0]]
        for start, stop in spans[1:]:
            if start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(stop, merged[-1][1]))
            else:
                merged.append((start, stop))
        self.free_spans = [(a, b) for a, b in merged if b > a]
