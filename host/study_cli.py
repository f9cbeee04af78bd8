"""`trimem study`, `trimem roofline` and `trimem sweep`: the scenario studies, the per-op
roofline plot of a compiled model, and design-space sweeps.

Each command prints a table, writes its files to `-o DIR` and returns the exit code.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from trimem.host import roofline, studies, sweep


def add_study_parsers(subparsers) -> None:
    """Register `study NAME`, `roofline --hw PRESET MODEL` and `sweep SPEC.yaml`."""
    p = subparsers.add_parser("study", help="reproduce a seed paper's mechanism",
                              description="Run one scenario study: print its table and write "
                                          "NAME.json and NAME.png.")
    p.add_argument("name", metavar="NAME", choices=list(studies.STUDIES),
                   help=f"one of {', '.join(studies.STUDIES)}")
    p.add_argument("--json", action="store_true",
                   help="print the result as one JSON object instead of the table")
    p.add_argument("-o", "--out", type=Path, metavar="DIR",
                   help="output directory (default: ./study-NAME/)")
    p.set_defaults(func=study_command)

    p = subparsers.add_parser("roofline", help="plot every op of a model on each engine's roofline",
                              description="Place every op of MODEL's decode step for a preset "
                                          "(the compiler's passes up to placement) and plot "
                                          "each on the roofline of every engine (PNG + JSON).")
    p.add_argument("model", metavar="MODEL", help="a known config name such as llama2-7b")
    p.add_argument("--hw", required=True, metavar="PRESET", help="hardware preset or YAML file")
    p.add_argument("--quant", default="w4a8kv4", help="quantization, e.g. w4a8kv4 (default)")
    p.add_argument("--sparsity", default=None, help="N:M pattern such as 2:4 (default dense)")
    p.add_argument("--batch", type=int, default=1, help="decode batch (default 1)")
    p.add_argument("--ctx", type=int, default=1024, help="context length (default 1024)")
    p.add_argument("-o", "--out", type=Path, metavar="DIR",
                   help="output directory (default: ./roofline-MODEL/)")
    p.set_defaults(func=roofline_command)

    p = subparsers.add_parser("sweep", help="design-space sweep over hardware x models x quant",
                              description="Run a grid or random sweep (timing-only emulation) "
                                          "in a local process pool or on Ray; results to "
                                          "CSV/Parquet and a Pareto plot.")
    p.add_argument("spec", metavar="SPEC.yaml", type=Path, help="sweep spec (examples/sweep.yaml)")
    p.add_argument("--ray", metavar="ADDRESS|local",
                   help="run on Ray: 'local' starts one here, else a cluster address")
    p.add_argument("--workers", type=int, default=1,
                   help="local processes (or Ray CPUs with --ray local); default 1")
    p.add_argument("--retry-errors", action="store_true",
                   help="run again the points that failed last time")
    p.add_argument("-o", "--out", type=Path, metavar="DIR",
                   help="output directory (default: ./sweep-SPEC/)")
    p.set_defaults(func=sweep_command)


def study_command(args) -> int:
    """Run the study, write its files, print its table (or its JSON)."""
    out = args.out or Path(f"study-{args.name}")
    result = studies.run_study(args.name, out)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(result.table())
        print("\n".join(["", "ratios:", *(f"  {k} = {v:.4g}" for k, v in result.ratios.items()),
                         "", *(f"note: {n}" for n in result.notes),
                         f"wrote {out / (args.name + '.json')} and {out / (args.name + '.png')}"]))
    return 0


def roofline_command(args) -> int:
    """Place the model, write roofline.json and roofline.png, print a summary."""
    out = args.out or Path(f"roofline-{args.model}")
    report = roofline.roofline_report(args.hw, args.model, quant=args.quant,
                                      sparsity=args.sparsity, batch=args.batch, ctx=args.ctx)
    json_path, png_path = roofline.write_roofline(report, out)
    print(roofline.summary_table(report))
    print(f"wrote {json_path} and {png_path}")
    return 0


def sweep_command(args) -> int:
    """Run the sweep's unfinished points; exit 1 when any point failed."""
    if args.workers < 1:
        raise ValueError(f"--workers {args.workers!r} must be at least 1")
    spec = sweep.load_spec(args.spec)
    out = args.out or Path(f"sweep-{args.spec.stem}")
    rows = sweep.run_sweep(spec, out, ray=args.ray, workers=args.workers,
                           retry_errors=args.retry_errors,
                           progress=lambda line: print(line, file=sys.stderr))
    print(sweep.summary_table(rows))
    print(f"wrote {out / sweep.RESULTS} and {out / 'pareto.png'}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1
