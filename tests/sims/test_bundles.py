"""The co-simulation bundles: each runs on the emulator to its own expected outputs, and one
that overflows the SRAM is refused."""
import pytest

from trimem.emulator.runner import run_bundle
from trimem.sims import bundles

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("make", [
    lambda out: bundles.linear_bundle(out, nm=1, m=2, n=6, k=32),
    lambda out: bundles.pim_bundle(out, m=2, n=4, k=96, repeat=2),
    lambda out: bundles.block_bundle(out, m=1, n=8, k=32),
    lambda out: bundles.attention_bundle(out, ctx=12, topk=3, splits=2),
], ids=["linear", "pim", "block", "attention"])
def test_bundles_match_their_expected_outputs_on_the_emulator(make, tmp_path):
    result = run_bundle(make(tmp_path / "b"))
    assert result.report["outputs_match"] is True


def test_a_linear_layer_that_overflows_the_sram_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"^a \[64, 512, 1024\] GEMM needs \d+ bytes of SRAM but "
                                         r"'trimem-small' has 65536; use a smaller shape$"):
        bundles.linear_bundle(tmp_path / "b", m=64, n=512, k=1024)

