"""Memory models for the ports of the engine tops, and the `trimem-small` system top.

`ByteRam` is the memory model of HOST, HBM, GBUF, PRES, CDRAM, the shared SRAM and flash: a byte-addressed
RAM of byte-wide lanes, so every port reads or writes a run of consecutive bytes at any byte
address in one cycle (reads answer in the next cycle, or the same one for a `comb` buffer;
writes land at the clock edge). `FlashPages` serves flash a page at a time after a latency.
`TrimemSystem` wires the DMA, MXU, VPU, PIM and CSD streams to them. Contents come from a bundle's
`$readmemh` files (`read_hex`: `images/<name>.hex`, `width_bytes` per line, little-endian;
`programs/<entry>/<engine>.hex`), read when the design is built, so they are the memories'
initial values in the simulator and in the emitted Verilog alike.
"""
from __future__ import annotations

from pathlib import Path

from amaranth.hdl import Array, Cat, Module, Signal, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from amaranth.utils import ceil_log2, exact_log2

from trimem.dram import FlashTiming
from trimem import isa
from trimem.hdl.frontend import (CYCLE_BITS, Frontend, SyncTokens, read_signature,
                                 register_top, write_signature)

MAX_RAM_BYTES = 1 << 22
"""Largest memory model a build holds (4 MiB): a simulator steps through nothing bigger."""


def read_hex(path, width_bytes: int, size: int) -> bytes:
    """The bytes of a bundle's `$readmemh` image: `width_bytes` per line, most significant
    byte first in the line (`trimem.bundle.readmemh`), padded with zeros to `size`."""
    out = bytearray()
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        text = line.split("//", 1)[0].strip()
        if not text:
            continue
        if len(text) != 2 * width_bytes:
            raise ValueError(f"{path}:{lineno}: {text!r} is not {width_bytes} bytes of hex; "
                             f"give the width_bytes the bundle manifest lists for this image")
        out += bytes.fromhex(text)[::-1]
    if len(out) > size:
        raise ValueError(f"{path} holds {len(out)} bytes but the memory has {size}; give the "
                         f"image of this memory or a larger memory")
    return bytes(out) + bytes(size - len(out))


