"""The in-storage attention engine and the CSD top in Amaranth's simulator, bit for bit against
`trimem.special.attention` on KV caches laid out in flash pages as `trimem.layout` places them,
and cycle for cycle against the emulator (docs/timing.md, "CSD")."""
import dataclasses

import numpy as np
import pytest
from amaranth.hdl import Elaboratable, Fragment, Module, Signal, signed
from amaranth.back import verilog
from amaranth.lib import wiring
from amaranth.sim import Simulator

from trimem import isa, layout, numerics, special
from trimem.config import load_config
from trimem.dram import FlashTiming
from trimem.emulator.machine import Machine
from trimem.hdl.attention import AttentionEngine, exp_fx
from trimem.hdl.csd_top import CsdTop, KvAppend
from trimem.hdl.system import ByteRam, FlashPages
from tests.hdl.rejects import rejects

pytestmark = pytest.mark.sim

SMALL = load_config("trimem-small")
CSD = SMALL.csd
LIMITS = dict(max_ctx=32, max_head_dim=32, max_heads=4, max_splits=4)
OUT = 2048
"""CDRAM byte address of the outputs in these benches."""



def attention_case(*, positions, q_heads, kv_heads, d, bits, group_log2, splits, topk,
                   seed=0, layers=2, layer=1, ctx_log2=5):
    """(CSD.ATTN fields, flash bytes, CDRAM bytes, expected [m, q_heads, d] fx)."""
    rng = np.random.default_rng(seed)
    group = isa.group_size(group_log2, d)
    positions = np.array(positions)
    tokens = int(positions.max()) + 1
    k = numerics.to_fx(rng.normal(size=(kv_heads, tokens, d)) * 2)
    v = numerics.to_fx(rng.normal(size=(kv_heads, tokens, d)))
    caches = {"K": numerics.quantize_kv(k, bits, group), "V": numerics.quantize_kv(v, bits, group)}
    q = numerics.to_fx(rng.normal(size=(len(positions), q_heads, d)))
    expect = special.attention(q, caches["K"], caches["V"], positions, kv_heads=kv_heads,
                               kv_bits=bits, splits=splits, topk=topk)
    kv = dict(layers=layers, kv_heads=kv_heads, max_ctx=1 << ctx_log2, head_dim=d, bits=bits,
              group=group, page_bytes=CSD.page_bytes)
    flash = np.zeros(layout.kv_cache_bytes(1, **kv), np.uint8)
    size = layout.kv_token_bytes(d, bits, group)
    for kind, (qv, g, mant, exp) in caches.items():
        for h in range(kv_heads):
            rows = layout.pack_kv_tokens(qv[h], g[h], mant[h], exp[h], bits)
            for t in range(tokens):
                at = layout.kv_offset(0, layer, h, kind, t, **kv)
                flash[at:at + size] = rows[t]
    cdram = np.zeros(4096, np.uint8)
    packed = layout.pack_fx_rows(q.reshape(len(positions), -1))
    cdram[:packed.size] = packed
    cdram[1024:1024 + 4 * len(positions)] = positions.astype("<i4").view(np.uint8)
    fields = dict(m=len(positions), seq=0, layer=layer, q_heads=q_heads, kv_heads=kv_heads,
                  head_dim=d, q_addr=0, pos_addr=1024, o_addr=OUT, kv_base=0, layers=layers,
                  ctx_log2=ctx_log2, kv_bits=bits, kv_group_log2=group_log2, splits=splits,
                  topk=topk)
    return fields, flash.tobytes(), cdram.tobytes(), expect


class CsdBench(Elaboratable):
    """A CSD top with its flash pages and CDRAM."""

    def __init__(self, program, flash, cdram):
        self.top = CsdTop(CSD, program=program, **LIMITS)
        self.flash = FlashPages(len(flash), page_bytes=CSD.page_bytes, beat=CSD.engine_lanes,
                                latency=FlashTiming(CSD).page_read, init=flash)
        self.cdram = ByteRam(4096, reads=(4, 4), writes=(4,), init=cdram)

    def elaborate(self, platform):
        m = Module()
        m.submodules.top, m.submodules.flash, m.submodules.cdram = \
            self.top, self.flash, self.cdram
        wiring.connect(m, self.top.o_page, self.flash.i_request)
        wiring.connect(m, self.flash.o_data, self.top.i_page)
        wiring.connect(m, self.top.cdram_rd, self.cdram.read0)
        wiring.connect(m, self.top.cdram_wr, self.cdram.write0)
        return m


