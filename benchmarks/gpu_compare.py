"""Trimem against the float model on an NVIDIA GPU: the measured table of docs/gpu.md.

Run on the GPU machine with a safetensors copy of the model, which plain `transformers`
loads without the GGUF reader. Make one on this machine first:

    trimem compare smollm2-135m --export-hf smollm2-hf
    python benchmarks/gpu_compare.py smollm2-hf -o gpu-results [--dtypes float32,bfloat16]

For each dtype the float model runs on the GPU (measured time to first token and decode
tokens/s, batch 1) and the quantized model on the torch integer reference, on the GPU too,
timed in simulated hardware time by the emulator. Writes one report directory per dtype
(report.md, report.json, plots) and `gpu_table.json`, and prints the Markdown table rows.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from trimem.host.compare import compare
from trimem.host.session import Session, load_tokenizer

COLUMNS = ("GPU", "dtype", "tokens/s (measured)", "TTFT ms (measured)",
           "top-1 agreement", "perplexity float / Trimem", "Trimem tokens/s (simulated)",
           "Trimem mJ/token (simulated)")


def row(report: dict) -> dict:
    """The docs/gpu.md table row of one report."""
    f, s, ppl = report["speed"]["float"], report["speed"]["trimem"], report["perplexity"]
    return {"GPU": f["device_name"], "dtype": f["dtype"],
            "tokens/s (measured)": round(f["tokens_per_s"], 1),
            "TTFT ms (measured)": round(f["ttft_s"] * 1e3, 2),
            "top-1 agreement": round(report["top1_agreement"], 4),
            "perplexity float / Trimem": f"{ppl['float']:.3f} / {ppl['trimem']:.3f}",
            "Trimem tokens/s (simulated)": round(s.get("tokens_per_s") or 0.0, 1),
            "Trimem mJ/token (simulated)": round((s.get("energy_per_token_j") or 0.0) * 1e3,
                                                 4)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="model directory (config.json + safetensors + tokenizer)")
    parser.add_argument("-o", "--out", default="gpu-results", help="output directory")
    parser.add_argument("--hw", default="trimem-all")
    parser.add_argument("--quant", default="w4a8kv4")
    parser.add_argument("--sparsity", default="2:4")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--buckets", default="prefill:64@256,decode:1@256")
    args = parser.parse_args(argv)
    out = Path(args.out)
    tok = load_tokenizer(args.model)
    session = Session(args.model, args.hw, args.quant, args.sparsity, backend="torch",
                      buckets=args.buckets, device=args.device, tokenizer=tok, progress=True)
    rows = []
    for dtype in args.dtypes.split(","):
        report = compare(args.model, device=args.device, dtype=dtype, new_tokens=args.tokens,
                         session=session, tokenizer=tok, out=out / dtype, progress=True)
        rows.append(row(report))
    (out / "gpu_table.json").write_text(json.dumps(rows, indent=2))
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in COLUMNS) + " |")


if __name__ == "__main__":
    main()
