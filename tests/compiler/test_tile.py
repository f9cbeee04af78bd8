"""Tiling and memory mapping: tiles fit their buffers, every allocation is checked."""
import pytest

from trimem import layout
from trimem.compiler import frontend, pipeline, tile
from trimem.compiler.ir import CompileError, OpKind, Step
from trimem.config import load_config

pytestmark = pytest.mark.unit


def graphs(source, hw, buckets, **options):
    """Timing-only graphs of `source` through every pass up to tiling, one per bucket."""
    cfg = load_config(hw)
    if isinstance(source, str):
        graph = frontend.from_config(source, rows=1, phase="decode", ctx=1)
    else:
        graph = frontend.lower(frontend.spec_from_config(source.config), None, rows=1,
                               phase="decode", ctx=1)
    options = {"quant": "w4a8kv4", "sparse_blocks": "mlp", **options}
    for _, run in pipeline.MODEL_PASSES:
        graph = run(graph, cfg, options)
    out = []
    for step in pipeline.parse_buckets(buckets, graph.spec.max_ctx):
        g = pipeline.restep(graph, step)
        for _, run in pipeline.BUCKET_PASSES:
            g = run(g, cfg, options)
        out.append(g)
    return cfg, out


def test_mxu_tiles_fit_the_weight_slot_and_cover_every_output_channel():
    cfg, (graph,) = graphs("llama2-7b", "flightllm-u280", "decode:1@1024")
    slot = tile.slot_bytes(cfg)
    for op in graph.linears():
        tiles = op.annotations["tiles"]["MXU"]
        assert tiles[0][0] == 0 and tiles[-1][1] == op.attrs["n"]
        assert all(a[1] == b[0] for a, b in zip(tiles, tiles[1:]))
        assert max(tile.weight_bytes(op, n1 - n0) for n0, n1 in tiles) <= slot


def test_mxu_tiles_are_whole_groups_of_dsp_chains():
    cfg, (graph,) = graphs("llama2-7b", "flightllm-u280", "decode:1@1024")
    tiles = graph.op("lm_head").annotations["tiles"]["MXU"]
    assert len(tiles) > 1
    assert all((n1 - n0) % cfg.fpga.dsp_chains == 0 for n0, n1 in tiles[:-1])


def test_pim_tiles_give_every_bank_an_output_channel_and_fit_the_result_buffers(tiny_llama):
    cfg, (graph,) = graphs(tiny_llama, "trimem-small", "decode:1@64",
                           placement={"linear": "pim"})
    op = graph.op("layers.0.mlp.up")
    tiles = op.annotations["tiles"]["PIM"]
    assert sum(t.n for t in tiles) == op.attrs["n"]
    for t in tiles:
        assert min(t.local_rows) >= 1 and sum(t.local_rows) == t.n
        assert t.n * tile.FX_BYTES <= cfg.pim.result_total_bytes


def test_weight_slot_overflow_names_the_buffer_and_the_bytes(tiny_llama):
    with pytest.raises(CompileError, match=r"^op 'layers\.0\.mlp\.down' \(layer 0\): SRAM "
                                           r"buffer 'weight slot' overflows by 10 bytes: one "
                                           r"output channel of k=128 packs to 74 B"):
        graphs(tiny_llama, "flightllm-u280", "decode:1@64", weight_slot_bytes=64)


def test_sram_overflow_names_the_buffer_and_the_bytes(tiny_llama):
    cfg, gs = graphs(tiny_llama, "trimem-small", "prefill:256@256",
                     placement={"linear": "mxu", "attention": "vpu"})
    memory = tile.plan_memory(gs, cfg)
    from trimem.compiler import emit
    with pytest.raises(CompileError, match=r"^SRAM buffer '[\w.]+' \(\d+ B\) overflows "
                                           r"fpga\.sram_bytes \(65536 B\) by \d+ bytes"):
        emit.emit_entry(gs[0], cfg, memory)


