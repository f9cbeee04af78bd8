"""Small bundles for co-simulation: single instructions with their operands, written with the
bundle format of `trimem.bundle` so that `cosim` and `trimem run` load them like any other.

`linear_bundle` is one MXU.GEMM over the SRAM (dense or N:M): the weight tile is an SRAM
image, the activations and their scale codes are the entry's inputs, the fx output its
output. `pim_bundle` is one PIM.GEMV: the unit tiles are PIMDRAM images (`pim_tiles`), the
vectors and scale codes inputs in the global buffer, the output in the result buffer. The
expected outputs are `trimem.numerics.linear`. `block_bundle` runs three streams that meet
through tokens and the shared SRAM: a GEMM on the MXU whose output the VPU adds to a residual
and quantizes (`special.add_sat`, `numerics.quantize_act`), beside a GEMV on the PIM.
`attention_bundle` is one decode step of
CSD.ATTN: a KV cache of random K and V quantized into FLASH pages (`kv_image`), the queries and
positions inputs in CDRAM, the output in CDRAM; the expected output is
`trimem.special.attention`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from trimem import dram, isa, layout, numerics, special, timing
from trimem.bundle import Bundle, Entry, MemoryImage, TensorSpec, write_bundle
from trimem.config import load_config
from trimem.numerics import ACT_EXP_MAX, ACT_QMAX, GROUP_MAX, SCALE_MANT_BITS, qmax


def _hardware(cfg) -> dict:
    return {"name": cfg.name, "preset": cfg.name, "hash": cfg.config_hash()}


def quant_weight(rng, n: int, k: int, bits: int, pattern, group: int) -> numerics.QuantWeight:
    """A random quantized weight, pruned to `pattern`, with requant pairs a real layer has
    (encode_requant of steps around 1 / (qmax * GROUP_MAX * 127))."""
    limit = qmax(bits)
    q = rng.integers(-limit, limit + 1, (n, k)).astype(np.int8)
    q = np.where(numerics.nm_prune_mask(q, *pattern), q, 0).astype(np.int8)
    g = rng.integers(1, GROUP_MAX + 1, (n, k // group)).astype(np.uint8)
    steps = rng.uniform(0.5, 2.0, n) / (limit * GROUP_MAX * ACT_QMAX)
    mult, shift = numerics.encode_requant(steps)
    return numerics.QuantWeight(q, g, mult, shift, bits, group)


def activations(rng, m: int, k: int) -> tuple:
    """Random a8 rows [m, k] with scale codes of realistic size: (a8, mant, exp)."""
    a8 = rng.integers(-ACT_QMAX, ACT_QMAX + 1, (m, k)).astype(np.int8)
    mant = rng.integers(1 << (SCALE_MANT_BITS - 1), 1 << SCALE_MANT_BITS, m).astype(np.int32)
    exp = rng.integers(0, ACT_EXP_MAX + 1, m).astype(np.int32)
    return a8, mant, exp


def pim_tiles(cfg, qw: numerics.QuantWeight, ch_mask: int, w_addr: int) -> list:
    """PIMDRAM (addr, bytes) of a dense PIM.GEMV weight (docs/contract.md, "PIM weight
    mapping"): output j goes to unit j % U (the banks of the selected channels, channel-major)
    at local index j // U, and each unit's rows are one packed tile at w_addr in its bank."""
    pim = cfg.pim
    banks = pim.banks_per_channel
    units = [c * banks + b for c in dram.mask_channels(pim, ch_mask) for b in range(banks)]
    out = []
    for u, unit in enumerate(units):
        rows = np.arange(u, qw.q.shape[0], len(units))
        share = numerics.QuantWeight(qw.q[rows], qw.g[rows], qw.mult[rows], qw.shift[rows],
                                     qw.bits, qw.group)
        out.append((unit * pim.bank_bytes + w_addr, layout.pack_weight_tile(share, layout.DENSE)))
    return out


def linear_bundle(out, hw="trimem-small", *, m: int = 2, n: int = 12, k: int = 64,
                  nm: int = 0, bits: int = 4, group_log2: int = 5, seed: int = 0) -> Path:
    """Write a one-GEMM bundle to `out` (see the module docstring); return its path.

    `nm` indexes the config's N:M patterns (0 = dense); the shape must fit the SRAM.
    """
    cfg = load_config(hw)
    pattern = tuple(cfg.fpga.nm_patterns[nm])
    rng = np.random.default_rng(seed)
    qw = quant_weight(rng, n, k, bits, pattern, isa.group_size(group_log2, k))
    tile = layout.pack_weight_tile(qw, pattern)
    a8, mant, exp = activations(rng, m, k)
    scales = layout.pack_scale_codes(mant, exp)
    addr = {"w": 0}
    addr["a"] = tile.size
    addr["s"] = addr["a"] + a8.size
    addr["o"] = addr["s"] + scales.size
    if addr["o"] + 4 * m * n > cfg.fpga.sram_bytes:
        raise ValueError(f"a [{m}, {n}, {k}] GEMM needs {addr['o'] + 4 * m * n} bytes of SRAM "
                         f"but {cfg.name!r} has {cfg.fpga.sram_bytes}; use a smaller shape")
    gemm = isa.encode("MXU.GEMM", m=m, n=n, k=k, a_addr=addr["a"], s_addr=addr["s"],
                      w_addr=addr["w"], o_addr=addr["o"], bits=bits, nm=nm,
                      group_log2=group_log2)
    entry = Entry("linear", "decode", {"mxu": [gemm, isa.encode("HALT")]},
                  inputs=[TensorSpec("a", "SRAM", addr["a"], "int8", (m, k)),
                          TensorSpec("s", "SRAM", addr["s"], "uint8", (scales.size,))],
                  outputs=[TensorSpec("o", "SRAM", addr["o"], "int32", (m, n))])
    expected = numerics.linear(a8, mant, exp, qw.w_eff, qw.mult, qw.shift)
    bundle = Bundle({"name": f"linear-{n}x{k}-{pattern[0]}of{pattern[1]}"}, _hardware(cfg),
                    {"w_bits": bits, "nm": list(pattern)}, {"linear": entry},
                    images=[MemoryImage("weights", "SRAM", addr["w"], tile)],
                    tests={"linear": {"inputs": {"a": a8, "s": scales},
                                      "expected": {"o": expected}}})
    return write_bundle(bundle, out)


def pim_gemv(cfg, rng, *, m: int, n: int, k: int, bits: int = 8, group_log2: int = 4,
             w_row: int = 1, repeat: int = 1) -> dict:
    """A PIM.GEMV on channel 0 with random operands, `repeat` times over the same ones, its
    tiles from DRAM row `w_row` of each bank: the PIM stream (`program`), the `inputs` x and
    xs in the global buffer, the output o in the result buffer, the PIMDRAM `images`, and the
    `test_inputs` and `expected` values by tensor name."""
    pim = cfg.pim
    qw = quant_weight(rng, n, k, bits, layout.DENSE, isa.group_size(group_log2, k))
    a8, mant, exp = activations(rng, m, k)
    scales = layout.pack_scale_codes(mant, exp)
    if a8.size + scales.size > pim.gbuf_bytes or 4 * m * n > pim.result_total_bytes:
        raise ValueError(f"a [{m}, {n}, {k}] GEMV needs {a8.size + scales.size} bytes of global "
                         f"buffer and {4 * m * n} of results; {cfg.name!r} has "
                         f"{pim.gbuf_bytes} and {pim.result_total_bytes}")
    w_addr = w_row * pim.row_bytes
    gemv = isa.encode("PIM.GEMV", m=m, n=n, k=k, x_addr=0, s_addr=a8.size, w_addr=w_addr,
                      o_addr=0, ch_mask=1, bits=bits, nm=0, group_log2=group_log2)
    return {"program": [gemv] * repeat + [isa.encode("HALT")],
            "inputs": [TensorSpec("x", "GBUF", 0, "int8", (m, k)),
                       TensorSpec("xs", "GBUF", a8.size, "uint8", (scales.size,))],
            "outputs": [TensorSpec("o", "PRES", 0, "int32", (m, n))],
            "images": [MemoryImage(f"tile{u}", "PIMDRAM", addr, data)
                       for u, (addr, data) in enumerate(pim_tiles(cfg, qw, 1, w_addr))],
            "test_inputs": {"x": a8, "xs": scales},
            "expected": {"o": numerics.linear(a8, mant, exp, qw.w_eff, qw.mult, qw.shift)}}


def pim_bundle(out, hw="trimem-small", *, m: int = 1, n: int = 8, k: int = 192, bits: int = 8,
               group_log2: int = 4, w_row: int = 1, repeat: int = 1, seed: int = 0) -> Path:
    """Write a PIM.GEMV bundle to `out` (see the module docstring and `pim_gemv`); return its
    path."""
    cfg = load_config(hw)
    gemv = pim_gemv(cfg, np.random.default_rng(seed), m=m, n=n, k=k, bits=bits,
                    group_log2=group_log2, w_row=w_row, repeat=repeat)
    entry = Entry("gemv", "decode", {"pim": gemv["program"]}, inputs=gemv["inputs"],
                  outputs=gemv["outputs"])
    bundle = Bundle({"name": f"gemv-{n}x{k}"}, _hardware(cfg), {"w_bits": bits},
                    {"gemv": entry}, images=gemv["images"],
                    tests={"gemv": {"inputs": gemv["test_inputs"],
                                    "expected": gemv["expected"]}})
    return write_bundle(bundle, out)


def block_bundle(out, hw="trimem-small", *, m: int = 2, n: int = 16, k: int = 64,
                 nm: int = 1, pim_n: int = 8, pim_k: int = 192, seed: int = 0) -> Path:
    """Write a three-stream bundle to `out` (see the module docstring); return its path.

    MXU: a GEMM, then PUSH VPU. VPU: POP MXU, VPU.ADD of the GEMM's output and a residual,
    VPU.QUANT of the sum. PIM, meanwhile: a GEMV of its own. All of it runs on the system top.
    """
    cfg = load_config(hw)
    pattern = tuple(cfg.fpga.nm_patterns[nm])
    rng = np.random.default_rng(seed)
    bits, group_log2 = 4, 5
    qw = quant_weight(rng, n, k, bits, pattern, isa.group_size(group_log2, k))
    tile = layout.pack_weight_tile(qw, pattern)
    a8, mant, exp = activations(rng, m, k)
    scales = layout.pack_scale_codes(mant, exp)
    resid = rng.integers(-(1 << 20), 1 << 20, (m, n)).astype(np.int32)
    sizes = {"w": tile.size, "a": a8.size, "s": scales.size, "r": 4 * m * n, "o": 4 * m * n,
             "y": 4 * m * n, "q": m * n, "qs": m * layout.SCALE_CODE_BYTES}
    addr = dict(zip(sizes, np.cumsum([0, *sizes.values()])[:-1].tolist()))
    mxu = [isa.encode("MXU.GEMM", m=m, n=n, k=k, a_addr=addr["a"], s_addr=addr["s"],
                      w_addr=addr["w"], o_addr=addr["o"], bits=bits, nm=nm,
                      group_log2=group_log2),
           isa.encode("PUSH", dst=isa.Engine.VPU), isa.encode("HALT")]
    vpu = [isa.encode("POP", src=isa.Engine.MXU),
           isa.encode("VPU.ADD", m=m, n=n, a_addr=addr["o"], b_addr=addr["r"],
                      o_addr=addr["y"]),
           isa.encode("VPU.QUANT", m=m, n=n, x_addr=addr["y"], o_addr=addr["q"],
                      s_addr=addr["qs"]),
           isa.encode("HALT")]
    y = special.add_sat(numerics.linear(a8, mant, exp, qw.w_eff, qw.mult, qw.shift), resid)
    q, qmant, qexp = numerics.quantize_act(y)
    gemv = pim_gemv(cfg, rng, m=1, n=pim_n, k=pim_k)
    entry = Entry("block", "decode", {"mxu": mxu, "vpu": vpu, "pim": gemv["program"]},
                  inputs=[TensorSpec("a", "SRAM", addr["a"], "int8", (m, k)),
                          TensorSpec("s", "SRAM", addr["s"], "uint8", (scales.size,)),
                          TensorSpec("r", "SRAM", addr["r"], "int32", (m, n)),
                          *gemv["inputs"]],
                  outputs=[TensorSpec("y", "SRAM", addr["y"], "int32", (m, n)),
                           TensorSpec("q", "SRAM", addr["q"], "int8", (m, n)),
                           TensorSpec("qs", "SRAM", addr["qs"], "uint8", (sizes["qs"],)),
                           *gemv["outputs"]])
    bundle = Bundle({"name": f"block-{n}x{k}-{pattern[0]}of{pattern[1]}"}, _hardware(cfg),
                    {"w_bits": bits, "nm": list(pattern)}, {"block": entry},
                    images=[MemoryImage("weights", "SRAM", addr["w"], tile), *gemv["images"]],
                    tests={"block": {"inputs": {"a": a8, "s": scales, "r": resid,
                                                **gemv["test_inputs"]},
                                     "expected": {"y": y, "q": q,
                                                  "qs": layout.pack_scale_codes(qmant, qexp),
                                                  **gemv["expected"]}}})
    return write_bundle(bundle, out)


def kv_image(cfg, f: dict, k, v) -> tuple[int, np.ndarray]:
    """FLASH (addr, bytes) of a KV cache holding fx K and V [kv_heads, tokens, head_dim] for
    the cache geometry of KV instruction fields `f`, quantized as KVAPP quantizes, each token
    at `layout.kv_offset` from `kv_base` (one image from the first token to the last)."""
    kw = timing.kv_layout(cfg, isa.Space.FLASH, f)
    rows = []
    for kind, x in zip(layout.KV_KINDS, (k, v)):
        q, g, mant, exp = numerics.quantize_kv(np.asarray(x, np.int32), kw["bits"], kw["group"])
        for h in range(x.shape[0]):
            packed = layout.pack_kv_tokens(q[h], g[h], mant[h], exp[h], kw["bits"])
            rows += [(layout.kv_offset(f["seq"], f["layer"], h, kind, t, **kw), row)
                     for t, row in enumerate(packed)]
    first = min(at for at, _ in rows)
    blob = np.zeros(max(at + row.size for at, row in rows) - first, np.uint8)
    for at, row in rows:
        blob[at - first:at - first + row.size] = row
    return f["kv_base"] + first, blob


def attention_bundle(out, hw="trimem-small", *, ctx: int = 24, q_heads: int = 2,
                     kv_heads: int = 1, head_dim: int = 16, kv_bits: int = 4,
                     kv_group_log2: int = 3, splits: int = 1, topk: int = 0,
                     seed: int = 0) -> Path:
    """Write a one-row CSD.ATTN bundle (a decode step at position ctx - 1 of sequence 0,
    layer 0) to `out` (see the module docstring); return its path."""
    cfg = load_config(hw)
    rng = np.random.default_rng(seed)
    width = q_heads * head_dim
    f = {"m": 1, "seq": 0, "layer": 0, "q_heads": q_heads, "kv_heads": kv_heads,
         "head_dim": head_dim, "q_addr": 0, "pos_addr": 4 * width, "o_addr": 4 * width + 64,
         "kv_base": 0, "layers": 1, "ctx_log2": (ctx - 1).bit_length(), "kv_bits": kv_bits,
         "kv_group_log2": kv_group_log2, "splits": splits, "topk": topk}
    scale = 1 << numerics.ACT_FRAC
    k, v = (rng.integers(-2 * scale, 2 * scale, (kv_heads, ctx, head_dim)) for _ in range(2))
    q = rng.integers(-2 * scale, 2 * scale, (1, width)).astype(np.int32)
    pos = np.array([ctx - 1], np.int32)
    kw = timing.kv_layout(cfg, isa.Space.FLASH, f)
    caches = []
    for x in (k, v):
        caches.append(numerics.quantize_kv(np.asarray(x, np.int32), kw["bits"], kw["group"]))
    expected = special.attention(q.reshape(1, q_heads, head_dim), caches[0], caches[1], pos,
                                 kv_heads=kv_heads, kv_bits=kv_bits, splits=splits, topk=topk)
    attn = isa.encode("CSD.ATTN", **f)
    entry = Entry("attn", "decode", {"csd": [attn, isa.encode("HALT")]},
                  inputs=[TensorSpec("q", "CDRAM", f["q_addr"], "int32", (1, width)),
                          TensorSpec("pos", "CDRAM", f["pos_addr"], "int32", (1,))],
                  outputs=[TensorSpec("o", "CDRAM", f["o_addr"], "int32", (1, width))])
    images = [MemoryImage("kv", "FLASH", *kv_image(cfg, f, k, v))]
    bundle = Bundle({"name": f"attn-ctx{ctx}-top{topk}"}, _hardware(cfg), {"kv_bits": kv_bits},
                    {"attn": entry}, images=images,
                    tests={"attn": {"inputs": {"q": q, "pos": pos},
                                    "expected": {"o": np.asarray(expected, np.int32)
                                                 .reshape(1, width)}}})
    return write_bundle(bundle, out)
