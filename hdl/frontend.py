"""The instruction front end every engine top shares: fetch, decode and SYNC tokens.

A `Frontend` holds one engine's instruction stream in a memory initialised from the bundle
(`programs/<entry>/<engine>.hex` or `.bin`), presents one decoded word per cycle, and runs the
CTRL instructions itself: `NOP` (one cycle), `HALT`, and the `PUSH`/`POP` token handshakes of
docs/contract.md. Every other word of its engine goes out on `o_instr`, viewed through a
`data.UnionLayout` whose members are built from `trimem.isa.INSTRUCTIONS`, so a field's name,
width and position are written only in the ISA table.

Timing (trimem.timing, CTRL rows). The engine behind `o_instr` raises `ready` exactly when it
is idle; an instruction issues in the cycle it is taken and the next one issues `cycles` later,
so the front end adds no cycle of its own. A CTRL word issues only while the engine is idle,
because it starts when the previous instruction ends. `PUSH` issues when `o_push` is taken
(the token is visible from the next cycle on), `POP` when `o_pop` is taken (the counter is
positive), `NOP` when the engine is idle; each takes one cycle. `HALT` takes none: `cycles`
counts from the first word presented (cycle 0 of the stream, where a first `POP` starts
waiting) to the issue of `HALT`, the stream's length as the emulator counts it.

`SyncTokens` is the token matrix a system top places between its front ends: one counter
per ordered (source, destination) pair of stream engines. `Sram` is the FPGA on-chip buffer
(`Space.SRAM`) the engine tops read and write through byte-window ports, and `SramTop` runs
one engine's stream on its own against an `Sram`.

An engine behind a front end follows one protocol: `i_instr` (the front end's `o_instr`,
ready exactly when idle), `error` (sticky: a word it cannot run), and for SRAM engines
`reads` (port name -> width in bytes), one `rd_<name>` read port per entry and one `wr`
write port of `write_bytes` bytes.

Registry of tops. A top module adds itself to `TOPS` with `@register_top(name, engines)`
(name -> factory; `factory(cfg)` must build the top of a `HardwareConfig` with defaults, other
keywords such as `program` are the top's own); `trimem.hdl.build` imports the modules listed
in `TOP_MODULES` and emits or synthesises every entry whose config sections exist:

    @register_top("pim", engines=("pim",))
    def pim_top(cfg, program=(), **kwargs):
        return PimTop(cfg, program, **kwargs)
"""
from __future__ import annotations

from pathlib import Path

from amaranth.hdl import Cat, Module, Mux, Signal, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from trimem import isa

ENGINE_BITS = isa.ENUM_BITS
"""Width of an engine id on the token ports (the ISA's engine fields)."""
CYCLE_BITS = 48
"""Width of the stream cycle counter: 2**48 cycles is about 33 days at 100 MHz."""
TOKEN_BITS = 8
"""Default width of a token counter; a PUSH to a full counter waits until it is popped."""
DEFAULT_DEPTH = 256
"""Instruction memory depth of a front end built without a program (loaded through `i_load`)."""
MAX_PROGRAM_WORDS = 1 << 16
"""Largest instruction memory a front end builds: 2 MiB of words, beyond simulation sizes."""
MAX_SRAM_BYTES = 1 << 20
"""Largest on-chip buffer a top builds: the buffer is an initialised memory in the design."""
HOST_BYTES = 4
"""Width of the host port of a top's SRAM: one fx word."""
FX_BYTES = 4
"""Bytes of one fx value (int32) in SRAM."""
SIZE_BITS = isa.M.width
"""Width of the m, n and k loop counts (the ISA's `m` field)."""

TOPS: dict = {}
"""Top name -> factory(cfg, **kwargs) returning an elaboratable top; filled by `register_top`."""
TOP_MODULES = ("trimem.hdl.mxu_top", "trimem.hdl.vpu_top", "trimem.hdl.pim_top",
               "trimem.hdl.csd_top", "trimem.hdl.dma_top", "trimem.hdl.system")