def emulated_cycles(program, images) -> int:
    """Cycles of the CSD stream `program` on the emulator with `images` (space, bytes at 0)."""
    machine = Machine(SMALL)
    for space, data in images:
        machine.memory(space).write(0, np.frombuffer(bytes(data), np.uint8))
    machine.run({isa.Engine.CSD: program})
    return int(machine.streams[isa.Engine.CSD].ends[-1])


def run_csd(case, extra=()):
    """Run CSD.ATTN (then `extra` words, then HALT); return the outputs, error, the top's
    cycles and the emulator's."""
    fields, flash, cdram, expect = case
    program = [isa.encode("CSD.ATTN", **fields), *extra, isa.encode("HALT")]
    bench = CsdBench(program, flash, cdram)
    got = {}

    async def testbench(ctx):
        ctx.set(bench.top.run, 1)
        cycles = 0
        while not ctx.get(bench.top.halted):
            await ctx.tick()
            cycles += 1
            assert cycles < 200_000, "the CSD stream never halted"
        got["error"], got["cycles"] = ctx.get(bench.top.error), ctx.get(bench.top.cycles)
        words = []
        for i in range(expect.size):
            ctx.set(bench.cdram.read1.addr, OUT + 4 * i)
            await ctx.tick()
            words.append(ctx.get(bench.cdram.read1.data))
        got["out"] = np.array(words, np.uint32).view(np.int32).reshape(expect.shape)

    sim = Simulator(bench)
    sim.add_clock(1e-8)
    sim.add_testbench(testbench)
    sim.run()
    got["emulated"] = emulated_cycles(program, [("FLASH", flash), ("CDRAM", cdram)])
    return got


# ---- pieces ------------------------------------------------------------------------------

def test_exp_fx_expression_equals_special_exp_fx():
    xs = np.concatenate([[0, -1, -2048, -4096, special.EXP_INPUT_MIN, special.EXP_INPUT_MIN - 5,
                          numerics.INT32_MIN],
                         np.random.default_rng(1).integers(-70000, 1, 24)])
    m = Module()
    x = Signal(signed(34))
    out = exp_fx(m, x, "e")
    got = []

    async def testbench(ctx):
        for v in xs:
            ctx.set(x, int(v))
            got.append(ctx.get(out))

    sim = Simulator(m)
    sim.add_testbench(testbench)
    sim.run()
    assert np.array_equal(np.array(got), special.exp_fx(xs.astype(np.int64)))


# ---- CSD.ATTN end to end ---------------------------------------------------------------

@pytest.mark.parametrize("shape", [
    dict(positions=[9], q_heads=2, kv_heads=1, d=16, bits=8, group_log2=3, splits=2, topk=0),
    dict(positions=[9], q_heads=2, kv_heads=1, d=16, bits=4, group_log2=0, splits=3, topk=4),
    dict(positions=[7], q_heads=4, kv_heads=2, d=8, bits=8, group_log2=0, splits=2, topk=3,
         seed=2),
    dict(positions=[13], q_heads=2, kv_heads=1, d=32, bits=8, group_log2=0, splits=2, topk=3,
         seed=3),
    dict(positions=[1], q_heads=2, kv_heads=1, d=8, bits=4, group_log2=0, splits=3, topk=1,
         seed=4),
    pytest.param(dict(positions=[14], q_heads=4, kv_heads=2, d=32, bits=8, group_log2=0,
                      splits=2, topk=5, seed=2), marks=pytest.mark.slow),
], ids=["gqa-two-splits", "kv4-topk", "two-kv-heads-topk", "a-page-boundary-topk",
        "an-empty-split", "two-pages-topk"])
