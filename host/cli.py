"""The `trimem` command line: one subcommand per job, each defined beside the code it runs.

Every part registers its own subcommands through an `add_*_parser(subparsers)` function, and
this module only wires them together. Errors the user can fix (a bad config key, a malformed
instruction, a missing file) are `ValueError`s or `OSError`s carrying a message that names the
problem and the fix; they are printed without a traceback (set TRIMEM_DEBUG=1 to see one).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

REGISTRARS = (
    ("trimem.hwcli", "add_hw_parser"),
    ("trimem.isacli", "add_isa_parsers"),
    ("trimem.compiler.cli", "add_compile_parser"),
    ("trimem.emulator.cli", "add_run_parser"),
    ("trimem.hdl.cli", "add_hdl_parser"),
    ("trimem.sims.cli", "add_sim_parsers"),
    ("trimem.host.host_cli", "add_host_parsers"),
    ("trimem.host.study_cli", "add_study_parsers"),
)
"""(module, function) pairs that add subcommands; listed in the order `--help` shows them."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trimem",
        description="Co-design and emulation of LLM inference on FPGA DSP chains, "
                    "DRAM PIM banks and in-storage attention.")
    from trimem import __version__
    parser.add_argument("--version", action="version", version=f"trimem {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module, function in REGISTRARS:
        getattr(importlib.import_module(module), function)(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("trimem: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as exc:
        if os.environ.get("TRIMEM_DEBUG"):
            raise
        print(f"trimem {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
