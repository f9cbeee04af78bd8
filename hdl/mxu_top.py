"""The MXU engine and its instruction-driven top: MXU.GEMM on the sparse DSP chains.

`MxuEngine` takes MXU.GEMM words, walks rows t, groups of C output channels j and steps s of
L kept weights, reads every operand of a step from the SRAM in one cycle through window ports,
and feeds a `ChainArray`; finished channels are written back as fx. Cycle count, exactly
`trimem.timing.mxu_gemm_cycles`:

    accept and decode (cycle 0), one step read per cycle (cycles 1 .. S), SRAM read (1),
    chain (L), requant product (1), write (the last of the L + 3 fill cycles)
    => ready again at MXU_FILL + S,   S = m * ceil(n / C) * ceil(kc / L)

Operand addresses follow the packed weight tile of `trimem.layout` (values | indices | group
multipliers | channel requant) and the activation and scale-code layouts of docs/contract.md.
The "mxu" top (`mxu_top`) runs an MXU stream on its own: a `Frontend`, the engine and an
`Sram` (`trimem.hdl.frontend.SramTop`).
"""
from __future__ import annotations

from amaranth.hdl import Const, Module, Mux, Signal, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from trimem import isa, layout
from trimem.hdl.dsp_chain import (ChainArray, check_chain_shape, group_window_bytes, times,
                                  window_bytes)
from trimem.hdl.frontend import (FX_BYTES, SIZE_BITS, SramTop, check_sram, engine_layout,
                                 read_signature, register_top, write_signature)
from trimem.numerics import nm_index_bits
from trimem.timing import REQUANT_STAGES

MAX_RTL_MACS = 1024
"""Most DSPs (chains x chain length) an MXU is built with: larger arrays are beyond
simulation sizes."""


def check_mxu(fpga) -> None:
    """ValueError naming the problem for FPGA configs the MXU RTL cannot build."""
    check_chain_shape(fpga.dsp_chains, fpga.chain_length, fpga.nm_patterns)
    if fpga.macs_per_cycle > MAX_RTL_MACS:
        raise ValueError(f"{fpga.dsp_chains} chains x {fpga.chain_length} = "
                         f"{fpga.macs_per_cycle} DSPs exceeds the {MAX_RTL_MACS} the RTL builds; "
                         f"use a smaller preset such as trimem-small or pim-gpt")
    check_sram(fpga)


