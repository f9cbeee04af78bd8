"""What every cocotb testbench shares: the component table, cases built on the emulator, and
the coroutines that drive an instruction top.

A testbench module (`tb_<component>.py`) has two halves. `make_case(seed, cfg)` runs in the
caller's process: it draws randomized and edge-case stimulus, runs the emulator's model of
the block on it, and returns a JSON-able case holding the stimulus, the expected outputs and
the expected cycle counts. Its `@cocotb.test()` runs in the simulator: it reads the case
(`runner.load_case`), drives the RTL, compares every output bit for bit and every issue cycle
exactly, and writes a report (`runner.write_report`) whose `problem` is the first difference.

Cases of instruction tops come from `emulator_case` and are checked by `check_case`; the
tops that run one FPGA stream against the SRAM (`trimem.hdl.frontend.SramTop`: "mxu", "vpu")
share `check_sram_top` (RTL side).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trimem import isa
from trimem.config import load_config
from trimem.sims import diff, runner

CLOCK_NS = 10
"""Simulated clock period: the numbers are in cycles, so any period does."""
PROGRAM_DEPTH = 1024
"""Instruction memory of the one-stream tops built for testbenches and co-simulation, in
words: the cases and single-layer bundles stay shorter, and both share one Verilog."""


@dataclass(frozen=True)
class Component:
    """A testbench: the design it drives (a top or component of `trimem.hdl.build`, with the
    factory's arguments) and its cocotb module."""
    name: str
    top: str
    module: str
    doc: str
    kwargs: dict = field(default_factory=dict)


COMPONENTS = {c.name: c for c in (
    Component("dsp_chain", "chain_array", "trimem.sims.tb_dsp_chain",
              "C sparse DSP chains with N:M select and requant, fed step by step"),
    Component("mxu", "mxu", "trimem.sims.tb_mxu",
              "MXU.GEMM streams on the MXU top (front end, engine, SRAM)",
              {"depth": PROGRAM_DEPTH}),
    Component("vpu", "vpu", "trimem.sims.tb_vpu",
              "VPU streams (ADD, SILUMUL, ROPE, QUANT) on the VPU top", {"depth": PROGRAM_DEPTH}),
    Component("pim", "pim", "trimem.sims.tb_pim",
              "PIM.GEMV streams on the PIM top (controller, banks, refresh)",
              {"depth": PROGRAM_DEPTH}),
    Component("csd", "csd", "trimem.sims.tb_csd",
              "CSD.ATTN streams on the CSD top (attention engine, flash pages)",
              {"depth": PROGRAM_DEPTH}),
    Component("dma", "dma", "trimem.sims.tb_dma",
              "DMA.COPY streams between every pair of spaces on the DMA top",
              {"depth": PROGRAM_DEPTH}),
)}
"""Testbenches by component name (`trimem sim COMPONENT`)."""


def component(name: str) -> Component:
    """The testbench of `name`; ValueError listing the components when unknown."""
    found = COMPONENTS.get(name)
    if found is None:
        raise ValueError(f"no testbench for component {name!r}; choose one of "
                         f"{', '.join(COMPONENTS)}")
    return found


def run_component(name: str, *, seed: int = 0, cfg="trimem-small", waves: bool = False,
                  workdir=None) -> dict:
    """Build (cached) and run the testbench of component `name` with stimulus from `seed`;
    return its report. runner.SimError with the first difference when the RTL and the
    emulator disagree."""
    comp = component(name)
    cfg = load_config(cfg)
    tb = importlib.import_module(comp.module)
    case = tb.make_case(seed, cfg)
    design = runner.design(comp.top, cfg, **comp.kwargs)
    workdir = Path(workdir or runner.cache_dir() / "runs" / f"{name}-{seed}")
    return runner.run_cocotb(design, comp.module, case, workdir, waves=waves, seed=seed)


# ---------------------------------------------------------------------------------------------
# Cases of instruction tops, expected from the emulator
# ---------------------------------------------------------------------------------------------

def emulator_case(cfg, engine, program: list, images: list, regions: list) -> dict:
    """Run `program` (assembly lines or 32-byte words, HALT added when missing) of stream
    `engine` on the emulator with `images` ((space name, addr, bytes)) placed, and return the
    case: stimulus, expected `regions` (diff.Region) and the issue cycle of every
    instruction."""
    from trimem.emulator.machine import Machine

    engine = isa.stream_engine(engine)
    words = [isa.assemble(w, engine)[0] if isinstance(w, str) else bytes(w) for w in program]
    if not words or isa.decode(words[-1]).name != "HALT":
        words.append(isa.assemble("HALT")[0])
    if len(words) > PROGRAM_DEPTH:
        raise ValueError(f"the program has {len(words)} words but testbench tops hold "
                         f"{PROGRAM_DEPTH}; split the case")
    machine = Machine(load_config(cfg))
    for space, addr, data in images:
        machine.memory(space).write(addr, np.frombuffer(bytes(data), np.uint8))
    machine.run({engine: words})
    stream = machine.streams[engine]
    return {"engine": engine.name, "program": [w.hex() for w in words],
            "images": [[space, int(a), bytes(d).hex()] for space, a, d in images],
            "regions": [r.to_dict() for r in regions],
            "expected": {r.name: bytes(machine.memory(r.space).read(r.addr, r.nbytes)).hex()
                         for r in regions},
            "issues": [int(c) for c in stream.starts], "cycles": int(stream.ends[-1]),
            "counters": {k: int(v) for k, v in machine.engine(engine).stats.counters.items()}}


def check_case(case: dict, got: dict, issues: list, cycles: int) -> tuple:
    """(timing, data): the first difference in issue cycles or stream length, and the first
    differing output element, between a top's run (`got`: region name -> bytes, the issue
    cycles, the `cycles` counter) and the emulator's `case`; None where they agree."""
    engine = case["engine"]
    programs = {engine: [bytes.fromhex(w) for w in case["program"]]}
    regions = [diff.Region.from_dict(r) for r in case["regions"]]
    timing = (diff.diff_issues({engine: issues}, {engine: case["issues"]}, programs)
              or diff.diff_totals({engine: cycles}, {engine: case["cycles"]}))
    data = diff.diff_tensors({r.name: r.view(got[r.name]) for r in regions if r.name in got},
                             {r.name: r.view(bytes.fromhex(case["expected"][r.name]))
                              for r in regions},
                             writers={r.name: r.writer for r in regions}, programs=programs)
    return timing, data


def finish(case: dict, got: dict, issues: list, cycles: int, **extra) -> None:
    """Check a top's run against `case`, write the report (`bit_exact`, `cycle_exact`, the
    cycles, `problem`: the first difference, timing first) and fail on any difference."""
    timing, data = check_case(case, got, issues, cycles)
    found = timing or data
    runner.write_report({"passed": found is None, "bit_exact": data is None,
                         "cycle_exact": timing is None, "cycles": cycles,
                         "emulator_cycles": case["cycles"],
                         "instructions": len(case["program"]),
                         "problem": "" if found is None else found.text(),
                         "divergence": None if found is None else found.to_dict(), **extra})
    assert found is None, found.text()


# ---------------------------------------------------------------------------------------------
# Driving an SRAM instruction top (inside the simulator)
# ---------------------------------------------------------------------------------------------

async def start(dut) -> None:
    """Start the clock and reset the design."""
    from cocotb.clock import Clock

    Clock(dut.clk, CLOCK_NS, unit="ns").start()
    await reset(dut)


async def reset(dut) -> None:
    """Hold the design in reset for two cycles."""
    from cocotb.triggers import RisingEdge

    dut.rst.value = 1
    for _ in range(2):
        await RisingEdge(dut.clk)
    dut.rst.value = 0
    await RisingEdge(dut.clk)


async def load_program(dut, words: list) -> None:
    """Write the instruction memory through `i_load`, one word per cycle."""
    from cocotb.triggers import RisingEdge

    addr_bits = len(dut.i_load__payload) - isa.WORD_BITS
    for addr, word in enumerate(words):
        dut.i_load__payload.value = addr | int.from_bytes(word, "little") << addr_bits
        dut.i_load__valid.value = 1
        await RisingEdge(dut.clk)
    dut.i_load__valid.value = 0


async def write_sram(dut, addr: int, data: bytes) -> None:
    """Write `data` at `addr` through `host_wr`, a port width per cycle."""
    from cocotb.triggers import RisingEdge

    beat = len(dut.host_wr__data) // 8
    for at in range(0, len(data), beat):
        chunk = data[at:at + beat]
        dut.host_wr__addr.value = addr + at
        dut.host_wr__data.value = int.from_bytes(chunk.ljust(beat, b"\0"), "little")
        dut.host_wr__mask.value = (1 << len(chunk)) - 1
        dut.host_wr__en.value = 1
        await RisingEdge(dut.clk)
    dut.host_wr__en.value = 0


async def read_sram(dut, addr: int, nbytes: int) -> bytes:
    """Read `nbytes` from `addr` through `host_rd`: one address per cycle, each word read in
    the cycle after its address."""
    from cocotb.triggers import ReadOnly, RisingEdge

    out = bytearray()
    beat = len(dut.host_rd__data) // 8
    starts = list(range(addr, addr + nbytes, beat))
    dut.host_rd__addr.value = starts[0]
    await RisingEdge(dut.clk)
    for following in starts[1:] + [None]:
        if following is not None:
            dut.host_rd__addr.value = following
        await ReadOnly()
        out += int(dut.host_rd__data.value).to_bytes(beat, "little")
        await RisingEdge(dut.clk)
    return bytes(out[:nbytes])


async def watch_issues(dut, issues: list) -> None:
    """Append the simulation time of every instruction issue to `issues` (the front end's
    `pc` moves on the edge that ends an issue cycle; HALT issues when `halted` rises)."""
    pc = dut.frontend.pc
    while True:
        await pc.value_change
        issues.append(now())


def now() -> int:
    """Simulation time in ns."""
    from cocotb.utils import get_sim_time

    return int(get_sim_time(unit="ns"))


def cycle_limit(expected: int) -> int:
    """Cycles a run may take before it is called hung: well past the emulator's `expected`."""
    return 4 * expected + 1000


async def run_to_halt(dut, limit: int) -> list:
    """Raise `run`, wait for `halted` (at most `limit` cycles), and return every
    instruction's issue cycle, counted from the first; fail when the top raises `error`."""
    import cocotb
    from cocotb.triggers import RisingEdge, with_timeout

    times: list = []
    watcher = cocotb.start_soon(watch_issues(dut, times))
    dut.run.value = 1
    await with_timeout(RisingEdge(dut.halted), limit * CLOCK_NS, "ns")
    times.append(now())
    watcher.cancel()
    dut.run.value = 0
    await RisingEdge(dut.clk)
    if int(dut.error.value):
        raise AssertionError("the top raised `error`: its front end or engine met a word it "
                             "cannot run")
    return [(t - times[0]) // CLOCK_NS for t in times]


async def run_sram_top(dut, case: dict) -> tuple[dict, list, int]:
    """Load `case` into an SRAM top, run it to HALT, and return the regions read back, the
    issue cycle of every instruction and the `cycles` counter."""
    for name in ("run", "o_push__ready", "o_pop__ready", "host_wr__en", "i_load__valid"):
        getattr(dut, name).value = 0
    await start(dut)
    await load_program(dut, [bytes.fromhex(w) for w in case["program"]])
    for _, addr, data in case["images"]:
        await write_sram(dut, addr, bytes.fromhex(data))
    issues = await run_to_halt(dut, cycle_limit(case["cycles"]))
    got = {}
    for r in case["regions"]:
        nbytes = int(np.prod(r["shape"])) * np.dtype(r["dtype"]).itemsize
        got[r["name"]] = await read_sram(dut, r["addr"], nbytes)
    return got, issues, int(dut.cycles.value)


async def check_sram_top(dut) -> None:
    """The whole testbench of an SRAM top: run the case, compare, report, fail on a
    difference."""
    case = runner.load_case()
    got, issues, cycles = await run_sram_top(dut, case)
    finish(case, got, issues, cycles)
