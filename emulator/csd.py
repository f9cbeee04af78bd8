"""The CSD engine: KV append and decode attention inside a computational storage drive.

The KV cache lives in FLASH pages (docs/contract.md, KV layout, with pages of csd.page_bytes)
and never crosses PCIe: only q and the outputs do, by DMA (InstInfer). CSD.KVAPP quantizes K and
V and programs each page once its last slot is written; a partly filled page waits in the
drive's write buffer. CSD.ATTN streams the programmed K pages of every valid token, then, with
top-k pruning (SpAtten), only V pages that may hold kept tokens; the splits of split-K attention
are merged at the end. Page reads and programs are closed forms over the pages each channel and
die serves (`trimem.dram.FlashTiming`, docs/timing.md, "CSD"), so no loop runs per page.

Timing depends only on the fields and token positions, never on the data, so timing-only and
functional runs count the same cycles: the V pages of a pruned attention are bounded by
min(pages, m * topk), each kept token in a page of its own.
"""
from __future__ import annotations

import numpy as np

from trimem import dram, layout, numerics, special, timing
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

    def _hold(self, start: int, cycles: np.ndarray, pages: np.ndarray) -> int:
        """Hold each busy flash channel for its cycles, from the first cycle >= `start` at
        which all are free (a wait is a memory stall); count the bytes; return that cycle."""
        clock, page, machine = self.clock, self.csd.page_bytes, self.machine
        used = [(machine.resource(f"flash{c}"), int(cycles[c]), int(pages[c]) * page)
                for c in np.flatnonzero(cycles)]
        begin = clock.cycle_at(max([clock.edge(start)] + [bus.free_ps for bus, _, _ in used]))
        self.stats.stall_mem += begin - start
        for bus, busy, nbytes in used:
            bus.hold(clock.edge(begin), clock.edge(begin + busy) - clock.edge(begin), nbytes,
                     (self.name, self.index))
            machine.count(bus.name, nbytes)
        machine.count("FLASH", int(pages.sum()) * page)
        return begin

    # -- CSD.KVAPP -------------------------------------------------------------------------

    def _kvapp(self, f: dict, start: int) -> int:
        """Quantize (as VPU.KVAPP: row and group amax, then quantize, for K and V), then
        program the pages this append fills: cycles = quantize + max over channels of the
        program closed form."""
        csd = self.csd
        m, heads, d = f["m"], f["kv_heads"], f["head_dim"]
        kv, first, per_page = self._layout(f)
        size = FX.itemsize * m * heads * d
        for name in ("k_addr", "v_addr"):
            self.cdram.check(f[name], size)
        pos = self._positions(f, kv["max_ctx"])
        full = pos[dram.page_fills(pos, per_page, kv["max_ctx"])] // per_page
        pages = (first.reshape(-1, 1) + full.reshape(1, -1)).ravel()
        per_die = dram.flash_page_counts(csd, pages)
        program = self.flash_timing.program_cycles(per_die)
        elements = 2 * heads * d
        quantize = m * -(-elements // csd.engine_lanes) * timing.VPU_PASSES["VPU.KVAPP"]
        begin = self._hold(start + quantize, program, per_die.sum(axis=1))
        self.machine.count("CDRAM", 2 * size + m * FX.itemsize)
        stats = self.stats
        stats.counters["csd_pages_programmed"] += int(pages.size)
        stats.energy_pj += (pages.size * csd.energy_pj_per_page_program
                            + m * elements * timing.VPU_PASSES["VPU.KVAPP"]
                            * csd.energy_pj_per_mac)
        if not self.machine.timing_only:
            self._append(f, kv, pos)
        return begin + int(program.max(initial=0))

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
        """Read K pages (scores), then V pages (weighted sums), each phase
        max(page reads, engine cycles); without top-k one phase reads both. A merge of the
        splits partials follows: ceil(m * q_heads * splits * head_dim / engine_lanes)."""
        csd, stats = self.csd, self.stats
        m, hq, hkv, d = f["m"], f["q_heads"], f["kv_heads"], f["head_dim"]
        if hq % hkv:
            raise EmulatorError(f"q_heads = {hq} is not a multiple of kv_heads = {hkv}")
        size = FX.itemsize * m * hq * d
        for name in ("q_addr", "o_addr"):
            self.cdram.check(f[name], size)
        kv, first, per_page = self._layout(f)
        ctxs = self._positions(f, kv["max_ctx"]) + 1
        k_pages = dram.flash_pages(int(ctxs.max()), per_page, kv["max_ctx"])
        v_pages = min(k_pages, m * f["topk"]) if f["topk"] else k_pages
        per_key = hq * d
        score = per_key * int(ctxs.sum())
        mix = per_key * sum(timing.attn_kept(int(c), f["topk"]) for c in ctxs)
        k_ranges = (first[0], [k_pages] * hkv)
        v_ranges = (first[1], [v_pages] * hkv)
        if f["topk"]:
            phases = [(k_ranges, score), (v_ranges, mix)]
        else:
            phases = [((np.concatenate([first[0], first[1]]), [k_pages] * 2 * hkv),
                       score + mix)]
        at = start
        for (starts, counts), macs in phases:
            per_die = dram.flash_range_counts(csd, starts, counts)
            reads = self.flash_timing.read_cycles(per_die)
            at = self._hold(at, reads, per_die.sum(axis=1))
            at += max(int(reads.max(initial=0)), -(-macs // csd.engine_lanes))
        merge = -(-m * hq * f["splits"] * d // csd.engine_lanes) if f["splits"] > 1 else 0
        pages = hkv * (k_pages + v_pages)
        stats.macs += score + mix
        stats.counters["csd_pages_read"] += pages
        stats.counters["csd_v_pages_read"] += hkv * v_pages
        stats.energy_pj += (pages * csd.energy_pj_per_page_read
                            + (score + mix) * csd.energy_pj_per_mac)
        self.machine.count("CDRAM", 2 * size + m * FX.itemsize)
        if not self.machine.timing_only:
            self._attend(f, kv, ctxs)
        return at + merge

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