class MxuEngine(wiring.Component):
    """MXU.GEMM over SRAM window ports (see the module docstring for the schedule).

    Parameters
    ----------
    fpga : trimem.config.FpgaConfig

    Members
    -------
    i_instr : In(stream.Signature(engine_layout(MXU)))
        Ready exactly when idle: the front end's `o_instr`.
    rd_act, rd_scale, rd_requant : Out(read_signature(...))
        The step's activation window, the row's scale code, the C channels' requant pairs.
    rd_values<c>, rd_indices<c>, rd_groups<c> : Out(read_signature(...))
        Chain c's packed values, N:M indices (only with a sparse pattern) and group bytes.
    wr : Out(write_signature(addr_bits, C * FX_BYTES))
        The C fx outputs of a row and channel group.
    error : Out(1)
        Set for good by a word the engine cannot run: another MXU opcode, an `nm` beyond the
        config's patterns, or weight bits the config lacks.
    """

    def __init__(self, fpga):
        check_mxu(fpga)
        self.fpga = fpga
        self.chains, self.length = fpga.dsp_chains, fpga.chain_length
        self.patterns = tuple(tuple(p) for p in fpga.nm_patterns)
        self.addr_bits = (fpga.sram_bytes - 1).bit_length()
        self.reads = self._reads()
        members = {"i_instr": In(stream.Signature(engine_layout(isa.Engine.MXU)))}
        members.update({f"rd_{name}": Out(read_signature(self.addr_bits, width))
                        for name, width in self.reads.items()})
        self.write_bytes = self.chains * FX_BYTES
        members["wr"] = Out(write_signature(self.addr_bits, self.write_bytes))
        members["error"] = Out(1)
        super().__init__(members)

    def _index_bits(self) -> int:
        return max(nm_index_bits(m) for _, m in self.patterns)

    def _reads(self) -> dict:
        """Read ports and their widths in bytes."""
        length, chains = self.length, self.chains
        reads = {"act": window_bytes(length, self.patterns),
                 "scale": layout.SCALE_CODE_BYTES,
                 "requant": chains * layout.REQUANT_BYTES}
        for c in range(chains):
            reads[f"values{c}"] = length
            if self._index_bits():
                reads[f"indices{c}"] = length * self._index_bits() // 8
            reads[f"groups{c}"] = group_window_bytes(length, self.patterns)
        return reads

    def elaborate(self, platform):
        m = Module()
        chains, length = self.chains, self.length
        lshift = (length - 1).bit_length()
        addr = unsigned(self.addr_bits)
        m.submodules.array = array = ChainArray(chains, length, self.patterns)
        gemm = self.i_instr.payload.gemm

        # -- decode: tile geometry from the fields (cycle 0) ---------------------------------
        kept = Signal(SIZE_BITS)        # kc = k / m * n_keep
        window = Signal(range(window_bytes(length, self.patterns) + 1))
        index_step = Signal(range(length + 1))    # index bytes per step
        row_indices = Signal(SIZE_BITS)
        with m.Switch(gemm.nm):
            for p, (keep, block) in enumerate(self.patterns):
                bits = nm_index_bits(block)
                row_kept = times(gemm.k >> (block - 1).bit_length(), keep)
                with m.Case(p):
                    m.d.comb += [kept.eq(row_kept), window.eq(length // keep * block),
                                 index_step.eq(length * bits // 8),
                                 row_indices.eq((times(row_kept, bits) + 7) >> 3)]
        bits4 = gemm.bits == 4
        row_values = Signal(SIZE_BITS)
        row_groups = Signal(SIZE_BITS)
        m.d.comb += [row_values.eq(Mux(bits4, (kept + 1) >> 1, kept)),
                     row_groups.eq(Mux(gemm.group_log2 == 0, 1, gemm.k >> gemm.group_log2))]
        indices_at = Signal(addr)
        groups_at = Signal(addr)
        requant_at = Signal(addr)
        m.d.comb += [indices_at.eq(gemm.w_addr + gemm.n * row_values),
                     groups_at.eq(indices_at + gemm.n * row_indices),
                     requant_at.eq(groups_at + gemm.n * row_groups)]

        # -- instruction registers ------------------------------------------------------------
        cfg = Signal(data.StructLayout({
            "k": SIZE_BITS, "n": SIZE_BITS, "kept": SIZE_BITS, "steps": SIZE_BITS,
            "window": window.shape(), "index_step": index_step.shape(),
            "value_step": range(length + 1), "nm": gemm.nm.shape(), "bits4": 1,
            "group_log2": 4, "o_addr": addr, "s_addr": addr,
            "values": addr, "indices": addr, "groups": addr, "requant": addr,
            "stride_values": addr, "stride_indices": addr, "stride_groups": addr}))
        chain_off = Signal(data.ArrayLayout(data.ArrayLayout(addr, 3), chains))

        # -- loop state -----------------------------------------------------------------------
        stepping = Signal()
        drain = Signal(range(length + REQUANT_STAGES + 1))
        rows_left = Signal(SIZE_BITS)
        n_left = Signal(SIZE_BITS + 1)
        k_left = Signal(SIZE_BITS + 1)
        step = Signal(SIZE_BITS)
        pos = Signal(SIZE_BITS + 8)      # window start inside the row (activation positions)
        value_pos = Signal(addr)
        index_pos = Signal(addr)
        act_row = Signal(addr)
        scale_row = Signal(addr)
        group_j = Signal(addr)           # j * C * row bytes, per section
        values_j = Signal(addr)
        indices_j = Signal(addr)
        requant_j = Signal(addr)
        out_addr = Signal(addr)

        m.d.comb += self.i_instr.ready.eq(~stepping & (drain == 0))
        runnable = Signal()
        m.d.comb += runnable.eq((gemm.opcode == isa.lookup("MXU.GEMM").opcode)
                                & (gemm.nm < len(self.patterns))
                                & sum(gemm.bits == b for b in self.fpga.weight_bits).bool())
        accept = self.i_instr.valid & self.i_instr.ready & runnable
        with m.If(self.i_instr.valid & self.i_instr.ready & ~runnable):
            m.d.sync += self.error.eq(1)
        with m.If(accept):
            m.d.sync += [
                cfg.k.eq(gemm.k), cfg.n.eq(gemm.n), cfg.kept.eq(kept),
                cfg.steps.eq((kept + length - 1) >> lshift), cfg.window.eq(window),
                cfg.index_step.eq(index_step), cfg.value_step.eq(Mux(bits4, length // 2, length)),
                cfg.nm.eq(gemm.nm), cfg.bits4.eq(bits4), cfg.group_log2.eq(gemm.group_log2),
                cfg.o_addr.eq(gemm.o_addr), cfg.s_addr.eq(gemm.s_addr),
                cfg.values.eq(gemm.w_addr), cfg.indices.eq(indices_at),
                cfg.groups.eq(groups_at), cfg.requant.eq(requant_at),
                cfg.stride_values.eq(times(row_values, chains)),
                cfg.stride_indices.eq(times(row_indices, chains)),
                cfg.stride_groups.eq(times(row_groups, chains)),
                stepping.eq(1), rows_left.eq(gemm.m), n_left.eq(gemm.n), k_left.eq(kept),
                step.eq(0), pos.eq(0), value_pos.eq(0), index_pos.eq(0),
                act_row.eq(gemm.a_addr), scale_row.eq(gemm.s_addr), values_j.eq(0),
                indices_j.eq(0), group_j.eq(0), requant_j.eq(0), out_addr.eq(gemm.o_addr)]
            for c in range(chains):
                m.d.sync += [chain_off[c][0].eq(times(row_values, c)),
                             chain_off[c][1].eq(times(row_indices, c)),
                             chain_off[c][2].eq(times(row_groups, c))]

        # -- one step per cycle: addresses ----------------------------------------------------
        group_pos = Mux(cfg.group_log2 == 0, 0, pos >> cfg.group_log2)
        m.d.comb += [self.rd_act.addr.eq(act_row + pos), self.rd_scale.addr.eq(scale_row),
                     self.rd_requant.addr.eq(cfg.requant + requant_j)]
        for c in range(chains):
            m.d.comb += [
                getattr(self, f"rd_values{c}").addr.eq(
                    cfg.values + values_j + chain_off[c][0] + value_pos),
                getattr(self, f"rd_groups{c}").addr.eq(
                    cfg.groups + group_j + chain_off[c][2] + group_pos)]
            if self._index_bits():
                m.d.comb += getattr(self, f"rd_indices{c}").addr.eq(
                    cfg.indices + indices_j + chain_off[c][1] + index_pos)

        # -- step control, one cycle behind to meet the read data -----------------------------
        act = array.i_act.payload
        ctl = Signal(data.StructLayout({"valid": 1, "first": 1, "last": 1,
                                        "lanes": range(length + 1), "goff": 15,
                                        "count": range(chains + 1)}))
        last_step = step == cfg.steps - 1
        m.d.sync += [ctl.valid.eq(stepping), ctl.first.eq(step == 0), ctl.last.eq(last_step),
                     ctl.lanes.eq(Mux(k_left > length, length, k_left)),
                     ctl.goff.eq(pos & ((Const(1, 16) << cfg.group_log2) - 1)),
                     ctl.count.eq(Mux(n_left > chains, chains, n_left))]
        m.d.comb += [array.i_act.valid.eq(ctl.valid), array.i_weights.valid.eq(ctl.valid),
                     act.window.as_value().eq(self.rd_act.data),
                     act.nm.eq(cfg.nm), act.bits4.eq(cfg.bits4),
                     act.group_log2.eq(cfg.group_log2), act.goff.eq(ctl.goff),
                     act.lanes.eq(ctl.lanes), act.first.eq(ctl.first), act.last.eq(ctl.last),
                     act.mant.eq(self.rd_scale.data[:16]), act.exp.eq(self.rd_scale.data[16:24]),
                     array.i_weights.payload.count.eq(ctl.count)]
        for c in range(chains):
            share = array.i_weights.payload.chain[c]
            requant = self.rd_requant.data[64 * c:64 * (c + 1)]
            m.d.comb += [share.values.eq(getattr(self, f"rd_values{c}").data),
                         share.groups.as_value().eq(getattr(self, f"rd_groups{c}").data),
                         share.mult.eq(requant[:share.mult.shape().width]),
                         share.shift.eq(requant[32:40])]
            if self._index_bits():
                m.d.comb += share.indices.eq(getattr(self, f"rd_indices{c}").data)

        # -- loop counters --------------------------------------------------------------------
        with m.If(stepping):
            with m.If(~last_step):
                m.d.sync += [step.eq(step + 1), pos.eq(pos + cfg.window),
                             value_pos.eq(value_pos + cfg.value_step),
                             index_pos.eq(index_pos + cfg.index_step), k_left.eq(k_left - length)]
            with m.Else():
                m.d.sync += [step.eq(0), pos.eq(0), value_pos.eq(0), index_pos.eq(0),
                             k_left.eq(cfg.kept)]
                with m.If(n_left > chains):
                    m.d.sync += [n_left.eq(n_left - chains),
                                 values_j.eq(values_j + cfg.stride_values),
                                 indices_j.eq(indices_j + cfg.stride_indices),
                                 group_j.eq(group_j + cfg.stride_groups),
                                 requant_j.eq(requant_j + chains * layout.REQUANT_BYTES)]
                with m.Else():
                    m.d.sync += [n_left.eq(cfg.n), values_j.eq(0), indices_j.eq(0),
                                 group_j.eq(0), requant_j.eq(0), rows_left.eq(rows_left - 1),
                                 act_row.eq(act_row + cfg.k),
                                 scale_row.eq(scale_row + layout.SCALE_CODE_BYTES)]
                    with m.If(rows_left == 1):
                        m.d.sync += [stepping.eq(0), drain.eq(length + REQUANT_STAGES - 1)]
        with m.Elif(drain != 0):
            m.d.sync += drain.eq(drain - 1)

        # -- write back -----------------------------------------------------------------------
        result = array.o_result
        m.d.comb += [result.ready.eq(1), self.wr.en.eq(result.valid), self.wr.addr.eq(out_addr),
                     self.wr.data.eq(result.payload.y.as_value())]
        for c in range(chains):
            for b in range(FX_BYTES):
                m.d.comb += self.wr.mask[c * FX_BYTES + b].eq(c < result.payload.count)
        with m.If(result.valid):
            m.d.sync += out_addr.eq(out_addr + result.payload.count * FX_BYTES)
        return m


@register_top("mxu", engines=("fpga",))
def mxu_top(cfg, program=(), **kwargs) -> SramTop:
    """The MXU stream of `cfg` on its own: front end, `MxuEngine`, SRAM (see `SramTop`)."""
    if cfg.fpga is None:
        raise ValueError(f"config {cfg.name!r} has no fpga section; the MXU top needs one")
    return SramTop(cfg, MxuEngine(cfg.fpga), isa.Engine.MXU, program, **kwargs)
