"""Cycles per second of the DSP chains under three simulators, on one stimulus each.

Two components of trimem-small, each fed a table of per-cycle input values built from the
GEMMs of the DSP-chain testbench (`trimem.sims.tb_dsp_chain`: every N:M pattern, weight width
and group size), streamed back to back with the output always ready:

- `DspChain` (`dsp_chain`): one chain of L DSP stages; each step is L (activation, effective
  weight) pairs of a kept dot product, each result its int32 sum (`numerics.accumulate`);
- `ChainArray` (`chain_array`): C chains with the N:M select, group multipliers and requant;
  each step a packed activation window and weight shares, each result `numerics.linear`.

Every table runs on cocotb on Verilator (`trimem.sims.tb_replay`: Python sets the inputs and
samples the outputs every cycle), on the batched Verilator harness (`Harness.replay`: the same
table in one call, sampled in C++) and on Amaranth's Python simulator (a testbench setting the
same inputs every cycle). Every run's results are checked, values and cycles. Cycles per second
are simulated cycles over the wall time of the simulation loop alone (no build, no load).

    python benchmarks/bench_sims.py [--cocotb-cycles N] [--batched-cycles N] [--pysim-cycles N]
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np

from trimem import numerics
from trimem.config import load_config
from trimem.sims import cosim, harness, runner, tb_dsp_chain
from trimem.sims.tb_mxu import operands, shapes

PRESET = "trimem-small"
BATCHED_TARGET = 1_000_000
"""Cycles per second the batched harness must reach on the DSP chain."""
COCOTB_FACTOR = 100
"""How many times faster than cocotb the batched harness must be."""
SIMULATORS = ("cocotb on Verilator", "batched Verilator harness", "Amaranth Python simulator")


def load() -> str:
    """The 1, 5 and 15 minute load averages: other work on the machine slows every simulator."""
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def device() -> str:
    """CPU model and core count: every speed printed here is of this machine."""
    return f"{runner.cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}"


# ---------------------------------------------------------------------------------------------
# Stimulus tables: port -> value per cycle, the sampled output, and the expected results
# ---------------------------------------------------------------------------------------------

def chain_steps(cfg, seed: int = 0) -> tuple[list, list]:
    """(steps, dots) of one chain over the testbench's GEMMs: every kept dot product of every
    row and output channel, L (a, w) pairs a step (zeros past the row), and its int32 sum."""
    from trimem.hdl.dsp_chain import step_layout

    length = cfg.fpga.chain_length
    rng = np.random.default_rng(seed)
    lay = step_layout(length)
    steps, dots = [], []
    for shape, extreme in shapes(rng, cfg.fpga):
        if extreme == "wrap":
            continue
        keep, block = cfg.fpga.nm_patterns[shape["nm"]]
        a8, _, _, qw = operands(rng, shape, (keep, block), extreme)
        _, idx = numerics.nm_pack(qw.q, keep, block)
        kept = (np.arange(idx.shape[1]) // keep * block + idx).astype(np.int64)
        w_eff = qw.w_eff.astype(np.int64)
        for row in a8.astype(np.int64):
            for ch in range(qw.q.shape[0]):
                a, w = row[kept[ch]], w_eff[ch, kept[ch]]
                total = -(-a.size // length)
                for s in range(total):
                    pa = np.zeros(length, np.int64)
                    pw = np.zeros(length, np.int64)
                    part = slice(s * length, (s + 1) * length)
                    pa[:a[part].size], pw[:w[part].size] = a[part], w[part]
                    steps.append(tb_dsp_chain.pack(lay, {"a": pa.tolist(), "w": pw.tolist(),
                                                         "first": s == 0,
                                                         "last": s == total - 1}))
                dots.append((int(numerics.wrap32(np.int64(np.dot(a, w)))), len(steps) - 1))
    return steps, dots


def dsp_chain_table(cfg, cycles: int) -> dict:
    """`chain_steps` repeated to at least `cycles` steps; each dot leaves L cycles after its
    last step (`DspChain`)."""
    steps, dots = chain_steps(cfg)
    times = -(-cycles // len(steps))
    count, latency = len(steps) * times, cfg.fpga.chain_length
    return {"inputs": {"i_step__payload": steps * times, "i_step__valid": [1] * count,
                       "o_dot__ready": [1] * count},
            "output": "o_dot__payload", "when": "o_dot__valid",
            "expected": [(y, last + r * len(steps) + latency) for r in range(times)
                         for y, last in dots],
            "decode": lambda v: int(np.int32(np.uint32(v)))}


def chain_array_table(cfg, cycles: int) -> dict:
    """The DSP-chain testbench's back-to-back phase repeated to at least `cycles` beats."""
    case = tb_dsp_chain.make_case(0, cfg)
    case = tb_dsp_chain.repeat(case, -(-cycles // len(case["beats"])))
    beats = len(case["beats"])
    return {"inputs": {"i_act__payload": [int(a, 16) for a, _ in case["beats"]],
                       "i_weights__payload": [int(w, 16) for _, w in case["beats"]],
                       "i_act__valid": [1] * beats, "i_weights__valid": [1] * beats,
                       "o_result__ready": [1] * beats},
            "output": "o_result__payload", "when": "o_result__valid",
            "expected": list(zip(case["expected"], case["cycles"])),
            "decode": lambda v: tb_dsp_chain.decode(case, int(v))}


COMPONENTS = {"dsp_chain": dsp_chain_table, "chain_array": chain_array_table}
"""Benchmarked components of `trimem.hdl.build.COMPONENTS` and their stimulus tables."""


def check(table: dict, records: list, label: str) -> None:
    """Fail unless (cycle, raw output) `records` are the expected results at their cycles."""
    want = table["expected"][:len(records)]
    got = [(table["decode"](v), c) for c, v in records]
    if not records or got != want:
        bad = next((i for i, (g, w) in enumerate(zip(got, want)) if g != w), len(got))
        raise SystemExit(f"{label}: result {bad} is {got[bad:bad + 1]}, expected "
                         f"{want[bad:bad + 1]}")


# ---------------------------------------------------------------------------------------------
# The three simulators
# ---------------------------------------------------------------------------------------------

def run_cocotb(cfg, name: str, table: dict) -> float:
    """Wall seconds of the cocotb replay of `table`."""
    case = {"inputs": {n: [hex(v) for v in vs] for n, vs in table["inputs"].items()},
            "outputs": [table["output"]], "when": table["when"]}
    with tempfile.TemporaryDirectory() as workdir:
        report = runner.run_cocotb(runner.design(name, cfg), "trimem.sims.tb_replay", case,
                                   workdir)
    check(table, [(r[0], int(r[1], 16)) for r in report["records"]], f"cocotb {name}")
    return report["cycles"] / report["cycles_per_s"]


def run_batched(cfg, name: str, table: dict) -> float:
    """Wall seconds of the harness replay of `table` (the C++ call alone)."""
    h = cosim.open_top(name, cfg)
    columns = {}
    for port, values in table["inputs"].items():
        unique, where = np.unique(np.array(values, dtype=object), return_inverse=True)
        columns[port] = harness.to_words(list(unique), h.widths[h.port(port)])[where]
    h.reset(2)
    records, out = h.replay(h.stimulus(columns), [table["output"]], when=table["when"],
                            max_records=len(table["expected"]))
    h.close()
    check(table, list(zip(records.tolist(), out[table["output"]])), f"batched {name}")
    return h.last_call_s


def run_pysim(cfg, name: str, table: dict) -> float:
    """Wall seconds of Amaranth's simulator driving `table`."""
    from amaranth.hdl import Value
    from amaranth.sim import Simulator

    dut = runner.factory(name)(cfg)
    ports = {"__".join(map(str, path)): Value.cast(value)
             for path, _, value in dut.signature.flatten(dut)}
    inputs = [(ports[n], vs) for n, vs in table["inputs"].items()]
    output, when = ports[table["output"]], ports[table["when"]]
    cycles = len(inputs[0][1])
    records, wall = [], []

    async def bench(ctx):
        start = time.perf_counter()
        for cycle in range(cycles):
            for port, values in inputs:
                ctx.set(port, values[cycle])
            if ctx.get(when):
                records.append((cycle, ctx.get(output) & ((1 << len(output)) - 1)))
            await ctx.tick()
        wall.append(time.perf_counter() - start)

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    check(table, records, f"pysim {name}")
    return wall[0]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cocotb-cycles", type=int, default=20_000)
    parser.add_argument("--batched-cycles", type=int, default=2_000_000)
    parser.add_argument("--pysim-cycles", type=int, default=2_000)
    args = parser.parse_args(argv)
    cfg = load_config(PRESET)
    print(f"device: {device()}; load average {load()}")
    print(f"preset: {PRESET} ({cfg.fpga.dsp_chains} chains x {cfg.fpga.chain_length} DSPs), "
          f"DSP-chain testbench GEMMs, back to back")
    print(f"{'component':12} {'simulator':28} {'cycles':>10} {'wall s':>8} {'cycles/s':>12} "
          f"{'vs cocotb':>10}")
    for name, build_table in COMPONENTS.items():
        rates = {}
        for label, run, cycles in zip(SIMULATORS, (run_cocotb, run_batched, run_pysim),
                                      (args.cocotb_cycles, args.batched_cycles,
                                       args.pysim_cycles)):
            table = build_table(cfg, cycles)
            table["inputs"] = {n: vs[:cycles] for n, vs in table["inputs"].items()}
            wall = run(cfg, name, table)
            rates[label] = cycles / wall
            print(f"{name:12} {label:28} {cycles:>10} {wall:>8.3f} {rates[label]:>12,.0f} "
                  f"{rates[label] / rates[SIMULATORS[0]]:>9.1f}x")
        batched, base = rates[SIMULATORS[1]], rates[SIMULATORS[0]]
        print(f"{name:12} targets: batched >= {BATCHED_TARGET:,} cycles/s "
              f"{'met' if batched >= BATCHED_TARGET else 'missed'}, >= {COCOTB_FACTOR}x cocotb "
              f"{'met' if batched >= COCOTB_FACTOR * base else 'missed'}")
    print(f"load average at the end: {load()}")


if __name__ == "__main__":
    main()
