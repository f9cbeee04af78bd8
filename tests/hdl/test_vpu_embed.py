"""VPU.EMBED on the VPU RTL: token rows gathered from HBM and dequantized bit for bit as the
emulator does, each instruction issued in the cycle the emulator starts it."""
import gc
import warnings
from dataclasses import replace

import numpy as np
import pytest
from amaranth.hdl import Elaboratable, Module, Signal, UnusedElaboratable
from amaranth.lib import wiring
from amaranth.sim import Simulator

from trimem import isa, layout, numerics
from trimem.config import load_config, load_config_dict
from trimem.emulator.machine import EmulatorError, Machine
from trimem.hdl.frontend import FX_BYTES, Frontend
from trimem.hdl.reserve import Reservations, resource_names
from trimem.hdl.system import ByteRam
from trimem.hdl.vpu_top import VpuEngine
from tests.hdl.rejects import rejects

SMALL = load_config("trimem-small")
SLOW_HBM = load_config_dict({"inherits": "trimem-small", "name": "slow-hbm",
                             "fpga": {"hbm_gbps_per_channel": 0.3}})
"""1/3 cycle per byte: rows stream slower than the lanes dequantize them."""
IDS, OUT, SUM, TABLE = 0x40, 0x100, 0x800, 0x80
SRAM_BYTES, HBM_BYTES, VOCAB = 4096, 4096, 40


class Bench(Elaboratable):
    """VPU front end and `VpuEngine(hbm=True)` with a `Reservations` (clients "dma", which the
    testbench drives, and "vpu"), an SRAM and an HBM `ByteRam`."""

    def __init__(self, cfg, program, sram: bytes, hbm: bytes):
        self.fe = Frontend(isa.Engine.VPU, program)
        self.engine = VpuEngine(cfg.fpga, hbm=True, resources=resource_names(cfg))
        self.res = Reservations(resource_names(cfg), ("dma", "vpu"))
        reads = tuple(self.engine.reads.values()) + (FX_BYTES,)
        self.sram = ByteRam(SRAM_BYTES, reads=reads, writes=(self.engine.write_bytes,),
                            init=sram, addr_bits=self.engine.addr_bits)
        self.hbm = ByteRam(HBM_BYTES, reads=tuple(self.engine.hbm_reads.values()), init=hbm,
                           addr_bits=isa.ADDR_BITS[isa.Space.HBM])
        self.run = Signal()

    def elaborate(self, platform):
        m = Module()
        fe, engine = self.fe, self.engine
        for name in ("fe", "engine", "res", "sram", "hbm"):
            m.submodules[name] = getattr(self, name)
        wiring.connect(m, fe.o_instr, engine.i_instr)
        m.d.comb += [fe.run.eq(self.run & ~engine.error), engine.now.eq(self.res.now),
                     fe.o_push.ready.eq(1), fe.o_pop.ready.eq(1)]
        wiring.connect(m, engine.res, self.res.vpu)
        for i, name in enumerate(engine.reads):
            wiring.connect(m, getattr(engine, f"rd_{name}"), getattr(self.sram, f"read{i}"))
        for i, name in enumerate(engine.hbm_reads):
            wiring.connect(m, getattr(engine, f"rd_{name}"), getattr(self.hbm, f"read{i}"))
        wiring.connect(m, engine.wr, self.sram.write0)
        return m


def simulate(cfg, words, sram, hbm, reads, *, dma=None, max_cycles=200):
    """Run the bench until the stream halts. `dma` is a hold (request_layout fields, `issued`
    and `earliest` relative to the first issue) asked for from the first issue on, or a
    pending dict {"cycles": c} raised that long. Returns issues (the front end's cycle at
    each issue, and at HALT), error and the SRAM bytes of each (addr, nbytes) in `reads`."""
    bench = Bench(cfg, words, sram.tobytes(), hbm.tobytes())
    fe, port = bench.fe, bench.res.dma
    out = {"issues": [], "data": []}

    async def testbench(ctx):
        ctx.set(bench.run, 1)
        first = None
        for _ in range(max_cycles):
            if ctx.get(fe.o_instr.valid) and ctx.get(fe.o_instr.ready):
                out["issues"].append(ctx.get(fe.cycles))
                first = ctx.get(bench.res.now) if first is None else first
            if dma is not None and first is not None:
                hold = {k: v + first if k in ("issued", "earliest") else v
                        for k, v in dma.items()}
                if "mask" in dma and not out.get("granted"):
                    ctx.set(port.request.valid, 1)
                    ctx.set(port.request.payload, hold)
                    out["granted"] = ctx.get(port.request.ready)
                else:
                    ctx.set(port.request.valid, 0)
                    live = "mask" not in dma and ctx.get(bench.res.now) < first + dma["cycles"]
                    ctx.set(port.pending, live)
                    ctx.set(port.pending_issued, first)
                    ctx.set(port.pending_mask, 1)
            if ctx.get(fe.halted) or ctx.get(bench.engine.error):
                break
            await ctx.tick()
        out["issues"].append(ctx.get(fe.cycles))
        out["error"] = ctx.get(bench.engine.error) | ctx.get(fe.error)
        host = getattr(bench.sram, f"read{len(bench.engine.reads)}")
        for addr, nbytes in reads:
            chunks = []
            for at in range(addr, addr + nbytes, FX_BYTES):
                ctx.set(host.addr, at)
                await ctx.tick()
                chunks.append(ctx.get(host.data).to_bytes(FX_BYTES, "little"))
            out["data"].append(b"".join(chunks)[:nbytes])

    sim = Simulator(bench)
    sim.add_clock(1e-8)
    sim.add_testbench(testbench)
    sim.run()
    return out


