"""The machine: memories, shared resources, engine models, and the event-driven scheduler.

Each engine runs its instruction stream in order, one instruction at a time; engines run
concurrently and meet only at SYNC tokens and shared resources. The scheduler always advances
the engine whose next instruction can start earliest (a POP can start once its token is in), so
time jumps from instruction to instruction and no loop ever runs per cycle. A PUSH makes its
token available when it ends; tokens of an ordered engine pair are consumed in order (VTA-style
dependency queues). When every unhalted engine waits on a POP no token will ever satisfy, the
run is deadlocked and the error lists each blocked engine's instruction.
"""
from __future__ import annotations

import contextlib
import gc
import importlib
from collections import Counter, deque

import numpy as np

from trimem import isa, timing
from trimem.emulator.engine import EmulatorError, EngineModel, EngineStats, Memory, Resource

ENGINE_MODELS = {
    isa.Engine.DMA: ("trimem.emulator.fpga", "DmaEngine"),
    isa.Engine.MXU: ("trimem.emulator.fpga", "MxuEngine"),
    isa.Engine.VPU: ("trimem.emulator.fpga", "VpuEngine"),
    isa.Engine.PIM: ("trimem.emulator.pim", "PimEngine"),
    isa.Engine.CSD: ("trimem.emulator.csd", "CsdEngine"),
}
"""Where each stream engine's model lives; imported only when a run has that stream."""
ENGINE_SECTION = {isa.Engine.DMA: "fpga", isa.Engine.MXU: "fpga", isa.Engine.VPU: "fpga",
                  isa.Engine.PIM: "pim", isa.Engine.CSD: "csd"}
"""The config section an engine needs."""
SPACE_SECTION = {isa.Space.HOST: None, isa.Space.HBM: "fpga", isa.Space.SRAM: "fpga",
                 isa.Space.GBUF: "pim", isa.Space.PRES: "pim", isa.Space.CDRAM: "csd",
                 isa.Space.PIMDRAM: "pim", isa.Space.FLASH: "csd"}
"""The config section a memory space needs."""

_NOP, _HALT, _PUSH, _POP, _OP = range(5)
_CTRL_KIND = {"NOP": _NOP, "HALT": _HALT, "PUSH": _PUSH, "POP": _POP}


def _need(config, section: str | None, what: str) -> None:
    if section is not None and getattr(config, section) is None:
        raise EmulatorError(f"{what} needs a {section!r} section, but hardware config "
                            f"{config.name!r} has none; use a config with {section}")


_ENUMS = {isa.Kind.ENGINE: {int(e): e for e in isa.Engine},
          isa.Kind.SPACE: {int(s): s for s in isa.Space}}


def decode_program(words) -> list[isa.Decoded]:
    """The instructions of `words`, decoded column-wise by `isa.decode_program_arrays` (one
    numpy pass per field and opcode instead of one Python pass per field and word)."""
    cols = isa.decode_program_arrays(words)
    opcodes = cols["opcode"]
    out: list = [None] * len(opcodes)
    for op in np.unique(opcodes).tolist():
        instr = isa.BY_OPCODE[op]
        where = np.flatnonzero(opcodes == op)
        columns = []
        for f in instr.fields:
            values = cols[f.name][where].tolist()
            enum = _ENUMS.get(f.kind)
            columns.append(values if enum is None else [enum[v] for v in values])
        rows = zip(*columns) if columns else [()] * len(where)
        for i, row in zip(where.tolist(), rows):
            out[i] = isa.Decoded(instr.name, dict(zip(instr.field_names, row)))
    return out


@contextlib.contextmanager
def _no_cyclic_gc():
    """Pause the cyclic garbage collector: decoding and running allocate an object or more per
    instruction and form no reference cycles, so its repeated full scans only cost time."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


class Stream:
    """One engine's program as the scheduler walks it: instructions, position and records."""

    def __init__(self, model: EngineModel, program: list[isa.Decoded]):
        self.model = model
        self.program = program
        self.kinds = [_CTRL_KIND.get(ins.name, _OP) for ins in program]
        self.pc = 0
        self.ready = 0
        """First cycle (of the engine's clock) at which the next instruction may start."""
        self.ready_ps = 0
        self.starts: list[int] = []
        self.ends: list[int] = []
        if not program or program[-1].name != "HALT":
            raise EmulatorError(f"{model.name} program does not end with HALT; end every "
                                f"stream with HALT")


