"""The trimem-small system top: streams from a bundle's $readmemh files, PIM and CSD ordered by
SYNC tokens, results bit for bit against trimem's numerics; and the memory models."""
import gc
import warnings

import numpy as np
import pytest
from amaranth.hdl import Fragment, UnusedElaboratable
from amaranth.sim import Simulator

from trimem import bundle, isa
from trimem.config import load_config
from trimem.dram import FlashTiming
from trimem.hdl.system import (HBM_MODEL_BYTES, HOST_SPACE_BYTES, ByteRam, FlashPages,
                                TrimemSystem, bundle_inputs, check_system, read_hex,
                                space_images)

from tests.hdl.test_attention import attention_case
from tests.hdl.test_pim import gemv_case

pytestmark = pytest.mark.sim

CFG = load_config("trimem-small")
ATTENTION = dict(max_ctx=32, max_head_dim=16, max_heads=2, max_splits=2)


def simulate(dut, bench):
    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()


async def read_words(ctx, port, addr, count):
    out = []
    for i in range(count):
        ctx.set(port.addr, addr + 4 * i)
        await ctx.tick()
        out.append(ctx.get(port.data))
    return np.array(out, np.uint32).view(np.int32)


# ---- memory models -----------------------------------------------------------------------

def test_byte_ram_reads_and_writes_unaligned_runs():
    ram = ByteRam(64, reads=(4, 8), writes=(8,), init=bytes(range(64)))
    got = {}

    async def bench(ctx):
        ctx.set(ram.read1.addr, 13)
        await ctx.tick()
        got["init"] = ctx.get(ram.read1.data).to_bytes(8, "little")
        ctx.set(ram.write0.addr, 5)
        ctx.set(ram.write0.data, int.from_bytes(b"ABCDEFGH", "little"))
        ctx.set(ram.write0.mask, 0b11110111)
        ctx.set(ram.write0.en, 1)
        await ctx.tick()
        ctx.set(ram.write0.en, 0)
        ctx.set(ram.read0.addr, 6)
        await ctx.tick()
        got["after"] = ctx.get(ram.read0.data).to_bytes(4, "little")

    simulate(ram, bench)
    assert got["init"] == bytes(range(13, 21))
    assert got["after"] == b"BC" + bytes([8]) + b"E"


def test_flash_pages_answer_after_the_latency_in_page_order():
    flash = FlashPages(64, page_bytes=16, beat=8, latency=5, init=bytes(range(64)))
    got = {"beats": []}

    async def bench(ctx):
        ctx.set(flash.o_data.ready, 1)
        ctx.set(flash.i_request.payload.addr, 32)
        ctx.set(flash.i_request.valid, 1)
        await ctx.tick()
        ctx.set(flash.i_request.valid, 0)
        for cycle in range(1, 9):
            if ctx.get(flash.o_data.valid):
                got["beats"].append((cycle, ctx.get(flash.o_data.payload).to_bytes(8, "little")))
            await ctx.tick()

    simulate(flash, bench)
    assert got["beats"] == [(5, bytes(range(32, 40))), (6, bytes(range(40, 48)))]


def test_flash_pages_serve_bytes_written_through_the_write_port():
    flash = FlashPages(64, page_bytes=16, beat=8, latency=2)
    got = []

    async def bench(ctx):
        ctx.set(flash.i_write.addr, 18)
        ctx.set(flash.i_write.data, int.from_bytes(b"KV!?", "little"))
        ctx.set(flash.i_write.mask, 0b0111)
        ctx.set(flash.i_write.en, 1)
        await ctx.tick()
        ctx.set(flash.i_write.en, 0)
        ctx.set(flash.o_data.ready, 1)
        ctx.set(flash.i_request.payload.addr, 16)
        ctx.set(flash.i_request.valid, 1)
        await ctx.tick()
        ctx.set(flash.i_request.valid, 0)
        for _ in range(4):
            if ctx.get(flash.o_data.valid):
                got.append(ctx.get(flash.o_data.payload).to_bytes(8, "little"))
            await ctx.tick()

    simulate(flash, bench)
    assert got == [bytes(2) + b"KV!" + bytes(3), bytes(8)]


def test_read_hex_takes_the_bundle_format_back_to_bytes(tmp_path):
    data = np.arange(20, dtype=np.uint8)
    path = tmp_path / "x.hex"
    path.write_bytes(bundle.readmemh(data, 8))
    assert read_hex(path, 8, 32) == data.tobytes() + bytes(12)


@pytest.mark.unit
def test_read_hex_rejects_a_line_of_the_wrong_width(tmp_path):
    path = tmp_path / "x.hex"
    path.write_text("0011\n")
    with pytest.raises(ValueError, match=r"x\.hex:1: '0011' is not 8 bytes of hex; give the "
                                         r"width_bytes"):
        read_hex(path, 8, 16)


# ---- the system ----------------------------------------------------------------------------