def table(rng, n):
    """A random embedding table of VOCAB rows: n int8 values and the row's scale code each."""
    q, mant, exp = numerics.quantize_embedding(rng.normal(size=(VOCAB, n)))
    codes = layout.pack_scale_codes(mant, exp).reshape(VOCAB, layout.SCALE_CODE_BYTES)
    return np.concatenate([q.view(np.uint8), codes], axis=1).reshape(-1)


def memories(ids, rows):
    """SRAM with the ids at IDS, HBM with the table rows at TABLE."""
    sram, hbm = np.zeros(SRAM_BYTES, np.uint8), np.zeros(HBM_BYTES, np.uint8)
    sram[IDS:IDS + 4 * len(ids)] = np.asarray(ids, "<i4").view(np.uint8)
    hbm[TABLE:TABLE + rows.size] = rows
    return sram, hbm


def program(m, n):
    """EMBED m rows, then ADD them to themselves, so the EMBED's end is the ADD's issue."""
    return (f"VPU.EMBED m={m} n={n} ids_addr={IDS:#x} table_addr={TABLE:#x} o_addr={OUT:#x}\n"
            f"VPU.ADD m={m} n={n} a_addr={OUT:#x} b_addr={OUT:#x} o_addr={SUM:#x}\nHALT")


def emulate(cfg, programs, sram, hbm):
    """The emulator's VPU starts (HALT's too) and its SRAM after running `programs`."""
    machine = Machine(cfg)
    machine.memory(isa.Space.SRAM).write(0, sram)
    machine.memory(isa.Space.HBM).write(0, hbm)
    machine.run({engine: isa.assemble(text, engine) for engine, text in programs.items()})
    return machine.streams[isa.Engine.VPU].starts, machine.memory(isa.Space.SRAM)


CASES = {"one row": (SMALL, [3], 64),
         "two rows, one across the channel boundary": (SMALL, [3, 0], 61),
         "three rows on both channels": (SMALL, [7, 0, 11], 64),
         "rows streaming slower than the lanes": (SLOW_HBM, [7, 2, 5], 13)}


@pytest.mark.sim
@pytest.mark.parametrize("cfg, ids, n", CASES.values(), ids=CASES)
def test_embed_matches_the_emulator_bit_for_bit_and_cycle_for_cycle(cfg, ids, n):
    rng = np.random.default_rng(len(ids) * n)
    sram, hbm = memories(ids, table(rng, n))
    text = program(len(ids), n)
    starts, want = emulate(cfg, {"VPU": text}, sram, hbm)
    size = 4 * len(ids) * n
    out = simulate(cfg, isa.assemble(text, "VPU"), sram, hbm, [(OUT, size), (SUM, size)])
    assert (out["error"], out["issues"]) == (0, starts)
    assert out["data"] == [want.read(OUT, size).tobytes(), want.read(SUM, size).tobytes()]


