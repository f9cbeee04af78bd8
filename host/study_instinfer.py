"""InstInfer (Pan et al., arXiv:2409.04992): long-context 13B decode with the KV cache on
flash, read over PCIe by the GPU (FlexGen-style offload) or attended to inside the drive.

Both systems run every op but attention on the preset's GPU (an A6000), as a roofline in the
compiled number formats. Offload: each step streams every layer's K and V from the SSD to the
GPU through the slowest hop of flash channels, the drive's PCIe link and the GPU's, overlapped
with the GPU's work (FlexGen's pipelining, the most generous reading of it). InstInfer: each
layer's attention runs in the drive, on the emulator (CSD.ATTN over the flash channels), with
q and the output crossing the P2P link; optionally only the V pages of the top-k tokens are
read (at worst one page per kept token, so pruning pays once k is below the context's page
count). The wins grow with context, where KV traffic dwarfs the weights.
"""
from __future__ import annotations

from trimem.compiler import place
from trimem.compiler.ir import OpKind
from trimem.compiler.quantize import QuantSpec
from trimem.config import load_config
from trimem.host import roofline
from trimem.host.studies import StudyResult, attention_run, baseline_step, model_graph

CONTEXTS = (2048, 8192, 32768)
BATCHES = (1, 8, 32)


def offload_seconds(cfg, model, fmt, batch, ctx) -> float:
    """FlexGen-style step: max(GPU work, KV streamed over the slowest hop)."""
    gpu = baseline_step(cfg.host, model, fmt, batch=batch, ctx=ctx)
    spec = model_graph(model, ctx).spec
    kv = spec.layers * batch * 2 * spec.kv_dim * ctx * fmt.kv_bits / 8
    link = min(cfg.csd.pcie_gbps, cfg.csd.internal_gbps, cfg.links.pcie_gbps) * 1e9
    return max(gpu.seconds, kv / link)


def instinfer_seconds(cfg, model, fmt, batch, ctx, topk) -> float:
    """GPU work without attention, plus per layer: CSD attention (emulated) and the P2P
    transfer of q, new K and V, and the attention output (fx int32 rows)."""
    skip = (OpKind.ATTENTION, OpKind.KV_APPEND)
    gpu = baseline_step(cfg.host, model, fmt, batch=batch, ctx=ctx, skip=skip)
    spec = model_graph(model, ctx).spec
    attn = attention_run(cfg, "CSD", q_heads=spec.heads, kv_heads=spec.kv_heads,
                         head_dim=spec.head_dim, ctx=ctx, seqs=batch, topk=topk,
                         kv_bits=int(fmt.kv_bits))["seconds"]
    moved = batch * place.FX_BYTES * (2 * spec.q_dim + 2 * spec.kv_dim)
    p2p = 2 * cfg.links.p2p_latency_us * 1e-6 + moved / (cfg.links.p2p_gbps * 1e9)
    return gpu.seconds + spec.layers * (attn + p2p)


def run(model="llama2-13b", hw="instinfer", quant="w8a8kv8", contexts=CONTEXTS,
        batches=BATCHES, topk=64) -> StudyResult:
    """Tokens/s of offload, InstInfer and InstInfer with top-k V skipping over context x
    batch; ratios are the largest gains over the sweep."""
    cfg = load_config(hw)
    fmt = roofline.same_format(QuantSpec.parse(quant))
    rows, grid = [], {"offload": {}, "instinfer": {}, "topk": {}}
    for ctx in contexts:
        for batch in batches:
            t = {"offload": offload_seconds(cfg, model, fmt, batch, ctx),
                 "instinfer": instinfer_seconds(cfg, model, fmt, batch, ctx, 0),
                 "topk": instinfer_seconds(cfg, model, fmt, batch, ctx, topk)}
            for key, seconds in t.items():
                grid[key][f"{ctx}/{batch}"] = batch / seconds
            rows.append([ctx, batch, batch / t["offload"], batch / t["instinfer"],
                         batch / t["topk"], t["offload"] / t["instinfer"],
                         t["offload"] / t["topk"]])
    ratios = {"max_throughput_vs_offload": max(r[5] for r in rows),
              "max_throughput_vs_offload_topk": max(r[6] for r in rows)}
    for ctx in contexts:
        ratios[f"vs_offload_ctx{ctx}"] = max(r[5] for r in rows if r[0] == ctx)
    link = min(cfg.csd.pcie_gbps, cfg.csd.internal_gbps, cfg.links.pcie_gbps)
    notes = [f"{model} decode, {quant}, on {hw}: GPU {cfg.host.name}, offload path "
             f"{link:.3g} GB/s (slowest of flash {cfg.csd.internal_gbps:.3g}, drive PCIe "
             f"{cfg.csd.pcie_gbps:.3g}, GPU PCIe {cfg.links.pcie_gbps:.3g} GB/s)",
             "InstInfer attention emulated (CSD.ATTN, one layer, times the layer count); "
             f"top-k variant reads the V pages of {topk} tokens",
             "context lengths beyond the model's 4K training window are shapes only"]
    columns = ["context", "batch", "offload tok/s", "InstInfer tok/s", "+top-k tok/s",
               "InstInfer / offload", "+top-k / offload"]
    return StudyResult("instinfer", f"InstInfer: {model} long-context decode, CSD vs offload",
                       columns, rows, ratios, notes,
                       {"contexts": list(contexts), "batches": list(batches), "grid": grid})


def plot(result: StudyResult, fig) -> None:
    """Tokens/s against context for each batch, offload vs InstInfer."""
    d = result.data
    ax1, ax2 = fig.subplots(1, 2)
    for batch in d["batches"]:
        for key, style in (("offload", "--"), ("instinfer", "-"), ("topk", ":")):
            ys = [d["grid"][key][f"{c}/{batch}"] for c in d["contexts"]]
            ax1.plot(d["contexts"], ys, style, marker="o", label=f"{key} b{batch}")
        ax2.plot(d["contexts"], [d["grid"]["instinfer"][f"{c}/{batch}"]
                                 / d["grid"]["offload"][f"{c}/{batch}"] for c in d["contexts"]],
                 marker="o", label=f"batch {batch}")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length")
    ax1.set_yscale("log")
    ax1.set_ylabel("decode tokens/s")
    ax1.legend(fontsize=6)
    ax2.set_ylabel("InstInfer / offload")
    ax2.legend()
