"""The CSD engine: KV append and attention in flash, bit-exact against trimem.special, with
page counts and cycles derived by hand from docs/timing.md ("CSD").

`DRIVE` = trimem-small's drive with 2 channels x 2 dies x 2 planes: 100 MHz, tR 100 cycles,
tPROG 400, 512 B pages crossing a 1 B/cycle channel in 512 cycles, 8 engine lanes. The cache:
2 kv heads of head_dim 16 at 8 bits (21-byte tokens, 24 per page), 128 tokens (6 pages) per
region; regions K0, V0, K1, V1 start at pages 0, 6, 12, 18.
"""
import numpy as np
import pytest

from trimem import isa, numerics, special
from trimem.config import load_config_dict
from trimem.emulator.machine import EmulatorError, Machine

pytestmark = pytest.mark.unit

DRIVE = load_config_dict({"inherits": "trimem-small", "name": "drive",
                          "csd": {"dies": 2, "planes": 2}})
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


def with_positions(pos, timing_only=True):
    machine = Machine(DRIVE, timing_only=timing_only)
    machine.memory("CDRAM").write_array(POS_ADDR, np.asarray(pos, np.int32))
    return machine


def test_attention_after_append_equals_special_attention_exactly():
    rng = np.random.default_rng(7)
    tokens, rows = 50, 2
    k = rng.integers(-4 << 12, 4 << 12, (tokens, 2, 16)).astype(np.int32)
    v = rng.integers(-4 << 12, 4 << 12, (tokens, 2, 16)).astype(np.int32)
    q = rng.integers(-4 << 12, 4 << 12, (rows, 4, 16)).astype(np.int32)
    machine = with_positions(np.arange(tokens), timing_only=False)
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


def test_kv_append_programs_a_page_when_its_last_slot_is_written():
    machine = with_positions(np.arange(PER_PAGE - 1))
    machine.memory("CDRAM").write_array(LATER, np.array([PER_PAGE - 1], np.int32))
    run(machine, kvapp(PER_PAGE - 1), kvapp(1, pos_addr=LATER))
    stats = machine.engine(isa.Engine.CSD).stats
    # tokens 0..22: quantize only (23 rows x ceil(2 x 2 x 16 / 8) x 2 passes), no page is full;
    # token 23 fills page 0 of each region: pages 0, 6, 12, 18, all on channel 0 and two per
    # die on different planes: max(4 x 512 + 400, 512 + 1 x 400) after 16 cycles of quantize
    assert ends(machine) == [368, 368 + 16 + 4 * 512 + 400]
    assert stats.counters["csd_pages_programmed"] == 4
    assert machine.traffic["flash0"] == 4 * 512
    assert stats.energy_pj == pytest.approx(4 * DRIVE.csd.energy_pj_per_page_program
                                            + 24 * 64 * 2 * DRIVE.csd.energy_pj_per_mac)


@pytest.mark.parametrize("pages", [1, 2, 4])
def test_pages_read_grow_linearly_with_context_length(pages):
    machine = run(with_positions([PER_PAGE * pages - 1]), attn(1))
    counters = machine.engine(isa.Engine.CSD).stats.counters
    assert counters["csd_pages_read"] == 4 * pages
    # K and V pages of both heads stripe evenly over the 2 channels when `pages` is even:
    # each channel moves 2 x pages pages after the first tR; compute (48 x pages) is hidden
    if pages % 2 == 0:
        assert ends(machine) == [100 + 2 * pages * 512]


def test_topk_reads_k_pages_then_only_v_pages_that_may_hold_kept_tokens():
    full = run(with_positions([95]), attn(1))
    pruned = run(with_positions([95]), attn(1, topk=2))
    counts = [m.engine(isa.Engine.CSD).stats.counters for m in (full, pruned)]
    assert [c["csd_v_pages_read"] for c in counts] == [8, 4]
    assert [c["csd_pages_read"] for c in counts] == [16, 12]
    # K phase: 4 pages per channel; V phase: 2 pages of each head, 2 per channel
    assert ends(full) == [100 + 8 * 512]
    assert ends(pruned) == [(100 + 4 * 512) + (100 + 2 * 512)]


def test_splits_add_the_merge_of_their_partials():
    one = run(with_positions([95]), attn(1, splits=1))
    three = run(with_positions([95]), attn(1, splits=3))
    assert ends(three)[0] - ends(one)[0] == 4 * 3 * 16 // 8


def test_timing_only_counts_the_same_cycles_as_functional():
    runs = []
    for timing_only in (False, True):
        machine = with_positions(np.arange(30), timing_only)
        machine.memory("CDRAM").write_array(LATER, np.array([29], np.int32))
        run(machine, kvapp(30), attn(1, topk=3, pos_addr=LATER))
        stats = machine.engine(isa.Engine.CSD).stats
        runs.append((ends(machine), dict(stats.counters), stats.energy_pj))
    assert runs[0] == runs[1]


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
