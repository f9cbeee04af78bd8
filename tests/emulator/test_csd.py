"""The CSD engine: KV append and attention in flash, bit-exact against trimem.special, with
page counts and cycles derived by hand from docs/timing.md ("CSD").

`DRIVE` = trimem-small's drive with 2 channels x 2 dies x 2 planes: 100 MHz, tR 100 cycles,
tPROG 400, 512 B pages crossing a 1 B/cycle channel in 512 cycles, 8 engine lanes: a page read
answers after 100 + 512 = 612 cycles and streams in 64 beats; a program takes 512 + 400 = 912.
The cache: 2 kv heads of head_dim 16 at 8 bits, one group (21-byte tokens, 24 per page), 128
tokens (6 pages) per region; regions K0, V0, K1, V1 start at pages 0, 6, 12, 18. ATTN jobs
have 4 / 2 = 2 query heads, 2 lane chunks per head and a token step of 1 + 2 x 3 + 4 = 11.

`STREAM` is the same drive with the streaming engine: a channel reads its pages in
max(100 + pages x 512, batches x 100 + 512) cycles, and a phase takes the longer of its
slowest channel and its operations over the 8 lanes.
"""
import numpy as np
import pytest

from trimem import isa, numerics, special
from trimem.config import CSD_ENGINES, load_config_dict
from trimem.dram import FlashTiming
from trimem.emulator.machine import EmulatorError, Machine

pytestmark = pytest.mark.unit

DRIVE = load_config_dict({"inherits": "trimem-small", "name": "drive",
                          "csd": {"dies": 2, "planes": 2}})
STREAM = load_config_dict({"inherits": "trimem-small", "name": "stream",
                           "csd": {"dies": 2, "planes": 2, "engine": "streaming"}})
PER_PAGE = 24
KV = dict(seq=0, layer=0, kv_heads=2, head_dim=16, kv_base=0, layers=1, ctx_log2=7, kv_bits=8,
          kv_group_log2=0)
K_ADDR, V_ADDR, POS_ADDR, Q_ADDR, O_ADDR = 0x0, 0x2000, 0x4000, 0x5000, 0x6000
LATER = 0x7000
"""Positions of a second instruction in the same run."""


def kvapp(m, pos_addr=POS_ADDR):
    return isa.encode("CSD.KVAPP", m=m, k_addr=K_ADDR, v_addr=V_ADDR, pos_addr=pos_addr, **KV)


def attn(m, splits=1, topk=0, pos_addr=POS_ADDR):
    return isa.encode("CSD.ATTN", m=m, q_heads=4, q_addr=Q_ADDR, pos_addr=pos_addr,
                      o_addr=O_ADDR, splits=splits, topk=topk, **KV)


def run(machine, *words):
    machine.run({isa.Engine.CSD: list(words) + [isa.encode("HALT")]})
    return machine


def ends(machine):
    return machine.streams[isa.Engine.CSD].ends[:-1]


def with_positions(pos, timing_only=True, cfg=DRIVE):
    machine = Machine(cfg, timing_only=timing_only)
    machine.memory("CDRAM").write_array(POS_ADDR, np.asarray(pos, np.int32))
    return machine


@pytest.mark.parametrize("cfg", [DRIVE, STREAM], ids=CSD_ENGINES)
def test_attention_after_append_equals_special_attention_exactly(cfg):
    rng = np.random.default_rng(7)
    tokens, rows = 50, 2
    k = rng.integers(-4 << 12, 4 << 12, (tokens, 2, 16)).astype(np.int32)
    v = rng.integers(-4 << 12, 4 << 12, (tokens, 2, 16)).astype(np.int32)
    q = rng.integers(-4 << 12, 4 << 12, (rows, 4, 16)).astype(np.int32)
    machine = with_positions(np.arange(tokens), timing_only=False, cfg=cfg)
    cdram = machine.memory("CDRAM")
    cdram.write_array(K_ADDR, k)
    cdram.write_array(V_ADDR, v)
    cdram.write_array(Q_ADDR, q)
    cdram.write_array(LATER, np.array([48, 49], np.int32))
    run(machine, kvapp(tokens), attn(rows, splits=3, topk=5, pos_addr=LATER))
    cache = [numerics.quantize_kv(x.transpose(1, 0, 2), 8, 16) for x in (k, v)]
    want = special.attention(q, *cache, np.array([48, 49]), kv_heads=2, kv_bits=8, splits=3,
                             topk=5)
    got = cdram.read_array(O_ADDR, np.int32, (rows, 4, 16))
    np.testing.assert_array_equal(got, want)


def test_the_page_port_answers_after_the_array_read_and_the_channel_transfer():
    flash = FlashTiming(DRIVE.csd)
    assert (flash.page_read, flash.page_beats, flash.page_program) == (612, 64, 912)


