"""The MXU datapath: cascaded DSP chains, N:M activation select, group multipliers, requant.

A `MacStage` is one multiply-accumulate shaped like a DSP48 slice in cascade: `p <= pcin +
a * w` (int8 x int12 into a 32-bit wrapping sum), the chain's last stage adding its own `p`
across the steps of one dot product (the DSP48 P feedback). A `DspChain` cascades L stages
systolically: lane i's operands are delayed i cycles so that the partial sum meets them, so a
step enters every cycle and leaves L cycles later (`trimem.timing.mxu_fill`). `ChainArray`
runs C chains in lockstep on one activation window: "load as sparse, compute as dense"
(FlightLLM, FPGA'24, section 4): each lane's N:M index selects its activation from the window,
its effective weight is `q * g` (trimem.numerics.effective_weight), and `Requant` turns each
finished dot product into fx with `trimem.numerics.linear`'s rule.
"""
from __future__ import annotations

from amaranth.hdl import Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from trimem.hdl.vpu import EXP_BITS, rshift_round, saturate
from trimem.numerics import (ACT_QMAX, GROUP_MAX, GROUP_SCALE_BITS, INT32_MAX,
                             REQUANT_SHIFT_MAX, SCALE_MANT_BITS, nm_index_bits, qmax)

ACT_BITS = ACT_QMAX.bit_length() + 1
"""Width of an a8 activation (int8)."""
W_EFF_BITS = (qmax(8) * GROUP_MAX).bit_length() + 1
"""Width of an effective weight q * g: |q * g| <= 127 * 15 fits int12."""
ACC_BITS = INT32_MAX.bit_length() + 1
"""Width of the wrapping accumulators (int32)."""
SCALE_BITS = 2 * SCALE_MANT_BITS
"""Width of mult * mant: both below 2**SCALE_MANT_BITS."""
AMOUNT_BITS = REQUANT_SHIFT_MAX.bit_length()
"""Width of a requant shift amount shift - exp, in [0, REQUANT_SHIFT_MAX]."""
MAX_CHAIN_LENGTH = 64
"""Longest chain built: a longer cascade leaves the DSP column of any FPGA we target."""


def times(x, c: int):
    """x * c for a constant c >= 0 as shifted adds, so synthesis spends no multiplier on it."""
    terms = [x << i for i in range(c.bit_length()) if c >> i & 1]
    if not terms:
        return Const(0)
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total


def check_chain_shape(chains: int, length: int, patterns) -> None:
    """ValueError naming the problem for chain shapes the RTL cannot build."""
    if not isinstance(chains, int) or chains < 1:
        raise ValueError(f"dsp_chains must be a positive int, got {chains!r}")
    if not isinstance(length, int) or not 2 <= length <= MAX_CHAIN_LENGTH \
            or length & (length - 1):
        raise ValueError(f"chain_length {length!r} must be a power of two in "
                         f"[2, {MAX_CHAIN_LENGTH}]; the RTL steps K by whole chains")
    for keep, m in patterns:
        if m & (m - 1):
            raise ValueError(f"N:M pattern {keep}:{m} has m = {m}, not a power of two; the RTL "
                             f"splits positions into block and index by bit fields")
        if length % keep or length * nm_index_bits(m) % 8:
            raise ValueError(f"N:M pattern {keep}:{m} does not fit chain_length {length}: a "
                             f"step must hold whole blocks ({length} % {keep} == 0) and whole "
                             f"index bytes ({length} * {nm_index_bits(m)} bits % 8 == 0)")


