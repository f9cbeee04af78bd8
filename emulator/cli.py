"""`trimem run BUNDLE`: run one entry of a bundle on the emulator and report where time went."""
from __future__ import annotations

import json
import time
from pathlib import Path

from trimem.emulator import stats
from trimem.emulator.runner import run_bundle


def add_run_parser(subparsers) -> None:
    """Register `run BUNDLE [--entry NAME] [--timing-only] [--trace FILE] [--json]`."""
    p = subparsers.add_parser("run", help="run a compiled bundle on the emulator",
                              description="Run one entry of a bundle on the functional and "
                                          "cycle-accurate emulator.")
    p.add_argument("bundle", metavar="BUNDLE", help="bundle directory (from `trimem compile`)")
    p.add_argument("--entry", metavar="NAME", help="entry point to run (default: the first)")
    p.add_argument("--timing-only", action="store_true",
                   help="count cycles without computing values (no images, no outputs)")
    p.add_argument("--trace", metavar="FILE", type=Path,
                   help="write a Chrome/Perfetto trace JSON (open it in ui.perfetto.dev)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run_command)


def _table(report: dict) -> str:
    lines = [f"entry {report['entry']} on {report['config']}: {report['cycles']} cycles at "
             f"{report['clock_mhz']} MHz = {report['seconds'] * 1e6:.3f} us, "
             f"{report['instructions']} instructions, {report['energy_j'] * 1e6:.3f} uJ",
             f"{'engine':<6} {'cycles':>12} {'busy':>12} {'stall_mem':>12} {'stall_dep':>12} "
             f"{'util':>6} {'MACs':>14}"]
    for name, e in report["per_engine"].items():
        lines.append(f"{name:<6} {e['cycles']:>12} {e['busy']:>12} {e['stall_mem']:>12} "
                     f"{e['stall_dep']:>12} {e['utilization']:>6.1%} {e['macs']:>14}")
    lines.append("bytes: " + ", ".join(f"{k} {v}" for k, v in report["bytes"].items()))
    if "outputs_match" in report:
        lines.append("outputs match expected" if report["outputs_match"] else
                     "outputs DIFFER from expected: " + json.dumps(report["outputs"]))
    return "\n".join(lines)


def run_command(args) -> int:
    """Run the bundle; exit 0, or 1 when expected outputs were given and differ."""
    wall = time.perf_counter()
    result = run_bundle(args.bundle, args.entry, timing_only=args.timing_only)
    report = result.report
    report["wall_s"] = time.perf_counter() - wall
    if args.trace:
        args.trace.write_text(json.dumps(stats.chrome_trace(result.machine)))
    print(json.dumps(report, indent=2) if args.json else _table(report))
    return 0 if report.get("outputs_match", True) else 1