def test_kv_append_programs_a_page_when_its_last_slot_is_written():
    machine = with_positions(np.arange(PER_PAGE - 1))
    machine.memory("CDRAM").write_array(LATER, np.array([PER_PAGE - 1], np.int32))
    run(machine, kvapp(PER_PAGE - 1), kvapp(1, pos_addr=LATER))
    stats = machine.engine(isa.Engine.CSD).stats
    # per row 2 + 4 appends (K and V of 2 heads) of 16 + 16 value bytes + 2 x 1 group + 6;
    # tokens 0..22 fill no page; token 23 fills page 0 of each region, 4 programs of 912
    append = 2 + 4 * 40
    assert ends(machine) == [1 + 23 * append, 1 + 23 * append + 1 + append + 4 * 912]
    assert stats.counters["csd_pages_programmed"] == 4
    assert machine.traffic["flash0"] == 4 * 512
    assert stats.energy_pj == pytest.approx(4 * DRIVE.csd.energy_pj_per_page_program
                                            + 24 * 64 * 2 * DRIVE.csd.energy_pj_per_mac)


def test_attention_cycles_are_the_jobs_of_the_closed_form():
    machine = run(with_positions([95]), attn(1))
    # one row, two jobs at ctx 96 over 4 pages per kind: queries 2 x 2 x 16 + 2 + 2, tokens
    # (96 + 96) x 11, pages 2 x 4 x (612 + 64), select 1, split 2 + 2 x 2 + 2 x 16 and
    # max / sum 2 x 2 x 96, merge 2 + 2 x (1 + 3 + 16)
    job = 68 + 2112 + 5408 + 1 + 38 + 384 + 42
    assert ends(machine) == [1 + 2 + 2 * (job + 2)]
    assert machine.traffic["flash0"] == machine.traffic["flash1"] == 8 * 512
    # each channel carries 8 pages of 512 transfer cycles (10 ns each at 100 MHz)
    assert machine.resource("flash1").busy_ps == 8 * 512 * 10_000


@pytest.mark.parametrize("pages", [1, 2, 4])
def test_pages_read_grow_linearly_with_context_length(pages):
    machine = run(with_positions([PER_PAGE * pages - 1]), attn(1))
    counters = machine.engine(isa.Engine.CSD).stats.counters
    assert counters["csd_pages_read"] == 4 * pages


def test_a_token_that_opens_a_page_costs_its_k_and_v_page_reads():
    full, opened = (ends(run(with_positions([pos]), attn(1)))[0] for pos in (23, 24))
    # per job: the token's K and V steps, its max and sum per head, two pages of 612 + 64
    assert opened - full == 2 * (2 * 11 + 2 * 2 + 2 * 676)


def test_topk_reads_every_v_page_and_trades_pruned_mixes_for_the_select():
    full = run(with_positions([95]), attn(1))
    pruned = run(with_positions([95]), attn(1, topk=2))
    counts = [m.engine(isa.Engine.CSD).stats.counters for m in (full, pruned)]
    assert [c["csd_v_pages_read"] for c in counts] == [8, 8]
    # per job: 49 passes over 96 keys; 94 pruned tokens take 2 cycles instead of 11
    assert ends(pruned)[0] - ends(full)[0] == 2 * (49 * 96 - 94 * (11 - 2))


def test_topk_at_or_above_the_context_prunes_nothing_and_selects_nothing():
    full = run(with_positions([95]), attn(1))
    wide = run(with_positions([95]), attn(1, topk=96))
    assert ends(wide) == ends(full)


def test_splits_add_their_passes_and_the_merge_of_their_partials():
    one = run(with_positions([95]), attn(1, splits=1))
    three = run(with_positions([95]), attn(1, splits=3))
    # per job and extra split: 2 + 2 x 2 chunks + 2 x 16 partial, then 2 x (3 + 16) to merge
    assert ends(three)[0] - ends(one)[0] == 2 * 2 * (38 + 2 * 19)


@pytest.mark.parametrize("cfg", [DRIVE, STREAM], ids=CSD_ENGINES)
def test_timing_only_counts_the_same_cycles_as_functional(cfg):
    runs = []
    for timing_only in (False, True):
        machine = with_positions(np.arange(30), timing_only, cfg)
        machine.memory("CDRAM").write_array(LATER, np.array([29], np.int32))
        run(machine, kvapp(30), attn(1, topk=3, pos_addr=LATER))
        stats = machine.engine(isa.Engine.CSD).stats
        runs.append((ends(machine), dict(stats.counters), stats.energy_pj))
    assert runs[0] == runs[1]


# -- the streaming engine ---------------------------------------------------------------------

def streamed(pos, *words):
    return run(with_positions(pos, cfg=STREAM), *words)


def test_streaming_append_quantizes_over_the_lanes_then_programs_over_the_channels():
    machine = with_positions(np.arange(PER_PAGE - 1), cfg=STREAM)
    machine.memory("CDRAM").write_array(LATER, np.array([PER_PAGE - 1], np.int32))
    run(machine, kvapp(PER_PAGE - 1), kvapp(1, pos_addr=LATER))
    # tokens 0..22: 23 rows x ceil(2 x 2 x 16 / 8) x 2 passes, no page is full; token 23 fills
    # pages 0, 6, 12, 18, all on channel 0 and two per die on different planes:
    # max(4 x 512 + 400, 512 + 1 x 400) after 16 cycles of quantize
    assert ends(machine) == [368, 368 + 16 + 4 * 512 + 400]
    assert machine.engine(isa.Engine.CSD).stats.counters["csd_pages_programmed"] == 4


