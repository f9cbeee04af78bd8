"""`trimem demo`: buckets, the engine table and verdict, errors; the whole demo on SmolLM2."""
import re

import numpy as np
import pytest

from trimem.host import cli
from trimem.host.demo import demo_buckets, engine_table, run_demo, teacher_forced, verdict
from trimem.host.session import Metrics, Session, TokenStream

PROMPT = [3, 17, 99, 5, 200]


@pytest.mark.unit
def test_demo_buckets_hold_the_prompt_and_the_new_tokens():
    assert demo_buckets(5, 12) == "prefill:16@64,decode:1@64"
    assert demo_buckets(60, 12) == "prefill:16@128,decode:1@128"


@pytest.mark.unit
def test_engine_table_lists_the_busiest_engine_first_per_token():
    m = Metrics(busy_s={"DMA": 2e-3, "PIM": 6e-3, "VPU": 1e-3},
                utilization={"DMA": 0.2, "PIM": 0.6, "VPU": 0.1},
                engine_energy_j={"DMA": 1e-3, "PIM": 4e-3, "VPU": 0.0})
    rows = engine_table(m, 2)
    assert [r[0] for r in rows] == ["PIM", "DMA", "VPU"]
    assert rows[0][1:] == pytest.approx((3.0, 0.6, 2.0))


@pytest.mark.unit
def test_verdict_names_the_bottleneck_and_what_it_does():
    line = verdict([("PIM", 3.0, 0.6, 2.0), ("DMA", 1.0, 0.2, 0.5)], 5.0)
    assert line == ("verdict: each decode token takes 5.000 ms of simulated time; PIM is the "
                    "bottleneck, busy 60% of it (decode linears (GEMV) streamed through the "
                    "DRAM banks), then DMA at 20%.")


@pytest.mark.unit
def test_teacher_forcing_reuses_the_agreeing_steps_and_equals_a_fresh_prefill(tiny_llama):
    bundle = Session(tiny_llama, hw="flightllm-u280", buckets="prefill:8@64,decode:1@64").bundle
    for same in (0, 2, 4):
        session = Session(bundle=bundle)
        seq = session.add(PROMPT, 4, stop=(), keep=True)
        generated = list(TokenStream(session, seq))
        cont = generated[:same] + [(t + 1) % 256 for t in generated[same:]]
        runs = len(session.records)
        top = teacher_forced(session, seq, PROMPT, cont, same)
        (logits,) = Session(bundle=bundle).prefill(PROMPT + cont).logits.values()
        np.testing.assert_array_equal(top, logits[len(PROMPT) - 1:-1].argmax(-1))
        assert len(session.records) == runs + (same < len(cont) - 1)


@pytest.mark.unit
@pytest.mark.parametrize("argv, message", [
    (["--model", "/no/such/model"], r"model path '/no/such/model' is not a directory or "
                                    r"\.gguf file; pass a local checkpoint or one of "),
    (["--hw", "no-such-preset"], r"unknown hardware preset 'no-such-preset'; use one of "),
    (["--tokens", "0"], r"--tokens 0 must be a positive integer"),
])
def test_bad_arguments_give_one_line_errors_with_the_fix(capsys, argv, message):
    assert cli.main(["demo", *argv]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert re.match(r"^trimem demo: error: " + message, err)


@pytest.mark.unit
def test_demo_is_listed_in_the_help(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for name in ("demo", "generate", "compare"):
        assert f"    {name}" in out


@pytest.mark.e2e
@pytest.mark.slow
def test_demo_generates_on_the_emulator_and_explains_the_time():
    lines = []
    out = run_demo(tokens=4, write=lines.append)
    text = "\n".join(lines)
    print(text)
    for key in ("PyTorch: ", "Trimem:  ", "agreement: ", "busy ms/token", "verdict: "):
        assert key in text
    assert len(out["trimem_ids"]) == 4 and 0 <= out["teacher_forced_agreement"] <= 1
    assert {r["engine"] for r in out["engines"]} >= {"PIM", "CSD"}


@pytest.mark.e2e
@pytest.mark.slow
def test_model_that_does_not_fit_the_hardware_names_the_fix():
    with pytest.raises(ValueError, match=r"overflows .* by \d+ bytes.*; use "):
        run_demo(tokens=2, hw="trimem-small", write=lambda line: None)
