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
- `RMS_SQ`, `RMS_AMAX` then `RMS_QUANT`: the three passes of trimem.special.rmsnorm_quant.
  The row shift `sh = bits(max|x|) - RMS_IN_BITS` is known only after the row, and each
  x' = rshift_round(x, sh) is rounded, so RMS_SQ keeps the row max and one sum of x'**2 per
  shift the row can have (sh <= 0 is one sum of x**2, scaled after); one squarer per lane
  gives the largest shift's, adds give the others'. In the cycle after the row's last RMS_SQ
  chunk the unit picks its sum, divides by n and normalizes the mean square; the next cycle's
  integer rsqrt feeds the multiply of the first RMS_AMAX chunk, so the scalar work fits the
  pipeline's fill. RMS_AMAX gives y = x' r gamma, rounded and saturated as in rmsnorm, and its
  row max, scale code and reciprocal as AMAX does; RMS_QUANT computes y again and quantizes it
  as QUANT does.

A lane runs one op per stage in a cycle, so each stage of a lane has one multiplier behind
operand muxes, sized for its widest user: stage 1 x c (ROPE), x' gamma (RMSNORM) or exp_fx's
u LOG2E_MULT (SILUMUL); stage 2 p s (ROPE) or x' gamma r (RMSNORM); stage 3 silu(a) b
(SILUMUL), x R (QUANT) or y R (RMS_QUANT), with the row's reciprocal and exponent registered
in stage 2. Only SILUMUL's a sigmoid(a) has a multiplier of its own, in stage 3 before
silu(a) b.

Amaranth expression helpers (`rshift_round`, `saturate`, `bit_length`, `encode_amax`, `rsqrt`) build
the same integer operations as the numpy definitions, for any shift amount the contract allows.
"""
from __future__ import annotations

import numpy as np
from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from trimem import numerics, special
from trimem.hdl.frontend import SIZE_BITS
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
RMS_SHIFTS = FX_BITS - special.RMS_IN_BITS
"""Largest RMSNorm row shift (17, at max |x| = 2**31); rows below 2**14 shift left instead."""
XS_BITS = special.RMS_IN_BITS + 2
"""Width of a shifted RMSNorm element x' (|x'| <= 2**RMS_IN_BITS)."""
SUMSQ_BITS = 2 * special.RMS_IN_BITS + SIZE_BITS
"""Width of a row's sum of x'**2 (at most n * 2**30 for n < 2**16)."""
MEAN_BITS = 2 * special.RMS_IN_BITS + 1
"""Width of the rounded mean of x'**2 (at most 2**30)."""
EPS_BITS = special.EPS_MAX.bit_length()
"""Width of the RMSNorm epsilon code."""
MS_BITS = EPS_BITS + 2 * special.RMS_IN_BITS + 1
"""Width of ms = mean + eps shifted with the row (eps << 30 at sh = -15, below 2**62)."""
MS_TOP = special.RSQRT_BITS - 1
"""bits(ms) at which rmsnorm's normalisation shift e is 0."""
NORM_SHIFT = special.RSQRT_BITS + special.GAMMA_FRAC - ACT_FRAC
"""y = x' r gamma >> (NORM_SHIFT + e) brings Q.RSQRT_BITS x Q.GAMMA_FRAC to fx."""
P1_NARROW = max(ROPE_BITS, XS_BITS, (-special.EXP_INPUT_MIN).bit_length() + 1)
"""Width of stage 1's narrow factor: cos (ROPE), x' (RMSNORM) or exp_fx's clamped |x|
(SILUMUL); the wide factor is an fx operand or LOG2E_MULT."""
P1_BITS = FX_BITS + P1_NARROW
"""Width of stage 1's product."""
P2_BITS = P1_BITS + special._SQRT_STEPS + 1
"""Width of stage 2's product: x' gamma (stage 1's) times r, or p times sin (ROPE)."""
ROT_BITS = FX_BITS + ROPE_BITS + 1
"""Width of ROPE's x c -+ p s."""
P3_BITS = FX_BITS + 1 + RECIP_BITS + 1
"""Width of stage 3's product: silu(a) times b (SILUMUL), or x resp. y times the row's
reciprocal (QUANT, RMS_QUANT)."""
MAX_LANES = 256
"""Most lanes a VPU is built with."""


