"""`trimem compile`: a model to a bundle, from the command line."""
from __future__ import annotations

import argparse
import sys

from trimem.compiler import quantize, sparsify
from trimem.compiler.ir import CompileError
from trimem.compiler.pipeline import DEFAULT_BUCKETS, compile_model
from trimem.compiler.report import format_report


def _overrides(items) -> dict:
    """{"linear": "mxu"} from ["linear=mxu", ...]."""
    out = {}
    for item in items or ():
        kind, eq, engine = item.partition("=")
        if not (eq and kind and engine):
            raise CompileError(f"--place {item!r} is not KIND=ENGINE; write e.g. "
                               f"--place linear=mxu or --place attention=csd")
        out[kind.strip()] = engine.strip()
    return out


def _ids(text):
    """[int] from "1,2,3" (None stays None)."""
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items or not all(t.isdigit() for t in items):
        raise CompileError(f"--calib-ids {text!r} is not a comma-separated list of token ids; "
                           f"write e.g. --calib-ids 1,504,3458")
    return [int(t) for t in items]


def _alpha(text: str):
    """--smooth-alpha: a number, none, or auto (the default)."""
    if text.lower() in ("none", "auto"):
        return None if text.lower() == "none" else "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number in [0, 1] or none") from None


def run_compile(args) -> int:
    """Compile, write the bundle, print the report."""
    bundle = compile_model(
        args.model, args.hw, quant=args.quant, sparsity=args.sparsity,
        sparse_layers=args.sparse_layers, prune_metric=args.prune_metric,
        buckets=args.buckets, layers=args.layers, timing_only=args.timing_only,
        placement=_overrides(args.place), interleave=False if args.no_interleave else None,
        smooth_alpha=args.smooth_alpha, calib_text=args.calib_text,
        calib_ids=_ids(args.calib_ids), with_tests=not args.no_tests, out=args.out,
        force=args.force, progress=sys.stderr.isatty())
    print(format_report(bundle.report))
    images = sum(int(i.data.size) for i in bundle.images)
    print(f"\nwrote {args.out}: {len(bundle.entries)} entries, {len(bundle.images)} images "
          f"({images / 2**20:.2f} MiB){' (timing only: no images)' if not bundle.images else ''}")
    return 0


def add_compile_parser(subparsers) -> argparse.ArgumentParser:
    """Add `compile` to the `trimem` subcommands."""
    p = subparsers.add_parser(
        "compile", help="compile a model into a bundle for a hardware config",
        description="Lower a LLaMA-family model, quantize and sparsify it, place every op on "
                    "the MXU, PIM or CSD, and emit one entry per length bucket into a bundle.")
    p.add_argument("model", help="a known config name (llama2-7b, smollm2-135m, ...), a model "
                                 "directory or a .gguf file")
    p.add_argument("--hw", required=True, help="hardware preset name or YAML file")
    p.add_argument("--quant", default="w4a8kv4",
                   help="quantization, w{4|8}[g<group>]a8kv{4|8}[g<group>] (default w4a8kv4)")
    p.add_argument("--sparsity", default=None, metavar="N:M", help="N:M pruning, e.g. 2:4")
    p.add_argument("--sparse-layers", default="mlp", choices=sorted(sparsify.BLOCKS),
                   help="blocks --sparsity prunes (default mlp)")
    p.add_argument("--prune-metric", default=sparsify.METRICS[0], choices=sparsify.METRICS,
                   help=f"N:M pruning score (default {sparsify.METRICS[0]}: |W| times the input "
                        f"channel norm over the calibration prompt; magnitude: |W|)")
    p.add_argument("--smooth-alpha", type=_alpha, default="auto", metavar="A|none",
                   help=f"SmoothQuant migration strength in [0, 1], or none to turn it off "
                        f"(default {quantize.SMOOTH_ALPHA} when the model has weights)")
    p.add_argument("--calib-text", default=None, metavar="TEXT",
                   help="calibration prompt of Wanda pruning and SmoothQuant, in the model's "
                        "tokenizer (default: a built-in English paragraph)")
    p.add_argument("--calib-ids", default=None, metavar="ID,ID,...",
                   help="calibration prompt as token ids, instead of --calib-text")
    p.add_argument("--buckets", default=None, metavar="PHASE:ROWS@CTX,...",
                   help=f"length buckets, one entry each (default {DEFAULT_BUCKETS}, contexts "
                        f"clamped to the model's)")
    p.add_argument("--layers", type=int, default=None, metavar="N",
                   help="keep the first N decoder layers")
    p.add_argument("--timing-only", action="store_true",
                   help="shapes only: programs and sizes, no weights or images")
    p.add_argument("--place", action="append", metavar="KIND=ENGINE",
                   help="override placement, e.g. linear=mxu, attention=vpu (repeatable)")
    p.add_argument("--no-interleave", action="store_true",
                   help="no sub-batch interleaving of MXU and PIM in batched decode")
    p.add_argument("--no-tests", action="store_true",
                   help="leave out the reference's expected logits")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty directory that holds no bundle")
    p.add_argument("-o", "--out", required=True, metavar="OUT_DIR", help="bundle directory")
    p.set_defaults(func=run_compile)
    return p
