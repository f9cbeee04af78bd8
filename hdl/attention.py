"""The in-storage attention engine: one query row against one kv head's cache in flash.

`AttentionEngine` runs one *job*: the query heads of one row that share a kv head, over that
head's K and V regions (docs/contract.md, "KV cache"), exactly as `trimem.special.attention`
computes them:

1. quantize each query head (`quantize_act`: amax, scale code, reciprocal, round);
2. K phase: stream the K pages of tokens 0..pos from the flash-page interface, unpack each
   token's effective ints `q * g`, and for every query head the int32 score against the a8
   query (`engine_lanes` MACs per cycle), then the fx logit (`_logits`); keep each token's
   importance, the largest logit over the heads;
3. top-k (SpAtten): with 0 < topk <= pos, a radix select finds the topk-th largest key
   `importance << MAX_CONTEXT_BITS | (MAX_CONTEXT - 1 - t)` one key bit per pass, and only
   tokens at or above it are kept;
4. per split of ceil-sized contiguous chunks: the split's max logit, then `l = sum exp_fx(x -
   max)`, then its V pages, each kept token dequantized (`kv_dequant`) and added with weight
   `p = round(e * 2**PROB_FRAC / l)` into int64 accumulators: the partial (o, max, l) of
   `special.partial`;
5. the `special.merge` of the partials, written to the output.

The steps run one after another with one page in flight, and every V page of the context is
read whether or not it holds a kept token, so a job's cycles depend on its shape and position
only: they are `attn_cycles` of docs/timing.md ("CSD") exactly; numerics are bit for bit.
"""
from __future__ import annotations

import math

from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from amaranth.utils import bits_for, ceil_log2

from trimem import isa, numerics, special
from trimem.config import CsdConfig
from trimem.hdl.frontend import read_signature, write_signature
from trimem.hdl.system import ByteRam, page_request_layout
from trimem.hdl.vpu import divide, encode_amax, rshift_round, saturate

FX_BITS = 32
FLASH_ADDR_BITS = isa.ADDR_BITS[isa.Space.FLASH]
CDRAM_ADDR_BITS = isa.ADDR_BITS[isa.Space.CDRAM]
ACC_BITS = 64
"""A split's weighted V sum per element: below 2**61 (docs/special.md bounds)."""
SUM_BITS = bits_for(special.SUM_MAX)
"""A softmax denominator l: at most SUM_MAX."""
WEFF_BITS = (numerics.qmax(8) * numerics.GROUP_MAX).bit_length() + 1
"""An effective KV int q * g: int12."""
KEY_BITS = FX_BITS + special.MAX_CONTEXT_BITS
"""A top-k key: importance (int32, sign bit flipped so keys order as unsigned) and rank."""
EXP_OUT_BITS = special.EXP_FRAC + 1
EXP_MAX_SHIFT = ((-special.EXP_INPUT_MIN * special.LOG2E_MULT) >> (
    special.LOG2E_SHIFT + numerics.ACT_FRAC - special.EXP_LUT_BITS)) + 1 >> \
    special.EXP_LUT_BITS
EXP_MAX_SHIFT += special.EXP_LUT_GUARD
"""Largest shift exp_fx applies to a table entry (at x = EXP_INPUT_MIN)."""
"""exp_fx's output, Q0.EXP_FRAC up to 1.0."""
INT32_MIN = numerics.INT32_MIN
BUILD_LIMIT_BITS = 1 << 24
"""Largest buffer storage an attention engine build may hold."""


# ---------------------------------------------------------------------------------------------
# Arithmetic of trimem.special as expressions
# ---------------------------------------------------------------------------------------------

def exp_fx(m: Module, x, name: str):
    """A Signal of `special.exp_fx(x)` for a signed x <= 0 (its table as a ROM read in the
    same cycle)."""
    lut = Memory(shape=int(special.EXP_LUT.max()).bit_length(),
                 depth=len(special.EXP_LUT), init=[int(v) for v in special.EXP_LUT])
    m.submodules[f"{name}_lut"] = lut
    port = lut.read_port(domain="comb")
    u = Signal(range(-special.EXP_INPUT_MIN + 1), name=f"{name}_u")
    m.d.comb += u.eq(Mux(x < special.EXP_INPUT_MIN, -special.EXP_INPUT_MIN, -x))
    v = Signal(bits_for(-special.EXP_INPUT_MIN * special.LOG2E_MULT), name=f"{name}_v")
    m.d.comb += v.eq(rshift_round(u * special.LOG2E_MULT, special.LOG2E_SHIFT
                                  + numerics.ACT_FRAC - special.EXP_LUT_BITS))
    m.d.comb += port.addr.eq(v[:special.EXP_LUT_BITS])
    out = Signal(EXP_OUT_BITS, name=name)
    amount = Signal(range(EXP_MAX_SHIFT + 1), name=f"{name}_shift")
    m.d.comb += amount.eq((v >> special.EXP_LUT_BITS) + special.EXP_LUT_GUARD)
    m.d.comb += out.eq(rshift_round(port.data, amount))
    return out


