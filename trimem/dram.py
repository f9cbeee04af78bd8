"""DRAM and flash timing of the PIM and CSD engines: constraints as data, and the closed forms.

PIM. A channel controller expands each PIM.GEMV into DRAM commands in all-bank MAC mode (the
SK hynix AiM `MAC_ABK` / PIM-GPT style). `TABLE` lists every timing constraint between two
commands as a row (previous command, next command, scope, parameter name[, window]), as
Ramulator 2 declares its `TimingConstraint`s; the names are checked against `PimConfig` when
the table is built. Two models read it:

- `trimem.emulator.pim.DramChannel`, the command-level reference: per-bank state machines, one
  command at a time at its earliest legal cycle. The RTL controller reproduces it.
- `gemv_channel` here, the closed form: the same schedule computed one run of identical
  commands at a time (a run of MACs is an arithmetic series), jumping over repeats whose state
  recurs, so a whole 7B decode token costs milliseconds. Tests prove it equal to the reference
  cycle for cycle, refresh included.

docs/timing.md ("PIM") states the command order both follow.

CSD. Flash page location, page counts per channel and die, and the page read and program
closed forms (docs/timing.md, "CSD").
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from enum import Enum, IntEnum
from fractions import Fraction
from itertools import chain
from typing import NamedTuple

import numpy as np

from trimem import isa, layout, timing
from trimem.config import PimConfig

NEVER = -(1 << 62)
"""Issue cycle of a command that never happened: so far back that no constraint binds."""
FOREVER = 1 << 62
"""Due cycle of the next refresh when refresh is off."""
COMMAND_GAP = 1
"""The command bus of a channel carries one command per cycle, in order."""


class Cmd(IntEnum):
    """DRAM commands of a PIM channel. ACT opens a row in one bank; the others act on every
    bank of the channel at once (all-bank mode)."""
    ACT = 0
    """Activate: open a row of one bank into its row buffer."""
    PREA = 1
    """Precharge all banks: close every open row."""
    MAC = 2
    """Column command: every bank sends one burst of its open row to its MAC lanes."""
    RES = 3
    """Column command: every bank sends one int32 accumulator to the controller."""
    REF = 4
    """Refresh all banks (every bank precharged)."""


class Scope(Enum):
    """Which earlier commands a constraint row looks at: those sharing a bank, a bank group,
    or any command of the channel."""
    BANK = "bank"
    GROUP = "bank_group"
    CHANNEL = "channel"


class Constraint(NamedTuple):
    """`next` may issue no earlier than `param` cycles after the `window`-th most recent
    `prev` within `scope` (window 1: the most recent)."""
    prev: Cmd
    next: Cmd
    scope: Scope
    param: str
    window: int = 1


DERIVED = {
    "tMAC": lambda pim, bits: -(-(pim.burst_bytes * 8 // bits) // pim.mac_lanes),
}
"""Parameters derived from the config and the weight width. tMAC: cycles the mac_lanes of a
bank take to consume the weights of one burst, so a bank accepts a MAC at most every tMAC."""

_B, _G, _C = Scope.BANK, Scope.GROUP, Scope.CHANNEL
_ACT, _PREA, _MAC, _RES, _REF = Cmd

ROWS = (
    # a bank's row cycle: activate, read columns, precharge (JEDEC tRCD, tRAS, tRTP, tRP)
    (_ACT, _MAC, _B, "tRCD"),
    (_ACT, _PREA, _B, "tRAS"),
    (_MAC, _PREA, _B, "tRTP"),
    (_PREA, _ACT, _B, "tRP"),
    # activates draw a current spike: tRRD between two, at most four in any tFAW window
    (_ACT, _ACT, _G, "tRRD_L"),
    (_ACT, _ACT, _C, "tRRD_S"),
    (_ACT, _ACT, _C, "tFAW", 4),
    # column commands share the bank-group I/O (tCCD_L) and the channel (tCCD_S); a bank's
    # MAC lanes take tMAC per burst, and a result is ready tMAC after its last burst
    (_MAC, _MAC, _G, "tCCD_L"),
    (_MAC, _MAC, _C, "tCCD_S"),
    (_MAC, _MAC, _B, "tMAC"),
    (_MAC, _RES, _G, "tCCD_L"),
    (_MAC, _RES, _C, "tCCD_S"),
    (_MAC, _RES, _B, "tMAC"),
    (_RES, _RES, _G, "tCCD_L"),
    (_RES, _RES, _C, "tCCD_S"),
    (_RES, _MAC, _G, "tCCD_L"),
    (_RES, _MAC, _C, "tCCD_S"),
    # refresh: every bank precharged for tRP first, then no bank command for tRFC
    (_PREA, _REF, _C, "tRP"),
    (_REF, _ACT, _C, "tRFC"),
    (_REF, _RES, _C, "tRFC"),
    (_REF, _REF, _C, "tRFC"),
)
"""The PIM timing constraints. tWR never appears: the PIM controller writes no rows."""

PIM_FIELDS = frozenset(f.name for f in fields(PimConfig))


def build_table(rows) -> tuple[Constraint, ...]:
    """`rows` as Constraints, each checked: known commands, scopes and parameter names (a
    `PimConfig` field or a `DERIVED` name); a window only on ACT -> ACT over the channel."""
    table = []
    for row in rows:
        c = Constraint(*row)
        if not (isinstance(c.prev, Cmd) and isinstance(c.next, Cmd)
                and isinstance(c.scope, Scope)):
            raise TypeError(f"timing row {tuple(row)!r} must be (Cmd, Cmd, Scope, name[, "
                            f"window])")
        if c.param not in PIM_FIELDS and c.param not in DERIVED:
            raise ValueError(f"timing row {tuple(row)!r} names parameter {c.param!r}, which is "
                             f"neither a pim config field nor one of {sorted(DERIVED)}; use "
                             f"one of {sorted(n for n in PIM_FIELDS if n.startswith('t'))}")
        if not isinstance(c.window, int) or c.window < 1:
            raise ValueError(f"timing row {tuple(row)!r} has window {c.window!r}; give a "
                             f"positive int (1 = the most recent command)")
        if c.window > 1 and (c.prev, c.next, c.scope) != (Cmd.ACT, Cmd.ACT, Scope.CHANNEL):
            raise ValueError(f"timing row {tuple(row)!r} has a window over {c.prev.name} -> "
                             f"{c.next.name} in scope {c.scope.value!r}; windows are "
                             f"supported on ACT -> ACT over the channel only (tFAW)")
        table.append(c)
    return tuple(table)


TABLE = build_table(ROWS)


class Bound(NamedTuple):
    """A constraint row resolved to cycles."""
    prev: Cmd
    next: Cmd
    scope: Scope
    cycles: int
    window: int


WINDOW = max(r.window for r in TABLE)
"""The longest window of the table: how many recent ACTs a channel remembers."""


def act_order(pim) -> tuple[int, ...]:
    """Banks in the order an all-bank activate opens them, one ACT each.

    Banks are numbered `group * banks_per_group + index`; position i opens bank group
    i % bank_groups, index i // bank_groups, so consecutive activates go to different bank
    groups (tRRD_S apart, not tRRD_L).
    """
    groups, per_group = pim.bank_groups, pim.banks_per_group
    return tuple((i % groups) * per_group + i // groups for i in range(groups * per_group))


class Timing:
    """`TABLE` resolved for one PIM config and weight width, with the channel geometry."""

    def __init__(self, pim, bits: int, table=TABLE):
        values = {name: getattr(pim, name) for name in PIM_FIELDS}
        values.update({name: fn(pim, bits) for name, fn in DERIVED.items()})
        self.values = values
        self.rows = tuple(Bound(r.prev, r.next, r.scope, values[r.param], r.window)
                          for r in table)
        self.refresh_interval = pim.tREFI
        self.banks, self.groups = pim.banks_per_channel, pim.bank_groups
        self.group_of = tuple(b // pim.banks_per_group for b in range(self.banks))
        self.order = act_order(pim)
        self.window = max(r.window for r in self.rows)
        self.horizon = max(r.cycles for r in self.rows) + COMMAND_GAP
        """A command this many cycles before the last one can no longer bind anything."""
        self._index_rows()
        self._plan_activate()
        self.memo: dict = {}
        """(pattern body, snapshot[, cycles to the due refresh]) -> (period, snapshot after,
        counts) of a run of the body without (with one) refresh: what the closed form has
        worked out before."""

    def _index_rows(self) -> None:
        self.rows_into = {cmd: tuple(r for r in self.rows if r.next is cmd) for cmd in Cmd}
        self.act_act = tuple((r.scope, r.cycles, r.window) for r in self.rows
                             if (r.prev, r.next) == (Cmd.ACT, Cmd.ACT))
        self.into: dict[Cmd, dict[Cmd, int]] = {cmd: {} for cmd in Cmd}
        """into[next][prev]: the largest gap between two commands when every scope applies
        (either is all-bank), leaving out ACT -> ACT, which depends on the banks."""
        for r in self.rows:
            if (r.prev, r.next) != (Cmd.ACT, Cmd.ACT):
                gaps = self.into[r.next]
                gaps[r.prev] = max(gaps.get(r.prev, 0), r.cycles)
        self.gaps = {cmd: tuple(self.into[cmd].items()) for cmd in Cmd}
        self.step = {cmd: max(COMMAND_GAP, self.into[cmd].get(cmd, 0)) for cmd in Cmd}
        """Spacing of back-to-back all-bank commands of one kind (a run of MACs or RESs)."""
        self.bulk_refresh = max(self.into[cmd].get(Cmd.REF, 0) for cmd in Cmd) \
            < self.refresh_interval
        """True when a refresh on time never delays the next due one (tRFC < tREFI)."""

    def _plan_activate(self) -> None:
        """The clean all-bank activate, and where an earlier activate could disturb it."""
        self.offsets = self._clean_activate()
        """Cycle of each ACT of an all-bank activate after its first, in ACT order, when no
        earlier ACT binds."""
        where = {bank: i for i, bank in enumerate(self.order)}
        self.bank_offsets = tuple(self.offsets[where[b]] for b in range(self.banks))
        self.group_offsets = tuple(max(self.offsets[where[b]] for b in range(self.banks)
                                       if self.group_of[b] == g) for g in range(self.groups))
        firsts = {self.group_of[b]: i for i, b in reversed(tuple(enumerate(self.order)))}
        self.old_checks = tuple(
            (i, scope, cycles, window) for scope, cycles, window in self.act_act
            for i in range(1, self.banks)
            if scope is Scope.BANK or (window > 1 and i < window)
            or (scope is Scope.GROUP and firsts[self.group_of[self.order[i]]] == i))
        """(position, scope, cycles, window) of the ACT -> ACT rows through which an ACT
        before an activate may bind its later ACTs; the rest bind its first ACT only."""

    def _clean_activate(self) -> tuple[int, ...]:
        times: list[int] = []
        for i, bank in enumerate(self.order):
            cycle = times[-1] + COMMAND_GAP if times else 0
            for scope, cycles, window in self.act_act:
                if scope is Scope.GROUP:
                    same = [times[j] for j in range(i)
                            if self.group_of[self.order[j]] == self.group_of[bank]]
                    earlier = same[-window] if len(same) >= window else None
                elif scope is Scope.CHANNEL:
                    earlier = times[-window] if i >= window else None
                else:
                    earlier = None
                if earlier is not None:
                    cycle = max(cycle, earlier + cycles)
            times.append(cycle)
        return tuple(times)


# ---------------------------------------------------------------------------------------------
# The PIM.GEMV command pattern
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GemvShape:
    """How one PIM.GEMV maps onto the banks (docs/contract.md, "PIM weight mapping").

    Every bank of the selected channels runs in lockstep on the largest local tile, of
    `local_rows` output channels: `rows` DRAM rows from `first_row`, `row_cols` bursts in each
    full row and `last_cols` in the last. Per vector the controller streams every burst (one
    MAC each), then reads `local_rows` results (one RES each).
    """
    channels: tuple[int, ...]
    units: int
    local_rows: int
    tile_bytes: int
    first_row: int
    rows: int
    row_cols: int
    last_cols: int
    vectors: int
    macs: int
    """MACs that count (m * n * kept): lanes idle on padding or pruned weights count none."""

    @property
    def cols_per_vector(self) -> int:
        return (self.rows - 1) * self.row_cols + self.last_cols

    def row_bursts(self):
        """(DRAM row, bursts) of each row of one vector's stream, in order."""
        for r in range(self.rows):
            yield self.first_row + r, self.row_cols if r < self.rows - 1 else self.last_cols


