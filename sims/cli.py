"""`trimem sim COMPONENT` (one cocotb testbench) and `trimem cosim BUNDLE` (a whole entry on
the RTL beside the emulator)."""
from __future__ import annotations

import argparse
import json
import sys

from trimem.sims.runner import SimError


def run_sim(args) -> int:
    """Run one testbench; 0 when the RTL matches the emulator, 1 with the first difference."""
    from trimem.sims import testbench

    testbench.component(args.component)
    try:
        report = testbench.run_component(args.component, seed=args.seed, cfg=args.hw,
                                         waves=args.waves, workdir=args.workdir)
    except SimError as exc:
        print(f"trimem sim {args.component}: FAILED\n{exc}", file=sys.stderr)
        return 1
    cycles = report.get("cycles")
    line = f"{args.component} (seed {args.seed}): passed, bit-exact"
    if "emulator_cycles" in report:
        line += f", {cycles} cycles as the emulator"
    elif cycles is not None:
        line += f", every result at its cycle ({cycles} cycles)"
    print(line)
    if args.waves:
        print(f"waveform: {report['waves']}")
    return 0


def run_cosim(args) -> int:
    """Co-simulate one entry; 0 when outputs and cycles equal the emulator's."""
    from trimem.sims.cosim import cosim

    try:
        result = cosim(args.bundle, args.entry)
    except SimError as exc:
        print(f"trimem cosim: {exc}", file=sys.stderr)
        return 1
    report = result.report()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        same = "equal" if result.cycle_exact else "DIFFERENT"
        print(f"entry {result.entry} on the {result.top} top")
        print(f"outputs bit-exact with the emulator: {'yes' if result.bit_exact else 'NO'}")
        print(f"cycles: RTL {result.rtl_cycles}, emulator {result.emulator_cycles} ({same})")
        print(f"wall time: {result.wall_s:.3f} s, {result.cycles_per_s:,.0f} cycles/s")
        if result.divergence is not None:
            print(result.divergence.text())
    return 0 if result.bit_exact and result.cycle_exact else 1


def add_sim_parsers(subparsers) -> None:
    """Add `trimem sim` and `trimem cosim`."""
    from trimem.sims.testbench import COMPONENTS

    sim = subparsers.add_parser(
        "sim", help="run the cocotb testbench of one RTL component on Verilator",
        description="Build the component with Verilator (cached), drive it with randomized "
                    "and edge-case stimulus from the seed, and check every output bit for bit "
                    "and every cycle against the emulator's model of the block.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="components:\n" + "\n".join(f"  {c.name:10} {c.doc}"
                                           for c in COMPONENTS.values()))
    sim.add_argument("component", metavar="COMPONENT", help=", ".join(COMPONENTS))
    sim.add_argument("--seed", type=int, default=0, help="stimulus seed (default 0)")
    sim.add_argument("--waves", action="store_true",
                     help="write a VCD waveform (dump.vcd in the run's directory)")
    sim.add_argument("--hw", default="trimem-small", help="hardware preset or YAML")
    sim.add_argument("--workdir", default=None,
                     help="where the run's files go (default: under the build cache)")
    sim.set_defaults(func=run_sim)

    cos = subparsers.add_parser(
        "cosim", help="run a bundle entry on the Verilated RTL beside the emulator",
        description="Load the bundle's .hex programs and images into the Verilated top, run "
                    "to HALT in one batched call, and compare outputs bit for bit and cycles "
                    "exactly with the emulator; on divergence, show the first differing "
                    "instruction or tensor.")
    cos.add_argument("bundle", metavar="BUNDLE", help="bundle directory")
    cos.add_argument("--entry", default=None, help="entry to run (default: the first)")
    cos.add_argument("--json", action="store_true",
                     help="print the report as JSON (keys bit_exact, cycle_exact, rtl_cycles, "
                          "emulator_cycles, wall_s, cycles_per_s, divergence)")
    cos.set_defaults(func=run_cosim)