def div_round(m: Module, a, b, bits: int, name: str):
    """`special._div_round(a, b)`: a / b rounded half up (a >= 0, b >= 1), as a `bits`-bit
    Signal; the quotient must fit."""
    num = Signal(len(a) + 1, name=f"{name}_num")
    m.d.comb += num.eq(a + (b >> 1))
    return divide(m, num, b, bits, name)


def shift_sat32(m: Module, v, s, name: str):
    """`special._shift_sat32(v, s)`: sat32(v / 2**s) rounded half up, s < 0 shifting left."""
    out = Signal(signed(FX_BITS), name=name)
    right = rshift_round(v, Mux(s > 63, 63, s)[:6])
    clamped = Mux(v > -INT32_MIN, -INT32_MIN, Mux(v < INT32_MIN, INT32_MIN, v))
    amount = Mux(-s > 31, 31, -s)[:5]
    left = (clamped.as_signed() << amount)
    m.d.comb += out.eq(saturate(Mux(s >= 0, right, left), FX_BITS))
    return out


def sm_scale_table(max_head_dim: int) -> dict[int, list[tuple[int, int]]]:
    """(mult, shift) of `special.encode_sm_scale(1 / sqrt(d), bits)` for every head_dim d,
    per KV width: the softmax scale the compiler's default uses, as a ROM."""
    return {bits: [special.encode_sm_scale(1 / math.sqrt(max(d, 1)), bits)
                   for d in range(max_head_dim + 1)] for bits in numerics.WEIGHT_BITS}


