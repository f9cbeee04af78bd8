"""Testbench of the CSD top: CSD.KVAPP and CSD.ATTN in the drive against the emulator.

`make_case` holds two KV caches in FLASH (KV4 in groups of 8, a token per page slot; KV8 in
groups of 16, two pages per region) of random K and V, and a stream of CSD.ATTN over them: one
and three query rows at different positions (each row masked to its own tokens), grouped-query
heads (two query heads per kv head) and one head per kv head, one to three splits, and top-k
off, below the context (pruned tokens) and above it (nothing pruned). `step_case` is one
decode step on the drive: CSD.KVAPP appends the new token's K and V to a cache holding the
earlier ones, then CSD.ATTN attends over all of them (with or without top-k). Every output and
appended slot is compared bit for bit and every issue cycle exactly.

The testbench loads the program behind the front end's port and serves CDRAM (reads a cycle
after the address, writes at the edge) and the flash pages (a request taken while idle, the
page's beats from `FlashTiming.page_read` cycles later, as `trimem.hdl.system.FlashPages`
does with that latency) and the appends (`flash_wr`, at the edge) from Python memories.
"""
from __future__ import annotations

import cocotb
import numpy as np

from trimem import isa, layout, numerics, timing
from trimem.sims import runner, testbench
from trimem.sims.bundles import kv_image
from trimem.sims.diff import Region

CTX_LOG2 = 5
"""Caches of 32 tokens per (layer, kv head, kind)."""
CACHES = ({"kv_bits": 4, "kv_group_log2": 3, "kv_base": 0},
          {"kv_bits": 8, "kv_group_log2": 4, "kv_base": 1 << 15})
"""The two caches: geometry and FLASH base (page-aligned)."""
ATTNS = ((1, 2, 1, 1, 0), (3, 2, 1, 2, 4), (1, 2, 2, 3, 40), (3, 2, 2, 1, 7))
"""(rows, q_heads, kv_heads, splits, topk) of the CSD.ATTNs, each run on both caches."""
HEAD_DIM = 16


def _drive(cfg) -> dict:
    """What `serve` needs of the CSD config: a page answers `FlashTiming.page_read` cycles
    after its request (docs/timing.md, "CSD")."""
    from trimem.dram import FlashTiming

    csd = cfg.csd
    return {"cdram_bytes": csd.dram_bytes, "flash_bytes": csd.capacity_bytes,
            "page_bytes": csd.page_bytes, "beat": csd.engine_lanes,
            "latency": FlashTiming(csd).page_read}


def make_case(seed: int, cfg) -> dict:
    """The ATTNs on both caches, their operands, and the emulator's outputs and cycles."""
    rng = np.random.default_rng(seed)
    scale = 1 << numerics.ACT_FRAC
    kv_heads = max(a[2] for a in ATTNS)
    tokens = 1 << CTX_LOG2
    geometry = {"seq": 0, "layer": 0, "layers": 1, "kv_heads": kv_heads, "head_dim": HEAD_DIM,
                "ctx_log2": CTX_LOG2}
    images, program, regions, at = [], [], [], 0
    for cache in CACHES:
        f = {**geometry, **cache}
        k, v = (rng.integers(-2 * scale, 2 * scale, (kv_heads, tokens, HEAD_DIM))
                for _ in range(2))
        addr, blob = kv_image(cfg, f, k, v)
        images.append(("FLASH", addr, blob.tobytes()))
    for cache in CACHES:
        for i, (m, q_heads, heads, splits, topk) in enumerate(ATTNS):
            width = q_heads * HEAD_DIM
            q = rng.integers(-2 * scale, 2 * scale, (m, width)).astype("<i4")
            pos = rng.integers(0, tokens, m).astype("<i4")
            f = {**geometry, **cache, "m": m, "q_heads": q_heads, "kv_heads": heads,
                 "splits": splits, "topk": topk, "q_addr": at, "pos_addr": at + q.nbytes,
                 "o_addr": at + q.nbytes + pos.nbytes}
            images += [("CDRAM", f["q_addr"], q.tobytes()), ("CDRAM", f["pos_addr"],
                                                            pos.tobytes())]
            regions.append(Region(f"o{len(regions)}", "CDRAM", f["o_addr"], "<i4", (m, width),
                                  ("CSD", len(program))))
            program.append(isa.encode("CSD.ATTN", **f))
            at = f["o_addr"] + q.nbytes
    case = testbench.emulator_case(cfg, isa.Engine.CSD, program, images, regions)
    case["csd"] = _drive(cfg)
    return case


