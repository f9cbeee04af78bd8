"""The CSD engine: KV append and decode attention inside a computational storage drive.

The KV cache lives in FLASH pages (docs/contract.md, KV layout, with pages of csd.page_bytes)
and never crosses PCIe: only q and the outputs do, by DMA (InstInfer). CSD.KVAPP quantizes K and
V and programs each page once its last slot is written. CSD.ATTN scores the K pages of every
valid token, selects the top-k (SpAtten), weights the V pages of the kept tokens per split and
merges the splits' partials.

Cycles are closed forms of the engine's organisation, `csd.engine` (`trimem.dram.FlashTiming`,
docs/timing.md, "CSD"):

- "sequential": the RTL's schedule (`trimem.hdl.csd_top`), exact: one page in flight, one job
  per (query row, kv head); `attn_cycles` and `kvapp_cycles`.
- "streaming": InstInfer's pipelined drive, a roofline: pages in flight over every channel and
  die, each page read once for all rows, each phase max(flash reads, operations / lanes);
  `streaming_work` and `FlashTiming.read_cycles` / `program_cycles`.

Both depend only on the fields and token positions, never on the data, so timing-only and
functional runs count the same cycles.
"""
from __future__ import annotations

import numpy as np

from trimem import dram, isa, layout, numerics, special, timing
from trimem.emulator.engine import EmulatorError, EngineModel
from trimem.isa import Engine, Space

CDRAM, FLASH = Space.CDRAM, Space.FLASH
FX = np.dtype("<i4")
"""fx activations and token positions in CDRAM are int32 little-endian."""


