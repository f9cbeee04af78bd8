"""The DMA engine against the emulator's: the same copies land the same bytes, and every copy
issues in the emulator's cycle (trimem-small; only the first 4 KiB of each space modelled)."""
import numpy as np
import pytest
from amaranth.back import verilog
from amaranth.hdl import Elaboratable, Module
from amaranth.lib import wiring
from amaranth.sim import Simulator

from trimem import isa
from trimem.config import load_config, load_config_dict
from trimem.emulator.machine import Machine
from trimem.hdl.dma_top import DMA_BYTES, DmaEngine
from trimem.hdl.frontend import Frontend
from trimem.hdl.reserve import Reciprocal, Reservations, resource_names
from trimem.hdl.system import ByteRam
from trimem.timing import cycles_per_byte, stream_cycles

from tests.hdl.rejects import rejects

pytestmark = pytest.mark.sim

CFG = load_config("trimem-small")
RAM_BYTES = 4096
"""Bytes modelled of every space, from address 0."""
SPACES = tuple(isa.Space[name] for name in ("HOST", "HBM", "SRAM", "GBUF", "PRES", "CDRAM"))
"""The spaces the engine reaches on trimem-small."""


def copy(src, src_addr, dst, dst_addr, nbytes):
    return (f"DMA.COPY src_space={src} src_addr={src_addr:#x} dst_space={dst} "
            f"dst_addr={dst_addr:#x} nbytes={nbytes}")


SHARED = load_config_dict({"inherits": "trimem-small", "name": "shared",
                           "pim": {"shared_with_hbm": True, "channels": 2, "rows": 2048}})
"""PIM channels in the HBM stacks: PIM channel c's bus is HBM channel c."""


def ram_bytes(space, cfg=CFG):
    """Bytes modelled of `space`: its first RAM_BYTES, or all of a smaller one."""
    return min(RAM_BYTES, cfg.space_bytes(space) or RAM_BYTES)


def images(seed=0, cfg=CFG):
    """Random contents of every space the engine reaches."""
    rng = np.random.default_rng(seed)
    return {space: rng.integers(0, 256, ram_bytes(space, cfg), np.uint8).tobytes()
            for space in SPACES}


class Bench(Elaboratable):
    """Front end, DMA engine, `Reservations` and, with `rams`, a `ByteRam` per space (a second
    read port each for the testbench)."""

    def __init__(self, program, init, clients=("dma",), rams=True, cfg=CFG):
        width = DMA_BYTES
        self.frontend = Frontend(isa.Engine.DMA, isa.assemble(program + "\nHALT", "DMA"))
        self.dma = DmaEngine(cfg, width=width)
        self.res = Reservations(resource_names(cfg), clients)
        self.rams = {space: ByteRam(ram_bytes(space, cfg), reads=(width, width), writes=(width,),
                                    init=init[space], addr_bits=isa.ADDR_BITS[space])
                     for space in self.dma.spaces if rams}

    def elaborate(self, platform):
        m = Module()
        fe, dma, res = self.frontend, self.dma, self.res
        m.submodules += [fe, dma, res]
        wiring.connect(m, fe.o_instr, dma.i_instr)
        wiring.connect(m, dma.res, res.dma)
        m.d.comb += [dma.now.eq(res.now), fe.run.eq(~dma.error)]
        for space, ram in self.rams.items():
            m.submodules[space.name.lower()] = ram
            wiring.connect(m, getattr(dma, f"rd_{space.name.lower()}"), ram.read0)
            wiring.connect(m, getattr(dma, f"wr_{space.name.lower()}"), ram.write0)
        return m


