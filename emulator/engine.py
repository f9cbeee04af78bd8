"""What every engine model is built from: clocks, memories, shared resources and the base class.

Time is kept in exact integers. The global base is the picosecond; each engine counts cycles of
its own clock, and cycle `c` of a clock at `f` MHz begins at `ceil(c * 10**6 / f)` ps (the
frequency is held in whole kHz, so a 225 MHz clock's edges never drift). Engines compute in
their own cycles and meet each other only in picoseconds: at SYNC tokens and at the shared
`Resource`s (HBM channels, PCIe, P2P, PIM channel buses, flash channels).

An engine model subclasses `EngineModel` and implements `execute`; the scheduler in
`trimem.emulator.machine` calls it once per instruction, in stream order, with the first cycle
at which the instruction may start (the previous one has ended and its SYNC tokens are in).
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from trimem import isa

PS_PER_US = 10**6
"""Picoseconds, the global time base, per microsecond."""
_PS_KHZ = 10**9
"""ps per cycle = _PS_KHZ / kHz."""
CHUNK_BYTES = 1 << 20
"""Memories allocate in chunks this big, on first write, so a huge HBM costs nothing unwritten."""


class EmulatorError(ValueError):
    """A program that cannot run as written; the scheduler adds engine, index and disassembly."""


class Clock:
    """An engine clock: converts between its cycle numbers and global picoseconds, exactly."""

    def __init__(self, mhz):
        if isinstance(mhz, bool) or not isinstance(mhz, (int, float)) or round(mhz * 1000) < 1:
            raise EmulatorError(f"clock of {mhz!r} MHz is not a positive number of kHz")
        self.mhz = mhz
        self.khz = round(mhz * 1000)

    def edge(self, cycle: int) -> int:
        """The picosecond at which `cycle` begins."""
        return -(-cycle * _PS_KHZ // self.khz)

    def cycle_at(self, ps: int) -> int:
        """The first cycle that begins at or after picosecond `ps`."""
        cycle = ps * self.khz // _PS_KHZ
        return cycle if self.edge(cycle) >= ps else cycle + 1


class Memory:
    """A named byte space, allocated lazily in `CHUNK_BYTES` chunks; unwritten bytes read 0.

    `capacity` None means unbounded (host DRAM). Every access is bounds-checked, and the error
    names the space, the address, the size and the capacity.
    """

    def __init__(self, name: str, capacity: int | None):
        self.name = name
        self.capacity = capacity
        self.chunks: dict[int, np.ndarray] = {}
        self.derived: dict = {}
        """Values engines computed from this memory's bytes (unpacked PIM weights), kept until
        the next write; the memory outlives machines, so later runs reuse them."""

    def check(self, addr: int, nbytes: int) -> None:
        """Raise EmulatorError unless [addr, addr + nbytes) lies inside the space."""
        if addr < 0 or nbytes < 0 or (self.capacity is not None
                                      and addr + nbytes > self.capacity):
            raise EmulatorError(f"{self.name} access of {nbytes} bytes at {addr:#x} is out of "
                                f"bounds: {self.name} holds {self.capacity} bytes")

    def _spans(self, addr: int, nbytes: int):
        """(chunk index, offset in chunk, offset in the access, length) pieces of an access."""
        done = 0
        while done < nbytes:
            index, offset = divmod(addr + done, CHUNK_BYTES)
            length = min(CHUNK_BYTES - offset, nbytes - done)
            yield index, offset, done, length
            done += length

    def written(self, addr: int, nbytes: int) -> bool:
        """True if any chunk under [addr, addr + nbytes) was ever written."""
        first, last = addr // CHUNK_BYTES, (addr + max(nbytes, 1) - 1) // CHUNK_BYTES
        return any(i in self.chunks for i in range(first, last + 1))

    def read(self, addr: int, nbytes: int) -> np.ndarray:
        """A copy of `nbytes` bytes at `addr` as a uint8 array."""
        self.check(addr, nbytes)
        out = np.zeros(nbytes, np.uint8)
        for index, offset, at, length in self._spans(addr, nbytes):
            chunk = self.chunks.get(index)
            if chunk is not None:
                out[at:at + length] = chunk[offset:offset + length]
        return out

    def gather(self, addrs, nbytes: int) -> np.ndarray:
        """Copies of `nbytes` bytes at each of `addrs`, as uint8 [len(addrs), nbytes]; a range
        inside one chunk is a slice of it, so many small reads cost one copy each."""
        addrs = [int(a) for a in addrs]
        out = np.zeros((len(addrs), nbytes), np.uint8)
        for row, addr in zip(out, addrs):
            self.check(addr, nbytes)
            index, offset = divmod(addr, CHUNK_BYTES)
            if offset + nbytes <= CHUNK_BYTES:
                chunk = self.chunks.get(index)
                if chunk is not None:
                    row[:] = chunk[offset:offset + nbytes]
            else:
                row[:] = self.read(addr, nbytes)
        return out

    def write(self, addr: int, data) -> None:
        """Store the bytes of `data` (bytes or any numpy array, taken as raw bytes) at `addr`."""
        data = np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray)) \
            else np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        self.check(addr, data.size)
        self.derived.clear()
        for index, offset, at, length in self._spans(addr, data.size):
            chunk = self.chunks.get(index)
            if chunk is None:
                chunk = self.chunks[index] = np.zeros(CHUNK_BYTES, np.uint8)
            chunk[offset:offset + length] = data[at:at + length]

    def read_array(self, addr: int, dtype, shape) -> np.ndarray:
        """An array of `shape` and little-endian `dtype` read from `addr`."""
        dtype = np.dtype(dtype).newbyteorder("<")
        count = int(np.prod(shape, dtype=np.int64))
        return self.read(addr, count * dtype.itemsize).view(dtype).reshape(shape)

    def write_array(self, addr: int, array) -> None:
        """Store `array` at `addr` in little-endian byte order."""
        array = np.asarray(array)
        self.write(addr, array.astype(array.dtype.newbyteorder("<"), copy=False))


class Resource:
    """A shared timed resource (HBM channel, PCIe, P2P, PIM channel bus, flash channel).

    One user at a time, first come first served in the scheduler's order: a reservation starts
    when both the requester and the resource are free, and the resource stays held until the
    reservation ends. It knows no bandwidth: users turn bytes into durations themselves, and
    the resource counts busy time, bytes and the holds themselves (for the trace).
    """

    def __init__(self, name: str):
        self.name = name
        self.free_ps = 0
        self.busy_ps = 0
        self.bytes = 0
        self.holds: list[tuple[int, int, str, int]] = []
        """(start ps, duration ps, engine name, instruction index) of every reservation."""

    def reserve(self, earliest_ps: int, duration_ps: int, nbytes: int = 0,
                owner: tuple[str, int] = ("", -1)) -> int:
        """Hold the resource for `duration_ps` from the first moment >= `earliest_ps` that it
        is free; return that start."""
        start = max(earliest_ps, self.free_ps)
        self.hold(start, duration_ps, nbytes, owner)
        return start

    def hold(self, start_ps: int, duration_ps: int, nbytes: int = 0,
             owner: tuple[str, int] = ("", -1)) -> None:
        """Hold the resource over [start_ps, start_ps + duration_ps); it must be free then."""
        if start_ps < self.free_ps:
            raise EmulatorError(f"{self.name} is held until {self.free_ps} ps; a hold cannot "
                                f"start at {start_ps} ps")
        self.free_ps = start_ps + duration_ps
        self.busy_ps += duration_ps
        self.bytes += nbytes
        self.holds.append((start_ps, duration_ps, owner[0], owner[1]))


class EngineStats:
    """What one engine did: cycles by cause, instructions, MACs, bytes, energy and named
    counters (an engine's own events, such as row hits or pages read).

    `occupied` counts cycles from each instruction's start to its end; `stall_mem` is the part
    of it spent waiting for shared resources, so busy = occupied - stall_mem. `stall_dep`
    counts cycles spent waiting for SYNC tokens before an instruction could start.
    """

    def __init__(self):
        self.instructions = 0
        self.occupied = 0
        self.stall_dep = 0
        self.stall_mem = 0
        self.macs = 0
        self.energy_pj = 0.0
        self.bytes: Counter = Counter()
        """Bytes this engine moved per memory and link (`Machine.count`)."""
        self.counters: Counter = Counter()

    @property
    def busy(self) -> int:
        return self.occupied - self.stall_mem


class EngineModel:
    """Base of the engine models: one in-order instruction stream on one clock.

    A subclass sets `engine` (an `isa.Engine`), builds itself as `Cls(machine)` and calls
    `super().__init__(machine, clock_mhz)`, and implements `execute`. From the machine it uses:
    `machine.config` (the `trimem.config.HardwareConfig`), `machine.memory(space)` (a `Memory`
    for an `isa.Space`), `machine.resource(name)` (a shared `Resource`; names in
    docs/emulator.md), `machine.timing_only` (skip all data work) and
    `machine.count(name, nbytes)` (bytes moved per memory or link).

    Shared resources by name: `hbm<c>` (HBM channel c), `pcie` (host link), `p2p` (FPGA <-> CSD
    peer-to-peer link), `pim<c>` (PIM channel c's bus; the very object `hbm<c>` when
    `pim.shared_with_hbm`), `flash<c>` (CSD flash channel c).
    """

    engine: isa.Engine

    def __init__(self, machine, clock_mhz):
        self.machine = machine
        self.clock = Clock(clock_mhz)
        self.name = self.engine.name
        self.stats = EngineStats()
        self.index = -1
        """Index of the instruction being executed, set by the scheduler."""

    def execute(self, ins: isa.Decoded, start: int) -> int:
        """Run `ins`, which may start at cycle `start` of this engine's clock, and return the
        cycle at which it ends.

        Add MACs, energy, counters and memory stalls to `self.stats` and bytes to
        `machine.count`; do the functional work on `machine.memory(...)` unless
        `machine.timing_only`. Raise EmulatorError (or ValueError) for an instruction that
        cannot run; the scheduler adds this engine's name, the index and the disassembly.
        """
        raise NotImplementedError(f"{type(self).__name__} executes no {ins.name}")

    def occupy(self, loads, earliest: int, cycles: int) -> int:
        """Hold every resource in `loads` ((Resource, bytes) pairs) together for `cycles` of
        this clock from the first cycle >= `earliest` at which all are free; count the wait as
        a memory stall and return the first held cycle."""
        clock = self.clock
        start_ps = max(clock.edge(earliest), max((r.free_ps for r, _ in loads), default=0))
        start = clock.cycle_at(start_ps)
        begin = clock.edge(start)
        duration = clock.edge(start + cycles) - begin
        end, hold = begin + duration, (begin, duration, self.name, self.index)
        for resource, nbytes in loads:  # all are free at `begin`: Resource.hold, unchecked
            resource.free_ps = end
            resource.busy_ps += duration
            resource.bytes += nbytes
            resource.holds.append(hold)
        self.stats.stall_mem += start - earliest
        return start