def test_pim_bank_overflow_names_the_tile_and_the_bytes(tiny_llama):
    cfg, gs = graphs(tiny_llama, "trimem-small", "decode:1@64", placement={"linear": "pim"})
    with pytest.raises(CompileError, match=r"^PIMDRAM buffer 'layers\.0\.mlp\.down' tile "
                                           r"\[32, 48\) overflows a bank by 256 bytes"):
        tile.plan_memory(gs, cfg)


def test_hbm_overflow_names_the_region_and_the_bytes():
    cfg, gs = graphs("llama2-7b", "trimem-small", "decode:1@64",
                     placement={"linear": "mxu", "attention": "vpu"})
    with pytest.raises(CompileError, match=r"^HBM buffer 'embed' \(131200000 B\) overflows "
                                           r"fpga HBM \(2097152 B\) by \d+ bytes"):
        tile.plan_memory(gs, cfg)


def test_buckets_share_one_memory_map_sized_for_the_longest_context(tiny_llama):
    cfg, gs = graphs(tiny_llama, "trimem-all", "prefill:8@64,decode:2@100",
                     placement={"attention": "vpu"})
    memory = tile.plan_memory(gs, cfg)
    assert memory.kv["max_ctx"] == 128 and memory.kv_region.space == "HBM"
    assert memory.kv["page_bytes"] % cfg.fpga.hbm_interleave_bytes == 0
    token = layout.kv_token_bytes(16, 4, 16)
    assert memory.kv_region.nbytes == layout.kv_cache_bytes(
        2, layers=2, kv_heads=2, max_ctx=128, head_dim=16, bits=4, group=16,
        page_bytes=memory.kv["page_bytes"])
    assert memory.kv["page_bytes"] >= token


def test_kv_cache_in_flash_uses_flash_pages(tiny_llama):
    cfg, gs = graphs(tiny_llama, "trimem-all", "decode:1@64")
    memory = tile.plan_memory(gs, cfg)
    assert memory.kv_region.space == "FLASH" and memory.kv["page_bytes"] == cfg.csd.page_bytes


def test_pim_tiles_of_one_channel_set_stack_row_aligned_in_every_bank(tiny_llama):
    cfg, gs = graphs(tiny_llama, "trimem-all", "decode:1@64", placement={"linear": "pim"})
    memory = tile.plan_memory(gs, cfg)
    offsets = [off for placed in memory.pim.values() for _, off in placed]
    assert offsets and all(off % cfg.pim.row_bytes == 0 for off in offsets)
    assert len(set(offsets)) == len(offsets)


def test_arena_reuses_freed_memory_first_fit_and_tracks_the_peak():
    arena = tile.Arena("SRAM", 1024, "a test SRAM")
    a, b = arena.alloc("a", 100), arena.alloc("b", 100)
    assert (a.addr, b.addr) == (0, tile.ALIGN * 2)
    arena.free(a)
    c = arena.alloc("c", 64)
    assert c.addr == 0 and arena.peak == tile.ALIGN * 4
    with pytest.raises(CompileError, match=r"^SRAM buffer 'd' \(2000 B\) overflows a test SRAM "
                                           r"by 1280 bytes"):
        arena.alloc("d", 2000)


def test_group_sizes_that_are_not_powers_of_two_are_rejected(tiny_llama):
    cfg, (graph,) = graphs(tiny_llama, "flightllm-u280", "decode:1@64")
    op = graph.op("layers.0.attn.q")
    op.attrs["group"] = 48
    with pytest.raises(CompileError, match=r"weight group 48 is not a power of two"):
        tile.group_log2(op)


def test_restep_changes_rows_and_context_only(tiny_llama):
    cfg, (graph,) = graphs(tiny_llama, "flightllm-u280", "decode:1@64")
    big = pipeline.restep(graph, Step(8, "prefill", 128))
    assert {op.attrs["m"] for op in big.ops} == {8}
    assert all(op.attrs["ctx"] == 128 for op in big.ops if op.kind is OpKind.ATTENTION)
    assert [op.name for op in big.ops] == [op.name for op in graph.ops]