"""Modules that register tops when imported; build imports those that exist."""


def register_top(name: str, engines: tuple[str, ...]):
    """Decorator: list `factory(cfg, **kwargs)` in `TOPS` under `name`.

    `engines` names the config sections the top needs (e.g. ("fpga",)); build skips the top
    for a config that lacks one of them.
    """
    def wrap(factory):
        if name in TOPS and TOPS[name] is not factory:
            raise ValueError(f"top {name!r} is registered twice; give each top its own name")
        factory.engines = tuple(engines)
        TOPS[name] = factory
        return factory
    return wrap


# ---------------------------------------------------------------------------------------------
# Layouts derived from the ISA table
# ---------------------------------------------------------------------------------------------

def member_name(instr: isa.Instr) -> str:
    """The union member of an instruction: its mnemonic after the engine, lower case
    ("MXU.GEMM" -> "gemm", "NOP" -> "nop")."""
    return instr.name.split(".")[-1].lower()


def instr_layout(instr) -> data.StructLayout:
    """`data.StructLayout` of one instruction word: `opcode`, then every field of the ISA table
    at its table position (`Instr.layout`), unsigned."""
    if isinstance(instr, str):
        instr = isa.lookup(instr)
    members = {"opcode": unsigned(isa.OPCODE_BITS)}
    members.update({f.name: unsigned(f.width) for f in instr.fields})
    layout = data.StructLayout(members)
    for f, lo in instr.layout:
        if layout[f.name].offset != lo:
            raise ValueError(f"{instr.name}.{f.name} lands at bit {layout[f.name].offset} but "
                             f"the ISA table puts it at {lo}")
    return layout


def engine_layout(engine) -> data.UnionLayout:
    """`data.UnionLayout` of a 256-bit word of `engine`'s stream: `raw`, and one member per
    instruction of the engine and of CTRL (see `member_name`)."""
    engine = isa.Engine(engine)
    members = {"raw": unsigned(isa.WORD_BITS)}
    for instr in isa.INSTRUCTIONS:
        if instr.engine in (engine, isa.Engine.CTRL):
            members[member_name(instr)] = instr_layout(instr)
    return data.UnionLayout(members)


def load_layout(depth: int) -> data.StructLayout:
    """Payload of a program-memory write: word address and word."""
    return data.StructLayout({"addr": range(depth), "word": unsigned(isa.WORD_BITS)})


def program_words(source) -> list[int]:
    """Instruction words as ints (bit i of the int is bit i of the word).

    `source` is a bundle's `$readmemh` program (`.hex`, one word per line, most significant
    digit first), a program file (`.bin`, header checked by `trimem.isa.read_program`), or a
    sequence of 32-byte words.
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.suffix == ".bin":
            _, words = isa.read_program(path)
            return [int.from_bytes(w, "little") for w in words]
        if path.suffix != ".hex":
            raise ValueError(f"program {str(path)!r} is neither a .hex nor a .bin file; give "
                             f"the bundle's programs/<entry>/<engine>.hex or .bin")
        out = []
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            text = line.split("//", 1)[0].strip()
            if not text:
                continue
            if len(text) != 2 * isa.WORD_BYTES:
                raise ValueError(f"{path}:{lineno}: {text!r} is not one {isa.WORD_BITS}-bit "
                                 f"word ({2 * isa.WORD_BYTES} hex digits)")
            out.append(int(text, 16))
        return out
    words = list(source)
    for i, w in enumerate(words):
        if not isinstance(w, (bytes, bytearray)) or len(w) != isa.WORD_BYTES:
            raise TypeError(f"word {i} is {w!r}; give {isa.WORD_BYTES}-byte words")
    return [int.from_bytes(w, "little") for w in words]


def token_signature() -> stream.Signature:
    """A token handshake: the payload is the other engine's id."""
    return stream.Signature(unsigned(ENGINE_BITS))


