"""A cocotb testbench that replays a stimulus table cycle by cycle, as the batched harness's
`Harness.replay` does in C++: the same table, the same sampling, one Python step per cycle.

The case holds `inputs` (port name -> one value per cycle, hex), `outputs` (port names) and
`when` (a port, or None for every cycle). In each cycle the testbench sets every input, waits
for the values to settle, and when `when` is nonzero records the cycle and the outputs; the
report holds the records and the replay's speed (`cycles_per_s`, Python-driven cocotb on
Verilator). Checking the records is the caller's (`benchmarks/bench_sims.py`).
"""
from __future__ import annotations

import time

import cocotb

from trimem.sims import runner, testbench


@cocotb.test()
async def replay_table(dut):
    """Drive the table, record the sampled outputs."""
    from cocotb.triggers import ReadOnly, RisingEdge

    case = runner.load_case()
    inputs = [(getattr(dut, name), [int(v, 16) for v in values])
              for name, values in case["inputs"].items()]
    outputs = [getattr(dut, name) for name in case["outputs"]]
    when = getattr(dut, case["when"]) if case["when"] else None
    cycles = len(inputs[0][1]) if inputs else 0
    await testbench.start(dut)
    records = []
    start = time.perf_counter()
    for cycle in range(cycles):
        for port, values in inputs:
            port.value = values[cycle]
        await ReadOnly()
        if when is None or int(when.value):
            records.append([cycle] + [hex(int(port.value)) for port in outputs])
        await RisingEdge(dut.clk)
    wall = time.perf_counter() - start
    runner.write_report({"passed": True, "cycles": cycles, "records": records,
                         "cycles_per_s": cycles / wall if wall else 0.0})
