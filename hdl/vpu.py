"""The VPU datapath: `lanes` fx lanes that run the integer special functions of `trimem`.

`VectorUnit` is a fixed three-stage pipeline (operand read, function/LUT, round-saturate;
the SRAM write port is the fourth, `trimem.timing.VPU_FILL`) over one chunk of `lanes`
elements per cycle:

- `ADD`: `sat32(a + b)` (trimem.special.add_sat).
- `SILUMUL`: `sat32(rshift_round(silu(a) * b, ACT_FRAC))` (trimem.special.silu_mul), with
  exp_fx's table `EXP_LUT` as a ROM read per lane, the sigmoid's divide-and-round as a
  restoring divider, and every rounding as in special.py.
- `ROPE`: one rotated element per lane (trimem.special.rope): with its partner element p
  (i + d/2 in the first half of a head, i - d/2 in the second) and the table's c, s,
  `sat32(rshift_round(x c - p s, ROPE_FRAC))` resp. `x c + p s`.
- `AMAX` then `QUANT`: the two passes of trimem.numerics.quantize_act. AMAX keeps the row's
  max |x| and, on the row's last chunk, encodes the scale code and looks up the row's
  reciprocal `floor((127 << RECIP_SHIFT) / mant)` in a ROM built from numerics' own
  `_reciprocal`, so QUANT chunks of the row start the next cycle;
  QUANT gives `clip(rshift_round(x * R, RECIP_SHIFT + exp), -127, 127)`.

Amaranth expression helpers (`rshift_round`, `saturate`, `bit_length`, `encode_amax`) build
the same integer operations as the numpy definitions, for any shift amount the contract allows.
"""
from __future__ import annotations

import numpy as np
from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from trimem import numerics, special
from trimem.numerics import (ACT_EXP_MAX, ACT_FRAC, ACT_QMAX, INT32_MAX, RECIP_SHIFT,
                             SCALE_MANT_BITS)

FX_BITS = INT32_MAX.bit_length() + 1
"""Width of an fx value (int32)."""
A8_BITS = ACT_QMAX.bit_length() + 1
"""Width of a quantized activation (int8)."""
EXP_BITS = 8
"""Width of a scale-code exponent as stored (u8)."""
ROW_EXP = range(ACT_EXP_MAX + 1)
"""Shape of a row's scale exponent inside the unit: encode_amax of an int32 row gives at most
ACT_EXP_MAX."""
QUANT_BITS = (ACT_QMAX << (RECIP_SHIFT + ACT_EXP_MAX)).bit_length() + 1
"""Width of x * R in QUANT: |x| <= mant << exp and R <= (127 << RECIP_SHIFT) / mant bound it
by 127 << (RECIP_SHIFT + exp)."""
EXP_SHIFT = special.LOG2E_SHIFT + ACT_FRAC - special.EXP_LUT_BITS
"""Fraction bits exp_fx drops from u * LOG2E_MULT to index its table."""
EXP_WHOLE = range(((-special.EXP_INPUT_MIN * special.LOG2E_MULT) >> EXP_SHIFT
                   >> special.EXP_LUT_BITS) + 2)
"""Shape of exp_fx's whole power of two n at the input clamp (n <= 23, plus rounding)."""
EXP_LUT_WIDTH = int(special.EXP_LUT.max()).bit_length()
"""Width of an exp_fx table entry (18 bits: 2**17 at index 0)."""
RECIP_TABLE = numerics._reciprocal(ACT_QMAX, np.arange(1, 1 << SCALE_MANT_BITS, dtype=np.int64))
"""floor((127 << RECIP_SHIFT) / mant) for mant = 1 .. 2**SCALE_MANT_BITS - 1 (quantize_act)."""
RECIP_BITS = int(RECIP_TABLE.max()).bit_length()
"""Width of a row reciprocal (39 bits: 127 << 32 at mant = 1)."""
SIG_BITS = special.SIGMOID_FRAC + 1
"""Width of a sigmoid in Q0.SIGMOID_FRAC, which reaches 1.0 = 2**SIGMOID_FRAC."""
ROPE_BITS = special.rope_table(np.zeros(1), 1)[0].dtype.itemsize * 8
"""Width of a RoPE table entry (Q1.ROPE_FRAC, the dtype special.rope_table builds)."""
MAX_LANES = 256
"""Most lanes a VPU is built with."""


