"""Sessions: compile a model once, then prefill, decode and generate on a backend.

A `Session` holds a compiled bundle, a backend that keeps the weights and the KV cache of
every sequence slot, and a simulated clock. Sequences join (`add`) and leave (when they
finish) between steps, so one decode step serves every running sequence (continuous
batching, Yu et al., "Orca", OSDI'22). Each step runs on the bundle entry whose length bucket
fits it: the smallest prefill chunk that holds the prompt, the smallest decode batch that
holds the running slots, each at the shortest context that holds their positions.

Every result carries `Metrics` in simulated hardware time (from the emulator's reports),
next to the wall time the emulation took.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from trimem.host.backends import Batch, get_backend
from trimem.numerics import from_fx

DEFAULT_HW = "trimem-all"
DEFAULT_QUANT = "w4a8kv4"


# ---- model and tokenizer -------------------------------------------------------------------

def load_source(model):
    """The float transformers model behind `model` (an object, "smollm2-135m", a directory or
    a .gguf file), loaded once per path; None for a known config name (shapes only)."""
    from trimem.compiler import frontend

    if not isinstance(model, (str, os.PathLike)):
        return model
    if model == "smollm2-135m":
        return frontend.load_model(frontend.smollm2_gguf())
    if model in frontend.MODELS:
        return None
    return frontend.load_model(os.fspath(model))


@functools.lru_cache(maxsize=4)
def _tokenizer_at(path: str, gguf_file: str | None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, gguf_file=gguf_file, local_files_only=True)


def load_tokenizer(model):
    """The tokenizer of `model` (as `load_source` takes it), or None when it has none locally."""
    from trimem.compiler import frontend

    if isinstance(model, (str, os.PathLike)):
        path = frontend.smollm2_gguf() if model == "smollm2-135m" else os.fspath(model)
    else:
        path = getattr(getattr(model, "config", None), "name_or_path", "") or ""
    if path.endswith(".gguf"):
        return _tokenizer_at(*os.path.split(os.path.abspath(path)))
    if os.path.isdir(path):
        try:
            return _tokenizer_at(os.path.abspath(path), None)
        except (OSError, ValueError):
            return None
    return None


# ---- metrics -------------------------------------------------------------------------------

class StepRecord(NamedTuple):
    """One backend step: its entry, real rows per sequence id, report and times."""
    phase: str
    entry: str
    rows: dict
    report: dict | None
    wall_s: float


@dataclass
class Metrics:
    """Speed and cost of a call in simulated hardware time, next to the emulation's wall time.

    Members
    -------
    prompt_tokens, generated_tokens, steps : counts.
    sim_s : simulated seconds of the steps taken.
    ttft_s : time to first token (joining to the first sampled token), simulated.
    tpot_s : time per output token after the first, simulated.
    tokens_per_s : generated tokens over the simulated time from joining to the last token.
    energy_j, energy_per_token_j : simulated energy, a batched step's split by rows.
    bytes : bytes moved per memory and link (a batched step's split by rows).
    busy_s : per engine, simulated seconds busy in the steps taken.
    engine_energy_j : per engine, simulated energy (a batched step's split by rows).
    utilization : per engine, busy_s / sim_s.
    wall_s : wall-clock seconds the backend spent.

    Simulated values are None when the backend did not time the steps.
    """
    prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    sim_s: float | None = None
    ttft_s: float | None = None
    tpot_s: float | None = None
    tokens_per_s: float | None = None
    energy_j: float | None = None
    energy_per_token_j: float | None = None
    bytes: dict = field(default_factory=dict)
    busy_s: dict = field(default_factory=dict)
    engine_energy_j: dict = field(default_factory=dict)
    utilization: dict = field(default_factory=dict)
    wall_s: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def table(self) -> str:
        """A short text summary, one quantity per line."""
        def fmt(value, scale, unit):
            return "n/a" if value is None else f"{value * scale:.4g} {unit}"

        lines = [f"tokens: {self.prompt_tokens} prompt, {self.generated_tokens} generated, "
                 f"{self.steps} steps",
                 f"simulated: {fmt(self.sim_s, 1e3, 'ms')}, TTFT {fmt(self.ttft_s, 1e3, 'ms')}, "
                 f"per token {fmt(self.tpot_s, 1e3, 'ms')}, "
                 f"{fmt(self.tokens_per_s, 1, 'tokens/s')}",
                 f"energy: {fmt(self.energy_j, 1e3, 'mJ')}, "
                 f"{fmt(self.energy_per_token_j, 1e3, 'mJ/token')}",
                 f"wall time of the emulation: {self.wall_s:.3f} s"]
        if self.utilization:
            lines.append("utilization: " + ", ".join(f"{k} {v:.1%}" for k, v in
                                                      self.utilization.items()))
        return "\n".join(lines)


def summarize(records, seq_id=None) -> Metrics:
    """Metrics of the steps in `records`; with `seq_id`, that sequence's share of them."""
    out = Metrics(steps=len(records))
    timed = bool(records) and all(r.report is not None for r in records)
    sim, energy, nbytes, busy, engine_energy = 0.0, 0.0, {}, {}, {}
    for r in records:
        out.wall_s += r.wall_s
        if not timed:
            continue
        share = 1.0 if seq_id is None else r.rows.get(seq_id, 0) / sum(r.rows.values())
        rep = r.report
        sim += rep["seconds"]
        energy += share * rep["energy_j"]
        for name, value in rep["bytes"].items():
            nbytes[name] = nbytes.get(name, 0) + share * value
        for name, e in rep["per_engine"].items():
            busy[name] = busy.get(name, 0.0) + e["busy"] / (e["clock_mhz"] * 1e6)
            engine_energy[name] = engine_energy.get(name, 0.0) + share * e["energy_j"]
    if timed:
        out.sim_s, out.energy_j = sim, energy
        out.bytes = {k: int(round(v)) for k, v in nbytes.items()}
        out.busy_s, out.engine_energy_j = busy, engine_energy
        out.utilization = {k: v / sim if sim else 0.0 for k, v in busy.items()}
    return out


# ---- sequences -----------------------------------------------------------------------------

def sample(logits, temperature: float, rng) -> int:
    """The next token from one row of fx logits: argmax at temperature 0, else a draw from
    softmax(logits / temperature) with the sequence's seeded generator."""
    if temperature == 0:
        return int(np.argmax(logits))
    z = from_fx(logits) / temperature
    p = np.exp(z - z.max())
    return int(rng.choice(len(p), p=p / p.sum()))


@dataclass(eq=False)
class Sequence:
    """One sequence of a session: its slot, tokens, sampling and clock marks.

    Members
    -------
    id : session-unique number.
    prompt : the prompt token ids.
    max_new_tokens, temperature, stop : generation settings (stop: token ids that end it).
    slot : KV cache slot while running, None while waiting or after it left.
    length : tokens in its KV cache.
    fed : every token fed so far (prompt first).
    generated : every token sampled so far.
    next_token : the token the next decode step feeds.
    finish_reason : None while running, then "length", "stop" or "removed".
    keep : once finished, hold the slot and KV cache until `Session.remove`, so that a
        `prefill` can feed it more (a next turn, or a rewind with `at`).
    """
    id: int
    prompt: list
    max_new_tokens: int
    temperature: float
    rng: np.random.Generator
    stop: tuple
    keep: bool = False
    slot: int | None = None
    length: int = 0
    fed: list = field(default_factory=list)
    generated: list = field(default_factory=list)
    next_token: int | None = None
    finish_reason: str | None = None
    joined_s: float = 0.0
    token_s: list = field(default_factory=list)
    records: list = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def take(self, logits, now: float) -> int:
        """Sample the next token from the last row of `logits` and note when it came."""
        token = sample(logits[-1], self.temperature, self.rng)
        self.generated.append(token)
        self.token_s.append(now)
        self.next_token = token
        if token in self.stop:
            self.finish_reason = "stop"
        elif len(self.generated) >= self.max_new_tokens:
            self.finish_reason = "length"
        return token

    def metrics(self, timed: bool) -> Metrics:
        out = summarize(self.records, self.id)
        out.prompt_tokens, out.generated_tokens = len(self.prompt), len(self.generated)
        if timed and self.token_s:
            first, last = self.token_s[0], self.token_s[-1]
            out.ttft_s = first - self.joined_s
            n = len(self.generated)
            out.tpot_s = (last - first) / (n - 1) if n > 1 else None
            out.tokens_per_s = n / (last - self.joined_s) if last > self.joined_s else None
            out.energy_per_token_j = out.energy_j / n
        return out


# ---- results -------------------------------------------------------------------------------

@dataclass
class StepResult:
    """What one `prefill`, `decode_step` or `step` did.

    Members
    -------
    logits : sequence id -> fx int32 [rows, vocab] of the rows it fed.
    tokens : sequence id -> the tokens sampled for it (two for a sequence that joined: one
        after its prefill, one after the decode step).
    finished : ids of the sequences that finished in this call (they left, unless kept).
    metrics : the call's Metrics (all sequences).
    """
    logits: dict
    tokens: dict
    finished: list
    metrics: Metrics


@dataclass
class GenerateResult:
    """A finished generation: prompt and new token ids, text when a tokenizer is at hand,
    why it stopped, and its metrics."""
    prompt_ids: list
    ids: list
    text: str | None
    finish_reason: str
    metrics: Metrics


class TokenStream:
    """Iterator over the tokens of one sequence as they are sampled; `result` once done."""

    def __init__(self, session: Session, seq: Sequence):
        self.session, self.seq, self.sent = session, seq, 0
        self.result: GenerateResult | None = None

    def __iter__(self):
        return self

    def __next__(self) -> int:
        seq = self.seq
        while self.sent == len(seq.generated) and not seq.finished:
            self.session.step()
        if self.sent < len(seq.generated):
            self.sent += 1
            return seq.generated[self.sent - 1]
        self.result = self.session.result(seq)
        raise StopIteration


# ---- buckets -------------------------------------------------------------------------------

class Bucket(NamedTuple):
    """A bundle entry's shape: name, phase, rows and context (from the entry's meta)."""
    name: str
    phase: str
    rows: int
    ctx: int


def buckets_of(bundle) -> list:
    """The bundle's entries as Buckets, smallest first."""
    out = [Bucket(e.name, e.meta["phase"], int(e.meta["rows"]), int(e.meta["ctx"]))
           for e in bundle.entries.values()]
    return sorted(out, key=lambda b: (b.rows, b.ctx))


def pick_prefill(buckets, start: int, length: int):
    """The smallest prefill bucket for `length` tokens from position `start` (its padding rows
    included), or None."""
    for b in buckets:
        if b.phase == "prefill" and b.rows >= length and b.ctx >= start + b.rows:
            return b
    return None


def pick_decode(buckets, slots: int, end: int):
    """The smallest decode bucket with at least `slots` rows and context `end`, or None."""
    for b in buckets:
        if b.phase == "decode" and b.rows >= slots and b.ctx >= end:
            return b
    return None


# ---- the session ---------------------------------------------------------------------------

class Session:
    """A compiled model on a backend, with its KV cache, sequences and simulated clock.

    Parameters
    ----------
    model : a transformers model object, "smollm2-135m", a model directory or .gguf file;
        None when `bundle` is given and the backend needs no graph (the emulator).
    hw : a preset name, a YAML path or a HardwareConfig.
    quant : "w4a8kv4", "w8a8kv8", ... (`trimem.compiler.quantize.QuantSpec`).
    sparsity, sparse_layers : N:M pattern ("2:4") and the blocks it prunes ("mlp", ...).
    backend : "emulator", "torch" or "verilator" (`trimem.host.backends`).
    bundle : a Bundle or a bundle directory to load instead of compiling; its quantization,
        sparsity and layer count then replace `quant`, `sparsity` and `sparse_layers`.
    buckets : length buckets for the compiler, "prefill:64@1024,decode:1@1024".
    device : torch device of the torch backend (default: CUDA when available).
    tokenizer : a transformers tokenizer; by default the model's own, loaded when needed.
    progress : tqdm progress bars while compiling.
    compile_options : more keyword arguments of `compile_model` (layers, placement, ...).

    Examples
    --------
    >>> s = Session("smollm2-135m", sparsity="2:4")            # doctest: +SKIP
    >>> r = s.generate("The capital of France is", 8)          # doctest: +SKIP
    >>> print(r.text, r.metrics.tokens_per_s)                  # doctest: +SKIP
    """

    def __init__(self, model=None, hw=DEFAULT_HW, quant=DEFAULT_QUANT, sparsity=None,
                 sparse_layers="mlp", backend="emulator", bundle=None, *, buckets=None,
                 device=None, tokenizer=None, progress=False, compile_options=None):
        from trimem.bundle import read_bundle
        from trimem.emulator.runner import bundle_config

        factory = get_backend(backend)
        if model is None and bundle is None:
            raise ValueError("Session needs a model to compile or a bundle to load; pass "
                             "model='smollm2-135m' (or a path) or bundle=DIR")
        self.model, self.source = model, None if model is None else load_source(model)
        if bundle is None:
            from trimem.compiler.pipeline import compile_model

            self.options = {"quant": quant, "sparsity": sparsity,
                            "sparse_layers": sparse_layers, **(compile_options or {})}
            bundle = compile_model(self.source if self.source is not None else model, hw,
                                   buckets=buckets, with_tests=False, progress=progress,
                                   **self.options)
        else:
            bundle = bundle if hasattr(bundle, "entries") else read_bundle(bundle)
            q = bundle.quant
            self.options = {"quant": q["spec"], "sparsity": q["sparsity"],
                            "sparse_layers": q["sparse_blocks"],
                            "layers": bundle.model["layers"], **(compile_options or {})}
        self.bundle = bundle
        self.config = bundle_config(bundle)
        self.buckets = buckets_of(bundle)
        decode_rows = [b.rows for b in self.buckets if b.phase == "decode"]
        self.slots: list = [None] * max(decode_rows, default=1)
        self._graph = None
        graph = self.graph if backend == "torch" else None
        self.backend = factory(bundle, graph, self.config, device)
        self._tokenizer = tokenizer
        self.clock_s = 0.0
        self.records: list = []
        self.sequences: dict = {}
        self.waiting: list = []
        self._ids = 0

    # -- model pieces ----------------------------------------------------------------------

    @property
    def graph(self):
        """The quantized graph the bundle was compiled from (built on first use)."""
        if self._graph is None:
            if self.source is None:
                raise ValueError("the quantized graph needs the model's weights, and this "
                                 "session has only a bundle; pass the model too, or use "
                                 "backend='emulator'")
            from trimem.compiler import pipeline
            from trimem.compiler.ir import Step

            graph = pipeline.load_graph(self.source, Step(1, "decode", 1), False)
            layers = self.options.get("layers")
            if layers is not None:
                graph = pipeline.keep_layers(graph, min(layers, graph.spec.layers))
            q = self.bundle.quant
            opts = {"quant": q["spec"], "sparsity": q["sparsity"],
                    "sparse_blocks": q["sparse_blocks"], "prune_metric": q.get("prune_metric"),
                    "smooth_alpha": q.get("smooth_alpha"), "calib_ids": q.get("calib_ids")}
            for _, run in pipeline.MODEL_PASSES:
                graph = run(graph, self.config, opts)
            self._graph = graph
        return self._graph

    @property
    def tokenizer(self):
        """The tokenizer for text prompts; ValueError when the model has none at hand."""
        if self._tokenizer is None:
            self._tokenizer = None if self.model is None else load_tokenizer(self.model)
            if self._tokenizer is None:
                raise ValueError(f"no tokenizer found for model {self.name!r}; pass "
                                 "tokenizer=... to Session or give token ids")
        return self._tokenizer

    @property
    def name(self) -> str:
        """The model's name as the bundle records it."""
        return str(self.bundle.model["name"])

    @property
    def vocab(self) -> int:
        return int(self.bundle.model["vocab"])

    def encode(self, prompt) -> list:
        """Token ids of a text prompt or a sequence of ids (checked against the vocabulary)."""
        if isinstance(prompt, str):
            ids = list(self.tokenizer(prompt)["input_ids"])
        else:
            ids = [int(t) for t in (prompt.tolist() if hasattr(prompt, "tolist") else prompt)]
        if not ids:
            raise ValueError("the prompt is empty; give at least one token")
        bad = [t for t in ids if not 0 <= t < self.vocab]
        if bad:
            raise ValueError(f"token ids {bad[:4]!r} are outside the vocabulary "
                             f"[0, {self.vocab}); check the tokenizer matches the model")
        return ids

    def decode(self, ids) -> str:
        """Text of token ids."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # -- sequences ---------------------------------------------------------------------------

    def add(self, prompt, max_new_tokens=16, temperature=0.0, seed=None, stop=None,
            keep=False) -> Sequence:
        """Queue a sequence; it joins a free slot and is prefilled at the next `step`.

        `stop` is a collection of token ids that end it (default: the tokenizer's EOS when a
        tokenizer is loaded). With `keep` it holds its slot and KV cache after it finishes,
        until `remove`.
        """
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens {max_new_tokens!r} must be a positive integer")
        if not isinstance(temperature, (int, float)) or temperature < 0:
            raise ValueError(f"temperature {temperature!r} must be a number >= 0")
        ids = self.encode(prompt)
        if stop is None:
            eos = getattr(self._tokenizer, "eos_token_id", None)
            stop = () if eos is None else (eos,)
        seq = Sequence(self._ids, ids, max_new_tokens, float(temperature),
                       np.random.default_rng(seed), tuple(stop), bool(keep),
                       joined_s=self.clock_s)
        self._ids += 1
        self.sequences[seq.id] = seq
        self.waiting.append(seq)
        return seq

    def _admit(self, seq: Sequence) -> None:
        if None not in self.slots:
            raise ValueError(f"all {len(self.slots)} sequence slots are busy; wait for one to "
                             "finish or compile a larger decode batch (--buckets decode:N@CTX)")
        seq.slot = self.slots.index(None)
        self.slots[seq.slot] = seq
        self.backend.reset(seq.slot)

    def _leave(self, seq: Sequence) -> None:
        if seq.slot is not None:
            self.slots[seq.slot] = None
            self.backend.reset(seq.slot)
            seq.slot = None

    def remove(self, seq: Sequence) -> None:
        """Let a sequence leave now, finished or not; its slot is free for the next one."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        if not seq.finished:
            seq.finish_reason = "removed"
        self._leave(seq)

    def running(self) -> list:
        """The sequences holding a slot, by slot."""
        return [s for s in self.slots if s is not None]

    # -- steps -------------------------------------------------------------------------------

    def _run(self, phase, bucket: Bucket, rows: list, seqs: dict) -> tuple:
        """Run one batch: rows are (slot, id, pos, real); returns (logits, record)."""
        m = bucket.rows
        ids, pos = np.zeros(m, np.int32), np.zeros(m, np.int32)
        real, slots = np.zeros(m, bool), [0] * m
        for r, (slot, token, p, is_real) in enumerate(rows):
            ids[r], pos[r], real[r], slots[r] = token, p, is_real, slot
        if phase == "prefill":
            slots = [rows[0][0]] * m
            last = rows[-1][2]
            pos[len(rows):] = np.arange(last + 1, last + 1 + m - len(rows))
        out = self.backend.run(Batch(bucket.name, ids, pos, tuple(slots), real))
        record = StepRecord(phase, bucket.name, seqs, out.report, out.wall_s)
        self.records.append(record)
        if out.report is not None:
            self.clock_s += out.report["seconds"]
        return out.logits, record

    def _prefill_chunks(self, seq: Sequence, ids: list) -> np.ndarray:
        """Feed `ids` to a running sequence through prefill buckets (or decode steps when no
        prefill bucket fits); return the logits of every fed row."""
        outs = []
        largest = max((b.rows for b in self.buckets if b.phase == "prefill"), default=0)
        done = 0
        while done < len(ids):
            chunk = ids[done:done + max(largest, 1)]
            bucket = pick_prefill(self.buckets, seq.length, len(chunk))
            if bucket is None:
                chunk = ids[done:done + 1]
                outs.append(self._decode({seq.id: chunk[0]})[seq.id])
            else:
                rows = [(seq.slot, t, seq.length + i, True) for i, t in enumerate(chunk)]
                logits, record = self._run("prefill", bucket, rows, {seq.id: len(chunk)})
                seq.records.append(record)
                seq.length += len(chunk)
                seq.fed += chunk
                outs.append(logits)
            done += len(chunk)
        return np.concatenate(outs)

    def _decode(self, feed: dict) -> dict:
        """One decode step feeding feed[seq id] to each of those running sequences."""
        running = self.running()
        stepping = [s for s in running if s.id in feed]
        end = max(s.length for s in running) + 1
        bucket = pick_decode(self.buckets, max(s.slot for s in running) + 1, end)
        if bucket is None:
            raise ValueError(f"no decode bucket holds {len(running)} sequence(s) at context "
                             f"{end}; compile with a larger decode bucket (--buckets "
                             f"decode:{len(self.slots)}@{2 * end})")
        rows = [(slot, 0, 0, False) for slot in range(bucket.rows)]
        for s in running:
            rows[s.slot] = (s.slot, feed.get(s.id, 0), s.length, s.id in feed)
        logits, record = self._run("decode", bucket, rows, {s.id: 1 for s in stepping})
        out = {}
        for i, s in enumerate(sorted(stepping, key=lambda s: s.slot)):
            out[s.id] = logits[i:i + 1]
            s.records.append(record)
            s.length += 1
            s.fed.append(feed[s.id])
        return out

    def _result(self, logits, tokens, finished, first: int) -> StepResult:
        for seq_id in finished:
            seq = self.sequences[seq_id]
            if not seq.keep:
                self._leave(seq)
        return StepResult(logits, tokens, finished, summarize(self.records[first:]))

    def prefill(self, ids, seq: Sequence | None = None, *, at: int | None = None) -> StepResult:
        """Feed prompt tokens: to a new sequence (it takes a free slot now) or to `seq`.

        With `at`, `seq` first forgets its tokens from position `at` on and `ids` go there
        (a rollback, as speculative decoding does): those cache positions are written again
        before any row reads them, since every row appends its K and V before its attention
        reads the cache. The result holds the logits of every fed row, and the token sampled
        from the last.
        """
        first = len(self.records)
        if seq is None and at is not None:
            raise ValueError(f"at {at!r} rewinds a sequence, and none was given; pass seq=")
        if seq is None:
            seq = self.add(ids)
            self.waiting.remove(seq)
            self._admit(seq)
            ids = seq.prompt
        else:
            ids = self.encode(ids)
            if seq.slot is None:
                raise ValueError(f"sequence {seq.id} holds no slot; prefill a new sequence, "
                                 "or add it with keep=True to feed it after it finishes")
            if at is not None:
                self._rewind(seq, at)
        logits = self._prefill_chunks(seq, ids)
        token = seq.take(logits, self.clock_s)
        finished = [seq.id] if seq.finished else []
        return self._result({seq.id: logits}, {seq.id: [token]}, finished, first)

    def _rewind(self, seq: Sequence, at: int) -> None:
        if not isinstance(at, int) or not 0 <= at <= seq.length:
            raise ValueError(f"at {at!r} must be a position in [0, {seq.length}], the tokens "
                             f"sequence {seq.id} holds")
        seq.length = at
        del seq.fed[at:]

    def decode_step(self, tokens: dict | None = None) -> StepResult:
        """One decode step of every running sequence, feeding tokens[seq id] or its sampled
        next token; samples the next token of each."""
        first = len(self.records)
        feed = {s.id: s.next_token for s in self.running()
                if s.next_token is not None and not s.finished}
        unknown = set(tokens or {}) - {s.id for s in self.running()}
        if unknown:
            raise ValueError(f"sequences {sorted(unknown)!r} are not running; feed tokens "
                             "only to sequences that hold a slot")
        feed.update(tokens or {})
        if not feed:
            raise ValueError("no running sequence has a token to feed; prefill one first")
        logits = self._decode(feed)
        out = {sid: [self.sequences[sid].take(row, self.clock_s)] for sid, row in logits.items()}
        finished = [sid for sid in logits if self.sequences[sid].finished]
        return self._result(logits, out, finished, first)

    def step(self) -> StepResult:
        """One scheduling round: waiting sequences join free slots and are prefilled, then
        one decode step runs for every sequence still generating; finished ones leave."""
        first = len(self.records)
        logits, tokens = {}, {}
        done = {s.id for s in self.running() if s.finished}
        while self.waiting and None in self.slots:
            seq = self.waiting.pop(0)
            self._admit(seq)
            logits[seq.id] = self._prefill_chunks(seq, seq.prompt)
            tokens[seq.id] = [seq.take(logits[seq.id], self.clock_s)]
        going = {s.id: s.next_token for s in self.running() if not s.finished}
        if going:
            for sid, row in self._decode(going).items():
                logits[sid] = np.concatenate([logits[sid], row]) if sid in logits else row
                tokens.setdefault(sid, []).append(self.sequences[sid].take(row, self.clock_s))
        finished = [s.id for s in self.running() if s.finished and s.id not in done]
        return self._result(logits, tokens, finished, first)

    # -- generation --------------------------------------------------------------------------

    def result(self, seq: Sequence) -> GenerateResult:
        """The GenerateResult of a finished sequence."""
        timed = bool(seq.records) and all(r.report is not None for r in seq.records)
        text = self.decode(seq.generated) if self._tokenizer is not None else None
        return GenerateResult(seq.prompt, list(seq.generated), text,
                              seq.finish_reason or "running", seq.metrics(timed))

    def generate(self, prompt_or_ids, max_new_tokens=16, temperature=0.0, seed=None,
                 stream=False, stop=None):
        """Generate from one prompt (text or ids) or a list of prompts (continuous batching).

        Greedy at temperature 0, else sampling with `seed`. Returns a GenerateResult, a list
        of them for a list of prompts, or with `stream` a TokenStream of token ids.
        """
        batch = isinstance(prompt_or_ids, (list, tuple)) and len(prompt_or_ids) > 0 \
            and not isinstance(prompt_or_ids[0], (int, np.integer))
        prompts = list(prompt_or_ids) if batch else [prompt_or_ids]
        if stream and batch:
            raise ValueError("stream=True takes one prompt; call add() per prompt and step() "
                             "to stream several")
        seqs = [self.add(p, max_new_tokens, temperature,
                         None if seed is None else seed + i, stop)
                for i, p in enumerate(prompts)]
        if stream:
            return TokenStream(self, seqs[0])
        while not all(s.finished for s in seqs):
            self.step()
        results = [self.result(s) for s in seqs]
        return results if batch else results[0]

    def metrics(self) -> Metrics:
        """Metrics of every step this session ran."""
        out = summarize(self.records)
        seqs = self.sequences.values()
        out.prompt_tokens = sum(len(s.prompt) for s in seqs)
        out.generated_tokens = sum(len(s.generated) for s in seqs)
        if out.sim_s and out.generated_tokens:
            out.tokens_per_s = out.generated_tokens / out.sim_s
            out.energy_per_token_j = out.energy_j / out.generated_tokens
        return out
