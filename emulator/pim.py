"""The PIM engine: PIM.GEMV in the DRAM banks, all-bank MAC mode, with refresh.

Each channel controller expands a PIM.GEMV into DRAM commands under the constraint table of
`trimem.dram` (order and rules: docs/timing.md, "PIM"). Two models give the schedule:
`DramChannel`, the command-level reference the RTL controller reproduces, and
`trimem.dram.gemv_channel`, the closed form the emulator runs by default; tests prove them
equal cycle for cycle. Set `PimEngine.command_level` before a run to use the reference.

With `pim.dual_row_buffer` false (blocked mode, AiM) a GEMV holds the bus Resource of each
channel it uses (the HBM channel itself when `pim.shared_with_hbm`) from start to end, so FPGA
traffic to those channels waits; with dual row buffers (NeuPIMs) it holds nothing and normal
reads and writes proceed while the PIM row buffers compute.
"""
from __future__ import annotations

import copy
from collections import deque
from itertools import chain

import numpy as np

from trimem import dram, isa, layout, numerics
from trimem.dram import COMMAND_GAP, COUNTERS, FOREVER, NEVER, Cmd, Scope
from trimem.emulator import weights
from trimem.emulator.engine import EmulatorError, EngineModel

GBUF, PRES, PIMDRAM = isa.Space.GBUF, isa.Space.PRES, isa.Space.PIMDRAM
FX_BYTES = 4
"""An fx output in PRES is int32 little-endian."""
_CLOSE = (None, None)
"""The request that ends an instruction: precharge whatever is open."""


