"""Shared channels and links of the system top, held as the emulator holds its `Resource`s.

An instruction that moves bytes over HBM channels, the PCIe or P2P link or a PIM channel bus
holds a set of them together for `cycles`, from the first cycle >= `earliest` at which all are
free; a resource is free once the last hold granted on it ends (emulator/engine.py, `occupy`).
The emulator makes these holds in event order: by issue cycle, ties to the lower engine id.
`Reservations` grants them in that order too, so the start it answers is the emulator's.

A client asks on `request` (mask of resources, issue cycle, earliest start, cycles held) and
learns its start in the cycle the request is taken. A client that needs a few cycles after its
issue to know its resources (VPU.EMBED reads its token ids first) raises `pending` with the
issue cycle and every resource it may use, so that a later request sharing one waits for it.
A start may lie in the past when its grant came late; the client still ends at start + its
length, and a client whose bytes cannot all move by then raises its own `error`.
"""
from __future__ import annotations

from fractions import Fraction

from amaranth.hdl import Cat, Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out
from amaranth.utils import exact_log2

from trimem.hdl.frontend import CYCLE_BITS


def resource_names(cfg) -> tuple[str, ...]:
    """The resources of a machine, as the emulator names them: HBM channels `hbm<c>`, the
    `pcie` and `p2p` links, and the bus of each PIM channel `pim<c>`, unless the PIM channels
    are the HBM channels (`pim.shared_with_hbm`, see `physical`)."""
    names = [f"hbm{c}" for c in range(cfg.fpga.hbm_channels)] + ["pcie", "p2p"]
    if cfg.pim is not None and not cfg.pim.shared_with_hbm:
        names += [f"pim{c}" for c in range(cfg.pim.channels)]
    return tuple(names)


def physical(cfg, name: str) -> str:
    """The resource that carries `name`: PIM channel c's bus is HBM channel c when the PIM
    banks sit in the HBM stacks (`pim.shared_with_hbm`), as in the emulator's machine."""
    if cfg.pim is not None and cfg.pim.shared_with_hbm and name.startswith("pim"):
        return "hbm" + name[len("pim"):]
    return name


class Reciprocal:
    """ceil(x * rate) for 0 <= x < 2**bits as ((x * num + den - 1) * mult) >> shift.

    With y = x * num + den - 1 < 2**n, mult = ceil(2**shift / den) and e = mult * den -
    2**shift, floor(y * mult / 2**shift) = floor(y / den) whenever e * y < 2**shift; shift =
    n + bit length of den gives it, since e < den. The constructor checks that bound.
    """

    def __init__(self, rate: Fraction, bits: int):
        self.num, self.den = rate.numerator, rate.denominator
        top = ((1 << bits) - 1) * self.num + self.den - 1
        self.shift = top.bit_length() + self.den.bit_length()
        self.mult = -(-(1 << self.shift) // self.den)
        if (self.mult * self.den - (1 << self.shift)) * top >= 1 << self.shift:
            raise ValueError(f"no exact reciprocal of {rate!r} over {bits}-bit byte counts")

    def __call__(self, x):
        """ceil(x * rate) of an int or an Amaranth value."""
        return ((x * self.num + self.den - 1) * self.mult) >> self.shift


def hbm_range_bytes(fpga, addr, nbytes) -> list:
    """Bytes of [addr, addr + nbytes) in each HBM channel, as Amaranth values
    (`trimem.timing.hbm_channel_bytes`), for power-of-two channels and interleave."""
    step, channels = fpga.hbm_interleave_bytes, fpga.hbm_channels
    period = exact_log2(step * channels)

    def prefix(x, c):
        """Bytes of [0, x) in channel c: `step` per whole period, then the period's rest
        less the channels before c, clamped to a step."""
        rest = x[:period]
        part = Mux(rest > c * step, rest - c * step, 0)
        return ((x >> period) << exact_log2(step)) + Mux(part > step, step, part)

    end = addr + nbytes
    return [prefix(end, c) - prefix(addr, c) for c in range(channels)]


def request_layout(resources: int) -> data.StructLayout:
    """A hold: which resources, the cycle the instruction issued, its earliest start, its length."""
    return data.StructLayout({"mask": resources, "issued": CYCLE_BITS,
                              "earliest": CYCLE_BITS, "cycles": CYCLE_BITS})


def client_signature(resources: int) -> wiring.Signature:
    """The port of one client, as the client sees it (`Out` towards `Reservations`)."""
    return wiring.Signature({
        "request": Out(stream.Signature(request_layout(resources))),
        "start": In(CYCLE_BITS),
        "pending": Out(1),
        "pending_issued": Out(CYCLE_BITS),
        "pending_mask": Out(resources),
    })


class Reservations(wiring.Component):
    """Free times of `resources` and the grants of their clients, in emulator event order.

    Parameters
    ----------
    resources : tuple of str
        Resource names (bit i of a mask is resources[i]).
    clients : tuple of str
        Client names in ascending engine id: the earlier wins a tie of issue cycles.

    Members
    -------
    now : Out(CYCLE_BITS)
        Cycles since reset: the time base of `issued`, `earliest` and `start`.
    <client> : In(client_signature(len(resources)))
    """

    def __init__(self, resources: tuple[str, ...], clients: tuple[str, ...]):
        if not resources or len(set(resources)) != len(resources):
            raise ValueError(f"resources must be distinct names, got {resources!r}")
        if not clients or len(set(clients)) != len(clients):
            raise ValueError(f"clients must be distinct names, got {clients!r}")
        self.resources, self.clients = tuple(resources), tuple(clients)
        ports = {"now": Out(CYCLE_BITS)}
        ports.update({name: In(client_signature(len(resources))) for name in clients})
        super().__init__(ports)

    def index(self, name: str) -> int:
        """Bit of resource `name` in a mask."""
        return self.resources.index(name)

    def elaborate(self, platform):
        m = Module()
        m.d.sync += self.now.eq(self.now + 1)
        free = [Signal(CYCLE_BITS, name=f"free_{r}") for r in self.resources]
        ports = [getattr(self, name) for name in self.clients]

        def before(j, issued_j, i, issued_i):
            """Client j's event comes before client i's (issue cycle, then engine order)."""
            return (issued_j < issued_i) | ((issued_j == issued_i) & (j < i))

        # -- grants: a request waits for every earlier one that shares a resource -----------
        for i, port in enumerate(ports):
            req = port.request.payload
            blocked = []
            for j, other in enumerate(ports):
                if j == i:
                    continue
                o = other.request.payload
                blocked.append(other.request.valid & (o.mask & req.mask).any()
                               & before(j, o.issued, i, req.issued))
                blocked.append(other.pending & (other.pending_mask & req.mask).any()
                               & before(j, other.pending_issued, i, req.issued))
            start = req.earliest
            for r, f in enumerate(free):
                start = Mux(req.mask[r] & (f > start), f, start)
            start_sig = Signal(CYCLE_BITS, name=f"start_{self.clients[i]}")
            grant = port.request.valid & ~Cat(*blocked).any()
            m.d.comb += [start_sig.eq(start), port.start.eq(start_sig),
                         port.request.ready.eq(grant)]
            with m.If(grant):
                for r, f in enumerate(free):
                    with m.If(req.mask[r]):
                        m.d.sync += f.eq(start_sig + req.cycles)
        return m
