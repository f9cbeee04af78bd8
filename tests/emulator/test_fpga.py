"""The FPGA engines: cycle counts derived by hand from docs/timing.md, and bit-exact numbers.

All cycle counts are on `FAST_LINKS` = trimem-small (100 MHz; 2 DSP chains of 8; 8 VPU lanes;
2 HBM channels of 16 B/cycle, 256 B interleave, latency 8; PIM bus 4 B/cycle) with links
PCIe 8 B/cycle + 10 cycles and P2P 4 B/cycle + 20 cycles.
"""
import numpy as np
import pytest

from trimem import isa, layout, numerics, special
from trimem.config import load_config_dict
from trimem.emulator.machine import EmulatorError, Machine

pytestmark = pytest.mark.unit

FAST_LINKS = load_config_dict({"inherits": "trimem-small", "name": "fast-links", "links": {
    "pcie_gbps": 0.8, "pcie_latency_us": 0.1, "p2p_gbps": 0.4, "p2p_latency_us": 0.2}})
KV = "layers=2 ctx_log2=4 kv_bits=4 kv_group_log2=3"
"""A 16-token cache of 2 layers, KV4 in groups of 8: 14-byte tokens, one 256-byte page each."""


def machine(config=FAST_LINKS, timing_only=False):
    return Machine(config, timing_only=timing_only)


def run(m, **programs):
    m.run({engine: isa.assemble(text + "\nHALT", engine) for engine, text in programs.items()})
    return m


def ends(m, engine):
    return m.streams[isa.Engine[engine]].ends[:-1]


def gemm(m=3, n=5, k=32, bits=8, nm=0, o_addr=0x1000, group_log2=4):
    return (f"MXU.GEMM m={m} n={n} k={k} a_addr=0x0 s_addr=0x100 w_addr=0x200 o_addr={o_addr:#x} "
            f"bits={bits} nm={nm} group_log2={group_log2}")


def copy(src, src_addr, dst, dst_addr, nbytes):
    return (f"DMA.COPY src_space={src} src_addr={src_addr:#x} dst_space={dst} "
            f"dst_addr={dst_addr:#x} nbytes={nbytes}")


def place_gemm(m, rng, rows, n, k, bits, nm):
    """Random activations and an N:M-pruned W tile in SRAM as MXU.GEMM expects them."""
    w = rng.normal(size=(n, k))
    if nm != layout.DENSE:
        w *= numerics.nm_prune_mask(w, *nm)
    qw = numerics.quantize_weight(w, bits, 16)
    a8, mant, exp = numerics.quantize_act(rng.integers(-1 << 16, 1 << 16, (rows, k)))
    sram = m.memory("SRAM")
    sram.write(0x0, layout.pack_a8_rows(a8))
    sram.write(0x100, layout.pack_scale_codes(mant, exp))
    sram.write(0x200, layout.pack_weight_tile(qw, nm))
    return numerics.linear(a8, mant, exp, qw.w_eff, qw.mult, qw.shift)


# ---- MXU --------------------------------------------------------------------------------------

@pytest.mark.parametrize("nm, cycles", [(0, 8 + 3 + 3 * 3 * 4), (1, 8 + 3 + 3 * 3 * 2)])
def test_gemm_takes_fill_plus_rows_times_channel_groups_times_kept_steps(nm, cycles):
    assert ends(run(machine(timing_only=True), MXU=gemm(nm=nm)), "MXU") == [cycles]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("nm", [0, 1])
def test_gemm_equals_the_golden_linear_on_random_tiles(bits, nm):
    m = machine()
    want = place_gemm(m, np.random.default_rng(bits + nm), 3, 5, 32, bits,
                      FAST_LINKS.fpga.nm_patterns[nm])
    run(m, MXU=gemm(bits=bits, nm=nm))
    assert np.array_equal(m.memory("SRAM").read_array(0x1000, "<i4", (3, 5)), want)
    assert m.engines[isa.Engine.MXU].stats.macs == 3 * 5 * (32 if nm == 0 else 16)


def test_gemm_rejects_an_nm_index_the_config_lacks():
    with pytest.raises(EmulatorError, match=r"^MXU\[0\] `MXU.GEMM m=3 .* nm=2 group_log2=4`: "
                                            r"nm = 2 indexes no N:M pattern of this FPGA; its "
                                            r"patterns are 0=1:1, 1=2:4$"):
        run(machine(timing_only=True), MXU=gemm(nm=2))


def test_gemm_rejects_weight_bits_the_config_lacks():
    only8 = load_config_dict({"inherits": "trimem-small", "name": "w8-only",
                              "fpga": {"weight_bits": [8]}})
    with pytest.raises(EmulatorError, match=r"^MXU\[0\] `MXU.GEMM .* bits=4 .*`: bits = 4 is "
                                            r"not a weight width of this FPGA; it supports 8$"):
        run(machine(only8, timing_only=True), MXU=gemm(bits=4))


