"""FlightLLM (Zeng et al., FPGA 2024): batch-1 LLaMA2-7B decode on sparse DSP chains.

Each FPGA variant (W8 or W4 weights, dense or N:M sparse, always-on-chip decode on or off) is
compiled timing-only for `flightllm-u280` and run on the emulator; the baseline is the
preset's host GPU (a V100S) as a roofline running SmoothQuant W8A8, the paper's baseline
(vLLM + SmoothQuant, batch 1). Energy is board power x time on both sides (the data-sheet
maximum of the U280 and of the GPU) and cost efficiency is tokens/s per dollar of the card, so
the ratios follow from throughput, power and price alone. The same FlightLLM variant on
`flightllm-vhk158` is compared with that preset's A100.

Turning always-on-chip decode off sends every activation value through HBM between the ops
that produce and consume it: the study adds, to the compiled stream, a write and a read of
each value at HBM bandwidth with the HBM latency each way (the compiler keeps decode values
in SRAM either way).
"""
from __future__ import annotations

from trimem.config import load_config
from trimem.host import roofline
from trimem.host.studies import StudyResult, baseline_step, board_power_w, board_price_usd, \
    emulate, model_graph

VARIANTS = (
    ("W8 dense, off-chip decode", "w8a8kv8", None, False),
    ("W8 dense", "w8a8kv8", None, True),
    ("W8 2:4", "w8a8kv8", "2:4", True),
    ("W4 dense", "w4a8kv4", None, True),
    ("FlightLLM: W4 2:4", "w4a8kv4", "2:4", True),
)
"""(label, quant, N:M sparsity of every linear, always-on-chip decode)."""
FLIGHTLLM = VARIANTS[-1]
COLUMNS = ("system", "hardware", "tokens/s", "ms/token", "HBM GB/token", "board W",
           "tokens/J", "tokens/s per k$", "emulated mJ/token", "busiest")


def spill(cfg, model, ctx: int) -> tuple[float, int]:
    """(seconds, bytes) one decode token spends moving activations through HBM when they are
    not kept on chip: each op's output written once and read by each consumer, every
    transfer at HBM bandwidth plus the HBM latency."""
    graph = model_graph(model, ctx)
    values = graph.values()
    fpga = cfg.fpga
    latency = fpga.hbm_latency_cycles / fpga.clock_hz
    moved = [roofline.value_bytes(values[name]) for op in graph.ops
             for name in (*op.inputs, op.name) if values[name].fmt != "kv"]
    return len(moved) * latency + sum(moved) / (fpga.hbm_gbps * 1e9), sum(moved)


def fpga_row(hw, label, quant, sparsity, on_chip, model, ctx) -> dict:
    """One FPGA variant, emulated; `sparsity` prunes every decoder linear."""
    cfg = load_config(hw)
    run = emulate(cfg, model, quant=quant, sparsity=sparsity, sparse_layers="all", ctx=ctx)
    seconds, hbm = (0.0, 0) if on_chip else spill(cfg, model, ctx)
    engines = ("fpga",)
    busiest = max(run.busy_s, key=run.busy_s.get)
    return _row(label, cfg.name, 1 / (run.seconds + seconds), run.bytes.get("HBM", 0) + hbm,
                board_power_w(cfg, engines), board_price_usd(cfg, engines),
                run.energy_j + hbm * cfg.fpga.energy_pj_per_hbm_byte * 1e-12,
                f"{busiest} {run.busy_s[busiest] * 1e3:.3g} ms")


def gpu_row(hw, model, ctx) -> dict:
    """The preset's host GPU running SmoothQuant W8A8, as a roofline."""
    host = load_config(hw).host
    step = baseline_step(host, model, roofline.W8A8, ctx=ctx)
    return _row(f"GPU {step.fmt}", host.name, step.tokens_per_s, step.bytes, host.power_w,
                host.price_usd, None, f"launches {step.launch_s * 1e3:.3g} ms")


