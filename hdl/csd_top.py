"""The CSD engine top: a front end running `csd.bin`, the in-storage attention engine and the
KV append unit.

A CSD.ATTN becomes one `AttentionEngine` job per (query row, kv head): the top reads the row's
position from CDRAM, works out the K and V regions of the head in FLASH with the layout of
`trimem.layout.kv_offset` (page size `csd.page_bytes`, the instruction's cache geometry), and
hands the group of query heads that share the kv head to the engine. A CSD.KVAPP becomes one
`KvAppend` job per (row, kind, kv head): the token row's fx values in CDRAM and its page slot
in FLASH; a slot that fills its page then waits `FlashTiming.page_program` for the program. An
instruction ends when its last job does.

This is the "sequential" engine of `csd.engine`, the only one built (a "streaming" config is
refused). Cycles are exactly its closed forms in docs/timing.md ("CSD"), `attn_cycles` and
`kvapp_cycles`, when the page port answers `FlashTiming.page_read` cycles after a request.
"""
from __future__ import annotations

from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal, signed
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from amaranth.utils import bits_for, ceil_log2

from trimem import isa, layout, numerics, special
from trimem.config import CsdConfig, HardwareConfig
from trimem.dram import FlashTiming
from trimem.hdl.attention import (CDRAM_ADDR_BITS, FLASH_ADDR_BITS, AttentionEngine,
                                  page_request_layout)
from trimem.hdl.frontend import (CYCLE_BITS, Frontend, read_signature, register_top,
                                 token_signature, write_signature)
from trimem.hdl.vpu import divide, encode_amax, rshift_round

ATTN = isa.lookup("CSD.ATTN")
KVAPP = isa.lookup("CSD.KVAPP")
KV_KINDS = len(layout.KV_KINDS)
GEOMETRY = ("m", "seq", "layer", "layers", "kv_heads", "head_dim", "ctx_log2", "kv_bits",
            "kv_group_log2", "kv_base", "pos_addr")
"""Fields CSD.ATTN and CSD.KVAPP share: rows, positions and the KV cache's layout."""


# ---------------------------------------------------------------------------------------------
# CSD.KVAPP: quantize one token of one kv head and write it into its page slot
# ---------------------------------------------------------------------------------------------

R_BITS = (numerics.kv_levels(8) << numerics.RECIP_SHIFT).bit_length()
"""A group reciprocal floor((kv_levels << RECIP_SHIFT) / (g * mant)): below 2**43."""


def append_layout() -> data.StructLayout:
    """One append: fx row `x_addr` (CDRAM, head_dim int32) into the token slot `dst` (FLASH)."""
    return data.StructLayout({"x_addr": CDRAM_ADDR_BITS, "dst": FLASH_ADDR_BITS,
                              "head_dim": 12, "kv_bits": 4, "kv_group_log2": 4})


