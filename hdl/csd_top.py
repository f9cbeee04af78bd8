"""The CSD engine top: a front end running `csd.bin` and the in-storage attention engine.

A CSD.ATTN becomes one `AttentionEngine` job per (query row, kv head): the top reads the row's
position from CDRAM, works out the K and V regions of the head in FLASH with the layout of
`trimem.layout.kv_offset` (page size `csd.page_bytes`, the instruction's cache geometry), and
hands the group of query heads that share the kv head to the engine. The instruction ends when
the last job's last output is written. CSD.KVAPP is not built: it sets `error` and ends.
"""
from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from trimem import isa, layout
from trimem.config import CsdConfig, HardwareConfig
from trimem.hdl.attention import (CDRAM_ADDR_BITS, FLASH_ADDR_BITS, AttentionEngine,
                                  page_request_layout)
from trimem.hdl.frontend import (CYCLE_BITS, Frontend, read_signature, register_top,
                                 token_signature, write_signature)

ATTN = isa.lookup("CSD.ATTN")
KV_KINDS = len(layout.KV_KINDS)


class CsdTop(wiring.Component):
    """The CSD engine: instruction front end, job sequencer and attention engine.

    Parameters
    ----------
    csd : CsdConfig
    program : program words or a path, optional
    depth : int, optional
        Instruction memory depth in words.
    **limits
        Buffer sizes of the `AttentionEngine` (max_ctx, max_head_dim, max_heads, max_splits).

    Members
    -------
    frontend : Frontend
    engine : AttentionEngine
    run : In(1)
    cdram_rd : Out(read_signature(CDRAM_ADDR_BITS, 4))
        Reads of positions and queries.
    cdram_wr : Out(write_signature(CDRAM_ADDR_BITS, 4))
        Writes of the outputs.
    o_page : Out(stream.Signature(page_request_layout(FLASH_ADDR_BITS)))
    i_page : In(stream.Signature(8 * engine_lanes))
        The flash-page interface of the engine.
    o_push, o_pop : Out(token_signature())
    halted, error : Out(1)
    cycles : Out(CYCLE_BITS)
    """

    def __init__(self, csd: CsdConfig, *, program=(), depth: int | None = None, **limits):
        if not isinstance(csd, CsdConfig):
            raise TypeError(f"csd must be a CsdConfig (HardwareConfig.csd), got {csd!r}")
        self.csd = csd
        self.engine = AttentionEngine(csd, **limits)
        self.frontend = Frontend(isa.Engine.CSD, program, depth=depth)
        super().__init__({
            "run": In(1),
            "cdram_rd": Out(read_signature(CDRAM_ADDR_BITS, 4)),
            "cdram_wr": Out(write_signature(CDRAM_ADDR_BITS, 4)),
            "o_page": Out(stream.Signature(page_request_layout(FLASH_ADDR_BITS))),
            "i_page": In(stream.Signature(8 * csd.engine_lanes)),
            "o_push": Out(token_signature()), "o_pop": Out(token_signature()),
            "halted": Out(1), "error": Out(1), "cycles": Out(CYCLE_BITS),
        })

    def elaborate(self, platform):
        m = Module()
        csd = self.csd
        m.submodules.frontend = fe = self.frontend
        m.submodules.engine = eng = self.engine

        # -- front end and engine ports --------------------------------------------------------
        wiring.connect(m, wiring.flipped(self.o_push), fe.o_push)
        wiring.connect(m, wiring.flipped(self.o_pop), fe.o_pop)
        wiring.connect(m, wiring.flipped(self.o_page), eng.o_page)
        wiring.connect(m, wiring.flipped(self.i_page), eng.i_page)
        wiring.connect(m, wiring.flipped(self.cdram_wr), eng.cdram_wr)
        m.d.comb += [fe.run.eq(self.run), self.halted.eq(fe.halted),
                     self.cycles.eq(fe.cycles), self.cdram_rd.addr.eq(eng.cdram_rd.addr),
                     eng.cdram_rd.data.eq(self.cdram_rd.data)]

        # -- the instruction in hand and its KV layout ----------------------------------------
        word = fe.o_instr.payload
        f = Signal.like(word.attn)
        head_dim = f.head_dim
        value_bytes = Mux(f.kv_bits == 4, head_dim >> 1, head_dim)
        groups = Mux(f.kv_group_log2 == 0, 1, head_dim >> f.kv_group_log2)
        token_bytes = Signal(16)
        m.d.comb += token_bytes.eq(value_bytes + groups + layout.SCALE_CODE_BYTES)
        per_page = Signal(16)
        m.d.comb += per_page.eq(csd.page_bytes // Mux(token_bytes == 0, 1, token_bytes))
        max_ctx = Signal(33)
        m.d.comb += max_ctx.eq(1 << f.ctx_log2)
        region_bytes = Signal(FLASH_ADDR_BITS)
        m.d.comb += region_bytes.eq((max_ctx + per_page - 1) // Mux(per_page == 0, 1, per_page)
                                    * csd.page_bytes)
        row = Signal(16)
        kv_head = Signal(8)
        pos = Signal(32)
        group = Signal(8)
        m.d.comb += group.eq(f.q_heads // Mux(f.kv_heads == 0, 1, f.kv_heads))
        region = ((f.seq * f.layers + f.layer) * f.kv_heads + kv_head) * KV_KINDS
        first_head = row * f.q_heads + kv_head * group

        job = eng.i_job.payload
        m.d.comb += [job.pos.eq(pos), job.heads.eq(group), job.head_dim.eq(head_dim),
                     job.kv_bits.eq(f.kv_bits), job.kv_group_log2.eq(f.kv_group_log2),
                     job.splits.eq(f.splits), job.topk.eq(f.topk),
                     job.q_addr.eq(f.q_addr + first_head * head_dim * 4),
                     job.o_addr.eq(f.o_addr + first_head * head_dim * 4),
                     job.k_base.eq(f.kv_base + region * region_bytes),
                     job.v_base.eq(f.kv_base + (region + 1) * region_bytes),
                     job.tpp.eq(per_page), job.token_bytes.eq(token_bytes)]

        # -- sequencing: per row its position, then one job per kv head ----------------------
        bad = Signal()
        m.d.comb += self.error.eq(fe.error | eng.error | bad)
        with m.FSM(name="csd"):
            with m.State("IDLE"):
                m.d.comb += fe.o_instr.ready.eq(1)
                with m.If(fe.o_instr.valid):
                    with m.If(word.raw[:isa.OPCODE_BITS] == ATTN.opcode):
                        m.d.sync += [f.eq(word.attn), row.eq(0)]
                        m.next = "POSITION"
                    with m.Else():
                        m.d.sync += bad.eq(1)
            with m.State("POSITION"):
                with m.If((f.q_heads % Mux(f.kv_heads == 0, 1, f.kv_heads)) != 0):
                    m.d.sync += bad.eq(1)
                    m.next = "IDLE"
                with m.Else():
                    m.d.comb += self.cdram_rd.addr.eq(f.pos_addr + row * 4)
                    m.next = "POSITION_DATA"
            with m.State("POSITION_DATA"):
                m.d.sync += [pos.eq(self.cdram_rd.data), kv_head.eq(0)]
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
        return m


@register_top("csd", ("csd",))
def csd_top(cfg: HardwareConfig, **kwargs) -> CsdTop:
    """The CSD engine of `cfg` (keyword arguments as `CsdTop` takes them)."""
    if not isinstance(cfg, HardwareConfig) or cfg.csd is None:
        raise ValueError(f"the csd top needs a config with a csd section, got {cfg!r}")
    return CsdTop(cfg.csd, **kwargs)
