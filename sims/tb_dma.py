"""Testbench of the DMA top: DMA.COPY between every pair of spaces the engine runs, against the
emulator.

Every space the top models (`trimem.hdl.dma_top.ram_sizes`) starts with random bytes. A case
copies once between every pair of spaces in a random order, then runs the edge cases: 1-byte
copies, multi-chunk copies, HBM ranges crossing channel boundaries, overlapping HBM -> HBM
copies upwards and downwards, and copies that read what the copy before just wrote; then
random copies. Addresses and lengths are unaligned. Every copy stays within the engine's
bound (`DmaEngine`): a copy whose chunks cannot all move by its end is left out, and one that
could only move them without the cycle it waits for the previous copy's last write gets a NOP
before it. Every destination and every modelled byte is compared, and every issue cycle
exactly.

The testbench loads the program through `i_load` and each space through the host write port
(`host_space` selects it), runs to HALT and reads every space back through the host read port.
"""
from __future__ import annotations

from typing import NamedTuple

import cocotb
import numpy as np

from trimem import isa
from trimem.hdl.dma_top import DMA_BYTES, ram_sizes
from trimem.sims import runner, testbench
from trimem.sims.diff import Region

REFUSED = {("HOST", "HOST"), ("SRAM", "SRAM")}
"""Pairs the engine does not run: HOST -> HOST never reaches the accelerator, SRAM -> SRAM
loads no link or channel."""
RANDOM_COPIES = 16
"""Random copies after the pairs and edge cases."""


class Copy(NamedTuple):
    """One DMA.COPY (space names, byte addresses)."""
    src: str
    src_addr: int
    dst: str
    dst_addr: int
    nbytes: int

    def text(self) -> str:
        return (f"DMA.COPY src_space={self.src} src_addr={self.src_addr:#x} "
                f"dst_space={self.dst} dst_addr={self.dst_addr:#x} nbytes={self.nbytes}")