def test_csd_attention_equals_special_attention_in_the_emulators_cycles(shape):
    case = attention_case(**shape)
    got = run_csd(case)
    assert not got["error"]
    assert np.array_equal(got["out"], case[3])
    assert got["cycles"] == got["emulated"]


@pytest.mark.slow
def test_csd_attention_over_two_rows_equals_special_attention_in_the_emulators_cycles():
    case = attention_case(positions=[9, 14], q_heads=4, kv_heads=2, d=16, bits=8, group_log2=3,
                          splits=2, topk=0)
    got = run_csd(case)
    assert np.array_equal(got["out"], case[3])
    assert got["cycles"] == got["emulated"]


# ---- CSD.KVAPP ---------------------------------------------------------------------------

class AppendBench(Elaboratable):
    """A CSD top with CDRAM and a byte-addressed flash that takes its appends."""

    def __init__(self, program, cdram, flash_bytes):
        self.top = CsdTop(CSD, program=program, **LIMITS)
        self.cdram = ByteRam(4096, reads=(4,), writes=(4,), init=cdram)
        self.flash = ByteRam(flash_bytes, reads=(4,), writes=(4,), addr_bits=40)

    def elaborate(self, platform):
        m = Module()
        m.submodules.top, m.submodules.cdram, m.submodules.flash = \
            self.top, self.cdram, self.flash
        wiring.connect(m, self.top.cdram_rd, self.cdram.read0)
        wiring.connect(m, self.top.cdram_wr, self.cdram.write0)
        wiring.connect(m, self.top.flash_wr, self.flash.write0)
        return m


def append_case(*, positions, kv_heads, d, bits, group_log2, seed=0, layers=2, layer=1,
                ctx_log2=5):
    """(CSD.KVAPP fields, CDRAM bytes, expected flash bytes) with extreme rows mixed in."""
    rng = np.random.default_rng(seed)
    m = len(positions)
    k, v = (rng.integers(-3 << 16, 3 << 16, (m, kv_heads * d)).astype(np.int32)
            for _ in range(2))
    k[0, :d] = 0
    k[-1, :2] = [numerics.INT32_MIN, numerics.INT32_MAX]
    v[0, d - 1] = numerics.INT32_MIN
    kv = dict(layers=layers, kv_heads=kv_heads, max_ctx=1 << ctx_log2, head_dim=d, bits=bits,
              group=isa.group_size(group_log2, d), page_bytes=CSD.page_bytes)
    flash = np.zeros(layout.kv_cache_bytes(1, **kv), np.uint8)
    size = layout.kv_token_bytes(d, bits, kv["group"])
    for kind, x in zip(layout.KV_KINDS, (k, v)):
        q, g, mant, exp = numerics.quantize_kv(x.reshape(m, kv_heads, d), bits, kv["group"])
        for t, p in enumerate(positions):
            for h in range(kv_heads):
                row = layout.pack_kv_tokens(q[t, h:h + 1], g[t, h:h + 1], mant[t, h:h + 1],
                                            exp[t, h:h + 1], bits)
                at = layout.kv_offset(0, layer, h, kind, p, **kv)
                flash[at:at + size] = row[0]
    cdram = np.zeros(4096, np.uint8)
    cdram[:k.nbytes], cdram[1024:1024 + v.nbytes] = k.view(np.uint8).ravel(), \
        v.view(np.uint8).ravel()
    cdram[3072:3072 + 4 * m] = np.array(positions, "<i4").view(np.uint8)
    fields = dict(m=m, seq=0, layer=layer, kv_heads=kv_heads, head_dim=d, k_addr=0,
                  v_addr=1024, pos_addr=3072, kv_base=0, layers=layers, ctx_log2=ctx_log2,
                  kv_bits=bits, kv_group_log2=group_log2)
    return fields, cdram.tobytes(), flash


