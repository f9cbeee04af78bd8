"""How the batched harness drives each HDL top: its streams' front ends, where each memory space
lives, and how bytes get in and out.

Programs and memory images are written behind the ports, into the design's own memories
(`Harness.mem_write`): a front end's `imem`, a PIM bank's `array`, the byte lanes of a
`trimem.hdl.system.ByteRam`. The SRAM of a one-stream top is written through its host port
instead (a bundle `.hex` read in C++), and the PIM top's global and result buffers, which sit
outside it, are memory models at its ports. Every top has front ends whose `pc` and `halted`
are probed, which gives each instruction's issue cycle.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from trimem import isa
from trimem.sims import harness
from trimem.sims.testbench import PROGRAM_DEPTH

FETCH_CYCLES = 1
"""Cycles from the first cycle `run` is high to a front end's first issue: the cycle with
`run` primes the front end, and its instruction memory already presents word 0."""
SEEN = FETCH_CYCLES + 1
"""A front end's `pc` or `halted` changes on the edge that ends an issue cycle, so the run's
sample of cycle `c` shows the issue of cycle `c - 1`; the streams' cycle 0 is the run's cycle
FETCH_CYCLES."""


def hex_bytes(path, width: int, nbytes: int) -> bytes:
    """The `nbytes` bytes of a bundle's `$readmemh` image of `width`-byte lines."""
    from trimem.hdl.system import read_hex

    return read_hex(path, width, -(-nbytes // width) * width)[:nbytes]


class Top:
    """A top as the harness drives it (subclasses name the top, its streams and spaces)."""
    name: str
    frontends: dict
    """Stream engine -> path of its front end below the top."""
    spaces: tuple
    """Memory spaces the top holds."""

    def __init__(self, cfg):
        self.cfg = cfg

    def design_kwargs(self) -> dict:
        """Factory arguments of the build: room for PROGRAM_DEPTH words per stream."""
        return {"depth": PROGRAM_DEPTH}

    def attach(self, h: harness.Harness) -> None:
        """Memory models at the ports, where the top needs them."""

    def load_program(self, h: harness.Harness, engine, program) -> None:
        """Write `engine`'s stream (a bundle `.hex` path or 32-byte words) into its front
        end's instruction memory."""
        name = f"{self.frontends[isa.stream_engine(engine)]}.imem"
        if isinstance(program, (str, Path)):
            h.mem_write(name, 0, program, width=isa.WORD_BYTES)
        else:
            h.mem_write(name, 0, b"".join(bytes(w) for w in program))

    def write(self, h: harness.Harness, space: str, addr: int, data: bytes) -> None:
        """Write `data` at `addr` of memory space `space`."""
        raise NotImplementedError(f"{type(self).__name__} defines no memory writes")

    def write_hex(self, h: harness.Harness, space: str, addr: int, path, width: int,
                  nbytes: int) -> None:
        """Write a bundle's `$readmemh` image of `nbytes` bytes at `addr` of `space`."""
        self.write(h, space, addr, hex_bytes(path, width, nbytes))

    def read(self, h: harness.Harness, space: str, addr: int, nbytes: int) -> bytes:
        """Read `nbytes` at `addr` of memory space `space`."""
        raise NotImplementedError(f"{type(self).__name__} defines no memory reads")

    def cycles(self, h: harness.Harness, engine) -> int:
        """The `cycles` counter of `engine`'s front end."""
        return h.peek("cycles")

    def watch(self) -> list:
        """The probes whose changes give every issue cycle."""
        return [f"{fe}.{signal}" for fe in self.frontends.values() for signal in ("pc", "halted")]

    def issues(self, events: list) -> dict:
        """Engine name -> issue cycle of every instruction (HALT included), counted from the
        streams' cycle 0, from a run's logged changes."""
        out = {}
        for engine, fe in self.frontends.items():
            out[engine.name] = [c - SEEN for c, name, v in events
                                if name == f"{fe}.pc" or (name == f"{fe}.halted" and v)]
        return out


class SramTop(Top):
    """A one-stream FPGA top over the SRAM (`trimem.hdl.frontend.SramTop`): the SRAM through
    its host ports."""
    spaces = ("SRAM",)

    def write(self, h, space, addr, data):
        h.write("host_wr", addr, data)

    def write_hex(self, h, space, addr, path, width, nbytes):
        """The image read and written by the harness in C++, through the host port."""
        h.write_hex("host_wr", addr, path, width)

    def read(self, h, space, addr, nbytes):
        return h.read("host_rd", addr, nbytes)


class MxuTop(SramTop):
    name, frontends = "mxu", {isa.Engine.MXU: "frontend"}


class VpuTop(SramTop):
    name, frontends = "vpu", {isa.Engine.VPU: "frontend"}


def write_banks(h: harness.Harness, pim, prefix: str, addr: int, data: bytes) -> None:
    """PIMDRAM bytes into the banks' arrays (bank-major inside a channel, docs/contract.md)."""
    while data:
        unit, offset = divmod(addr, pim.bank_bytes)
        channel, bank = divmod(unit, pim.banks_per_channel)
        take = min(len(data), pim.bank_bytes - offset)
        h.mem_write(f"{prefix}channel{channel}.bank{bank}.array", offset, data[:take])
        addr, data = addr + take, data[take:]


class PimTop(Top):
    """The PIM top (`trimem.hdl.pim_top`): the banks behind their ports, the global buffer at
    every channel's two read ports and the result buffer at its write port as models."""
    name, frontends = "pim", {isa.Engine.PIM: "frontend"}
    spaces = ("GBUF", "PRES", "PIMDRAM")

    def attach(self, h):
        pim = self.cfg.pim
        self.gbuf, self.pres = h.model(pim.gbuf_total_bytes), h.model(pim.result_total_bytes)
        for c in range(pim.channels):
            base = -c * pim.gbuf_bytes % (1 << 64)
            h.attach_read(self.gbuf, f"gbuf{c}", base)
            h.attach_read(self.gbuf, f"scale{c}", base)
            h.attach_write(self.pres, f"pres{c}")

    def write(self, h, space, addr, data):
        if space == "GBUF":
            h.model_write(self.gbuf, addr, data)
        elif space == "PRES":
            h.model_write(self.pres, addr, data)
        else:
            write_banks(h, self.cfg.pim, "", addr, bytes(data))

    def read(self, h, space, addr, nbytes):
        if space == "GBUF":
            return h.model_read(self.gbuf, addr, nbytes)
        return h.model_read(self.pres, addr, nbytes)


class SystemTop(Top):
    """The `trimem-small` system (`trimem.hdl.system.TrimemSystem`): DMA, MXU, VPU, PIM and CSD
    streams, every memory a `ByteRam` (or PIM banks) inside it."""
    name = "system"
    frontends = {isa.Engine.DMA: "fe_dma", isa.Engine.MXU: "fe_mxu", isa.Engine.VPU: "fe_vpu",
                 isa.Engine.PIM: "pim.frontend", isa.Engine.CSD: "csd.frontend"}
    spaces = ("HOST", "HBM", "SRAM", "GBUF", "PRES", "PIMDRAM", "CDRAM", "FLASH")
    rams = {"HOST": "host", "HBM": "hbm", "SRAM": "sram", "GBUF": "gbuf", "PRES": "pres",
            "CDRAM": "cdram", "FLASH": "flash.ram"}
    """Space -> path of its ByteRam."""

    def design_kwargs(self):
        """Every stream a placeholder of PROGRAM_DEPTH HALTs, so its instruction memory has
        room for the programs written over it."""
        halts = [isa.encode("HALT")] * PROGRAM_DEPTH
        return {"programs": {e.name.lower(): halts for e in self.frontends}}

    def cycles(self, h, engine):
        return h.peek(f"cycles_{isa.stream_engine(engine).name.lower()}")

    def write(self, h, space, addr, data):
        from trimem.hdl.system import modelled_sizes

        size = modelled_sizes(self.cfg)[space]
        if addr + len(data) > size:
            raise ValueError(f"{len(data)} bytes at {space} {addr:#x} end past the {size} bytes "
                             f"of {space} the system top models; compile a smaller model or "
                             f"build the top with more of {space} (TrimemSystem sizes)")
        if space == "PIMDRAM":
            write_banks(h, self.cfg.pim, "pim.", addr, bytes(data))
            return
        ram_access(h, self.rams[space], addr, np.frombuffer(bytes(data), np.uint8))

    def read(self, h, space, addr, nbytes):
        return ram_access(h, self.rams[space], addr, np.zeros(nbytes, np.uint8),
                          read=True).tobytes()


def ram_access(h: harness.Harness, ram: str, addr: int, data: np.ndarray, *,
               read: bool = False) -> np.ndarray:
    """Write (or read into) `data` at byte `addr` of `ByteRam` `ram`, whose byte `a` lives in
    lane `a % lanes` at row `a // lanes`."""
    lanes = sum(name.startswith(f"{ram}.lane") for name in h.memories)
    at = np.arange(addr, addr + data.size)
    for j in range(lanes):
        mine = np.flatnonzero(at % lanes == j)
        if not mine.size:
            continue
        row = int(at[mine[0]]) // lanes
        if read:
            data[mine] = np.frombuffer(h.mem_read(f"{ram}.lane{j}", row, mine.size), np.uint8)
        else:
            h.mem_write(f"{ram}.lane{j}", row, data[mine].tobytes())
    return data


TOPS = (MxuTop, VpuTop, PimTop, SystemTop)
"""The tops an entry can run on, smallest first."""


def choose(programs: dict, spaces: set):
    """The class of the smallest top that runs every stream of `programs` and holds every
    space of `spaces`, else None."""
    engines = {isa.stream_engine(e) for e in programs}
    for top in TOPS:
        if engines <= set(top.frontends) and spaces <= set(top.spaces):
            return top
    return None
