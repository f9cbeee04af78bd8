"""Emission: programs, images, test vectors and their bundle round trip."""
from collections import Counter

import numpy as np
import pytest

from trimem import isa
from trimem.bundle import read_bundle
from trimem.compiler.pipeline import compile_model

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def bundle(tiny_llama):
    """The tiny LLaMA on the U280 preset, two small weight slots so linears take two tiles."""
    return compile_model(tiny_llama, "flightllm-u280", buckets="prefill:6@64,decode:2@64",
                         weight_slot_bytes=3072)


def decoded(words):
    return [isa.decode(w) for w in words]


def test_every_stream_ends_with_halt_and_every_token_is_popped(bundle):
    for entry in bundle.entries.values():
        pushed, popped = Counter(), Counter()
        for engine, words in entry.programs.items():
            program = decoded(words)
            assert program[-1].name == "HALT"
            assert all(ins.name != "HALT" for ins in program[:-1])
            for ins in program:
                if ins.name == "PUSH":
                    pushed[(engine, ins.fields["dst"].name)] += 1
                elif ins.name == "POP":
                    popped[(ins.fields["src"].name, engine)] += 1
        assert pushed == popped and pushed


def test_weight_tiles_alternate_between_two_sram_slots(bundle):
    mxu = decoded(bundle.entries["decode_m2_c64"].programs["MXU"])
    slots = [ins.fields["w_addr"] for ins in mxu if ins.name == "MXU.GEMM"]
    assert len(set(slots)) == 2
    firsts = [slots[0]] + [b for a, b in zip(slots, slots[1:]) if a != b]
    assert all(a != b for a, b in zip(firsts, firsts[1:]))


def test_the_next_weight_tile_loads_while_the_mxu_works_on_the_last(bundle):
    programs = bundle.entries["decode_m2_c64"].programs
    slots = {i.fields["w_addr"] for i in decoded(programs["MXU"]) if i.name == "MXU.GEMM"}
    dma = decoded(programs["DMA"])
    loads = [i for i, ins in enumerate(dma) if ins.name == "DMA.COPY"
             and ins.fields["src_space"] is isa.Space.HBM and ins.fields["dst_addr"] in slots]

    def waits_for_mxu(i):
        while dma[i - 1].name == "POP":
            i -= 1
            if dma[i].fields["src"] is isa.Engine.MXU:
                return True
        return False

    assert not waits_for_mxu(loads[0]) and not waits_for_mxu(loads[1])
    assert waits_for_mxu(loads[2])


def test_entries_name_their_bucket_and_share_one_image_set(bundle):
    assert set(bundle.entries) == {"prefill_m6_c64", "decode_m2_c64"}
    meta = bundle.entries["decode_m2_c64"].meta
    assert (meta["phase"], meta["rows"], meta["ctx"], meta["seq_slots"]) == ("decode", 2, 64, 2)
    names = [image.name for image in bundle.images]
    assert len(names) == len(set(names)) and "embed" in names and "rope" in names
    assert bundle.model["kv"]["max_ctx"] == 64 and bundle.model["kv_home"] == "HBM"


def test_inputs_and_logits_live_in_host_memory(bundle):
    entry = bundle.entries["prefill_m6_c64"]
    assert [(t.name, t.space, t.shape) for t in entry.inputs] == [("ids", "HOST", (6,)),
                                                                  ("pos", "HOST", (6,))]
    (logits,) = entry.outputs
    assert (logits.space, logits.dtype, logits.shape) == ("HOST", "int32", (6, 256))
    expected = bundle.tests["prefill_m6_c64"]["expected"]["logits"]
    assert expected.shape == (6, 256) and expected.dtype == np.int32


def test_bundle_round_trips_through_read_bundle(bundle, tmp_path):
    from trimem.bundle import write_bundle

    write_bundle(bundle, tmp_path / "b")
    back = read_bundle(tmp_path / "b")
    for name, entry in bundle.entries.items():
        assert back.entries[name].programs == {e.lower(): w for e, w in entry.programs.items()}
        assert back.entries[name].meta == entry.meta
    assert {i.name: i.data.tobytes() for i in back.images} == \
        {i.name: i.data.tobytes() for i in bundle.images}
    np.testing.assert_array_equal(back.tests["decode_m2_c64"]["expected"]["logits"],
                                  bundle.tests["decode_m2_c64"]["expected"]["logits"])
    assert back.report == bundle.report