def test_gemm_rejects_k_that_is_not_a_multiple_of_the_group():
    with pytest.raises(EmulatorError, match=r"^MXU\[0\] `MXU.GEMM .* k=24 .*`: k=24 must be a "
                                            r"multiple of m and of group=16"):
        run(machine(timing_only=True), MXU=gemm(k=24))


def test_out_of_bounds_output_names_engine_index_and_disassembly():
    with pytest.raises(EmulatorError, match=r"^MXU\[1\] `MXU.GEMM m=3 n=5 k=32 a_addr=0x0 "
                                            r"s_addr=0x100 w_addr=0x200 o_addr=0xfff0 bits=8 "
                                            r"nm=0 group_log2=4`: SRAM access of 60 bytes at "
                                            r"0xfff0 is out of bounds: SRAM holds 65536 bytes$"):
        run(machine(timing_only=True), MXU="NOP\n" + gemm(o_addr=0xFFF0))

# ---- DMA --------------------------------------------------------------------------------------


@pytest.mark.parametrize("src, dst, nbytes, cycles", [
    ("HOST", "HBM", 1024, 10 + 8 + 1024 // 8),      # PCIe binds: 128 cycles vs 512 B / 16
    ("HBM", "SRAM", 512, 8 + 256 // 16),             # 256 B in each of the two channels
    ("HBM", "SRAM", 256, 8 + 256 // 16),             # one channel
    ("SRAM", "GBUF", 64, 0 + 64 // 4),               # PIM channel bus
    ("CDRAM", "SRAM", 64, 20 + 64 // 4),             # P2P
    ("HOST", "CDRAM", 64, 10 + 64 // 8),             # PCIe alone
    ("HBM", "HBM", 256, 8 + 8 + (256 + 128) // 16),  # 0x0 -> 0x80: channel 0 reads, writes
])
def test_copy_takes_latencies_plus_the_slowest_resource(src, dst, nbytes, cycles):
    dst_addr = 0x80 if dst == src else 0x0
    m = run(machine(timing_only=True), DMA=copy(src, 0, dst, dst_addr, nbytes))
    assert ends(m, "DMA") == [cycles]


def test_copy_moves_the_bytes_and_counts_them_per_memory_link_and_channel():
    m = machine()
    data = np.arange(1024, dtype=np.uint8) * 7
    m.memory("HOST").write(0x40, data)
    run(m, DMA=copy("HOST", 0x40, "HBM", 0x100, 1024) + "\n" + copy("HBM", 0x100, "SRAM", 0x0,
                                                                    1024))
    assert np.array_equal(m.memory("SRAM").read(0x0, 1024), data)
    assert m.traffic == {"HOST": 1024, "HBM": 2048, "SRAM": 1024, "pcie": 1024}
    assert m.resource("hbm0").bytes == m.resource("hbm1").bytes == 1024


@pytest.mark.parametrize("src, dst, nbytes, problem", [
    ("SRAM", "FLASH", 16, r"DMA.COPY cannot reach FLASH: only CSD instructions"),
    ("HOST", "HOST", 16, r"DMA.COPY from HOST to HOST never reaches the accelerator"),
    ("SRAM", "SRAM", 16, r"DMA.COPY SRAM -> SRAM crosses no link or memory channel"),
    ("HBM", "SRAM", 0, r"DMA.COPY of nbytes = 0 moves nothing"),
])
def test_copies_without_a_path_are_rejected(src, dst, nbytes, problem):
    with pytest.raises(EmulatorError, match=rf"^DMA\[0\] `DMA.COPY .*`: {problem}"):
        run(machine(timing_only=True), DMA=copy(src, 0, dst, 0x100, nbytes))


@pytest.mark.parametrize("table, vpu_end, stall", [(0x0, 24 + 12, 16), (0x100, 20, 0)])
def test_streams_on_one_channel_serialize_and_on_two_overlap(table, vpu_end, stall):
    # the copy holds channel 0 over cycles 8..24; the embedding row (64 B) wants its channel
    # from cycle 8: channel 0 waits until 24, channel 1 does not wait (20 = 8 + max(4, 8) + 4)
    m = run(machine(timing_only=True), DMA=copy("HBM", 0x0, "SRAM", 0x8000, 256),
            VPU=f"VPU.EMBED m=1 n=60 ids_addr=0x0 table_addr={table:#x} o_addr=0x100")
    assert ends(m, "DMA") == [24] and ends(m, "VPU") == [vpu_end]
    assert m.engines[isa.Engine.VPU].stats.stall_mem == stall

# ---- VPU --------------------------------------------------------------------------------------


ROWS = {"ADD": "m=2 n=20 a_addr=0x0 b_addr=0x100 o_addr=0x200",
        "SILUMUL": "m=2 n=20 a_addr=0x0 b_addr=0x100 o_addr=0x300",
        "RMSNORM": "m=2 n=20 x_addr=0x0 g_addr=0x400 o_addr=0x500 s_addr=0x540",
        "QUANT": "m=2 n=20 x_addr=0x0 o_addr=0x600 s_addr=0x640",
        "ROPE": "m=2 heads=2 head_dim=10 x_addr=0x0 pos_addr=0x700 table_addr=0x800 "
                "o_addr=0x900"}


@pytest.mark.parametrize("op, cycles", [("ADD", 4 + 2 * 3), ("SILUMUL", 4 + 2 * 3),
                                        ("RMSNORM", 4 + 2 * 3 * 3), ("QUANT", 4 + 2 * 3 * 2),
                                        ("ROPE", 4 + 2 * 3)])
def test_vpu_op_takes_fill_plus_rows_times_lane_groups_times_passes(op, cycles):
    assert ends(run(machine(timing_only=True), VPU=f"VPU.{op} {ROWS[op]}"), "VPU") == [cycles]


def test_vpu_element_ops_equal_the_golden_special_functions():
    rng = np.random.default_rng(1)
    a, b = (rng.integers(-1 << 20, 1 << 20, (2, 20), dtype=np.int32) for _ in range(2))
    gamma, eps = special.quantize_gamma(rng.normal(size=20)), special.quantize_eps(1e-5)
    cos, sin = special.rope_table(1.0 / 10000 ** (np.arange(0, 10, 2) / 10), 8)
    pos = np.array([2, 7], np.int32)
    m = machine()
    sram = m.memory("SRAM")
    for addr, array in ((0x0, a), (0x100, b), (0x400, np.append(gamma, eps).astype(np.int32)),
                        (0x700, pos), (0x800, np.concatenate([cos, sin], axis=1))):
        sram.write_array(addr, array)
    run(m, VPU="\n".join(f"VPU.{op} {ROWS[op]}" for op in ROWS))
    fx = {addr: sram.read_array(addr, "<i4", (2, 20)) for addr in (0x200, 0x300, 0x900)}
    assert np.array_equal(fx[0x200], special.add_sat(a, b))
    assert np.array_equal(fx[0x300], special.silu_mul(a, b))
    rope = special.rope(a.reshape(2, 2, 10), pos, cos, sin)
    assert np.array_equal(fx[0x900], rope.reshape(2, 20))
    for (o, s), (a8, mant, exp) in (((0x500, 0x540), special.rmsnorm_quant(a, gamma, eps)),
                                    ((0x600, 0x640), numerics.quantize_act(a))):
        assert np.array_equal(sram.read_array(o, "i1", (2, 20)), a8)
        got = layout.unpack_scale_codes(sram.read(s, 8))
        assert np.array_equal(got[0], mant) and np.array_equal(got[1], exp)


def test_embed_gathers_and_dequantizes_table_rows():
    rng = np.random.default_rng(2)
    q, mant, exp = numerics.quantize_embedding(rng.normal(size=(10, 12)))
    table = np.concatenate([q.view(np.uint8), layout.pack_scale_codes(mant, exp).reshape(10, 4)],
                           axis=1)
    ids = np.array([7, 0, 7], np.int32)
    m = machine()
    m.memory("HBM").write(0x1000, table)
    m.memory("SRAM").write_array(0x0, ids)
    run(m, VPU="VPU.EMBED m=3 n=12 ids_addr=0x0 table_addr=0x1000 o_addr=0x100")
    want = numerics.embed(ids, q, mant, exp)
    assert np.array_equal(m.memory("SRAM").read_array(0x100, "<i4", (3, 12)), want)


KVAPP = (f"VPU.KVAPP m=6 seq=0 layer=1 kv_heads=2 head_dim=16 k_addr=0x0 v_addr=0x1000 "
         f"pos_addr=0x2000 kv_base=0x1000 {KV}")


def attn(topk=3):
    return (f"VPU.ATTN m=2 seq=0 layer=1 q_heads=4 kv_heads=2 head_dim=16 q_addr=0x3000 "
            f"pos_addr=0x3200 o_addr=0x4000 kv_base=0x1000 {KV} splits=2 topk={topk}")


def place_kv(m, rng):
    """Six K and V rows at positions 0..5 and two queries at positions 3 and 5, in SRAM."""
    k, v = (rng.integers(-1 << 14, 1 << 14, (6, 32), dtype=np.int32) for _ in range(2))
    q = rng.integers(-1 << 14, 1 << 14, (2, 64), dtype=np.int32)
    sram = m.memory("SRAM")
    for addr, array in ((0x0, k), (0x1000, v), (0x2000, np.arange(6, dtype=np.int32)),
                        (0x3000, q), (0x3200, np.array([3, 5], np.int32))):
        sram.write_array(addr, array)
    return k, v, q


def test_kv_append_then_attention_equals_the_golden_attention():
    m = machine()
    k, v, q = place_kv(m, np.random.default_rng(3))
    run(m, VPU=f"{KVAPP}\n{attn()}")
    cache = [numerics.quantize_kv(x.reshape(6, 2, 16).transpose(1, 0, 2), 4, 8) for x in (k, v)]
    want = special.attention(q.reshape(2, 4, 16), *cache, np.array([3, 5]), kv_heads=2,
                             kv_bits=4, splits=2, topk=3)
    assert np.array_equal(m.memory("SRAM").read_array(0x4000, "<i4", (2, 4, 16)), want)


def test_kv_append_and_attention_stream_their_tokens_over_the_channels():
    # regions (kind, head) K0 V0 K1 V1 are one 256 B page each, on channels 0 1 0 1.
    # KVAPP: 6 tokens x 14 B per region -> 168 B per channel = 11 cycles; compute 6 rows x
    # ceil(64 / 8) x 2 passes = 96: 8 + 96 + 4 = 108.
    # ATTN: ctx 4 and 6, top-3: 4 x 16 x ((4 + 3) + (6 + 3)) = 1024 MACs / 8 lanes = 128;
    # streams 6 K and min(6, 2 x 3) V tokens per head = 11 cycles: 8 + 128 + 4 = 140.
    m = machine(timing_only=True)
    place_kv(m, np.random.default_rng(3))
    run(m, VPU=f"{KVAPP}\n{attn()}")
    assert ends(m, "VPU") == [108, 108 + 140]
    assert m.engines[isa.Engine.VPU].stats.macs == 1024


def test_top_k_cuts_the_value_bytes_attention_streams():
    got = {}
    for topk in (0, 1):
        m = machine(timing_only=True)
        place_kv(m, np.random.default_rng(3))
        run(m, VPU=attn(topk))
        got[topk] = (m.resource("hbm0").bytes, m.resource("hbm1").bytes)
    assert got == {0: (2 * 84, 2 * 84), 1: (2 * 84, 2 * 2 * 14)}


def test_kv_token_beyond_the_cache_is_rejected():
    m = machine(timing_only=True)
    m.memory("SRAM").write_array(0x2000, np.array([16], np.int32))
    with pytest.raises(EmulatorError, match=r"^VPU\[0\] `VPU.KVAPP m=1 .*`: token 16 is out of "
                                            r"range \[0, 16\)"):
        run(m, VPU=KVAPP.replace("m=6", "m=1"))


def test_negative_position_is_rejected():
    m = machine(timing_only=True)
    m.memory("SRAM").write_array(0x700, np.array([3, -1], np.int32))
    with pytest.raises(EmulatorError, match=r"^VPU\[0\] `VPU.ROPE .*`: token position -1 at "
                                            r"pos_addr is negative; positions count from 0$"):
        run(m, VPU=f"VPU.ROPE {ROWS['ROPE']}")


def test_attention_rejects_query_heads_not_a_multiple_of_kv_heads():
    with pytest.raises(EmulatorError, match=r"^VPU\[0\] `VPU.ATTN .*`: q_heads = 3 is not a "
                                            r"multiple of kv_heads = 2$"):
        run(machine(timing_only=True), VPU=attn().replace("q_heads=4", "q_heads=3"))

# ---- both modes -------------------------------------------------------------------------------


def test_timing_only_mode_counts_the_same_cycles_as_functional_mode():
    programs = {
        "DMA": copy("HOST", 0x0, "SRAM", 0x3200, 8) + "\nPUSH dst=VPU\nPUSH dst=MXU\n"
               "POP src=MXU\n" + copy("SRAM", 0x5000, "HOST", 0x100, 60),
        "MXU": f"POP src=DMA\n{gemm(o_addr=0x5000)}\nPUSH dst=DMA",
        "VPU": f"{KVAPP}\nPOP src=DMA\n{attn()}",
    }
    spans = {}
    for timing_only in (False, True):
        m = machine(timing_only=timing_only)
        rng = np.random.default_rng(4)
        place_kv(m, rng)
        place_gemm(m, rng, 3, 5, 32, 8, layout.DENSE)  # over the first K rows: any data will do
        m.memory("HOST").write_array(0x0, np.array([3, 5], np.int32))
        m.memory("SRAM").write_array(0x3200, np.zeros(2, np.int32))
        run(m, **programs)
        spans[timing_only] = {e: (s.starts, s.ends) for e, s in m.streams.items()}
    assert spans[False] == spans[True]
