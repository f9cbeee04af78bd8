"""The DMA engine: DMA.COPY between the memory spaces of the system top, cycle for cycle as
`trimem.emulator.fpga.DmaEngine` (docs/timing.md, "DMA").

Timing. In the cycle t a copy issues, the engine works out each side's latency and the bytes
it puts on every shared resource (the HBM channels its range touches, the PCIe or P2P link,
the bus of each PIM channel touched), merges the two sides as the emulator's `_merge_sides`
does (a resource on both sides carries both streams in turn) and asks `Reservations` to hold
the loaded resources for `stream` cycles from t + latencies. Granted at `start`, it is idle
again in cycle start + stream, the emulator's end; the next word issues there.

Data. The bytes move `width` per cycle, apart from the holds: chunk i is read in cycle t + i
and written in the next cycle, highest chunk first when the destination lies above the source
(so overlapping ranges copy as the emulator's read-then-write does). A chunk written in the
end cycle lands at its clock edge, before any engine waiting on this stream can read it (a
PUSH issues in the end cycle at the earliest). A copy issued in the cycle the previous one
writes its last chunk into the space it reads waits one cycle before reading. So a copy of
c = ceil(nbytes / width) chunks needs c (+1 after such a write) <= latencies + stream cycles;
one that needs more raises `error` at issue instead of ending late.

Rates. Cycles per byte are constant fractions num / den of the config
(`timing.cycles_per_byte`); ceil(bytes * num / den) is a multiply by a constant reciprocal and
a shift, proven exact for every byte count of the `nbytes` field when the engine is built
(`Reciprocal`).

`DmaTop` runs the DMA stream on its own: front end, engine, `Reservations` and a small
`ByteRam` per space, with a host port to load and read them (the cocotb testbench's top).
"""
from __future__ import annotations


from amaranth.hdl import Cat, Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from trimem import isa, timing
from trimem.hdl.frontend import (CYCLE_BITS, HOST_BYTES, Frontend, connect_stream,
                                 engine_layout, read_signature, register_top, stream_members,
                                 write_signature)
from trimem.hdl.reserve import (Reciprocal, Reservations, client_signature, hbm_range_bytes,
                                physical, request_layout, resource_names)
from trimem.hdl.system import ByteRam, join

DMA_BYTES = 64
"""Bytes a copy moves per cycle: a HOST or CDRAM copy of trimem-small (latency 100 cycles, then
315 or 630 B per cycle) fits up to about 7 KB, an HBM copy of two 16 B/cycle channels any size."""
NBYTES_BITS = next(f.width for f in isa.lookup("DMA.COPY").fields if f.name == "nbytes")
"""Width of a copy's byte count."""
HOST, HBM, SRAM = isa.Space.HOST, isa.Space.HBM, isa.Space.SRAM
GBUF, PRES, CDRAM = isa.Space.GBUF, isa.Space.PRES, isa.Space.CDRAM
RAM_BYTES = 4096
"""Bytes a `DmaTop` models of each space by default: small memories keep Verilator builds
quick, and a 4 KiB copy still runs many chunks."""


def check_dma(cfg, width) -> None:
    """ValueError naming the problem for configs and widths the DMA RTL cannot build."""
    if cfg.fpga is None:
        raise ValueError(f"config {cfg.name!r} has no fpga section; the DMA engine needs one")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1 or width & (width - 1):
        raise ValueError(f"width must be a power-of-two number of bytes, got {width!r}")
    fpga = cfg.fpga
    for name in ("hbm_channels", "hbm_interleave_bytes"):
        value = getattr(fpga, name)
        if value & (value - 1):
            raise ValueError(f"fpga.{name} = {value!r} is not a power of two; the DMA RTL "
                             f"splits HBM ranges by address bits, so use a power of two")


def reached_spaces(cfg) -> tuple:
    """The spaces the engine of `cfg` copies between: GBUF and PRES with a pim section, CDRAM
    with a csd one."""
    return ((HOST, HBM, SRAM) + ((GBUF, PRES) if cfg.pim is not None else ())
            + ((CDRAM,) if cfg.csd is not None else ()))