def run_append(fields, cdram, nbytes):
    """Run CSD.KVAPP then HALT; return the flash bytes, error, the top's cycles and the
    emulator's."""
    program = [isa.encode("CSD.KVAPP", **fields), isa.encode("HALT")]
    bench = AppendBench(program, cdram, nbytes)
    got = {}

    async def testbench(ctx):
        ctx.set(bench.top.run, 1)
        cycles = 0
        while not ctx.get(bench.top.halted):
            await ctx.tick()
            cycles += 1
            assert cycles < 50_000, "the CSD stream never halted"
        got["error"], got["cycles"] = ctx.get(bench.top.error), ctx.get(bench.top.cycles)
        words = []
        for at in range(0, nbytes, 4):
            ctx.set(bench.flash.read0.addr, at)
            await ctx.tick()
            words.append(ctx.get(bench.flash.read0.data))
        got["flash"] = np.array(words, "<u4").view(np.uint8)[:nbytes]

    sim = Simulator(bench)
    sim.add_clock(1e-8)
    sim.add_testbench(testbench)
    sim.run()
    if not got["error"]:
        got["emulated"] = emulated_cycles(program, [("CDRAM", cdram)])
    return got


@pytest.mark.parametrize("shape", [
    dict(positions=[0, 23, 31], kv_heads=2, d=16, bits=4, group_log2=3),
    dict(positions=[5, 9], kv_heads=1, d=16, bits=8, group_log2=0, seed=1),
    pytest.param(dict(positions=[1, 2, 30], kv_heads=2, d=32, bits=8, group_log2=1, seed=2),
                 marks=pytest.mark.slow),
], ids=["kv4-groups-of-8", "kv8-whole-head", "kv8-pairs"])
def test_csd_kvapp_writes_the_emulators_packed_tokens_into_their_slots_in_its_cycles(shape):
    fields, cdram, expect = append_case(**shape)
    got = run_append(fields, cdram, expect.size)
    assert not got["error"]
    assert np.array_equal(got["flash"], expect)
    assert got["cycles"] == got["emulated"]


def test_csd_kvapp_of_a_head_beyond_the_buffers_sets_error_and_writes_nothing():
    fields, cdram, _ = append_case(positions=[3], kv_heads=1, d=16, bits=8, group_log2=0)
    fields["head_dim"] = 2 * LIMITS["max_head_dim"]
    got = run_append(fields, cdram, 1024)
    assert got["error"] == 1
    assert not got["flash"].any()


# ---- building ----------------------------------------------------------------------------

def test_csd_top_elaborates_for_trimem_small_and_wide_lanes():
    for csd in (CSD, dataclasses.replace(CSD, engine_lanes=16)):
        Fragment.get(CsdTop(csd, program=[isa.encode("HALT")], **LIMITS), None).prepare()


@pytest.mark.slow
def test_csd_top_emits_verilog():
    text = verilog.convert(CsdTop(CSD, program=[isa.encode("HALT")], **LIMITS), name="csd_top",
                           emit_src=False)
    assert "module csd_top" in text


@pytest.mark.unit
def test_buffers_too_big_to_build_are_rejected_with_the_fix():
    rejects(r"^these buffer sizes need \d+ bits, more than the \d+ an RTL build may hold; "
            r"lower max_ctx",
            lambda: AttentionEngine(CSD, max_ctx=1 << 17, max_head_dim=256, max_heads=255))


@pytest.mark.unit
def test_a_kv_append_head_limit_outside_the_supported_range_is_rejected():
    rejects(r"^max_head_dim must be an int in \[2, \d+\], got 1$",
            lambda: KvAppend(max_head_dim=1))


@pytest.mark.unit
def test_a_head_dim_limit_that_splits_a_lane_chunk_is_rejected():
    rejects(r"^max_head_dim 12 is not a multiple of csd\.engine_lanes = 8",
            lambda: AttentionEngine(CSD, max_head_dim=12))


@pytest.mark.unit
def test_a_streaming_csd_has_no_rtl_and_the_top_says_how_to_build_one():
    rejects(r"^csd\.engine = 'streaming' has no RTL: .*set csd\.engine: sequential",
            lambda: CsdTop(dataclasses.replace(CSD, engine="streaming"),
                           program=[isa.encode("HALT")], **LIMITS))
