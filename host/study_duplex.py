"""Duplex (Yun et al., MICRO 2024): arithmetic intensity (Op/B) of the layers of batched decode
against batch size, and the engine each lands on.

Layers: a dense SiLU MLP (LLaMA2-7B), an MoE expert (Mixtral 8x7B: 8 experts, top-2), and
decode attention with GQA groups of 1 to 8 query heads per KV head (LLaMA2-7B shapes with
fewer KV heads). Op/B is the compiler's (`place.intensity`) for the placed graph, in the
hardware's formats, next to the fp16 figure (the number formats of Duplex's statements) from
the baseline model; the landing engine is the compiler's choice and, beside it, the engine
whose roofline gives the op the highest rate.

An expert is a dense MLP over the tokens routed to it: with B tokens each picking k of E
experts uniformly, E (1 - (1 - k/E)^B) experts are touched on average, each by B k / that many
tokens. Decode attention has the same Op/B at every batch size, since every sequence reads
its own KV cache.
"""
from __future__ import annotations

import math

from trimem.compiler import place
from trimem.compiler.models import MODELS
from trimem.config import load_config
from trimem.host import roofline
from trimem.host.studies import StudyResult, placed_graph

MIXTRAL = {**MODELS["llama2-7b"], "hidden_size": 4096, "intermediate_size": 14336,
           "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 1,
           "_name_or_path": "mixtral-8x7b-expert"}
"""One Mixtral 8x7B expert as a dense SiLU MLP (Jiang et al., arXiv:2401.04088, Table 1)."""
EXPERTS, TOP_K = 8, 2
"""Mixtral 8x7B routing: 8 experts per layer, 2 per token (arXiv:2401.04088)."""
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
GROUPS = (1, 2, 4, 8)


def tokens_per_expert(batch: int, experts: int = EXPERTS, top_k: int = TOP_K) -> float:
    """Average tokens each touched expert receives when `batch` tokens route uniformly."""
    touched = experts * (1 - (1 - top_k / experts) ** batch)
    return batch * top_k / touched


def gqa_config(group: int) -> dict:
    """One LLaMA2-7B layer with `group` query heads per KV head."""
    base = MODELS["llama2-7b"]
    heads = base["num_attention_heads"]
    return {**base, "num_key_value_heads": heads // group, "num_hidden_layers": 1,
            "_name_or_path": f"llama2-7b-gqa{group}"}


def measure(hw, model, batch, ctx, quant, name) -> dict:
    """Op/B (compiled formats and fp16), placed engine and best-roofline engine of the op
    whose name ends with `name`, in the model's decode graph at `batch` rows."""
    graph = placed_graph(hw, model, quant=quant, batch=batch, ctx=ctx)
    op = next(o for o in graph.ops if o.name.endswith(name))
    fp16_flops, fp16_bytes = roofline.host_op_work(op, "decode", roofline.FP16)
    roofs = roofline.engine_roofs(load_config(hw))
    ops, nbytes = roofline.op_work(graph, op)
    op_b = ops / nbytes
    able = [e for e in place.CHOICES[op.kind] if e in roofs]
    best = max(able, key=lambda e: roofs[e].attainable(op_b)) if able else "-"
    return {"op_b": op_b, "op_b_fp16": fp16_flops / fp16_bytes, "engine": op.engine,
            "best": best}


def run(hw="trimem-all", quant="w8a8kv8", ctx=4096, batches=BATCHES,
        groups=GROUPS) -> StudyResult:
    """Op/B and landing engine of the MLP, MoE expert and GQA attention over `batches`."""
    rows, series, ratios = [], {"mlp": [], "moe": []}, {}
    for batch in batches:
        expert_rows = math.ceil(tokens_per_expert(batch))
        for key, layer, m in (
                ("mlp", "dense MLP", measure(hw, "llama2-7b", batch, ctx, quant, "mlp.gate")),
                ("moe", f"MoE expert ({expert_rows} tok)",
                 measure(hw, MIXTRAL, expert_rows, ctx, quant, "mlp.gate"))):
            rows.append([layer, batch, m["op_b"], m["op_b_fp16"], m["engine"], m["best"]])
            series[key].append(m["op_b"])
            ratios[f"{key}_b{batch}_op_b"] = m["op_b"]
            ratios[f"{key}_b{batch}_op_b_fp16"] = m["op_b_fp16"]
    attention = {}
    for group in groups:
        m = attention[group] = measure(hw, gqa_config(group), 1, ctx, quant, "attn.attention")
        rows.append([f"attention GQA {group}", "any", m["op_b"], m["op_b_fp16"], m["engine"],
                     m["best"]])
        ratios[f"attn_gqa{group}_op_b"] = m["op_b"]
        ratios[f"attn_gqa{group}_op_b_fp16"] = m["op_b_fp16"]
    roofs = roofline.engine_roofs(load_config(hw))
    notes = [f"hardware {hw}, quantization {quant}, attention at context {ctx}",
             "Op/B: 2 Op per MAC over weight (or KV) plus activation bytes, from the compiler's "
             "placement pass; fp16 column: the same op with 2-byte weights, KV and "
             "activations",
             "engine: the compiler's placement; best: the engine among those that run the op "
             "whose roofline gives the highest rate at that Op/B"]
    data = {"batches": list(batches), "series": series,
            "attention": {str(g): m["op_b"] for g, m in attention.items()},
            "ridges": {e: r.ridge for e, r in roofs.items()}}
    return StudyResult("duplex", f"Duplex: Op/B per layer vs batch on {hw}",
                       ["layer", "batch", "Op/B", "Op/B fp16", "engine", "best roofline"],
                       rows, ratios, notes, data)


def plot(result: StudyResult, fig) -> None:
    """Op/B of MLP and MoE against batch, attention per GQA group, engine ridge points."""
    ax = fig.subplots(1, 1)
    d = result.data
    ax.plot(d["batches"], d["series"]["mlp"], marker="o", label="dense MLP")
    ax.plot(d["batches"], d["series"]["moe"], marker="s", label="MoE expert (8 x top-2)")
    for group, op_b in d["attention"].items():
        ax.axhline(op_b, ls=":", color="tab:purple")
        ax.text(d["batches"][0], op_b, f" attention GQA {group}", va="bottom", fontsize=7)
    for engine, ridge in d["ridges"].items():
        ax.axhline(ridge, ls="--", lw=0.8, color="grey")
        ax.text(d["batches"][-1], ridge, f"{engine} ridge ", ha="right", va="bottom",
                fontsize=7, color="grey")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("decode batch (tokens)")
    ax.set_ylabel("Op/B")
    ax.legend(loc="upper left")