def simulate(program, init, *, rams=True, max_cycles=3000, cfg=CFG):
    """Run a DMA program on the RTL: issue cycles, stream cycles, error, memory contents."""
    bench = Bench(program, init, rams=rams, cfg=cfg)
    fe, dma = bench.frontend, bench.dma
    out = {"issues": [], "memory": {}}

    async def testbench(ctx):
        for _ in range(max_cycles):
            if ctx.get(fe.o_instr.valid) and ctx.get(fe.o_instr.ready):
                out["issues"].append(ctx.get(fe.cycles))
            if ctx.get(fe.halted) or ctx.get(dma.error):
                break
            await ctx.tick()
        out.update(cycles=ctx.get(fe.cycles), error=ctx.get(dma.error),
                   halted=ctx.get(fe.halted))
        await ctx.tick()
        for space, ram in bench.rams.items():
            chunks = []
            for at in range(0, ram.size, DMA_BYTES):
                ctx.set(ram.read1.addr, at)
                await ctx.tick()
                chunks.append(ctx.get(ram.read1.data).to_bytes(DMA_BYTES, "little"))
            out["memory"][space] = b"".join(chunks)[:ram.size]

    sim = Simulator(bench)
    sim.add_clock(1e-8)
    sim.add_testbench(testbench)
    sim.run()
    return out


def emulate(program, init, cfg=CFG):
    """The emulator's copy issue cycles, stream length and memory contents."""
    machine = Machine(cfg)
    for space, data in init.items():
        machine.memory(space).write(0, data)
    machine.run({"DMA": isa.assemble(program + "\nHALT", "DMA")})
    starts = machine.streams[isa.Engine.DMA].starts
    memory = {space: machine.memory(space).read(0, len(data)).tobytes()
              for space, data in init.items()}
    return {"issues": starts[:-1], "cycles": starts[-1], "memory": memory}


# ---- against the emulator ---------------------------------------------------------------------

LAYER = "\n".join([
    copy("HOST", 0x10, "SRAM", 0x103, 4),          # a token id: PCIe latency dominates
    copy("HBM", 0xF3, "SRAM", 0x200, 700),         # unaligned, channels 0, 1, 0
    copy("SRAM", 0x200, "CDRAM", 0x40, 300),       # P2P
    copy("CDRAM", 0x41, "SRAM", 0x800, 200),
    copy("SRAM", 0x205, "GBUF", 0x10, 64),         # PIM bus, 4 B per cycle
    copy("SRAM", 0x300, "GBUF", 0x60, 4),          # one cycle, written in its end cycle
    copy("GBUF", 0x5E, "SRAM", 0xA00, 8),          # reads those bytes: waits a cycle
    copy("PRES", 0x8, "HOST", 0x400, 40),
    copy("HBM", 0x0, "HBM", 0x80, 256),            # overlapping, channel 0 on both sides
    copy("HBM", 0x190, "HBM", 0x100, 300),         # overlapping, downwards
    copy("SRAM", 0x904, "PRES", 0x4, 57),
    copy("HOST", 0x20, "CDRAM", 0x300, 96),        # PCIe carries it alone
])


def test_copies_land_the_emulator_bytes_in_the_emulator_cycles():
    init = images()
    rtl, emu = simulate(LAYER, init), emulate(LAYER, init)
    assert not rtl["error"] and rtl["halted"] and set(rtl["memory"]) == set(SPACES)
    assert rtl["issues"] == emu["issues"]
    assert rtl["cycles"] == emu["cycles"]
    for space, data in emu["memory"].items():
        assert rtl["memory"][space] == data, space.name


def test_a_pim_bus_in_the_hbm_stacks_carries_both_sides_of_a_copy_in_turn():
    program = "\n".join([copy("HBM", 0x0, "GBUF", 0x0, 64),       # hbm0 and pim0: one bus
                          copy("HBM", 0x100, "GBUF", 0x20, 64),     # hbm1, pim0: two buses
                          copy("GBUF", 0x100, "HBM", 0x110, 48),    # pim1 and hbm1: one bus
                          copy("PRES", 0x0, "SRAM", 0x0, 32)])
    init = images(cfg=SHARED)
    rtl, emu = simulate(program, init, cfg=SHARED), emulate(program, init, cfg=SHARED)
    assert not rtl["error"] and rtl["issues"] == emu["issues"] and rtl["cycles"] == emu["cycles"]
    for space, data in emu["memory"].items():
        assert rtl["memory"][space] == data, space.name