class CsdEngine(EngineModel):
    """CSD.KVAPP and CSD.ATTN on the drive's engine of csd.engine_lanes MACs per cycle."""
    engine = Engine.CSD

    def __init__(self, machine):
        self.csd = machine.config.csd
        super().__init__(machine, self.csd.clock_mhz)
        self.flash_timing = dram.FlashTiming(self.csd)
        self.streaming = self.csd.engine == "streaming"
        self.cdram = machine.memory(CDRAM)
        self.flash = machine.memory(FLASH)

    def execute(self, ins, start):
        if ins.name == "CSD.KVAPP":
            return self._kvapp(ins.fields, start)
        return self._attn(ins.fields, start)

    # -- helpers ---------------------------------------------------------------------------

    def _layout(self, f: dict) -> tuple[dict, np.ndarray, int]:
        """(kv_offset keywords, first page of each (kind, kv head) region [2, kv_heads],
        tokens per page) of the instruction's cache."""
        kv = timing.kv_layout(self.machine.config, FLASH, f)
        page = kv["page_bytes"]
        if f["kv_base"] % page:
            raise EmulatorError(f"kv_base {f['kv_base']:#x} is not page-aligned; the FLASH "
                                f"KV cache starts on a page (a multiple of {page} bytes)")
        first = np.array([[f["kv_base"] + layout.kv_offset(f["seq"], f["layer"], h, kind, 0,
                                                          **kv)
                           for h in range(f["kv_heads"])] for kind in layout.KV_KINDS],
                         np.int64) // page
        per_page = layout.tokens_per_page(f["head_dim"], kv["bits"], kv["group"], page)
        last = (first.max() + -(-kv["max_ctx"] // per_page)) * page
        self.flash.check(f["kv_base"], last - f["kv_base"])
        return kv, first, per_page

    def _positions(self, f: dict, max_ctx: int) -> np.ndarray:
        """Token positions of the m rows (control data, read in both modes)."""
        self.cdram.check(f["pos_addr"], f["m"] * FX.itemsize)
        pos = self.cdram.read_array(f["pos_addr"], FX, (f["m"],)).astype(np.int64)
        if pos.min() < 0 or pos.max() >= max_ctx:
            raise EmulatorError(f"token positions {pos.min()}..{pos.max()} leave the cache's "
                                f"[0, {max_ctx}) (ctx_log2 = {max_ctx.bit_length() - 1}); "
                                f"raise ctx_log2 or fix pos_addr")
        return pos

    def _rows(self, addr: int, m: int, width: int) -> np.ndarray:
        return self.cdram.read_array(addr, FX, (m, width))

    def _hold(self, start: int, busy: np.ndarray, pages: np.ndarray) -> None:
        """Hold each flash channel c from `start` for `busy[c]` cycles and count the bytes of
        its pages [channel, die]. Only this engine uses the flash channels and every phase of
        either model lasts at least as long as its holds, so they are free at `start`."""
        clock, page, machine = self.clock, self.csd.page_bytes, self.machine
        per_channel = pages.sum(axis=1)
        for c in np.flatnonzero(per_channel):
            nbytes = int(per_channel[c]) * page
            end = start + int(busy[c])
            machine.resource(f"flash{c}").hold(clock.edge(start), clock.edge(end)
                                               - clock.edge(start), nbytes,
                                               (self.name, self.index))
            machine.count(f"flash{c}", nbytes)
        machine.count("FLASH", int(per_channel.sum()) * page)

    def _transfers(self, start: int, pages: np.ndarray) -> None:
        """Sequential: hold each channel for the transfers of its pages from `start`. The
        engine has one page in flight and each page costs it more than a transfer, so this
        totals each channel's busy time (the trace shows it from the instruction's start)."""
        self._hold(start, pages.sum(axis=1) * self.flash_timing.transfer, pages)

    # -- CSD.KVAPP -------------------------------------------------------------------------

    def _kvapp(self, f: dict, start: int) -> int:
        """Quantize and pack each token row of each kind and kv head, then program the pages
        this append fills: sequential `kvapp_cycles`; streaming, the quantize passes over the
        lanes, then `FlashTiming.program_cycles` of the slowest channel."""
        csd, flash = self.csd, self.flash_timing
        m, heads, d = f["m"], f["kv_heads"], f["head_dim"]
        kv, first, per_page = self._layout(f)
        size = FX.itemsize * m * heads * d
        for name in ("k_addr", "v_addr"):
            self.cdram.check(f[name], size)
        pos = self._positions(f, kv["max_ctx"])
        full = pos[dram.page_fills(pos, per_page, kv["max_ctx"])] // per_page
        pages = (first.reshape(-1, 1) + full.reshape(1, -1)).ravel()
        per_die = dram.flash_page_counts(csd, pages)
        elements = 2 * heads * d
        if self.streaming:
            quantize = m * -(-elements // csd.engine_lanes) * timing.VPU_PASSES["VPU.KVAPP"]
            program = flash.program_cycles(per_die)
            self._hold(start + quantize, program, per_die)
            end = start + quantize + int(program.max(initial=0))
        else:
            self._transfers(start, per_die)
            end = start + kvapp_cycles(f, int(full.size), flash)
        self.machine.count("CDRAM", 2 * size + m * FX.itemsize)
        stats = self.stats
        stats.counters["csd_pages_programmed"] += int(pages.size)
        stats.energy_pj += (pages.size * csd.energy_pj_per_page_program
                            + m * elements * timing.VPU_PASSES["VPU.KVAPP"]
                            * csd.energy_pj_per_mac)
        if not self.machine.timing_only:
            self._append(f, kv, pos)
        return end

    def _append(self, f: dict, kv: dict, pos: np.ndarray) -> None:
        m, heads, d = f["m"], f["kv_heads"], f["head_dim"]
        for kind, addr in zip(layout.KV_KINDS, (f["k_addr"], f["v_addr"])):
            x = self._rows(addr, m, heads * d).reshape(m, heads, d).transpose(1, 0, 2)
            q, g, mant, exp = numerics.quantize_kv(x, kv["bits"], kv["group"])
            for h in range(heads):
                rows = layout.pack_kv_tokens(q[h], g[h], mant[h], exp[h], kv["bits"])
                for t in range(m):
                    self.flash.write(f["kv_base"] + layout.kv_offset(
                        f["seq"], f["layer"], h, kind, int(pos[t]), **kv), rows[t])

    # -- CSD.ATTN --------------------------------------------------------------------------

    def _attn(self, f: dict, start: int) -> int:
        """Scores over the K pages, the top-k select, then per split max, sum and the weighted
        sums over the V pages, and the merge: sequential `attn_cycles`, streaming
        `_stream_attn`."""
        csd, stats = self.csd, self.stats
        m, hq, hkv, d = f["m"], f["q_heads"], f["kv_heads"], f["head_dim"]
        if hq % hkv:
            raise EmulatorError(f"q_heads = {hq} is not a multiple of kv_heads = {hkv}")
        size = FX.itemsize * m * hq * d
        for name in ("q_addr", "o_addr"):
            self.cdram.check(f[name], size)
        kv, first, per_page = self._layout(f)
        ctxs = self._positions(f, kv["max_ctx"]) + 1
        if self.streaming:
            end, k_pages, v_pages = self._stream_attn(f, ctxs, first, per_page, kv["max_ctx"],
                                                      start)
        else:
            per_row = -(-ctxs // per_page)
            starts = np.broadcast_to(first.reshape(-1, 1), (first.size, m)).ravel()
            counts = np.broadcast_to(per_row, (first.size, m)).ravel()
            self._transfers(start, dram.flash_range_counts(csd, starts, counts))
            k_pages = v_pages = hkv * int(per_row.sum())
            end = start + attn_cycles(f, ctxs, per_page, self.flash_timing, csd.engine_lanes)
        macs = timing.attn_macs(f, ctxs.tolist())
        pages = k_pages + v_pages
        stats.macs += macs
        stats.counters["csd_pages_read"] += pages
        stats.counters["csd_v_pages_read"] += v_pages
        stats.energy_pj += pages * csd.energy_pj_per_page_read + macs * csd.energy_pj_per_mac
        self.machine.count("CDRAM", 2 * size + m * FX.itemsize)
        if not self.machine.timing_only:
            self._attend(f, kv, ctxs)
        return end

    def _stream_attn(self, f: dict, ctxs: np.ndarray, first: np.ndarray, per_page: int,
                     max_ctx: int, start: int) -> tuple[int, int, int]:
        """Streaming: (end cycle, K pages, V pages) of the phases from `start`. Every row
        shares one read of each programmed page; with top-k, the K phase (scores, select)
        precedes the V phase, which reads at most one V page per kept token of any row.
        Each phase takes max(slowest channel's `read_cycles`, its `streaming_work` / lanes)."""
        k_pages = dram.flash_pages(int(ctxs.max()), per_page, max_ctx)
        v_pages = min(k_pages, f["m"] * f["topk"]) if f["topk"] else k_pages
        keys, values, merge = streaming_work(f, ctxs)
        hkv = f["kv_heads"]
        if f["topk"]:
            phases = [(first[0], [k_pages] * hkv, keys), (first[1], [v_pages] * hkv, values)]
        else:
            phases = [(first.ravel(), [k_pages] * 2 * hkv, keys + values)]
        lanes, at = self.csd.engine_lanes, start
        for starts, counts, work in phases:
            per_die = dram.flash_range_counts(self.csd, starts, counts)
            reads = self.flash_timing.read_cycles(per_die)
            self._hold(at, reads, per_die)
            at += max(int(reads.max(initial=0)), -(-work // lanes))
        return at + -(-merge // lanes), hkv * k_pages, hkv * v_pages

    def _attend(self, f: dict, kv: dict, ctxs: np.ndarray) -> None:
        """special.attention over the cached tokens 0..max(ctxs)-1 read from FLASH."""
        m, hq, hkv, d = f["m"], f["q_heads"], f["kv_heads"], f["head_dim"]
        bits, group = kv["bits"], kv["group"]
        token_bytes = layout.kv_token_bytes(d, bits, group)
        offsets = np.array([layout.kv_offset(0, 0, 0, "K", t, **kv)
                            for t in range(int(ctxs.max()))], np.int64)
        gather = offsets[:, None] + np.arange(token_bytes)
        caches = []
        for kind in layout.KV_KINDS:
            heads = []
            for h in range(hkv):
                base = f["kv_base"] + layout.kv_offset(f["seq"], f["layer"], h, kind, 0, **kv)
                span = self.flash.read(base, int(gather[-1, -1]) + 1)
                heads.append(layout.unpack_kv_tokens(span[gather], d, bits, group))
            caches.append(tuple(np.stack(field) for field in zip(*heads)))
        q = self._rows(f["q_addr"], m, hq * d).reshape(m, hq, d)
        out = special.attention(q, caches[0], caches[1], ctxs - 1, kv_heads=hkv, kv_bits=bits,
                                splits=f["splits"], topk=f["topk"])
        self.cdram.write_array(f["o_addr"], np.asarray(out).astype(FX).reshape(m, hq * d))


# ---------------------------------------------------------------------------------------------
# Cycles (docs/timing.md, "CSD"). Sequential: the schedule of trimem.hdl.csd_top and
# trimem.hdl.attention. Streaming: the operations each lane performs, one a cycle.
# ---------------------------------------------------------------------------------------------

SELECT_PASSES = 8 * FX.itemsize + special.MAX_CONTEXT_BITS
"""Passes of the top-k radix select: one per bit of a key (fx importance, then rank)."""


def kvapp_cycles(f: dict, fills: int, flash: dram.FlashTiming) -> int:
    """CSD.KVAPP: per row 2 (its position), per (row, kind, kv head) an append of
    head_dim + value_bytes + 2 * groups + 6 cycles, and `page_program` per page filled
    (`fills` rows fill their page in each of the 2 * kv_heads regions)."""
    d, heads = f["head_dim"], f["kv_heads"]
    groups = d // isa.group_size(f["kv_group_log2"], d)
    append = d + d * f["kv_bits"] // 8 + 2 * groups + 6
    regions = len(layout.KV_KINDS) * heads
    return 1 + f["m"] * (2 + regions * append) + fills * regions * flash.page_program


def attn_cycles(f: dict, ctxs: np.ndarray, per_page: int, flash: dram.FlashTiming,
                lanes: int) -> int:
    """CSD.ATTN: per row 2 (its position), then per kv head a job of the row's query heads
    sharing it, over ctx = pos + 1 tokens in P = ceil(ctx / per_page) pages per kind."""
    d, splits, topk = f["head_dim"], f["splits"], f["topk"]
    heads = f["q_heads"] // f["kv_heads"]
    chunks = -(-d // lanes)
    groups = d // isa.group_size(f["kv_group_log2"], d)
    ctx = np.asarray(ctxs, np.int64)
    kept = np.array([timing.attn_kept(int(c), topk) for c in ctx], np.int64)
    pages = -(-ctx // per_page)
    token = groups + chunks * (heads + 1) + 4
    select = np.where((topk > 0) & (topk < ctx), SELECT_PASSES * ctx, 0)
    job = (2 * heads * d + heads + 2
           + (ctx + kept) * token + 2 * (ctx - kept)
           + 2 * pages * (flash.page_read + flash.page_beats)
           + 1 + select
           + splits * (2 + heads * chunks + heads * d) + 2 * heads * ctx
           + 2 + heads * (1 + 3 * splits + splits * d))
    return 1 + int((2 + f["kv_heads"] * (job + 2)).sum())


def streaming_work(f: dict, ctxs) -> tuple[int, int, int]:
    """Streaming CSD.ATTN: (K, V, merge) phase operations over the rows' ctx = pos + 1, each
    lane doing one a cycle. K: the scores (q_heads * head_dim MACs per key) and the top-k
    radix select (`SELECT_PASSES` per key and kv head, when 0 < topk < ctx). V: the softmax
    max and sum (2 per key and query head), the weighted sums (q_heads * head_dim MACs per
    kept key) and each split's partial (head_dim per query head). Merge: the splits' partials
    into the output (head_dim per split and query head)."""
    hq, d, topk = f["q_heads"], f["head_dim"], f["topk"]
    ctx = np.asarray(ctxs, np.int64)
    kept = sum(timing.attn_kept(int(c), topk) for c in ctx)
    pruned = ctx[(topk > 0) & (topk < ctx)]
    partials = ctx.size * hq * f["splits"] * d
    keys = hq * d * int(ctx.sum()) + SELECT_PASSES * f["kv_heads"] * int(pruned.sum())
    values = 2 * hq * int(ctx.sum()) + hq * d * kept + partials
    return keys, values, partials
