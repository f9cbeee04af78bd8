"""Scenario studies: each mechanism moves the way its paper says, and every study reports its
ratios as floats in its JSON."""
import json
import math

import pytest

from trimem.compiler.models import model_config
from trimem.compiler.pipeline import compile_model
from trimem.compiler.quantize import QuantSpec
from trimem.config import load_config
from trimem.emulator.runner import run_bundle
from trimem.host import cli, roofline, studies
from trimem.host import study_duplex as duplex
from trimem.host import study_flightllm as flightllm
from trimem.host import study_instinfer as instinfer
from trimem.host import study_marlin as marlin
from trimem.host import study_neupims as neupims
from trimem.host import study_spatten as spatten

pytestmark = pytest.mark.unit

RATIOS = {
    "flightllm": ("energy_eff_vs_gpu", "cost_eff_vs_gpu", "vhk158_throughput_vs_a100"),
    "neupims": ("vs_gpu_only", "vs_npu_only", "vs_naive_npu_pim"),
    "pim-gpt": ("speedup_vs_gpu", "speedup_vs_cpu"),
    "instinfer": ("max_throughput_vs_offload",),
    "spatten": ("dram_access_reduction",),
    "duplex": ("attn_gqa1_op_b", "attn_gqa8_op_b", "moe_b1_op_b", "mlp_b1_op_b"),
    "marlin": ("knee_batch", "knee_batch_mxu", "knee_batch_mxu_emulated"),
}
"""The ratio keys each study must report (issue: trimem study NAME --json)."""
SMALL = "smollm2-135m"


def test_every_study_is_registered_and_an_unknown_one_is_rejected_with_the_list():
    assert set(studies.STUDIES) == set(RATIOS)
    with pytest.raises(ValueError, match=r"^unknown study 'flightlm'; choose one of flightllm, "):
        studies.study_module("flightlm")


def test_emulate_extrapolates_one_and_two_layers_to_the_whole_model():
    model = {**model_config(SMALL), "num_hidden_layers": 3}
    run = studies.emulate("flightllm-u280", model, ctx=64)
    bundle = compile_model(studies.model_graph(model, 64), "flightllm-u280",
                           buckets="decode:1@64", timing_only=True)
    direct = run_bundle(bundle, timing_only=True).report
    assert run.seconds == pytest.approx(direct["seconds"], rel=0.02)
    assert run.bytes["HBM"] == pytest.approx(direct["bytes"]["HBM"], rel=0.01)


def test_w4_beats_w8_in_decode_tokens_per_s_and_moves_fewer_bytes():
    w8, w4 = (flightllm.fpga_row("flightllm-u280", q, q, None, True, SMALL, 128)
              for q in ("w8a8kv8", "w4a8kv4"))
    assert w4["tokens_per_s"] > w8["tokens_per_s"]
    assert w4["hbm_gb_per_token"] < 0.7 * w8["hbm_gb_per_token"]


def test_nm_sparsity_lowers_the_weight_bytes_of_a_decode_token():
    dense, sparse = (flightllm.fpga_row("flightllm-u280", s, "w8a8kv8", s, True, SMALL, 128)
                     for s in (None, "2:4"))
    assert sparse["hbm_gb_per_token"] < 0.8 * dense["hbm_gb_per_token"]
    assert sparse["tokens_per_s"] > dense["tokens_per_s"]


def test_keeping_decode_values_on_chip_saves_their_hbm_round_trips():
    on, off = (flightllm.fpga_row("flightllm-u280", "x", "w8a8kv8", None, chip, SMALL, 128)
               for chip in (True, False))
    assert off["tokens_per_s"] < on["tokens_per_s"]
    assert off["hbm_gb_per_token"] > on["hbm_gb_per_token"]


def test_interleaving_and_dual_row_buffers_raise_batched_decode_throughput():
    def tokens_per_s(dual, interleave):
        return neupims.npu_pim("neupims", SMALL, "w8a8kv8", 16, 64, dual, interleave,
                               neupims.PIM)

    naive, best = tokens_per_s(False, False), tokens_per_s(True, True)
    assert best > 1.05 * naive


@pytest.mark.parametrize("mechanism", [dict(token_keep=0.25), dict(head_keep=0.5),
                                       dict(v_keep=0.5), dict(progressive=True)])
