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
the epsilon word after it on `rd_pos`). Built with `hbm=True`, also VPU.EMBED (below).
Other VPU words (EMBED without HBM ports, KVAPP, ATTN) raise `error`, which stops the top's
stream.

VPU.EMBED, cycle for cycle the emulator's `VpuEngine._embed`. Issued at t, it reads the m token
ids twice: on `rd_ids`, one per cycle from t, to add up each HBM channel's bytes of the
gathered rows (row r, n int8 values then their scale code, lies at table_addr + id_r (n +
SCALE_CODE_BYTES)); and on `rd_pos`, one per row, to stream each row's chunks from `rd_hbm`
(its scale code on `rd_hbm_scale`) through a two-stage dequantizer into the `wr` slot an fx
chunk takes. From its issue until the loads are known (t + m + 3) the engine holds
`res.pending` over every HBM channel; it then asks `res` for the channels with bytes from t +
hbm_latency_cycles for stream = ceil(busiest channel's bytes x cycles per byte) cycles, and
ends at

    start + max(stream, m * ceil(n / lanes)) + VPU_FILL    (timing.vpu_stream_cycles)

with the granted `start`. Outputs are written by t + m ceil(n / lanes) + 3, before that end
for every m and n; a grant that comes at or after the end (held back by other clients'
holds) raises `error`, as do a negative id, a row past HBM, ids or outputs past SRAM and a
scale code whose reserved byte is set (each an emulator error too).
"""
from __future__ import annotations

import numpy as np
from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out
from amaranth.utils import exact_log2

from trimem import isa, layout, numerics, timing
from trimem.hdl.frontend import (CYCLE_BITS, FX_BYTES, SIZE_BITS, SramTop, check_sram,
                                 engine_layout, read_signature, register_top, write_signature)
from trimem.hdl.reserve import Reciprocal, client_signature, hbm_range_bytes
from trimem.hdl.vpu import (A8_BITS, EXP_BITS, FX_BITS, MAX_LANES, ROPE_BITS, VectorUnit,
                            VpuOp, rshift_round, saturate)
from trimem.numerics import RECIP_SHIFT
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
HBM_ADDR_BITS = isa.ADDR_BITS[isa.Space.HBM]
"""Width of an HBM byte address."""
DEQUANT_RECIP = int(numerics.dequantize_act(np.ones(1, np.int8), np.ones(1, np.int64),
                                            np.full(1, RECIP_SHIFT)).item())
"""dequantize_act's multiplier round(2**RECIP_SHIFT / 127), read off where it shifts by 0."""
CODE_MANT_BITS = 16
"""Width of a scale code's mant as stored (u16 little-endian, then exp u8 and a zero byte)."""
DEQUANT_BITS = A8_BITS + CODE_MANT_BITS + 1 + DEQUANT_RECIP.bit_length()
"""Width of q * mant * DEQUANT_RECIP."""
LEFT_MAX = FX_BITS - DEQUANT_RECIP.bit_length() + 1
"""A left shift this long (exp > RECIP_SHIFT) saturates every nonzero q * mant * DEQUANT_RECIP,
as it does in dequantize_act's int64 while that holds it (exp <= RECIP_SHIFT + 14)."""
LOAD_BITS = 2 * SIZE_BITS + 1
"""Width of one channel's bytes of an EMBED: m rows of n + SCALE_CODE_BYTES bytes."""


def check_vpu(fpga) -> None:
    """ValueError naming the problem for FPGA configs the VPU RTL cannot build."""
    lanes = fpga.vpu_lanes
    if not 1 <= lanes <= MAX_LANES or lanes & (lanes - 1):
        raise ValueError(f"vpu_lanes = {lanes} must be a power of two in [1, {MAX_LANES}] for "
                         f"the RTL (ROPE chunks tile half heads)")
    check_sram(fpga)


def hbm_channel_bits(fpga, resources) -> tuple[int, ...]:
    """Mask bit of each HBM channel among `resources`; ValueError for channel arithmetic the
    RTL cannot build or resources that lack a channel."""
    channels, step = fpga.hbm_channels, fpga.hbm_interleave_bytes
    if channels & (channels - 1) or step & (step - 1):
        raise ValueError(f"hbm_channels = {channels!r} and hbm_interleave_bytes = {step!r} must "
                         f"be powers of two for the RTL's channel arithmetic")
    names = [f"hbm{c}" for c in range(channels)]
    missing = [name for name in names if name not in tuple(resources)]
    if missing:
        raise ValueError(f"resources {tuple(resources)!r} lack {', '.join(missing)}; pass "
                         f"trimem.hdl.reserve.resource_names(cfg)")
    return tuple(tuple(resources).index(name) for name in names)


class VpuEngine(wiring.Component):
    """VPU.ADD, VPU.SILUMUL, VPU.ROPE, VPU.QUANT and VPU.RMSNORM over SRAM window ports, and
    VPU.EMBED over HBM read ports when built with `hbm`.

    Parameters
    ----------
    fpga : trimem.config.FpgaConfig
    hbm : bool
        Build VPU.EMBED: the `rd_ids` SRAM window, the HBM ports, `res` and `now`.
    resources : tuple of str
        With `hbm`: the resource names of the `Reservations` that `res` joins
        (`trimem.hdl.reserve.resource_names(cfg)`); every HBM channel must be among them.

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
        `g_addr + 4 n`. EMBED: the token id of the next row, read a cycle ahead.
    rd_ids : Out(read_signature(addr_bits, FX_BYTES))
        With `hbm`, EMBED: the token ids, one per cycle from the issue, for the channel loads.
    rd_hbm : Out(read_signature(HBM_ADDR_BITS, lanes))
        With `hbm`, EMBED: the chunk's int8 values.
    rd_hbm_scale : Out(read_signature(HBM_ADDR_BITS, SCALE_CODE_BYTES))
        With `hbm`, EMBED: the row's scale code.
    res : Out(client_signature(len(resources)))
        With `hbm`: the engine's port on `Reservations` (EMBED holds the channels of its rows).
    now : In(CYCLE_BITS)
        With `hbm`: `Reservations.now`.
    wr : Out(write_signature(addr_bits, lanes * FX_BYTES))
        fx chunks, a8 chunks and scale codes.
    error : Out(1)
        Set for good by a VPU word the engine does not run: KVAPP, ATTN, EMBED without `hbm`,
        a ROPE whose head_dim is not a multiple of 2 * lanes (a chunk would straddle a half
        head), or an EMBED the emulator rejects or whose grant comes too late (module
        docstring).

    Attributes
    ----------
    reads : dict
        SRAM read windows (name -> bytes), one `rd_<name>` each.
    hbm_reads : dict
        HBM read ports (name -> bytes), one `rd_<name>` each; empty without `hbm`.
    """

    def __init__(self, fpga, *, hbm: bool = False, resources: tuple[str, ...] = ()):
        check_vpu(fpga)
        self.fpga = fpga
        self.hbm = bool(hbm)
        self.lanes = fpga.vpu_lanes
        self.addr_bits = (fpga.sram_bytes - 1).bit_length()
        width = self.lanes * FX_BYTES
        self.reads = {"a": width, "b": width, "cos": self.lanes * ROPE_BYTES,
                      "sin": self.lanes * ROPE_BYTES, "pos": FX_BYTES}
        self.hbm_reads = {}
        if self.hbm:
            self.channel_bits = hbm_channel_bits(fpga, resources)
            self.reads["ids"] = FX_BYTES
            self.hbm_reads = {"hbm": self.lanes, "hbm_scale": layout.SCALE_CODE_BYTES}
        self.write_bytes = width
        members = {"i_instr": In(stream.Signature(engine_layout(isa.Engine.VPU)))}
        members.update({f"rd_{name}": Out(read_signature(self.addr_bits, w))
                        for name, w in self.reads.items()})
        members.update({f"rd_{name}": Out(read_signature(HBM_ADDR_BITS, w))
                        for name, w in self.hbm_reads.items()})
        members["wr"] = Out(write_signature(self.addr_bits, width))
        members["error"] = Out(1)
        if self.hbm:
            members["res"] = Out(client_signature(len(resources)))
            members["now"] = In(CYCLE_BITS)
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
        binary, quant, rope, rms, embed = word.add, word.quant, word.rope, word.rmsnorm, word.embed
        passes = range(max(len(ops) for ops in PASSES.values()))
        dec = Signal(data.StructLayout({
            "known": 1, "op": VpuOp, "last_pass": passes, "n": SIZE_BITS, "a": addr, "b": addr,
            "o": addr, "s": addr, "pos": addr, "embed": 1}))
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
                             dec.o.eq(rope.o_addr), dec.pos.eq(rope.pos_addr)]
            if self.hbm:
                with m.Case(isa.lookup("VPU.EMBED").opcode):
                    sram = self.fpga.sram_bytes
                    fits = ((embed.ids_addr + embed.m * FX_BYTES <= sram)
                            & (embed.o_addr + embed.m * embed.n * FX_BYTES <= sram))
                    m.d.comb += [dec.known.eq(fits), dec.embed.eq(1), dec.n.eq(embed.n),
                                 dec.o.eq(embed.o_addr), dec.pos.eq(embed.ids_addr)]
        a8_out = dec.last_pass != 0             # QUANT and RMSNORM write a8 rows
        shared_b = dec.op == VpuOp.RMS_QUANT    # one gamma row for every x row

        cfg = Signal(data.StructLayout({
            "op": VpuOp, "last_pass": passes, "n": SIZE_BITS, "row_bytes": SIZE_BITS + 8,
            "b_step": SIZE_BITS + 8, "o_step": range(FX_BYTES * lanes + 1),
            "o_row": SIZE_BITS + 8, "half": 12, "table": addr, "eps": addr, "embed": 1}))
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

        held = Signal()                  # EMBED: its end has not come yet
        m.d.comb += self.i_instr.ready.eq(~stepping & (drain == 0) & ~held)
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
                cfg.eps.eq(rms.g_addr + rms.n * FX_BYTES), cfg.embed.eq(dec.embed),
                stepping.eq(1), rows_left.eq(binary.m), pass_.eq(0), n_left.eq(dec.n),
                offset.eq(0), o_offset.eq(0), in_head.eq(0), a_row.eq(dec.a), b_row.eq(dec.b),
                o_row.eq(dec.o), s_row.eq(dec.s), pos_row.eq(dec.pos)]

        # -- one chunk per cycle: operand addresses -------------------------------------------
        last_chunk = n_left <= lanes
        upper = in_head >= cfg.half
        partner = Mux(upper, -(cfg.half * FX_BYTES), cfg.half * FX_BYTES)
        index = Mux(upper, in_head - cfg.half, in_head)
        table_row = Signal(addr)
        m.d.comb += table_row.eq(cfg.table + self.rd_pos.data * (cfg.half * 2 * ROPE_BYTES))
        next_pos = Mux(accept, dec.pos,
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
                                         "first": 1, "last": 1, "second": 1, "embed": 1}))
        lane_op = Signal(VpuOp)
        m.d.comb += lane_op.eq(cfg.op)
        for last_op, ops in PASSES.items():
            for p, op in enumerate(ops[:-1]):
                with m.If((cfg.op == last_op) & (pass_ == p)):
                    m.d.comb += lane_op.eq(op)
        m.d.sync += [slot.valid.eq(stepping), slot.op.eq(lane_op),
                     slot.count.eq(Mux(last_chunk, n_left, lanes)),
                     slot.first.eq(offset == 0), slot.last.eq(last_chunk),
                     slot.second.eq(upper), slot.embed.eq(cfg.embed)]
        lane_in = unit.i_slot.payload
        m.d.comb += [unit.i_slot.valid.eq(slot.valid & ~slot.embed), lane_in.op.eq(slot.op),
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
        if self.hbm:
            self.embed(m, accept & dec.known & dec.embed, held, slot, cfg.n, offset)
        return m

    def embed(self, m, issue, held, slot, n, offset):
        """VPU.EMBED: the channel loads and the hold of `res`, and the rows' dequantizer.

        `issue` is high in the cycle an EMBED is taken, `held` is driven until its end,
        `slot` is the chunk meeting its data, `n` the row length and `offset` the chunk's
        byte offset in an fx row."""
        fpga, lanes = self.fpga, self.lanes
        word = self.i_instr.payload.embed
        res = self.res
        channels = fpga.hbm_channels
        per_byte = timing.cycles_per_byte(fpga.hbm_gbps_per_channel, fpga.clock_mhz)
        scales = layout.SCALE_CODE_BYTES

        # -- registered at issue --------------------------------------------------------------
        table = Signal(HBM_ADDR_BITS)
        row_bytes = Signal(SIZE_BITS + 1)
        compute = Signal(2 * SIZE_BITS)
        issued = Signal(CYCLE_BITS)
        busy = Signal()                  # from issue to the end
        with m.If(issue):
            m.d.sync += [table.eq(word.table_addr), row_bytes.eq(word.n + scales),
                         compute.eq(word.m * ((word.n + lanes - 1) >> exact_log2(lanes))),
                         issued.eq(self.now), busy.eq(1)]

        # -- channel loads: one id per cycle from the issue -----------------------------------
        ids_left = Signal(SIZE_BITS)
        ids_at = Signal(self.addr_bits)
        loading = Signal()               # rd_ids.data is the id of a row
        m.d.comb += self.rd_ids.addr.eq(Mux(issue, word.ids_addr, ids_at))
        with m.If(loading):
            m.d.sync += [ids_at.eq(ids_at + FX_BYTES), ids_left.eq(ids_left - 1)]
            with m.If(ids_left == 1):
                m.d.sync += loading.eq(0)
        with m.If(issue):
            m.d.sync += [ids_at.eq(word.ids_addr + FX_BYTES), ids_left.eq(word.m),
                         loading.eq(1)]
        token = self.rd_ids.data
        row_valid, row_last = Signal(), Signal()
        row_addr = Signal(HBM_ADDR_BITS + FX_BITS + SIZE_BITS)
        m.d.sync += [row_valid.eq(loading), row_last.eq(loading & (ids_left == 1)),
                     row_addr.eq(table + token[:FX_BITS - 1] * row_bytes)]
        with m.If(loading & token[FX_BITS - 1]):
            m.d.sync += self.error.eq(1)            # a negative token id
        row_end = row_addr + row_bytes
        loads = [Signal(LOAD_BITS, name=f"load_hbm{c}") for c in range(channels)]
        with m.If(row_valid):
            for load, nbytes in zip(loads, hbm_range_bytes(fpga, row_addr, row_bytes)):
                m.d.sync += load.eq(load + nbytes)
            with m.If(row_end > fpga.hbm_bytes):
                m.d.sync += self.error.eq(1)        # a row past HBM
        with m.If(issue):
            m.d.sync += [load.eq(0) for load in loads]
        tally = Signal()                 # the loads are complete
        m.d.sync += tally.eq(row_valid & row_last)

        # -- the hold: stream cycles of the busiest channel, then the grant -------------------
        busiest = Const(0, LOAD_BITS)
        for load in loads:
            busiest = Mux(load > busiest, load, busiest)
        stream = Reciprocal(per_byte, LOAD_BITS)(busiest)
        request = res.request.payload
        length = Signal(CYCLE_BITS)      # the end's distance from the start
        asking, waiting = Signal(), Signal()
        end = Signal(CYCLE_BITS)
        m.d.comb += [request.issued.eq(issued),
                     request.earliest.eq(issued + fpga.hbm_latency_cycles),
                     res.request.valid.eq(asking),
                     res.pending.eq(issue | (busy & ~asking & ~waiting)),
                     res.pending_issued.eq(Mux(issue, self.now, issued))]
        for bit in self.channel_bits:
            m.d.comb += res.pending_mask[bit].eq(1)
        with m.If(tally):
            m.d.sync += [request.cycles.eq(stream), asking.eq(1),
                         length.eq(Mux(stream > compute, stream, compute) + VPU_FILL)]
            for c, bit in enumerate(self.channel_bits):
                m.d.sync += request.mask[bit].eq(loads[c] != 0)
        finish = res.start + length
        with m.If(asking & res.request.ready):
            m.d.sync += [asking.eq(0), end.eq(finish), waiting.eq(finish > self.now)]
            with m.If(finish <= self.now):
                m.d.sync += self.error.eq(1)        # granted after its end
        at_end = waiting & (self.now == end)
        m.d.comb += held.eq(busy & ~at_end)
        with m.If(at_end):
            m.d.sync += waiting.eq(0)
            with m.If(~issue):
                m.d.sync += busy.eq(0)

        # -- rows: chunk and scale code of the row whose id rd_pos read -----------------------
        base = table + self.rd_pos.data[:FX_BITS - 1] * row_bytes
        m.d.comb += [self.rd_hbm.addr.eq(base + (offset >> exact_log2(FX_BYTES))),
                     self.rd_hbm_scale.addr.eq(base + n)]
        code = self.rd_hbm_scale.data
        mant = code[:CODE_MANT_BITS]
        exp = code[CODE_MANT_BITS:CODE_MANT_BITS + EXP_BITS]
        live = slot.valid & slot.embed
        with m.If(live & (code[CODE_MANT_BITS + EXP_BITS:] != 0)):
            m.d.sync += self.error.eq(1)            # a scale code's reserved byte is set

        # -- dequantize (trimem.numerics.dequantize_act) in two stages, then the write -------
        ctl = data.StructLayout({"valid": 1, "count": range(lanes + 1)})
        ctl1, ctl2 = Signal(ctl), Signal(ctl)
        left = Signal(range(LEFT_MAX + 1))
        right = Signal(range(RECIP_SHIFT + 1))
        product = Signal(data.ArrayLayout(signed(DEQUANT_BITS), lanes))
        y = Signal(data.ArrayLayout(signed(FX_BITS), lanes))
        m.d.sync += [ctl1.valid.eq(live), ctl1.count.eq(slot.count), ctl2.eq(ctl1),
                     left.eq(Mux(exp > RECIP_SHIFT + LEFT_MAX, LEFT_MAX,
                                 Mux(exp > RECIP_SHIFT, exp - RECIP_SHIFT, 0))),
                     right.eq(Mux(exp < RECIP_SHIFT, RECIP_SHIFT - exp, 0))]
        for i in range(lanes):
            q = self.rd_hbm.data.word_select(i, 8).as_signed()
            m.d.sync += [product[i].eq(q * (mant * DEQUANT_RECIP)),
                         y[i].eq(saturate(rshift_round(product[i] << left, right), FX_BITS))]
        with m.If(ctl2.valid):
            m.d.comb += [self.wr.en.eq(1), self.wr.data.eq(y.as_value())]
            for b in range(lanes * FX_BYTES):
                m.d.comb += self.wr.mask[b].eq(b // FX_BYTES < ctl2.count)


@register_top("vpu", engines=("fpga",))
def vpu_top(cfg, program=(), **kwargs) -> SramTop:
    """The VPU stream of `cfg` on its own: front end, `VpuEngine`, SRAM (see `SramTop`)."""
    if cfg.fpga is None:
        raise ValueError(f"config {cfg.name!r} has no fpga section; the VPU top needs one")
    return SramTop(cfg, VpuEngine(cfg.fpga), isa.Engine.VPU, program, **kwargs)
