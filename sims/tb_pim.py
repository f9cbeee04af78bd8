"""Testbench of the PIM top: PIM.GEMV streams in the DRAM banks, against the emulator.

A case is a stream of GEMVs over one global-buffer image (every GEMV reads its vectors from the
same bytes, with its own k and m) and weights in PIMDRAM at their own rows, each writing its
own slice of the result buffer: 4- and 8-bit weights, one group per row and groups of 8 to 32,
an odd n (banks with a shorter tile), several vectors per GEMV, tiles of one row (row hits
from vector to vector) and of several (row misses), a saturating requant, and a stream long
enough that refreshes fall due inside GEMVs and between them. Shapes are those the RTL
computes (`trimem.hdl.pim.PimChannel`: dense, groups of a multiple of `mac_lanes`, whole
bursts per tile row). Every result is compared bit for bit and every issue cycle exactly.

The testbench loads the program and the banks behind their ports (the front end's `imem` and
each bank's `array`) and serves the global-buffer read ports (data a cycle after the address)
and the result write ports from Python memories.
"""
from __future__ import annotations

import cocotb
import numpy as np

from trimem import isa, layout, numerics
from trimem.numerics import GROUP_MAX, REQUANT_SHIFT_MIN, SCALE_MANT_BITS
from trimem.sims import runner, testbench
from trimem.sims.bundles import activations, pim_tiles, quant_weight
from trimem.sims.diff import Region

GEMVS = ((1, 4, 192, 8, 4), (2, 2, 96, 8, 0), (1, 3, 128, 4, 5), (1, 2, 64, 4, 3),
         (1, 2, 128, 8, 3))
"""(m, n, k, bits, group_log2) of the GEMVs of a case, in order."""
SATURATE = 4
"""Index of the GEMV whose requant saturates."""
ROUNDS = 5
"""Times the GEMVs repeat, so that the stream crosses several refresh intervals."""


def make_case(seed: int, cfg) -> dict:
    """The GEMVs, their images, the emulator's results and issue cycles, and the PIM geometry
    the testbench needs."""
    pim = cfg.pim
    rng = np.random.default_rng(seed)
    mask = (1 << pim.channels) - 1
    rows_max = max(m for m, *_ in GEMVS)
    s_addr = pim.gbuf_bytes - rows_max * layout.SCALE_CODE_BYTES
    a8, mant, exp = activations(rng, rows_max, s_addr // rows_max)
    gbuf = a8.tobytes() + layout.pack_scale_codes(mant, exp).tobytes()
    images = [("GBUF", c * pim.gbuf_bytes, gbuf) for c in range(pim.channels)]
    program, regions, row = [], [], 0
    for r in range(ROUNDS):
        out = 0
        for i, (m, n, k, bits, group_log2) in enumerate(GEMVS):
            qw = quant_weight(rng, n, k, bits, layout.DENSE, isa.group_size(group_log2, k))
            if i == SATURATE:
                qw = numerics.QuantWeight(qw.q, np.full_like(qw.g, GROUP_MAX),
                                          np.full_like(qw.mult, (1 << SCALE_MANT_BITS) - 1),
                                          np.full_like(qw.shift, REQUANT_SHIFT_MIN), bits,
                                          qw.group)
            tiles = pim_tiles(cfg, qw, mask, row * pim.row_bytes)
            images += [("PIMDRAM", addr, data.tobytes()) for addr, data in tiles]
            fields = {"m": m, "n": n, "k": k, "x_addr": 0, "s_addr": s_addr,
                      "w_addr": row * pim.row_bytes, "o_addr": out,
                      "ch_mask": mask, "bits": bits, "nm": 0, "group_log2": group_log2}
            row += -(-max(len(d) for _, d in tiles) // pim.row_bytes)
            if r == ROUNDS - 1:
                regions.append(Region(f"o{i}", "PRES", fields["o_addr"], "<i4", (m, n),
                                      ("PIM", len(program))))
            program.append(isa.encode("PIM.GEMV", **fields))
            out += 4 * m * n
        program.append("NOP")
    case = testbench.emulator_case(cfg, isa.Engine.PIM, program, images, regions)
    case["pim"] = {"channels": pim.channels, "banks": pim.banks_per_channel,
                   "bank_bytes": pim.bank_bytes, "burst_bytes": pim.burst_bytes,
                   "gbuf_bytes": pim.gbuf_bytes, "result_bytes": pim.result_total_bytes}
    return case


async def serve(dut, pim: dict, gbuf: bytearray, pres: bytearray) -> None:
    """The global buffer and result buffer at the top's window ports, every cycle."""
    from cocotb.triggers import ReadOnly, RisingEdge

    channels = range(pim["channels"])
    reads = [(getattr(dut, f"{name}{c}__addr"), getattr(dut, f"{name}{c}__data"),
              c * pim["gbuf_bytes"]) for c in channels for name in ("gbuf", "scale")]
    widths = [len(data) // 8 for _, data, _ in reads]
    writes = [[getattr(dut, f"pres{c}__{p}") for p in ("en", "addr", "data", "mask")]
              for c in channels]
    while True:
        await ReadOnly()
        addrs = [int(addr.value) for addr, _, _ in reads]
        for en, addr, data, mask in writes:
            if int(en.value):
                at, word, bits = int(addr.value), int(data.value), int(mask.value)
                for b in range(len(data) // 8):
                    if bits >> b & 1 and at + b < len(pres):
                        pres[at + b] = word >> (8 * b) & 0xFF
        await RisingEdge(dut.clk)
        for (_, data, base), addr, width in zip(reads, addrs, widths):
            data.value = int.from_bytes(gbuf[base + addr:base + addr + width].ljust(width,
                                                                                    b"\0"),
                                        "little")


def load(dut, case: dict, gbuf: bytearray) -> None:
    """The program into the front end's memory, PIMDRAM images (burst-aligned, as PIM tiles
    start on rows) into the banks' arrays, GBUF images into the testbench's buffer, all
    behind the ports."""
    pim = case["pim"]
    imem = dut.frontend.imem
    for i, word in enumerate(case["program"]):
        imem[i].value = int.from_bytes(bytes.fromhex(word), "little")
    burst = pim["burst_bytes"]
    for space, addr, data in case["images"]:
        data = bytes.fromhex(data)
        if space == "GBUF":
            gbuf[addr:addr + len(data)] = data
            continue
        unit, offset = divmod(addr, pim["bank_bytes"])
        channel, bank = divmod(unit, pim["banks"])
        array = getattr(getattr(dut, f"channel{channel}"), f"bank{bank}").array
        data += bytes(-len(data) % burst)
        for j in range(len(data) // burst):
            array[offset // burst + j].value = int.from_bytes(data[j * burst:(j + 1) * burst],
                                                              "little")


@cocotb.test()
async def pim_matches_emulator(dut):
    """Every result bit-exact, every issue cycle exact, refreshes included."""
    case = runner.load_case()
    pim = case["pim"]
    gbuf = bytearray(pim["channels"] * pim["gbuf_bytes"])
    pres = bytearray(pim["result_bytes"])
    dut.run.value = 0
    dut.o_push__ready.value = dut.o_pop__ready.value = 0
    await testbench.start(dut)
    load(dut, case, gbuf)
    cocotb.start_soon(serve(dut, pim, gbuf, pres))
    issues = await testbench.run_to_halt(dut, testbench.cycle_limit(case["cycles"]))
    got = {r["name"]: bytes(pres[r["addr"]:r["addr"] + 4 * int(np.prod(r["shape"]))])
           for r in case["regions"]}
    testbench.finish(case, got, issues, int(dut.cycles.value), counters=case["counters"])
