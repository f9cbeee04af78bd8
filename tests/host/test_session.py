"""Sessions and backends: bit-exact backends, generation, continuous batching, buckets, metrics."""
import numpy as np
import pytest

from trimem import isa
from trimem.bundle import write_bundle
from trimem.host.backends import BACKENDS, KV_INSTRUCTIONS, get_backend, retarget
from trimem.host.session import Bucket, Session, TokenStream, pick_decode, pick_prefill

pytestmark = pytest.mark.unit

BUCKETS = "prefill:8@64,decode:2@64"
PROMPT = [3, 17, 99, 5, 200]
LONG = list(range(40, 51))
"""Longer than the 8-row prefill bucket: prefilled in two chunks."""


def pair(model, hw, placement=None):
    """(emulator session, torch session) over one bundle of `model` for `hw`."""
    emu = Session(model, hw=hw, backend="emulator", buckets=BUCKETS,
                  compile_options={"placement": placement})
    return emu, Session(model, backend="torch", bundle=emu.bundle, device="cpu")


@pytest.fixture(scope="module")
def sessions(tiny_llama):
    """The tiny LLaMA on an FPGA-only machine: KV cache in HBM, attention on the VPU."""
    return pair(tiny_llama, "flightllm-u280")


@pytest.fixture(scope="module")
def all_sessions(tiny_llama):
    """The tiny LLaMA on the three-engine machine: linears in the PIM banks (placed there, as
    the roofline may prefer the MXU for so small a model), KV cache and attention in the CSD
    (slower to emulate, so fewer tests run on it)."""
    return pair(tiny_llama, "trimem-all", {"linear": "pim"})


def fresh(session, backend=None):
    """A new session over the same bundle (empty caches, clock at zero)."""
    return Session(session.model, backend=backend or session.backend.name,
                   bundle=session.bundle, device="cpu")


# ---- bit-exact backends --------------------------------------------------------------------

@pytest.mark.parametrize("machine", ["sessions", "all_sessions"])
def test_torch_and_emulator_logits_are_equal_bit_for_bit(request, machine):
    emu, ref = (fresh(s) for s in request.getfixturevalue(machine))
    (a,), (b,) = (s.prefill(LONG).logits.values() for s in (emu, ref))
    assert a.dtype == np.int32 and a.shape == (len(LONG), 256)
    np.testing.assert_array_equal(a, b)
    for _ in range(2):
        (a,), (b,) = (s.decode_step().logits.values() for s in (emu, ref))
        np.testing.assert_array_equal(a, b)


def test_batched_sequences_on_the_three_engines_match_the_reference(all_sessions):
    emu, ref = (fresh(s) for s in all_sessions)
    a = emu.generate([PROMPT, LONG], 3, temperature=0.7, seed=5)
    b = ref.generate([PROMPT, LONG], 3, temperature=0.7, seed=5)
    assert [r.ids for r in a] == [r.ids for r in b]
    assert {"PIM", "CSD"} <= set(a[0].metrics.busy_s)
    assert a[1].metrics.sim_s == b[1].metrics.sim_s > 0


def test_backends_generate_the_same_tokens_greedy_and_sampled(sessions):
    emu, ref = sessions
    for kwargs in ({}, {"temperature": 0.9, "seed": 7}):
        a = fresh(emu).generate(PROMPT, 6, **kwargs)
        b = fresh(ref).generate(PROMPT, 6, **kwargs)
        assert a.ids == b.ids and len(a.ids) == 6


def test_torch_backend_times_each_step_like_the_emulator(sessions):
    emu, ref = sessions
    a, b = fresh(emu).generate(PROMPT, 4), fresh(ref).generate(PROMPT, 4)
    assert a.metrics.sim_s == b.metrics.sim_s > 0
    assert a.metrics.energy_j == pytest.approx(b.metrics.energy_j)


# ---- generation ----------------------------------------------------------------------------

