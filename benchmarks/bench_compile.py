"""Compile-time benchmark: SmolLM2-135M with weights, LLaMA2-7B timing-only.

Targets: SmolLM2-135M (W4A8KV4, 2:4 MLP, default buckets) under 30 s including the bundle
write; LLaMA2-7B timing-only (default buckets) under 10 s. Prints one row per case with the
wall and CPU seconds, entries, instructions and image bytes, and names the machine and its
load average (on a shared machine the CPU seconds are the steadier figure).

    python benchmarks/bench_compile.py [--hw trimem-all] [--only smollm2|llama2]
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

from trimem.compiler.pipeline import compile_model

CASES = {
    "smollm2": ("smollm2-135m", {"sparsity": "2:4"}, 30.0),
    "llama2": ("llama2-7b", {"timing_only": True}, 10.0),
}
"""name -> (model, compile_model options, target seconds)."""


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{platform.node()} ({cpu}, {os.cpu_count()} CPUs, load {load}, "
            f"Python {platform.python_version()})")


def bench(model: str, hw: str, options: dict) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        wall, cpu = time.perf_counter(), time.process_time()
        bundle = compile_model(model, hw, out=os.path.join(folder, "bundle"), **options)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"wall": wall, "cpu": cpu, "entries": len(bundle.entries),
            "instructions": sum(e["instructions_total"]
                                for e in bundle.report["entries"].values()),
            "image_mib": sum(int(i.data.size) for i in bundle.images) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hw", default="trimem-all")
    parser.add_argument("--only", choices=sorted(CASES))
    args = parser.parse_args()
    print(f"machine: {_machine()}; hardware preset: {args.hw}")
    print(f"{'case':<14} {'wall s':>8} {'cpu s':>8} {'target s':>9} {'entries':>8} "
          f"{'instrs':>9} {'images MiB':>11}")
    for name, (model, options, target) in CASES.items():
        if args.only and name != args.only:
            continue
        r = bench(model, args.hw, options)
        flag = "" if r["wall"] <= target else "  (over target)"
        print(f"{model:<14} {r['wall']:>8.2f} {r['cpu']:>8.2f} {target:>9.0f} {r['entries']:>8} "
              f"{r['instructions']:>9} {r['image_mib']:>11.2f}{flag}")


if __name__ == "__main__":
    main()