def _row(system, hardware, tokens_per_s, hbm_bytes, power_w, price_usd, energy_j,
         busiest) -> dict:
    return {"system": system, "hardware": hardware, "tokens_per_s": tokens_per_s,
            "ms_per_token": 1e3 / tokens_per_s, "hbm_gb_per_token": hbm_bytes / 1e9,
            "power_w": power_w, "tokens_per_j": tokens_per_s / power_w,
            "tokens_per_s_per_kusd": tokens_per_s / price_usd * 1e3,
            "emulated_mj_per_token": None if energy_j is None else energy_j * 1e3,
            "busiest": busiest}


def run(model="llama2-7b", ctx=512, hw="flightllm-u280",
        hw_large="flightllm-vhk158") -> StudyResult:
    """Tokens/s, tokens/J and tokens/s per dollar of each variant and of the GPUs."""
    by = {v[0]: fpga_row(hw, *v, model, ctx) for v in VARIANTS}
    gpu = gpu_row(hw, model, ctx)
    large = fpga_row(hw_large, *FLIGHTLLM, model, ctx)
    gpu_large = gpu_row(hw_large, model, ctx)
    rows = [*by.values(), gpu, large, gpu_large]
    best = by[FLIGHTLLM[0]]

    def speedup(a, b):
        return by[a]["tokens_per_s"] / by[b]["tokens_per_s"]

    ratios = {
        "energy_eff_vs_gpu": best["tokens_per_j"] / gpu["tokens_per_j"],
        "cost_eff_vs_gpu": best["tokens_per_s_per_kusd"] / gpu["tokens_per_s_per_kusd"],
        "throughput_vs_gpu": best["tokens_per_s"] / gpu["tokens_per_s"],
        "vhk158_throughput_vs_a100": large["tokens_per_s"] / gpu_large["tokens_per_s"],
        "w4_vs_w8_tokens_per_s": speedup("W4 dense", "W8 dense"),
        "sparse_vs_dense_tokens_per_s": speedup("W8 2:4", "W8 dense"),
        "on_chip_decode_gain": speedup("W8 dense", "W8 dense, off-chip decode"),
    }
    keys = ("system", "hardware", "tokens_per_s", "ms_per_token", "hbm_gb_per_token",
            "power_w", "tokens_per_j", "tokens_per_s_per_kusd", "emulated_mj_per_token",
            "busiest")
    table = [[r[k] if r[k] is not None else "-" for k in keys] for r in rows]
    notes = [f"{model} decode, batch 1, context {ctx}; FPGA variants compiled timing-only and "
             "emulated (1 and 2 layers, extrapolated to the full depth); N:M prunes every "
             "decoder linear",
             "GPU: roofline of the same graph in SmoothQuant W8A8 (int8 weights, fp16 "
             "activations and KV), one kernel per op plus the preset's launch overhead",
             "energy = board power x time (FPGA and GPU data-sheet power), cost = card price",
             "busiest: the engine with the most busy time per token (GPU: its launch time)"]
    return StudyResult("flightllm", f"FlightLLM: {model} batch-1 decode, FPGA vs GPU",
                       list(COLUMNS), table, ratios, notes, {"rows": rows})


def plot(result: StudyResult, fig) -> None:
    """Tokens/s of every system, and tokens/J and tokens/s per k$ of each against its GPU."""
    rows = result.data["rows"]
    ax1, ax2 = fig.subplots(1, 2)
    labels = [f"{r['system']}\n{r['hardware'].removeprefix('NVIDIA ')}" for r in rows]
    ax1.barh(labels, [r["tokens_per_s"] for r in rows], color="tab:blue")
    ax1.set_xlabel("decode tokens/s")
    ax1.invert_yaxis()
    ax1.tick_params(axis="y", labelsize=7)
    names = ["energy_eff_vs_gpu", "cost_eff_vs_gpu", "throughput_vs_gpu",
             "vhk158_throughput_vs_a100"]
    ax2.bar(range(len(names)), [result.ratios[n] for n in names], color="tab:orange")
    ax2.axhline(1.0, color="k", lw=0.8)
    ax2.set_xticks(range(len(names)), [n.replace("_", "\n") for n in names], fontsize=7)
    ax2.set_ylabel("ratio (FlightLLM / GPU)")
    ax2.set_title("FlightLLM variant vs GPU roofline")