# ---------------------------------------------------------------------------------------------
# Front end
# ---------------------------------------------------------------------------------------------

class Frontend(wiring.Component):
    """Fetch and decode of one engine's stream; runs NOP, HALT, PUSH and POP itself.

    Parameters
    ----------
    engine : isa.Engine or its name
        The stream's engine; words of other engines stop the stream with `error`.
    program : words as `program_words` accepts them, or a path
        Initial contents of the instruction memory.
    depth : int, optional
        Instruction memory depth in words (default: the program's length, or DEFAULT_DEPTH
        without one), so a longer program can be written through `i_load`.

    Members
    -------
    run : In(1)
        Fetch while high; the first word issues in the cycle after the first with `run` high.
    o_instr : Out(stream.Signature(engine_layout(engine)))
        Words of the engine, one per `ready` cycle; the engine raises `ready` when idle.
    o_push : Out(token_signature())
        `PUSH dst`: payload dst; the token matrix takes it unless its counter is full.
    o_pop : Out(token_signature())
        `POP src`: payload src; the token matrix takes it when its counter is positive.
    i_load : In(stream.Signature(load_layout(depth)))
        Program-memory write port (always ready); write before raising `run`.
    pc : Out(range(depth + 1))
        Address of the word now presented.
    halted : Out(1)
        The stream has ended (HALT issued, or `error`).
    error : Out(1)
        The word at `pc` belongs to another engine or has an unknown CTRL opcode, or the
        stream ran past the end of the memory without a HALT.
    cycles : Out(CYCLE_BITS)
        Cycles from the first word presented to the issue of HALT (counts while running).
    """

    def __init__(self, engine, program=(), *, depth: int | None = None):
        self.engine = isa.stream_engine(engine)
        self.program = program_words(program)
        if depth is None:
            depth = len(self.program) or DEFAULT_DEPTH
        if not isinstance(depth, int) or not 1 <= depth <= MAX_PROGRAM_WORDS:
            raise ValueError(f"depth must be an int in [1, {MAX_PROGRAM_WORDS}], got {depth!r}")
        if len(self.program) > depth:
            raise ValueError(f"the program has {len(self.program)} words but depth is {depth}; "
                             f"raise depth to at least {len(self.program)}")
        self.depth = depth
        super().__init__({
            "run": In(1),
            "o_instr": Out(stream.Signature(engine_layout(self.engine))),
            "o_push": Out(token_signature()),
            "o_pop": Out(token_signature()),
            "i_load": In(stream.Signature(load_layout(depth))),
            "pc": Out(range(depth + 1)),
            "halted": Out(1),
            "error": Out(1),
            "cycles": Out(CYCLE_BITS),
        })

    def elaborate(self, platform):
        m = Module()

        # -- instruction memory: read address runs one word ahead of `pc` -----------------
        m.submodules.imem = imem = Memory(shape=isa.WORD_BITS, depth=self.depth,
                                          init=self.program)
        rd = imem.read_port()
        wr = imem.write_port()
        m.d.comb += [wr.addr.eq(self.i_load.payload.addr), wr.data.eq(self.i_load.payload.word),
                     wr.en.eq(self.i_load.valid), self.i_load.ready.eq(1)]

        primed = Signal()
        take = Signal()
        m.d.sync += primed.eq(self.run)
        m.d.comb += rd.addr.eq(Mux(take, self.pc + 1, self.pc))
        with m.If(take):
            m.d.sync += self.pc.eq(self.pc + 1)

        # -- decode -------------------------------------------------------------------------
        word = data.View(engine_layout(self.engine), rd.data)
        opcode = word.raw[:isa.OPCODE_BITS]
        owner = opcode[isa.OP_BITS:]
        ctrl = {member_name(i): i.opcode for i in isa.INSTRUCTIONS
                if i.engine == isa.Engine.CTRL}
        live = Signal()
        idle = self.o_instr.ready
        m.d.comb += live.eq(primed & self.run & ~self.halted & (self.pc < self.depth))
        m.d.comb += [self.o_instr.payload.eq(rd.data), self.o_push.payload.eq(word.push.dst),
                     self.o_pop.payload.eq(word.pop.src)]

        is_halt = Signal()
        with m.If(live):
            with m.If(owner == self.engine):
                m.d.comb += [self.o_instr.valid.eq(1), take.eq(idle)]
            with m.Elif(opcode == ctrl["nop"]):
                m.d.comb += take.eq(idle)
            with m.Elif(opcode == ctrl["halt"]):
                m.d.comb += is_halt.eq(idle)
            with m.Elif(opcode == ctrl["push"]):
                m.d.comb += [self.o_push.valid.eq(idle), take.eq(idle & self.o_push.ready)]
            with m.Elif(opcode == ctrl["pop"]):
                m.d.comb += [self.o_pop.valid.eq(idle), take.eq(idle & self.o_pop.ready)]
            with m.Else():
                m.d.sync += [self.error.eq(1), self.halted.eq(1)]
        with m.If(primed & self.run & ~self.halted & (self.pc == self.depth)):
            m.d.sync += [self.error.eq(1), self.halted.eq(1)]
        with m.If(is_halt):
            m.d.sync += self.halted.eq(1)

        # -- cycle counter: from the first word presented up to the issue of HALT ----------
        started = Signal()
        with m.If(live):
            m.d.sync += started.eq(1)
        with m.If((started | live) & ~is_halt & ~self.halted):
            m.d.sync += self.cycles.eq(self.cycles + 1)
        return m