class VpuOp(enum.Enum, shape=3):
    """What the lanes do with a chunk."""
    ADD = 0
    SILUMUL = 1
    AMAX = 2
    QUANT = 3
    ROPE = 4
    RMS_SQ = 5
    RMS_AMAX = 6
    RMS_QUANT = 7


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


def abs_max(m, values, count, name: str):
    """max |values[i]| over the first `count` lanes (0 for none), FX_BITS + 1 bits wide."""
    top = Const(0, FX_BITS + 1)
    for i, v in enumerate(values):
        live = Mux(i < count, Mux(v < 0, -v, v), 0)
        out = Signal(FX_BITS + 1, name=f"{name}{i}")
        m.d.comb += out.eq(Mux(live > top, live, top))
        top = out
    return top


def clip_q(x):
    """Clamp to the a8 range [-ACT_QMAX, ACT_QMAX] (quantize_act)."""
    return Mux(x > ACT_QMAX, ACT_QMAX, Mux(x < -ACT_QMAX, -ACT_QMAX, x))


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


def rsqrt(m, value, name: str):
    """floor(2**RSQRT_BITS / sqrt(value)) for value in [2**(RSQRT_BITS - 2), 2**RSQRT_BITS]:
    the largest r with r * r * value <= 2**(2 RSQRT_BITS), one result bit per step. This is
    rmsnorm's isqrt(2**60 // m) without the division, since r * r <= floor(2**60 / m)
    exactly when r * r * m <= 2**60.

    Each step keeps root * value and root**2 * value, so that the trial (root + 2**bit)**2 *
    value = root**2 value + 2**(bit + 1) root value + 2**(2 bit) value takes shifts and adds
    instead of multipliers."""
    limit = 1 << 2 * special.RSQRT_BITS
    root = Const(0, special._SQRT_STEPS)
    linear = Const(0, special._SQRT_STEPS + len(value))
    square = Const(0, limit.bit_length())
    for bit in reversed(range(special._SQRT_STEPS)):
        trial = square + (linear << bit + 1) + (value << 2 * bit)
        take = trial <= limit
        step = Signal(special._SQRT_STEPS, name=f"{name}{bit}")
        step_linear = Signal(len(linear), name=f"{name}{bit}_linear")
        step_square = Signal(len(square), name=f"{name}{bit}_square")
        m.d.comb += [step.eq(Mux(take, root | (1 << bit), root)),
                     step_linear.eq(Mux(take, linear + (value << bit), linear)),
                     step_square.eq(Mux(take, trial, square))]
        root, linear, square = step, step_linear, step_square
    return root


def shift_signed(x, left, right):
    """rshift_round(x, right - left) for unsigned shifts of which one is 0 (a left shift when
    left > 0), as rmsnorm shifts by a signed amount."""
    return rshift_round(x << left, right)


# ---------------------------------------------------------------------------------------------
# The lanes
# ---------------------------------------------------------------------------------------------

def slot_layout(lanes: int) -> data.StructLayout:
    """One chunk in: operation, operands, live lanes, and its place in the row; for ROPE also
    the table's cos and sin per lane and whether the chunk is in the second half of a head;
    for RMSNORM the row length and the epsilon code."""
    return data.StructLayout({"op": VpuOp, "a": data.ArrayLayout(signed(FX_BITS), lanes),
                              "b": data.ArrayLayout(signed(FX_BITS), lanes),
                              "cos": data.ArrayLayout(signed(ROPE_BITS), lanes),
                              "sin": data.ArrayLayout(signed(ROPE_BITS), lanes),
                              "second": 1, "count": range(lanes + 1), "first": 1, "last": 1,
                              "n": unsigned(SIZE_BITS), "eps": unsigned(EPS_BITS)})


