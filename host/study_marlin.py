"""MARLIN (Frantar et al., PPoPP 2025): the batch size at which W4 weight-only linears stop
being memory-bound, on each engine.

A decoder layer's linears at batch B do B times the MACs of one row over the same weights,
so their intensity is 2 B MACs / (W + B A) with W the weight bytes and A the activation bytes
per row; the knee is the B where it reaches the engine's ridge point, B* = r W / (2 MACs -
r A). W, A and the MACs come from the compiler's op sizes at batch 1 and 2 (in the hardware's
W4A8 formats for the MXU and PIM, in MARLIN's W4A16 for the GPU).

On the emulator the MXU turns compute-bound where the DSP chains are busier than the weight
stream: the study runs W4 decode steps at growing batch and interpolates the batch at which
MXU busy time overtakes the DMA's. Past the knee W4's advantage over W8 in tokens/s fades,
as MARLIN's near-4x over fp16 does on the GPU.
"""
from __future__ import annotations

from trimem.config import load_config
from trimem.host import roofline
from trimem.host.studies import StudyResult, emulate, placed_graph

BATCHES = (1, 2, 4, 8, 16)
GPU_BATCHES = (1, 16, 32, 64, 128)
"""Batches at which MARLIN reports its speedup (near 4x up to 16-32, less at 64-128)."""


def layer_work(hw, model, quant, fmt=None) -> tuple[float, float, float]:
    """(MACs per row, weight bytes, activation bytes per row) of the first layer's linears:
    in the compiled formats, or in baseline format `fmt`."""
    def totals(batch):
        graph = placed_graph(hw, model, quant=quant, batch=batch, ctx=2)
        ops = [op for op in graph.linears() if op.layer == 0]
        work = [roofline.host_op_work(op, "decode", fmt) if fmt else
                roofline.op_work(graph, op) for op in ops]
        return sum(o for o, _ in work) / roofline.OPS_PER_MAC, sum(b for _, b in work)

    (macs, one), (_, two) = totals(1), totals(2)
    per_row = two - one
    return macs, one - per_row, per_row


def knee(ridge: float, macs: float, weights: float, per_row: float) -> float:
    """Batch at which 2 B macs / (weights + B per_row) reaches `ridge` (inf if never)."""
    room = roofline.OPS_PER_MAC * macs - ridge * per_row
    return ridge * weights / room if room > 0 else float("inf")


def emulated_knee(batches, mxu, dma) -> float:
    """Batch where MXU busy time overtakes DMA busy time, interpolated between batches."""
    gaps = [m - d for m, d in zip(mxu, dma)]
    if gaps[0] >= 0:
        return float(batches[0])
    for i in range(1, len(batches)):
        if gaps[i] >= 0:
            b0, b1, g0, g1 = batches[i - 1], batches[i], gaps[i - 1], gaps[i]
            return b0 + (b1 - b0) * -g0 / (g1 - g0)
    return float("inf")


def run(model="llama2-7b", hw="trimem-all", fpga_hw="flightllm-u280", ctx=128,
        batches=BATCHES, gpu_batches=GPU_BATCHES) -> StudyResult:
    """Analytic knees of every engine, the emulated MXU knee, and W4 speedups by batch."""
    cfg = load_config(hw)
    roofs = roofline.engine_roofs(cfg)
    hw4 = layer_work(hw, model, "w4a8kv4")
    gpu4 = layer_work(hw, model, "w4a8kv4", roofline.W4A16)
    gpu16 = layer_work(hw, model, "w4a8kv4", roofline.FP16)
    knees = {e: knee(roofs[e].ridge, *hw4) for e in ("MXU", "PIM") if e in roofs}
    knees["GPU"] = knee(roofs["HOST"].ridge, *gpu4)
    w4 = [emulate(fpga_hw, model, quant="w4a8kv4", batch=b, ctx=ctx,
                  placement={"linear": "mxu"}) for b in batches]
    w8 = [emulate(fpga_hw, model, quant="w8a8kv8", batch=b, ctx=ctx,
                  placement={"linear": "mxu"}) for b in batches]
    mxu_knee = emulated_knee(batches, [r.busy_s["MXU"] for r in w4],
                             [r.busy_s["DMA"] for r in w4])

    def gpu_seconds(work, batch):
        macs, weights, per_row = work
        return roofs["HOST"].seconds(roofline.OPS_PER_MAC * macs * batch,
                                     weights + per_row * batch)

    gpu_speedup = {b: gpu_seconds(gpu16, b) / gpu_seconds(gpu4, b) for b in gpu_batches}
    rows = [[f"{e} ({'W4A16' if e == 'GPU' else 'W4A8'})",
             roofs["HOST" if e == "GPU" else e].ridge, k] for e, k in knees.items()]
    rows.append([f"MXU emulated ({fpga_hw})", load_config(fpga_hw).fpga.ridge_op_per_byte,
                 mxu_knee])
    ratios = {"knee_batch": knees["GPU"], "knee_batch_mxu_emulated": mxu_knee}
    ratios |= {f"knee_batch_{e.lower()}": k for e, k in knees.items() if e != "GPU"}
    ratios |= {f"gpu_w4_speedup_b{b}": s for b, s in gpu_speedup.items()}
    ratios |= {f"mxu_w4_vs_w8_b{b}": r4.tokens_per_s / r8.tokens_per_s
               for b, r4, r8 in zip(batches, w4, w8)}
    notes = [f"{model} layer linears; analytic knees on {hw}'s engines and host GPU",
             f"emulated: decode steps on {fpga_hw} with every linear on the MXU, context "
             f"{ctx}; knee where MXU busy time overtakes the weight DMA's",
             "GPU speedup: roofline time of the layer's linears in fp16 over W4A16 (MARLIN's "
             "kernel-level comparison, no launch overhead)"]
    data = {"batches": list(batches), "w4_tokens_per_s": [r.tokens_per_s for r in w4],
            "w8_tokens_per_s": [r.tokens_per_s for r in w8],
            "mxu_busy": [r.busy_s["MXU"] for r in w4], "dma_busy": [r.busy_s["DMA"] for r in w4],
            "gpu_batches": list(gpu_batches), "gpu_speedup": list(gpu_speedup.values())}
    return StudyResult("marlin", f"MARLIN: batch knee of W4 weight-only linears, {model}",
                       ["engine", "ridge Op/B", "knee batch"], rows, ratios, notes, data)


def plot(result: StudyResult, fig) -> None:
    """Emulated MXU and DMA busy time and W4/W8 throughput; the GPU's W4 speedup."""
    ax1, ax2 = fig.subplots(1, 2)
    d = result.data
    ax1.plot(d["batches"], [s * 1e3 for s in d["mxu_busy"]], marker="o", label="MXU busy")
    ax1.plot(d["batches"], [s * 1e3 for s in d["dma_busy"]], marker="s", label="DMA busy")
    ax1.axvline(result.ratios["knee_batch_mxu_emulated"], ls="--", color="k", label="knee")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("decode batch")
    ax1.set_ylabel("busy ms per step (W4, emulated)")
    ax1.legend()
    ax2.plot(d["gpu_batches"], d["gpu_speedup"], marker="o", label="GPU W4A16 / fp16")
    ax2.plot(d["batches"], [a / b for a, b in zip(d["w4_tokens_per_s"],
                                                  d["w8_tokens_per_s"])],
             marker="s", label="MXU W4 / W8 (emulated)")
    ax2.axvline(result.ratios["knee_batch"], ls="--", color="tab:blue")
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("batch")
    ax2.set_ylabel("speedup")
    ax2.legend()
