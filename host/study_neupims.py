"""NeuPIMs (Heo et al., ASPLOS 2024): batched decode throughput of an NPU beside HBM-PIM.

Four systems on the `neupims` preset, each compiled timing-only and run on the emulator
except the GPU:
- GPU-only: the preset's A100 as a roofline of the same graph, in the same number formats;
- NPU-only: every linear on the NPU (the MXU), the PIM banks unused;
- naive NPU+PIM: every linear in the PIM banks (placed there by override: the compiler's
  roofline keeps batched linears on the NPU, and the ISA has no PIM attention, which is what
  NeuPIMs sends to PIM), with a single row buffer per bank (blocked mode: a PIM GEMV holds its
  channels, so NPU traffic to them waits) and no sub-batch interleaving;
- NeuPIMs: dual row buffers and sub-batch interleaving (one half of the batch on the NPU
  while the other half is in the PIM banks).
Two ablation rows switch one of the two mechanisms on alone.
"""
from __future__ import annotations

from trimem.compiler.quantize import QuantSpec
from trimem.config import load_config
from trimem.host import roofline
from trimem.host.studies import StudyResult, baseline_step, emulate, variant

NPU = {"linear": "mxu", "lm_head": "mxu"}
PIM = {"linear": "pim", "lm_head": "pim"}
SYSTEMS = (
    ("NPU-only", False, False, NPU),
    ("naive NPU+PIM", False, False, PIM),
    ("dual row buffers only", True, False, PIM),
    ("interleaving only", False, True, PIM),
    ("NeuPIMs", True, True, PIM),
)
"""(label, dual row buffers, sub-batch interleaving, placement overrides)."""
BATCHES = (16, 32, 64)


def npu_pim(hw, model, quant, batch, ctx, dual, interleave, placement) -> float:
    """Emulated decode tokens/s of one system."""
    cfg = variant(hw, {"pim.dual_row_buffer": dual}, "dual" if dual else "single")
    return emulate(cfg, model, quant=quant, batch=batch, ctx=ctx, placement=placement,
                   interleave=interleave).tokens_per_s


def gpu_only(hw, model, quant, batch, ctx) -> float:
    """Roofline decode tokens/s of the preset's host GPU in the compiled number formats."""
    fmt = roofline.same_format(QuantSpec.parse(quant))
    return baseline_step(load_config(hw).host, model, fmt, batch=batch, ctx=ctx).tokens_per_s


def run(model="llama2-7b", hw="neupims", quant="w8a8kv8", ctx=512,
        batches=BATCHES) -> StudyResult:
    """Tokens/s of every system at every batch; ratios of NeuPIMs at the largest batch."""
    table = {"GPU-only": [gpu_only(hw, model, quant, b, ctx) for b in batches]}
    for label, dual, interleave, placement in SYSTEMS:
        table[label] = [npu_pim(hw, model, quant, b, ctx, dual, interleave, placement)
                        for b in batches]
    best = table["NeuPIMs"]
    ratios = {"vs_gpu_only": best[-1] / table["GPU-only"][-1],
              "vs_npu_only": best[-1] / table["NPU-only"][-1],
              "vs_naive_npu_pim": best[-1] / table["naive NPU+PIM"][-1]}
    for i, batch in enumerate(batches):
        ratios[f"vs_naive_npu_pim_b{batch}"] = best[i] / table["naive NPU+PIM"][i]
    rows = [[label, *series] for label, series in table.items()]
    notes = [f"{model} decode at context {ctx}, {quant}, on {hw}; emulated from one and two "
             "compiled layers, extrapolated to the full depth",
             "GPU-only: the preset's host GPU as a roofline in the same number formats",
             f"ratios at batch {batches[-1]}"]
    return StudyResult("neupims", f"NeuPIMs: batched decode tokens/s, {model}",
                       ["system", *(f"batch {b}" for b in batches)], rows, ratios, notes,
                       {"batches": list(batches), "tokens_per_s": table})


def plot(result: StudyResult, fig) -> None:
    """Tokens/s against batch for every system."""
    ax = fig.subplots(1, 1)
    for label, series in result.data["tokens_per_s"].items():
        ax.plot(result.data["batches"], series, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("decode batch")
    ax.set_ylabel("tokens/s")
    ax.legend()