class DramChannel:
    """Command-level reference model of one PIM channel and its controller.

    Each bank is a state machine, IDLE or ACTIVE with an open row. Requests ("MAC", row) and
    ("RES", None) are served in order; for each the controller picks the next command it needs
    (PREA if a bank holds another row, else ACT to the first closed bank in ACT order, else the
    column command) and issues it at the earliest cycle every row of the table allows, one
    command per cycle at most. Before each command it checks refresh: once the next refresh is
    due at or before that cycle, it precharges (if a row is open) and refreshes, each no earlier
    than the due cycle, and then serves the request again. A request that has issued an ACT is
    not preempted until its column command issues, so every request completes. `log` keeps
    (cycle, Cmd, bank) of every command (bank None for all-bank commands).
    """

    def __init__(self, pim):
        banks = pim.banks_per_channel
        self.banks = banks
        self.order = dram.act_order(pim)
        self.group_of = tuple(b // pim.banks_per_group for b in range(banks))
        self.row: list[int | None] = [None] * banks
        self.last = {cmd: [NEVER] * banks for cmd in Cmd}
        self.recent = {cmd: deque(maxlen=dram.WINDOW) for cmd in Cmd}
        self.now = NEVER
        self.refreshes = 0
        self.counts = dict.fromkeys(COUNTERS, 0)
        self.log: list[tuple[int, Cmd, int | None]] = []

    # -- constraints -----------------------------------------------------------------------

    def _related(self, scope: Scope, bank: int | None) -> range | list[int]:
        """Banks whose earlier commands a row of `scope` checks for a command on `bank`."""
        if bank is None or scope is Scope.CHANNEL:
            return range(self.banks)
        if scope is Scope.GROUP:
            return [b for b in range(self.banks) if self.group_of[b] == self.group_of[bank]]
        return [bank]

    def earliest(self, t: dram.Timing, cmd: Cmd, bank: int | None, floor: int) -> int:
        """First cycle >= floor at which `cmd` (to `bank`, or all banks) meets every row."""
        cycle = max(floor, self.now + COMMAND_GAP)
        for r in t.rows_into[cmd]:
            if r.window > 1:
                recent = self.recent[r.prev]
                if len(recent) >= r.window:
                    cycle = max(cycle, recent[-r.window] + r.cycles)
            else:
                last = self.last[r.prev]
                cycle = max(cycle, max(last[b] for b in self._related(r.scope, bank))
                            + r.cycles)
        return cycle

    def quiet(self, t: dram.Timing) -> int:
        """First cycle at which no constraint of past commands binds any command."""
        last = [max(self.last[cmd]) for cmd in Cmd]
        return dram.quiet_cycle(t, last, tuple(self.recent[Cmd.ACT]), self.now)

    # -- bank state machines ---------------------------------------------------------------

    def issue(self, cmd: Cmd, bank: int | None, cycle: int, row: int | None = None) -> None:
        """Issue `cmd` at `cycle`, stepping the bank state machines."""
        if cmd is Cmd.ACT:
            if self.row[bank] is not None:
                raise EmulatorError(f"ACT to bank {bank} while row {self.row[bank]} is open")
            self.row[bank] = row
        elif cmd is Cmd.PREA:
            self.row = [None] * self.banks
        elif cmd is Cmd.MAC and (None in self.row or len(set(self.row)) != 1):
            raise EmulatorError(f"all-bank MAC with open rows {self.row!r}")
        elif cmd is Cmd.REF and self.row != [None] * self.banks:
            raise EmulatorError(f"REF with open rows {self.row!r}")
        for b in (range(self.banks) if bank is None else (bank,)):
            self.last[cmd][b] = cycle
        self.recent[cmd].append(cycle)
        self.now = cycle
        self.counts[COUNTERS[cmd]] += 1
        self.log.append((cycle, cmd, bank))

    def _need(self, request) -> tuple[Cmd | None, int | None]:
        """The next command `request` needs: (Cmd, bank or None), or (None, None) if served."""
        kind, row = request
        is_open = [r is not None for r in self.row]
        if kind is None:
            return (Cmd.PREA, None) if any(is_open) else (None, None)
        if kind is Cmd.RES:
            return Cmd.RES, None
        if any(r is not None and r != row for r in self.row):
            return Cmd.PREA, None
        closed = next((b for b in self.order if not is_open[b]), None)
        return (Cmd.MAC, None) if closed is None else (Cmd.ACT, closed)

    # -- the controller --------------------------------------------------------------------

    def _refresh(self, t: dram.Timing, due: int) -> None:
        if self.row != [None] * self.banks:
            self.issue(Cmd.PREA, None, self.earliest(t, Cmd.PREA, None, due))
        self.issue(Cmd.REF, None, self.earliest(t, Cmd.REF, None, due))
        self.refreshes += 1

    def run(self, t: dram.Timing, requests, start: int, refresh: bool = True) -> dict:
        """Serve `requests` from cycle `start`, then precharge; return the counts."""
        self.counts = dict.fromkeys(COUNTERS, 0)
        for request in chain(requests, [_CLOSE]):
            activated = False
            while True:
                cmd, bank = self._need(request)
                if cmd is None:
                    break
                cycle = self.earliest(t, cmd, bank, start)
                due = (self.refreshes + 1) * t.refresh_interval if refresh else FOREVER
                if due <= cycle and not activated:
                    self._refresh(t, due)
                    continue
                self.issue(cmd, bank, cycle, request[1])
                activated |= cmd is Cmd.ACT
                if cmd is Cmd.MAC:
                    self.counts["row_misses" if activated else "row_hits"] += 1
                if cmd in (Cmd.MAC, Cmd.RES):
                    break
        return self.counts

    def gemv(self, t: dram.Timing, shape: dram.GemvShape, start: int) -> dram.GemvTiming:
        """Run one channel's share of a PIM.GEMV from `start`: its end cycle (the channel is
        quiet) and counts, with refresh_stall from a second run without refresh."""
        log, self.log = self.log, []
        plain = copy.deepcopy(self)
        self.log = log
        plain.run(t, dram.gemv_requests(shape), start, refresh=False)
        counts = dict(self.run(t, dram.gemv_requests(shape), start))
        end = self.quiet(t)
        counts["refresh_stall"] = end - plain.quiet(t)
        return dram.GemvTiming(end, counts)


class PimEngine(EngineModel):
    """PIM.GEMV on the PIM channels: timing per channel, results exactly `numerics.linear`."""
    engine = isa.Engine.PIM

    command_level = False
    """Schedule with the command-level `DramChannel` instead of the closed form (slow; for
    co-simulation and tests). Set it before the first instruction runs."""

    def __init__(self, machine):
        self.pim = machine.config.pim
        super().__init__(machine, self.pim.clock_mhz)
        self.timings: dict[int, dram.Timing] = {}
        self.states: list[dram.ChannelState] | None = None
        """Closed-form state per channel; channels with equal histories share one object."""
        self.channels: list[DramChannel] | None = None

    def _timing(self, bits: int) -> dram.Timing:
        t = self.timings.get(bits)
        if t is None:
            t = self.timings[bits] = dram.Timing(self.pim, bits)
        return t

    def _pattern(self, nm: int) -> tuple[int, int]:
        """The N:M pattern `nm` indexes: the FPGA's list (the compiler shares it), else dense."""
        fpga = self.machine.config.fpga
        patterns = fpga.nm_patterns if fpga is not None else (layout.DENSE,)
        if nm >= len(patterns):
            raise EmulatorError(f"nm = {nm} indexes no N:M pattern; this machine has "
                                f"{', '.join(f'{i}={n}:{m}' for i, (n, m) in enumerate(patterns))}")
        return tuple(patterns[nm])

    def _check_buffers(self, f: dict, shape: dram.GemvShape) -> None:
        """Inputs sit at the same offsets in each selected channel's global buffer; the m x n
        outputs at o_addr in PRES."""
        pim, m = self.pim, f["m"]
        for name, nbytes in (("x_addr", m * f["k"]), ("s_addr", m * layout.SCALE_CODE_BYTES)):
            if f[name] + nbytes > pim.gbuf_bytes:
                raise EmulatorError(f"{name} {f[name]:#x} + {nbytes} bytes overruns the "
                                    f"{pim.gbuf_bytes}-byte global buffer of a channel; give "
                                    f"an offset inside it (each selected channel holds a copy)")
        self.machine.memory(PRES).check(f["o_addr"], m * f["n"] * FX_BYTES)

    def _schedule(self, t: dram.Timing, shape: dram.GemvShape, start: int) -> dict:
        """GemvTiming per channel of `shape`, every channel starting at cycle `start`."""
        channels = shape.channels
        if self.command_level:
            if self.channels is None:
                self.channels = [DramChannel(self.pim) for _ in range(self.pim.channels)]
            return {c: self.channels[c].gemv(t, shape, start) for c in channels}
        if self.states is None:
            self.states = [dram.ChannelState(t)] * self.pim.channels
        done: dict[int, tuple] = {}
        out = {}
        for c in channels:
            state = self.states[c]
            if id(state) not in done:
                done[id(state)] = dram.gemv_channel(t, state, shape, start)
            self.states[c], out[c] = done[id(state)]
        return out

    def execute(self, ins, start):
        f, pim, machine = ins.fields, self.pim, self.machine
        nm = self._pattern(f["nm"])
        shape = dram.gemv_shape(pim, f, nm)
        self._check_buffers(f, shape)
        clock = self.clock
        buses = [machine.resource(f"pim{c}") for c in shape.channels]
        first = start
        if not pim.dual_row_buffer:
            first = clock.cycle_at(max([clock.edge(start)] + [r.free_ps for r in buses]))
            self.stats.stall_mem += first - start
        ends = self._schedule(self._timing(f["bits"]), shape, first)
        if not pim.dual_row_buffer:
            for c, bus in zip(shape.channels, buses):
                bus.hold(clock.edge(first), clock.edge(ends[c].end) - clock.edge(first), 0,
                         (self.name, self.index))
        self._account(f, shape, ends)
        if not machine.timing_only:
            self._compute(f, shape, nm)
        return max(timing.end for timing in ends.values())

    def _account(self, f: dict, shape: dram.GemvShape, ends: dict) -> None:
        """Counters, MACs, bytes and energy: ACTs, useful MACs, and the results crossing the
        channel I/O to the controller (weights never leave the banks)."""
        pim, stats = self.pim, self.stats
        totals = dict.fromkeys(ends[shape.channels[0]].counts, 0)
        for timing in ends.values():
            for name, value in timing.counts.items():
                totals[name] += value
        for name, value in totals.items():
            stats.counters[f"pim_{name}"] += value
        stats.macs += shape.macs
        banks = pim.banks_per_channel
        result_bytes = totals["res"] * banks * FX_BYTES
        m = f["m"]
        self.machine.count("PIMDRAM", totals["mac"] * banks * pim.burst_bytes)
        self.machine.count("GBUF", len(shape.channels) * m * (f["k"] + layout.SCALE_CODE_BYTES))
        self.machine.count("PRES", m * f["n"] * FX_BYTES)
        stats.energy_pj += (totals["act"] * pim.energy_pj_per_act
                            + shape.macs * pim.energy_pj_per_mac
                            + result_bytes * pim.energy_pj_per_byte)

    def _compute(self, f: dict, shape: dram.GemvShape, nm: tuple[int, int]) -> None:
        """Each bank's tile from PIMDRAM, its channel's inputs from GBUF, outputs to PRES.

        Unit u (bank b of the i-th selected channel, u = i * banks + b) holds output channels
        u, u + units, ...; the weights of every unit are unpacked together (`_weights`), and
        channels whose global buffers hold the same inputs share their `numerics.linear`.
        """
        pim, machine = self.pim, self.machine
        gbuf = machine.memory(GBUF)
        m, n, k = f["m"], f["n"], f["k"]
        parts = self._weights(f, shape, nm)
        banks = pim.banks_per_channel
        inputs: dict[bytes, list] = {}
        for i, c in enumerate(shape.channels):
            base = c * pim.gbuf_bytes
            raw = np.concatenate([gbuf.read(base + f["x_addr"], m * k),
                                  gbuf.read(base + f["s_addr"], m * layout.SCALE_CODE_BYTES)])
            inputs.setdefault(raw.tobytes(), []).append(i)
        out = np.zeros((m, n), np.int32)
        for raw, chosen in inputs.items():
            buf = np.frombuffer(raw, np.uint8)
            a8 = layout.unpack_a8_rows(buf[:m * k], k)
            mant, exp = layout.unpack_scale_codes(buf[m * k:])
            for w, cols in parts:
                if len(inputs) > 1:
                    rows = np.flatnonzero(np.isin(cols % shape.units // banks, chosen))
                    w, cols = w.take(rows), cols[rows]
                out[:, cols] = numerics.linear(a8, mant, exp, w.w_eff, w.mult, w.shift)
        machine.memory(PRES).write(f["o_addr"], layout.pack_fx_rows(out))

    def _weights(self, f: dict, shape: dram.GemvShape, nm: tuple[int, int]) -> list:
        """(Unpacked rows, the output channel of each row) per tile height: the units whose
        tiles have that many rows are read with one gather and unpacked as one merged tile.
        Kept with PIMDRAM until it is next written, so later steps skip even the reads."""
        dram_mem = self.machine.memory(PIMDRAM)
        n, k, bits = f["n"], f["k"], f["bits"]
        key = ("PIM.GEMV", f["w_addr"], n, k, bits, nm, f["group_log2"], shape.channels)
        parts = dram_mem.derived.get(key)
        if parts is None:
            parts = dram_mem.derived[key] = self._unpack(f, shape, nm, dram_mem)
        return parts

    def _unpack(self, f: dict, shape: dram.GemvShape, nm: tuple[int, int], dram_mem) -> list:
        pim, n, k, bits = self.pim, f["n"], f["k"], f["bits"]
        group = isa.group_size(f["group_log2"], k)
        banks, units = pim.banks_per_channel, shape.units
        unit = np.arange(units)
        bank = np.array(shape.channels).repeat(banks) * banks + unit % banks
        height = (n - unit + units - 1) // units
        parts = []
        for rows in np.unique(height).tolist():
            mine = np.flatnonzero(height == rows)
            nbytes = layout.weight_tile_bytes(rows, k, bits, nm, group)
            tiles = dram_mem.gather(bank[mine] * pim.bank_bytes + f["w_addr"], nbytes)
            merged = weights.merge_tiles(tiles, rows, k, bits, nm, group)
            cols = (mine[:, None] + units * np.arange(rows)).reshape(-1)
            parts.append((weights.TILES.unpack(merged, len(mine) * rows, k, bits, nm, group),
                          cols))
        return parts