class VpuOp(enum.Enum, shape=3):
    """What the lanes do with a chunk."""
    ADD = 0
    SILUMUL = 1
    AMAX = 2
    QUANT = 3
    ROPE = 4


# ---------------------------------------------------------------------------------------------
# Expression helpers
# ---------------------------------------------------------------------------------------------

def rshift_round(x, s):
    """x / 2**s rounded half up with an arithmetic shift, for an unsigned shift value s >= 0
    (trimem.numerics.rshift_round; s = 0 returns x).

    The half is built `len(x) + 1` bits wide: a shift past that leaves 0 for every x, and
    Amaranth would otherwise widen `1 << s` by 2**len(s) - 1 bits.
    """
    width = len(x) + 1
    half = ((Const(1, unsigned(width)) << s) >> 1)[:width]
    total = (x.as_signed() if x.shape().signed else x) + half
    if isinstance(s, int) or (1 << len(s)) - 1 <= width:
        return total >> s
    return Mux(s > width, 0, total >> s)


def saturate(x, bits: int):
    """Clamp to the signed `bits`-bit range (trimem.numerics.sat)."""
    hi, lo = (1 << (bits - 1)) - 1, -(1 << (bits - 1))
    return Mux(x > hi, hi, Mux(x < lo, lo, x))


def bit_length(m, x, name: str):
    """A Signal holding x's bit length (x unsigned): a priority encoder."""
    out = Signal(range(len(x) + 1), name=name)
    for i in range(len(x)):
        with m.If(x[i]):
            m.d.comb += out.eq(i + 1)
    return out


def encode_amax(m, amax, name: str = "code"):
    """(mant, exp) Signals of trimem.numerics.encode_amax for unsigned amax."""
    top = Signal(len(amax), name=f"{name}_top")
    m.d.comb += top.eq(Mux(amax == 0, 1, amax))
    length = bit_length(m, top, f"{name}_len")
    exp = Signal(ROW_EXP, name=f"{name}_exp0")
    m.d.comb += exp.eq(Mux(length > SCALE_MANT_BITS, length - SCALE_MANT_BITS, 0))
    rounded = Signal(SCALE_MANT_BITS + 1, name=f"{name}_rounded")
    step = (Const(1, len(amax) + 1) << exp)[:len(amax) + 1]
    m.d.comb += rounded.eq((top + step - 1) >> exp)
    carry = rounded[SCALE_MANT_BITS]
    mant = Signal(SCALE_MANT_BITS, name=f"{name}_mant")
    final_exp = Signal(ROW_EXP, name=f"{name}_exp")
    m.d.comb += [mant.eq(rounded >> carry), final_exp.eq(exp + carry)]
    return mant, final_exp


def divide(m, num, den, bits: int, name: str):
    """floor(num / den) as a Signal of `bits` bits, by restoring division (one stage per
    quotient bit); requires num < den << bits."""
    rem = num >> bits
    quotient = []
    for i in reversed(range(bits)):
        trial = Signal(len(den) + 1, name=f"{name}_r{i}")
        m.d.comb += trial.eq(Cat(num[i], rem))
        ge = trial >= den
        quotient.append(ge)
        rem = Mux(ge, trial - den, trial)
    out = Signal(bits, name=name)
    m.d.comb += out.eq(Cat(*reversed(quotient)))
    return out


# ---------------------------------------------------------------------------------------------
# The lanes
# ---------------------------------------------------------------------------------------------

def slot_layout(lanes: int) -> data.StructLayout:
    """One chunk in: operation, operands, live lanes, and its place in the row; for ROPE also
    the table's cos and sin per lane and whether the chunk is in the second half of a head."""
    return data.StructLayout({"op": VpuOp, "a": data.ArrayLayout(signed(FX_BITS), lanes),
                              "b": data.ArrayLayout(signed(FX_BITS), lanes),
                              "cos": data.ArrayLayout(signed(ROPE_BITS), lanes),
                              "sin": data.ArrayLayout(signed(ROPE_BITS), lanes),
                              "second": 1, "count": range(lanes + 1), "first": 1, "last": 1})


def result_layout(lanes: int) -> data.StructLayout:
    """One chunk out: fx results (ADD, SILUMUL), a8 results (QUANT), and after a row's last
    AMAX chunk the row's scale code."""
    return data.StructLayout({"op": VpuOp, "y": data.ArrayLayout(signed(FX_BITS), lanes),
                              "q": data.ArrayLayout(signed(A8_BITS), lanes),
                              "mant": unsigned(SCALE_MANT_BITS), "exp": unsigned(EXP_BITS),
                              "count": range(lanes + 1), "last": 1})


