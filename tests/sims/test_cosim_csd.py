"""Co-simulation of the CSD top on Verilator: one decode step on the drive (CSD.KVAPP of the
new token, then CSD.ATTN over the whole cache), with and without top-k, against the emulator,
bit for bit and cycle for cycle (docs/timing.md, "CSD")."""
import pytest

from trimem.sims import runner, tb_csd, testbench

pytestmark = [pytest.mark.cosim, pytest.mark.slow]


@pytest.fixture(scope="module")
def steps(small, tmp_path_factory):
    """The report of each decode step by topk (a failed run's report when they differ)."""
    design = runner.design("csd", small, depth=testbench.PROGRAM_DEPTH)
    reports = {}
    for topk in (0, 4):
        case = tb_csd.step_case(small, topk=topk, seed=topk)
        try:
            reports[topk] = runner.run_cocotb(design, tb_csd.__name__, case,
                                              tmp_path_factory.mktemp(f"csd-top{topk}"))
        except runner.SimError as exc:
            reports[topk] = exc.report
    return reports


@pytest.mark.parametrize("topk", [0, 4], ids=["all-tokens", "top-4"])
def test_a_decode_step_on_the_drive_appends_and_attends_bit_exactly(steps, topk):
    report = steps[topk]
    assert report["bit_exact"], report["problem"]
    assert report["instructions"] == 3


@pytest.mark.parametrize("topk", [0, 4], ids=["all-tokens", "top-4"])
def test_a_decode_step_on_the_drive_is_cycle_exact(steps, topk):
    report = steps[topk]
    assert report["cycle_exact"], report["problem"]
    assert report["cycles"] == report["emulator_cycles"]
