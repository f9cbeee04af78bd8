"""PIM-GPT (Wu, Wang, Lu, arXiv:2310.09385): batch-1 token latency and energy of GPT-class
models up to 1.4B parameters on GDDR6 PIM with a small controller ASIC, against a GPU and a
CPU.

The models are compiled timing-only for the `pim-gpt` preset and run on the emulator with
every linear and the LM head in the PIM banks (PIM-GPT's mapping: all MACs in DRAM); a model
with a linear the banks cannot take (an input row longer than the 2 KiB global buffer) runs
with the compiler's own placement instead, is marked so, and is left out of the ratios. The
GPU (the preset's T4) and the CPU (below) are rooflines of the same graph in the same number
formats, one kernel per op with a launch overhead each. Energy is board power x time on
every side: PIM chips plus ASIC, the GPU card, the CPU package.
"""
from __future__ import annotations

from trimem.compiler import place
from trimem.compiler.quantize import QuantSpec
from trimem.config import HostConfig, load_config
from trimem.host import roofline
from trimem.host.studies import StudyResult, baseline_step, board_power_w, emulate, geomean, \
    placed_graph

MODELS = ("smollm2-135m", "smollm2-360m", "qwen2-0.5b", "tinyllama-1.1b")
"""LLaMA-family decoders of GPT-class size (PIM-GPT: eight GPT models up to 1.4B)."""
CPU = HostConfig(
    name="Intel Xeon Gold 6248",
    peak_tflops=3.2,        # Intel ARK: 20 cores x 2.5 GHz x 2 AVX-512 FMA x 16 fp32 x 2 Op
    mem_gbps=140.8,         # Intel ARK: 6 channels of DDR4-2933 x 8 B
    mem_bytes=206158430208,  # model choice: 6 x 32 GiB DIMMs
    kernel_launch_us=5.0,   # model choice: per-op framework dispatch, as the GPU presets
    power_w=150.0,          # Intel ARK: TDP 150 W
    price_usd=3072.0)       # Intel ARK: recommended customer price
"""The CPU baseline: a server Xeon as a roofline."""
PIM_PLACEMENT = {"linear": "pim", "lm_head": "pim"}


def pim_fits(cfg, model, quant, ctx) -> bool:
    """Whether the PIM banks can run every linear of `model` (`place.pim_unfit`)."""
    graph = placed_graph(cfg, model, quant=quant, ctx=ctx)
    return all(place.pim_unfit(cfg, op) is None for op in graph.linears())


def run(models=MODELS, hw="pim-gpt", quant="w8a8kv8", ctx=512) -> StudyResult:
    """Token latency, energy per token and their ratios against GPU and CPU, per model."""
    cfg = load_config(hw)
    fmt = roofline.same_format(QuantSpec.parse(quant))
    power = board_power_w(cfg)
    rows, ratios = [], {}
    speed = {"gpu": [], "cpu": []}
    energy = {"gpu": [], "cpu": []}
    for model in models:
        fits = pim_fits(cfg, model, quant, ctx)
        pim = emulate(cfg, model, quant=quant, ctx=ctx, placement=PIM_PLACEMENT if fits else None)
        pim_j = power * pim.seconds
        row = [model, "PIM" if fits else "ASIC", pim.seconds * 1e3, pim_j * 1e3]
        for side, host in (("gpu", cfg.host), ("cpu", CPU)):
            base = baseline_step(host, model, fmt, ctx=ctx)
            gain, efficiency = base.seconds / pim.seconds, base.energy_j / pim_j
            row += [base.seconds * 1e3, gain, efficiency]
            if fits:
                speed[side].append(gain)
                energy[side].append(efficiency)
        rows.append(row)
    if not speed["gpu"]:
        raise ValueError(f"no model of {list(models)!r} fits the PIM banks of {hw!r}; give a "
                         f"model whose linears have input rows under pim.gbuf_bytes")
    for side in ("gpu", "cpu"):
        ratios[f"speedup_vs_{side}"] = geomean(speed[side])
        ratios[f"energy_eff_vs_{side}"] = geomean(energy[side])
        ratios[f"speedup_vs_{side}_min"] = min(speed[side])
        ratios[f"speedup_vs_{side}_max"] = max(speed[side])
    notes = [f"batch-1 decode at context {ctx}, {quant}; PIM-GPT emulated on {hw} (one and two "
             "layers, extrapolated to the full depth)",
             f"GPU: {cfg.host.name}, CPU: {CPU.name}; rooflines of the same graph in the same "
             "formats, one kernel per op plus a launch overhead",
             f"energy: board power x time ({power:g} W for PIM chips + ASIC); ratios are "
             "geometric means over the models whose linears all ran in the PIM banks"]
    columns = ["model", "linears on", "PIM-GPT ms/token", "PIM-GPT mJ/token", "GPU ms/token",
               "speedup vs GPU", "energy eff. vs GPU", "CPU ms/token", "speedup vs CPU",
               "energy eff. vs CPU"]
    plotted = [r for r in rows if r[1] == "PIM"]
    return StudyResult("pim-gpt", "PIM-GPT: batch-1 token latency vs GPU and CPU", columns,
                       rows, ratios, notes, {"models": [r[0] for r in plotted],
                                             "speedup": speed, "energy": energy})


def plot(result: StudyResult, fig) -> None:
    """Speedup and energy efficiency over GPU and CPU, per model."""
    d = result.data
    x = range(len(d["models"]))
    for ax, key, label in zip(fig.subplots(1, 2), ("speedup", "energy"),
                              ("speedup", "energy efficiency")):
        for shift, side in ((-0.2, "gpu"), (0.2, "cpu")):
            ax.bar([i + shift for i in x], d[key][side], width=0.4, label=f"vs {side.upper()}")
        ax.set_yscale("log")
        ax.set_xticks(list(x), d["models"], rotation=20, fontsize=8)
        ax.set_ylabel(f"PIM-GPT {label} (x)")
        ax.legend()