class VectorUnit(wiring.Component):
    """`lanes` fx lanes: ADD, SILUMUL, ROPE, and the AMAX / QUANT passes of quantize_act.

    A chunk on `i_slot` in cycle c gives its result on `o_slot` in cycle c + 2 (two registers,
    then round-saturate feeding the output combinationally). A row's QUANT chunks may follow
    its last AMAX chunk in the very next cycle. The pipeline never stalls: `i_slot.ready` is
    always 1 and `o_slot.ready` is not looked at.

    Parameters
    ----------
    lanes : int

    Members
    -------
    i_slot : In(stream.Signature(slot_layout(lanes)))
    o_slot : Out(stream.Signature(result_layout(lanes)))
    """

    def __init__(self, lanes: int):
        if not isinstance(lanes, int) or not 1 <= lanes <= MAX_LANES:
            raise ValueError(f"vpu_lanes must be an int in [1, {MAX_LANES}], got {lanes!r}")
        self.lanes = lanes
        super().__init__({
            "i_slot": In(stream.Signature(slot_layout(lanes))),
            "o_slot": Out(stream.Signature(result_layout(lanes)))})

    def elaborate(self, platform):
        m = Module()
        lanes = self.lanes
        slot = self.i_slot.payload
        m.d.comb += self.i_slot.ready.eq(1)
        m.submodules.exp_lut = exp_lut = Memory(shape=EXP_LUT_WIDTH, depth=len(special.EXP_LUT),
                                                init=[int(v) for v in special.EXP_LUT])
        m.submodules.recip = recip = Memory(shape=RECIP_BITS, depth=1 << SCALE_MANT_BITS,
                                            init=[0] + [int(v) for v in RECIP_TABLE])

        # -- control travelling with the chunk ------------------------------------------------
        ctl = data.StructLayout({"valid": 1, "op": VpuOp, "count": range(lanes + 1), "last": 1,
                                 "mant": unsigned(SCALE_MANT_BITS), "exp": unsigned(EXP_BITS)})
        ctl1, ctl2 = Signal(ctl), Signal(ctl)
        m.d.sync += [ctl1.valid.eq(self.i_slot.valid), ctl1.op.eq(slot.op),
                     ctl1.count.eq(slot.count), ctl1.last.eq(slot.last), ctl2.eq(ctl1)]

        # -- AMAX: the row maximum, its scale code and reciprocal -----------------------------
        amax = Signal(FX_BITS + 1)
        row_exp = Signal(ROW_EXP)
        chunk_max = Const(0, FX_BITS + 1)
        for i in range(lanes):
            mag = Mux(slot.a[i] < 0, -slot.a[i], slot.a[i])
            live = Mux(i < slot.count, mag, 0)
            top = Signal(FX_BITS + 1, name=f"amax{i}")
            m.d.comb += top.eq(Mux(live > chunk_max, live, chunk_max))
            chunk_max = top
        row_max = Signal(FX_BITS + 1)
        m.d.comb += row_max.eq(Mux(slot.first | (chunk_max > amax), chunk_max, amax))
        mant, exp = encode_amax(m, row_max)
        is_amax = self.i_slot.valid & (slot.op == VpuOp.AMAX)
        with m.If(is_amax):
            m.d.sync += amax.eq(row_max)
            with m.If(slot.last):
                m.d.sync += [row_exp.eq(exp), ctl1.mant.eq(mant), ctl1.exp.eq(exp)]
        recip_rd = recip.read_port()
        m.d.comb += [recip_rd.addr.eq(mant), recip_rd.en.eq(is_amax & slot.last)]

        # -- stage 1: operands in -------------------------------------------------------------
        add1 = Signal(data.ArrayLayout(signed(FX_BITS), lanes))
        prod1 = Signal(data.ArrayLayout(signed(QUANT_BITS), lanes))
        a1 = Signal(data.ArrayLayout(signed(FX_BITS), lanes))
        b1 = Signal(data.ArrayLayout(signed(FX_BITS), lanes))
        n1 = Signal(data.ArrayLayout(EXP_WHOLE, lanes))
        rot_width = FX_BITS + ROPE_BITS
        cos1 = Signal(data.ArrayLayout(signed(rot_width), lanes))
        sin1 = Signal(data.ArrayLayout(signed(rot_width), lanes))
        second1 = Signal()
        m.d.sync += second1.eq(slot.second)
        luts = []
        for i in range(lanes):
            a, b = slot.a[i], slot.b[i]
            lut = exp_lut.read_port()
            luts.append(lut)
            mag = Mux(a < 0, -a, a)
            u = Signal(range(-special.EXP_INPUT_MIN + 1), name=f"u{i}")
            m.d.comb += u.eq(Mux(mag > -special.EXP_INPUT_MIN, -special.EXP_INPUT_MIN, mag))
            v = Signal(range(EXP_WHOLE.stop << special.EXP_LUT_BITS), name=f"v{i}")
            m.d.comb += v.eq(rshift_round(u * special.LOG2E_MULT, EXP_SHIFT))
            m.d.comb += lut.addr.eq(v[:special.EXP_LUT_BITS])
            m.d.sync += [add1[i].eq(saturate(a + b, FX_BITS)), prod1[i].eq(a * recip_rd.data),
                         a1[i].eq(a), b1[i].eq(b), n1[i].eq(v >> special.EXP_LUT_BITS),
                         cos1[i].eq(a * slot.cos[i]), sin1[i].eq(b * slot.sin[i])]

        # -- stage 2: function / LUT ----------------------------------------------------------
        add2 = Signal(data.ArrayLayout(signed(FX_BITS), lanes))
        rot2 = Signal(data.ArrayLayout(signed(rot_width + 1), lanes))
        q2 = Signal(data.ArrayLayout(signed(A8_BITS), lanes))
        a2 = Signal(data.ArrayLayout(signed(FX_BITS), lanes))
        b2 = Signal(data.ArrayLayout(signed(FX_BITS), lanes))
        sig2 = Signal(data.ArrayLayout(unsigned(SIG_BITS), lanes))
        for i in range(lanes):
            lut = luts[i]
            e = Signal(special.EXP_FRAC + 1, name=f"e{i}")
            m.d.comb += e.eq(rshift_round(lut.data, n1[i] + special.EXP_LUT_GUARD))
            den = Signal(special.EXP_FRAC + 2, name=f"den{i}")
            m.d.comb += den.eq((1 << special.EXP_FRAC) + e)
            num = Signal(special.SIGMOID_FRAC + special.EXP_FRAC + 2, name=f"num{i}")
            m.d.comb += num.eq((e << special.SIGMOID_FRAC) + (den >> 1))
            low = divide(m, num, den, SIG_BITS, f"low{i}")
            q = rshift_round(prod1[i], RECIP_SHIFT + row_exp)
            turn = Mux(second1, cos1[i] + sin1[i], cos1[i] - sin1[i])
            m.d.sync += [add2[i].eq(add1[i]), a2[i].eq(a1[i]), b2[i].eq(b1[i]),
                         rot2[i].eq(rshift_round(turn, special.ROPE_FRAC)),
                         sig2[i].eq(Mux(a1[i] >= 0, (1 << special.SIGMOID_FRAC) - low, low)),
                         q2[i].eq(Mux(q > ACT_QMAX, ACT_QMAX, Mux(q < -ACT_QMAX, -ACT_QMAX, q)))]

        # -- stage 3: round and saturate into the output --------------------------------------
        out = self.o_slot.payload
        m.d.comb += [self.o_slot.valid.eq(ctl2.valid), out.op.eq(ctl2.op),
                     out.count.eq(ctl2.count), out.last.eq(ctl2.last),
                     out.mant.eq(ctl2.mant), out.exp.eq(ctl2.exp)]
        for i in range(lanes):
            silu = Signal(signed(FX_BITS + 1), name=f"silu{i}")
            m.d.comb += silu.eq(rshift_round(a2[i] * sig2[i], special.SIGMOID_FRAC))
            prod = rshift_round(silu * b2[i], ACT_FRAC)
            with m.Switch(ctl2.op):
                with m.Case(VpuOp.ADD):
                    m.d.comb += out.y[i].eq(add2[i])
                with m.Case(VpuOp.ROPE):
                    m.d.comb += out.y[i].eq(saturate(rot2[i], FX_BITS))
                with m.Default():
                    m.d.comb += out.y[i].eq(saturate(prod, FX_BITS))
            m.d.comb += out.q[i].eq(q2[i])
        return m