# ---------------------------------------------------------------------------------------------
# Token matrix
# ---------------------------------------------------------------------------------------------

def _port(engine: isa.Engine, kind: str) -> str:
    return f"i_{kind}_{engine.name.lower()}"


class SyncTokens(wiring.Component):
    """Token counters of every ordered pair of stream engines (VTA-style dependency queues).

    Parameters
    ----------
    width : int
        Bits per counter; a PUSH to a full counter is not taken until a POP frees it.

    Members
    -------
    i_push_<engine> : In(token_signature())
        One per stream engine (dma, mxu, vpu, pim, csd): its front end's `o_push`.
    i_pop_<engine> : In(token_signature())
        Its front end's `o_pop`; ready while counter (src, engine) is positive.
    """

    def __init__(self, width: int = TOKEN_BITS):
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive int, got {width!r}")
        self.width = width
        ports = {}
        for e in isa.STREAM_ENGINES:
            ports[_port(e, "push")] = In(token_signature())
            ports[_port(e, "pop")] = In(token_signature())
        super().__init__(ports)

    def port(self, engine, kind: str):
        """The `kind` ("push" or "pop") port of `engine`."""
        return getattr(self, _port(isa.stream_engine(engine), kind))

    def elaborate(self, platform):
        m = Module()
        full = (1 << self.width) - 1
        for src in isa.STREAM_ENGINES:
            for dst in isa.STREAM_ENGINES:
                count = Signal(self.width, name=f"tokens_{src.name.lower()}_{dst.name.lower()}")
                push, pop = self.port(src, "push"), self.port(dst, "pop")
                pushing = Signal(name=f"push_{src.name.lower()}_{dst.name.lower()}")
                popping = Signal(name=f"pop_{src.name.lower()}_{dst.name.lower()}")
                m.d.comb += [pushing.eq(push.valid & (push.payload == dst) & (count != full)),
                             popping.eq(pop.valid & (pop.payload == src) & (count != 0))]
                with m.If(push.payload == dst):
                    m.d.comb += push.ready.eq(count != full)
                with m.If(pop.payload == src):
                    m.d.comb += pop.ready.eq(count != 0)
                m.d.sync += count.eq(count + pushing - popping)
        return m