def window_bytes(length: int, patterns) -> int:
    """Activation bytes one step of a chain spans: length / n_keep blocks of m, widest pattern."""
    return max(length // keep * m for keep, m in patterns)


def group_window_bytes(length: int, patterns) -> int:
    """Group-multiplier bytes one step can touch: groups of 2 or more over the widest window."""
    return window_bytes(length, patterns) // 2 + 1


# ---------------------------------------------------------------------------------------------
# One chain
# ---------------------------------------------------------------------------------------------

class MacStage(wiring.Component):
    """One DSP48-shaped stage: `p <= pcin + a * w`, wrapping at 32 bits.

    Parameters
    ----------
    accumulate : bool
        The chain's last stage also adds its own `p` unless `first` (the P feedback that sums
        the steps of one dot product).

    Members
    -------
    a : In(signed(ACT_BITS))
    w : In(signed(W_EFF_BITS))
    pcin : In(signed(ACC_BITS))
        The previous stage's `p` (cascade input).
    en : In(1)
        Update `p` this cycle.
    first : In(1)
        With `accumulate`: start a new sum instead of adding `p`.
    p : Out(signed(ACC_BITS))
    """

    def __init__(self, *, accumulate: bool = False):
        self.accumulate = accumulate
        super().__init__({"a": In(signed(ACT_BITS)), "w": In(signed(W_EFF_BITS)),
                          "pcin": In(signed(ACC_BITS)), "en": In(1), "first": In(1),
                          "p": Out(signed(ACC_BITS))})

    def elaborate(self, platform):
        m = Module()
        total = self.pcin + self.a * self.w
        if self.accumulate:
            total = total + Mux(self.first, 0, self.p)
        with m.If(self.en):
            m.d.sync += self.p.eq(total[:ACC_BITS])
        return m


def step_layout(length: int) -> data.StructLayout:
    """One step of a chain: an activation and an effective weight per lane, and the flags of
    the dot product it belongs to."""
    return data.StructLayout({"a": data.ArrayLayout(signed(ACT_BITS), length),
                              "w": data.ArrayLayout(signed(W_EFF_BITS), length),
                              "first": 1, "last": 1})


class DspChain(wiring.Component):
    """L cascaded MAC stages; one step of L products enters per cycle.

    A dot product is a run of steps from one with `first` to one with `last`; its int32 sum
    (wrapping) leaves on `o_dot` L cycles after its last step entered. The pipeline stalls as a
    whole while `o_dot` is valid and not ready.

    Members
    -------
    i_step : In(stream.Signature(step_layout(length)))
    o_dot : Out(stream.Signature(signed(ACC_BITS)))
    """

    def __init__(self, length: int):
        check_chain_shape(1, length, [(1, 1)])
        self.length = length
        super().__init__({"i_step": In(stream.Signature(step_layout(length))),
                          "o_dot": Out(stream.Signature(signed(ACC_BITS)))})

    def elaborate(self, platform):
        m = Module()
        length = self.length
        advance = Signal()
        m.d.comb += [advance.eq(~self.o_dot.valid | self.o_dot.ready),
                     self.i_step.ready.eq(advance)]
        step = self.i_step.payload

        # -- skew: lane i's operands wait i cycles for the partial sum ------------------------
        valid = [self.i_step.valid]
        first, last = [step.first], [step.last]
        for i in range(1, length + 1):
            for pipe, name in ((valid, "valid"), (first, "first"), (last, "last")):
                reg = Signal(name=f"{name}_{i}")
                with m.If(advance):
                    m.d.sync += reg.eq(pipe[-1])
                pipe.append(reg)

        # -- the cascade ----------------------------------------------------------------------
        pcin = Const(0, signed(ACC_BITS))
        for i in range(length):
            a, w = step.a[i], step.w[i]
            for d in range(i):
                a_reg = Signal(signed(ACT_BITS), name=f"a{i}_d{d}")
                w_reg = Signal(signed(W_EFF_BITS), name=f"w{i}_d{d}")
                with m.If(advance):
                    m.d.sync += [a_reg.eq(a), w_reg.eq(w)]
                a, w = a_reg, w_reg
            is_last = i == length - 1
            stage = MacStage(accumulate=is_last)
            m.submodules[f"mac{i}"] = stage
            m.d.comb += [stage.a.eq(a), stage.w.eq(w), stage.pcin.eq(pcin),
                         stage.en.eq(advance & valid[i] if is_last else advance),
                         stage.first.eq(first[i])]
            pcin = stage.p

        m.d.comb += [self.o_dot.payload.eq(pcin), self.o_dot.valid.eq(valid[length] & last[length])]
        return m


# ---------------------------------------------------------------------------------------------
# Requantization
# ---------------------------------------------------------------------------------------------

def requant_layout() -> data.StructLayout:
    """A finished dot product with its factor mult * mant and shift amount shift - exp."""
    return data.StructLayout({"acc": signed(ACC_BITS), "scale": unsigned(SCALE_BITS),
                              "amount": unsigned(AMOUNT_BITS)})


class Requant(wiring.Component):
    """`sat32(rshift_round(acc * scale, amount))`, trimem.numerics.linear's output rule.

    One register (the product), then round half up, arithmetic shift and saturation, which
    feed the output combinationally (the SRAM write port is the last register). Amounts are
    those of the contract, 0..REQUANT_SHIFT_MAX (a requant shift is never below the largest
    scale exponent, so the shift never goes left).

    Members
    -------
    i_value : In(stream.Signature(requant_layout()))
    o_value : Out(stream.Signature(signed(ACC_BITS)))
    """

    def __init__(self):
        super().__init__({"i_value": In(stream.Signature(requant_layout())),
                          "o_value": Out(stream.Signature(signed(ACC_BITS)))})

    def elaborate(self, platform):
        m = Module()
        advance = ~self.o_value.valid | self.o_value.ready
        m.d.comb += self.i_value.ready.eq(advance)
        value = self.i_value.payload

        # -- stage 1: the 64-bit product ------------------------------------------------------
        product = Signal(signed(ACC_BITS + SCALE_BITS + 1))
        amount = Signal(unsigned(AMOUNT_BITS))
        with m.If(advance):
            m.d.sync += [product.eq(value.acc * value.scale), amount.eq(value.amount),
                         self.o_value.valid.eq(self.i_value.valid)]

        # -- stages 2 and 3: round half up, shift, saturate -----------------------------------
        m.d.comb += self.o_value.payload.eq(saturate(rshift_round(product, amount), ACC_BITS))
        return m


# ---------------------------------------------------------------------------------------------
# Parallel chains
# ---------------------------------------------------------------------------------------------

def act_layout(length: int, patterns) -> data.StructLayout:
    """One step's activation side, shared by every chain.

    window: the step's activations (positions s * W .. s * W + W - 1 of the row, W =
    length / n_keep * m); nm: pattern index; bits4: 4-bit weights; group_log2 (0: one group per
    row); goff: position of the window inside its group; lanes: lanes holding kept values (the
    last step of a row may hold fewer); mant, exp: the row's scale code (read with the last step).
    """
    return data.StructLayout({
        "window": data.ArrayLayout(signed(ACT_BITS), window_bytes(length, patterns)),
        "nm": range(len(patterns)), "bits4": 1, "group_log2": 4,
        "goff": unsigned(15), "lanes": range(length + 1),
        "mant": unsigned(SCALE_MANT_BITS), "exp": unsigned(EXP_BITS),
        "first": 1, "last": 1})


def chain_weights_layout(length: int, patterns) -> data.StructLayout:
    """One chain's share of a step: packed values, N:M indices and group multipliers as read,
    and its channel's requant pair (read with the last step)."""
    index_bits = max(nm_index_bits(m) for _, m in patterns)
    return data.StructLayout({
        "values": unsigned(8 * length),
        "indices": unsigned(max(length * index_bits, 1)),
        "groups": data.ArrayLayout(unsigned(8), group_window_bytes(length, patterns)),
        "mult": unsigned(SCALE_MANT_BITS), "shift": unsigned(EXP_BITS)})


def weights_layout(chains: int, length: int, patterns) -> data.StructLayout:
    """The weight side of a step: every chain's share, and how many chains hold a channel."""
    return data.StructLayout({
        "chain": data.ArrayLayout(chain_weights_layout(length, patterns), chains),
        "count": range(chains + 1)})


def result_layout(chains: int) -> data.StructLayout:
    """Requantized fx outputs of one row and group of channels; `count` of them are real."""
    return data.StructLayout({"y": data.ArrayLayout(signed(ACC_BITS), chains),
                              "count": range(chains + 1)})


class ChainArray(wiring.Component):
    """C DSP chains sharing an activation window, with N:M select and requant per chain.

    A step fires when both `i_act` and `i_weights` are valid (and the output can move). Lane
    i of chain c takes value i of its packed values (a nibble, low first, for 4-bit weights),
    its N:M index selects the activation at `(i // n_keep) * m + index` of the window, and its
    group multiplier is byte `(goff + position) >> group_log2` of the chain's group bytes; the
    lane's weight is `q * g`, or 0 beyond `lanes`. The row's dot product leaves the chain L
    cycles after its last step; `o_result` carries it requantized one cycle later (L + 1 after
    the last step, `trimem.timing.mxu_fill` counting the SRAM read and write around it).

    Parameters
    ----------
    chains, length : int
        C chains of L stages.
    patterns : sequence of (n_keep, m)
        The config's `nm_patterns` (index 0 dense).

    Members
    -------
    i_act : In(stream.Signature(act_layout(length, patterns)))
    i_weights : In(stream.Signature(weights_layout(chains, length, patterns)))
    o_result : Out(stream.Signature(result_layout(chains)))
    """

    def __init__(self, chains: int, length: int, patterns):
        patterns = tuple((int(n), int(m)) for n, m in patterns)
        check_chain_shape(chains, length, patterns)
        self.chains, self.length, self.patterns = chains, length, patterns
        super().__init__({
            "i_act": In(stream.Signature(act_layout(length, patterns))),
            "i_weights": In(stream.Signature(weights_layout(chains, length, patterns))),
            "o_result": Out(stream.Signature(result_layout(chains)))})

    def _lane(self, m, act, share, i):
        """(a, w) of lane i of one chain: activation select, q * g, masking."""
        q4 = share.values[4 * i:4 * i + 4].as_signed()
        q8 = share.values[8 * i:8 * i + 8].as_signed()
        q = Signal(signed(ACT_BITS), name=f"q{i}")
        m.d.comb += q.eq(Mux(act.bits4, q4, q8))

        pos = Signal(range(len(act.window)), name=f"pos{i}")
        a = Signal(signed(ACT_BITS), name=f"a{i}")
        with m.Switch(act.nm):
            for p, (keep, block) in enumerate(self.patterns):
                bits = nm_index_bits(block)
                base = i // keep * block
                with m.Case(p):
                    index = share.indices[bits * i:bits * (i + 1)] if bits else Const(0, 1)
                    m.d.comb += pos.eq(base + index)
                    with m.Switch(index):
                        for j in range(block):
                            with m.Case(j):
                                m.d.comb += a.eq(act.window[base + j])

        offset = Signal(range(len(share.groups)), name=f"goff{i}")
        m.d.comb += offset.eq(Mux(act.group_log2 == 0, 0, (act.goff + pos) >> act.group_log2))
        g = Signal(unsigned(GROUP_SCALE_BITS), name=f"g{i}")
        with m.Switch(offset):
            for j in range(len(share.groups)):
                with m.Case(j):
                    m.d.comb += g.eq(share.groups[j][:GROUP_SCALE_BITS])
        w = Signal(signed(W_EFF_BITS), name=f"w{i}")
        m.d.comb += w.eq(Mux(i < act.lanes, sum(Mux(g[b], q << b, 0)
                                                for b in range(GROUP_SCALE_BITS)), 0))
        return a, w

    def elaborate(self, platform):
        m = Module()
        chains, length = self.chains, self.length
        act, weights = self.i_act.payload, self.i_weights.payload

        # -- chains and requant units ---------------------------------------------------------
        dsp = [DspChain(length) for _ in range(chains)]
        req = [Requant() for _ in range(chains)]
        for c in range(chains):
            m.submodules[f"chain{c}"] = dsp[c]
            m.submodules[f"requant{c}"] = req[c]

        # -- join the two input streams -------------------------------------------------------
        advance = dsp[0].i_step.ready
        fire = self.i_act.valid & self.i_weights.valid & advance
        m.d.comb += [self.i_act.ready.eq(self.i_weights.valid & advance),
                     self.i_weights.ready.eq(self.i_act.valid & advance)]

        # -- lanes: N:M select and effective weights ------------------------------------------
        for c in range(chains):
            lanes = m.submodules[f"lanes{c}"] = Module()
            for i in range(length):
                a, w = self._lane(lanes, act, weights.chain[c], i)
                m.d.comb += [dsp[c].i_step.payload.a[i].eq(a), dsp[c].i_step.payload.w[i].eq(w)]
            m.d.comb += [dsp[c].i_step.payload.first.eq(act.first),
                         dsp[c].i_step.payload.last.eq(act.last),
                         dsp[c].i_step.valid.eq(fire),
                         dsp[c].o_dot.ready.eq(req[c].i_value.ready)]

        # -- requant factors travel beside the chain: mult * mant on the way ----------------
        delay = data.StructLayout({"scale": data.ArrayLayout(unsigned(SCALE_BITS), chains),
                                   "amount": data.ArrayLayout(unsigned(AMOUNT_BITS), chains),
                                   "count": range(chains + 1)})
        entry = Signal(delay)
        for c in range(chains):
            share = weights.chain[c]
            m.d.comb += [entry.scale[c].eq(share.mult * act.mant),
                         entry.amount[c].eq(share.shift - act.exp)]
        m.d.comb += entry.count.eq(weights.count)
        stage = entry
        for d in range(length):
            reg = Signal(delay, name=f"factors_d{d}")
            with m.If(advance):
                m.d.sync += reg.eq(stage)
            stage = reg

        # -- requant and output ---------------------------------------------------------------
        count = Signal(range(chains + 1))
        with m.If(req[0].i_value.ready):
            m.d.sync += count.eq(stage.count)
        for c in range(chains):
            m.d.comb += [req[c].i_value.payload.acc.eq(dsp[c].o_dot.payload),
                         req[c].i_value.payload.scale.eq(stage.scale[c]),
                         req[c].i_value.payload.amount.eq(stage.amount[c]),
                         req[c].i_value.valid.eq(dsp[c].o_dot.valid),
                         req[c].o_value.ready.eq(self.o_result.ready),
                         self.o_result.payload.y[c].eq(req[c].o_value.payload)]
        m.d.comb += [self.o_result.valid.eq(req[0].o_value.valid),
                     self.o_result.payload.count.eq(count)]
        return m