def test_the_emulator_reproduces_the_reference_logits_bit_for_bit(bundle):
    runner = pytest.importorskip("trimem.emulator.runner")
    for name in bundle.entries:
        result = runner.run_bundle(bundle, name)
        assert result.report["outputs_match"], result.report["outputs"]


def test_all_three_engines_reproduce_the_reference_bit_for_bit(tiny_llama):
    runner = pytest.importorskip("trimem.emulator.runner")
    b = compile_model(tiny_llama, "trimem-all", buckets="prefill:4@64,decode:2@64",
                      placement={"linear": "pim"})
    engines = set(b.entries["decode_m2_c64"].programs)
    assert {"MXU", "PIM", "CSD"} <= engines and b.entries["decode_m2_c64"].meta["interleave"]
    for name in b.entries:
        result = runner.run_bundle(b, name)
        assert result.report["outputs_match"], (name, result.report["outputs"])


def test_instruction_counts_grow_by_the_same_amount_per_layer():
    counts = []
    for layers in (1, 2, 3):
        b = compile_model("llama2-7b", "flightllm-u280", timing_only=True, layers=layers,
                          buckets="decode:1@256")
        counts.append(Counter({e: len(w) for e, w in b.entries["decode_m1_c256"]
                               .programs.items()}))
    step = counts[1] - counts[0]
    assert step == counts[2] - counts[1]
    assert step["MXU"] > 0 and step["VPU"] > 0 and step["DMA"] > 0


def test_timing_only_bundles_have_programs_and_sizes_but_no_images(tmp_path):
    b = compile_model("llama2-7b", "trimem-all", timing_only=True, layers=1,
                      buckets="decode:1@512", out=tmp_path / "b")
    assert b.images == [] and b.model["timing_only"]
    assert b.report["memory_bytes"]["HBM"] > 6 * 2**20
    assert "expected" not in b.tests["decode_m1_c512"]
    assert (b.tests["decode_m1_c512"]["inputs"]["pos"] == 511).all()
    assert read_bundle(tmp_path / "b").entries["decode_m1_c512"].programs["csd"]


def test_batched_decode_interleaves_sub_batches_over_mxu_and_pim(tiny_llama):
    pim = {"linear": "pim", "lm_head": "pim"}
    b = compile_model(tiny_llama, "neupims", quant="w8a8kv8", buckets="decode:4@64",
                      with_tests=False, placement=pim)
    entry = b.entries["decode_m4_c64"]
    assert entry.meta["interleave"] and entry.meta["sub_batches"] == [[0, 2], [2, 4]]
    gemm = [i for i in decoded(entry.programs["MXU"]) if i.name == "MXU.GEMM"]
    gemv = [i for i in decoded(entry.programs["PIM"]) if i.name == "PIM.GEMV"]
    assert {i.fields["m"] for i in gemm} == {i.fields["m"] for i in gemv} == {2}
    off = compile_model(tiny_llama, "neupims", quant="w8a8kv8", buckets="decode:4@64",
                        with_tests=False, interleave=False, placement=pim)
    assert "MXU" not in off.entries["decode_m4_c64"].programs


@pytest.mark.parametrize("n0, n1, units", [(0, 12, 4), (2, 13, 4)])
def test_pim_shares_are_the_packed_tiles_of_each_units_rows(n0, n1, units):
    from trimem import layout, numerics
    from trimem.compiler.emit import _Packed

    w = np.random.default_rng(0).normal(size=(16, 32))
    w = np.where(numerics.nm_prune_mask(w, 2, 4), w, 0.0)
    qw = numerics.quantize_weight(w, 4, 16)
    shares = _Packed(qw, (2, 4)).shares(n0, n1, units)
    for u, share in enumerate(shares):
        rows = np.arange(n0 + u, n1, units)
        part = numerics.QuantWeight(qw.q[rows], qw.g[rows], qw.mult[rows], qw.shift[rows], 4, 16)
        np.testing.assert_array_equal(share, layout.pack_weight_tile(part, (2, 4)))