# ---------------------------------------------------------------------------------------------
# On-chip buffer
# ---------------------------------------------------------------------------------------------

def read_signature(addr_bits: int, width: int) -> wiring.Signature:
    """A window read port, from the reader's side: `width` bytes from byte `addr`, one cycle
    later on `data` (byte i in bits [8i, 8i+8))."""
    return wiring.Signature({"addr": Out(addr_bits), "data": In(8 * width)})


def write_signature(addr_bits: int, width: int) -> wiring.Signature:
    """A window write port, from the writer's side: byte i of `data` goes to `addr + i` where
    `mask` bit i is set, at the end of a cycle with `en`."""
    return wiring.Signature({"addr": Out(addr_bits), "data": Out(8 * width),
                             "mask": Out(width), "en": Out(1)})


def line_bytes(widths) -> int:
    """Line width of an `Sram` serving windows of `widths` bytes: a power of two >= each."""
    return 1 << max(1, max(widths) - 1).bit_length()


class Sram(wiring.Component):
    """Byte-addressed buffer with window ports: any `width` consecutive bytes at any address.

    Lines of `line` bytes alternate between two banks (even and odd lines), so a window of at
    most `line` bytes touches one line of each and every port reads or writes a whole window
    per cycle. Each named read port has its own read port on both banks (synthesis duplicates
    the banks per port). Reads see the memory as it was before the writes of their cycle.

    Parameters
    ----------
    size : int
        Bytes; a multiple of 2 * line.
    reads : dict of name -> width in bytes
    write : int
        Width in bytes of the one write port.
    init : bytes-like
        Initial contents from address 0 (shorter than size: the rest is zero).

    Members
    -------
    rd_<name> : In(read_signature(addr_bits, width)), one per entry of `reads`
    wr : In(write_signature(addr_bits, write))
    """

    def __init__(self, size: int, reads: dict, write: int, init=b""):
        widths = list(reads.values()) + [write]
        if not all(isinstance(w, int) and w >= 1 for w in widths):
            raise ValueError(f"port widths must be positive ints, got {widths!r}")
        self.line = line_bytes(widths)
        if not isinstance(size, int) or size < 2 * self.line or size % (2 * self.line):
            raise ValueError(f"SRAM size {size!r} must be a positive multiple of two "
                             f"{self.line}-byte lines")
        init = bytes(init)
        if len(init) > size:
            raise ValueError(f"SRAM init is {len(init)} bytes, more than its {size} bytes")
        self.size, self.reads, self.write, self.init = size, dict(reads), write, init
        self.addr_bits = (size - 1).bit_length()
        members = {f"rd_{name}": In(read_signature(self.addr_bits, w))
                   for name, w in self.reads.items()}
        members["wr"] = In(write_signature(self.addr_bits, write))
        super().__init__(members)

    def bank_init(self, parity: int) -> list[int]:
        """Initial lines of one bank: lines parity, parity + 2, ... as ints."""
        data = self.init.ljust(self.size, b"\0")
        step = self.line
        return [int.from_bytes(data[i:i + step], "little")
                for i in range(parity * step, self.size, 2 * step)]

    def elaborate(self, platform):
        m = Module()
        line, shift = self.line, (self.line - 1).bit_length()
        depth = self.size // line // 2
        banks = []
        for parity, name in enumerate(("even", "odd")):
            bank = Memory(shape=8 * line, depth=depth, init=self.bank_init(parity))
            m.submodules[f"bank_{name}"] = bank
            banks.append(bank)

        # -- read windows: both lines, then rotate by the byte offset -------------------------
        for name in self.reads:
            port = getattr(self, f"rd_{name}")
            first = port.addr >> shift
            even, odd = banks[0].read_port(), banks[1].read_port()
            offset = Signal(range(line), name=f"{name}_offset")
            parity = Signal(name=f"{name}_parity")
            m.d.comb += [even.addr.eq((first + 1) >> 1), odd.addr.eq(first >> 1)]
            m.d.sync += [offset.eq(port.addr[:shift]), parity.eq(first[0])]
            pair = Mux(parity, Cat(odd.data, even.data), Cat(even.data, odd.data))
            m.d.comb += port.data.eq(pair >> (offset * 8))

        # -- the write window: shift into two lines, split over the banks ---------------------
        wr = self.wr
        first = wr.addr >> shift
        offset = wr.addr[:shift]
        data = Signal(16 * line)
        mask = Signal(2 * line)
        m.d.comb += [data.eq(wr.data << (offset * 8)), mask.eq(wr.mask << offset)]
        even, odd = (bank.write_port(granularity=8) for bank in banks)
        low, high = (data[:8 * line], mask[:line]), (data[8 * line:], mask[line:])
        m.d.comb += [even.addr.eq((first + 1) >> 1), odd.addr.eq(first >> 1)]
        for port, (when_even, when_odd) in ((even, (low, high)), (odd, (high, low))):
            m.d.comb += [port.data.eq(Mux(first[0], when_odd[0], when_even[0])),
                         port.en.eq(Mux(wr.en, Mux(first[0], when_odd[1], when_even[1]), 0))]
        return m