def mask_channels(pim, ch_mask: int) -> tuple[int, ...]:
    """The PIM channels whose bits are set in `ch_mask`; ValueError naming any missing one."""
    chosen = tuple(c for c in range(ch_mask.bit_length()) if ch_mask >> c & 1)
    if not chosen or chosen[-1] >= pim.channels:
        raise ValueError(f"ch_mask {ch_mask:#x} selects channel(s) "
                         f"{[c for c in chosen if c >= pim.channels] or chosen!r} but this PIM "
                         f"has channels 0..{pim.channels - 1}; clear those bits")
    return chosen


def gemv_shape(pim, f: dict, nm: tuple[int, int]) -> GemvShape:
    """The bank mapping of PIM.GEMV fields `f` with N:M pattern `nm`; ValueError when the
    tiles are misaligned or do not fit a bank."""
    channels = mask_channels(pim, f["ch_mask"])
    m, n, k = f["m"], f["n"], f["k"]
    units = len(channels) * pim.banks_per_channel
    if n < units:
        raise ValueError(f"n = {n} output channels leave banks idle: ch_mask {f['ch_mask']:#x} "
                         f"selects {units} banks and every bank holds at least one output "
                         f"channel; select fewer channels")
    local = -(-n // units)
    group = isa.group_size(f["group_log2"], k)
    tile = layout.weight_tile_bytes(local, k, f["bits"], nm, group)
    w_addr = f["w_addr"]
    if w_addr % pim.row_bytes:
        raise ValueError(f"w_addr {w_addr:#x} is not row-aligned; PIM tiles start on a row "
                         f"boundary (a multiple of row_bytes = {pim.row_bytes})")
    if w_addr + tile > pim.bank_bytes:
        raise ValueError(f"the weight tile of {tile} bytes at w_addr {w_addr:#x} overruns the "
                         f"{pim.bank_bytes}-byte bank; split n or k, or lower w_addr")
    rows = -(-tile // pim.row_bytes)
    tail = tile - (rows - 1) * pim.row_bytes
    keep, block = nm
    return GemvShape(channels=channels, units=units, local_rows=local, tile_bytes=tile,
                     first_row=w_addr // pim.row_bytes, rows=rows,
                     row_cols=pim.row_bytes // pim.burst_bytes,
                     last_cols=-(-tail // pim.burst_bytes), vectors=m,
                     macs=m * n * (k // block * keep))


def gemv_requests(shape: GemvShape):
    """The column requests of one channel in issue order: per vector ("MAC", row) for every
    burst of the tile, then ("RES", None) per local output. The controller adds ACT, PREA
    and REF around them (docs/timing.md, "PIM")."""
    for _ in range(shape.vectors):
        for row, bursts in shape.row_bursts():
            for _ in range(bursts):
                yield Cmd.MAC, row
        for _ in range(shape.local_rows):
            yield Cmd.RES, None


def gemv_pattern(shape: GemvShape) -> tuple:
    """`gemv_requests` as runs: ("mac", new_row, count), ("res", count) and
    ("repeat", times, body). A one-row tile stays open from vector to vector."""
    res = ("res", shape.local_rows)
    if shape.rows == 1:
        return (("mac", True, shape.last_cols), res,
                ("repeat", shape.vectors - 1, (("mac", False, shape.last_cols), res)))
    vector = (("repeat", shape.rows - 1, (("mac", True, shape.row_cols),)),
              ("mac", True, shape.last_cols), res)
    return (("repeat", shape.vectors, vector),)


# ---------------------------------------------------------------------------------------------
# The closed form
# ---------------------------------------------------------------------------------------------

COUNTERS = ("act", "pre", "mac", "res", "ref", "row_hits", "row_misses")
"""Per-channel counts of a PIM.GEMV: commands of each kind (indexed by Cmd), then MACs that
found their row open (hits) or needed activates first (misses)."""
_HITS, _MISSES = COUNTERS.index("row_hits"), COUNTERS.index("row_misses")


class ChannelState:
    """What one channel remembers between commands: the last issue cycle of every command
    kind (ACT also per bank, per bank group and its last `window`), whether rows are open,
    and the refreshes done (the next is due at (refreshes + 1) * tREFI)."""

    def __init__(self, t: Timing):
        self.now = NEVER
        self.last = [NEVER] * len(Cmd)
        self.act_bank = [NEVER] * t.banks
        self.act_group = [NEVER] * t.groups
        self.window: tuple[int, ...] = ()
        self.open = False
        self.refreshes = 0

    def copy(self) -> "ChannelState":
        other = object.__new__(ChannelState)
        other.now, other.open, other.refreshes, other.window = \
            self.now, self.open, self.refreshes, self.window
        other.last, other.act_bank, other.act_group = \
            list(self.last), list(self.act_bank), list(self.act_group)
        return other

    def snapshot(self, horizon: int) -> tuple:
        """The state relative to the last command, forgetting what can no longer bind: equal
        snapshots are followed by equal schedules (refresh aside)."""
        now, oldest = self.now, self.now - horizon
        times = chain(self.last, self.act_bank, self.act_group, self.window)
        return tuple([t - now if t > oldest else None for t in times]), self.open

    def restore(self, snapshot: tuple, now: int) -> None:
        """Become the state `snapshot` describes, its last command at cycle `now`."""
        times, self.open = snapshot
        cycles = [NEVER if t is None else now + t for t in times]
        a = len(self.last)
        b = a + len(self.act_bank)
        c = b + len(self.act_group)
        self.now = now
        self.last, self.act_bank, self.act_group = cycles[:a], cycles[a:b], cycles[b:c]
        self.window = tuple(cycles[c:])


def quiet_cycle(t: Timing, last, window, now: int) -> int:
    """First cycle at which no constraint from the commands so far binds any command: the end
    of an instruction. `last[cmd]` is the latest issue of `cmd` on any bank."""
    end = now + COMMAND_GAP
    for r in t.rows:
        if r.window == 1:
            end = max(end, last[r.prev] + r.cycles)
        elif len(window) >= r.window:
            end = max(end, window[-r.window] + r.cycles)
    return end


class _Runner:
    """Issues one instruction's pattern on a ChannelState, a run of commands at a time."""

    def __init__(self, t: Timing, st: ChannelState, floor: int, refresh: bool):
        self.t, self.st, self.floor = t, st, floor
        self.due = (st.refreshes + 1) * t.refresh_interval if refresh else FOREVER
        self.counts = [0] * len(COUNTERS)

    def bound(self, cmd: Cmd) -> int:
        """Earliest cycle of an all-bank `cmd` under the constraint rows (floor aside)."""
        last = self.st.last
        return max([NEVER] + [last[p] + g for p, g in self.t.gaps[cmd]])

    def act_bound(self, bank: int) -> int:
        st, t = self.st, self.t
        e = self.bound(Cmd.ACT)
        for scope, cycles, window in t.act_act:
            if window > 1:
                if len(st.window) >= window:
                    e = max(e, st.window[-window] + cycles)
            elif scope is Scope.BANK:
                e = max(e, st.act_bank[bank] + cycles)
            elif scope is Scope.GROUP:
                e = max(e, st.act_group[t.group_of[bank]] + cycles)
            else:
                e = max(e, st.last[Cmd.ACT] + cycles)
        return e

    def issue(self, cmd: Cmd, cycle: int, count: int = 1, step: int = 0) -> None:
        """Issue `count` all-bank `cmd`s from `cycle`, `step` cycles apart."""
        self.st.now = self.st.last[cmd] = cycle + (count - 1) * step
        self.counts[cmd] += count

    def issue_act(self, bank: int, cycle: int) -> None:
        st = self.st
        st.now = st.last[Cmd.ACT] = st.act_bank[bank] = cycle
        st.act_group[self.t.group_of[bank]] = cycle
        st.window = (st.window + (cycle,))[-self.t.window:]
        st.open = True
        self.counts[Cmd.ACT] += 1

    def earliest(self, cmd: Cmd) -> int:
        return max(self.floor, self.st.now + COMMAND_GAP, self.bound(cmd))

    def refresh(self, pending: int) -> None:
        """Precharge if a row is open, then refresh, from the due cycle; when the refresh is
        on time, also the later ones due by `pending` (the waiting command's earliest cycle)."""
        st, t = self.st, self.t
        precharged = st.open
        if st.open:
            self.issue(Cmd.PREA, max(self.due, st.now + COMMAND_GAP, self.bound(Cmd.PREA)))
            st.open = False
        cycle = max(self.due, st.now + COMMAND_GAP, self.bound(Cmd.REF))
        extra = 0
        if cycle == self.due and not precharged and t.bulk_refresh:
            extra = max(0, (pending - self.due) // t.refresh_interval)
        self.issue(Cmd.REF, cycle, extra + 1, t.refresh_interval)
        st.refreshes += extra + 1
        self.due += (extra + 1) * t.refresh_interval

    def activate(self) -> None:
        """Open the row in every bank, in ACT order. A due refresh may go before the first
        ACT only: from there to its column command a request is not preempted, so every
        request completes even when refreshes come faster than a whole activate."""
        st, t = self.st, self.t
        first = t.order[0]
        cycle = max(self.floor, st.now + COMMAND_GAP, self.act_bound(first))
        while cycle >= self.due:
            self.refresh(cycle)
            cycle = max(self.floor, st.now + COMMAND_GAP, self.act_bound(first))
        if self.clean(cycle):
            self.issue_activate(cycle)
            return
        self.issue_act(first, cycle)
        for bank in t.order[1:]:
            self.issue_act(bank, max(self.floor, st.now + COMMAND_GAP, self.act_bound(bank)))

    def clean(self, cycle: int) -> bool:
        """True when no ACT before this activate binds any of its ACTs after the first at
        `cycle`, so they follow `Timing.offsets`."""
        st, t = self.st, self.t
        for i, scope, cycles, window in t.old_checks:
            bank = t.order[i]
            if window > 1:
                k = window - i
                earlier = st.window[-k] if len(st.window) >= k else NEVER
            elif scope is Scope.BANK:
                earlier = st.act_bank[bank]
            else:
                earlier = st.act_group[t.group_of[bank]]
            if earlier + cycles > cycle + t.offsets[i]:
                return False
        return True

    def issue_activate(self, cycle: int) -> None:
        """Issue a whole activate from `cycle` at `Timing.offsets`."""
        st, t = self.st, self.t
        st.act_bank = [cycle + o for o in t.bank_offsets]
        st.act_group = [cycle + o for o in t.group_offsets]
        st.window = (st.window + tuple(cycle + o for o in t.offsets[-t.window:]))[-t.window:]
        st.now = st.last[Cmd.ACT] = cycle + t.offsets[-1]
        st.open = True
        self.counts[Cmd.ACT] += t.banks

    def column(self, cmd: Cmd, count: int, sure: bool = False) -> int:
        """Issue up to `count` `cmd`s back to back, stopping before the first one a refresh
        preempts (then refreshing; with `sure` the first is never preempted); return how
        many issued."""
        first = self.earliest(cmd)
        step = self.t.step[cmd]
        fits = count if first + (count - 1) * step < self.due else \
            max(int(sure), -(-(self.due - first) // step))
        if fits:
            self.issue(cmd, first, fits, step)
        if fits < count:
            self.refresh(first + fits * step)
        return fits

    def macs(self, new_row: bool, count: int) -> None:
        st = self.st
        miss = False
        while count:
            if st.open and new_row:
                cycle = self.earliest(Cmd.PREA)
                if cycle >= self.due:
                    self.refresh(cycle)
                else:
                    self.issue(Cmd.PREA, cycle)
                    st.open = False
                continue
            new_row = False
            if not st.open:
                self.activate()
                miss = True
                continue
            done = self.column(Cmd.MAC, count, sure=miss)
            if done:
                self.counts[_MISSES] += miss
                self.counts[_HITS] += done - miss
                miss = False
            count -= done

    def results(self, count: int) -> None:
        while count:
            count -= self.column(Cmd.RES, count)

    def close(self) -> None:
        st = self.st
        if st.open:
            cycle = self.earliest(Cmd.PREA)
            if cycle >= self.due:
                self.refresh(cycle)
            else:
                self.issue(Cmd.PREA, cycle)
                st.open = False

    def run(self, pattern) -> None:
        for item in pattern:
            if item[0] == "mac":
                self.macs(item[1], item[2])
            elif item[0] == "res":
                self.results(item[1])
            else:
                self.repeat(item[1], item[2])

    def repeat(self, times: int, body) -> None:
        """Run `body` `times` times, reusing what a run of it did before from the same
        snapshot (`Timing.memo`): a run without refresh that left the snapshot it found
        repeats with a fixed period, so skip every such run that ends before the next
        refresh is due; a run with one refresh is reused when that refresh falls due equally
        far from its start."""
        st, t = self.st, self.t
        done = 0
        while done < times:
            free = self.floor <= st.now + COMMAND_GAP
            if free:
                snap = st.snapshot(t.horizon)
                seen = t.memo.get((body, snap))
                if seen is not None and st.now + seen[0] < self.due:
                    skip = 1 if seen[1] != snap else \
                        min(times - done, (self.due - 1 - st.now) // seen[0])
                    done += self.reuse(seen, skip)
                    continue
                late = (body, snap, self.due - st.now)
                seen = t.memo.get(late)
                if seen is not None:
                    done += self.reuse(seen, 1)
                    continue
            now, counts = st.now, list(self.counts)
            self.run(body)
            done += 1
            refreshes = self.counts[Cmd.REF] - counts[Cmd.REF]
            if free and refreshes < 2:
                key = (body, snap) if refreshes == 0 else late
                t.memo[key] = (st.now - now, st.snapshot(t.horizon),
                               [c - c0 for c, c0 in zip(self.counts, counts)])

    def reuse(self, seen: tuple, times: int) -> int:
        """Apply a remembered run `times` times; return `times`."""
        period, after, delta = seen
        self.st.restore(after, self.st.now + times * period)
        self.counts = [c + times * d for c, d in zip(self.counts, delta)]
        refreshes = times * delta[Cmd.REF]
        self.st.refreshes += refreshes
        self.due += refreshes * self.t.refresh_interval
        return times


@dataclass(frozen=True)
class GemvTiming:
    """One channel's PIM.GEMV: its end cycle (all constraints expired) and its counts."""
    end: int
    counts: dict


def gemv_channel(t: Timing, state: ChannelState, shape: GemvShape,
                 start: int) -> tuple[ChannelState, GemvTiming]:
    """The closed form: (state after, timing) of PIM.GEMV `shape` on one channel from cycle
    `start`. `counts` has COUNTERS and refresh_stall, the cycles refresh added to the end."""
    ends = []
    for refresh in (True, False):
        st = state.copy()
        runner = _Runner(t, st, start, refresh)
        runner.run(gemv_pattern(shape))
        runner.close()
        ends.append(quiet_cycle(t, st.last, st.window, st.now))
        if refresh:
            after, counts = st, dict(zip(COUNTERS, runner.counts))
    counts["refresh_stall"] = ends[0] - ends[1]
    return after, GemvTiming(ends[0], counts)


# ---------------------------------------------------------------------------------------------
# Flash (CSD)
# ---------------------------------------------------------------------------------------------

def flash_location(csd, page: int) -> tuple[int, int, int]:
    """(channel, die, plane) of flash page `page`: striped over channels, then dies, then
    planes (docs/contract.md, "Memory spaces")."""
    c, d = csd.channels, csd.dies
    return page % c, page // c % d, page // (c * d) % csd.planes


def flash_range_counts(csd, starts, counts) -> np.ndarray:
    """Pages per [channel, die] of the page ranges [starts[i], starts[i] + counts[i])."""
    ways = csd.channels * csd.dies
    starts = np.asarray(starts, np.int64).reshape(-1, 1)
    ends = starts + np.asarray(counts, np.int64).reshape(-1, 1)
    residue = np.arange(ways, dtype=np.int64)
    per = (ends - 1 - residue) // ways - (starts - 1 - residue) // ways
    return per.sum(axis=0).reshape(csd.dies, csd.channels).T


def flash_page_counts(csd, pages) -> np.ndarray:
    """Pages per [channel, die] of a list of page numbers."""
    ways = csd.channels * csd.dies
    per = np.bincount(np.asarray(pages, np.int64) % ways, minlength=ways)
    return per.reshape(csd.dies, csd.channels).T


class FlashTiming:
    """Flash latencies of one CSD in cycles of its clock: array read `read` (tR), program
    `program` (tPROG) and `transfer`, one page over a channel at channel_mbps.

    The sequential engine (`csd.engine`, docs/timing.md, "CSD") sees flash one page at a time:
    a page read answers `page_read` = tR + transfer cycles after its request (the array read,
    then the page over its channel into the controller's page buffer), then streams to the
    engine `page_beats` = ceil(page_bytes / engine_lanes) beats, one a cycle; a page program
    holds the engine `page_program` = transfer + tPROG cycles (the page over its channel, then
    the array program). The streaming engine has pages in flight on every channel, die and
    plane: `read_cycles` and `program_cycles`.
    """

    def __init__(self, csd):
        self.planes = csd.planes
        self.read = timing.latency_cycles(csd.tR_us, csd.clock_mhz)
        self.program = timing.latency_cycles(csd.tPROG_us, csd.clock_mhz)
        per_byte = timing.cycles_per_byte(Fraction(str(csd.channel_mbps)) / 1000,
                                          csd.clock_mhz)
        self.transfer = timing.stream_cycles(csd.page_bytes, per_byte)
        self.page_read = self.read + self.transfer
        self.page_beats = -(-csd.page_bytes // csd.engine_lanes)
        self.page_program = self.transfer + self.program

    def _batches(self, per_die: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(pages, array operations of the busiest die) per channel: a die reads or programs
        `planes` pages at once, one per plane."""
        return per_die.sum(axis=1), (-(-per_die // self.planes)).max(axis=1)

    def read_cycles(self, per_die: np.ndarray) -> np.ndarray:
        """Cycles per channel to read pages [channel, die] into the engine:
        max(tR + pages * transfer, batches * tR + transfer), 0 where no page is read.

        The channel bus moves one page after another once the first read is done; the busiest
        die reads `batches` times in a row (each read overlaps the previous transfer), and its
        last page still crosses the bus."""
        pages, batches = self._batches(per_die)
        busy = np.maximum(self.read + pages * self.transfer,
                          batches * self.read + self.transfer)
        return np.where(pages > 0, busy, 0)

    def program_cycles(self, per_die: np.ndarray) -> np.ndarray:
        """Cycles per channel to program pages [channel, die]:
        max(pages * transfer + tPROG, transfer + batches * tPROG), 0 where none."""
        pages, batches = self._batches(per_die)
        busy = np.maximum(pages * self.transfer + self.program,
                          self.transfer + batches * self.program)
        return np.where(pages > 0, busy, 0)


def flash_pages(ctx: int, per_page: int, max_ctx: int) -> int:
    """Pages of a KV region already programmed when it holds `ctx` tokens: a page is
    programmed once its last slot is written (the region's last page may hold fewer slots);
    the partly filled page waits in the drive's write buffer."""
    full = ctx // per_page
    return full + (1 if ctx == max_ctx and ctx % per_page else 0)


def page_fills(tokens: np.ndarray, per_page: int, max_ctx: int) -> np.ndarray:
    """Which appended token positions fill their page (its last slot in the region)."""
    tokens = np.asarray(tokens)
    return (tokens % per_page == per_page - 1) | (tokens == max_ctx - 1)