class DmaEngine(wiring.Component):
    """DMA.COPY between HOST, HBM, SRAM, GBUF, PRES and CDRAM (module docstring: schedule).

    FLASH and PIMDRAM are out of reach: only CSD instructions read or program flash, and the
    PIM banks hold their DRAM inside the PIM top, filled from the bundle's images, with no
    port outside it.

    Parameters
    ----------
    cfg : trimem.config.HardwareConfig
        Needs an fpga section; GBUF and PRES come with a pim section, CDRAM with a csd one.
    width : int
        Bytes per read and write port (a power of two).
    sizes : dict of space name -> int, optional
        Bytes modelled behind a space's ports where fewer than the config's (HOST: bounded
        only here); a copy beyond them raises `error` rather than wrap around the model.

    Members
    -------
    i_instr : In(stream.Signature(engine_layout(DMA)))
        Ready exactly when idle: the front end's `o_instr`.
    now : In(CYCLE_BITS)
        The cycle count of `Reservations`.
    res : Out(client_signature(len(resource_names(cfg))))
        Holds of the loaded resources, one per copy.
    rd_<space>, wr_<space> : Out(read_signature(...)), Out(write_signature(...))
        `width` bytes at any byte address of each space in `spaces`.
    error : Out(1)
        Set for good by a word the engine cannot run: another DMA opcode, a space it does not
        reach, HOST -> HOST, nbytes = 0, a copy loading no resource (SRAM -> SRAM), a range
        beyond its space, or a copy whose bytes cannot all move by its end.
    """

    def __init__(self, cfg, *, width: int = DMA_BYTES, sizes=None):
        check_dma(cfg, width)
        self.cfg, self.width = cfg, width
        self.spaces = reached_spaces(cfg)
        self.sizes = {s.name: cfg.space_bytes(s) for s in self.spaces}
        self.sizes.update({k: v for k, v in (sizes or {}).items() if k in self.sizes})
        self.resources = resource_names(cfg)
        fpga, links, mhz = cfg.fpga, cfg.links, cfg.fpga.clock_mhz
        rates = {f"hbm{c}": timing.cycles_per_byte(fpga.hbm_gbps_per_channel, mhz)
                 for c in range(fpga.hbm_channels)}
        rates["pcie"] = timing.cycles_per_byte(links.pcie_gbps, mhz)
        rates["p2p"] = timing.cycles_per_byte(links.p2p_gbps, mhz)
        if cfg.pim is not None:
            rates.update({f"pim{c}": timing.cycles_per_byte(cfg.pim.channel_gbps, mhz)
                          for c in range(cfg.pim.channels)})
        self.rates = {name: Reciprocal(rate, NBYTES_BITS) for name, rate in rates.items()}
        self.latency = {HBM: fpga.hbm_latency_cycles,
                        HOST: timing.latency_cycles(links.pcie_latency_us, mhz),
                        CDRAM: timing.latency_cycles(links.p2p_latency_us, mhz)}
        members = {"i_instr": In(stream.Signature(engine_layout(isa.Engine.DMA))),
                   "now": In(CYCLE_BITS),
                   "res": Out(client_signature(len(self.resources)))}
        for space in self.spaces:
            bits, name = isa.ADDR_BITS[space], space.name.lower()
            members[f"rd_{name}"] = Out(read_signature(bits, width))
            members[f"wr_{name}"] = Out(write_signature(bits, width))
        members["error"] = Out(1)
        super().__init__(members)

    # -- one side of a copy ----------------------------------------------------------------

    def _pim_bytes(self, space, addr, nbytes) -> list:
        """Bytes of the range on each PIM channel's bus: channel c owns the c-th span."""
        pim = self.cfg.pim
        span = pim.gbuf_bytes if space == GBUF else pim.result_bytes
        end, out = addr + nbytes, []
        for c in range(pim.channels):
            lo, hi = c * span, (c + 1) * span
            out.append(Mux((end > lo) & (addr < hi),
                           Mux(end < hi, end, hi) - Mux(addr > lo, addr, lo), 0))
        return out

    def _side(self, m, name, space, addr, nbytes, other):
        """(latency, {resource: bytes}) of one side, as the emulator's `DmaEngine._side`."""
        latency = Signal(range(max(self.latency.values()) + 1), name=f"{name}_latency")
        loads = {r: Signal(NBYTES_BITS, name=f"{name}_{r}") for r in self.rates}
        with m.Switch(space):
            with m.Case(HBM):
                m.d.comb += latency.eq(self.latency[HBM])
                for c, nb in enumerate(hbm_range_bytes(self.cfg.fpga, addr, nbytes)):
                    m.d.comb += loads[f"hbm{c}"].eq(nb)
            with m.Case(HOST):
                m.d.comb += [latency.eq(self.latency[HOST]), loads["pcie"].eq(nbytes)]
            if CDRAM in self.spaces:
                with m.Case(CDRAM):
                    with m.If(other != HOST):   # to or from HOST, PCIe carries it
                        m.d.comb += [latency.eq(self.latency[CDRAM]), loads["p2p"].eq(nbytes)]
            for pim_space in (GBUF, PRES):
                if pim_space in self.spaces:
                    with m.Case(pim_space):
                        for c, nb in enumerate(self._pim_bytes(pim_space, addr, nbytes)):
                            m.d.comb += loads[f"pim{c}"].eq(nb)
        return latency, loads

    def _fits(self, space, addr, nbytes):
        """The range lies inside `space` (a HOST without a size always)."""
        cases = [(space == s) & (addr + nbytes <= self.sizes[s.name]) for s in self.spaces
                 if self.sizes[s.name] is not None]
        return Cat(*cases, *(space == s for s in self.spaces
                             if self.sizes[s.name] is None)).any()

    def elaborate(self, platform):
        m = Module()
        width, shift = self.width, self.width.bit_length() - 1
        copy = self.i_instr.payload.copy
        src, dst, nbytes = copy.src_space, copy.dst_space, copy.nbytes

        # -- issue: both sides, merged into one hold (emulator `_merge_sides`) ---------------
        src_latency, src_loads = self._side(m, "src", src, copy.src_addr, nbytes, dst)
        dst_latency, dst_loads = self._side(m, "dst", dst, copy.dst_addr, nbytes, src)
        mask = Signal(len(self.resources))
        stream_cycles = Signal(CYCLE_BITS)
        longest = 0
        for i, p in enumerate(self.resources):
            carried = [r for r in self.rates if physical(self.cfg, r) == p]
            busy = Signal(CYCLE_BITS, name=f"cycles_{p}")
            m.d.comb += [busy.eq(sum(self.rates[r](side[r]) for r in carried
                                     for side in (src_loads, dst_loads))),
                         mask[i].eq(Cat(side[r] != 0 for r in carried
                                        for side in (src_loads, dst_loads)).any())]
            longest = Mux(busy > longest, busy, longest)
        latency = src_latency + dst_latency
        m.d.comb += stream_cycles.eq(longest)

        # -- checks: words the engine cannot run raise `error` -------------------------------
        writing = Signal()               # the write stage holds a chunk this cycle
        writing_to = Signal(isa.Space)
        stall = Signal()
        m.d.comb += stall.eq(writing & (writing_to == src))
        chunks = (nbytes + width - 1) >> shift
        reached = [Cat(*(side == s for s in self.spaces)).any() for side in (src, dst)]
        runnable = Signal()
        m.d.comb += runnable.eq(
            (copy.opcode == isa.lookup("DMA.COPY").opcode) & reached[0] & reached[1]
            & ~((src == HOST) & (dst == HOST)) & (nbytes != 0) & mask.any()
            & self._fits(src, copy.src_addr, nbytes) & self._fits(dst, copy.dst_addr, nbytes)
            & (chunks + stall <= latency + stream_cycles))
        taken = self.i_instr.valid & self.i_instr.ready
        issue = taken & runnable
        with m.If(taken & ~runnable):
            m.d.sync += self.error.eq(1)

        # -- the hold: asked in the issue cycle, kept asking until granted ---------------------
        req = self.res.request
        waiting = Signal()
        held = Signal(request_layout(len(self.resources)))
        end = Signal(CYCLE_BITS)
        asked = Signal.like(held)
        m.d.comb += [asked.mask.eq(mask), asked.issued.eq(self.now),
                     asked.earliest.eq(self.now + latency), asked.cycles.eq(stream_cycles)]
        m.d.comb += [req.valid.eq(issue | waiting), req.payload.eq(Mux(waiting, held, asked)),
                     self.i_instr.ready.eq(~waiting & (self.now >= end))]
        with m.If(issue):
            m.d.sync += [held.eq(asked), waiting.eq(~req.ready)]
        with m.If(req.valid & req.ready):
            m.d.sync += [end.eq(self.res.start + req.payload.cycles), waiting.eq(0)]

        # -- data, read stage: one chunk per cycle, from the word in its issue cycle -----------
        state = data.StructLayout({"src": isa.Space, "dst": isa.Space,
                                   "src_addr": isa.DMA_ADDR_BITS, "dst_addr": isa.DMA_ADDR_BITS,
                                   "nbytes": NBYTES_BITS, "offset": NBYTES_BITS + 1,
                                   "left": NBYTES_BITS, "down": 1})
        regs, cur = Signal(state), Signal(state)
        down = copy.dst_addr > copy.src_addr
        fresh = Signal(state)
        m.d.comb += [fresh.src.eq(src), fresh.dst.eq(dst), fresh.src_addr.eq(copy.src_addr),
                     fresh.dst_addr.eq(copy.dst_addr), fresh.nbytes.eq(nbytes),
                     fresh.offset.eq(Mux(down, (chunks - 1) << shift, 0)),
                     fresh.left.eq(chunks), fresh.down.eq(down)]
        m.d.comb += cur.eq(Mux(issue, fresh, regs))
        reading = Signal()
        m.d.comb += reading.eq((cur.left != 0) & ~(issue & stall))
        m.d.sync += regs.eq(cur)
        with m.If(reading):
            m.d.sync += [regs.left.eq(cur.left - 1),
                         regs.offset.eq(Mux(cur.down, cur.offset - width, cur.offset + width))]
        for space in self.spaces:
            m.d.comb += getattr(self, f"rd_{space.name.lower()}").addr.eq(cur.src_addr
                                                                         + cur.offset)

        # -- data, write stage: the chunk read in the cycle before ----------------------------
        wr_src = Signal(isa.Space)
        wr_addr = Signal(isa.DMA_ADDR_BITS)
        wr_mask = Signal(width)
        m.d.sync += [writing.eq(reading), writing_to.eq(cur.dst), wr_src.eq(cur.src),
                     wr_addr.eq(cur.dst_addr + cur.offset),
                     wr_mask.eq(Cat(cur.offset + i < cur.nbytes for i in range(width)))]
        chunk = Signal(8 * width)
        with m.Switch(wr_src):
            for space in self.spaces:
                with m.Case(space):
                    m.d.comb += chunk.eq(getattr(self, f"rd_{space.name.lower()}").data)
        for space in self.spaces:
            port = getattr(self, f"wr_{space.name.lower()}")
            m.d.comb += [port.addr.eq(wr_addr), port.data.eq(chunk), port.mask.eq(wr_mask),
                         port.en.eq(writing & (writing_to == space))]
        return m