def test_seeded_sampling_repeats_and_follows_the_seed(sessions):
    emu, _ = sessions
    runs = [fresh(emu).generate(PROMPT, 8, temperature=1.5, seed=s).ids for s in (1, 1, 2)]
    assert runs[0] == runs[1] != runs[2]


def test_stream_yields_the_tokens_of_generate(sessions):
    emu, _ = sessions
    stream = fresh(emu).generate(PROMPT, 5, stream=True)
    tokens = list(stream)
    assert tokens == stream.result.ids == fresh(emu).generate(PROMPT, 5).ids


def test_stop_token_ends_generation_early(sessions):
    emu, _ = sessions
    ids = fresh(emu).generate(PROMPT, 6).ids
    stopped = fresh(emu).generate(PROMPT, 6, stop=[ids[2]])
    assert stopped.ids == ids[:ids.index(ids[2]) + 1] and stopped.finish_reason == "stop"


def test_decode_step_feeds_the_given_token(sessions):
    emu, ref = sessions
    a, b = fresh(emu), fresh(ref)
    for s in (a, b):
        s.prefill(PROMPT)
    (seq_id,) = a.sequences
    la = a.decode_step({seq_id: 42}).logits[seq_id]
    lb = b.decode_step({seq_id: 42}).logits[seq_id]
    np.testing.assert_array_equal(la, lb)
    assert a.sequences[seq_id].fed == PROMPT + [42]


def test_rewound_sequence_gives_the_logits_of_a_fresh_one(sessions):
    for backend in sessions:
        session = fresh(backend)
        (seq,) = (session.sequences[i] for i in session.prefill(PROMPT + [7, 8, 9]).logits)
        got = session.prefill([11, 12], seq, at=len(PROMPT) + 1).logits[seq.id]
        (want,) = fresh(backend).prefill(PROMPT + [7, 11, 12]).logits.values()
        np.testing.assert_array_equal(got, want[-2:])
        assert seq.fed == PROMPT + [7, 11, 12] and seq.length == len(PROMPT) + 3


def test_kept_sequence_holds_its_slot_after_finishing_until_removed(sessions):
    emu, _ = sessions
    session = fresh(emu)
    seq = session.add(PROMPT, 3, keep=True)
    tokens = list(TokenStream(session, seq))
    assert tokens == fresh(emu).generate(PROMPT, 3).ids
    assert seq.finished and seq.slot == 0 and session.running() == [seq]
    got = session.prefill([5], seq).logits[seq.id]
    (want,) = fresh(emu).prefill(PROMPT + tokens[:2] + [5]).logits.values()
    np.testing.assert_array_equal(got, want[-1:])
    session.remove(seq)
    assert seq.slot is None and session.running() == []


def test_bad_rewinds_are_rejected_with_the_fix(sessions):
    emu, _ = sessions
    session = fresh(emu)
    (seq,) = (session.sequences[i] for i in session.prefill(PROMPT).logits)
    with pytest.raises(ValueError, match=r"^at 6 must be a position in \[0, 5\], the tokens "
                                         r"sequence 0 holds$"):
        session.prefill([1], seq, at=6)
    with pytest.raises(ValueError, match=r"^at 2 rewinds a sequence, and none was given; "
                                         r"pass seq=$"):
        session.prefill([1], at=2)
    session.remove(seq)
    with pytest.raises(ValueError, match=r"^sequence 0 holds no slot; prefill a new sequence, "
                                         r"or add it with keep=True"):
        session.prefill([1], seq)


# ---- continuous batching -------------------------------------------------------------------

def test_batched_sequences_match_the_same_sequences_run_alone(sessions):
    emu, _ = sessions
    alone = [fresh(emu).generate(p, n).ids for p, n in ((PROMPT, 5), (LONG, 3))]
    together = fresh(emu).generate([PROMPT, LONG], 5)
    assert together[0].ids == alone[0]
    assert together[1].ids[:3] == alone[1]


