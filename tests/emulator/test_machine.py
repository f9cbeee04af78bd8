"""The machine: exact clocks, lazy memories, shared resources, and the event-driven scheduler."""
import numpy as np
import pytest

from trimem import isa
from trimem.config import load_config
from trimem.emulator import stats
from trimem.emulator.engine import Clock, EmulatorError, EngineModel, Memory, Resource
from trimem.emulator.machine import Machine

pytestmark = pytest.mark.unit

SMALL = load_config("trimem-small")
PS = 10_000
"""trimem-small clocks the FPGA at 100 MHz: 10 ns per cycle."""
GEMM = ("MXU.GEMM m=3 n=5 k=32 a_addr=0x0 s_addr=0x100 w_addr=0x200 o_addr=0x1000 bits=8 nm=0 "
        "group_log2=4")
"""47 cycles on trimem-small: MXU_FILL 8 + 3, then 3 rows x ceil(5 / 2) x ceil(32 / 8)."""
ADD = "VPU.ADD m=2 n=20 a_addr=0x2000 b_addr=0x3000 o_addr=0x4000"
"""10 cycles on trimem-small: VPU_FILL 4, then 2 rows x ceil(20 / 8) x 1 pass."""


def run(config=SMALL, machine=None, **programs):
    machine = machine or Machine(config, timing_only=True)
    machine.run({engine: isa.assemble(text, engine) for engine, text in programs.items()})
    return machine


def spans(machine, engine):
    stream = machine.streams[isa.Engine[engine]]
    return list(zip(stream.starts, stream.ends))


class SlowPim(EngineModel):
    """A CTRL-only PIM stream on a 70 MHz clock, whose edges fall between picoseconds."""
    engine = isa.Engine.PIM

    def __init__(self, machine):
        super().__init__(machine, 70)


# ---- clocks, memories, resources --------------------------------------------------------------

def test_clock_edges_are_exact_integer_picoseconds_for_a_225_mhz_clock():
    clock = Clock(225)
    assert [clock.edge(c) for c in (0, 1, 2, 9)] == [0, 4445, 8889, 40000]
    assert [clock.cycle_at(t) for t in (0, 1, 4445, 4446, 40000)] == [0, 1, 1, 2, 9]


def test_clock_rejects_a_frequency_that_is_not_positive():
    with pytest.raises(EmulatorError, match=r"^clock of 0 MHz is not a positive number of kHz$"):
        Clock(0)


def test_memory_allocates_nothing_until_written_and_reads_zeros():
    hbm = Memory("HBM", 8 << 30)
    assert not hbm.chunks and not hbm.read(5 << 30, 16).any()
    hbm.write(5 << 30, b"\x01\x02")
    assert len(hbm.chunks) == 1 and hbm.written(5 << 30, 1) and not hbm.written(0, 1 << 20)


def test_memory_arrays_round_trip_across_a_chunk_boundary():
    mem = Memory("SRAM", 4 << 20)
    values = np.arange(-5, 5, dtype=np.int32)
    mem.write_array((1 << 20) - 6, values)
    assert np.array_equal(mem.read_array((1 << 20) - 6, "<i4", (10,)), values)
    assert len(mem.chunks) == 2


def test_out_of_bounds_access_names_space_address_size_and_capacity():
    with pytest.raises(EmulatorError, match=r"^SRAM access of 8 bytes at 0xfffc is out of "
                                            r"bounds: SRAM holds 65536 bytes$"):
        Memory("SRAM", 65536).read(0xFFFC, 8)


def test_resource_serves_reservations_first_come_first_served():
    link = Resource("pcie")
    assert [link.reserve(0, 100, 8), link.reserve(50, 10, 8), link.reserve(500, 5)] == \
        [0, 100, 500]
    assert (link.free_ps, link.busy_ps, link.bytes) == (505, 115, 16)


def test_resource_cannot_be_held_before_it_is_free():
    link = Resource("p2p")
    link.hold(0, 100)
    with pytest.raises(EmulatorError, match=r"^p2p is held until 100 ps; a hold cannot start "
                                            r"at 99 ps$"):
        link.hold(99, 1)


def test_pim_channels_shared_with_hbm_are_the_hbm_channel_resources():
    shared = Machine(load_config("neupims"))
    assert shared.resource("pim0") is shared.resource("hbm0")
    assert Machine(SMALL).resource("pim0") is not Machine(SMALL).resource("hbm0")


def test_unknown_resource_name_lists_the_known_ones():
    with pytest.raises(EmulatorError, match=r"^this machine has no resource 'hbm9'; it has "
                                            r"pcie, p2p, hbm0, hbm1, pim0, flash0, flash1$"):
        Machine(SMALL).resource("hbm9")


# ---- scheduling -------------------------------------------------------------------------------

def test_ctrl_instructions_take_their_declared_cycles():
    machine = run(MXU="NOP\nNOP\nHALT")
    assert spans(machine, "MXU") == [(0, 1), (1, 2), (2, 2)]
    assert machine.end_ps == 2 * PS


