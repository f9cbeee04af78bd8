"""Testbench of the sparse DSP chains (`trimem.hdl.dsp_chain.ChainArray`) fed step by step.

The stimulus is a set of GEMMs cut into steps exactly as the MXU engine cuts them (rows,
groups of C output channels, steps of L kept weights; `trimem.hdl.mxu_top`): every N:M
pattern of the config, 4- and 8-bit weights, one group per row and groups of 2 to 16, partial
steps (kept lengths not a multiple of L) and partial channel groups, saturating requant, and
garbage in every byte the array must ignore (window bytes past the row, lanes past `lanes`,
chains past `count`). The expected results are `trimem.numerics.linear`, the function the
emulator's MXU runs.

Phase 1 streams the steps back to back with the output always ready: each result must leave
exactly `trimem.timing.mxu_fill(fpga) - 2` cycles after its last step entered (the fill
counts the SRAM read before the array and the SRAM write after it). Phase 2 replays them with
random input bubbles and random output backpressure: the results must come out the same, in
order.
"""
from __future__ import annotations

import time

import cocotb
import numpy as np
from amaranth.hdl import Shape
from amaranth.lib import data

from trimem import isa, layout, numerics, timing
from trimem.sims import runner, testbench
from trimem.sims.tb_mxu import operands

SRAM_CYCLES = 2
"""Cycles of MXU_FILL outside the array: the SRAM read of a step and the write of a result."""
BUBBLE_P = 0.3
STALL_P = 0.4


def pack(shape, value) -> int:
    """`value` (ints, lists, dicts following an Amaranth layout) as the bits of `shape`."""
    if isinstance(shape, data.StructLayout):
        return sum(pack(f.shape, value[name]) << f.offset for name, f in shape)
    if isinstance(shape, data.ArrayLayout):
        width = Shape.cast(shape.elem_shape).width
        return sum(pack(shape.elem_shape, v) << (i * width) for i, v in enumerate(value))
    return int(value) & ((1 << Shape.cast(shape).width) - 1)