def test_sequences_join_and_leave_between_decode_steps(sessions):
    emu, ref = sessions
    for session in (fresh(emu), fresh(ref)):
        first = session.add(PROMPT, max_new_tokens=6)
        session.step()
        session.step()
        late = session.add(LONG, max_new_tokens=2)
        third = session.add([7, 8, 9], max_new_tokens=3)
        while not all(s.finished for s in (first, late, third)):
            session.step()
        assert first.generated == fresh(emu).generate(PROMPT, 6).ids
        assert late.generated == fresh(emu).generate(LONG, 2).ids
        assert third.generated == fresh(emu).generate([7, 8, 9], 3).ids
        assert session.running() == []


def test_a_joining_sequence_gets_a_token_from_prefill_and_one_from_decode(sessions):
    emu, _ = sessions
    session = fresh(emu)
    seq = session.add(PROMPT, max_new_tokens=4)
    result = session.step()
    assert result.tokens[seq.id] == seq.generated and len(seq.generated) == 2
    assert result.logits[seq.id].shape == (len(PROMPT) + 1, 256)


def test_prompt_goes_through_decode_steps_when_no_prefill_bucket_fits(sessions, tiny_llama):
    emu, _ = sessions
    decode_only = Session(tiny_llama, hw=emu.config, backend="emulator",
                          buckets="decode:2@64")
    result = decode_only.generate(LONG, 3)
    assert result.ids == fresh(emu).generate(LONG, 3).ids
    assert result.metrics.steps == len(LONG) + 2


def test_more_prompts_than_slots_wait_for_a_free_slot(sessions):
    emu, _ = sessions
    prompts = [PROMPT, LONG, [9, 9, 9]]
    results = fresh(emu).generate(prompts, 3)
    assert [r.ids for r in results] == [fresh(emu).generate(p, 3).ids for p in prompts]
    assert results[2].metrics.ttft_s > results[0].metrics.ttft_s


def test_prefill_for_a_later_slot_rewrites_only_the_seq_fields(sessions):
    emu, _ = sessions
    entry = emu.bundle.entry("prefill_m8_c64")
    moved = retarget(entry, 1)
    assert retarget(entry, 0) is entry.programs
    changed = 0
    for engine, words in entry.programs.items():
        for old, new in zip(words, moved[engine], strict=True):
            a, b = isa.decode(old), isa.decode(new)
            if a != b:
                changed += 1
                assert a.name in KV_INSTRUCTIONS and b.fields == {**a.fields, "seq": 1}
    assert changed == 2 * emu.bundle.model["layers"]


# ---- buckets -------------------------------------------------------------------------------

GRID = [Bucket("d1", "decode", 1, 64), Bucket("d1b", "decode", 1, 512),
        Bucket("d4", "decode", 4, 64), Bucket("p16", "prefill", 16, 64),
        Bucket("p16b", "prefill", 16, 512), Bucket("p64", "prefill", 64, 512)]


def test_smallest_fitting_bucket_is_picked():
    assert pick_decode(GRID, 1, 10).name == "d1"
    assert pick_decode(GRID, 1, 100).name == "d1b"
    assert pick_decode(GRID, 3, 10).name == "d4"
    assert pick_decode(GRID, 3, 100) is None
    assert pick_prefill(GRID, 0, 5).name == "p16"
    assert pick_prefill(GRID, 50, 5).name == "p16b"
    assert pick_prefill(GRID, 0, 17).name == "p64"
    assert pick_prefill(GRID, 500, 5) is None


def test_context_beyond_every_bucket_names_the_fix(sessions):
    emu, _ = sessions
    with pytest.raises(ValueError, match=r"^no decode bucket holds 1 sequence\(s\) at context "
                                         r"\d+; compile with a larger decode bucket"):
        fresh(emu).generate(list(range(60)), 8)


# ---- metrics -------------------------------------------------------------------------------