def test_independent_engines_run_concurrently():
    machine = run(MXU=f"{GEMM}\nHALT", VPU=f"{ADD}\nHALT")
    assert spans(machine, "MXU")[0] == (0, 47) and spans(machine, "VPU")[0] == (0, 10)
    assert machine.end_ps == 47 * PS


def test_push_and_pop_serialize_the_consumer_after_the_producer():
    machine = run(MXU=f"{GEMM}\nPUSH dst=VPU\nHALT", VPU=f"POP src=MXU\n{ADD}\nHALT")
    assert spans(machine, "MXU") == [(0, 47), (47, 48), (48, 48)]
    assert spans(machine, "VPU") == [(48, 49), (49, 59), (59, 59)]
    assert machine.engines[isa.Engine.VPU].stats.stall_dep == 48


def test_pop_of_a_token_that_already_arrived_does_not_wait():
    machine = run(MXU="PUSH dst=VPU\nHALT", VPU=f"{ADD}\nPOP src=MXU\nHALT")
    assert spans(machine, "VPU")[1] == (10, 11)
    assert machine.engines[isa.Engine.VPU].stats.stall_dep == 0


def test_tokens_of_one_pair_are_taken_in_push_order():
    machine = run(MXU=f"PUSH dst=VPU\n{GEMM}\nPUSH dst=VPU\nHALT",
                  VPU="POP src=MXU\nPOP src=MXU\nHALT")
    assert spans(machine, "VPU")[:2] == [(1, 2), (49, 50)]


def test_tokens_cross_clock_domains_at_exact_picoseconds():
    machine = Machine(SMALL, timing_only=True)
    machine.engines[isa.Engine.PIM] = SlowPim(machine)
    run(machine=machine, VPU=f"{ADD}\nPUSH dst=PIM\nHALT", PIM="POP src=VPU\nHALT")
    # the token lands at 110000 ps; the 70 MHz edges are ceil(c * 10**6 / 70) ps: edge 8 is
    # 114286 ps, so the POP runs from cycle 8 to 9, which ends at 128572 ps
    assert spans(machine, "PIM")[0] == (8, 9)
    assert machine.end_ps == 128572


def test_deadlock_is_reported_with_every_blocked_instruction():
    with pytest.raises(EmulatorError, match=r"(?s)^deadlock: every running engine waits on a "
                                            r"POP.*\n  MXU\[1\] `POP src=VPU`\n  VPU\[0\] `POP "
                                            r"src=MXU`\nadd the matching PUSH"):
        run(MXU="NOP\nPOP src=VPU\nHALT", VPU="POP src=MXU\nPUSH dst=MXU\nHALT")


def test_pop_whose_producer_halted_is_a_deadlock():
    with pytest.raises(EmulatorError, match=r"(?s)^deadlock: .*\n  VPU\[1\] `POP src=MXU`\n"):
        run(MXU="PUSH dst=VPU\nHALT", VPU="POP src=MXU\nPOP src=MXU\nHALT")


def test_push_to_an_engine_without_a_stream_is_rejected():
    with pytest.raises(EmulatorError, match=r"^MXU\[0\] `PUSH dst=PIM`: no PIM stream runs"):
        run(MXU="PUSH dst=PIM\nHALT")


def test_stream_without_halt_at_its_end_is_rejected():
    with pytest.raises(EmulatorError, match=r"^MXU program does not end with HALT; end every "
                                            r"stream with HALT$"):
        run(MXU="NOP")


def test_engine_missing_from_the_config_is_rejected():
    with pytest.raises(EmulatorError, match=r"^engine PIM needs a 'pim' section, but hardware "
                                            r"config 'flightllm-u280' has none"):
        run(load_config("flightllm-u280"), PIM="HALT")


def test_memory_space_missing_from_the_config_is_rejected_with_the_instruction():
    copy = "DMA.COPY src_space=SRAM src_addr=0x0 dst_space=GBUF dst_addr=0x0 nbytes=4"
    with pytest.raises(EmulatorError, match=r"^DMA\[0\] `DMA.COPY src_space=SRAM .*`: memory "
                                            r"space GBUF needs a 'pim' section"):
        run(load_config("flightllm-u280"), DMA=f"{copy}\nHALT")


# ---- stats ------------------------------------------------------------------------------------

def test_report_splits_every_engine_cycle_into_busy_stalls_and_idle():
    report = stats.report(run(MXU=f"{GEMM}\nPUSH dst=VPU\nHALT", VPU=f"POP src=MXU\n{ADD}\nHALT"))
    assert report["cycles"] == 59 and report["seconds"] == pytest.approx(59e-8)
    mxu, vpu = report["per_engine"]["MXU"], report["per_engine"]["VPU"]
    assert (mxu["busy"], mxu["stall_dep"], mxu["idle"], mxu["macs"]) == (48, 0, 11, 3 * 5 * 32)
    assert (vpu["busy"], vpu["stall_dep"], vpu["idle"]) == (11, 48, 0)
    for e in (mxu, vpu):
        assert e["busy"] + e["stall_mem"] + e["stall_dep"] + e["idle"] == e["cycles"] == 59
    assert report["energy_j"] > 0