def gemm_steps(rng, fpga, nm: int, group_log2: int, a8, mant, exp, qw) -> tuple[list, list]:
    """(steps, results) of one GEMM: each step the `i_act` and `i_weights` field values, each
    result (the fx outputs of its real chains, the index of its last step in the list)."""
    from trimem.hdl.dsp_chain import group_window_bytes

    chains, length = fpga.dsp_chains, fpga.chain_length
    keep, block = fpga.nm_patterns[nm]
    n, k = qw.q.shape
    kept = k // block * keep
    window = length // keep * block
    sections = layout.weight_tile_sections(n, k, qw.bits, (keep, block), qw.group)
    tile = layout.pack_weight_tile(qw, (keep, block))
    rows = {name: tile[off:off + size].reshape(n, size // n)
            for name, (off, size) in sections.items()}
    index_bits = numerics.nm_index_bits(block)
    value_step, index_step = length * qw.bits // 8, length * index_bits // 8
    gwin = group_window_bytes(length, fpga.nm_patterns)
    out = numerics.linear(a8, mant, exp, qw.w_eff, qw.mult, qw.shift)

    def garbage(size: int) -> list:
        return rng.integers(0, 256, size).tolist()

    def row_bytes(part: str, ch: int, at: int, size: int) -> list:
        """`size` bytes of channel `ch`'s row of a tile section from `at`, garbage past it."""
        return (rows[part][ch, at:at + size].tolist() + garbage(size))[:size]

    def share(ch: int, s: int) -> dict:
        """Chain `ch`'s part of step `s`: garbage past the last channel (count masks it)."""
        if ch >= n:
            return {"values": int.from_bytes(bytes(garbage(length)), "little"),
                    "indices": int.from_bytes(bytes(garbage(index_step)), "little"),
                    "groups": garbage(gwin), "mult": int(qw.mult[0]), "shift": int(qw.shift[0])}
        group_at = s * window >> group_log2 if group_log2 else 0
        return {"values": int.from_bytes(bytes(row_bytes("values", ch, s * value_step, length)),
                                         "little"),
                "indices": int.from_bytes(bytes(row_bytes("indices", ch, s * index_step,
                                                          index_step)), "little"),
                "groups": row_bytes("groups", ch, group_at, gwin),
                "mult": int(qw.mult[ch]), "shift": int(qw.shift[ch])}

    steps, results = [], []
    total = -(-kept // length)
    for t in range(a8.shape[0]):
        padded = a8[t].astype(np.int64).tolist() + [int(x) - 128 for x in garbage(window)]
        for j in range(0, n, chains):
            for s in range(total):
                pos = s * window
                steps.append(({"window": padded[pos:pos + window], "nm": nm,
                               "bits4": int(qw.bits == 4), "group_log2": group_log2,
                               "goff": pos & ((1 << group_log2) - 1) if group_log2 else 0,
                               "lanes": min(kept - s * length, length),
                               "mant": int(mant[t]), "exp": int(exp[t]),
                               "first": int(s == 0), "last": int(s == total - 1)},
                              {"chain": [share(j + c, s) for c in range(chains)],
                               "count": min(n - j, chains)}))
            results.append((out[t, j:j + chains].tolist(), len(steps) - 1))
    return steps, results


def make_case(seed: int, cfg) -> dict:
    """GEMMs covering the config's patterns, widths and groups (the MXU testbench's shapes),
    as packed step payloads, with the expected results, their cycles, and phase 2's
    schedules."""
    from trimem.hdl.dsp_chain import act_layout, result_layout, weights_layout
    from trimem.sims.tb_mxu import shapes

    fpga = cfg.fpga
    rng = np.random.default_rng(seed)
    act = act_layout(fpga.chain_length, fpga.nm_patterns)
    weights = weights_layout(fpga.dsp_chains, fpga.chain_length, fpga.nm_patterns)
    beats, results = [], []
    for shape, extreme in shapes(rng, fpga):
        if extreme == "wrap":
            continue
        pattern = tuple(fpga.nm_patterns[shape["nm"]])
        a8, mant, exp, qw = operands(rng, shape, pattern, extreme)
        steps, done = gemm_steps(rng, fpga, shape["nm"], shape["group_log2"], a8, mant, exp,
                                 qw)
        results += [(y, last + len(beats)) for y, last in done]
        beats += [(hex(pack(act, a)), hex(pack(weights, w))) for a, w in steps]
    latency = timing.mxu_fill(fpga) - SRAM_CYCLES
    out = result_layout(fpga.dsp_chains)
    phase2 = 3 * len(beats) + 10 * len(results) + 10 * latency
    return {"beats": beats, "expected": [y for y, _ in results],
            "cycles": [last + latency for _, last in results],
            "y_offset": out["y"].offset, "count_offset": out["count"].offset,
            "valid": (rng.random(phase2) > BUBBLE_P).astype(int).tolist(),
            "ready": (rng.random(phase2) > STALL_P).astype(int).tolist(),
            "engine": isa.Engine.MXU.name}


def repeat(case: dict, times: int) -> dict:
    """`case` with its beats streamed `times` times back to back and no phase 2 (the
    benchmark's stimulus)."""
    beats = len(case["beats"])
    return {**case, "beats": case["beats"] * times, "expected": case["expected"] * times,
            "cycles": [c + r * beats for r in range(times) for c in case["cycles"]],
            "valid": [], "ready": []}


def decode(case: dict, payload: int) -> list:
    """The real outputs of an `o_result` payload, as signed ints."""
    count = payload >> case["count_offset"] & 0xFF
    y = payload >> case["y_offset"]
    return [int(np.int32(np.uint32(y >> (32 * c) & 0xFFFFFFFF))) for c in range(count)]


async def drive(dut, case: dict, valid: list | None, ready: list | None) -> tuple[list, int]:
    """Feed every beat (held while stalled) and collect (cycle, payload) of every result
    taken; `valid` and `ready` are per-cycle schedules (None: always). Returns the results and
    the cycles run."""
    from cocotb.triggers import ReadOnly, RisingEdge

    beats = [(int(a, 16), int(w, 16)) for a, w in case["beats"]]
    want = len(case["expected"])
    taken, at, cycle = [], 0, 0
    limit = len(beats) + 4 * want + 100 if valid is None else len(valid)
    while len(taken) < want and cycle < limit:
        live = at < len(beats) and (valid is None or valid[cycle])
        if at < len(beats):
            dut.i_act__payload.value, dut.i_weights__payload.value = beats[at]
        dut.i_act__valid.value = dut.i_weights__valid.value = int(live)
        take = 1 if ready is None else ready[cycle]
        dut.o_result__ready.value = take
        await ReadOnly()
        if live and int(dut.i_act__ready.value):
            at += 1
        if take and int(dut.o_result__valid.value):
            taken.append((cycle, int(dut.o_result__payload.value)))
        await RisingEdge(dut.clk)
        cycle += 1
    return taken, cycle


def check(case: dict, taken: list, *, cycles: bool) -> str:
    """The first difference of a phase's results from the case, or ""."""
    for i, (want, (cycle, payload)) in enumerate(zip(case["expected"], taken)):
        got = decode(case, payload)
        if got != want:
            return (f"result {i}: rtl {got} != numerics.linear {want} (ends at beat "
                    f"{case['cycles'][i]})")
        if cycles and cycle != case["cycles"][i]:
            return f"result {i} leaves at cycle {cycle}, expected {case['cycles'][i]}"
    if len(taken) != len(case["expected"]):
        return f"{len(taken)} results came out, expected {len(case['expected'])}"
    return ""


@cocotb.test()
async def chains_match_numerics(dut):
    """Back to back: every result bit-exact at its exact cycle; then with bubbles and
    backpressure: the same results in order."""
    case = runner.load_case()
    dut.i_act__valid.value = dut.i_weights__valid.value = 0
    await testbench.start(dut)
    start = time.perf_counter()
    taken, cycles = await drive(dut, case, None, None)
    wall = time.perf_counter() - start
    problem = check(case, taken, cycles=True)
    if not problem and case["valid"]:
        await testbench.reset(dut)
        taken, _ = await drive(dut, case, case["valid"], case["ready"])
        problem = check(case, taken, cycles=False)
        problem = problem and f"with bubbles and backpressure: {problem}"
    runner.write_report({"passed": not problem, "problem": problem, "cycles": cycles,
                         "results": len(case["expected"]), "cycles_per_s": cycles / wall})
    assert not problem, problem
