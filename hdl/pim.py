"""PIM banks and their channel controller: PIM.GEMV inside the DRAM, all-bank MAC mode.

A `PimChannel` is one PIM channel: `pim.banks_per_channel` `PimBank`s and the controller that
expands each PIM.GEMV into the DRAM commands of `trimem.dram` (ACT per bank; PREA, MAC, RES and
REF to all banks at once), at the earliest cycle every row of `dram.TABLE` allows, one command
per cycle, refreshing every `pim.tREFI` cycles. It follows the command-level reference
`trimem.emulator.pim.DramChannel` command for command, so every instruction ends at the same
cycle. Rows of the table scoped to one bank are checked by each bank's `BankTimer`; rows
scoped to a bank group or the channel by the controller.

Datapath (docs/hdl_pim_csd.md). The MAC commands stream a bank's packed weight tile
(`values | groups | requant`, trimem/layout.py) through the bank burst by burst, in tile order.
A value burst feeds `pim.mac_lanes` int8 x int4/int8 products per cycle against the global
buffer's activations; their sums per weight group are kept in a partial-sum memory until the
group multipliers stream by, which scale them into one int32 accumulator per output channel
(two's complement wrap, so the order of the sums does not change the bits). The requant pairs
are caught as they pass. Each RES reads one accumulator from every bank, and the controller
requantizes it (`trimem.numerics.linear`) and writes it to the result buffer in the same cycle.
"""
from __future__ import annotations

from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from amaranth.utils import bits_for, ceil_log2, exact_log2

from trimem import dram, isa, numerics
from trimem.config import PimConfig
from trimem.dram import Cmd, Scope
from trimem.hdl.frontend import instr_layout, read_signature, write_signature
from trimem.hdl.vpu import rshift_round, saturate
from trimem.layout import REQUANT_BYTES, SCALE_CODE_BYTES

FX_BITS = 32
"""An fx result and an accumulator are int32."""
AMOUNT_BITS = numerics.REQUANT_SHIFT_MAX.bit_length()
"""A requant shift amount, shift - exp, is at most REQUANT_SHIFT_MAX."""
ADDR_BITS = isa.ADDR_BITS[isa.Space.GBUF]
"""Byte addresses into the global and result buffers (the ISA's GBUF/PRES field width)."""
BUILD_LIMIT_BITS = 1 << 27
"""Largest storage (bank arrays, partial sums, accumulators) a PIM build may hold: 16 MiB of
flip-flops and RAM, far beyond what a simulator steps through in reasonable time."""
DEFAULT_MAX_ROWS = 64
"""Cap on the accumulators per bank when the result buffer would allow more."""


def gap(pim: PimConfig, param: str, bits: Signal):
    """Cycles of timing parameter `param`: a config constant, or for a `dram.DERIVED` one the
    value of the instruction's weight width `bits`."""
    if param not in dram.DERIVED:
        return Const(getattr(pim, param))
    values = {b: dram.DERIVED[param](pim, b) for b in numerics.WEIGHT_BITS}
    out = Const(values[numerics.WEIGHT_BITS[0]])
    for b, v in values.items():
        out = Mux(bits == b, v, out)
    return out


def saturation(pim: PimConfig) -> int:
    """Where a cycles-since counter stops: past the largest gap of any row, either width."""
    gaps = [getattr(pim, r.param) if r.param not in dram.DERIVED else
            max(dram.DERIVED[r.param](pim, b) for b in numerics.WEIGHT_BITS)
            for r in dram.TABLE]
    return max(gaps) + dram.COMMAND_GAP


def check_pim(pim) -> None:
    """TypeError/ValueError unless `pim` is a PimConfig the RTL can build."""
    if not isinstance(pim, PimConfig):
        raise TypeError(f"pim must be a PimConfig (HardwareConfig.pim), got {pim!r}")
    for name in ("row_bytes", "burst_bytes"):
        value = getattr(pim, name)
        if value & (value - 1):
            raise ValueError(f"pim.{name} = {getattr(pim, name)!r} is not a power of two; the "
                             f"RTL splits addresses into row and column bits, so use one")
    if pim.burst_bytes % pim.mac_lanes:
        raise ValueError(f"pim.mac_lanes = {pim.mac_lanes!r} does not divide burst_bytes = "
                         f"{pim.burst_bytes!r}; the lanes take a whole number of cycles per "
                         f"burst, so pick a divisor")


def requant(acc, mult, shift, mant, exp):
    """`numerics.linear`'s output rule as an expression: sat32(rshift_round(acc * (mult *
    mant), shift - exp)); the contract keeps shift >= exp, so the shift never goes left."""
    product = acc.as_signed() * (mult.as_signed() * mant.as_unsigned())
    amount = (shift.as_unsigned() - exp.as_unsigned())[:AMOUNT_BITS]
    return saturate(rshift_round(product, amount), FX_BITS)


# ---------------------------------------------------------------------------------------------
# Command bus and the per-instruction geometry the controller hands its banks
# ---------------------------------------------------------------------------------------------

