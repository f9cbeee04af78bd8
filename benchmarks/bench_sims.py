"""Cycles per second of the sparse DSP chains under three simulators, on one stimulus.

The component is `ChainArray` (trimem-small: 2 chains of 8 DSPs, dense and 2:4) and the
stimulus the DSP-chain testbench's (`trimem.sims.tb_dsp_chain`: GEMM steps of every N:M
pattern, weight width and group size), streamed back to back with the output always ready and
repeated to fill each run:

- cocotb on Verilator: the testbench's coroutine sets the payloads and samples the result in
  every cycle from Python (`trimem sim dsp_chain`, phase 1 only);
- the batched Verilator harness: the same per-cycle table replayed in one call
  (`trimem.sims.harness`), the results sampled in C++;
- Amaranth's Python simulator: a testbench sets the same payloads every cycle.

Every run checks its results against `trimem.numerics.linear`. Cycles per second are
simulated cycles over the wall time of the simulation loop alone (no build, no load).

    python benchmarks/bench_sims.py [--cocotb-cycles N] [--batched-cycles N] [--pysim-cycles N]
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np

from trimem.config import load_config
from trimem.sims import cosim, harness, runner, tb_dsp_chain
from trimem.sims.testbench import component

PRESET = "trimem-small"
BATCHED_TARGET = 1_000_000
"""Cycles per second the batched harness must reach on the DSP chains."""
COCOTB_FACTOR = 100
"""How many times faster than cocotb the batched harness must be."""


def device() -> str:
    """CPU model and core count: every speed printed here is of this machine."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            model = next(line.split(":", 1)[1].strip() for line in handle
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}"


def stimulus(cfg, cycles: int) -> dict:
    """The testbench's case repeated to at least `cycles` beats."""
    case = tb_dsp_chain.make_case(0, cfg)
    return tb_dsp_chain.repeat(case, -(-cycles // len(case["beats"])))


def check(case: dict, cycles: list, payloads: list, label: str) -> None:
    """Fail unless the results are the expected ones at the expected cycles."""
    taken = list(zip(cycles, payloads))
    problem = tb_dsp_chain.check({**case, "expected": case["expected"][:len(taken)]}, taken,
                                 cycles=True)
    if problem or not taken:
        raise SystemExit(f"{label}: {problem or 'no results'}")


def run_cocotb(cfg, cycles: int) -> tuple[int, float]:
    """(cycles, wall seconds) of the cocotb testbench's back-to-back phase."""
    case = stimulus(cfg, cycles)
    design = runner.design(component("dsp_chain").top, cfg)
    with tempfile.TemporaryDirectory() as workdir:
        report = runner.run_cocotb(design, "trimem.sims.tb_dsp_chain", case, workdir)
    return report["cycles"], report["cycles"] / report["cycles_per_s"]


def run_batched(cfg, cycles: int) -> tuple[int, float]:
    """(cycles, wall seconds) of one harness replay of the stimulus."""
    case = stimulus(cfg, cycles)
    h = cosim.open_top(component("dsp_chain").top, cfg)
    beats = case["beats"]
    width = {n: h.widths[h.port(n)] for n in ("i_act__payload", "i_weights__payload")}
    one = np.ones(len(beats), np.uint64)
    table = h.stimulus({
        "i_act__payload": harness.to_words([int(a, 16) for a, _ in beats],
                                           width["i_act__payload"]),
        "i_weights__payload": harness.to_words([int(w, 16) for _, w in beats],
                                               width["i_weights__payload"]),
        "i_act__valid": one, "i_weights__valid": one, "o_result__ready": one})
    h.reset(2)
    records, out = h.replay(table, ["o_result__payload"], when="o_result__valid",
                            max_records=len(case["expected"]))
    check(case, records.tolist(), out["o_result__payload"], "batched")
    h.close()
    return len(beats), h.last_call_s


def run_pysim(cfg, cycles: int) -> tuple[int, float]:
    """(cycles, wall seconds) of Amaranth's simulator driving the same beats."""
    from amaranth.sim import Simulator

    case = stimulus(cfg, cycles)
    beats = [(int(a, 16), int(w, 16)) for a, w in case["beats"][:cycles]]
    dut = runner.factory(component("dsp_chain").top)(cfg)
    got, wall = [], []

    async def bench(ctx):
        ctx.set(dut.o_result.ready, 1)
        ctx.set(dut.i_act.valid, 1)
        ctx.set(dut.i_weights.valid, 1)
        start = time.perf_counter()
        for cycle, (act, weights) in enumerate(beats):
            ctx.set(dut.i_act.payload.as_value(), act)
            ctx.set(dut.i_weights.payload.as_value(), weights)
            if ctx.get(dut.o_result.valid):
                got.append((cycle, ctx.get(dut.o_result.payload.as_value())))
            await ctx.tick()
        wall.append(time.perf_counter() - start)

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    check(case, [c for c, _ in got], [p for _, p in got], "pysim")
    return len(beats), wall[0]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cocotb-cycles", type=int, default=20_000)
    parser.add_argument("--batched-cycles", type=int, default=2_000_000)
    parser.add_argument("--pysim-cycles", type=int, default=2_000)
    args = parser.parse_args(argv)
    cfg = load_config(PRESET)
    rows = [("cocotb on Verilator", *run_cocotb(cfg, args.cocotb_cycles)),
            ("batched Verilator harness", *run_batched(cfg, args.batched_cycles)),
            ("Amaranth Python simulator", *run_pysim(cfg, args.pysim_cycles))]
    rates = {name: cycles / wall for name, cycles, wall in rows}
    base = rates["cocotb on Verilator"]
    print(f"device: {device()}")
    print(f"component: ChainArray of {PRESET} ({cfg.fpga.dsp_chains} chains x "
          f"{cfg.fpga.chain_length} DSPs), DSP-chain testbench stimulus")
    print(f"{'simulator':28} {'cycles':>10} {'wall s':>8} {'cycles/s':>12} {'vs cocotb':>10}")
    for name, cycles, wall in rows:
        print(f"{name:28} {cycles:>10} {wall:>8.3f} {rates[name]:>12,.0f} "
              f"{rates[name] / base:>9.1f}x")
    batched = rates["batched Verilator harness"]
    print(f"targets: batched >= {BATCHED_TARGET:,} cycles/s: "
          f"{'met' if batched >= BATCHED_TARGET else 'missed'}; batched >= {COCOTB_FACTOR}x "
          f"cocotb: {'met' if batched >= COCOTB_FACTOR * base else 'missed'}")


if __name__ == "__main__":
    main()
