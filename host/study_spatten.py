"""SpAtten (Wang, Zhang, Han, HPCA 2021): DRAM bytes of decode attention with cascade token
and head pruning, local value pruning and progressive quantization, against dense attention.

Every layer's attention is one VPU.ATTN over the HBM KV cache, run on the emulator, which
counts the bytes it streams. The mechanisms set that instruction's shape:
- cascade token pruning: a token pruned at one layer stays pruned in every later one, so the
  kept context shrinks geometrically from the whole context at layer 0 to `token_keep` of it
  at the last layer;
- cascade head pruning: likewise for heads, down to `head_keep`;
- local value pruning: V rows are read only for the top `v_keep` of the kept tokens (the
  emulator's top-k V skipping);
- progressive quantization: K and V are read as their 4-bit MSB half (a KV4 read), and the
  LSB half (another such read) for the `refetch` share of queries whose softmax is not
  confident.
The dense baseline reads every token of every head at 8 bits.
"""
from __future__ import annotations

import functools
import math

from trimem.host.studies import StudyResult, attention_run, model_graph

FULL_BITS, MSB_BITS = 8, 4
HEADLINE = {"token_keep": 0.25, "head_keep": 0.75, "v_keep": 0.5, "refetch": 0.1}
"""The sweep point the headline ratio is read at (a setting of this study, see docs)."""
ABLATION = (
    ("dense KV8", dict(token_keep=1.0, head_keep=1.0, v_keep=1.0, progressive=False)),
    ("progressive quantization", dict(token_keep=1.0, head_keep=1.0, v_keep=1.0)),
    ("cascade token pruning", dict(head_keep=1.0, v_keep=1.0, progressive=False)),
    ("cascade head pruning", dict(token_keep=1.0, v_keep=1.0, progressive=False)),
    ("local value pruning", dict(token_keep=1.0, head_keep=1.0, progressive=False)),
    ("all of SpAtten", {}),
)
TOKEN_KEEPS = (1.0, 0.5, 0.25, 0.1)
HEAD_KEEPS = (1.0, 0.75, 0.5)


@functools.lru_cache(maxsize=4096)
def _bytes(hw, heads, head_dim, ctx, topk, bits) -> int:
    report = attention_run(hw, "VPU", q_heads=heads, kv_heads=heads, head_dim=head_dim,
                           ctx=ctx, topk=topk, kv_bits=bits)
    return report["bytes"]["HBM"]


def cascade(keep: float, total: int, layer: int, layers: int) -> int:
    """Survivors at `layer` of `total` when a constant share is pruned per layer, down to
    `keep` of them at the last layer (at least one survives)."""
    share = keep ** (layer / (layers - 1)) if layers > 1 else keep
    return max(1, math.ceil(total * share))


def attention_bytes(hw, spec, ctx, *, token_keep, head_keep, v_keep, refetch,
                    progressive=True) -> int:
    """HBM bytes of one decode token's attention over all layers."""
    total = 0
    for layer in range(spec.layers):
        kept = cascade(token_keep, ctx, layer, spec.layers)
        heads = cascade(head_keep, spec.heads, layer, spec.layers)
        topk = 0 if v_keep >= 1 else max(1, math.ceil(v_keep * kept))
        bits = MSB_BITS if progressive else FULL_BITS
        read = _bytes(hw, heads, spec.head_dim, kept, topk, bits)
        total += read + (refetch * read if progressive else 0)
    return total


def run(model="llama2-7b", ctx=1024, hw="flightllm-u280", token_keeps=TOKEN_KEEPS,
        head_keeps=HEAD_KEEPS, headline=None) -> StudyResult:
    """Attention bytes per token for the ablation rows and a token x head keep sweep."""
    spec = model_graph(model, ctx).spec
    point = dict(HEADLINE, **(headline or {}))
    dense = attention_bytes(hw, spec, ctx, token_keep=1.0, head_keep=1.0, v_keep=1.0,
                            refetch=0.0, progressive=False)
    rows = []
    for label, fixed in ABLATION:
        setting = dict(point, **fixed)
        nbytes = attention_bytes(hw, spec, ctx, **setting)
        rows.append([label, setting["token_keep"], setting["head_keep"], setting["v_keep"],
                     "on" if setting.get("progressive", True) else "off", nbytes / 1e6,
                     dense / nbytes])
    sweep = {f"{h}": [dense / attention_bytes(hw, spec, ctx, **dict(point, token_keep=t,
                                                                    head_keep=h))
                      for t in token_keeps] for h in head_keeps}
    ratios = {"dram_access_reduction": rows[-1][-1]}
    for label, row in zip(("progressive_quant", "token_pruning", "head_pruning",
                           "value_pruning"), rows[1:5]):
        ratios[f"{label}_reduction"] = row[-1]
    notes = [f"{model} ({spec.layers} layers, {spec.heads} heads), decode at context {ctx}; "
             f"each layer's attention run on the emulator (VPU.ATTN over HBM on {hw})",
             f"headline point: token keep {point['token_keep']} and head keep "
             f"{point['head_keep']} at the last layer, V read for {point['v_keep']} of kept "
             f"tokens, LSBs refetched for {point['refetch']} of queries",
             "dense baseline: every token and head at KV8"]
    return StudyResult("spatten", f"SpAtten: attention DRAM bytes per token, {model} @ {ctx}",
                       ["mechanism", "token keep", "head keep", "V keep", "progressive",
                        "MB/token", "reduction"], rows, ratios, notes,
                       {"token_keeps": list(token_keeps), "sweep": sweep})


def plot(result: StudyResult, fig) -> None:
    """Reduction per mechanism, and against the token keep ratio per head keep ratio."""
    ax1, ax2 = fig.subplots(1, 2)
    ax1.barh([r[0] for r in result.rows], [r[-1] for r in result.rows], color="tab:green")
    ax1.set_xlabel("DRAM access reduction vs dense (x)")
    ax1.invert_yaxis()
    for head, series in result.data["sweep"].items():
        ax2.plot(result.data["token_keeps"], series, marker="o", label=f"head keep {head}")
    ax2.set_xscale("log")
    ax2.invert_xaxis()
    ax2.set_xlabel("tokens kept at the last layer")
    ax2.set_ylabel("reduction (x)")
    ax2.set_title("all mechanisms on")
    ax2.legend()