class Machine:
    """Memories, resources and engines of one hardware config, and the scheduler that runs
    instruction streams on them.

    `timing_only` skips the data: instructions move and compute nothing except the small
    control data timing depends on (token positions and ids, copied when their source bytes
    were ever written).
    """

    def __init__(self, config, *, timing_only: bool = False):
        self.config = config
        self.timing_only = timing_only
        self.memories: dict[isa.Space, Memory] = {}
        self.resources: dict[str, Resource] = {}
        self.engines: dict[isa.Engine, EngineModel] = {}
        self.traffic: Counter = Counter()
        """Bytes moved per memory space name and per link name."""
        self.counting = EngineStats()
        """Stats of the engine whose instruction runs (set by the scheduler)."""
        self.streams: dict[isa.Engine, Stream] = {}
        self.end_ps = 0
        self._build_resources()

    # -- memories, resources, engines --------------------------------------------------------

    def _build_resources(self) -> None:
        cfg = self.config
        self.resources["pcie"] = Resource("pcie")
        self.resources["p2p"] = Resource("p2p")
        if cfg.fpga is not None:
            for c in range(cfg.fpga.hbm_channels):
                self.resources[f"hbm{c}"] = Resource(f"hbm{c}")
        if cfg.pim is not None:
            for c in range(cfg.pim.channels):
                shared = cfg.pim.shared_with_hbm
                self.resources[f"pim{c}"] = self.resources[f"hbm{c}"] if shared \
                    else Resource(f"pim{c}")
        if cfg.csd is not None:
            for c in range(cfg.csd.channels):
                self.resources[f"flash{c}"] = Resource(f"flash{c}")

    def memory(self, space) -> Memory:
        """The memory of `space` (an isa.Space or its name), created on first use."""
        space = isa.Space[space] if isinstance(space, str) else isa.Space(space)
        mem = self.memories.get(space)
        if mem is None:
            _need(self.config, SPACE_SECTION[space], f"memory space {space.name}")
            mem = self.memories[space] = Memory(space.name, self.config.space_bytes(space))
        return mem

    def resource(self, name: str) -> Resource:
        """The shared resource called `name` (hbm<c>, pcie, p2p, pim<c>, flash<c>)."""
        found = self.resources.get(name)
        if found is None:
            raise EmulatorError(f"this machine has no resource {name!r}; it has "
                                f"{', '.join(self.resources)}")
        return found

    def count(self, name: str, nbytes: int) -> None:
        """Add `nbytes` to the bytes moved through memory or link `name`, in all and for the
        engine whose instruction runs."""
        self.traffic[name] += nbytes
        self.counting.bytes[name] += nbytes

    def engine(self, engine) -> EngineModel:
        """The model of stream engine `engine`, built on first use."""
        engine = isa.stream_engine(engine)
        model = self.engines.get(engine)
        if model is None:
            _need(self.config, ENGINE_SECTION[engine], f"engine {engine.name}")
            module, name = ENGINE_MODELS[engine]
            model = self.engines[engine] = getattr(importlib.import_module(module), name)(self)
        return model

    # -- running ---------------------------------------------------------------------------

    def load(self, programs: dict) -> None:
        """Decode each engine's program (a list of words) once."""
        with _no_cyclic_gc():
            for engine, words in programs.items():
                model = self.engine(engine)
                self.streams[model.engine] = Stream(model, decode_program(words))

    def run(self, programs: dict | None = None) -> int:
        """Run the loaded streams (and `programs`, engine -> words) to their HALTs; return the
        picosecond at which the last one ends."""
        if programs:
            self.load(programs)
        with _no_cyclic_gc():
            return self._run()

    def _run(self) -> int:
        tokens = {(src, dst): deque() for src in self.streams for dst in self.streams}
        active = sorted(self.streams.items())  # ties go to the lower engine id
        while active:
            best, best_ps = None, None
            for engine, st in active:
                ps = st.ready_ps
                if st.kinds[st.pc] == _POP:
                    queue = tokens.get((st.program[st.pc].fields["src"], engine))
                    if not queue:
                        continue
                    ps = max(ps, queue[0])
                if best_ps is None or ps < best_ps:
                    best, best_ps = (engine, st), ps
            if best is None:
                raise EmulatorError(self._deadlock(active))
            engine, st = best
            if self._step(engine, st, best_ps, tokens):
                active.remove(best)
        self.end_ps = max((st.ready_ps for st in self.streams.values()), default=0)
        return self.end_ps

    def _step(self, engine, st: Stream, start_ps: int, tokens: dict) -> bool:
        """Execute the next instruction of `st` from `start_ps`; True when the stream halts."""
        model, pc = st.model, st.pc
        ins, kind = st.program[pc], st.kinds[pc]
        start = model.clock.cycle_at(start_ps)
        stats = model.stats
        if kind == _OP:
            model.index = pc
            self.counting = stats
            try:
                end = model.execute(ins, start)
            except ValueError as exc:
                raise EmulatorError(f"{model.name}[{pc}] `{ins.text}`: {exc}") from None
        elif kind == _POP:
            tokens[(ins.fields["src"], engine)].popleft()
            end = start + timing.POP_CYCLES
        elif kind == _PUSH:
            dst = ins.fields["dst"]
            if dst not in self.streams:
                raise EmulatorError(f"{model.name}[{pc}] `{ins.text}`: no {dst.name} stream "
                                    f"runs, so the token could never be taken; give "
                                    f"{dst.name} a program or drop the PUSH")
            end = start + timing.PUSH_CYCLES
            tokens[(engine, dst)].append(model.clock.edge(end))
        else:
            end = start + timing.CTRL_CYCLES[ins.name]
        stats.instructions += 1
        stats.stall_dep += start - st.ready
        stats.occupied += end - start
        st.starts.append(start)
        st.ends.append(end)
        st.ready = end
        st.ready_ps = model.clock.edge(end)
        st.pc = pc + 1
        return kind == _HALT

    def _deadlock(self, active) -> str:
        lines = [f"  {st.model.name}[{st.pc}] `{st.program[st.pc].text}`" for _, st in active]
        return ("deadlock: every running engine waits on a POP whose token never comes:\n"
                + "\n".join(lines) + "\nadd the matching PUSH or remove the POP")