def ram_sizes(cfg, ram_bytes: int = RAM_BYTES) -> dict[str, int]:
    """Bytes a `DmaTop` models of each space its engine reaches (space name -> bytes): the
    first `ram_bytes`, or all of a smaller space."""
    if isinstance(ram_bytes, bool) or not isinstance(ram_bytes, int) or ram_bytes < 1:
        raise ValueError(f"ram_bytes must be a positive int, got {ram_bytes!r}")
    return {s.name: min(ram_bytes, cfg.space_bytes(s) or ram_bytes)
            for s in reached_spaces(cfg)}


class DmaTop(wiring.Component):
    """The DMA stream on its own: front end, `DmaEngine`, `Reservations` and a `ByteRam` per
    space the engine reaches, holding that space's first bytes (`ram_sizes`).

    Parameters
    ----------
    cfg : trimem.config.HardwareConfig
    program : as `Frontend` takes it
    depth : int, optional
        Instruction memory depth (`Frontend`).
    ram_bytes : int
        Bytes modelled of each space; the engine refuses copies beyond them.

    Members
    -------
    run, o_push, o_pop, i_load, cycles
        The front end's (see `Frontend`).
    halted : Out(1)
        The stream ended, or stopped on an error.
    error : Out(1)
        The front end's error, or a word the engine cannot run.
    host_space : In(isa.Space)
        The memory the host ports reach.
    host_rd : In(read_signature(DMA_ADDR_BITS, HOST_BYTES))
        Reads `host_space`; the data comes in the next cycle, from the space selected in the
        address's cycle.
    host_wr : In(write_signature(DMA_ADDR_BITS, HOST_BYTES))
        Writes `host_space` in cycles the engine does not write it.
    """

    def __init__(self, cfg, *, program=(), depth: int | None = None,
                 ram_bytes: int = RAM_BYTES):
        self.sizes = ram_sizes(cfg, ram_bytes)
        self.frontend = Frontend(isa.Engine.DMA, program, depth=depth)
        self.dma = DmaEngine(cfg, sizes=self.sizes)
        self.reservations = Reservations(resource_names(cfg), ("dma",))
        self.rams = {name: ByteRam(size, reads=(DMA_BYTES, HOST_BYTES), writes=(DMA_BYTES,),
                                   addr_bits=isa.ADDR_BITS[isa.Space[name]])
                     for name, size in self.sizes.items()}
        super().__init__({
            **stream_members(self.frontend),
            "host_space": In(isa.Space),
            "host_rd": In(read_signature(isa.DMA_ADDR_BITS, HOST_BYTES)),
            "host_wr": In(write_signature(isa.DMA_ADDR_BITS, HOST_BYTES))})

    def elaborate(self, platform):
        m = Module()
        fe, dma, res = self.frontend, self.dma, self.reservations
        m.submodules.frontend = fe
        m.submodules.dma = dma
        m.submodules.reservations = res

        # -- stream, holds, status ------------------------------------------------------------
        connect_stream(m, self, fe, dma)
        wiring.connect(m, dma.res, res.dma)
        m.d.comb += dma.now.eq(res.now)

        # -- memories: the engine's ports, the host's where the engine does not write ---------
        read_space = Signal(isa.Space)
        m.d.sync += read_space.eq(self.host_space)
        host_wr = self.host_wr
        for name, ram in self.rams.items():
            space, port = isa.Space[name], name.lower()
            m.submodules[port] = ram
            join(m, getattr(dma, f"rd_{port}"), ram.read0)
            m.d.comb += ram.read1.addr.eq(self.host_rd.addr)
            with m.If(read_space == space):
                m.d.comb += self.host_rd.data.eq(ram.read1.data)
            engine_wr = getattr(dma, f"wr_{port}")
            with m.If(engine_wr.en):
                join(m, engine_wr, ram.write0)
            with m.Else():
                m.d.comb += [ram.write0.addr.eq(host_wr.addr), ram.write0.data.eq(host_wr.data),
                             ram.write0.mask.eq(host_wr.mask),
                             ram.write0.en.eq(host_wr.en & (self.host_space == space))]
        return m


@register_top("dma", ("fpga",))
def dma_top(cfg, **kwargs) -> DmaTop:
    """The DMA stream of `cfg` on its own (keyword arguments as `DmaTop` takes them)."""
    return DmaTop(cfg, **kwargs)
