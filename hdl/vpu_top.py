"""The VPU engine and its instruction-driven top: element-wise VPU ops on SRAM rows.

`VpuEngine` takes VPU words and streams each row through a `VectorUnit` in chunks of
`fpga.vpu_lanes` elements, one chunk per cycle, pass after pass. Cycle count, exactly
`trimem.timing.vpu_cycles`:

    accept and decode (cycle 0), one chunk read per cycle (cycles 1 .. T), operand read (1),
    function (1), round-saturate and write (1)
    => ready again at VPU_FILL + T,   T = m * ceil(n / lanes) * passes(op)

The "vpu" top (`vpu_top`) runs a VPU stream on its own (`trimem.hdl.frontend.SramTop`).

Built: VPU.ADD, VPU.SILUMUL and VPU.ROPE (one pass; a ROPE row is heads * head_dim elements,
its table row `table_addr + pos * head_dim * 2` holds cos then sin as int16), VPU.QUANT (two
passes: row max, then quantize; the row's scale code is written in its first pass's last
write slot) and VPU.RMSNORM (three passes: sum of squares; y = x' r gamma and its row max,
whose scale code takes that pass's last write slot; quantize y; gamma is read on `rd_b` and
the epsilon word after it on `rd_pos`). Other VPU words (EMBED, KVAPP, ATTN) raise `error`,
which stops the top's stream.
"""
from __future__ import annotations

from amaranth.hdl import Cat, Module, Mux, Signal, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from trimem import isa, layout
from trimem.hdl.frontend import (FX_BYTES, SIZE_BITS, SramTop, check_sram, engine_layout,
                                 read_signature, register_top, write_signature)
from trimem.hdl.vpu import MAX_LANES, ROPE_BITS, VectorUnit, VpuOp
from trimem.timing import VPU_FILL

BUILT = {"VPU.ADD": VpuOp.ADD, "VPU.SILUMUL": VpuOp.SILUMUL, "VPU.ROPE": VpuOp.ROPE,
         "VPU.QUANT": VpuOp.QUANT, "VPU.RMSNORM": VpuOp.RMS_QUANT}
"""VPU instructions the engine runs, and the lane operation of their last pass."""
PASSES = {VpuOp.QUANT: (VpuOp.AMAX, VpuOp.QUANT),
          VpuOp.RMS_QUANT: (VpuOp.RMS_SQ, VpuOp.RMS_AMAX, VpuOp.RMS_QUANT)}
"""Lane operations of each pass of the multi-pass ops, by their last pass; the passes match
trimem.timing.VPU_PASSES."""
SCALE_OPS = (VpuOp.AMAX, VpuOp.RMS_AMAX)
"""Passes whose last chunk writes the row's scale code."""
ROPE_BYTES = ROPE_BITS // 8
"""Bytes of one RoPE table entry in SRAM."""


def check_vpu(fpga) -> None:
    """ValueError naming the problem for FPGA configs the VPU RTL cannot build."""
    lanes = fpga.vpu_lanes
    if not 1 <= lanes <= MAX_LANES or lanes & (lanes - 1):
        raise ValueError(f"vpu_lanes = {lanes} must be a power of two in [1, {MAX_LANES}] for "
                         f"the RTL (ROPE chunks tile half heads)")
    check_sram(fpga)


