"""`trimem compile`: arguments, the bundle it writes, the report it prints, refusals."""
import argparse

import numpy as np
import pytest

from trimem.bundle import BundleError, read_bundle
from trimem.compiler.cli import add_compile_parser
from trimem.compiler.ir import CompileError

pytestmark = pytest.mark.unit


def trimem(*argv) -> int:
    parser = argparse.ArgumentParser(prog="trimem")
    add_compile_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["compile", *map(str, argv)])
    return args.func(args)


@pytest.fixture(scope="module")
def saved_model(tiny_llama, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tiny_llama.save_pretrained(folder)
    return folder


def test_compile_writes_a_bundle_of_a_saved_tiny_model(saved_model, tmp_path, capsys):
    out = tmp_path / "bundle"
    assert trimem(saved_model, "--hw", "trimem-all", "--quant", "w8a8kv8", "--sparsity", "2:4",
                  "--buckets", "prefill:4@64,decode:1@64", "-o", out) == 0
    bundle = read_bundle(out)
    assert set(bundle.entries) == {"prefill_m4_c64", "decode_m1_c64"}
    assert bundle.quant["sparsity"] == "2:4" and bundle.quant["w_bits"] == 8
    assert bundle.tests["decode_m1_c64"]["expected"]["logits"].shape == (1, 256)
    text = capsys.readouterr().out
    assert "entry decode_m1_c64:" in text and "layers.0.mlp.up" in text
    assert f"wrote {out}: 2 entries" in text


def test_compile_of_llama2_7b_timing_only_needs_no_weights(tmp_path, capsys):
    out = tmp_path / "b"
    assert trimem("llama2-7b", "--hw", "flightllm-u280", "--timing-only", "--layers", "2",
                  "-o", out) == 0
    bundle = read_bundle(out)
    assert bundle.images == [] and bundle.model["layers"] == 2
    assert set(bundle.entries) == {"prefill_m64_c1024", "decode_m1_c1024", "decode_m1_c4096"}
    assert "(timing only: no images)" in capsys.readouterr().out


def test_compile_refuses_a_non_empty_directory_that_is_not_a_bundle(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    args = ("llama2-7b", "--hw", "flightllm-u280", "--timing-only", "--layers", "1",
            "--buckets", "decode:1@128", "-o", tmp_path)
    with pytest.raises(BundleError, match=r"is not empty and holds no bundle; choose an empty "
                                          r"or new directory, or pass --force"):
        trimem(*args)
    assert trimem(*args, "--force") == 0
    assert (tmp_path / "keep.txt").read_text() == "mine" and read_bundle(tmp_path).entries


def test_compile_overwrites_an_existing_bundle(tmp_path):
    args = ("llama2-7b", "--hw", "flightllm-u280", "--timing-only", "--layers", "1",
            "--buckets", "decode:1@128", "-o", tmp_path / "b")
    assert trimem(*args) == 0 and trimem(*args) == 0


def test_a_malformed_bucket_is_rejected_with_the_form_to_use(tmp_path):
    with pytest.raises(CompileError, match=r"^bucket 'decode:1' is not of the form "
                                           r"PHASE:ROWS@CTX"):
        trimem("llama2-7b", "--hw", "flightllm-u280", "--timing-only", "--buckets",
               "decode:1", "-o", tmp_path / "b")


def test_a_placement_override_must_be_kind_equals_engine(tmp_path):
    with pytest.raises(CompileError, match=r"^--place 'linear' is not KIND=ENGINE"):
        trimem("llama2-7b", "--hw", "trimem-all", "--timing-only", "--place", "linear",
               "-o", tmp_path / "b")


def test_a_context_beyond_the_model_is_rejected(tmp_path):
    with pytest.raises(CompileError, match=r"^bucket decode:1@8192 exceeds the model's max_ctx "
                                           r"4096"):
        trimem("llama2-7b", "--hw", "flightllm-u280", "--timing-only", "--buckets",
               "decode:1@8192", "-o", tmp_path / "b")


def test_a_machine_without_an_fpga_is_rejected_before_any_work(tmp_path):
    with pytest.raises(CompileError, match=r"^hardware 'instinfer' has no fpga section"):
        trimem("llama2-7b", "--hw", "instinfer", "--timing-only", "-o", tmp_path / "b")
    assert not (tmp_path / "b").exists()


# ---- pruning metric and calibration prompt -------------------------------------------------

def tiny_bundle(model, **options):
    from trimem.compiler.pipeline import compile_model

    return compile_model(model, "trimem-all", quant="w8a8kv8", sparsity="2:4",
                         buckets="decode:1@16", layers=1, with_tests=False, **options)


def test_prune_metric_and_calibration_ids_are_recorded_in_the_manifest(saved_model, tmp_path):
    out = tmp_path / "b"
    assert trimem(saved_model, "--hw", "trimem-all", "--quant", "w8a8kv8", "--sparsity", "2:4",
                  "--prune-metric", "wanda", "--calib-ids", "5, 9,200", "--smooth-alpha",
                  "0.5", "--buckets", "decode:1@16", "--no-tests", "-o", out) == 0
    quant = read_bundle(out).quant
    assert quant["prune_metric"] == "wanda" and quant["calib_ids"] == [5, 9, 200]
    assert quant["smooth_alpha"] == 0.5 and quant["calib_text"] is None


def test_magnitude_pruning_needs_no_calibration_and_prunes_other_weights(tiny_llama):
    magnitude = tiny_bundle(tiny_llama, prune_metric="magnitude")
    wanda = tiny_bundle(tiny_llama, calib_ids=[5, 9, 200, 7])
    assert magnitude.quant["prune_metric"] == "magnitude"
    assert magnitude.quant["calib_ids"] is None and wanda.quant["calib_ids"] == [5, 9, 200, 7]
    weights = {i.name: i.data for i in magnitude.images}
    assert any(not np.array_equal(i.data, weights[i.name]) for i in wanda.images
               if i.name.endswith(".mlp.up"))


def test_dense_compiles_record_no_prune_metric(tiny_llama):
    from trimem.compiler.pipeline import compile_model

    bundle = compile_model(tiny_llama, "trimem-all", buckets="decode:1@16", layers=1,
                           with_tests=False)
    assert bundle.quant["prune_metric"] is None and bundle.quant["calib_ids"] is None


def test_an_unknown_prune_metric_is_rejected_with_the_choices(tiny_llama):
    with pytest.raises(CompileError, match=r"^prune_metric 'l1' is not one of "
                                           r"\['wanda', 'magnitude'\]$"):
        tiny_bundle(tiny_llama, prune_metric="l1")


def test_calibration_text_needs_a_tokenizer(tiny_llama):
    with pytest.raises(CompileError, match=r"has no tokenizer at hand for calib_text; pass "
                                           r"calib_ids \(token ids\) instead$"):
        tiny_bundle(tiny_llama, calib_text="Rivers shape the land.")


def test_calibration_text_and_ids_together_are_rejected(tiny_llama):
    with pytest.raises(CompileError, match=r"^pass calib_text or calib_ids, not both"):
        tiny_bundle(tiny_llama, calib_text="Rivers.", calib_ids=[1, 2])


def test_malformed_calibration_ids_are_rejected(tmp_path):
    with pytest.raises(CompileError, match=r"^--calib-ids '1,x' is not a comma-separated list "
                                           r"of token ids"):
        trimem("llama2-7b", "--hw", "trimem-all", "--timing-only", "--calib-ids", "1,x",
               "-o", tmp_path / "b")


def test_smoothing_is_on_by_default_and_none_turns_it_off(saved_model, tmp_path):
    from trimem.compiler import quantize

    args = ("--hw", "trimem-small", "--quant", "w8a8kv8", "--buckets", "decode:1@16",
            "--no-tests")
    assert trimem(saved_model, *args, "-o", tmp_path / "on") == 0
    assert trimem(saved_model, *args, "--smooth-alpha", "none", "-o", tmp_path / "off") == 0
    assert read_bundle(tmp_path / "on").quant["smooth_alpha"] == quantize.SMOOTH_ALPHA
    assert read_bundle(tmp_path / "off").quant["smooth_alpha"] is None


def test_a_smooth_alpha_that_is_not_a_number_is_rejected(saved_model, tmp_path, capsys):
    with pytest.raises(SystemExit):
        trimem(saved_model, "--hw", "trimem-small", "--smooth-alpha", "half", "-o", tmp_path)
    assert "'half' is not a number in [0, 1] or none" in capsys.readouterr().err
