"""Co-simulation of whole bundles on the batched harness: bit-exact and cycle-exact with the
emulator, and the first divergence reported with its instruction."""
import re

import numpy as np
import pytest

from trimem import numerics, timing
from trimem.sims import cosim

pytestmark = [pytest.mark.cosim, pytest.mark.slow]


@pytest.mark.parametrize("nm", [0, 1], ids=["dense", "2of4"])
def test_a_linear_layer_is_bit_and_cycle_exact(linear_bundles, nm):
    result = cosim.cosim(linear_bundles[nm])
    assert result.top == "mxu"
    assert result.bit_exact and result.cycle_exact, result.divergence.text()
    assert result.rtl_cycles == result.emulator_cycles > 0
    report = result.report()
    assert {"bit_exact", "rtl_cycles", "emulator_cycles", "wall_s", "cycles_per_s"} <= set(report)
    assert report["cycles_per_s"] > 0


def test_an_emulator_one_cycle_slower_is_caught_at_the_halt(linear_bundles, monkeypatch):
    slower = timing.mxu_gemm_cycles
    monkeypatch.setattr(timing, "mxu_gemm_cycles", lambda fpga, f: slower(fpga, f) + 1)
    result = cosim.cosim(linear_bundles[0])
    assert result.bit_exact and not result.cycle_exact
    assert result.divergence.where == "MXU[1]"
    assert result.divergence.instruction == "MXU[1] `HALT`"
    found = re.match(r"^issues at cycle (\d+) in the RTL, (\d+) in the emulator$",
                     result.divergence.detail)
    assert int(found[2]) == int(found[1]) + 1


def test_a_wrong_emulator_element_is_caught_with_its_index(linear_bundles, monkeypatch):
    exact = numerics.linear

    def off_by_one(*args):
        out = np.array(exact(*args))
        out[1, 2] += 1
        return out

    monkeypatch.setattr(numerics, "linear", off_by_one)
    result = cosim.cosim(linear_bundles[1])
    assert result.cycle_exact and not result.bit_exact
    assert result.divergence.where == "o[1, 2]"


def test_a_pim_gemv_is_bit_and_cycle_exact(pim_bundle):
    result = cosim.cosim(pim_bundle)
    assert result.top == "pim"
    assert result.bit_exact and result.cycle_exact, result.divergence.text()
    assert result.rtl_cycles == result.emulator_cycles > 0


@pytest.fixture(scope="module")
def pim_refresh_bundle(tmp_path_factory):
    """GEMVs back to back past the first refresh interval of trimem-small."""
    from trimem.sims.bundles import pim_bundle

    return pim_bundle(tmp_path_factory.mktemp("pim") / "refresh", m=2, n=4, k=96, repeat=12,
                      seed=4)


def test_pim_gemvs_across_refreshes_are_bit_and_cycle_exact(pim_refresh_bundle, small):
    result = cosim.cosim(pim_refresh_bundle)
    assert result.emulator_cycles > small.pim.tREFI
    assert result.bit_exact and result.cycle_exact, result.divergence.text()
    assert result.rtl_cycles == result.emulator_cycles


@pytest.fixture(scope="module")
def decoder_layer(tiny_model, tmp_path_factory):
    """One decoder layer of the tiny random LLaMA, compiled for trimem-small (decode, ctx 16),
    its linear layers on the MXU (the PIM banks of trimem-small hold too few rows for the MLP)."""
    from trimem.compiler.pipeline import compile_model

    out = tmp_path_factory.mktemp("layer") / "bundle"
    compile_model(tiny_model(), "trimem-small", layers=1, buckets="decode:1@16",
                  placement={"linear": "mxu"}, out=out)
    return out


def test_a_decoder_layer_of_a_tiny_model_is_bit_and_cycle_exact(decoder_layer):
    result = cosim.cosim(decoder_layer)
    assert result.top == "system"
    assert result.bit_exact and result.cycle_exact, result.divergence.text()
    assert result.rtl_cycles == result.emulator_cycles > 0


@pytest.fixture(scope="module")
def block_bundle(tmp_path_factory):
    """A GEMM, the VPU's residual add and quantize after a token, and a GEMV beside them."""
    from trimem.sims.bundles import block_bundle

    return block_bundle(tmp_path_factory.mktemp("block") / "bundle", nm=1, seed=5)


def test_streams_meeting_through_tokens_on_the_system_top_are_bit_and_cycle_exact(block_bundle):
    result = cosim.cosim(block_bundle)
    assert result.top == "system"
    assert result.bit_exact and result.cycle_exact, result.divergence.text()
    assert result.rtl_cycles == result.emulator_cycles > 0