def test_metrics_are_in_simulated_time_next_to_wall_time(sessions):
    emu, _ = sessions
    session = fresh(emu)
    m = session.generate(PROMPT, 5).metrics
    assert m.prompt_tokens == 5 and m.generated_tokens == 5 and m.steps == 5
    assert 0 < m.ttft_s < m.sim_s and 0 < m.tpot_s
    assert m.tokens_per_s == pytest.approx(5 / m.sim_s)
    assert m.energy_per_token_j == pytest.approx(m.energy_j / 5) and m.energy_j > 0
    assert m.bytes["HBM"] > 0 and m.wall_s > 0
    assert set(m.utilization) >= {"DMA", "VPU"}
    assert all(0 <= u <= 1 for u in m.utilization.values())
    assert session.metrics().sim_s == pytest.approx(m.sim_s)
    assert "TTFT" in m.table()


# ---- errors and loading --------------------------------------------------------------------

def test_unknown_backend_is_rejected_with_the_valid_names():
    with pytest.raises(ValueError, match=r"^unknown backend 'gpu'; valid backends: "
                                         r"\['emulator', 'torch', 'verilator'\]$"):
        get_backend("gpu")
    assert set(BACKENDS) == {"emulator", "torch", "verilator"}


def test_verilator_backend_refuses_a_machine_beyond_the_rtl(sessions):
    emu, _ = sessions
    with pytest.raises(ValueError, match=r"^the RTL co-simulates small machines, and "
                                         r"'flightllm-u280' is not one \(config 'flightllm-u280' "
                                         r"lacks pim, csd; .*\); compile for hw='trimem-small' "
                                         r"or use backend='emulator'$"):
        Session(backend="verilator", bundle=emu.bundle)


@pytest.mark.slow
@pytest.mark.cosim
def test_verilator_backend_matches_the_emulator_bit_for_bit_and_cycle_for_cycle(tiny_llama):
    """The tiny LLaMA on trimem-small's RTL: every engine's stream, the KV cache in its flash."""
    emu = Session(tiny_llama, hw="trimem-small", backend="emulator",
                  buckets="prefill:4@16,decode:1@16",
                  compile_options={"placement": {"linear": "mxu"}})
    rtl = Session(backend="verilator", bundle=emu.bundle)
    for a, b in ((emu.prefill(PROMPT), rtl.prefill(PROMPT)),
                 (emu.decode_step(), rtl.decode_step()), (emu.decode_step(), rtl.decode_step())):
        (x,), (y,) = a.logits.values(), b.logits.values()
        np.testing.assert_array_equal(x, y)
    steps = [r.report for r in rtl.records]
    assert len(steps) == 4 and all(r["rtl_cycles"] == r["cycles"] > 0 for r in steps)
    assert rtl.records[-1].report["per_engine"].keys() >= {"DMA", "MXU", "VPU", "PIM", "CSD"}
    rtl.backend.close()


def test_torch_backend_needs_the_model_besides_a_bundle(sessions):
    emu, _ = sessions
    with pytest.raises(ValueError, match=r"^the quantized graph needs the model's weights, "
                                         r"and this session has only a bundle"):
        Session(backend="torch", bundle=emu.bundle)


def test_prompt_outside_the_vocabulary_is_rejected(sessions):
    emu, _ = sessions
    with pytest.raises(ValueError, match=r"^token ids \[256\] are outside the vocabulary "
                                         r"\[0, 256\)"):
        fresh(emu).generate([1, 256], 2)


def test_text_prompt_without_a_tokenizer_names_the_fix(sessions):
    emu, _ = sessions
    with pytest.raises(ValueError, match=r"^no tokenizer found for model .*; pass "
                                         r"tokenizer=\.\.\. to Session or give token ids$"):
        fresh(emu).generate("hello", 2)


def test_session_runs_a_bundle_read_from_disk(sessions, tmp_path):
    emu, _ = sessions
    write_bundle(emu.bundle, tmp_path / "b")
    loaded = Session(bundle=tmp_path / "b")
    assert loaded.generate(PROMPT, 4).ids == fresh(emu).generate(PROMPT, 4).ids