def sram_image(images, size: int) -> bytes:
    """Initial SRAM contents of a bundle: its `Space.SRAM` images (`trimem.bundle.MemoryImage`)
    placed at their addresses in `size` bytes; overlapping or out-of-range images are errors."""
    out = bytearray(size)
    taken = bytearray(size)
    for image in images:
        if image.space != isa.Space.SRAM.name:
            continue
        end = image.addr + image.data.size
        if end > size:
            raise ValueError(f"SRAM image {image.name!r} ends at byte {end}, beyond the "
                             f"{size}-byte SRAM; compile for this hardware config")
        if any(taken[image.addr:end]):
            raise ValueError(f"SRAM image {image.name!r} overlaps an earlier image at "
                             f"[{image.addr:#x}, {end:#x}); the bundle is inconsistent")
        out[image.addr:end] = image.data.tobytes()
        taken[image.addr:end] = b"\1" * image.data.size
    return bytes(out)


def check_sram(fpga) -> None:
    """ValueError when the config's SRAM is beyond what a top builds."""
    if fpga.sram_bytes > MAX_SRAM_BYTES:
        raise ValueError(f"sram_bytes = {fpga.sram_bytes} exceeds the {MAX_SRAM_BYTES} bytes the "
                         f"RTL builds as one initialised memory; use a smaller preset")


def stream_members(frontend: Frontend) -> dict:
    """The ports a one-stream top passes through from its front end `frontend`."""
    return {"run": In(1), "halted": Out(1), "error": Out(1), "cycles": Out(CYCLE_BITS),
            "o_push": Out(token_signature()), "o_pop": Out(token_signature()),
            "i_load": In(stream.Signature(load_layout(frontend.depth)))}


def connect_stream(m: Module, top, fe: Frontend, engine) -> None:
    """Wire a one-stream top's `stream_members` to its front end `fe`, and `fe`'s words into
    `engine`, whose error stops the stream."""
    wiring.connect(m, fe.o_instr, engine.i_instr)
    wiring.connect(m, wiring.flipped(top.i_load), fe.i_load)
    wiring.connect(m, fe.o_push, wiring.flipped(top.o_push))
    wiring.connect(m, fe.o_pop, wiring.flipped(top.o_pop))
    m.d.comb += [fe.run.eq(top.run & ~engine.error), top.halted.eq(fe.halted | engine.error),
                 top.error.eq(fe.error | engine.error), top.cycles.eq(fe.cycles)]


