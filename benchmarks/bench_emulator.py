"""Emulator throughput: a synthetic LLaMA2-7B-like decode stream (timing only), and any entry of
a compiled bundle run functionally, cold and then warm.

Synthetic stream: each layer streams weight tiles (W4, 128 output channels x 4096 inputs): the
DMA copies a tile HBM -> SRAM into one of two buffers and pushes a token, the MXU pops it, runs
the GEMM and pushes the buffer back; the VPU does the layer's norms, RoPE, KV append, attention
over a 2K-token context, SiLU and residual adds. Prints instructions per wall second,
simulated cycles per wall second and the wall time of loading (decoding) and running.

With `--bundle DIR` the entry (default: every entry) runs functionally twice over the same
memories, as the host's emulator backend runs a session's steps: the first run unpacks every
weight tile, the second finds them unpacked (`trimem.emulator.weights`).

Both print, per engine, the wall seconds its instructions took to emulate, the simulated
seconds it was busy, and their ratio (simulated / wall): the speed of the emulation against
the hardware it models, where time goes when the emulator is slow.

    python benchmarks/bench_emulator.py [--preset flightllm-u280] [--instructions 50000]
    python benchmarks/bench_emulator.py --bundle DIR [--entry NAME] [--runs 2]
"""
from __future__ import annotations

import argparse
import platform
import time
from collections import Counter

import numpy as np

from trimem import isa, layout
from trimem.bundle import read_bundle
from trimem.config import load_config
from trimem.emulator import stats
from trimem.emulator.machine import Machine
from trimem.emulator.runner import bundle_config

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


def time_engines(machine: Machine) -> Counter:
    """Wall seconds spent in each engine model's `execute`, filled in as `machine` runs (its
    programs must be loaded)."""
    wall: Counter = Counter()
    for model in machine.engines.values():
        def timed(ins, start, run=model.execute, name=model.name):
            t0 = time.perf_counter()
            try:
                return run(ins, start)
            finally:
                wall[name] += time.perf_counter() - t0
        model.execute = timed
    return wall


def engine_rows(machine: Machine, wall: Counter) -> list[str]:
    """Per engine: instructions, wall s, simulated busy s and simulated / wall."""
    rows = [f"{'engine':<6} {'instr':>7} {'wall s':>8} {'sim busy s':>11} {'sim/wall':>9}"]
    for name, e in stats.report(machine)["per_engine"].items():
        busy = e["busy"] / (e["clock_mhz"] * 1e6)
        ratio = busy / wall[name] if wall[name] else float("inf")
        rows.append(f"{name:<6} {e['instructions']:>7} {wall[name]:>8.3f} {busy:>11.3e} "
                    f"{ratio:>9.2e}")
    return rows


def synthetic(args) -> None:
    config = load_config(args.preset)
    tile = layout.weight_tile_bytes(N_TILE, K, 4, layout.DENSE, 128)
    progs = programs(args.instructions, tile)
    count = sum(map(len, progs.values()))
    machine = Machine(config, timing_only=True)
    machine.memory("SRAM").write_array(POS_ADDR, np.array([CTX - 1], np.int32))
    t0 = time.perf_counter()
    machine.load(progs)
    wall = time_engines(machine)
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
    print("\n".join(engine_rows(machine, wall)))


def functional(args) -> None:
    bundle = read_bundle(args.bundle)
    config = bundle_config(bundle)
    placed = Machine(config)
    for image in bundle.images:
        placed.memory(image.space).write(image.addr, image.data)
    print(f"device: {platform.machine()} CPU, Python {platform.python_version()}, bundle "
          f"{args.bundle} on {config.name}, functional")
    for name in [args.entry] if args.entry else list(bundle.entries):
        entry = bundle.entry(name)
        for run in range(args.runs):
            machine = Machine(config)
            machine.memories = placed.memories
            for spec in entry.inputs:
                machine.memory(spec.space).write_array(spec.addr, sample_input(spec))
            machine.load({isa.stream_engine(e): w for e, w in entry.programs.items()})
            wall = time_engines(machine)
            t0 = time.perf_counter()
            machine.run()
            elapsed = time.perf_counter() - t0
            print(f"\nentry {name}, run {run + 1} ({'cold' if run == 0 else 'warm'}): "
                  f"{elapsed:.2f} s wall for {machine.end_ps / 1e9:.4f} ms simulated "
                  f"({machine.end_ps / 1e12 / elapsed:.2e} simulated s per wall s)")
            print("\n".join(engine_rows(machine, wall)))


def sample_input(spec) -> np.ndarray:
    """Token ids 1, 2, ... or positions 0, 1, ... for an entry input."""
    first = 0 if spec.name == "pos" else 1
    return (first + np.arange(int(np.prod(spec.shape)))).reshape(spec.shape).astype(spec.dtype)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="flightllm-u280")
    parser.add_argument("--instructions", type=int, default=50_000)
    parser.add_argument("--bundle", help="run this compiled bundle functionally instead")
    parser.add_argument("--entry", help="the bundle entry to run (default: every entry)")
    parser.add_argument("--runs", type=int, default=2, help="runs per entry (first is cold)")
    args = parser.parse_args(argv)
    if args.bundle:
        functional(args)
    else:
        synthetic(args)


if __name__ == "__main__":
    main()
