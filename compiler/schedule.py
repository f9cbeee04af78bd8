"""Scheduling: the order ops are emitted in, sub-batch interleaving, and the dependency tokens
between engines.

The pass fixes one global order of (op, rows) steps. In a batched decode step with linears on
the PIM banks it splits the rows into two sub-batches that alternate op by op, and runs the
linears of the first on the MXU and of the second in the PIM banks, so the two engines work
on different sub-batches at once (NeuPIMs, ASPLOS'24, sub-batch interleaving); the weights
of such linears then live in both HBM and PIMDRAM.

`Streams` turns the global order into one in-order stream per engine. Each instruction names
the buffer ranges it reads and writes; when it depends on an instruction of another engine
(read after write, or write after read or write, also across reuse of freed memory), the
producer PUSHes a token to the consumer right after the producing instruction and the consumer
POPs it right before the dependent one (VTA-style dependency queues). Double buffering falls
out of the same rule: the DMA of weight tile i+1 into the other slot waits only for the GEMM
that last read that slot, so it overlaps the GEMM of tile i.
"""
from __future__ import annotations

import bisect

from trimem import isa
from trimem.compiler.ir import Graph, option
from trimem.compiler.place import mxu_unfit

SUB_BATCHES = 2


# ---- the pass ------------------------------------------------------------------------------

def _interleaved(graph: Graph, cfg, wanted) -> bool:
    """Whether sub-batch interleaving applies: a batched decode step with PIM linears the
    MXU can also run, unless switched off (option "interleave": True, False or None = auto)."""
    if wanted is False or graph.step.phase != "decode" or graph.step.rows < SUB_BATCHES:
        return False
    return any(op.engine == "PIM" and mxu_unfit(cfg, op) is None for op in graph.linears())


def run(graph: Graph, cfg, options=None) -> Graph:
    """Record the emission order in `graph.meta["schedule"]`: sub-batch row ranges and the
    list of (op name, sub-batch index, engine) steps."""
    out = graph.clone()
    rows = out.step.rows
    split = _interleaved(out, cfg, option(options, "interleave", None))
    if split:
        half = rows // SUB_BATCHES
        batches = [(0, half), (half, rows)]
        for op in out.linears():
            if op.engine == "PIM" and mxu_unfit(cfg, op) is None:
                op.annotations["sub_engines"] = ("MXU", "PIM")
    else:
        batches = [(0, rows)]
    steps = []
    for op in out.ops:
        engines = op.annotations.get("sub_engines", (op.engine,) * len(batches))
        steps += [(op.name, b, engines[b]) for b in range(len(batches))]
    out.meta["schedule"] = {"interleave": split, "sub_batches": batches, "steps": steps}
    return out.verify()


# ---- dependency tokens ---------------------------------------------------------------------

def _merge(into: dict, other: dict) -> None:
    for engine, index in other.items():
        if into.get(engine, -1) < index:
            into[engine] = index


class _State:
    """Accesses to one byte range: per engine the last instruction index that wrote it and
    that read it (monotone, so states of overlapping ranges merge by maximum)."""
    __slots__ = ("writes", "reads")

    def __init__(self, writes=None, reads=None):
        self.writes, self.reads = dict(writes or {}), dict(reads or {})

    def copy(self) -> "_State":
        return _State(self.writes, self.reads)

    def merge(self, other: "_State") -> None:
        _merge(self.writes, other.writes)
        _merge(self.reads, other.reads)


class _History:
    """The access history of one buffer as disjoint byte intervals, each with its _State.

    `spans` remembers the states of ranges asked for before; a split of an interval
    forgets them all (emission reads and writes the same few ranges over and over)."""
    __slots__ = ("starts", "states", "end", "spans")

    def __init__(self, nbytes: int, state: _State):
        self.starts, self.states, self.end = [0], [state], max(nbytes, 1)
        self.spans: dict = {}

    def _cut(self, at: int) -> int:
        """Index of the interval starting at `at`, splitting the one that holds it."""
        if at >= self.end:
            return len(self.starts)
        i = bisect.bisect_right(self.starts, at) - 1
        if self.starts[i] == at:
            return i
        self.starts.insert(i + 1, at)
        self.states.insert(i + 1, self.states[i].copy())
        self.spans.clear()
        return i + 1

    def span(self, lo: int, hi: int) -> list:
        """The states of the intervals that make up [lo, hi)."""
        found = self.spans.get((lo, hi))
        if found is not None:
            return found
        a, b = max(lo, 0), min(hi, self.end)
        if b <= a:
            return []
        i = self._cut(a)
        found = self.spans[(lo, hi)] = self.states[i:self._cut(b)]
        return found

    def summary(self) -> _State:
        out = _State()
        for state in self.states:
            out.merge(state)
        return out