class ByteRam(wiring.Component):
    """A byte-addressed RAM with unaligned multi-byte read and write ports.

    Parameters
    ----------
    size : int
        Bytes.
    reads : tuple of int
        Width in bytes of each read port.
    writes : tuple of int
        Width in bytes of each write port; a later port wins a clash.
    init : bytes, optional
        Initial contents (zeros after them).
    comb : bool
        Reads answer in the same cycle instead of the next (a register file, for buffers
        inside an engine).
    addr_bits : int
        Width of the address ports (the ISA's address width of the space); the memory uses
        the low bits, so an address past `size` wraps.

    Members
    -------
    read<i> : In(read_signature(addr_bits, reads[i]))
    write<i> : In(write_signature(addr_bits, writes[i]))
    """

    def __init__(self, size: int, *, reads=(), writes=(), init: bytes = b"",
                 comb: bool = False, addr_bits: int = 32):
        if not isinstance(size, int) or not 1 <= size <= MAX_RAM_BYTES:
            raise ValueError(f"size must be an int in [1, {MAX_RAM_BYTES}] bytes, got {size!r}; "
                             f"larger memories are beyond RTL simulation, use a small preset")
        widths = list(reads) + list(writes)
        for w in widths:
            if not isinstance(w, int) or w < 1:
                raise ValueError(f"port widths must be positive ints, got {w!r}")
        if len(init) > size:
            raise ValueError(f"init has {len(init)} bytes, more than the {size}-byte memory")
        self.size = size
        self.lanes = 1 << ceil_log2(max(widths, default=1))
        self.depth = -(-size // self.lanes)
        if not isinstance(addr_bits, int) or 2**addr_bits < self.depth * self.lanes:
            raise ValueError(f"addr_bits {addr_bits!r} cannot address {size} bytes")
        self.addr_bits = addr_bits
        self.reads, self.writes = tuple(reads), tuple(writes)
        self.init = bytes(init)
        self.comb = bool(comb)
        ports = {f"read{i}": In(read_signature(self.addr_bits, w))
                 for i, w in enumerate(self.reads)}
        ports.update({f"write{i}": In(write_signature(self.addr_bits, w))
                      for i, w in enumerate(self.writes)})
        super().__init__(ports)

    def contents(self, lane: int) -> list[int]:
        """Initial bytes of lane `lane`."""
        return [self.init[row * self.lanes + lane] if row * self.lanes + lane < len(self.init)
                else 0 for row in range(self.depth)]

    def elaborate(self, platform):
        m = Module()
        lanes = self.lanes
        low = exact_log2(lanes)
        mems = []
        for j in range(lanes):
            mems.append(Memory(shape=8, depth=self.depth, init=self.contents(j)))
            m.submodules[f"lane{j}"] = mems[j]

        # -- writes: byte i of the port goes to lane (addr + i) % lanes ----------------------
        for p, width in enumerate(self.writes):
            port = getattr(self, f"write{p}")
            addr = port.addr
            for j, mem in enumerate(mems):
                wp = mem.write_port()
                index = (j - addr[:low]) & (lanes - 1) if low else 0
                byte = Signal(range(lanes), name=f"write{p}_index{j}") if low else 0
                if low:
                    m.d.comb += byte.eq(index)
                mask = Array(port.mask[i] if i < width else 0 for i in range(lanes))[byte]
                data_byte = Array(port.data.word_select(i, 8) if i < width else 0
                                  for i in range(lanes))[byte]
                m.d.comb += [wp.addr.eq((addr + byte) >> low), wp.data.eq(data_byte),
                             wp.en.eq(port.en & mask & (byte < width))]

        # -- reads: lane j holds byte (j - addr) % lanes of the run --------------------------
        for p, width in enumerate(self.reads):
            port = getattr(self, f"read{p}")
            addr = port.addr
            got = []
            for j, mem in enumerate(mems):
                rp = mem.read_port(domain="comb" if self.comb else "sync")
                index = (j - addr[:low]) & (lanes - 1) if low else 0
                m.d.comb += rp.addr.eq((addr + index) >> low)
                got.append(rp.data)
            shift = Signal(range(lanes), name=f"read{p}_shift")
            if low:
                domain = m.d.comb if self.comb else m.d.sync
                domain += shift.eq(addr[:low])
            bytes_out = [Array(got)[(shift + i) & (lanes - 1)] for i in range(width)]
            m.d.comb += port.data.eq(Cat(*bytes_out))
        return m


def page_request_layout(addr_bits: int) -> data.StructLayout:
    """A page read: the byte address of the page's first byte."""
    return data.StructLayout({"addr": unsigned(addr_bits)})


class FlashPages(wiring.Component):
    """Flash seen page by page: a page read answers `latency` cycles after it is taken with
    the page's bytes, `beat` per cycle, in order. Appended KV tokens come in on `i_write`
    (the CSD top waits out each page's program time itself).

    Parameters
    ----------
    size : int
        Bytes of flash modelled (from address 0).
    page_bytes, beat : int
        Page size and bytes per beat (beat divides page_bytes).
    latency : int
        Cycles from the cycle a request is taken to the cycle of its first beat (at least 2:
        one to hold the address, one to read).
    init : bytes, optional
    addr_bits : int

    Members
    -------
    i_request : In(stream.Signature(page_request_layout(addr_bits)))
        Taken while no page is being read.
    o_data : Out(stream.Signature(8 * beat))
    i_write : In(write_signature(addr_bits, write_bytes))
    """

    def __init__(self, size: int, *, page_bytes: int, beat: int, latency: int,
                 init: bytes = b"", addr_bits: int = 40, write_bytes: int = 4):
        for name, value, low in (("page_bytes", page_bytes, 1), ("beat", beat, 1),
                                 ("latency", latency, 2)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if page_bytes % beat:
            raise ValueError(f"beat {beat!r} does not divide page_bytes {page_bytes!r}")
        self.page_bytes, self.beat, self.latency = page_bytes, beat, latency
        self.ram = ByteRam(size, reads=(beat,), writes=(write_bytes,), init=init,
                           addr_bits=addr_bits)
        super().__init__({"i_request": In(stream.Signature(page_request_layout(addr_bits))),
                          "o_data": Out(stream.Signature(8 * beat)),
                          "i_write": In(write_signature(addr_bits, write_bytes))})

    def elaborate(self, platform):
        m = Module()
        m.submodules.ram = ram = self.ram
        wiring.connect(m, wiring.flipped(self.i_write), ram.write0)
        beats = self.page_bytes // self.beat
        base = Signal.like(self.i_request.payload.addr)
        index = Signal(range(beats + 1))
        wait = Signal(range(self.latency + 1))
        advance = self.o_data.valid & self.o_data.ready
        m.d.comb += [ram.read0.addr.eq(base + (index + advance) * self.beat),
                     self.o_data.payload.eq(ram.read0.data)]
        with m.FSM():
            with m.State("IDLE"):
                m.d.comb += self.i_request.ready.eq(1)
                with m.If(self.i_request.valid):
                    m.d.sync += [base.eq(self.i_request.payload.addr), index.eq(0),
                                 wait.eq(self.latency - 2)]
                    m.next = "WAIT"
            with m.State("WAIT"):
                with m.If(wait == 0):
                    m.next = "STREAM"
                with m.Else():
                    m.d.sync += wait.eq(wait - 1)
            with m.State("STREAM"):
                m.d.comb += self.o_data.valid.eq(1)
                with m.If(advance):
                    m.d.sync += index.eq(index + 1)
                    with m.If(index + 1 == beats):
                        m.next = "IDLE"
        return m


# ---------------------------------------------------------------------------------------------
# The system top
# ---------------------------------------------------------------------------------------------

STREAMS = ("dma", "mxu", "vpu", "pim", "csd")
"""The streams the RTL system runs, in engine id order."""
HOST_BYTES = 4
"""Width of the host read ports a testbench reads results through."""
HOST_SPACE_BYTES = 1 << 16
"""Bytes of HOST memory the system models (token ids, positions, logits of small models)."""
HBM_MODEL_BYTES = 1 << 18
"""Bytes of HBM the system models by default: the weights and embedding table of the small
models it co-simulates (every byte of a memory lives in the design, so not the full space)."""


def space_images(cfg, images, sizes=None) -> dict[str, bytes]:
    """Initial contents of each space from address 0, as long as its last image reaches:
    `images` maps a space name to bytes, or is a bundle's list of `MemoryImage`s (placed at
    their addresses); each must fit the modelled `space_sizes(cfg, sizes)`."""
    if isinstance(images, dict):
        images = [(name, name, 0, bytes(data)) for name, data in images.items()]
    else:
        images = [(i.name, i.space, i.addr, i.data.tobytes()) for i in images]
    return place(images, space_sizes(cfg, sizes))


def place(images, sizes: dict) -> dict[str, bytes]:
    """Bytes of each space holding `images` ((name, space, addr, bytes) each), checked
    against `sizes`."""
    out: dict = {}
    for name, space, addr, data in images:
        if space not in sizes:
            raise ValueError(f"image {name!r} is in {space}, which the RTL system does not "
                             f"model; it models {', '.join(sizes)}")
        end = addr + len(data)
        if end > sizes[space]:
            raise ValueError(f"image {name!r} ends at byte {end} of {space}, which has "
                             f"{sizes[space]} modelled; compile for this hardware config, or "
                             f"model more of {space}")
        buf = out.setdefault(space, bytearray())
        buf.extend(bytes(max(0, end - len(buf))))
        buf[addr:end] = data
    return {space: bytes(buf) for space, buf in out.items()}


def space_sizes(cfg, sizes=None) -> dict[str, int]:
    """Bytes of each memory space the system top models: the config's, HOST_SPACE_BYTES of
    HOST, and `sizes` (space name -> bytes) where given, to model less of a space."""
    out = {name: cfg.space_bytes(name) for name in ("HBM", "SRAM", "GBUF", "PRES", "PIMDRAM",
                                                   "CDRAM", "FLASH")}
    out["HOST"] = HOST_SPACE_BYTES
    for name, size in (sizes or {}).items():
        if name not in out:
            raise ValueError(f"sizes names {name!r}, which the system top does not model; it "
                             f"models {', '.join(out)}")
        out[name] = size
    return out


def check_system(cfg, sizes=None) -> None:
    """ValueError naming the problem for a config the system top cannot build: one without
    all three engines, or with a memory beyond what a simulator holds."""
    missing = [s for s in ("fpga", "pim", "csd") if getattr(cfg, s, None) is None]
    if missing:
        raise ValueError(f"config {cfg.name!r} lacks {', '.join(missing)}; the system top "
                         f"needs all three engines (trimem-small has them)")
    big = [f"{name} = {size} bytes" for name, size in modelled_sizes(cfg, sizes).items()
           if name != "PIMDRAM" and size > MAX_RAM_BYTES]
    if big:
        raise ValueError(f"config {cfg.name!r} has {', '.join(big)}, more than the "
                         f"{MAX_RAM_BYTES} bytes a memory model of the system top holds; use "
                         f"a small preset such as trimem-small")


def modelled_sizes(cfg, sizes=None) -> dict[str, int]:
    """Bytes of each space a `TrimemSystem` models: `space_sizes` with HBM cut to
    HBM_MODEL_BYTES unless `sizes` says otherwise."""
    return space_sizes(cfg, {"HBM": min(HBM_MODEL_BYTES, cfg.space_bytes("HBM")),
                             **(sizes or {})})


def bundle_inputs(bundle_dir, entry: str, cfg) -> tuple[dict, dict]:
    """(programs, images) of a bundle entry from its `$readmemh` files: each engine's
    `programs/<entry>/<engine>.hex` and every image's `.hex` (width from the manifest)."""
    import yaml

    root = Path(bundle_dir)
    manifest = yaml.safe_load((root / "manifest.yaml").read_text())
    entries = {e["name"]: e for e in manifest["entries"]}
    if entry not in entries:
        raise ValueError(f"bundle {root} has no entry {entry!r}; it has {', '.join(entries)}")
    programs = {}
    for engine, rec in entries[entry]["programs"].items():
        if engine in STREAMS:
            programs[engine] = root / rec["file"].replace(".bin", ".hex")
    sizes, placed = space_sizes(cfg), []
    for rec in manifest["images"]:
        if rec["space"] not in sizes:
            continue
        if "hex" not in rec:
            raise ValueError(f"image {rec['name']!r} has no $readmemh file (over the bundle's "
                             f"hex limit); the RTL system loads images from .hex")
        width = rec["hex"]["width_bytes"]
        nbytes = -(-rec["bytes"] // width) * width
        data = read_hex(root / rec["hex"]["file"], width, nbytes)[:rec["bytes"]]
        placed.append((rec["name"], rec["space"], rec["addr"], data))
    return programs, place(placed, sizes)


class TrimemSystem(wiring.Component):
    """The `trimem-small` machine: DMA, MXU, VPU, PIM and CSD streams with their memories.

    The DMA copies between HOST, HBM, SRAM, GBUF, PRES and CDRAM, `DMA_BYTES` a cycle; the MXU
    and VPU engines share the SRAM (a `ByteRam` with a port for each of their windows), and the
    VPU gathers VPU.EMBED rows from HBM; each PIM channel reads its span of the global buffer
    and all write the result buffers; the CSD reads and writes CDRAM, reads flash through
    `FlashPages` (a page answers `FlashTiming.page_read` cycles after its request) and writes
    appended KV tokens into it. `Reservations` holds the HBM channels, links and PIM buses for
    the DMA and the VPU as the emulator does, and `SyncTokens` orders the streams.

    Parameters
    ----------
    cfg : HardwareConfig
        Needs fpga, pim and csd sections.
    programs : dict of stream name -> program, optional
        As `Frontend` takes them; a missing stream is just HALT.
    images : dict of space name -> bytes, or a list of bundle MemoryImages, optional
        Initial contents of HOST, HBM, SRAM, GBUF, PRES, PIMDRAM, CDRAM and FLASH.
    sizes : dict of space name -> int, optional
        Bytes to model of a space, where fewer than `space_sizes` gives (HBM defaults to
        HBM_MODEL_BYTES: every byte of a memory is in the design); the DMA refuses copies past
        them.
    attention : dict, optional
        Buffer sizes of the CSD's `AttentionEngine`.

    Members
    -------
    run : In(1)
    halted : Out(1)
        Every stream has ended.
    error : Out(1)
        Any stream or engine reported an error.
    cycles_<stream> : Out(CYCLE_BITS)
        Each stream's length (dma, mxu, vpu, pim, csd).
    host_sram, host_pres, host_cdram : In(read_signature(addr_bits, 4))
        Read ports for testbenches.
    """

    def __init__(self, cfg, *, programs=None, images=None, sizes=None, attention=None):
        from trimem.hdl.csd_top import CsdTop
        from trimem.hdl.dma_top import DMA_BYTES, DmaEngine
        from trimem.hdl.mxu_top import MxuEngine
        from trimem.hdl.pim_top import PimTop
        from trimem.hdl.reserve import Reservations, resource_names
        from trimem.hdl.vpu_top import VpuEngine

        check_system(cfg, sizes)
        programs = dict(programs or {})
        unknown = set(programs) - set(STREAMS)
        if unknown:
            raise ValueError(f"programs for {sorted(unknown)!r}: the RTL system runs "
                             f"{', '.join(STREAMS)}")
        sizes = modelled_sizes(cfg, sizes)
        images = space_images(cfg, images or {}, sizes)
        halt = [isa.encode("HALT")]
        self.cfg, self.sizes = cfg, sizes
        fpga, pim, csd = cfg.fpga, cfg.pim, cfg.csd
        resources = resource_names(cfg)
        self.dma = DmaEngine(cfg, sizes=sizes)
        self.mxu = MxuEngine(fpga)
        self.vpu = VpuEngine(fpga, hbm=True, resources=resources)
        self.reservations = Reservations(resources, ("dma", "vpu"))
        self.frontends = {name: Frontend(isa.Engine[name.upper()], programs.get(name, halt))
                          for name in ("dma", "mxu", "vpu")}
        self.pim = PimTop(pim, program=programs.get("pim", halt),
                          image=images.get("PIMDRAM", b""))
        self.csd = CsdTop(csd, program=programs.get("csd", halt), **(attention or {}))

        def ram(space, reads, writes, **kwargs):
            return ByteRam(sizes[space], reads=tuple(reads), writes=tuple(writes),
                           init=images.get(space, b""), **kwargs)

        self.host = ram("HOST", (DMA_BYTES,), (DMA_BYTES,))
        self.hbm = ram("HBM", (DMA_BYTES, *self.vpu.hbm_reads.values()), (DMA_BYTES,))
        reads = (list(self.mxu.reads.values()) + list(self.vpu.reads.values())
                 + [HOST_BYTES, DMA_BYTES])
        self.sram = ram("SRAM", reads, (self.mxu.write_bytes, self.vpu.write_bytes, DMA_BYTES),
                        addr_bits=self.mxu.addr_bits)
        self.gbuf = ram("GBUF", [pim.mac_lanes, 4] * pim.channels + [DMA_BYTES], (DMA_BYTES,))
        self.pres = ram("PRES", (HOST_BYTES, DMA_BYTES),
                        (pim.banks_per_channel * 4,) * pim.channels + (DMA_BYTES,))
        self.cdram = ram("CDRAM", (4, HOST_BYTES, DMA_BYTES), (4, DMA_BYTES))
        self.flash = FlashPages(sizes["FLASH"], page_bytes=csd.page_bytes,
                                beat=csd.engine_lanes,
                                latency=max(2, FlashTiming(csd).page_read),
                                init=images.get("FLASH", b""))
        ports = {"run": In(1), "halted": Out(1), "error": Out(1)}
        ports.update({f"cycles_{name}": Out(CYCLE_BITS) for name in STREAMS})
        ports.update({"host_sram": In(read_signature(self.mxu.addr_bits, HOST_BYTES)),
                      "host_pres": In(read_signature(32, HOST_BYTES)),
                      "host_cdram": In(read_signature(32, HOST_BYTES))})
        super().__init__(ports)

    def elaborate(self, platform):
        m = Module()
        fes = self.frontends
        for name, sub in (("dma", self.dma), ("mxu", self.mxu), ("vpu", self.vpu),
                          ("fe_dma", fes["dma"]), ("fe_mxu", fes["mxu"]), ("fe_vpu", fes["vpu"]),
                          ("pim", self.pim), ("csd", self.csd), ("reservations", self.reservations),
                          ("host", self.host), ("hbm", self.hbm), ("sram", self.sram),
                          ("gbuf", self.gbuf), ("pres", self.pres), ("cdram", self.cdram),
                          ("flash", self.flash)):
            m.submodules[name] = sub
        m.submodules.tokens = tokens = SyncTokens()

        # -- streams: front ends, engines, tokens ---------------------------------------------
        tops = {"pim": self.pim, "csd": self.csd}
        engines = {"dma": self.dma, "mxu": self.mxu, "vpu": self.vpu}
        for name, engine in engines.items():
            fe = fes[name]
            wiring.connect(m, fe.o_instr, engine.i_instr)
            m.d.comb += fe.run.eq(self.run & ~engine.error)
        for name in STREAMS:
            unit = fes.get(name) or tops[name]
            wiring.connect(m, unit.o_push, tokens.port(name, "push"))
            wiring.connect(m, unit.o_pop, tokens.port(name, "pop"))
            m.d.comb += getattr(self, f"cycles_{name}").eq(unit.cycles)
        for top in tops.values():
            m.d.comb += top.run.eq(self.run)
        units = [*fes.values(), self.pim, self.csd]
        m.d.comb += [self.halted.eq(Cat(u.halted for u in units).all()),
                     self.error.eq(Cat(*(u.error for u in units),
                                       *(e.error for e in engines.values())).any())]

        # -- shared channels and links: the DMA and the VPU's gathers from HBM ---------------
        res = self.reservations
        for name in ("dma", "vpu"):
            wiring.connect(m, engines[name].res, getattr(res, name))
            m.d.comb += engines[name].now.eq(res.now)

        # -- SRAM: every window of the MXU and VPU, the host, the DMA ------------------------
        port = 0
        for engine in (self.mxu, self.vpu):
            for name in engine.reads:
                wiring.connect(m, getattr(engine, f"rd_{name}"),
                               getattr(self.sram, f"read{port}"))
                port += 1
        wiring.connect(m, wiring.flipped(self.host_sram), getattr(self.sram, f"read{port}"))
        join(m, self.dma.rd_sram, getattr(self.sram, f"read{port + 1}"))
        wiring.connect(m, self.mxu.wr, self.sram.write0)
        wiring.connect(m, self.vpu.wr, self.sram.write1)
        join(m, self.dma.wr_sram, self.sram.write2)

        # -- HOST and HBM: the DMA's, and the VPU's gathers -----------------------------------
        for name, ram in (("host", self.host), ("hbm", self.hbm)):
            join(m, getattr(self.dma, f"rd_{name}"), ram.read0)
            join(m, getattr(self.dma, f"wr_{name}"), ram.write0)
        for i, name in enumerate(self.vpu.hbm_reads, 1):
            join(m, getattr(self.vpu, f"rd_{name}"), getattr(self.hbm, f"read{i}"))

        # -- PIM: each channel's span of the global buffer, the result buffers ----------------
        pim = self.cfg.pim
        for c in range(pim.channels):
            for i, name in enumerate((f"gbuf{c}", f"scale{c}")):
                ours, theirs = getattr(self.pim, name), getattr(self.gbuf, f"read{2 * c + i}")
                m.d.comb += [theirs.addr.eq(ours.addr + c * pim.gbuf_bytes),
                             ours.data.eq(theirs.data)]
            wiring.connect(m, getattr(self.pim, f"pres{c}"), getattr(self.pres, f"write{c}"))
        join(m, self.dma.rd_gbuf, getattr(self.gbuf, f"read{2 * pim.channels}"))
        join(m, self.dma.wr_gbuf, self.gbuf.write0)
        wiring.connect(m, wiring.flipped(self.host_pres), self.pres.read0)
        join(m, self.dma.rd_pres, self.pres.read1)
        join(m, self.dma.wr_pres, getattr(self.pres, f"write{pim.channels}"))

        # -- CSD: CDRAM and flash pages; the DMA's CDRAM ports ---------------------------------
        wiring.connect(m, self.csd.cdram_rd, self.cdram.read0)
        wiring.connect(m, self.csd.cdram_wr, self.cdram.write0)
        wiring.connect(m, wiring.flipped(self.host_cdram), self.cdram.read1)
        join(m, self.dma.rd_cdram, self.cdram.read2)
        join(m, self.dma.wr_cdram, self.cdram.write1)
        wiring.connect(m, self.csd.o_page, self.flash.i_request)
        wiring.connect(m, self.flash.o_data, self.csd.i_page)
        wiring.connect(m, self.csd.flash_wr, self.flash.i_write)
        return m


def join(m: Module, port, ram_port) -> None:
    """Connect an engine's read or write window to a memory port whose address may be narrower
    or wider (the memory keeps the low bits, as every model here wraps)."""
    m.d.comb += ram_port.addr.eq(port.addr)
    if hasattr(port, "en"):
        m.d.comb += [ram_port.data.eq(port.data), ram_port.mask.eq(port.mask),
                     ram_port.en.eq(port.en)]
    else:
        m.d.comb += port.data.eq(ram_port.data)


@register_top("system", ("fpga", "pim", "csd"))
def system_top(cfg, **kwargs) -> TrimemSystem:
    """The whole machine of `cfg` (keyword arguments as `TrimemSystem` takes them)."""
    return TrimemSystem(cfg, **kwargs)