def step_case(cfg, *, topk: int, seed: int = 0, q_heads: int = 2, kv_heads: int = 1,
              splits: int = 2) -> dict:
    """One decode step at the cache's last position (its page fills and is programmed):
    CSD.KVAPP of the token, then CSD.ATTN of one query row over every cached token."""
    rng = np.random.default_rng(seed)
    scale = 1 << numerics.ACT_FRAC
    pos = (1 << CTX_LOG2) - 1
    f = {"m": 1, "seq": 0, "layer": 0, "layers": 1, "kv_heads": kv_heads, "head_dim": HEAD_DIM,
         "ctx_log2": CTX_LOG2, **CACHES[0]}
    k, v = (rng.integers(-2 * scale, 2 * scale, (kv_heads, pos, HEAD_DIM)) for _ in range(2))
    new_k, new_v, q = (rng.integers(-2 * scale, 2 * scale, (1, n * HEAD_DIM)).astype("<i4")
                       for n in (kv_heads, kv_heads, q_heads))
    at = {"k_addr": 0, "v_addr": new_k.nbytes, "q_addr": 2 * new_k.nbytes}
    at["pos_addr"] = at["q_addr"] + q.nbytes
    at["o_addr"] = at["pos_addr"] + 4
    images = [("FLASH", *kv_image(cfg, f, k, v)), ("CDRAM", at["k_addr"], new_k.tobytes()),
              ("CDRAM", at["v_addr"], new_v.tobytes()), ("CDRAM", at["q_addr"], q.tobytes()),
              ("CDRAM", at["pos_addr"], np.array([pos], "<i4").tobytes())]
    program = [isa.encode("CSD.KVAPP", **f, k_addr=at["k_addr"], v_addr=at["v_addr"],
                          pos_addr=at["pos_addr"]),
               isa.encode("CSD.ATTN", **f, q_heads=q_heads, splits=splits, topk=topk,
                          q_addr=at["q_addr"], pos_addr=at["pos_addr"], o_addr=at["o_addr"])]
    kv = timing.kv_layout(cfg, isa.Space.FLASH, f)
    size = layout.kv_token_bytes(HEAD_DIM, kv["bits"], kv["group"])
    regions = [Region(f"{kind}{h}", "FLASH",
                      f["kv_base"] + layout.kv_offset(0, 0, h, kind, pos, **kv), "<u1", (size,),
                      ("CSD", 0)) for kind in layout.KV_KINDS for h in range(kv_heads)]
    regions.append(Region("o", "CDRAM", at["o_addr"], "<i4", (1, q_heads * HEAD_DIM),
                          ("CSD", 1)))
    case = testbench.emulator_case(cfg, isa.Engine.CSD, program, images, regions)
    case["csd"] = _drive(cfg)
    return case


async def serve(dut, csd: dict, cdram: bytearray, flash: bytearray) -> None:
    """CDRAM, the flash pages and the appends at the top's ports, every cycle."""
    from cocotb.triggers import ReadOnly, RisingEdge

    beat, beats = csd["beat"], csd["page_bytes"] // csd["beat"]
    state, base, index, wait = "idle", 0, 0, 0
    while True:
        dut.o_page__ready.value = int(state == "idle")
        streaming = state == "stream"
        dut.i_page__valid.value = int(streaming)
        if streaming:
            at = base + index * beat
            dut.i_page__payload.value = int.from_bytes(flash[at:at + beat], "little")
        await ReadOnly()
        addr = int(dut.cdram_rd__addr.value)
        for port, memory in (("cdram_wr", cdram), ("flash_wr", flash)):
            if int(getattr(dut, f"{port}__en").value):
                at, word, mask = (int(getattr(dut, f"{port}__{name}").value)
                                  for name in ("addr", "data", "mask"))
                for b in range(4):
                    if mask >> b & 1:
                        memory[at + b] = word >> (8 * b) & 0xFF
        if state == "idle" and int(dut.o_page__valid.value):
            state, base, index, wait = "wait", int(dut.o_page__payload.value), 0, \
                csd["latency"] - 2
        elif state == "wait":
            state, wait = ("stream", 0) if wait == 0 else ("wait", wait - 1)
        elif streaming and int(dut.i_page__ready.value):
            index += 1
            state = "idle" if index == beats else "stream"
        await RisingEdge(dut.clk)
        dut.cdram_rd__data.value = int.from_bytes(cdram[addr:addr + 4].ljust(4, b"\0"),
                                                  "little")


@cocotb.test()
async def csd_matches_emulator(dut):
    """Every output and appended slot bit-exact, every issue cycle exact."""
    case = runner.load_case()
    csd = case["csd"]
    cdram, flash = bytearray(csd["cdram_bytes"]), bytearray(csd["flash_bytes"])
    for space, addr, data in case["images"]:
        memory = cdram if space == "CDRAM" else flash
        memory[addr:addr + len(data) // 2] = bytes.fromhex(data)
    dut.run.value = 0
    dut.o_push__ready.value = dut.o_pop__ready.value = 0
    await testbench.start(dut)
    imem = dut.frontend.imem
    for i, word in enumerate(case["program"]):
        imem[i].value = int.from_bytes(bytes.fromhex(word), "little")
    cocotb.start_soon(serve(dut, csd, cdram, flash))
    issues = await testbench.run_to_halt(dut, testbench.cycle_limit(case["cycles"]))
    memories = {"CDRAM": cdram, "FLASH": flash}
    regions = [Region.from_dict(r) for r in case["regions"]]
    got = {r.name: bytes(memories[r.space][r.addr:r.addr + r.nbytes]) for r in regions}
    testbench.finish(case, got, issues, int(dut.cycles.value))