@pytest.mark.sim
def test_embed_dequantizes_every_scale_code_as_dequantize_act_does():
    # exp above RECIP_SHIFT shifts left and saturates; 46 is the last exp dequantize_act's
    # int64 holds at mant 65535 and q -128
    mant = np.array([1, 65535, 32767, 0, 12345, 2, 65535, 7])
    exp = np.array([0, 1, 17, 31, 32, 33, 39, 46])
    q = np.random.default_rng(3).integers(-128, 128, size=(8, 8)).astype(np.int8)
    q[:, :3] = [-128, 127, 0]
    codes = layout.pack_scale_codes(mant, exp).reshape(8, layout.SCALE_CODE_BYTES)
    sram, hbm = memories(range(8), np.concatenate([q.view(np.uint8), codes], axis=1).ravel())
    text = program(8, 8)
    starts, _ = emulate(SMALL, {"VPU": text}, sram, hbm)
    out = simulate(SMALL, isa.assemble(text, "VPU"), sram, hbm, [(OUT, 4 * 64)])
    assert (out["error"], out["issues"]) == (0, starts)
    got = np.frombuffer(out["data"][0], "<i4").reshape(8, 8)
    np.testing.assert_array_equal(got, numerics.dequantize_act(q, mant, exp))


@pytest.mark.sim
@pytest.mark.parametrize("table_addr, end", [(0x0, 36), (0x100, 20)], ids=["same", "other"])
def test_embed_waits_for_an_earlier_hold_on_its_channel_only(table_addr, end):
    # a copy issued with the EMBED holds channel 0 over cycles 8..24 (tests/emulator/test_fpga)
    copy = (f"DMA.COPY src_space=HBM src_addr=0x0 dst_space=SRAM dst_addr=0x8000 nbytes=256\n"
            f"HALT")
    text = (f"VPU.EMBED m=1 n=60 ids_addr={IDS:#x} table_addr={table_addr:#x} "
            f"o_addr={OUT:#x}\nHALT")
    sram, hbm = memories([0], np.zeros(0, np.uint8))
    starts, _ = emulate(SMALL, {"DMA": copy, "VPU": text}, sram, hbm)
    out = simulate(SMALL, isa.assemble(text, "VPU"), sram, hbm, [],
                   dma={"mask": 1, "issued": 0, "earliest": 8, "cycles": 16})
    assert (out["error"], out["issues"]) == (0, starts) and starts == [0, end]


@pytest.mark.sim
def test_embed_granted_after_its_end_stops_the_stream_with_error():
    sram, hbm = memories([1], table(np.random.default_rng(0), 8))
    out = simulate(SMALL, isa.assemble(program(1, 8), "VPU"), sram, hbm, [],
                   dma={"cycles": 40})
    assert out["error"] == 1 and out["issues"][:1] == [0]


BAD = {"negative id": ([-1], TABLE, OUT, None),
       "row past HBM": ([200000], TABLE, OUT, "HBM access"),
       "outputs past SRAM": ([1], TABLE, 0xFFF0, "SRAM access"),
       "reserved byte of a scale code": ([1], TABLE + 3, OUT, "scale codes")}


@pytest.mark.sim
@pytest.mark.parametrize("ids, table_addr, o_addr, problem", BAD.values(), ids=BAD)
def test_an_embed_the_emulator_rejects_stops_the_stream_with_error(ids, table_addr, o_addr,
                                                                  problem):
    rows = table(np.random.default_rng(1), 8)
    sram, hbm = memories(ids, rows)
    text = (f"VPU.EMBED m=1 n=8 ids_addr={IDS:#x} table_addr={table_addr:#x} "
            f"o_addr={o_addr:#x}\nHALT")
    with pytest.raises(EmulatorError, match=problem or "token id -1 is negative"):
        emulate(SMALL, {"VPU": text}, sram, hbm)
    out = simulate(SMALL, isa.assemble(text, "VPU"), sram, hbm, [], max_cycles=60)
    assert out["error"] == 1


@pytest.mark.unit
def test_hbm_configs_the_rtl_cannot_build_are_rejected():
    names = resource_names(SMALL)
    rejects(r"^hbm_channels = 3 and hbm_interleave_bytes = 256 must be powers of two",
            lambda: VpuEngine(replace(SMALL.fpga, hbm_channels=3), hbm=True, resources=names))
    rejects(r"^hbm_channels = 2 and hbm_interleave_bytes = 384 must be powers of two",
            lambda: VpuEngine(replace(SMALL.fpga, hbm_interleave_bytes=384,
                                      hbm_channel_bytes=384 * 1024), hbm=True, resources=names))
    rejects(r"^resources \('hbm0', 'pcie'\) lack hbm1; pass ",
            lambda: VpuEngine(SMALL.fpga, hbm=True, resources=("hbm0", "pcie")))


@pytest.mark.unit
def test_the_engine_without_hbm_keeps_its_ports():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnusedElaboratable)
        engine = VpuEngine(SMALL.fpga)
        members = set(engine.signature.members)
        del engine
        gc.collect()
    assert members == {"i_instr", "rd_a", "rd_b", "rd_cos", "rd_sin", "rd_pos", "wr", "error"}