def test_each_pruning_mechanism_lowers_attention_bytes(mechanism):
    spec = studies.model_graph(SMALL, 256).spec
    dense = dict(token_keep=1.0, head_keep=1.0, v_keep=1.0, refetch=0.1, progressive=False)
    base = spatten.attention_bytes("flightllm-u280", spec, 256, **dense)
    pruned = spatten.attention_bytes("flightllm-u280", spec, 256, **{**dense, **mechanism})
    assert pruned < 0.9 * base


def test_cascade_pruning_never_revives_a_pruned_token():
    kept = [spatten.cascade(0.1, 1000, layer, 12) for layer in range(12)]
    assert kept[0] == 1000 and kept[-1] == 100
    assert all(a >= b for a, b in zip(kept, kept[1:]))


def test_csd_attention_wins_grow_with_context():
    cfg = load_config("instinfer")
    fmt = roofline.same_format(QuantSpec.parse("w8a8kv8"))

    def gain(ctx):
        return (instinfer.offload_seconds(cfg, "llama2-13b", fmt, 4, ctx)
                / instinfer.instinfer_seconds(cfg, "llama2-13b", fmt, 4, ctx, 0))

    assert gain(1024) < gain(8192) < gain(32768)
    assert gain(32768) > 1


def test_the_marlin_knee_moves_with_the_ridge_point():
    base = load_config("flightllm-u280")
    slow = studies.variant(base, {"fpga.hbm_gbps_per_channel": 7.1875}, "half-hbm")
    assert slow.fpga.ridge_op_per_byte == pytest.approx(2 * base.fpga.ridge_op_per_byte)
    work = marlin.layer_work(base, SMALL, "w4a8kv4")
    knees = [marlin.knee(cfg.fpga.ridge_op_per_byte, *work) for cfg in (base, slow)]
    assert knees[1] == pytest.approx(2 * knees[0], rel=0.05)
    batches = (1, 2, 4, 8)
    emulated = []
    for cfg in (base, slow):
        runs = [studies.emulate(cfg, SMALL, batch=b, ctx=16, placement={"linear": "mxu"})
                for b in batches]
        emulated.append(marlin.emulated_knee(batches, [r.busy_s["MXU"] for r in runs],
                                             [r.busy_s["DMA"] for r in runs]))
    assert emulated[1] > 1.5 * emulated[0]


def test_a_knee_is_where_intensity_reaches_the_ridge():
    macs, weights, per_row = 1000.0, 500.0, 10.0
    batch = marlin.knee(4.0, macs, weights, per_row)
    assert 2 * batch * macs / (weights + batch * per_row) == pytest.approx(4.0)
    assert marlin.knee(1e6, macs, weights, per_row) == math.inf


def test_gqa_groups_raise_attention_op_per_byte_and_batch_does_not():
    op_b = {g: duplex.measure("trimem-all", duplex.gqa_config(g), 1, 1024, "w8a8kv8",
                              "attn.attention")["op_b_fp16"] for g in (1, 8)}
    assert op_b[1] == pytest.approx(1.0, rel=0.01)
    assert op_b[8] == pytest.approx(8.0, rel=0.01)


def test_an_moe_expert_sees_a_share_of_the_batch():
    assert duplex.tokens_per_expert(1) == pytest.approx(1.0)
    assert duplex.tokens_per_expert(256) == pytest.approx(256 * 2 / 8, rel=0.01)
    assert duplex.tokens_per_expert(8) < 8


def test_a_study_writes_its_table_plot_and_json(tmp_path):
    result = studies.run_study("duplex", tmp_path, batches=(1, 16), groups=(1, 4))
    data = json.loads((tmp_path / "duplex.json").read_text())
    assert data["study"] == "duplex" and data["ratios"] == result.ratios
    assert all(isinstance(v, float) for v in data["ratios"].values())
    assert (tmp_path / "duplex.png").stat().st_size > 10_000
    assert result.table().splitlines()[0].startswith("Duplex: Op/B per layer")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RATIOS))
def test_study_command_json_has_the_ratio_keys_as_floats(name, tmp_path, capsys):
    assert cli.main(["study", name, "--json", "-o", str(tmp_path)]) == 0
    data = json.loads(capsys.readouterr().out)
    for key in RATIOS[name]:
        assert isinstance(data["ratios"][key], float) and math.isfinite(data["ratios"][key])
    assert (tmp_path / f"{name}.png").is_file() and (tmp_path / f"{name}.json").is_file()