class VpuEngine(wiring.Component):
    """VPU.ADD, VPU.SILUMUL, VPU.ROPE, VPU.QUANT and VPU.RMSNORM over SRAM window ports.

    Parameters
    ----------
    fpga : trimem.config.FpgaConfig

    Members
    -------
    i_instr : In(stream.Signature(engine_layout(VPU)))
        Ready exactly when idle: the front end's `o_instr`.
    rd_a, rd_b : Out(read_signature(addr_bits, lanes * FX_BYTES))
        The chunk's operands (QUANT, RMSNORM and ROPE read `x` on `rd_a`; ROPE its partner
        elements, half a head away, on `rd_b`; RMSNORM the chunk's gamma on `rd_b`).
    rd_cos, rd_sin : Out(read_signature(addr_bits, lanes * ROPE_BYTES))
        ROPE: the table entries of the chunk's row position.
    rd_pos : Out(read_signature(addr_bits, FX_BYTES))
        ROPE: the position of the next row, read a cycle ahead. RMSNORM: the epsilon code at
        `g_addr + 4 n`.
    wr : Out(write_signature(addr_bits, lanes * FX_BYTES))
        fx chunks, a8 chunks and scale codes.
    error : Out(1)
        Set for good by a VPU word the engine does not run: EMBED, KVAPP, ATTN, or a
        ROPE whose head_dim is not a multiple of 2 * lanes (a chunk would straddle a half head).
    """

    def __init__(self, fpga):
        check_vpu(fpga)
        self.fpga = fpga
        self.lanes = fpga.vpu_lanes
        self.addr_bits = (fpga.sram_bytes - 1).bit_length()
        width = self.lanes * FX_BYTES
        self.reads = {"a": width, "b": width, "cos": self.lanes * ROPE_BYTES,
                      "sin": self.lanes * ROPE_BYTES, "pos": FX_BYTES}
        self.write_bytes = width
        members = {"i_instr": In(stream.Signature(engine_layout(isa.Engine.VPU)))}
        members.update({f"rd_{name}": Out(read_signature(self.addr_bits, w))
                        for name, w in self.reads.items()})
        members["wr"] = Out(write_signature(self.addr_bits, width))
        members["error"] = Out(1)
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        lanes = self.lanes
        addr = unsigned(self.addr_bits)
        m.submodules.lanes = unit = VectorUnit(lanes)
        word = self.i_instr.payload
        opcode = word.raw[:isa.OPCODE_BITS]

        # -- decode (cycle 0): row length and addresses of each built op ---------------------
        # SILUMUL has ADD's fields
        binary, quant, rope, rms = word.add, word.quant, word.rope, word.rmsnorm
        passes = range(max(len(ops) for ops in PASSES.values()))
        dec = Signal(data.StructLayout({
            "known": 1, "op": VpuOp, "last_pass": passes, "n": SIZE_BITS, "a": addr, "b": addr,
            "o": addr, "s": addr}))
        with m.Switch(opcode):
            for name in ("VPU.ADD", "VPU.SILUMUL"):
                with m.Case(isa.lookup(name).opcode):
                    m.d.comb += [dec.known.eq(1), dec.op.eq(BUILT[name]), dec.n.eq(binary.n),
                                 dec.a.eq(binary.a_addr), dec.b.eq(binary.b_addr),
                                 dec.o.eq(binary.o_addr)]
            with m.Case(isa.lookup("VPU.QUANT").opcode):
                m.d.comb += [dec.known.eq(1), dec.op.eq(VpuOp.QUANT),
                             dec.last_pass.eq(len(PASSES[VpuOp.QUANT]) - 1),
                             dec.n.eq(quant.n), dec.a.eq(quant.x_addr), dec.o.eq(quant.o_addr),
                             dec.s.eq(quant.s_addr)]
            with m.Case(isa.lookup("VPU.RMSNORM").opcode):
                m.d.comb += [dec.known.eq(1), dec.op.eq(VpuOp.RMS_QUANT),
                             dec.last_pass.eq(len(PASSES[VpuOp.RMS_QUANT]) - 1),
                             dec.n.eq(rms.n), dec.a.eq(rms.x_addr), dec.b.eq(rms.g_addr),
                             dec.o.eq(rms.o_addr), dec.s.eq(rms.s_addr)]
            with m.Case(isa.lookup("VPU.ROPE").opcode):
                whole_chunks = rope.head_dim[:(2 * lanes - 1).bit_length()] == 0
                m.d.comb += [dec.known.eq(whole_chunks), dec.op.eq(VpuOp.ROPE),
                             dec.n.eq(rope.heads * rope.head_dim), dec.a.eq(rope.x_addr),
                             dec.o.eq(rope.o_addr)]
        a8_out = dec.last_pass != 0             # QUANT and RMSNORM write a8 rows
        shared_b = dec.op == VpuOp.RMS_QUANT    # one gamma row for every x row

        cfg = Signal(data.StructLayout({
            "op": VpuOp, "last_pass": passes, "n": SIZE_BITS, "row_bytes": SIZE_BITS + 8,
            "b_step": SIZE_BITS + 8, "o_step": range(FX_BYTES * lanes + 1),
            "o_row": SIZE_BITS + 8, "half": 12, "table": addr, "eps": addr}))
        stepping = Signal()
        drain = Signal(range(VPU_FILL))
        rows_left = Signal(SIZE_BITS)
        pass_ = Signal(passes)           # the pass of a multi-pass op
        n_left = Signal(SIZE_BITS + 1)
        offset = Signal(addr)            # chunk offset inside the operand rows
        o_offset = Signal(addr)
        in_head = Signal(12)             # ROPE: element index of the chunk inside its head
        a_row = Signal(addr)
        b_row = Signal(addr)
        o_row = Signal(addr)
        s_row = Signal(addr)
        pos_row = Signal(addr)

        m.d.comb += self.i_instr.ready.eq(~stepping & (drain == 0))
        accept = self.i_instr.valid & self.i_instr.ready
        with m.If(accept & ~dec.known):
            m.d.sync += self.error.eq(1)
        with m.If(accept & dec.known):
            m.d.sync += [
                cfg.op.eq(dec.op), cfg.last_pass.eq(dec.last_pass), cfg.n.eq(dec.n),
                cfg.row_bytes.eq(dec.n * FX_BYTES),
                cfg.b_step.eq(Mux(shared_b, 0, dec.n * FX_BYTES)),
                cfg.o_step.eq(Mux(a8_out, lanes, lanes * FX_BYTES)),
                cfg.o_row.eq(Mux(a8_out, dec.n, dec.n * FX_BYTES)),
                cfg.half.eq(rope.head_dim >> 1), cfg.table.eq(rope.table_addr),
                cfg.eps.eq(rms.g_addr + rms.n * FX_BYTES),
                stepping.eq(1), rows_left.eq(binary.m), pass_.eq(0), n_left.eq(dec.n),
                offset.eq(0), o_offset.eq(0), in_head.eq(0), a_row.eq(dec.a), b_row.eq(dec.b),
                o_row.eq(dec.o), s_row.eq(dec.s), pos_row.eq(rope.pos_addr)]

        # -- one chunk per cycle: operand addresses -------------------------------------------
        last_chunk = n_left <= lanes
        upper = in_head >= cfg.half
        partner = Mux(upper, -(cfg.half * FX_BYTES), cfg.half * FX_BYTES)
        index = Mux(upper, in_head - cfg.half, in_head)
        table_row = Signal(addr)
        m.d.comb += table_row.eq(cfg.table + self.rd_pos.data * (cfg.half * 2 * ROPE_BYTES))
        next_pos = Mux(accept, rope.pos_addr,
                       Mux(stepping & last_chunk, pos_row + FX_BYTES, pos_row))
        m.d.comb += [
            self.rd_a.addr.eq(a_row + offset),
            self.rd_b.addr.eq(Mux(cfg.op == VpuOp.ROPE, a_row + offset + partner,
                                  b_row + offset)),
            self.rd_cos.addr.eq(table_row + index * ROPE_BYTES),
            self.rd_sin.addr.eq(table_row + (cfg.half + index) * ROPE_BYTES),
            self.rd_pos.addr.eq(Mux(~accept & (cfg.op == VpuOp.RMS_QUANT), cfg.eps,
                                    next_pos))]

        # -- the chunk meets its data one cycle later -----------------------------------------
        slot = Signal(data.StructLayout({"valid": 1, "op": VpuOp, "count": range(lanes + 1),
                                         "first": 1, "last": 1, "second": 1}))
        lane_op = Signal(VpuOp)
        m.d.comb += lane_op.eq(cfg.op)
        for last_op, ops in PASSES.items():
            for p, op in enumerate(ops[:-1]):
                with m.If((cfg.op == last_op) & (pass_ == p)):
                    m.d.comb += lane_op.eq(op)
        m.d.sync += [slot.valid.eq(stepping), slot.op.eq(lane_op),
                     slot.count.eq(Mux(last_chunk, n_left, lanes)),
                     slot.first.eq(offset == 0), slot.last.eq(last_chunk),
                     slot.second.eq(upper)]
        lane_in = unit.i_slot.payload
        m.d.comb += [unit.i_slot.valid.eq(slot.valid), lane_in.op.eq(slot.op),
                     lane_in.count.eq(slot.count), lane_in.first.eq(slot.first),
                     lane_in.last.eq(slot.last), lane_in.second.eq(slot.second),
                     lane_in.n.eq(cfg.n), lane_in.eps.eq(self.rd_pos.data),
                     lane_in.a.as_value().eq(self.rd_a.data),
                     lane_in.b.as_value().eq(self.rd_b.data),
                     lane_in.cos.as_value().eq(self.rd_cos.data),
                     lane_in.sin.as_value().eq(self.rd_sin.data)]

        # -- write addresses follow the chunk through the pipeline ----------------------------
        target = Signal(addr)
        to_scale = Cat(*(lane_op == op for op in SCALE_OPS)).any()
        m.d.comb += target.eq(Mux(to_scale, s_row, o_row + o_offset))
        for d in range(VPU_FILL - 1):
            delayed = Signal(addr, name=f"target_d{d}")
            m.d.sync += delayed.eq(target)
            target = delayed

        # -- loop counters --------------------------------------------------------------------
        with m.If(stepping):
            with m.If(~last_chunk):
                m.d.sync += [n_left.eq(n_left - lanes), offset.eq(offset + lanes * FX_BYTES),
                             o_offset.eq(o_offset + cfg.o_step),
                             in_head.eq(Mux(in_head + lanes == cfg.half * 2, 0,
                                            in_head + lanes))]
            with m.Else():
                m.d.sync += [n_left.eq(cfg.n), offset.eq(0), o_offset.eq(0), in_head.eq(0)]
                with m.If(pass_ != cfg.last_pass):
                    m.d.sync += pass_.eq(pass_ + 1)
                with m.Else():
                    m.d.sync += [pass_.eq(0), rows_left.eq(rows_left - 1),
                                 a_row.eq(a_row + cfg.row_bytes), b_row.eq(b_row + cfg.b_step),
                                 o_row.eq(o_row + cfg.o_row),
                                 s_row.eq(s_row + layout.SCALE_CODE_BYTES),
                                 pos_row.eq(pos_row + FX_BYTES)]
                    with m.If(rows_left == 1):
                        m.d.sync += [stepping.eq(0), drain.eq(VPU_FILL - 1)]
        with m.Elif(drain != 0):
            m.d.sync += drain.eq(drain - 1)

        # -- write back -----------------------------------------------------------------------
        out = unit.o_slot.payload
        m.d.comb += self.wr.addr.eq(target)
        with m.If(unit.o_slot.valid):
            with m.Switch(out.op):
                with m.Case(VpuOp.ADD, VpuOp.SILUMUL, VpuOp.ROPE):
                    m.d.comb += [self.wr.en.eq(1), self.wr.data.eq(out.y.as_value())]
                    for b in range(lanes * FX_BYTES):
                        m.d.comb += self.wr.mask[b].eq(b // FX_BYTES < out.count)
                with m.Case(VpuOp.QUANT, VpuOp.RMS_QUANT):
                    m.d.comb += [self.wr.en.eq(1), self.wr.data.eq(out.q.as_value())]
                    for b in range(lanes):
                        m.d.comb += self.wr.mask[b].eq(b < out.count)
                with m.Case(*SCALE_OPS):
                    m.d.comb += [self.wr.en.eq(out.last),
                                 self.wr.data.eq(out.mant | (out.exp << 16)),
                                 self.wr.mask.eq((1 << layout.SCALE_CODE_BYTES) - 1)]
        return m


@register_top("vpu", engines=("fpga",))
def vpu_top(cfg, program=(), **kwargs) -> SramTop:
    """The VPU stream of `cfg` on its own: front end, `VpuEngine`, SRAM (see `SramTop`)."""
    if cfg.fpga is None:
        raise ValueError(f"config {cfg.name!r} has no fpga section; the VPU top needs one")
    return SramTop(cfg, VpuEngine(cfg.fpga), isa.Engine.VPU, program, **kwargs)
