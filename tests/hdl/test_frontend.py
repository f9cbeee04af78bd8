"""The front end: ISA-derived layouts, fetch and CTRL timing, tokens, program files, SRAM."""
import gc
import random
import warnings

import numpy as np
import pytest
from amaranth.hdl import UnusedElaboratable
from amaranth.lib import data
from amaranth.sim import Simulator

from trimem import bundle, isa, timing
from trimem.hdl import frontend
from trimem.hdl.frontend import Frontend, Sram, SyncTokens, engine_layout, instr_layout

MXU, VPU = isa.Engine.MXU, isa.Engine.VPU
GEMM = dict(m=1, n=2, k=8, a_addr=0, s_addr=0, w_addr=0, o_addr=0, bits=8)


def simulate(dut, bench, *, clock=1e-8):
    sim = Simulator(dut)
    sim.add_clock(clock)
    sim.add_testbench(bench)
    sim.run()


def rejects(pattern: str, build) -> None:
    """`build()` raises ValueError matching `pattern`; its half-built component is not an
    unused-elaboratable warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnusedElaboratable)
        with pytest.raises(ValueError, match=pattern):
            build()
        gc.collect()


def word_int(word: bytes) -> int:
    return int.from_bytes(word, "little")


@pytest.mark.unit
def test_instruction_layouts_place_every_field_where_the_isa_table_does():
    rng = random.Random(0)
    for instr in isa.INSTRUCTIONS:
        for _ in range(3):
            fields = {f.name: rng.choice(f.choices) if f.choices else
                      rng.randint(f.minimum, f.max) for f in instr.fields}
            view = data.Const(instr_layout(instr), word_int(isa.encode(instr.name, **fields)))
            assert view.opcode == instr.opcode
            assert {name: view[name] for name in fields} == fields


@pytest.mark.unit
def test_engine_layout_has_the_engine_and_ctrl_instructions_by_short_name():
    layout = engine_layout(VPU)
    names = {name for name, _ in layout}
    assert names == {"raw", "nop", "halt", "push", "pop", "embed", "rmsnorm", "quant", "add",
                     "silumul", "rope", "kvapp", "attn"}
    assert layout.size == isa.WORD_BITS


@pytest.mark.unit
def test_program_words_reads_the_bundle_hex_and_the_program_file(tmp_path):
    words = [isa.encode("MXU.GEMM", **GEMM), isa.encode("PUSH", dst=VPU), isa.encode("HALT")]
    text = bundle.readmemh(np.frombuffer(b"".join(words), np.uint8), isa.WORD_BYTES)
    (tmp_path / "mxu.hex").write_bytes(text)
    isa.write_program(tmp_path / "mxu.bin", MXU, words)
    expected = [word_int(w) for w in words]
    assert frontend.program_words(tmp_path / "mxu.hex") == expected
    assert frontend.program_words(tmp_path / "mxu.bin") == expected
    assert frontend.program_words(words) == expected


@pytest.mark.unit
def test_a_hex_line_that_is_not_one_word_is_rejected_with_its_line(tmp_path):
    (tmp_path / "bad.hex").write_text("00\n")
    with pytest.raises(ValueError, match=r"^.*bad\.hex:1: '00' is not one 256-bit word"):
        frontend.program_words(tmp_path / "bad.hex")


@pytest.mark.unit
def test_a_program_longer_than_the_memory_is_rejected_with_the_depth_to_use():
    words = [isa.encode("NOP")] * 3
    rejects(r"^the program has 3 words but depth is 2; raise depth to at least 3$",
            lambda: Frontend(MXU, words, depth=2))


@pytest.mark.unit
def test_a_second_top_of_the_same_name_is_rejected():
    frontend.register_top("test-only", engines=())(lambda cfg: None)
    try:
        with pytest.raises(ValueError, match=r"^top 'test-only' is registered twice"):
            frontend.register_top("test-only", engines=())(lambda cfg: None)
    finally:
        del frontend.TOPS["test-only"]


def run_stream(words, *, busy=5, pop_from=0, cycles=40):
    """Run an MXU front end with an engine that is busy `busy` cycles per word and a token
    source whose POPs succeed from cycle `pop_from`; return the log of issues."""
    dut = Frontend(MXU, words)
    log = {"instr": [], "push": [], "pop": []}

    async def bench(ctx):
        ctx.set(dut.run, 1)
        ctx.set(dut.o_push.ready, 1)
        left = 0
        for cycle in range(cycles):
            ctx.set(dut.o_instr.ready, left == 0)
            ctx.set(dut.o_pop.ready, cycle >= pop_from)
            if ctx.get(dut.o_instr.valid) and left == 0:
                log["instr"].append(cycle)
                left = busy
            for kind in ("push", "pop"):
                port = getattr(dut, f"o_{kind}")
                if ctx.get(port.valid) and ctx.get(port.ready):
                    log[kind].append((cycle, ctx.get(port.payload)))
            await ctx.tick()
            left = max(left - 1, 0)
        log.update(halted=ctx.get(dut.halted), error=ctx.get(dut.error),
                   cycles=ctx.get(dut.cycles))

    simulate(dut, bench)
    return log


@pytest.mark.sim
def test_ctrl_instructions_take_their_timing_cycles_and_halt_takes_none():
    words = [isa.encode("NOP"), isa.encode("PUSH", dst=VPU), isa.encode("MXU.GEMM", **GEMM),
             isa.encode("NOP"), isa.encode("HALT")]
    log = run_stream(words, busy=5)
    first = log["push"][0][0] - timing.NOP_CYCLES
    assert log["push"] == [(first + 1, VPU)]
    assert log["instr"] == [first + 1 + timing.PUSH_CYCLES]
    expected = timing.NOP_CYCLES + timing.PUSH_CYCLES + 5 + timing.NOP_CYCLES + timing.HALT_CYCLES
    assert (log["halted"], log["error"], log["cycles"]) == (1, 0, expected)


@pytest.mark.sim
def test_pop_ends_one_cycle_after_its_token_arrives():
    words = [isa.encode("POP", src=VPU), isa.encode("HALT")]
    log = run_stream(words, pop_from=9)
    assert log["pop"] == [(9, VPU)]
    first_issue = 1
    assert log["cycles"] == 9 + timing.POP_CYCLES - first_issue


@pytest.mark.sim
def test_a_word_of_another_engine_stops_the_stream_with_error():
    log = run_stream([isa.encode("VPU.ADD", m=1, n=1, a_addr=0, b_addr=0, o_addr=0)])
    assert (log["halted"], log["error"], log["instr"]) == (1, 1, [])


@pytest.mark.sim
def test_running_past_the_last_word_without_halt_is_an_error():
    log = run_stream([isa.encode("NOP")])
    assert (log["halted"], log["error"]) == (1, 1)


@pytest.mark.sim
def test_sync_tokens_count_pushes_and_let_pops_through_only_when_positive():
    dut = SyncTokens(width=2)
    push, pop = dut.port("MXU", "push"), dut.port("VPU", "pop")
    seen = []

    async def bench(ctx):
        ctx.set(pop.payload, MXU)
        ctx.set(push.payload, VPU)
        for cycle in range(8):
            ctx.set(push.valid, cycle < 4)
            ctx.set(pop.valid, cycle >= 5)
            seen.append((ctx.get(push.ready), ctx.get(pop.ready)))
            await ctx.tick()

    simulate(dut, bench)
    # three pushes fill the 2-bit counter, the fourth waits; pops drain it from cycle 5
    assert seen == [(1, 0), (1, 1), (1, 1), (0, 1), (0, 1), (0, 1), (1, 1), (1, 1)]


@pytest.mark.sim
def test_sram_windows_read_and_write_at_any_byte_alignment():
    rng = np.random.default_rng(0)
    init = rng.integers(0, 256, 256, dtype=np.uint8)
    dut = Sram(256, {"a": 7, "b": 16}, 6, init=init.tobytes())
    model = init.copy()
    checks = []

    async def bench(ctx):
        for addr in (0, 1, 15, 16, 31, 100, 249):
            ctx.set(dut.rd_a.addr, addr)
            ctx.set(dut.rd_b.addr, 240 - addr % 200)
            await ctx.tick()
            checks.append((ctx.get(dut.rd_a.data), int.from_bytes(model[addr:addr + 7], "little")))
            b = 240 - addr % 200
            checks.append((ctx.get(dut.rd_b.data), int.from_bytes(model[b:b + 16], "little")))
        for addr, mask in ((13, 0b111111), (30, 0b101101), (0, 0b000001)):
            data_bytes = rng.integers(0, 256, 6, dtype=np.uint8)
            ctx.set(dut.wr.addr, addr)
            ctx.set(dut.wr.data, int.from_bytes(data_bytes.tobytes(), "little"))
            ctx.set(dut.wr.mask, mask)
            ctx.set(dut.wr.en, 1)
            await ctx.tick()
            ctx.set(dut.wr.en, 0)
            for i in range(6):
                if mask >> i & 1:
                    model[addr + i] = data_bytes[i]
            ctx.set(dut.rd_b.addr, addr)
            await ctx.tick()
            checks.append((ctx.get(dut.rd_b.data), int.from_bytes(model[addr:addr + 16], "little")))

    simulate(dut, bench)
    assert [got for got, _ in checks] == [want for _, want in checks]


@pytest.mark.unit
def test_an_sram_smaller_than_two_lines_is_rejected():
    rejects(r"^SRAM size 16 must be a positive multiple of two 16-byte lines$",
            lambda: Sram(16, {"a": 16}, 4))


@pytest.mark.unit
def test_sram_image_places_the_bundles_sram_images_and_skips_other_spaces():
    images = [bundle.MemoryImage("w", "SRAM", 4, np.arange(3, dtype=np.uint8)),
              bundle.MemoryImage("h", "HBM", 0, np.ones(4, np.uint8)),
              bundle.MemoryImage("a", "SRAM", 8, np.full(2, 9, np.uint8))]
    assert frontend.sram_image(images, 12) == bytes([0, 0, 0, 0, 0, 1, 2, 0, 9, 9, 0, 0])
    with pytest.raises(ValueError, match=r"^SRAM image 'a' ends at byte 10, beyond the 9-byte"):
        frontend.sram_image(images, 9)
    clash = images + [bundle.MemoryImage("b", "SRAM", 5, np.zeros(1, np.uint8))]
    with pytest.raises(ValueError, match=r"^SRAM image 'b' overlaps an earlier image"):
        frontend.sram_image(clash, 12)


@pytest.mark.sim
def test_a_program_written_through_i_load_runs_once_run_rises():
    words = [isa.encode("PUSH", dst=VPU), isa.encode("HALT")]
    dut = Frontend(MXU, depth=4)
    log = []

    async def bench(ctx):
        ctx.set(dut.o_push.ready, 1)
        ctx.set(dut.o_instr.ready, 1)
        for addr, word in enumerate(words):
            ctx.set(dut.i_load.payload.addr, addr)
            ctx.set(dut.i_load.payload.word, word_int(word))
            ctx.set(dut.i_load.valid, 1)
            await ctx.tick()
        ctx.set(dut.i_load.valid, 0)
        ctx.set(dut.run, 1)
        for _ in range(6):
            if ctx.get(dut.o_push.valid):
                log.append(ctx.get(dut.o_push.payload))
            await ctx.tick()
        log.append((ctx.get(dut.halted), ctx.get(dut.error), ctx.get(dut.cycles)))

    simulate(dut, bench)
    assert log == [VPU, (1, 0, timing.PUSH_CYCLES)]