class SramTop(wiring.Component):
    """One FPGA engine's stream on its own: front end, engine and the SRAM.

    Parameters
    ----------
    cfg : trimem.config.HardwareConfig
    engine : elaboratable following the SRAM engine protocol (module docstring)
    kind : isa.Engine
        The stream the engine runs.
    program : as `program_words` takes it
    sram : bytes-like
        Initial SRAM contents from address 0 (the bundle's SRAM images laid out).
    depth : int, optional
        Instruction memory depth (default: the program's length).

    Members
    -------
    run, o_push, o_pop, i_load, cycles
        The front end's (see `Frontend`).
    halted : Out(1)
        The stream ended, or stopped on an error.
    error : Out(1)
        The front end's error, or a word the engine cannot run.
    host_rd : In(read_signature(addr_bits, HOST_BYTES))
        Reads the SRAM (testbenches and loaders).
    host_wr : In(write_signature(addr_bits, HOST_BYTES))
        Writes the SRAM in cycles the engine does not write.
    """

    def __init__(self, cfg, engine, kind, program=(), *, sram=b"", depth: int | None = None):
        self.engine = engine
        self.frontend = Frontend(kind, program, depth=depth)
        write = max(engine.write_bytes, HOST_BYTES)
        self.sram = Sram(cfg.fpga.sram_bytes, {**engine.reads, "host": HOST_BYTES}, write,
                         init=sram)
        bits = self.sram.addr_bits
        super().__init__({**stream_members(self.frontend),
                          "host_rd": In(read_signature(bits, HOST_BYTES)),
                          "host_wr": In(write_signature(bits, HOST_BYTES))})

    def elaborate(self, platform):
        m = Module()
        fe, engine, sram = self.frontend, self.engine, self.sram
        m.submodules.frontend = fe
        m.submodules.engine = engine
        m.submodules.sram = sram

        # -- instructions and tokens ----------------------------------------------------------
        connect_stream(m, self, fe, engine)

        # -- memory: engine ports, host port, one shared write port ---------------------------
        for name in engine.reads:
            wiring.connect(m, getattr(engine, f"rd_{name}"), getattr(sram, f"rd_{name}"))
        wiring.connect(m, wiring.flipped(self.host_rd), sram.rd_host)
        with m.If(engine.wr.en):
            m.d.comb += [sram.wr.addr.eq(engine.wr.addr), sram.wr.data.eq(engine.wr.data),
                         sram.wr.mask.eq(engine.wr.mask), sram.wr.en.eq(1)]
        with m.Else():
            m.d.comb += [sram.wr.addr.eq(self.host_wr.addr), sram.wr.data.eq(self.host_wr.data),
                         sram.wr.mask.eq(self.host_wr.mask), sram.wr.en.eq(self.host_wr.en)]
        return m


def simulate_sram_top(top: SramTop, reads=(), *, max_cycles: int) -> dict:
    """Run `top` in Amaranth's Python simulator until it halts (at most `max_cycles` cycles).

    Returns `cycles` (the front end's count), `halted`, `error`, and `data`: the bytes of each
    SRAM range (addr, nbytes) in `reads`, read through the host port after the run.
    """
    from amaranth.sim import Simulator

    out = {"data": []}

    async def bench(ctx):
        ctx.set(top.run, 1)
        for _ in range(max_cycles):
            await ctx.tick()
            if ctx.get(top.halted):
                break
        out.update(cycles=ctx.get(top.cycles), halted=ctx.get(top.halted),
                   error=ctx.get(top.error))
        for addr, nbytes in reads:
            chunks = []
            for at in range(addr, addr + nbytes, HOST_BYTES):
                ctx.set(top.host_rd.addr, at)
                await ctx.tick()
                chunks.append(ctx.get(top.host_rd.data).to_bytes(HOST_BYTES, "little"))
            out["data"].append(b"".join(chunks)[:nbytes])

    sim = Simulator(top)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    return out