def dequant_recip(bits: int) -> int:
    """round(2**RECIP_SHIFT / kv_levels(bits)): `numerics._dequantize`'s constant."""
    levels = numerics.kv_levels(bits)
    return ((1 << numerics.RECIP_SHIFT) + levels // 2) // levels


# ---------------------------------------------------------------------------------------------
# Interfaces
# ---------------------------------------------------------------------------------------------

def job_layout() -> data.StructLayout:
    """One job: a query row's heads that share kv head `kv_head`, over that head's regions.

    q_addr / o_addr: CDRAM byte address of the group's first head (heads follow, head_dim
    int32 each); k_base / v_base: FLASH byte address of the K / V region; tpp and
    token_bytes: the KV layout (`layout.tokens_per_page`, `layout.kv_token_bytes`).
    """
    return data.StructLayout({
        "pos": 32, "heads": 8, "head_dim": 12, "kv_bits": 4, "kv_group_log2": 4,
        "splits": 8, "topk": 16, "q_addr": 32, "o_addr": 32, "k_base": 40, "v_base": 40,
        "tpp": 16, "token_bytes": 16,
    })


class AttentionEngine(wiring.Component):
    """Decode attention of one query row and kv head, streamed from flash pages.

    Parameters
    ----------
    csd : CsdConfig
        `engine_lanes` MACs per cycle; pages of `page_bytes`.
    max_ctx, max_head_dim, max_heads, max_splits : int
        Buffer sizes: keys of one row, elements per head, query heads per kv head, splits.
        Jobs beyond them set `error`.

    Members
    -------
    i_job : In(stream.Signature(job_layout()))
        `ready` while idle; a job runs to its last output write.
    cdram_rd : Out(read_signature(CDRAM_ADDR_BITS, 4))
        Reads of the queries (int32) from CDRAM.
    cdram_wr : Out(write_signature(CDRAM_ADDR_BITS, 4))
        Writes of the outputs (int32) to CDRAM.
    o_page : Out(stream.Signature(page_request_layout(FLASH_ADDR_BITS)))
        Page reads.
    i_page : In(stream.Signature(8 * engine_lanes))
        The requested page's bytes in order, `engine_lanes` per beat (byte i in bits
        [8i + 7 : 8i]), after whatever latency the flash has.
    error : Out(1)
        Sticky: a job outside the buffer sizes or the layout this engine reads.
    busy : Out(1)
    """

    def __init__(self, csd: CsdConfig, *, max_ctx: int = 64, max_head_dim: int = 64,
                 max_heads: int = 4, max_splits: int = 4):
        if not isinstance(csd, CsdConfig):
            raise TypeError(f"csd must be a CsdConfig (HardwareConfig.csd), got {csd!r}")
        lanes = csd.engine_lanes
        limits = {"max_ctx": (max_ctx, special.MAX_CONTEXT),
                  "max_head_dim": (max_head_dim, special.MAX_HEAD_DIM),
                  "max_heads": (max_heads, 255), "max_splits": (max_splits, 255)}
        for name, (value, top) in limits.items():
            if not isinstance(value, int) or not 1 <= value <= top:
                raise ValueError(f"{name} must be an int in [1, {top}], got {value!r}")
        if max_head_dim % lanes:
            raise ValueError(f"max_head_dim {max_head_dim!r} is not a multiple of "
                             f"csd.engine_lanes = {lanes}; the lanes take whole chunks of a head")
        if lanes < 2 or lanes & (lanes - 1):
            raise ValueError(f"csd.engine_lanes = {lanes!r} must be a power of two of at least 2 "
                             f"for the RTL engine (a lane chunk holds whole bytes of int4)")
        bits = (max_heads * (max_ctx + max_head_dim * (FX_BITS + 8 + ACC_BITS))
                + max_ctx * FX_BITS + max_splits * max_heads * max_head_dim * FX_BITS
                + csd.page_bytes * 8)
        if bits > BUILD_LIMIT_BITS:
            raise ValueError(f"these buffer sizes need {bits} bits, more than the "
                             f"{BUILD_LIMIT_BITS} an RTL build may hold; lower max_ctx, "
                             f"max_head_dim, max_heads or max_splits")
        self.csd, self.lanes = csd, lanes
        self.max_ctx, self.max_head_dim = max_ctx, max_head_dim
        self.max_heads, self.max_splits = max_heads, max_splits
        super().__init__({
            "i_job": In(stream.Signature(job_layout())),
            "cdram_rd": Out(read_signature(CDRAM_ADDR_BITS, 4)),
            "cdram_wr": Out(write_signature(CDRAM_ADDR_BITS, 4)),
            "o_page": Out(stream.Signature(page_request_layout(FLASH_ADDR_BITS))),
            "i_page": In(stream.Signature(8 * lanes)),
            "error": Out(1),
            "busy": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        csd, lanes = self.csd, self.lanes
        dmax, hmax, tmax, smax = self.max_head_dim, self.max_heads, self.max_ctx, \
            self.max_splits
        chunks = dmax // lanes
        job = Signal(job_layout())
        d = job.head_dim

        # -- buffers -------------------------------------------------------------------------
        def memory(name, shape, depth, granularity=None):
            """A buffer with one write port and one read port answering in the same cycle."""
            mem = Memory(shape=shape, depth=depth, init=[])
            m.submodules[name] = mem
            wp = mem.write_port(granularity=granularity) if granularity else mem.write_port()
            return wp, mem.read_port(domain="comb")

        qfx_w, qfx_r = memory("qfx", signed(FX_BITS), hmax * dmax)
        a8_w, a8_r = memory("a8", unsigned(8 * lanes), hmax * chunks, granularity=8)
        weff_w, weff_r = memory("weff", unsigned(WEFF_BITS * lanes), chunks)
        vfx_w, vfx_r = memory("vfx", unsigned(FX_BITS * lanes), chunks)
        acc_w, acc_r = memory("acc", unsigned(ACC_BITS * lanes), hmax * chunks)
        logit_w, logit_r = memory("logits", signed(FX_BITS), hmax * tmax)
        imp_w, imp_r = memory("importance", signed(FX_BITS), tmax)
        part_w, part_r = memory("partials", signed(FX_BITS), smax * hmax * dmax)
        m.submodules.page = page = ByteRam(csd.page_bytes, reads=(lanes, 4, 1),
                                           writes=(lanes,), comb=True)

        # -- per-head registers --------------------------------------------------------------
        q_mant = Array(Signal(numerics.SCALE_MANT_BITS, name=f"q_mant{h}") for h in range(hmax))
        q_exp = Array(Signal(8, name=f"q_exp{h}") for h in range(hmax))
        q_recip = Array(Signal(39, name=f"q_recip{h}") for h in range(hmax))
        q_amax = Array(Signal(FX_BITS, name=f"q_amax{h}") for h in range(hmax))
        row_max = Array(Signal(signed(FX_BITS), name=f"max{h}") for h in range(hmax))
        row_sum = Array(Signal(SUM_BITS, name=f"sum{h}") for h in range(hmax))
        part_max = Array(Signal(signed(FX_BITS), name=f"part_max{i}") for i in range(smax * hmax))
        part_sum = Array(Signal(SUM_BITS, name=f"part_sum{i}") for i in range(smax * hmax))
        groups = Array(Signal(numerics.GROUP_SCALE_BITS, name=f"g{i}")
                       for i in range(max(dmax // 2, 1)))

        # -- counters ------------------------------------------------------------------------
        head = Signal(range(hmax + 1))
        elem = Signal(range(dmax + 1))
        chunk = Signal(range(chunks + 1))
        token = Signal(32)
        split = Signal(range(smax + 1))
        bit = Signal(range(KEY_BITS + 1))
        lo = Signal(32)
        hi = Signal(32)
        size = Signal(32)
        slot = Signal(16)
        page_no = Signal(32)
        loaded = Signal(33)
        loaded_ok = Signal()
        beats = Signal(range(csd.page_bytes // lanes + 1))
        total = Signal(signed(FX_BITS))
        prefix = Signal(KEY_BITS)
        remaining = Signal(17)
        count = Signal(17)
        k_mant = Signal(16)
        k_exp = Signal(8)
        phase_v = Signal()
        pending = Signal()

        # -- job geometry ----------------------------------------------------------------------
        wide = job.kv_bits == 4
        value_bytes = Mux(wide, d >> 1, d)
        group_shift = Mux(job.kv_group_log2 == 0, 12, job.kv_group_log2)
        n_groups = Mux(job.kv_group_log2 == 0, 1, d >> job.kv_group_log2)
        n_chunks = d // lanes
        ctx = job.pos + 1
        sm = sm_scale_table(dmax)
        sm_mult = Array(Array(Const(mv, 16) for mv, _ in sm[b]) for b in numerics.WEIGHT_BITS)
        sm_shift = Array(Array(Const(sv, 8) for _, sv in sm[b]) for b in numerics.WEIGHT_BITS)
        which_bits = Mux(wide, 0, 1)
        mult = sm_mult[which_bits][d[:bits_for(dmax)]]
        shift = sm_shift[which_bits][d[:bits_for(dmax)]]
        topk_on = (job.topk != 0) & (job.topk < ctx)
        slot_offset = Signal(16)
        m.d.comb += slot_offset.eq(slot * job.token_bytes)

        # -- the key of a token for the top-k select -----------------------------------------
        def key_of(importance, t):
            rank = (special.MAX_CONTEXT - 1 - t)[:special.MAX_CONTEXT_BITS]
            bits = importance.as_unsigned()
            return Cat(rank, bits[:FX_BITS - 1], ~bits[FX_BITS - 1])

        # -- a token is kept (valid, inside the split, above the top-k threshold) ------------
        kept = Signal()
        m.d.comb += kept.eq(~topk_on | (key_of(imp_r.data, token) >= prefix))

        # -- page loading: request, then beats into the page buffer -------------------------
        base = Mux(phase_v, job.v_base, job.k_base)
        m.d.comb += [self.o_page.payload.addr.eq(base + page_no * csd.page_bytes)]
        m.d.comb += [page.write0.addr.eq(beats * lanes), page.write0.data.eq(self.i_page.payload),
                     page.write0.mask.eq((1 << lanes) - 1)]

        # -- exp, reciprocal and dividers used by the passes ---------------------------------
        x_minus_max = Signal(signed(FX_BITS + 2))
        m.d.comb += x_minus_max.eq(logit_r.data - row_max[head])
        e_token = exp_fx(m, x_minus_max, "e_token")
        p_token = div_round(m, e_token << special.PROB_FRAC, Mux(row_sum[head] == 0, 1,
                                                                 row_sum[head]),
                            special.PROB_FRAC + 1, "p_token")
        amax_code = encode_amax(m, q_amax[head], "q_code")
        recip = divide(m, Const(numerics.ACT_QMAX << numerics.RECIP_SHIFT, 40), amax_code[0],
                       39, "q_recip")

        m.d.comb += self.busy.eq(1)
        with m.FSM(name="attention"):
            with m.State("IDLE"):
                m.d.comb += [self.busy.eq(0), self.i_job.ready.eq(1)]
                with m.If(self.i_job.valid):
                    m.d.sync += [job.eq(self.i_job.payload), head.eq(0), elem.eq(0),
                                 loaded_ok.eq(0)]
                    m.next = "CHECK"

            with m.State("CHECK"):
                bad = ((d > dmax) | (d % lanes != 0) | (job.heads > hmax) | (job.heads == 0)
                       | (job.splits > smax) | (ctx > tmax) | (job.kv_group_log2 > 8)
                       | ((job.kv_group_log2 != 0) & (d & ((1 << job.kv_group_log2) - 1) != 0)))
                with m.If(bad):
                    m.d.sync += self.error.eq(1)
                    m.next = "IDLE"
                with m.Else():
                    for h in range(hmax):
                        m.d.sync += q_amax[h].eq(0)
                    m.next = "Q_READ"

            # ---- 1. queries: read, amax, scale code, quantize ------------------------------
            with m.State("Q_READ"):
                index = head * d + elem
                m.d.comb += self.cdram_rd.addr.eq(job.q_addr + index * 4)
                m.d.sync += pending.eq(1)
                prev = Signal(range(hmax * dmax + 1))
                m.d.sync += prev.eq(index)
                with m.If(pending):
                    x = self.cdram_rd.data.as_signed()
                    mag = Mux(x < 0, -x, x)
                    prev_head = prev // d
                    m.d.comb += [qfx_w.addr.eq(prev), qfx_w.data.eq(x), qfx_w.en.eq(1)]
                    with m.If(mag > q_amax[prev_head]):
                        m.d.sync += q_amax[prev_head].eq(mag)
                last = (head + 1 == job.heads) & (elem + 1 == d)
                with m.If(elem + 1 == d):
                    m.d.sync += [elem.eq(0), head.eq(head + 1)]
                with m.Else():
                    m.d.sync += elem.eq(elem + 1)
                with m.If(last):
                    m.next = "Q_LAST"
            with m.State("Q_LAST"):
                x = self.cdram_rd.data.as_signed()
                mag = Mux(x < 0, -x, x)
                last_head = job.heads - 1
                m.d.comb += [qfx_w.addr.eq(job.heads * d - 1), qfx_w.data.eq(x),
                             qfx_w.en.eq(1)]
                with m.If(mag > q_amax[last_head]):
                    m.d.sync += q_amax[last_head].eq(mag)
                m.d.sync += [pending.eq(0), head.eq(0)]
                m.next = "Q_CODE"
            with m.State("Q_CODE"):
                mant, exp = amax_code
                m.d.sync += [q_mant[head].eq(mant), q_exp[head].eq(exp), q_recip[head].eq(recip)]
                with m.If(head + 1 == job.heads):
                    m.d.sync += [head.eq(0), elem.eq(0)]
                    m.next = "Q_QUANT"
                with m.Else():
                    m.d.sync += head.eq(head + 1)
            with m.State("Q_QUANT"):
                m.d.comb += qfx_r.addr.eq(head * d + elem)
                amount = (numerics.RECIP_SHIFT + q_exp[head])[:6]
                scaled = rshift_round(qfx_r.data * q_recip[head], amount)
                a8 = Mux(scaled > numerics.ACT_QMAX, numerics.ACT_QMAX,
                         Mux(scaled < -numerics.ACT_QMAX, -numerics.ACT_QMAX, scaled))
                lane = elem % lanes
                m.d.comb += [a8_w.addr.eq(head * chunks + elem // lanes),
                             a8_w.data.eq(Cat(*[a8[:8]] * lanes)),
                             a8_w.en.eq(1 << lane)]
                with m.If(elem + 1 == d):
                    m.d.sync += [elem.eq(0), head.eq(head + 1)]
                    with m.If(head + 1 == job.heads):
                        m.d.sync += [token.eq(0), slot.eq(0), page_no.eq(0), phase_v.eq(0),
                                     head.eq(0)]
                        m.next = "TOKEN"
                with m.Else():
                    m.d.sync += elem.eq(elem + 1)

            # ---- fetching one token (K or V): page, group multipliers, scale, ints --------
            with m.State("TOKEN"):
                m.d.comb += imp_r.addr.eq(token)
                with m.If(loaded_ok & (loaded == Cat(page_no, phase_v))):
                    with m.If(phase_v & ~kept):
                        m.d.sync += token.eq(token + 1)
                        m.next = "V_NEXT"
                    with m.Else():
                        m.d.sync += elem.eq(0)
                        m.next = "GROUPS"
                with m.Else():
                    m.d.comb += self.o_page.valid.eq(1)
                    with m.If(self.o_page.ready):
                        m.d.sync += [beats.eq(0), loaded_ok.eq(0)]
                        m.next = "PAGE"
            with m.State("PAGE"):
                m.d.comb += [self.i_page.ready.eq(1), page.write0.en.eq(self.i_page.valid)]
                with m.If(self.i_page.valid):
                    m.d.sync += beats.eq(beats + 1)
                    with m.If(beats + 1 == csd.page_bytes // lanes):
                        m.d.sync += [loaded.eq(Cat(page_no, phase_v)), loaded_ok.eq(1)]
                        m.next = "TOKEN"
            with m.State("GROUPS"):
                m.d.comb += page.read2.addr.eq(slot_offset + value_bytes + elem)
                m.d.sync += groups[elem].eq(page.read2.data[:numerics.GROUP_SCALE_BITS])
                with m.If(elem + 1 >= n_groups):
                    m.next = "SCALE"
                with m.Else():
                    m.d.sync += elem.eq(elem + 1)
            with m.State("SCALE"):
                m.d.comb += page.read1.addr.eq(slot_offset + value_bytes + n_groups)
                m.d.sync += [k_mant.eq(page.read1.data[:16]), k_exp.eq(page.read1.data[16:24]),
                             chunk.eq(0)]
                m.next = "UNPACK"
            with m.State("UNPACK"):
                at = slot_offset + Mux(wide, chunk * (lanes // 2), chunk * lanes)
                m.d.comb += page.read0.addr.eq(at)
                raw = page.read0.data
                effs, fxs = [], []
                recips = {b: dequant_recip(b) for b in numerics.WEIGHT_BITS}
                for s in range(lanes):
                    q = Mux(wide, raw.word_select(s, 4).as_signed(),
                            raw.word_select(s, 8).as_signed())
                    g = groups[(chunk * lanes + s) >> group_shift]
                    eff = Signal(signed(WEFF_BITS), name=f"eff{s}")
                    m.d.comb += eff.eq(q * g)
                    effs.append(eff)
                    scaled = eff * (k_mant * Mux(wide, recips[4], recips[8]))
                    amount = (numerics.RECIP_SHIFT - k_exp).as_unsigned()[:6]
                    fx = saturate(rshift_round(scaled, amount), FX_BITS)
                    fxs.append(fx[:FX_BITS])
                m.d.comb += [weff_w.addr.eq(chunk), weff_w.data.eq(Cat(*effs)),
                             weff_w.en.eq(~phase_v),
                             vfx_w.addr.eq(chunk), vfx_w.data.eq(Cat(*fxs)),
                             vfx_w.en.eq(phase_v)]
                with m.If(chunk + 1 == n_chunks):
                    m.d.sync += [chunk.eq(0), head.eq(0), total.eq(0)]
                    m.next = "USE"
                with m.Else():
                    m.d.sync += chunk.eq(chunk + 1)
            with m.State("USE"):
                with m.If(phase_v):
                    m.next = "MIX"
                with m.Else():
                    m.next = "SCORE"

            # ---- 2. K phase: score and logit per head ---------------------------------------
            with m.State("SCORE"):
                m.d.comb += [a8_r.addr.eq(head * chunks + chunk), weff_r.addr.eq(chunk)]
                products = [a8_r.data.word_select(s, 8).as_signed()
                            * weff_r.data.word_select(s, WEFF_BITS).as_signed()
                            for s in range(lanes)]
                score = Signal(signed(FX_BITS))
                m.d.comb += score.eq(total + sum(products))
                with m.If(chunk + 1 == n_chunks):
                    u = score * (q_mant[head] * k_mant)
                    v = rshift_round(u, special.LOGIT_PRESHIFT) * mult
                    amount = Signal(signed(10))
                    m.d.comb += amount.eq(shift - special.LOGIT_PRESHIFT - q_exp[head] - k_exp)
                    logit = shift_sat32(m, v, amount, "logit")
                    m.d.comb += [logit_w.addr.eq(head * tmax + token), logit_w.data.eq(logit),
                                 logit_w.en.eq(1)]
                    m.d.comb += imp_r.addr.eq(token)
                    better = (head == 0) | (logit > imp_r.data)
                    m.d.comb += [imp_w.addr.eq(token), imp_w.data.eq(logit), imp_w.en.eq(better)]
                    m.d.sync += [chunk.eq(0), total.eq(0)]
                    with m.If(head + 1 == job.heads):
                        m.d.sync += head.eq(0)
                        m.next = "NEXT_KEY"
                    with m.Else():
                        m.d.sync += head.eq(head + 1)
                with m.Else():
                    m.d.sync += [total.eq(score), chunk.eq(chunk + 1)]
            with m.State("NEXT_KEY"):
                with m.If(token + 1 == ctx):
                    m.d.sync += [token.eq(0), bit.eq(KEY_BITS), prefix.eq(0),
                                 remaining.eq(job.topk), count.eq(0)]
                    m.next = "TOPK"
                with m.Else():
                    self._advance(m, token, slot, page_no, job)
                    m.next = "TOKEN"

            # ---- 3. top-k: radix select of the topk-th largest key -------------------------
            with m.State("TOPK"):
                with m.If(~topk_on | (bit == 0)):
                    m.d.sync += [split.eq(0), size.eq((job.pos + job.splits) // job.splits)]
                    m.next = "SPLIT"
                with m.Else():
                    m.d.comb += imp_r.addr.eq(token)
                    low = (bit - 1).as_unsigned()[:ceil_log2(KEY_BITS + 1)]
                    trial = prefix | (Const(1, KEY_BITS) << low)
                    mask = ~((Const(1, KEY_BITS + 1) << low) - 1)
                    match = (key_of(imp_r.data, token) & mask[:KEY_BITS]) == trial
                    now = count + match
                    with m.If(token + 1 == ctx):
                        m.d.sync += [token.eq(0), count.eq(0), bit.eq(bit - 1)]
                        with m.If(now >= remaining):
                            m.d.sync += prefix.eq(trial)
                        with m.Else():
                            m.d.sync += remaining.eq(remaining - now)
                    with m.Else():
                        m.d.sync += [token.eq(token + 1), count.eq(now)]

            # ---- 4. splits: max, sum, weighted V ------------------------------------------
            with m.State("SPLIT"):
                start = split * size
                end = Mux(start + size > ctx, ctx, start + size)
                m.d.sync += [lo.eq(start), hi.eq(end), token.eq(start), head.eq(0)]
                for h in range(hmax):
                    m.d.sync += [row_max[h].eq(INT32_MIN), row_sum[h].eq(0)]
                with m.If(split == job.splits):
                    m.d.sync += [head.eq(0), elem.eq(0)]
                    m.next = "MERGE"
                with m.Elif(start >= ctx):
                    m.next = "CLEAR"
                with m.Else():
                    m.next = "SPLIT_MAX"
            with m.State("SPLIT_MAX"):
                m.d.comb += [imp_r.addr.eq(token), logit_r.addr.eq(head * tmax + token)]
                with m.If(kept & (logit_r.data > row_max[head])):
                    m.d.sync += row_max[head].eq(logit_r.data)
                self._sweep(m, token, head, lo, hi, job, "SPLIT_SUM")
            with m.State("SPLIT_SUM"):
                m.d.comb += [imp_r.addr.eq(token), logit_r.addr.eq(head * tmax + token)]
                with m.If(kept):
                    m.d.sync += row_sum[head].eq(row_sum[head] + e_token)
                self._sweep(m, token, head, lo, hi, job, "CLEAR")
            with m.State("CLEAR"):
                m.d.comb += [acc_w.addr.eq(head * chunks + chunk), acc_w.data.eq(0),
                             acc_w.en.eq(1)]
                with m.If(chunk + 1 == n_chunks):
                    m.d.sync += chunk.eq(0)
                    with m.If(head + 1 == job.heads):
                        m.d.sync += [head.eq(0), token.eq(lo), phase_v.eq(1)]
                        m.next = "V_NEXT"
                    with m.Else():
                        m.d.sync += head.eq(head + 1)
                with m.Else():
                    m.d.sync += chunk.eq(chunk + 1)
            with m.State("V_NEXT"):
                with m.If(token >= hi):
                    m.d.sync += [head.eq(0), elem.eq(0)]
                    m.next = "PARTIAL"
                with m.Else():
                    m.d.sync += [slot.eq(token % job.tpp), page_no.eq(token // job.tpp)]
                    m.next = "TOKEN"
            with m.State("MIX"):
                m.d.comb += [logit_r.addr.eq(head * tmax + token),
                             acc_r.addr.eq(head * chunks + chunk), vfx_r.addr.eq(chunk)]
                sums = []
                for s in range(lanes):
                    old = acc_r.data.word_select(s, ACC_BITS).as_signed()
                    value = vfx_r.data.word_select(s, FX_BITS).as_signed()
                    sums.append((old + p_token * value)[:ACC_BITS])
                m.d.comb += [acc_w.addr.eq(head * chunks + chunk), acc_w.data.eq(Cat(*sums)),
                             acc_w.en.eq(1)]
                with m.If(chunk + 1 == n_chunks):
                    m.d.sync += chunk.eq(0)
                    with m.If(head + 1 == job.heads):
                        m.d.sync += [head.eq(0), token.eq(token + 1)]
                        m.next = "V_NEXT"
                    with m.Else():
                        m.d.sync += head.eq(head + 1)
                with m.Else():
                    m.d.sync += chunk.eq(chunk + 1)
            with m.State("PARTIAL"):
                m.d.comb += acc_r.addr.eq(head * chunks + elem // lanes)
                value = acc_r.data.word_select(elem % lanes, ACC_BITS).as_signed()
                o = saturate(rshift_round(value, special.PROB_FRAC), FX_BITS)
                m.d.comb += [part_w.addr.eq((split * hmax + head) * dmax + elem),
                             part_w.data.eq(o), part_w.en.eq(1)]
                m.d.sync += [part_max[split * hmax + head].eq(row_max[head]),
                             part_sum[split * hmax + head].eq(row_sum[head])]
                with m.If(elem + 1 == d):
                    m.d.sync += elem.eq(0)
                    with m.If(head + 1 == job.heads):
                        m.d.sync += [head.eq(0), split.eq(split + 1), phase_v.eq(0)]
                        m.next = "SPLIT"
                    with m.Else():
                        m.d.sync += head.eq(head + 1)
                with m.Else():
                    m.d.sync += elem.eq(elem + 1)

            # ---- 5. merge of the partials --------------------------------------------------
            self._merge(m, job, head, elem, part_max, part_sum, part_r, smax, hmax, dmax)
        return m

    def _advance(self, m, token, slot, page_no, job):
        """Step to the next token of the K region: its slot, and its page at a page end."""
        m.d.sync += token.eq(token + 1)
        with m.If(slot + 1 == job.tpp):
            m.d.sync += [slot.eq(0), page_no.eq(page_no + 1)]
        with m.Else():
            m.d.sync += slot.eq(slot + 1)

    def _sweep(self, m, token, head, lo, hi, job, after):
        """Step (head, token) over the split's tokens, head-major; then go to `after`."""
        with m.If(token + 1 >= hi):
            m.d.sync += token.eq(lo)
            with m.If(head + 1 == job.heads):
                m.d.sync += head.eq(0)
                m.next = after
            with m.Else():
                m.d.sync += head.eq(head + 1)
        with m.Else():
            m.d.sync += token.eq(token + 1)

    def _merge(self, m, job, head, elem, part_max, part_sum, part_r, smax, hmax, dmax):
        """`special.merge` of the job's partials per head, written out element by element."""
        top = Signal(signed(FX_BITS))
        weights = Array(Signal(special.PROB_FRAC + 1, name=f"w{i}") for i in range(smax))
        scaled = Array(Signal(SUM_BITS + 1, name=f"a{i}") for i in range(smax))
        total = Signal(SUM_BITS + 8)
        which = Signal(range(smax + 1))
        acc = Signal(signed(ACC_BITS))
        index = head + which * hmax
        gap = Signal(signed(FX_BITS + 2))
        m.d.comb += gap.eq(part_max[index] - top)
        e = exp_fx(m, gap, "e_merge")
        a = rshift_round(part_sum[index] * e, special.EXP_FRAC)
        w = div_round(m, scaled[which] << special.PROB_FRAC, Mux(total == 0, 1, total),
                      special.PROB_FRAC + 1, "w_merge")
        with m.State("MERGE"):
            with m.If(head == job.heads):
                m.next = "IDLE"
            with m.Else():
                m.d.sync += [top.eq(INT32_MIN), which.eq(0), total.eq(0)]
                m.next = "MERGE_MAX"
        with m.State("MERGE_MAX"):
            with m.If(part_max[index] > top):
                m.d.sync += top.eq(part_max[index])
            with m.If(which + 1 == job.splits):
                m.d.sync += which.eq(0)
                m.next = "MERGE_SUM"
            with m.Else():
                m.d.sync += which.eq(which + 1)
        with m.State("MERGE_SUM"):
            m.d.sync += [scaled[which].eq(a), total.eq(total + a)]
            with m.If(which + 1 == job.splits):
                m.d.sync += which.eq(0)
                m.next = "MERGE_WEIGHT"
            with m.Else():
                m.d.sync += which.eq(which + 1)
        with m.State("MERGE_WEIGHT"):
            m.d.sync += weights[which].eq(w)
            with m.If(which + 1 == job.splits):
                m.d.sync += [which.eq(0), acc.eq(0), elem.eq(0)]
                m.next = "MERGE_MIX"
            with m.Else():
                m.d.sync += which.eq(which + 1)
        with m.State("MERGE_MIX"):
            m.d.comb += part_r.addr.eq((which * hmax + head) * dmax + elem)
            step = acc + weights[which] * part_r.data
            with m.If(which + 1 == job.splits):
                out = saturate(rshift_round(step[:ACC_BITS].as_signed(), special.PROB_FRAC),
                               FX_BITS)
                m.d.comb += [self.cdram_wr.en.eq(1),
                             self.cdram_wr.addr.eq(job.o_addr + (head * job.head_dim
                                                                 + elem) * 4),
                             self.cdram_wr.data.eq(out[:FX_BITS]),
                             self.cdram_wr.mask.eq(0xF)]
                m.d.sync += [which.eq(0), acc.eq(0)]
                with m.If(elem + 1 == job.head_dim):
                    m.d.sync += [elem.eq(0), head.eq(head + 1)]
                    m.next = "MERGE"
                with m.Else():
                    m.d.sync += elem.eq(elem + 1)
            with m.Else():
                m.d.sync += [acc.eq(step), which.eq(which + 1)]