def _overlaps(a0, a1, b0, b1) -> bool:
    return a0 < b1 and b0 < a1


class Streams:
    """One instruction list per engine, with PUSH/POP inserted from buffer hazards.

    `add(engine, name, reads, writes, **fields)` appends an instruction; reads and writes are
    (Buffer, offset, nbytes) ranges. Freed memory keeps its access history, so whoever reuses
    it waits for the last users (`allocated` / `freed` are the Arena hooks).
    """

    def __init__(self):
        self.ops: dict = {e: [] for e in isa.STREAM_ENGINES}
        self.pops: dict = {e: {} for e in isa.STREAM_ENGINES}
        self.pushes: dict = {e: {} for e in isa.STREAM_ENGINES}
        self.synced: dict = {}
        self.history: dict = {}
        self.graveyard: dict = {}
        self.words: dict = {}

    # -- memory reuse ------------------------------------------------------------------------

    def allocated(self, buf) -> None:
        """Start `buf` with the history of the freed memory it reuses."""
        state = _State()
        for lo, hi, old in self.graveyard.get(buf.space, ()):
            if _overlaps(lo, hi, buf.addr, buf.addr + buf.nbytes):
                state.merge(old)
        self.history[id(buf)] = _History(buf.nbytes, state)

    def freed(self, buf) -> None:
        """Keep the whole history of `buf` for the memory it occupied."""
        state = self.history.pop(id(buf)).summary()
        lo, hi = buf.addr, buf.addr + buf.nbytes
        kept = [(a, b, s) for a, b, s in self.graveyard.get(buf.space, ())
                if not (lo <= a and b <= hi)]
        self.graveyard[buf.space] = kept + [(lo, hi, state)]

    # -- instructions ------------------------------------------------------------------------

    def add(self, engine: isa.Engine, name: str, reads=(), writes=(), **fields) -> None:
        """Append instruction `name` to `engine`'s stream, after the POPs it needs."""
        ops, history = self.ops[engine], self.history
        index = len(ops)
        deps: dict = {}
        for buf, offset, nbytes in reads:
            for state in history[id(buf)].span(offset, offset + nbytes):
                for src, j in state.writes.items():
                    if src is not engine and deps.get(src, -1) < j:
                        deps[src] = j
                state.reads[engine] = index
        for buf, offset, nbytes in writes:
            for state in history[id(buf)].span(offset, offset + nbytes):
                for seen in (state.writes, state.reads):
                    for src, j in seen.items():
                        if src is not engine and deps.get(src, -1) < j:
                            deps[src] = j
                state.writes[engine] = index
        for src, j in sorted(deps.items()) if deps else ():
            if j <= self.synced.get((src, engine), -1):
                continue
            self.synced[(src, engine)] = j
            self.pushes[src].setdefault(j, []).append(engine)
            self.pops[engine].setdefault(index, []).append(src)
        ops.append((name, fields))

    def add_run(self, engine: isa.Engine, instrs) -> None:
        """`add` each (name, reads, writes, fields) of `instrs` in turn. Only `engine` runs
        in between, so an access list seen before in the run finds no new dependency: it
        only records its instruction as the last access."""
        seen = set()
        ops = self.ops[engine]
        for name, reads, writes, fields in instrs:
            key = (id(reads), id(writes))
            if key not in seen:
                seen.add(key)
                self.add(engine, name, reads, writes, **fields)
                continue
            index = len(ops)
            for accesses, write in ((reads, False), (writes, True)):
                for buf, offset, nbytes in accesses:
                    for state in self.history[id(buf)].span(offset, offset + nbytes):
                        (state.writes if write else state.reads)[engine] = index
            ops.append((name, fields))

    def _word(self, name: str, fields: dict) -> bytes:
        """isa.encode, once per distinct instruction (layers repeat the same words)."""
        key = (name, tuple(fields.items()))
        word = self.words.get(key)
        if word is None:
            word = self.words[key] = isa.encode(name, **fields)
        return word

    def programs(self) -> dict:
        """{engine name: words} of every engine with work, each stream ending with HALT."""
        out = {}
        for engine, ops in self.ops.items():
            if not ops:
                continue
            words = []
            pops, pushes = self.pops[engine], self.pushes[engine]
            for i, (name, fields) in enumerate(ops):
                if i in pops:
                    words += [self._word("POP", {"src": src}) for src in pops[i]]
                words.append(self._word(name, fields))
                if i in pushes:
                    words += [self._word("PUSH", {"dst": dst}) for dst in pushes[i]]
            words.append(self._word("HALT", {}))
            out[engine.name] = words
        return out