def _bundle(tmp_path):
    """A bundle whose PIM GEMV and CSD attention run concurrently; CSD waits for PIM's token."""
    pim = CFG.pim
    images, gbuf, gemv, expect_pim = gemv_case(pim, n=4, k=32, bits=8, group_log2=3, m=1)
    attn, flash, cdram, expect_csd = attention_case(positions=[5], q_heads=2, kv_heads=1, d=8,
                                                    bits=8, group_log2=0, splits=2, topk=0)
    pimdram = b"".join(b"".join(w.to_bytes(pim.burst_bytes, "little") for w in bank)
                       for bank in images[0])
    programs = {
        "pim": [isa.encode("PIM.GEMV", **gemv), isa.encode("PUSH", dst=isa.Engine.CSD),
                isa.encode("HALT")],
        "csd": [isa.encode("POP", src=isa.Engine.PIM), isa.encode("CSD.ATTN", **attn),
                isa.encode("HALT")],
        "mxu": [isa.encode("HALT")], "vpu": [isa.encode("HALT")]}
    memory = [bundle.MemoryImage("pimdram", "PIMDRAM", 0, np.frombuffer(pimdram, np.uint8)),
              bundle.MemoryImage("gbuf", "GBUF", 0, np.frombuffer(gbuf, np.uint8)),
              bundle.MemoryImage("flash", "FLASH", 0, np.frombuffer(flash, np.uint8)),
              bundle.MemoryImage("cdram", "CDRAM", 0, np.frombuffer(cdram[:1100], np.uint8))]
    entry = bundle.Entry("decode", "decode", programs)
    out = bundle.write_bundle(bundle.Bundle({}, CFG.to_dict(), {}, {"decode": entry}, memory),
                              tmp_path / "b")
    return out, expect_pim, expect_csd, attn["o_addr"]


@pytest.mark.slow
def test_system_runs_a_bundle_with_pim_and_csd_ordered_by_tokens(tmp_path):
    path, expect_pim, expect_csd, out_addr = _bundle(tmp_path)
    programs, images = bundle_inputs(path, "decode", CFG)
    system = TrimemSystem(CFG, programs=programs, images=images, attention=ATTENTION)
    got = {}

    async def bench(ctx):
        ctx.set(system.run, 1)
        cycles = 0
        while not ctx.get(system.halted):
            await ctx.tick()
            cycles += 1
            assert cycles < 50_000, "the system never halted"
        got["error"] = ctx.get(system.error)
        got["pim"], got["csd"] = ctx.get(system.cycles_pim), ctx.get(system.cycles_csd)
        got["pres"] = await read_words(ctx, system.host_pres, 0, expect_pim.size)
        got["cdram"] = await read_words(ctx, system.host_cdram, out_addr, expect_csd.size)

    simulate(system, bench)
    assert not got["error"]
    assert np.array_equal(got["pres"], expect_pim.reshape(-1))
    assert np.array_equal(got["cdram"], expect_csd.reshape(-1))
    assert got["csd"] > got["pim"]


def test_system_elaborates_for_trimem_small():
    system = TrimemSystem(CFG, attention=ATTENTION)
    Fragment.get(system, None).prepare()
    assert system.flash.latency == FlashTiming(CFG.csd).page_read
    assert system.sizes["HBM"] == HBM_MODEL_BYTES and system.sizes["HOST"] == HOST_SPACE_BYTES


@pytest.mark.unit
def test_system_needs_all_three_engines():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnusedElaboratable)
        with pytest.raises(ValueError, match=r"^config 'instinfer' lacks fpga, pim; the system "
                                             r"top needs all three engines"):
            TrimemSystem(load_config("instinfer"))
        gc.collect()


@pytest.mark.unit
def test_system_rejects_a_program_for_a_stream_it_does_not_run():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnusedElaboratable)
        with pytest.raises(ValueError, match=r"^programs for \['gpu'\]: the RTL system runs "
                                             r"dma, mxu, vpu, pim, csd$"):
            TrimemSystem(CFG, programs={"gpu": [isa.encode("HALT")]})
        gc.collect()


@pytest.mark.unit
def test_images_beyond_a_space_are_rejected():
    image = bundle.MemoryImage("big", "GBUF", CFG.pim.gbuf_bytes - 2, np.zeros(4, np.uint8))
    with pytest.raises(ValueError, match=r"^image 'big' ends at byte \d+ of GBUF, which has"):
        space_images(CFG, [image])


@pytest.mark.unit
def test_an_image_past_the_modelled_part_of_a_space_names_the_fix():
    image = bundle.MemoryImage("w", "HBM", HBM_MODEL_BYTES - 2, np.zeros(4, np.uint8))
    with pytest.raises(ValueError, match=r"^image 'w' ends at byte \d+ of HBM, which has "
                                         r"262144 modelled; compile for this hardware config, "
                                         r"or model more of HBM$"):
        space_images(CFG, [image], {"HBM": HBM_MODEL_BYTES})
    assert len(space_images(CFG, [image])["HBM"]) == HBM_MODEL_BYTES + 2


@pytest.mark.unit
def test_a_size_for_a_space_the_system_does_not_model_is_refused():
    with pytest.raises(ValueError, match=r"^sizes names 'DISK', which the system top does not "
                                         r"model; it models HBM, SRAM"):
        space_images(CFG, [], {"DISK": 4})


@pytest.mark.unit
def test_a_machine_with_memories_beyond_simulation_is_refused_before_building():
    with pytest.raises(ValueError, match=r"^config 'trimem-all' has .*FLASH = \d+ bytes, more "
                                         r"than the 4194304 bytes a memory model of the system "
                                         r"top holds; use a small preset such as trimem-small$"):
        check_system(load_config("trimem-all"))
    check_system(CFG)