def command_layout(pim: PimConfig) -> data.StructLayout:
    """One DRAM command: kind, row (ACT, MAC), column and tile byte offset of a MAC burst,
    whether it is the first burst of a vector, and the local output a RES reads."""
    return data.StructLayout({
        "kind": Cmd,
        "row": range(pim.rows),
        "col": range(pim.row_bytes // pim.burst_bytes),
        "offset": unsigned(bits_for(pim.bank_bytes)),
        "first": 1,
        "res": unsigned(16),
    })


def geometry_layout(pim: PimConfig) -> data.StructLayout:
    """What a bank needs to walk its own tile (docs/hdl_pim_csd.md): the weight width, the
    group length in values, and the tile offsets where its group multipliers start and end
    and its requant pairs start."""
    offset = unsigned(bits_for(pim.bank_bytes))
    return data.StructLayout({
        "bits": 4,
        "group": 16,
        "groups_start": offset,
        "groups_end": offset,
        "requant_start": offset,
    })


# ---------------------------------------------------------------------------------------------
# Bank timing: the rows of dram.TABLE scoped to one bank
# ---------------------------------------------------------------------------------------------

class BankTimer(wiring.Component):
    """The timing state machine of one bank: its PIM row buffer and the bank-scoped rows of
    `dram.TABLE` (tRCD, tRAS, tRTP, tRP, tMAC).

    A command reaches the bank when `issue` is high: an ACT to this bank, or any all-bank
    command. `allowed` has one bit per `dram.Cmd`: may that command issue this cycle as far as
    this bank knows. It depends only on state, never on `cmd`, so the controller ANDs the bits
    of the banks a command reaches with its own bank-group and channel rows.

    Parameters
    ----------
    pim : PimConfig

    Members
    -------
    cmd : In(command_layout(pim))
    issue : In(1)
        The command on `cmd` issues this cycle and reaches this bank.
    bits : In(4)
        Weight width of the running instruction (tMAC depends on it).
    allowed : Out(len(dram.Cmd))
    open : Out(1)
        The PIM row buffer holds `row`.
    row : Out(range(pim.rows))
    """

    def __init__(self, pim: PimConfig):
        check_pim(pim)
        self.pim = pim
        self.saturate = saturation(pim)
        super().__init__({
            "cmd": In(command_layout(pim)),
            "issue": In(1),
            "bits": In(4),
            "allowed": Out(len(Cmd)),
            "open": Out(1),
            "row": Out(range(pim.rows)),
        })

    def elaborate(self, platform):
        m = Module()
        pim, sat = self.pim, self.saturate

        # -- cycles since this bank last saw each command ------------------------------------
        since = {}
        for cmd in Cmd:
            since[cmd] = counter = Signal(range(sat + 1), name=f"since_{cmd.name.lower()}",
                                          init=sat)
            with m.If(self.issue & (self.cmd.kind == cmd)):
                m.d.sync += counter.eq(1)
            with m.Elif(counter != sat):
                m.d.sync += counter.eq(counter + 1)

        # -- row buffer ------------------------------------------------------------------------
        with m.If(self.issue):
            with m.Switch(self.cmd.kind):
                with m.Case(Cmd.ACT):
                    m.d.sync += [self.open.eq(1), self.row.eq(self.cmd.row)]
                with m.Case(Cmd.PREA):
                    m.d.sync += self.open.eq(0)

        # -- allowed: every bank-scoped row met, and the row buffer in the right state ------
        needs_open = {Cmd.MAC: self.open, Cmd.ACT: ~self.open, Cmd.REF: ~self.open}
        for cmd in Cmd:
            ok = needs_open.get(cmd, Const(1))
            for r in dram.TABLE:
                if r.next is cmd and r.scope is Scope.BANK:
                    ok = ok & (since[r.prev] >= gap(pim, r.param, self.bits))
            m.d.comb += self.allowed[int(cmd)].eq(ok)
        return m


# ---------------------------------------------------------------------------------------------
# One bank: array, MAC lanes, partial sums, group multipliers, requant pairs
# ---------------------------------------------------------------------------------------------

def burst_layout(pim: PimConfig) -> data.StructLayout:
    """A normal-path write of one burst into the bank array (the DMA path into PIMDRAM)."""
    return data.StructLayout({"addr": range(pim.rows * pim.row_bytes // pim.burst_bytes),
                              "data": unsigned(pim.burst_bytes * 8)})


def result_layout() -> data.StructLayout:
    """What a bank answers to RES: the accumulator and the requant pair of one local row."""
    return data.StructLayout({"acc": signed(FX_BITS), "mult": signed(32), "shift": unsigned(8)})


class PimBank(wiring.Component):
    """One DRAM bank with MAC lanes beside its PIM row buffer.

    Each MAC command reads one burst of the open row (combinationally, so lane work starts in
    the command's cycle) and spends tMAC cycles on it:

    - a value burst (tile offset below `geometry.groups_start`): `mac_lanes` weights per cycle
      times the activations on `act`, summed per weight group into the partial-sum memory;
    - a burst in the group-multiplier section: `mac_lanes` multipliers per cycle, each times
      its group's partial sum, added into the accumulator of its local row;
    - bytes of the requant section are caught into `mult`/`shift` registers as they pass.

    The bank expects whole value bursts (a tile row of k weights is a whole number of bursts)
    and weight groups of a multiple of `mac_lanes` values; `PimChannel` checks both.

    Parameters
    ----------
    pim : PimConfig
    max_rows : int
        Accumulators: the most local output rows a tile may have.
    max_groups : int
        Partial sums: the most weight groups a tile may have (rows x groups per row).
    init : list of int, optional
        Initial bank contents, one int per burst (byte i of a burst in bits [8i + 7 : 8i]).

    Members
    -------
    timer : BankTimer
        The bank's timing state machine (submodule); its ports are driven by `cmd`/`issue`.
    cmd : In(command_layout(pim))
    issue : In(1)
    allowed : Out(len(dram.Cmd))
    geometry : In(geometry_layout(pim))
        The running instruction's tile as this bank holds it.
    thresholds : In(ArrayLayout(16, max_rows))
        Partial-sum index at which each local row ends (row r holds [t[r-1], t[r])).
    act : In(8 * mac_lanes)
        Activations of the current value-lane cycle (int8 each), from the global buffer.
    o_result : Out(result_layout())
        Answer to the RES on `cmd`, in the same cycle.
    i_write : In(stream.Signature(burst_layout(pim)))
        Normal-path burst writes. With `pim.dual_row_buffer` they proceed beside the PIM row
        buffer; without, they wait while it holds a row.
    """

    def __init__(self, pim: PimConfig, *, max_rows: int, max_groups: int, init=()):
        check_pim(pim)
        for name, value in (("max_rows", max_rows), ("max_groups", max_groups)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.pim = pim
        self.max_rows, self.max_groups = max_rows, max_groups
        self.init = list(init)
        self.lanes = pim.mac_lanes
        self.timer = BankTimer(pim)
        super().__init__({
            "cmd": In(command_layout(pim)),
            "issue": In(1),
            "allowed": Out(len(Cmd)),
            "geometry": In(geometry_layout(pim)),
            "thresholds": In(data.ArrayLayout(unsigned(16), max_rows)),
            "act": In(8 * pim.mac_lanes),
            "o_result": Out(result_layout()),
            "i_write": In(stream.Signature(burst_layout(pim))),
        })

    def elaborate(self, platform):
        m = Module()
        pim, lanes = self.pim, self.lanes
        burst = pim.burst_bytes
        geo = self.geometry

        # -- timing -------------------------------------------------------------------------
        m.submodules.timer = timer = self.timer
        m.d.comb += [timer.cmd.eq(self.cmd), timer.issue.eq(self.issue), timer.bits.eq(geo.bits),
                     self.allowed.eq(timer.allowed)]

        # -- array: PIM column reads beside normal-path writes -----------------------------
        cols = pim.row_bytes // burst
        m.submodules.array = array = Memory(shape=burst * 8, depth=pim.rows * cols,
                                            init=self.init)
        column = array.read_port(domain="comb")
        write = array.write_port()
        m.d.comb += column.addr.eq(self.cmd.row * cols + self.cmd.col)
        can_write = Const(1) if pim.dual_row_buffer else ~timer.open
        m.d.comb += [self.i_write.ready.eq(can_write), write.addr.eq(self.i_write.payload.addr),
                     write.data.eq(self.i_write.payload.data),
                     write.en.eq(self.i_write.valid & can_write)]

        # -- the burst under the lanes: read in the MAC's cycle, held for tMAC cycles -------
        mac = Signal()
        m.d.comb += mac.eq(self.issue & (self.cmd.kind == Cmd.MAC))
        held = Signal(burst * 8)
        held_offset = Signal.like(self.cmd.offset)
        step = Signal(range(2 * burst // lanes + 1))
        t_mac = gap(pim, "tMAC", geo.bits)
        with m.If(mac):
            m.d.sync += [held.eq(column.data), held_offset.eq(self.cmd.offset), step.eq(1)]
        with m.Elif((step != 0) & (step < t_mac)):
            m.d.sync += step.eq(step + 1)
        with m.Else():
            m.d.sync += step.eq(0)
        busy = Signal()
        cycle = Signal.like(step)
        words = Signal(burst * 8)
        offset = Signal.like(held_offset)
        m.d.comb += [busy.eq(mac | ((step != 0) & (step < t_mac))),
                     cycle.eq(Mux(mac, 0, step)),
                     words.eq(Mux(mac, column.data, held)),
                     offset.eq(Mux(mac, self.cmd.offset, held_offset))]
        first = Signal()
        m.d.comb += first.eq(mac & self.cmd.first)

        in_values = offset < geo.groups_start
        in_groups = (offset + burst > geo.groups_start) & (offset < geo.groups_end)

        # -- value lanes: partial sums per weight group ------------------------------------
        partials = [Memory(shape=signed(FX_BITS), depth=-(-self.max_groups // lanes), init=[])
                    for _ in range(lanes)]
        for i, mem in enumerate(partials):
            m.submodules[f"partials{i}"] = mem
        p_write = [mem.write_port() for mem in partials]
        p_read = [mem.read_port(domain="comb") for mem in partials]

        wide = geo.bits == 4
        weights = []
        for s in range(lanes):
            byte = words.word_select(cycle * lanes + s, 8).as_signed()
            nibble = words.word_select(cycle * lanes + s, 4).as_signed()
            weights.append(Mux(wide, nibble, byte))
        products = [w * self.act.word_select(s, 8).as_signed() for s, w in enumerate(weights)]
        lane_sum = Signal(signed(FX_BITS))
        m.d.comb += lane_sum.eq(sum(products))

        running = Signal(signed(FX_BITS))
        in_group = Signal(16)
        index = Signal(range(self.max_groups + 1))
        value_cycle = Signal()
        m.d.comb += value_cycle.eq(busy & in_values)
        total = Signal(signed(FX_BITS))
        m.d.comb += total.eq(Mux(first, 0, running) + lane_sum)
        slot = Signal.like(index)
        m.d.comb += slot.eq(Mux(first, 0, index))
        with m.If(value_cycle):
            ends = Mux(first, 0, in_group) + lanes >= geo.group
            with m.If(ends):
                m.d.sync += [running.eq(0), in_group.eq(0), index.eq(slot + 1)]
            with m.Else():
                m.d.sync += [running.eq(total), in_group.eq(Mux(first, 0, in_group) + lanes),
                             index.eq(slot)]
            for s, port in enumerate(p_write):
                m.d.comb += [port.addr.eq(slot // lanes), port.data.eq(total),
                             port.en.eq(ends & (slot % lanes == s))]

        # -- group lanes: multiplier x partial sum into the row's accumulator ---------------
        accs = Array(Signal(signed(FX_BITS), name=f"acc{r}") for r in range(self.max_rows))
        base = Signal(signed(bits_for(pim.bank_bytes) + 2))
        m.d.comb += base.eq(offset + cycle * lanes - geo.groups_start)
        for port in p_read:
            m.d.comb += port.addr.eq(base // lanes)
        group_cycle = busy & in_groups & (cycle < burst // lanes)
        contributions = [[] for _ in range(self.max_rows)]
        for s in range(lanes):
            where = base + s
            byte_at = offset + cycle * lanes + s
            live = group_cycle & (where >= 0) & (byte_at < geo.groups_end)
            g = words.word_select(cycle * lanes + s, 8)[:numerics.GROUP_SCALE_BITS]
            term = Signal(signed(FX_BITS), name=f"term{s}")
            m.d.comb += term.eq((g * p_read[s].data)[:FX_BITS])
            low = Const(0)
            for r in range(self.max_rows):
                high = self.thresholds[r]
                hit = live & (where >= low) & (where < high)
                contributions[r].append(Mux(hit, term, 0))
                low = high
        for r in range(self.max_rows):
            start = Mux(first, 0, accs[r])
            with m.If(group_cycle | first):
                m.d.sync += accs[r].eq(start + sum(contributions[r]))

        # -- requant pairs caught as they pass ------------------------------------------------
        mults = [Signal(32, name=f"mult{r}") for r in range(self.max_rows)]
        shifts = [Signal(8, name=f"shift{r}") for r in range(self.max_rows)]
        for r in range(self.max_rows):
            fields = [mults[r].word_select(b, 8) for b in range(4)] + [shifts[r]]
            for b, target in enumerate(fields):
                at = Signal(signed(bits_for(pim.bank_bytes) + 2), name=f"requant{r}_{b}")
                m.d.comb += at.eq(geo.requant_start + r * REQUANT_BYTES + b - self.cmd.offset)
                with m.If(mac & (at >= 0) & (at < burst)):
                    m.d.sync += target.eq(column.data.word_select(at[:ceil_log2(burst) or 1], 8))

        # -- RES: one local row's accumulator and requant pair ------------------------------
        which = self.cmd.res
        m.d.comb += [self.o_result.acc.eq(accs[which]),
                     self.o_result.mult.eq(Array(mults)[which]),
                     self.o_result.shift.eq(Array(shifts)[which])]
        return m


# ---------------------------------------------------------------------------------------------
# The channel: controller + banks
# ---------------------------------------------------------------------------------------------

class Phase:
    """What the request in hand asks for: MAC bursts, RES reads, or closing the rows."""
    MAC, RES, CLOSE = 0, 1, 2


def result_signature(pim: PimConfig) -> wiring.Signature:
    """The write port of a RES's results: one int32 per bank to consecutive PRES words."""
    return write_signature(ADDR_BITS, pim.banks_per_channel * FX_BITS // 8)


def log_layout(pim: PimConfig) -> data.StructLayout:
    """A command as issued, for traces and tests: kind and target bank (ACT)."""
    return data.StructLayout({"kind": Cmd, "bank": range(pim.banks_per_channel)})


def default_limits(pim: PimConfig) -> tuple[int, int]:
    """(max_rows, max_groups) per bank: as many outputs as the result buffers hold spread over
    the banks of one channel (capped at DEFAULT_MAX_ROWS), and for each a group per mac_lanes
    activations of a full global buffer."""
    outputs = pim.result_total_bytes // (FX_BITS // 8)
    rows = max(1, min(DEFAULT_MAX_ROWS, -(-outputs // pim.banks_per_channel)))
    return rows, rows * max(1, pim.gbuf_bytes // pim.mac_lanes)


def storage_bits(pim: PimConfig, max_rows: int, max_groups: int) -> int:
    """Bits of state a PIM build holds: bank arrays, partial sums, accumulators, requant."""
    per_bank = pim.bank_bytes * 8 + max_groups * FX_BITS + max_rows * (FX_BITS + 40)
    return pim.total_banks * per_bank


class PimChannel(wiring.Component):
    """One PIM channel: its banks and the controller that runs PIM.GEMV on them.

    The controller serves the requests of `trimem.dram.gemv_requests` in order (per vector
    every burst of the tile as a MAC, then one RES per local output), choosing for each the
    command `DramChannel._need` chooses (PREA if the banks hold another row, else ACT to the
    next closed bank in `dram.act_order`, else the column command) and issuing it in the first
    cycle every row of `dram.TABLE` allows. Refresh runs beside the instructions: from the
    cycle a refresh is due (every `pim.tREFI` cycles from reset) no other command issues until
    the banks are precharged and REF has issued, except that a request that has issued an ACT
    finishes with its column command first (as the reference does). An instruction ends when
    no constraint of its commands binds any more (`dram.quiet_cycle`); `i_instr.ready` rises
    in that cycle, so the next instruction may issue its first ACT in it.

    PIM.GEMV shapes the RTL computes (others set `error`; their timing is still exact): dense
    weights (nm = 0), groups of a multiple of `mac_lanes` values, tile rows of a whole number
    of bursts (k * bits / 8 a multiple of burst_bytes), at most `max_rows` outputs and
    `max_groups` weight groups per bank.

    Parameters
    ----------
    pim : PimConfig
    channel : int
        This channel's index (bit `channel` of `ch_mask` selects it).
    max_rows, max_groups : int, optional
        Per-bank accumulators and partial sums (default: `default_limits`).
    init : list of list of int, optional
        Initial contents of each bank, as `PimBank` takes them.

    Members
    -------
    i_instr : In(stream.Signature(instr_layout("PIM.GEMV")))
        Instructions; `ready` while idle. A channel not in `ch_mask` takes and ignores them.
    gbuf : Out(read_signature(ADDR_BITS, mac_lanes))
        Activations from this channel's global buffer (byte addresses inside it).
    scale : Out(read_signature(ADDR_BITS, 4))
        Scale codes from this channel's global buffer.
    o_result : Out(result_signature(pim))
        Requantized results to the result buffers (PRES byte addresses), written in the RES's
        cycle; a bank with no output at this index leaves its word alone.
    o_command : Out(stream.Signature(log_layout(pim)))
        Every command in the cycle it issues (a trace; `ready` is not looked at).
    i_write : In(stream.Signature(...))
        Normal-path burst writes into the bank `bank` (see `PimBank.i_write`).
    error : Out(1)
        Sticky: an instruction this channel cannot compute (see above) was taken.
    """

    def __init__(self, pim: PimConfig, *, channel: int = 0, max_rows: int | None = None,
                 max_groups: int | None = None, init=None):
        check_pim(pim)
        if not isinstance(channel, int) or not 0 <= channel < pim.channels:
            raise ValueError(f"channel must be an int in [0, {pim.channels}), got {channel!r}")
        rows, groups = default_limits(pim)
        max_rows = rows if max_rows is None else max_rows
        max_groups = groups if max_groups is None else max_groups
        bits = storage_bits(pim, max_rows, max_groups)
        if bits > BUILD_LIMIT_BITS:
            raise ValueError(f"this PIM needs {bits} bits of bank arrays and buffers, more than "
                             f"the {BUILD_LIMIT_BITS} an RTL build may hold; build a small "
                             f"preset (trimem-small) or lower pim.rows, row_bytes or channels")
        banks = pim.banks_per_channel
        init = [[] for _ in range(banks)] if init is None else [list(x) for x in init]
        if len(init) != banks:
            raise ValueError(f"init must give {banks} banks' contents, got {len(init)}")
        self.pim, self.channel = pim, channel
        self.max_rows, self.max_groups = max_rows, max_groups
        self.banks = [PimBank(pim, max_rows=max_rows, max_groups=max_groups, init=x)
                      for x in init]
        write = data.StructLayout({"bank": range(banks), "burst": burst_layout(pim)})
        super().__init__({
            "i_instr": In(stream.Signature(instr_layout("PIM.GEMV"))),
            "gbuf": Out(read_signature(ADDR_BITS, pim.mac_lanes)),
            "scale": Out(read_signature(ADDR_BITS, SCALE_CODE_BYTES)),
            "o_result": Out(result_signature(pim)),
            "o_command": Out(stream.Signature(log_layout(pim))),
            "i_write": In(stream.Signature(write)),
            "error": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        pim = self.pim
        banks, lanes, burst = pim.banks_per_channel, pim.mac_lanes, pim.burst_bytes
        row_shift = exact_log2(pim.row_bytes)
        sat = saturation(pim)
        for b, bank in enumerate(self.banks):
            m.submodules[f"bank{b}"] = bank

        # -- taking an instruction -------------------------------------------------------------
        busy = Signal()
        wait = Signal(range(sat + 1))
        taking = Signal()
        payload = self.i_instr.payload
        f = Signal.like(payload)
        mine = payload.ch_mask.bit_select(self.channel, 1)
        m.d.comb += taking.eq(self.i_instr.valid & self.i_instr.ready & mine)
        with m.If(taking):
            m.d.sync += f.eq(payload)

        # -- the instruction's geometry (docs/hdl_pim_csd.md), from the held fields ---------
        below = f.ch_mask & ((1 << self.channel) - 1)
        position = sum(below.bit_select(i, 1) for i in range(self.channel)) if self.channel \
            else Const(0)
        chosen = sum(f.ch_mask.bit_select(i, 1) for i in range(len(f.ch_mask)))
        units = Signal(16)
        m.d.comb += units.eq(chosen * banks)
        group = Signal(16)
        m.d.comb += group.eq(Mux(f.group_log2 == 0, f.k, Const(1, 16) << f.group_log2))
        per_row = Signal(16)
        m.d.comb += per_row.eq(Mux(f.group_log2 == 0, 1, f.k >> f.group_log2))
        row_bytes = Signal(16)
        m.d.comb += row_bytes.eq(Mux(f.bits == 4, f.k >> 1, f.k))
        local = Signal(16)
        m.d.comb += local.eq((f.n + units - 1) // Mux(units == 0, 1, units))
        full = Signal(16)
        m.d.comb += full.eq(f.n - (local - 1) * units)
        entry = Signal(32)
        m.d.comb += entry.eq(row_bytes + per_row + REQUANT_BYTES)
        tile = Signal(32)
        m.d.comb += tile.eq(local * entry)
        tile_rows = Signal(32)
        m.d.comb += tile_rows.eq((tile + pim.row_bytes - 1) >> row_shift)
        last_cols = Signal(range(pim.row_bytes // burst + 1))
        m.d.comb += last_cols.eq((tile - ((tile_rows - 1) << row_shift) + burst - 1)
                                 // burst)
        first_row = f.w_addr >> row_shift
        values_end = Signal(32)
        m.d.comb += values_end.eq(local * row_bytes)

        # -- geometry of each bank's own tile --------------------------------------------------
        for b, bank in enumerate(self.banks):
            unit = position * banks + b
            rows_here = Signal(16, name=f"rows{b}")
            m.d.comb += rows_here.eq(Mux(unit < full, local, local - 1))
            geo = bank.geometry
            m.d.comb += [geo.bits.eq(f.bits), geo.group.eq(group),
                         geo.groups_start.eq(rows_here * row_bytes),
                         geo.groups_end.eq(rows_here * (row_bytes + per_row)),
                         geo.requant_start.eq(rows_here * (row_bytes + per_row))]
            for r in range(self.max_rows):
                m.d.comb += bank.thresholds[r].eq((r + 1) * per_row)

        # -- errors: shapes this datapath cannot compute --------------------------------------
        checking = Signal()
        m.d.sync += checking.eq(taking)
        unsupported = ((f.nm != 0) | (group % lanes != 0) | (f.n < units)
                       | ((f.group_log2 != 0) & ((f.k & (group - 1)) != 0))
                       | (((f.k * f.bits) % (8 * burst)) != 0)
                       | (local > self.max_rows) | (local * per_row > self.max_groups)
                       | ((f.ch_mask >> pim.channels) != 0)
                       | (f.w_addr % pim.row_bytes != 0)
                       | (f.w_addr + tile > pim.bank_bytes))
        with m.If(checking & unsupported):
            m.d.sync += self.error.eq(1)

        # -- requests: per vector every burst as a MAC, then one RES per local output -------
        phase = Signal(range(3))
        row = Signal(range(pim.rows))
        col = Signal(range(pim.row_bytes // burst))
        offset = Signal(bits_for(pim.bank_bytes))
        res = Signal(16)
        vector = Signal(16)
        fresh = Signal()
        cur_phase = Mux(fresh, Phase.MAC, phase)
        cur_row = Mux(fresh, payload.w_addr >> row_shift, row)
        active = Signal()

        # -- the rows the banks hold -----------------------------------------------------------
        opened = Signal(range(banks + 1))
        open_row = Signal(range(pim.rows))
        any_open = opened != 0
        order = Array(Const(b, range(banks)) for b in dram.act_order(pim))
        target = Signal(range(banks))
        m.d.comb += target.eq(order[Mux(opened == banks, 0, opened)])

        # -- refresh: due every tREFI cycles from reset --------------------------------------
        due = Signal(signed(bits_for(pim.tREFI) + 2), init=pim.tREFI)
        refresh = Signal()
        activated = Signal()
        m.d.comb += refresh.eq((due <= 0) & ~activated)
        in_refresh = Signal()

        # -- the command wanted this cycle ---------------------------------------------------
        want = Signal(Cmd)
        wanted = Signal()
        done = Signal()
        with m.If(refresh):
            m.d.comb += [wanted.eq(1), want.eq(Mux(any_open, Cmd.PREA, Cmd.REF))]
        with m.Elif(active):
            with m.Switch(cur_phase):
                with m.Case(Phase.MAC):
                    m.d.comb += wanted.eq(1)
                    with m.If(any_open & (open_row != cur_row)):
                        m.d.comb += want.eq(Cmd.PREA)
                    with m.Elif(opened != banks):
                        m.d.comb += want.eq(Cmd.ACT)
                    with m.Else():
                        m.d.comb += want.eq(Cmd.MAC)
                with m.Case(Phase.RES):
                    m.d.comb += [wanted.eq(1), want.eq(Cmd.RES)]
                with m.Case(Phase.CLOSE):
                    m.d.comb += [wanted.eq(any_open), want.eq(Cmd.PREA)]
        m.d.comb += [done.eq(busy & (phase == Phase.CLOSE) & ~any_open & ~in_refresh),
                     fresh.eq(~busy | done), active.eq((busy & ~done) | taking)]

        # -- channel-scoped rows of the table, and the banks' own -----------------------------
        since = {cmd: Signal(range(sat + 1), name=f"since_{cmd.name.lower()}", init=sat)
                 for cmd in Cmd}
        groups = [Signal(range(sat + 1), name=f"since_act_group{g}", init=sat)
                  for g in range(pim.bank_groups)]
        ages = [Signal(range(sat + 1), name=f"act_age{i}", init=sat)
                for i in range(dram.WINDOW)]
        group_of = Array(Const(b // pim.banks_per_group, range(pim.bank_groups))
                         for b in range(banks))
        target_group = Array(groups)[group_of[target]]
        allowed = Signal()
        checks = []
        for r in dram.TABLE:
            if r.scope is Scope.BANK:
                continue
            g = gap(pim, r.param, f.bits)
            if r.window > 1:
                ok = ages[r.window - 1] >= g
            elif r.next is Cmd.ACT and r.prev is Cmd.ACT and r.scope is Scope.GROUP:
                ok = target_group >= g
            else:
                ok = since[r.prev] >= g
            checks.append((r.next, ok))
        for cmd in Cmd:
            channel_ok = Const(1)
            for nxt, ok in checks:
                if nxt is cmd:
                    channel_ok = channel_ok & ok
            if cmd is Cmd.ACT:
                bank_ok = Array(bank.allowed[int(cmd)] for bank in self.banks)[target]
            else:
                bank_ok = Cat(bank.allowed[int(cmd)] for bank in self.banks).all()
            with m.If(want == cmd):
                m.d.comb += allowed.eq(channel_ok & bank_ok)
        issue = Signal()
        m.d.comb += issue.eq(wanted & allowed)

        # -- drive the banks -------------------------------------------------------------------
        for b, bank in enumerate(self.banks):
            cmd = bank.cmd
            m.d.comb += [cmd.kind.eq(want), cmd.row.eq(cur_row), cmd.col.eq(col),
                         cmd.offset.eq(offset), cmd.first.eq(offset == 0), cmd.res.eq(res),
                         bank.issue.eq(issue & ((want != Cmd.ACT) | (target == b)))]
            m.d.comb += [bank.i_write.valid.eq(self.i_write.valid
                                               & (self.i_write.payload.bank == b)),
                         bank.i_write.payload.eq(self.i_write.payload.burst)]
        m.d.comb += self.i_write.ready.eq(
            Array(bank.i_write.ready for bank in self.banks)[self.i_write.payload.bank])
        m.d.comb += [self.o_command.valid.eq(issue), self.o_command.payload.kind.eq(want),
                     self.o_command.payload.bank.eq(target)]

        # -- counters of cycles since each command ---------------------------------------------
        for cmd, counter in since.items():
            with m.If(issue & (want == cmd)):
                m.d.sync += counter.eq(1)
            with m.Elif(counter != sat):
                m.d.sync += counter.eq(counter + 1)
        act = issue & (want == Cmd.ACT)
        for g, counter in enumerate(groups):
            with m.If(act & (group_of[target] == g)):
                m.d.sync += counter.eq(1)
            with m.Elif(counter != sat):
                m.d.sync += counter.eq(counter + 1)
        for i, age in enumerate(ages):
            older = Const(0) if i == 0 else ages[i - 1]
            with m.If(act):
                m.d.sync += age.eq(1 if i == 0 else Mux(older == sat, sat, older + 1))
            with m.Elif(age != sat):
                m.d.sync += age.eq(age + 1)

        # -- bank state, refresh bookkeeping ------------------------------------------------
        with m.If(issue):
            with m.Switch(want):
                with m.Case(Cmd.ACT):
                    m.d.sync += [opened.eq(opened + 1), open_row.eq(cur_row)]
                with m.Case(Cmd.PREA):
                    m.d.sync += opened.eq(0)
                    with m.If(refresh):
                        m.d.sync += in_refresh.eq(1)
                with m.Case(Cmd.REF):
                    m.d.sync += in_refresh.eq(0)
            m.d.sync += activated.eq(want == Cmd.ACT)
        m.d.sync += due.eq(due - 1 + Mux(issue & (want == Cmd.REF), pim.tREFI, 0))

        # -- advancing through the requests ---------------------------------------------------
        bursts = Mux(row == first_row + tile_rows - 1, last_cols, pim.row_bytes // burst)
        with m.If(taking):
            m.d.sync += [phase.eq(Phase.MAC), row.eq(payload.w_addr >> row_shift),
                         col.eq(0), offset.eq(0), res.eq(0), vector.eq(0)]
        with m.If(issue & (want == Cmd.MAC)):
            m.d.sync += offset.eq(offset + burst)
            with m.If(col + 1 == bursts):
                m.d.sync += col.eq(0)
                with m.If(row == first_row + tile_rows - 1):
                    m.d.sync += [phase.eq(Phase.RES), res.eq(0), row.eq(first_row)]
                with m.Else():
                    m.d.sync += row.eq(row + 1)
            with m.Else():
                m.d.sync += col.eq(col + 1)
        with m.If(issue & (want == Cmd.RES)):
            with m.If(res + 1 == local):
                m.d.sync += [res.eq(0), offset.eq(0), vector.eq(vector + 1)]
                with m.If(vector + 1 == f.m):
                    m.d.sync += phase.eq(Phase.CLOSE)
                with m.Else():
                    m.d.sync += phase.eq(Phase.MAC)
            with m.Else():
                m.d.sync += res.eq(res + 1)

        # -- the end: the cycle no constraint of the instruction binds (dram.quiet_cycle) ---
        remaining = Signal(signed(bits_for(sat) + 2))
        newest = fold(m, list(since.values()), lambda a, b: a < b, range(sat + 1), "newest")
        terms = [dram.COMMAND_GAP - newest]
        for r in dram.TABLE:
            g = gap(pim, r.param, f.bits)
            counter = ages[r.window - 1] if r.window > 1 else since[r.prev]
            terms.append(g - counter)
        m.d.comb += remaining.eq(fold(m, terms, lambda a, b: a > b, remaining.shape(),
                                      "remaining"))
        with m.If(taking):
            m.d.sync += busy.eq(1)
        with m.Elif(done):
            m.d.sync += busy.eq(0)
        with m.If(done & (remaining > 1)):
            m.d.sync += wait.eq(remaining - 1)
        with m.Elif(wait != 0):
            m.d.sync += wait.eq(wait - 1)
        m.d.comb += self.i_instr.ready.eq((~busy & (wait == 0)) | (done & (remaining <= 0)))

        # -- activations: prefetched one value-lane cycle ahead -----------------------------
        t_mac = gap(pim, "tMAC", f.bits)
        lane = Signal(range(2 * burst // lanes + 1))
        value_mac = issue & (want == Cmd.MAC) & (offset < values_end)
        consume = Signal()
        m.d.comb += consume.eq(value_mac | ((lane != 0) & (lane < t_mac)))
        with m.If(value_mac):
            m.d.sync += lane.eq(1)
        with m.Elif((lane != 0) & (lane < t_mac)):
            m.d.sync += lane.eq(lane + 1)
        with m.Else():
            m.d.sync += lane.eq(0)
        address = Signal(32)
        column = Signal(16)
        value_row = Signal(16)
        following = Signal(32)
        wraps = column + lanes == f.k
        m.d.comb += following.eq(Mux(wraps & (value_row + 1 != local),
                                      address + lanes - f.k, address + lanes))
        with m.If(taking):
            m.d.sync += [address.eq(payload.x_addr), column.eq(0), value_row.eq(0)]
        with m.Elif(consume):
            m.d.sync += address.eq(following)
            with m.If(wraps):
                m.d.sync += [column.eq(0),
                             value_row.eq(Mux(value_row + 1 == local, 0, value_row + 1))]
            with m.Else():
                m.d.sync += column.eq(column + lanes)
        m.d.comb += self.gbuf.addr.eq(Mux(taking, payload.x_addr,
                                          Mux(consume, following, address)))
        for bank in self.banks:
            m.d.comb += bank.act.eq(self.gbuf.data)

        # -- scale code of the vector in hand --------------------------------------------------
        scale_at = Signal(32)
        with m.If(taking):
            m.d.sync += scale_at.eq(payload.s_addr)
        with m.Elif(issue & (want == Cmd.RES) & (res + 1 == local)):
            m.d.sync += scale_at.eq(scale_at + SCALE_CODE_BYTES)
        m.d.comb += self.scale.addr.eq(Mux(taking, payload.s_addr, scale_at))
        mant = self.scale.data[:16]
        exp = self.scale.data[16:24]

        # -- RES: requantize every bank's answer and write the results ----------------------
        results = []
        for b, bank in enumerate(self.banks):
            y = Signal(signed(FX_BITS), name=f"result{b}")
            out = bank.o_result
            m.d.comb += y.eq(requant(out.acc, out.mult, out.shift, mant, exp))
            results.append(y)
        lanes_here = [(position * banks + b) + res * units < f.n for b in range(banks)]
        first_output = (vector * f.n + res * units + position * banks) * (FX_BITS // 8)
        m.d.comb += [self.o_result.en.eq(issue & (want == Cmd.RES)),
                     self.o_result.addr.eq(f.o_addr + first_output),
                     self.o_result.data.eq(Cat(*results)),
                     self.o_result.mask.eq(Cat(*[here.replicate(FX_BITS // 8)
                                                 for here in lanes_here]))]
        return m


def fold(m: Module, values, pick, shape, name: str):
    """Reduce `values` pairwise with `pick(a, b) -> bool` (keep a), through named signals so
    the expression stays linear in size."""
    out = values[0]
    for i, v in enumerate(values[1:]):
        step = Signal(shape, name=f"{name}{i}")
        m.d.comb += step.eq(Mux(pick(v, out), v, out))
        out = step
    return out
