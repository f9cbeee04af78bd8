"""Timing-only emulator throughput on a synthetic LLaMA2-7B-like decode stream.

Each layer streams weight tiles (W4, 128 output channels x 4096 inputs): the DMA copies a tile
HBM -> SRAM into one of two buffers and pushes a token, the MXU pops it, runs the GEMM and
pushes the buffer back; the VPU does the layer's norms, RoPE, KV append, attention over a
2K-token context, SiLU and residual adds. Prints instructions per wall second, simulated
cycles per wall second and the wall time of loading (decoding) and running.

    python benchmarks/bench_emulator.py [--preset flightllm-u280] [--instructions 50000]
"""
from __future__ import annotations

import argparse
import platform
import time

import numpy as np

from trimem import isa, layout
from trimem.config import load_config
from trimem.emulator import stats
from trimem.emulator.machine import Machine

KV = "layers=32 ctx_log2=12 kv_bits=4 kv_group_log2=5"
"""LLaMA2-7B KV layout: 32 layers, 4K context, KV4 in groups of 32."""
TILES_PER_LAYER = 256
N_TILE, K = 128, 4096
CTX = 2048
POS_ADDR = 0x330000


def layer(index: int, tile: int) -> dict[str, list[str]]:
    """Assembly lines of one decoder layer per engine."""
    dma, mxu = [], ["POP src=VPU"]
    for t in range(TILES_PER_LAYER):
        hbm = ((index * TILES_PER_LAYER + t) * tile) % (1 << 32)
        buf = (t % 2) * tile
        if t >= 2:
            dma.append("POP src=MXU")
        dma += [f"DMA.COPY src_space=HBM src_addr={hbm:#x} dst_space=SRAM dst_addr={buf:#x} "
                f"nbytes={tile}", "PUSH dst=MXU"]
        mxu += ["POP src=DMA", f"MXU.GEMM m=1 n={N_TILE} k={K} a_addr=0x200000 "
                f"s_addr=0x201000 w_addr={buf:#x} o_addr=0x202000 bits=4 nm=0 group_log2=7",
                "PUSH dst=DMA" if t < TILES_PER_LAYER - 2 else "NOP"]
    mxu.append("PUSH dst=VPU")
    rows = "m=1 n=4096"
    vpu = [f"VPU.RMSNORM {rows} x_addr=0x300000 g_addr=0x304000 o_addr=0x310000 "
           "s_addr=0x311000", "PUSH dst=MXU", "POP src=MXU",
           "VPU.ROPE m=1 heads=32 head_dim=128 x_addr=0x320000 pos_addr=0x330000 "
           "table_addr=0x400000 o_addr=0x320000",
           "VPU.ROPE m=1 heads=32 head_dim=128 x_addr=0x324000 pos_addr=0x330000 "
           "table_addr=0x400000 o_addr=0x324000",
           f"VPU.KVAPP m=1 seq=0 layer={index % 32} kv_heads=32 head_dim=128 k_addr=0x324000 "
           f"v_addr=0x328000 pos_addr=0x330000 kv_base=0x100000000 {KV}",
           f"VPU.ATTN m=1 seq=0 layer={index % 32} q_heads=32 kv_heads=32 head_dim=128 "
           f"q_addr=0x320000 pos_addr=0x330000 o_addr=0x340000 kv_base=0x100000000 {KV} "
           "splits=1 topk=0",
           f"VPU.ADD {rows} a_addr=0x300000 b_addr=0x340000 o_addr=0x300000",
           f"VPU.SILUMUL {rows} a_addr=0x350000 b_addr=0x354000 o_addr=0x358000",
           f"VPU.ADD {rows} a_addr=0x300000 b_addr=0x358000 o_addr=0x300000"]
    return {"DMA": dma, "MXU": mxu, "VPU": vpu}


def programs(count: int, tile: int) -> dict[str, list[bytes]]:
    """Whole layers until there are at least `count` instructions, each stream ending in HALT."""
    lines: dict[str, list[str]] = {"DMA": [], "MXU": [], "VPU": []}
    index = 0
    while sum(map(len, lines.values())) < count:
        for engine, text in layer(index, tile).items():
            lines[engine] += text
        index += 1
    return {e: isa.assemble("\n".join(text + ["HALT"]), e) for e, text in lines.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="flightllm-u280")
    parser.add_argument("--instructions", type=int, default=50_000)
    args = parser.parse_args(argv)
    config = load_config(args.preset)
    tile = layout.weight_tile_bytes(N_TILE, K, 4, layout.DENSE, 128)
    progs = programs(args.instructions, tile)
    count = sum(map(len, progs.values()))
    machine = Machine(config, timing_only=True)
    machine.memory("SRAM").write_array(POS_ADDR, np.array([CTX - 1], np.int32))
    t0 = time.perf_counter()
    machine.load(progs)
    t1 = time.perf_counter()
    machine.run()
    t2 = time.perf_counter()
    cycles = stats.report(machine)["cycles"]
    print(f"device: {platform.machine()} CPU, Python {platform.python_version()}, "
          f"preset {args.preset}, timing-only, context {CTX}")
    print(f"{'instructions':>12} {'load s':>7} {'run s':>7} {'instr/s':>9} {'us/instr':>8} "
          f"{'sim cycles':>11} {'sim ms':>8} {'cycles/s':>10}")
    print(f"{count:>12} {t1 - t0:>7.3f} {t2 - t1:>7.3f} {count / (t2 - t1):>9.0f} "
          f"{(t2 - t1) / count * 1e6:>8.2f} {cycles:>11} {machine.end_ps / 1e9:>8.3f} "
          f"{cycles / (t2 - t1):>10.3g}")


if __name__ == "__main__":
    main()