def test_a_channel_held_by_an_earlier_client_delays_the_copy_until_it_is_free():
    bench = Bench(copy("HBM", 0x0, "SRAM", 0x0, 512), images(), clients=("dma", "vpu"),
                  rams=False)
    res, got = bench.res, {}

    async def testbench(ctx):
        vpu = res.vpu.request
        ctx.set(vpu.payload.mask, 1 << res.index("hbm1"))
        ctx.set(vpu.payload.cycles, 40)
        ctx.set(vpu.valid, 1)
        await ctx.tick()
        ctx.set(vpu.valid, 0)
        for _ in range(200):
            if ctx.get(bench.frontend.halted):
                break
            await ctx.tick()
        got["cycles"] = ctx.get(bench.frontend.cycles)

    sim = Simulator(bench)
    sim.add_clock(1e-8)
    sim.add_testbench(testbench)
    sim.run()
    # the hold on hbm1 ends at cycle 40; the copy issues at 1 (cycle 0 of its stream) and
    # streams 16 cycles from max(1 + 8, 40): it ends at 56, 55 cycles into its stream
    assert got["cycles"] == 40 + 16 - 1


# ---- words it refuses -------------------------------------------------------------------------

@pytest.mark.parametrize("program", [
    copy("SRAM", 0x0, "FLASH", 0x0, 16),
    copy("PIMDRAM", 0x0, "SRAM", 0x0, 16),
    copy("HOST", 0x0, "HOST", 0x100, 16),
    copy("HBM", 0x0, "SRAM", 0x0, 0),
    copy("SRAM", 0x0, "SRAM", 0x100, 16),
    copy("SRAM", 0x0, "GBUF", 0xF0, 32),           # beyond the 256-byte GBUF
    copy("HOST", 0x0, "SRAM", 0x0, 10000),         # 157 chunks in 100 + 32 cycles
])
def test_words_it_cannot_run_raise_error(program):
    rtl = simulate(copy("HOST", 0x0, "SRAM", 0x0, 4) + "\n" + program, images(), rams=False,
                   max_cycles=300)
    assert rtl["error"] and len(rtl["issues"]) == 2


@pytest.mark.parametrize("overrides, problem", [
    ({"fpga": {"hbm_channels": 3}}, r"^fpga\.hbm_channels = 3 is not a power of two"),
    ({"fpga": {"hbm_interleave_bytes": 384, "hbm_channel_bytes": 384 << 10}},
     r"^fpga\.hbm_interleave_bytes = 384 is not a power of two"),
])
def test_configs_it_cannot_build_are_refused(overrides, problem):
    cfg = load_config_dict({"inherits": "trimem-small", "name": "odd", **overrides})
    rejects(problem, lambda: DmaEngine(cfg))


@pytest.mark.parametrize("width", [0, 48, True])
def test_widths_that_are_not_powers_of_two_are_refused(width):
    rejects(r"^width must be a power-of-two number of bytes", lambda: DmaEngine(CFG, width=width))


# ---- parts ------------------------------------------------------------------------------------

@pytest.mark.unit
@pytest.mark.parametrize("gbps", [CFG.links.pcie_gbps, CFG.links.p2p_gbps, 1.6, 0.4, 0.3])
def test_reciprocal_is_the_exact_ceiling_at_edges_and_random_counts(gbps):
    rate = cycles_per_byte(gbps, CFG.fpga.clock_mhz)
    ceil = Reciprocal(rate, 32)
    rng = np.random.default_rng(1)
    counts = [0, 1, 2, rate.denominator - 1, rate.denominator, rate.denominator + 1,
              (1 << 32) - 1] + rng.integers(0, 1 << 32, 2000).tolist()
    assert [ceil(x) for x in counts] == [stream_cycles(x, rate) for x in counts]


@pytest.mark.unit
def test_the_engine_converts_to_verilog_for_trimem_small():
    text = verilog.convert(DmaEngine(CFG), name="dma")
    assert "module dma" in text and "rd_cdram__addr" in text