def result_layout(lanes: int) -> data.StructLayout:
    """One chunk out: fx results (ADD, SILUMUL, ROPE), a8 results (QUANT, RMS_QUANT), and
    after a row's last AMAX or RMS_AMAX chunk the row's scale code."""
    return data.StructLayout({"op": VpuOp, "y": data.ArrayLayout(signed(FX_BITS), lanes),
                              "q": data.ArrayLayout(signed(A8_BITS), lanes),
                              "mant": unsigned(SCALE_MANT_BITS), "exp": unsigned(EXP_BITS),
                              "count": range(lanes + 1), "last": 1})


class VectorUnit(wiring.Component):
    """`lanes` fx lanes: ADD, SILUMUL, ROPE, the AMAX / QUANT passes of quantize_act and the
    RMS_SQ / RMS_AMAX / RMS_QUANT passes of rmsnorm_quant.

    A chunk on `i_slot` in cycle c gives its result on `o_slot` in cycle c + 2 (two registers,
    then round-saturate feeding the output combinationally). A row's next pass may follow its
    last chunk of AMAX, RMS_SQ or RMS_AMAX in the very next cycle. The pipeline never stalls:
    `i_slot.ready` is always 1 and `o_slot.ready` is not looked at.

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
        ctl = data.StructLayout({"valid": 1, "op": VpuOp, "count": range(lanes + 1),
                                 "first": 1, "last": 1,
                                 "mant": unsigned(SCALE_MANT_BITS), "exp": unsigned(EXP_BITS)})
        ctl1, ctl2 = Signal(ctl), Signal(ctl)
        m.d.sync += [ctl1.valid.eq(self.i_slot.valid), ctl1.op.eq(slot.op),
                     ctl1.count.eq(slot.count), ctl1.first.eq(slot.first),
                     ctl1.last.eq(slot.last), ctl2.eq(ctl1)]

        # -- AMAX and RMS_SQ: the row maximum; AMAX's scale code and reciprocal ---------------
        amax = Signal(FX_BITS + 1)
        row_exp = Signal(ROW_EXP)
        chunk_max = abs_max(m, [slot.a[i] for i in range(lanes)], slot.count, "amax")
        row_max = Signal(FX_BITS + 1)
        m.d.comb += row_max.eq(Mux(slot.first | (chunk_max > amax), chunk_max, amax))
        mant, exp = encode_amax(m, row_max)
        is_amax = self.i_slot.valid & (slot.op == VpuOp.AMAX)
        is_sq = self.i_slot.valid & (slot.op == VpuOp.RMS_SQ)
        with m.If(is_amax | is_sq):
            m.d.sync += amax.eq(row_max)
        with m.If(is_amax & slot.last):
            m.d.sync += [row_exp.eq(exp), ctl1.mant.eq(mant), ctl1.exp.eq(exp)]
        recip_rd = recip.read_port()

        # -- RMS_SQ: sum x'**2 for every row shift, then the row shift ------------------------
        # x'_s = 2 x'_(s+1) + d with d = x[s-1] - x[s] (bits of x, x[-1] = 0), so the chunk's
        # sum of x'_s**2 is 4 times that of x'_(s+1) plus, per lane, d (4 x'_(s+1) + d): 0,
        # 4 t + 1 or 4 ~t + 1 with t = x >> (s + 1). Only the largest shift takes a squarer.
        # Sums are exact for the rows that use them (|x| < 2**(s + RMS_IN_BITS)): so t has
        # RMS_IN_BITS bits and a chunk sum 2 RMS_IN_BITS + bits(lanes).
        live, tops = [], []
        for i in range(lanes):
            x = Signal(signed(FX_BITS), name=f"sq_x{i}")
            top = Signal(signed(XS_BITS), name=f"sq_top{i}")
            m.d.comb += [x.eq(Mux(i < slot.count, slot.a[i], 0)),
                         top.eq(rshift_round(x, RMS_SHIFTS))]
            live.append(x)
            tops.append(top)
        chunk_bits = 2 * special.RMS_IN_BITS + lanes.bit_length()
        chunk = Signal(chunk_bits, name=f"sq{RMS_SHIFTS}")
        m.d.comb += chunk.eq(sum(top * top for top in tops))
        chunks = [chunk]
        for s in reversed(range(RMS_SHIFTS)):
            total = 0
            for x in live:
                low, high = (x[s - 1] if s else Const(0, 1)), x[s]
                t = (x >> s + 1)[:special.RMS_IN_BITS]
                term = Cat(Const(1, 1), Const(0, 1), Mux(high, ~t, t)).as_signed()
                total = total + Mux(low ^ high, term, 0)
            step = Signal(chunk_bits, name=f"sq{s}")
            m.d.comb += step.eq((chunks[-1] << 2) + total)
            chunks.append(step)
        sums = []
        for s, part in enumerate(reversed(chunks)):
            acc = Signal(SUMSQ_BITS, name=f"sumsq{s}")
            with m.If(is_sq):
                m.d.sync += acc.eq(Mux(slot.first, 0, acc) + part)
            sums.append(acc)
        row_len = bit_length(m, row_max, "rms_len")
        lsh = Signal(range(special.RMS_IN_BITS + 1))        # -sh where sh < 0
        rsh = Signal(range(RMS_SHIFTS + 1))                  # sh where sh > 0
        n = Signal(SIZE_BITS)
        eps = Signal(EPS_BITS)
        norm_load = Signal()
        m.d.sync += norm_load.eq(is_sq & slot.last)
        with m.If(is_sq & slot.last):
            m.d.sync += [
                lsh.eq(Mux(row_len < special.RMS_IN_BITS, special.RMS_IN_BITS - row_len, 0)),
                rsh.eq(Mux(row_len > special.RMS_IN_BITS, row_len - special.RMS_IN_BITS, 0)),
                n.eq(slot.n), eps.eq(slot.eps)]

        # -- the cycle after the row's last RMS_SQ chunk: mean square, normalised -------------
        sumsq = Signal(SUMSQ_BITS)
        with m.Switch(rsh):
            for s in range(RMS_SHIFTS + 1):
                with m.Case(s):
                    m.d.comb += sumsq.eq(sums[s] << 2 * lsh if s == 0 else sums[s])
        mean = divide(m, sumsq + (n >> 1), n, MEAN_BITS, "mean")
        ms = Signal(MS_BITS)
        m.d.comb += ms.eq(mean + shift_signed(eps, 2 * lsh, 2 * rsh))
        ms_pos = Signal(MS_BITS)
        m.d.comb += ms_pos.eq(Mux(ms == 0, 1, ms))
        ms_len = bit_length(m, ms_pos, "ms_len")
        e_up = Signal(range(MS_BITS))                         # e where e > 0
        e_down = Signal(range(MS_TOP))                        # -e where e < 0
        m.d.comb += [e_up.eq(Mux(ms_len > MS_TOP, (ms_len - MS_TOP) >> 1, 0)),
                     e_down.eq(Mux(ms_len < MS_TOP, (MS_TOP + 1 - ms_len) >> 1, 0))]
        norm = Signal(special.RSQRT_BITS + 1)
        y_shift = Signal(range(NORM_SHIFT + MS_BITS))
        with m.If(norm_load):
            m.d.sync += [norm.eq(shift_signed(ms_pos, 2 * e_down, 2 * e_up)),
                         y_shift.eq(NORM_SHIFT + e_up - e_down)]
        r = rsqrt(m, norm, "rsqrt")

        # -- stage 1: operands in; its product is ROPE's x c, RMSNORM's x' gamma or SILUMUL's
        # u LOG2E_MULT, whose rounding addresses the exp_fx table -----------------------------
        add1 = Signal(data.ArrayLayout(signed(FX_BITS), lanes))
        a1 = Signal(data.ArrayLayout(signed(FX_BITS), lanes))
        b1 = Signal(data.ArrayLayout(signed(FX_BITS), lanes))
        n1 = Signal(data.ArrayLayout(EXP_WHOLE, lanes))
        sin1 = Signal(data.ArrayLayout(signed(ROPE_BITS), lanes))
        p1 = Signal(data.ArrayLayout(signed(P1_BITS), lanes))
        second1 = Signal()
        m.d.sync += second1.eq(slot.second)
        is_rope = slot.op == VpuOp.ROPE
        is_norm = (slot.op == VpuOp.RMS_AMAX) | (slot.op == VpuOp.RMS_QUANT)
        luts = []
        for i in range(lanes):
            a, b = slot.a[i], slot.b[i]
            lut = exp_lut.read_port()
            luts.append(lut)
            mag = Mux(a < 0, -a, a)
            u = Signal(range(-special.EXP_INPUT_MIN + 1), name=f"u{i}")
            m.d.comb += u.eq(Mux(mag > -special.EXP_INPUT_MIN, -special.EXP_INPUT_MIN, mag))
            xs = Signal(signed(XS_BITS), name=f"xs{i}")
            m.d.comb += xs.eq(shift_signed(a, lsh, rsh))
            wide = Signal(signed(FX_BITS), name=f"p1a{i}")
            narrow = Signal(signed(P1_NARROW), name=f"p1b{i}")
            m.d.comb += [wide.eq(Mux(is_rope, a, Mux(is_norm, b, special.LOG2E_MULT))),
                         narrow.eq(Mux(is_rope, slot.cos[i], Mux(is_norm, xs, u)))]
            product = Signal(signed(P1_BITS), name=f"p1_{i}")
            m.d.comb += product.eq(wide * narrow)
            v = Signal(range(EXP_WHOLE.stop << special.EXP_LUT_BITS), name=f"v{i}")
            m.d.comb += v.eq(rshift_round(product, EXP_SHIFT))
            m.d.comb += lut.addr.eq(v[:special.EXP_LUT_BITS])
            m.d.sync += [add1[i].eq(saturate(a + b, FX_BITS)), a1[i].eq(a), b1[i].eq(b),
                         n1[i].eq(v >> special.EXP_LUT_BITS), sin1[i].eq(slot.sin[i]),
                         p1[i].eq(product)]

        # -- stage 2: function / LUT; its product is ROPE's p s or RMSNORM's x' gamma r, then
        # RMSNORM's y, its row max, scale code and reciprocal ---------------------------------
        add2 = Signal(data.ArrayLayout(signed(FX_BITS), lanes))
        rot2 = Signal(data.ArrayLayout(signed(ROT_BITS), lanes))
        a2 = Signal(data.ArrayLayout(signed(FX_BITS), lanes))
        b2 = Signal(data.ArrayLayout(signed(FX_BITS), lanes))
        sig2 = Signal(data.ArrayLayout(unsigned(SIG_BITS), lanes))
        y1 = Signal(data.ArrayLayout(signed(FX_BITS), lanes))
        y2 = Signal(data.ArrayLayout(signed(FX_BITS), lanes))
        recip2 = Signal(RECIP_BITS)
        exp2 = Signal(ROW_EXP)
        m.d.sync += [recip2.eq(recip_rd.data), exp2.eq(row_exp)]
        rope1 = ctl1.op == VpuOp.ROPE
        for i in range(lanes):
            lut = luts[i]
            e = Signal(special.EXP_FRAC + 1, name=f"e{i}")
            m.d.comb += e.eq(rshift_round(lut.data, n1[i] + special.EXP_LUT_GUARD))
            den = Signal(special.EXP_FRAC + 2, name=f"den{i}")
            m.d.comb += den.eq((1 << special.EXP_FRAC) + e)
            num = Signal(special.SIGMOID_FRAC + special.EXP_FRAC + 2, name=f"num{i}")
            m.d.comb += num.eq((e << special.SIGMOID_FRAC) + (den >> 1))
            low = divide(m, num, den, SIG_BITS, f"low{i}")
            product = Signal(signed(P2_BITS), name=f"p2_{i}")
            m.d.comb += product.eq(Mux(rope1, b1[i], p1[i]) * Mux(rope1, sin1[i], r))
            cos_x, sin_p = p1[i][:ROT_BITS].as_signed(), product[:ROT_BITS].as_signed()
            turn = Mux(second1, cos_x + sin_p, cos_x - sin_p)
            m.d.comb += y1[i].eq(saturate(rshift_round(product, y_shift), FX_BITS))
            m.d.sync += [add2[i].eq(add1[i]), a2[i].eq(a1[i]), b2[i].eq(b1[i]),
                         rot2[i].eq(rshift_round(turn, special.ROPE_FRAC)),
                         sig2[i].eq(Mux(a1[i] >= 0, (1 << special.SIGMOID_FRAC) - low, low)),
                         y2[i].eq(y1[i])]
        ymax = Signal(FX_BITS + 1)
        chunk_ymax = abs_max(m, [y1[i] for i in range(lanes)], ctl1.count, "ymax")
        row_ymax = Signal(FX_BITS + 1)
        m.d.comb += row_ymax.eq(Mux(ctl1.first | (chunk_ymax > ymax), chunk_ymax, ymax))
        ymant, yexp = encode_amax(m, row_ymax, "ycode")
        is_ymax = ctl1.valid & (ctl1.op == VpuOp.RMS_AMAX)
        with m.If(is_ymax):
            m.d.sync += ymax.eq(row_ymax)
        with m.If(is_ymax & ctl1.last):
            m.d.sync += [row_exp.eq(yexp), ctl2.mant.eq(ymant), ctl2.exp.eq(yexp)]
        m.d.comb += [recip_rd.addr.eq(Mux(is_ymax, ymant, mant)),
                     recip_rd.en.eq((is_amax & slot.last) | (is_ymax & ctl1.last))]

        # -- stage 3: silu(a) b, x R or y R; round and saturate into the output ---------------
        out = self.o_slot.payload
        m.d.comb += [self.o_slot.valid.eq(ctl2.valid), out.op.eq(ctl2.op),
                     out.count.eq(ctl2.count), out.last.eq(ctl2.last),
                     out.mant.eq(ctl2.mant), out.exp.eq(ctl2.exp)]
        silu2 = ctl2.op == VpuOp.SILUMUL
        for i in range(lanes):
            silu = Signal(signed(FX_BITS + 1), name=f"silu{i}")
            m.d.comb += silu.eq(rshift_round(a2[i] * sig2[i], special.SIGMOID_FRAC))
            wide = Signal(signed(FX_BITS + 1), name=f"p3a{i}")
            m.d.comb += wide.eq(Mux(silu2, silu, Mux(ctl2.op == VpuOp.QUANT, a2[i], y2[i])))
            product = Signal(signed(P3_BITS), name=f"p3_{i}")
            m.d.comb += product.eq(wide * Mux(silu2, b2[i], recip2))
            with m.Switch(ctl2.op):
                with m.Case(VpuOp.ADD):
                    m.d.comb += out.y[i].eq(add2[i])
                with m.Case(VpuOp.ROPE):
                    m.d.comb += out.y[i].eq(saturate(rot2[i], FX_BITS))
                with m.Default():
                    m.d.comb += out.y[i].eq(saturate(rshift_round(product, ACT_FRAC), FX_BITS))
            m.d.comb += out.q[i].eq(clip_q(rshift_round(product, RECIP_SHIFT + exp2)))
        return m