class KvAppend(wiring.Component):
    """`numerics.quantize_kv` of one token row of one kv head, packed as
    `layout.pack_kv_tokens` (values | group multipliers | scale code) into its slot.

    The row streams in one int32 per cycle (row and group amax), then per group g is the
    smallest multiplier with g * amax' >= GROUP_MAX * group_amax (15 comparators) and its
    reciprocal one restoring division; the values are quantized and written a byte per cycle
    (two int4 nibbles, low first), then the multipliers and the scale code.

    Parameters
    ----------
    max_head_dim : int

    Members
    -------
    i_job : In(stream.Signature(append_layout()))
        `ready` while idle.
    cdram_rd : Out(read_signature(CDRAM_ADDR_BITS, 4))
    flash_wr : Out(write_signature(FLASH_ADDR_BITS, 4))
        The page slot's bytes, into the drive's write buffer (the top waits for programs).
    error : Out(1)
        Sticky: a head_dim beyond `max_head_dim`, a group that does not divide it, bad bits.
    busy : Out(1)
    """

    def __init__(self, *, max_head_dim: int = 64):
        if not isinstance(max_head_dim, int) or not 2 <= max_head_dim <= special.MAX_HEAD_DIM:
            raise ValueError(f"max_head_dim must be an int in [2, {special.MAX_HEAD_DIM}], "
                             f"got {max_head_dim!r}")
        self.max_head_dim = max_head_dim
        super().__init__({
            "i_job": In(stream.Signature(append_layout())),
            "cdram_rd": Out(read_signature(CDRAM_ADDR_BITS, 4)),
            "flash_wr": Out(write_signature(FLASH_ADDR_BITS, 4)),
            "error": Out(1),
            "busy": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        dmax = self.max_head_dim
        gmax = dmax // 2
        job = Signal(append_layout())
        d, wide = job.head_dim, job.kv_bits == 4

        # -- buffers and registers -----------------------------------------------------------
        m.submodules.x = xbuf = Memory(shape=signed(32), depth=dmax, init=[])
        x_w, x_lo, x_hi = (xbuf.write_port(), xbuf.read_port(domain="comb"),
                           xbuf.read_port(domain="comb"))
        group_amax = Array(Signal(32, name=f"gamax{j}") for j in range(gmax))
        g = Array(Signal(numerics.GROUP_SCALE_BITS, name=f"g{j}") for j in range(gmax))
        recip = Array(Signal(R_BITS, name=f"r{j}") for j in range(gmax))
        amax, running = Signal(32), Signal(32)
        mant = Signal(numerics.SCALE_MANT_BITS)
        exp = Signal(range(numerics.ACT_EXP_MAX + 1))
        i = Signal(range(dmax + 2))
        j = Signal(range(gmax + 1))
        log2 = Mux(job.kv_group_log2 == 0, ceil_log2(dmax) + 1, job.kv_group_log2)
        in_group = (Const(1, dmax.bit_length() + 2) << log2) - 1
        n_groups = Mux(job.kv_group_log2 == 0, 1, d >> job.kv_group_log2)
        value_bytes = Mux(wide, d >> 1, d)

        # -- the group multiplier and reciprocal of group j ------------------------------------
        full = Signal(33)
        m.d.comb += full.eq(mant << exp)
        target = group_amax[j] * numerics.GROUP_MAX
        count = sum((k * full < target) for k in range(numerics.GROUP_MAX))
        g_new = Signal(numerics.GROUP_SCALE_BITS)
        m.d.comb += g_new.eq(Mux(count == 0, 1, count))
        levels = Mux(wide, numerics.kv_levels(4), numerics.kv_levels(8))
        r_new = divide(m, levels << numerics.RECIP_SHIFT, g_new * mant, R_BITS, "kv_recip")
        code = encode_amax(m, amax, "kv_code")

        # -- a value quantized: clip(rshift_round(x * R, RECIP_SHIFT + exp), -qmax, qmax) ----
        def quantize(x, index):
            q = rshift_round(x * recip[index >> log2], numerics.RECIP_SHIFT + exp)
            limit = Mux(wide, numerics.qmax(4), numerics.qmax(8))
            return Mux(q > limit, limit, Mux(q < -limit, -limit, q))[:8]

        m.d.comb += [x_lo.addr.eq(i), x_hi.addr.eq(i + 1), self.flash_wr.mask.eq(1)]
        low, high = quantize(x_lo.data, i), quantize(x_hi.data, i + 1)
        m.d.comb += self.busy.eq(1)
        with m.FSM(name="kvapp"):
            with m.State("IDLE"):
                m.d.comb += [self.busy.eq(0), self.i_job.ready.eq(1)]
                with m.If(self.i_job.valid):
                    m.d.sync += [job.eq(self.i_job.payload), i.eq(0), amax.eq(0)]
                    m.next = "CHECK"
            with m.State("CHECK"):
                bad = ((d > dmax) | (d < 2) | d[0] | ((job.kv_bits != 4) & (job.kv_bits != 8))
                       | ((job.kv_group_log2 != 0)
                          & ((job.kv_group_log2 >= bits_for(dmax))
                             | ((d & (in_group[:12])) != 0))))
                with m.If(bad):
                    m.d.sync += self.error.eq(1)
                    m.next = "IDLE"
                with m.Else():
                    m.next = "READ"

            # ---- the row in: one int32 per cycle, its amax and each group's ---------------
            with m.State("READ"):
                m.d.comb += self.cdram_rd.addr.eq(job.x_addr + i * 4)
                at = i - 1
                x = self.cdram_rd.data.as_signed()
                mag = Signal(32)
                m.d.comb += mag.eq(Mux(x < 0, -x, x))
                with m.If(i != 0):
                    m.d.comb += [x_w.addr.eq(at), x_w.data.eq(x), x_w.en.eq(1)]
                    first = (at & in_group) == 0
                    top = Mux(first | (mag > running), mag, running)
                    m.d.sync += running.eq(top)
                    with m.If(mag > amax):
                        m.d.sync += amax.eq(mag)
                    with m.If((((at + 1) & in_group) == 0) | (at + 1 == d)):
                        m.d.sync += group_amax[at >> log2].eq(top)
                with m.If(i == d):
                    m.next = "SCALE"
                with m.Else():
                    m.d.sync += i.eq(i + 1)
            with m.State("SCALE"):
                m.d.sync += [mant.eq(code[0]), exp.eq(code[1]), j.eq(0)]
                m.next = "GROUPS"
            with m.State("GROUPS"):
                m.d.sync += [g[j].eq(g_new), recip[j].eq(r_new)]
                with m.If(j + 1 == n_groups):
                    m.d.sync += [i.eq(0), j.eq(0)]
                    m.next = "VALUES"
                with m.Else():
                    m.d.sync += j.eq(j + 1)

            # ---- the slot out: values, group multipliers, scale code --------------------
            with m.State("VALUES"):
                byte = Mux(wide, Cat(low[:4], high[:4]), low)
                m.d.comb += [self.flash_wr.en.eq(1),
                             self.flash_wr.addr.eq(job.dst + Mux(wide, i >> 1, i)),
                             self.flash_wr.data.eq(byte)]
                step = Mux(wide, 2, 1)
                with m.If(i + step >= d):
                    m.next = "GROUP_BYTES"
                with m.Else():
                    m.d.sync += i.eq(i + step)
            with m.State("GROUP_BYTES"):
                m.d.comb += [self.flash_wr.en.eq(1),
                             self.flash_wr.addr.eq(job.dst + value_bytes + j),
                             self.flash_wr.data.eq(g[j])]
                with m.If(j + 1 == n_groups):
                    m.next = "CODE"
                with m.Else():
                    m.d.sync += j.eq(j + 1)
            with m.State("CODE"):
                m.d.comb += [self.flash_wr.en.eq(1), self.flash_wr.mask.eq(0xF),
                             self.flash_wr.addr.eq(job.dst + value_bytes + n_groups),
                             self.flash_wr.data.eq(mant | (exp << 16))]
                m.next = "IDLE"
        return m


# ---------------------------------------------------------------------------------------------
# The top
# ---------------------------------------------------------------------------------------------

class CsdTop(wiring.Component):
    """The CSD engine: instruction front end, job sequencer, attention engine and KV append.

    Parameters
    ----------
    csd : CsdConfig
    program : program words or a path, optional
    depth : int, optional
        Instruction memory depth in words.
    **limits
        Buffer sizes of the `AttentionEngine` (max_ctx, max_head_dim, max_heads, max_splits);
        `KvAppend` takes the same max_head_dim.

    Members
    -------
    frontend : Frontend
    engine : AttentionEngine
    append : KvAppend
    run : In(1)
    cdram_rd : Out(read_signature(CDRAM_ADDR_BITS, 4))
        Reads of positions, queries and appended K and V.
    cdram_wr : Out(write_signature(CDRAM_ADDR_BITS, 4))
        Writes of the outputs.
    o_page : Out(stream.Signature(page_request_layout(FLASH_ADDR_BITS)))
    i_page : In(stream.Signature(8 * engine_lanes))
        The flash-page interface of the engine.
    flash_wr : Out(write_signature(FLASH_ADDR_BITS, 4))
        Appended tokens into their page slots.
    o_push, o_pop : Out(token_signature())
    halted, error : Out(1)
    cycles : Out(CYCLE_BITS)
    """

    def __init__(self, csd: CsdConfig, *, program=(), depth: int | None = None, **limits):
        if not isinstance(csd, CsdConfig):
            raise TypeError(f"csd must be a CsdConfig (HardwareConfig.csd), got {csd!r}")
        if csd.engine != "sequential":
            raise ValueError(f"csd.engine = {csd.engine!r} has no RTL: the CSD top builds the "
                             f"sequential engine only; set csd.engine: sequential (as "
                             f"trimem-small does) to build or co-simulate it")
        self.csd = csd
        self.engine = AttentionEngine(csd, **limits)
        self.append = KvAppend(max_head_dim=self.engine.max_head_dim)
        self.frontend = Frontend(isa.Engine.CSD, program, depth=depth)
        super().__init__({
            "run": In(1),
            "cdram_rd": Out(read_signature(CDRAM_ADDR_BITS, 4)),
            "cdram_wr": Out(write_signature(CDRAM_ADDR_BITS, 4)),
            "o_page": Out(stream.Signature(page_request_layout(FLASH_ADDR_BITS))),
            "i_page": In(stream.Signature(8 * csd.engine_lanes)),
            "flash_wr": Out(write_signature(FLASH_ADDR_BITS, 4)),
            "o_push": Out(token_signature()), "o_pop": Out(token_signature()),
            "halted": Out(1), "error": Out(1), "cycles": Out(CYCLE_BITS),
        })

    def elaborate(self, platform):
        m = Module()
        csd = self.csd
        m.submodules.frontend = fe = self.frontend
        m.submodules.engine = eng = self.engine
        m.submodules.append = app = self.append

        # -- front end and engine ports --------------------------------------------------------
        wiring.connect(m, wiring.flipped(self.o_push), fe.o_push)
        wiring.connect(m, wiring.flipped(self.o_pop), fe.o_pop)
        wiring.connect(m, wiring.flipped(self.o_page), eng.o_page)
        wiring.connect(m, wiring.flipped(self.i_page), eng.i_page)
        wiring.connect(m, wiring.flipped(self.cdram_wr), eng.cdram_wr)
        wiring.connect(m, wiring.flipped(self.flash_wr), app.flash_wr)
        m.d.comb += [fe.run.eq(self.run), self.halted.eq(fe.halted),
                     self.cycles.eq(fe.cycles), self.cdram_rd.addr.eq(eng.cdram_rd.addr),
                     eng.cdram_rd.data.eq(self.cdram_rd.data),
                     app.cdram_rd.data.eq(self.cdram_rd.data)]

        # -- the instruction in hand and its KV layout ----------------------------------------
        word = fe.o_instr.payload
        f = Signal.like(word.attn)
        fk = Signal.like(word.kvapp)
        appending = Signal()
        geo = {name: Mux(appending, getattr(fk, name), getattr(f, name)) for name in GEOMETRY}
        head_dim = geo["head_dim"]
        value_bytes = Mux(geo["kv_bits"] == 4, head_dim >> 1, head_dim)
        groups = Mux(geo["kv_group_log2"] == 0, 1, head_dim >> geo["kv_group_log2"])
        token_bytes = Signal(16)
        m.d.comb += token_bytes.eq(value_bytes + groups + layout.SCALE_CODE_BYTES)
        per_page = Signal(16)
        m.d.comb += per_page.eq(csd.page_bytes // Mux(token_bytes == 0, 1, token_bytes))
        max_ctx = Signal(33)
        m.d.comb += max_ctx.eq(1 << geo["ctx_log2"])
        region_bytes = Signal(FLASH_ADDR_BITS)
        m.d.comb += region_bytes.eq((max_ctx + per_page - 1) // Mux(per_page == 0, 1, per_page)
                                    * csd.page_bytes)
        row = Signal(16)
        kv_head = Signal(8)
        kind = Signal()
        pos = Signal(32)
        group = Signal(8)
        m.d.comb += group.eq(f.q_heads // Mux(f.kv_heads == 0, 1, f.kv_heads))
        region = (((geo["seq"] * geo["layers"] + geo["layer"]) * geo["kv_heads"] + kv_head)
                  * KV_KINDS)
        first_head = row * f.q_heads + kv_head * group

        job = eng.i_job.payload
        m.d.comb += [job.pos.eq(pos), job.heads.eq(group), job.head_dim.eq(f.head_dim),
                     job.kv_bits.eq(f.kv_bits), job.kv_group_log2.eq(f.kv_group_log2),
                     job.splits.eq(f.splits), job.topk.eq(f.topk),
                     job.q_addr.eq(f.q_addr + first_head * f.head_dim * 4),
                     job.o_addr.eq(f.o_addr + first_head * f.head_dim * 4),
                     job.k_base.eq(f.kv_base + region * region_bytes),
                     job.v_base.eq(f.kv_base + (region + 1) * region_bytes),
                     job.tpp.eq(per_page), job.token_bytes.eq(token_bytes)]

        page_index = Signal(32)
        m.d.comb += page_index.eq(pos // Mux(per_page == 0, 1, per_page))
        slot = pos - page_index * per_page
        fills = Signal()
        m.d.comb += fills.eq((slot + 1 == per_page) | (pos + 1 == max_ctx))
        flash = FlashTiming(csd)
        wait = Signal(range(max(flash.page_program, 1)))
        put = app.i_job.payload
        m.d.comb += [put.x_addr.eq(Mux(kind, fk.v_addr, fk.k_addr)
                                   + (row * fk.kv_heads + kv_head) * fk.head_dim * 4),
                     put.dst.eq(fk.kv_base + (region + kind) * region_bytes
                                + page_index * csd.page_bytes + slot * token_bytes),
                     put.head_dim.eq(fk.head_dim), put.kv_bits.eq(fk.kv_bits),
                     put.kv_group_log2.eq(fk.kv_group_log2)]

        # -- sequencing: per row its position, then one job per kv head (and kind) ----------
        bad = Signal()
        m.d.comb += self.error.eq(fe.error | eng.error | app.error | bad)
        with m.FSM(name="csd"):
            with m.State("IDLE"):
                m.d.comb += fe.o_instr.ready.eq(1)
                opcode = word.raw[:isa.OPCODE_BITS]
                with m.If(fe.o_instr.valid):
                    with m.If(opcode == ATTN.opcode):
                        m.d.sync += [f.eq(word.attn), appending.eq(0), row.eq(0)]
                        m.next = "POSITION"
                    with m.Elif(opcode == KVAPP.opcode):
                        m.d.sync += [fk.eq(word.kvapp), appending.eq(1), row.eq(0)]
                        m.next = "POSITION"
                    with m.Else():
                        m.d.sync += bad.eq(1)
            with m.State("POSITION"):
                with m.If(~appending & ((f.q_heads % Mux(f.kv_heads == 0, 1, f.kv_heads)) != 0)):
                    m.d.sync += bad.eq(1)
                    m.next = "IDLE"
                with m.Else():
                    m.d.comb += self.cdram_rd.addr.eq(geo["pos_addr"] + row * 4)
                    m.next = "POSITION_DATA"
            with m.State("POSITION_DATA"):
                m.d.sync += [pos.eq(self.cdram_rd.data), kv_head.eq(0), kind.eq(0)]
                with m.If(self.cdram_rd.data >= max_ctx):
                    m.d.sync += bad.eq(1)
                    m.next = "IDLE"
                with m.Elif(appending):
                    m.next = "APPEND"
                with m.Else():
                    m.next = "JOB"
            with m.State("JOB"):
                m.d.comb += eng.i_job.valid.eq(1)
                with m.If(eng.i_job.ready):
                    m.next = "WAIT"
            with m.State("WAIT"):
                with m.If(~eng.busy):
                    with m.If(kv_head + 1 < f.kv_heads):
                        m.d.sync += kv_head.eq(kv_head + 1)
                        m.next = "JOB"
                    with m.Elif(row + 1 < f.m):
                        m.d.sync += row.eq(row + 1)
                        m.next = "POSITION"
                    with m.Else():
                        m.next = "IDLE"
            with m.State("APPEND"):
                m.d.comb += [app.i_job.valid.eq(1), self.cdram_rd.addr.eq(app.cdram_rd.addr)]
                with m.If(app.i_job.ready):
                    m.next = "APPEND_WAIT"
            with m.State("APPEND_WAIT"):
                m.d.comb += self.cdram_rd.addr.eq(app.cdram_rd.addr)
                with m.If(~app.busy):
                    with m.If(fills):
                        m.d.sync += wait.eq(flash.page_program - 1)
                        m.next = "PROGRAM"
                    with m.Else():
                        self._next_append(m, fk, row, kind, kv_head)
            with m.State("PROGRAM"):
                with m.If(wait == 0):
                    self._next_append(m, fk, row, kind, kv_head)
                with m.Else():
                    m.d.sync += wait.eq(wait - 1)
        return m

    def _next_append(self, m, fk, row, kind, kv_head):
        """Step to the next append: kv heads, then V after K, then the next row."""
        with m.If(kv_head + 1 < fk.kv_heads):
            m.d.sync += kv_head.eq(kv_head + 1)
            m.next = "APPEND"
        with m.Elif(~kind):
            m.d.sync += [kind.eq(1), kv_head.eq(0)]
            m.next = "APPEND"
        with m.Elif(row + 1 < fk.m):
            m.d.sync += row.eq(row + 1)
            m.next = "POSITION"
        with m.Else():
            m.next = "IDLE"


@register_top("csd", ("csd",))
def csd_top(cfg: HardwareConfig, **kwargs) -> CsdTop:
    """The CSD engine of `cfg` (keyword arguments as `CsdTop` takes them)."""
    if not isinstance(cfg, HardwareConfig) or cfg.csd is None:
        raise ValueError(f"the csd top needs a config with a csd section, got {cfg!r}")
    return CsdTop(cfg.csd, **kwargs)