def chunks(nbytes: int) -> int:
    """Cycles the engine reads a copy of `nbytes` (one port width per cycle)."""
    return -(-nbytes // DMA_BYTES)


class Draw:
    """Random copies within the modelled bytes of each space."""

    def __init__(self, rng, sizes: dict):
        self.rng, self.sizes = rng, sizes

    def length(self, most: int) -> int:
        """A byte count up to `most`: one byte, up to a chunk, or up to `most` (mostly
        several chunks), each a third of the time."""
        kind = int(self.rng.integers(3))
        top = (1, min(most, DMA_BYTES), most)[kind]
        return int(self.rng.integers(1, top + 1))

    def addr(self, space: str, nbytes: int) -> int:
        return int(self.rng.integers(0, self.sizes[space] - nbytes + 1))

    def copy(self, src: str, dst: str, nbytes: int | None = None) -> Copy:
        most = min(self.sizes[src], self.sizes[dst])
        nbytes = self.length(most) if nbytes is None else min(nbytes, most)
        return Copy(src, self.addr(src, nbytes), dst, self.addr(dst, nbytes), nbytes)


def pairs(sizes: dict) -> list:
    """Every (src, dst) of the modelled spaces the engine runs."""
    return [(s, d) for s in sizes for d in sizes if (s, d) not in REFUSED]


def edge_copies(draw: Draw, cfg) -> list:
    """1-byte and multi-chunk copies, HBM ranges over channel boundaries, overlapping HBM
    copies both ways, and copies reading the bytes the copy before wrote."""
    sizes, step = draw.sizes, cfg.fpga.hbm_interleave_bytes
    out = [draw.copy("HBM", "SRAM", 1), draw.copy("SRAM", "HOST", 1),
           draw.copy("HOST", "HBM", 3 * DMA_BYTES + 5),
           draw.copy("CDRAM", "SRAM", 5 * DMA_BYTES - 3)]
    span = min(sizes["HBM"] // 2, step + 2 * DMA_BYTES)
    at = step - DMA_BYTES // 2 + int(draw.rng.integers(1, DMA_BYTES))
    for first in (at, at + step):                     # from channel 0, then from channel 1
        addr = first % (sizes["HBM"] - span)
        out += [Copy("HBM", addr, "SRAM", draw.addr("SRAM", span), span),
                Copy("SRAM", draw.addr("SRAM", span), "HBM", addr, span)]
    n = 3 * DMA_BYTES + 7
    low = draw.addr("HBM", n + DMA_BYTES)
    out += [Copy("HBM", low, "HBM", low + 29, n), Copy("HBM", low + 41, "HBM", low + 3, n)]
    for space in sizes:
        if space == "SRAM":
            continue
        wrote = draw.copy("SRAM", space, 4)
        back = min(max(0, wrote.dst_addr - 2), sizes[space] - 8)
        out += [wrote, Copy(space, back, "SRAM", draw.addr("SRAM", 8), 8)]
    out.append(Copy("SRAM", out[-1].dst_addr + 1, "HBM", draw.addr("HBM", 5), 5))
    return out


def cycles(cfg, copies: list) -> list:
    """Cycles from each copy's issue to the next's when they run back to back on the emulator:
    the copy's latencies and stream, as no copy waits on another's hold."""
    from trimem.emulator.machine import Machine

    machine = Machine(cfg)
    machine.run({isa.Engine.DMA: [isa.assemble(c.text(), "DMA")[0] for c in copies]
                 + isa.assemble("HALT")})
    return np.diff(machine.streams[isa.Engine.DMA].starts).tolist()


def schedule(copies: list, spans: list) -> list:
    """(program lines, the copies in it): copies within the engine's bound, a NOP before one
    that fits only without waiting a cycle for the previous copy's last write into its
    source."""
    program, kept, wrote = [], [], None   # wrote: the space of a last write in the end cycle
    for copy, span in zip(copies, spans):
        need = chunks(copy.nbytes)
        if need > span:
            continue
        stall = wrote == copy.src
        if stall and need + 1 > span:
            program.append("NOP")
            stall = False
        program.append(copy.text())
        kept.append((len(program) - 1, copy))
        wrote = copy.dst if need + stall == span else None
    return program, kept


def make_case(seed: int, cfg) -> dict:
    """The copies, random images of every modelled space, the emulator's bytes and issue
    cycles, and the modelled sizes the testbench reads back."""
    rng = np.random.default_rng(seed)
    sizes = ram_sizes(cfg)
    draw = Draw(rng, sizes)
    every = pairs(sizes)
    copies = [draw.copy(*every[i]) for i in rng.permutation(len(every))]
    copies += edge_copies(draw, cfg)
    copies += [draw.copy(*every[int(rng.integers(len(every)))]) for _ in range(RANDOM_COPIES)]
    program, kept = schedule(copies, cycles(cfg, copies))
    images = [(space, 0, rng.integers(0, 256, size, np.uint8).tobytes())
              for space, size in sizes.items()]
    regions = [Region(f"copy{i}", c.dst, c.dst_addr, "u1", (c.nbytes,), ("DMA", i))
               for i, c in kept]
    regions += [Region(space, space, 0, "u1", (size,)) for space, size in sizes.items()]
    case = testbench.emulator_case(cfg, isa.Engine.DMA, program, images, regions)
    case["sizes"] = sizes
    return case


@cocotb.test()
async def dma_matches_emulator(dut):
    """Every destination byte and every modelled byte exact, every issue cycle exact."""
    case = runner.load_case()
    for name in ("run", "o_push__ready", "o_pop__ready", "host_wr__en", "i_load__valid"):
        getattr(dut, name).value = 0
    await testbench.start(dut)
    await testbench.load_program(dut, [bytes.fromhex(w) for w in case["program"]])
    for space, addr, data in case["images"]:
        dut.host_space.value = isa.Space[space]
        await testbench.write_sram(dut, addr, bytes.fromhex(data))
    issues = await testbench.run_to_halt(dut, testbench.cycle_limit(case["cycles"]))
    memory = {}
    for space, size in case["sizes"].items():
        dut.host_space.value = isa.Space[space]
        memory[space] = await testbench.read_sram(dut, 0, size)
    got = {r["name"]: memory[r["space"]][r["addr"]:r["addr"] + Region.from_dict(r).nbytes]
           for r in case["regions"]}
    testbench.finish(case, got, issues, int(dut.cycles.value))
