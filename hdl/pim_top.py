"""The PIM engine top: a front end running `pim.bin` and one `PimChannel` per PIM channel.

The front end (`trimem.hdl.frontend.Frontend`) fetches the PIM stream and runs the CTRL
instructions; every PIM.GEMV goes to all channels at once, in the cycle every channel is idle,
and the next instruction issues when the last selected channel is quiet again, which is the
emulator's end cycle (the latest channel end). The channels are held until the cycle after
`run` first rises, the streams' cycle 0, so their refresh intervals count from there as the
emulator's do. The channels' global-buffer and result-buffer ports are the top's ports, for
the memory models of `trimem.hdl.system`.
"""
from __future__ import annotations

from amaranth.hdl import Cat, EnableInserter, Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from trimem import isa
from trimem.config import HardwareConfig, PimConfig
from trimem.hdl.frontend import (CYCLE_BITS, Frontend, read_signature, register_top,
                                 token_signature)
from trimem.hdl.pim import ADDR_BITS, PimChannel, check_pim, result_signature
from trimem.layout import SCALE_CODE_BYTES

GEMV = isa.lookup("PIM.GEMV")


def bank_images(pim: PimConfig, image: bytes = b"") -> list[list[list[int]]]:
    """Per channel, per bank, the bursts of a PIMDRAM image (docs/contract.md: bank-major
    inside a channel, `bank_bytes` per bank), as `PimBank` takes them."""
    if len(image) > pim.capacity_bytes:
        raise ValueError(f"the PIMDRAM image has {len(image)} bytes but the PIM holds "
                         f"{pim.capacity_bytes}; give the image compiled for this config")
    image = bytes(image)
    out = []
    for c in range(pim.channels):
        banks = []
        for b in range(pim.banks_per_channel):
            base = (c * pim.banks_per_channel + b) * pim.bank_bytes
            chunk = image[base:base + pim.bank_bytes]
            banks.append([int.from_bytes(chunk[i:i + pim.burst_bytes], "little")
                          for i in range(0, len(chunk), pim.burst_bytes)])
        out.append(banks)
    return out


class PimTop(wiring.Component):
    """The PIM engine: instruction front end and channel controllers with their banks.

    Parameters
    ----------
    pim : PimConfig
    program : program words or a path, optional
        The PIM stream (`Frontend` takes the same forms).
    image : bytes, optional
        Initial PIMDRAM contents (the bundle's PIMDRAM image from address 0).
    depth : int, optional
        Instruction memory depth in words.
    max_rows, max_groups : int, optional
        Per-bank accumulators and partial sums (`PimChannel`).

    Members
    -------
    frontend : Frontend
    channels : list of PimChannel
    run : In(1)
    gbuf<c>, scale<c> : Out(read_signature(...))
        Channel c's reads of its global buffer (addresses inside the channel's buffer).
    pres<c> : Out(result_signature(pim))
        Channel c's result writes (PRES addresses).
    o_push, o_pop : Out(token_signature())
        The front end's token handshakes, for `SyncTokens`.
    halted, error : Out(1)
        The stream ended; something went wrong (front end, a channel, or a PIM.GEMV whose
        ch_mask names a channel this PIM lacks).
    cycles : Out(CYCLE_BITS)
        The stream's length in cycles, as the emulator counts it.
    """

    def __init__(self, pim: PimConfig, *, program=(), image: bytes = b"",
                 depth: int | None = None, max_rows: int | None = None,
                 max_groups: int | None = None):
        check_pim(pim)
        self.pim = pim
        self.frontend = Frontend(isa.Engine.PIM, program, depth=depth)
        images = bank_images(pim, image)
        self.channels = [PimChannel(pim, channel=c, max_rows=max_rows, max_groups=max_groups,
                                    init=images[c]) for c in range(pim.channels)]
        ports = {"run": In(1)}
        for c in range(pim.channels):
            ports[f"gbuf{c}"] = Out(read_signature(ADDR_BITS, pim.mac_lanes))
            ports[f"scale{c}"] = Out(read_signature(ADDR_BITS, SCALE_CODE_BYTES))
            ports[f"pres{c}"] = Out(result_signature(pim))
        ports.update({"o_push": Out(token_signature()), "o_pop": Out(token_signature()),
                      "halted": Out(1), "error": Out(1), "cycles": Out(CYCLE_BITS)})
        super().__init__(ports)

    def elaborate(self, platform):
        m = Module()
        pim = self.pim
        m.submodules.frontend = fe = self.frontend
        started = Signal()
        m.d.sync += started.eq(started | self.run)
        for c, channel in enumerate(self.channels):
            m.submodules[f"channel{c}"] = EnableInserter(started)(channel)

        # -- front end: run, tokens, status ----------------------------------------------------
        wiring.connect(m, wiring.flipped(self.o_push), fe.o_push)
        wiring.connect(m, wiring.flipped(self.o_pop), fe.o_pop)
        m.d.comb += [fe.run.eq(self.run), self.halted.eq(fe.halted),
                     self.cycles.eq(fe.cycles)]

        # -- one PIM.GEMV to every channel, when all are idle --------------------------------
        instr = fe.o_instr
        idle = Signal()
        m.d.comb += idle.eq(Cat(ch.i_instr.ready for ch in self.channels).all())
        m.d.comb += instr.ready.eq(idle)
        gemv = instr.payload.gemv
        for channel in self.channels:
            m.d.comb += [channel.i_instr.payload.eq(gemv),
                         channel.i_instr.valid.eq(instr.valid & idle)]

        # -- memory ports ------------------------------------------------------------------------
        for c, channel in enumerate(self.channels):
            wiring.connect(m, wiring.flipped(getattr(self, f"gbuf{c}")), channel.gbuf)
            wiring.connect(m, wiring.flipped(getattr(self, f"scale{c}")), channel.scale)
            wiring.connect(m, wiring.flipped(getattr(self, f"pres{c}")), channel.o_result)

        # -- errors ------------------------------------------------------------------------------
        bad = Signal()
        taken = instr.valid & idle
        wrong = (gemv.opcode != GEMV.opcode) | ((gemv.ch_mask >> pim.channels) != 0)
        with m.If(taken & wrong):
            m.d.sync += bad.eq(1)
        m.d.comb += self.error.eq(fe.error | bad | Cat(ch.error for ch in self.channels).any())
        return m


@register_top("pim", ("pim",))
def pim_top(cfg: HardwareConfig, **kwargs) -> PimTop:
    """The PIM engine of `cfg` (keyword arguments as `PimTop` takes them)."""
    if not isinstance(cfg, HardwareConfig) or cfg.pim is None:
        raise ValueError(f"the pim top needs a config with a pim section, got {cfg!r}")
    return PimTop(cfg.pim, **kwargs)