@pytest.mark.parametrize("pages", [1, 2, 4])
def test_streaming_reads_each_programmed_page_once_over_all_channels(pages):
    machine = streamed([PER_PAGE * pages - 1], attn(1))
    assert machine.engine(isa.Engine.CSD).stats.counters["csd_pages_read"] == 4 * pages
    # K and V pages of both heads stripe evenly over the 2 channels when `pages` is even:
    # each moves 2 x pages pages after the first tR, which hides the 17 x 24 x pages + 8
    # operation cycles; the merge of the one split's partials (4 x 16 / 8) follows
    if pages % 2 == 0:
        assert ends(machine) == [100 + 2 * pages * 512 + 8]


def test_streaming_rows_share_the_page_reads_and_their_operations_bound_the_phase():
    machine = streamed([95] * 4, attn(4))
    assert machine.engine(isa.Engine.CSD).stats.counters["csd_pages_read"] == 16
    # per row: scores 4 x 16 x 96, softmax 2 x 4 x 96, weighted sums 4 x 16 x 96, partial
    # 4 x 16: 13120 operations; 4 rows over 8 lanes outlast the 100 + 8 x 512 of reading;
    # merge 4 x 4 x 16 / 8
    assert ends(machine) == [4 * 13120 // 8 + 32]


def test_streaming_topk_reads_k_pages_then_only_v_pages_that_may_hold_kept_tokens():
    full = streamed([95], attn(1))
    pruned = streamed([95], attn(1, topk=2))
    counts = [m.engine(isa.Engine.CSD).stats.counters for m in (full, pruned)]
    assert [c["csd_v_pages_read"] for c in counts] == [8, 4]
    assert [c["csd_pages_read"] for c in counts] == [16, 12]
    # K phase: 4 pages per channel; V phase: 2 pages of each head, 2 per channel, one batch
    # per die; both outlast their operations; merge 8
    assert ends(full) == [100 + 8 * 512 + 8]
    assert ends(pruned) == [(100 + 4 * 512) + (100 + 2 * 512) + 8]


def test_streaming_topk_charges_the_select_passes_over_the_lanes():
    machine = streamed([95, 95], attn(2, topk=2))
    # K phase: scores 4 x 16 x 96 and select 49 x 2 kv heads x 96 per row, 2 rows over 8
    # lanes: 3888 > 100 + 4 x 512; V phase: 2 x 2 = 4 V pages of each head, 4 per channel
    # (100 + 4 x 512); merge 2 x 4 x 16 / 8
    assert ends(machine) == [2 * (64 + 98) * 96 // 8 + 100 + 4 * 512 + 16]


def test_streaming_splits_add_their_partials_and_merge_over_the_lanes():
    one = streamed([95] * 4, attn(4, splits=1))
    three = streamed([95] * 4, attn(4, splits=3))
    # two more splits: 4 rows x 4 heads x 2 x 16 partial outputs, as many merged
    assert ends(three)[0] - ends(one)[0] == 2 * 4 * 4 * 2 * 16 // 8


def test_streaming_beats_the_sequential_schedule_by_far_on_long_contexts():
    cycles = {}
    for engine in CSD_ENGINES:
        cfg = load_config_dict({"inherits": "instinfer", "name": engine,
                                "csd": {"engine": engine}})
        word = isa.encode("CSD.ATTN", m=1, q_heads=8, q_addr=Q_ADDR, pos_addr=POS_ADDR,
                          o_addr=O_ADDR, splits=1, topk=0,
                          **{**KV, "kv_heads": 8, "head_dim": 128, "ctx_log2": 15})
        cycles[engine] = ends(run(with_positions([(1 << 15) - 1], cfg=cfg), word))[0]
    # sequential: a page in flight, 17620 + 64 cycles per 123 tokens per kind and head;
    # streaming: 2 x 8 x 267 pages over 16 channels x 4 dies x 2 planes at 5120 per page
    assert cycles["sequential"] > 40 * cycles["streaming"]


@pytest.mark.parametrize("word, message", [
    (isa.encode("CSD.ATTN", m=1, q_heads=3, q_addr=Q_ADDR, pos_addr=POS_ADDR, o_addr=O_ADDR,
                **KV), r"^CSD\[0\] .*: q_heads = 3 is not a multiple of kv_heads = 2$"),
    (isa.encode("CSD.KVAPP", m=1, k_addr=K_ADDR, v_addr=V_ADDR, pos_addr=POS_ADDR,
                **{**KV, "kv_base": 100}), r"^CSD\[0\] .*: kv_base 0x64 is not page-aligned"),
])
def test_bad_fields_are_rejected_with_the_fix(word, message):
    with pytest.raises(EmulatorError, match=message):
        run(with_positions([0]), word)


def test_positions_outside_the_cache_are_rejected():
    with pytest.raises(EmulatorError, match=r"^CSD\[0\] .*: token positions 200\.\.200 leave "
                                            r"the cache's \[0, 128\) \(ctx_log2 = 7\)"):
        run(with_positions([200]), attn(1))
