"""Co-simulation of whole bundles on the batched harness: bit-exact and cycle-exact with the
emulator, and the first divergence reported with its instruction."""
import re

import numpy as np
import pytest

from trimem import numerics, timing
from trimem.sims import cosim, runner

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


def test_pim_gemvs_across_refreshes_stay_bit_exact(pim_refresh_bundle, small):
    result = cosim.cosim(pim_refresh_bundle)
    assert result.emulator_cycles > small.pim.tREFI
    assert result.bit_exact, result.divergence.text()


@pytest.mark.xfail(strict=True, reason="the PIM channels count refresh intervals from reset, "
                                       "the emulator from the stream's cycle 0")
def test_pim_gemvs_across_refreshes_are_cycle_exact(pim_refresh_bundle):
    assert cosim.cosim(pim_refresh_bundle).cycle_exact


@pytest.fixture(scope="module")
def attention_bundles(tmp_path_factory):
    """Decode attention at position 23 over KV4: all tokens kept, and the top 4 of them."""
    from trimem.sims.bundles import attention_bundle

    root = tmp_path_factory.mktemp("attn")
    return {topk: attention_bundle(root / f"top{topk}", topk=topk, splits=2, seed=topk)
            for topk in (0, 4)}


@pytest.mark.parametrize("topk", [0, 4], ids=["all-tokens", "top-4"])
def test_a_decode_attention_step_is_bit_exact(attention_bundles, topk):
    result = cosim.cosim(attention_bundles[topk])
    assert result.top == "system"
    assert result.bit_exact, result.divergence.text()


@pytest.mark.xfail(strict=True, reason="the attention engine counts the cycles of its "
                                       "sequential datapath, not docs/timing.md's closed form")
def test_a_decode_attention_step_is_cycle_exact(attention_bundles):
    assert cosim.cosim(attention_bundles[4]).cycle_exact


@pytest.fixture(scope="module")
def decoder_layer(tiny_model, tmp_path_factory):
    """One decoder layer of the tiny random LLaMA, compiled for trimem-small (decode, ctx 16)."""
    from trimem.compiler.pipeline import compile_model

    out = tmp_path_factory.mktemp("layer") / "bundle"
    compile_model(tiny_model(), "trimem-small", layers=1, buckets="decode:1@16", out=out)
    return out


@pytest.mark.xfail(strict=True, raises=runner.SimError,
                   reason="the RTL has no DMA engine and no HBM or HOST model, and its VPU lacks "
                          "EMBED, RMSNORM, KVAPP and ATTN; a compiled layer needs them all")
def test_a_decoder_layer_of_a_tiny_model_is_bit_and_cycle_exact(decoder_layer):
    result = cosim.cosim(decoder_layer)
    assert result.bit_exact and result.cycle_exact
