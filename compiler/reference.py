"""The integer reference: executes a quantized graph exactly as the hardware must.

`Reference(graph)` runs the ops in order with the golden numerics of `trimem.numerics` and
`trimem.special` on torch (CPU or CUDA) or numpy, keeping a quantized KV cache per sequence;
the emulator, the RTL and the bundle's expected outputs are checked against it bit for bit.
`float_forward` runs the same graph in float64 (the function before quantization) and
`float_logits` the source transformers model, for accuracy comparisons.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from trimem import numerics as nu
from trimem import special as sp
from trimem.compiler.ir import CompileError, Graph, OpKind


class StepResult(NamedTuple):
    """Outputs of one reference step.

    Members
    -------
    logits : fx int32 [M, vocab].
    hidden : per layer, the fx residual stream after the layer, [M, hidden].
    values : every op output by name when traced (a8 values as (a8, mant, exp)), else {}.
    """
    logits: object
    hidden: list
    values: dict


class _Cache:
    """One sequence's KV cache: per layer and K/V, the quantize_kv fields over token slots."""

    def __init__(self, put, layers, kv_heads, head_dim, groups):
        self.put, self.length, self.slots = put, 0, 0
        self.shape = (kv_heads, head_dim, groups)
        self.fields = [[None, None] for _ in range(layers)]
        self.filled = put(np.zeros(0, dtype=bool))

    def _grow(self, need):
        heads, d, groups = self.shape
        slots = max(need, 2 * self.slots, 16)
        blank = [np.zeros((heads, slots, d), np.int8), np.ones((heads, slots, groups), np.uint8),
                 np.ones((heads, slots), np.int32), np.zeros((heads, slots), np.int32)]
        for per_layer in self.fields:
            for j, old in enumerate(per_layer):
                new = [self.put(b) for b in blank]
                if old is not None:
                    for a, b in zip(new, old):
                        a[:, :self.slots] = b
                per_layer[j] = new
        filled = self.put(np.zeros(slots, dtype=bool))
        filled[:self.slots] = self.filled
        self.filled, self.slots = filled, slots

    def write(self, layer, kind, positions, fields):
        """Store quantize_kv fields [Hkv, M, ...] at token positions [M]."""
        need = int(positions.max()) + 1
        if need > self.slots:
            self._grow(need)
        for cache, new in zip(self.fields[layer][kind], fields):
            cache[:, positions] = new
        self.filled[positions] = True
        self.length = max(self.length, need)

    def read(self, layer, kind):
        """The fields of tokens 0..length-1; raises if a position was skipped."""
        if not bool(self.filled[:self.length].all()):
            hole = int(np.argmin(np.asarray(self.filled[:self.length].tolist())))
            raise ValueError(f"KV cache has no token at position {hole}; feed positions in "
                             "order without gaps")
        return [a[:, :self.length] for a in self.fields[layer][kind]]


class Reference:
    """The integer reference machine of one quantized graph.

    Parameters
    ----------
    graph : a quantized Graph with weights.
    device : torch device ("cpu", "cuda", ...); ignored with backend "numpy".
    backend : "torch" or "numpy"; both give the same bits.
    """

    def __init__(self, graph: Graph, device="cpu", backend="torch"):
        if not graph.quantized or graph.timing_only:
            raise CompileError("Reference needs a quantized graph with weights; run the "
                               "quantize pass on a model loaded with weights")
        if backend not in ("torch", "numpy"):
            raise ValueError(f"backend {backend!r} must be 'torch' or 'numpy'")
        self.graph, self.backend = graph, backend
        if backend == "torch":
            import torch
            self.device = torch.device(device)
            self.put = lambda a: torch.tensor(np.asarray(a), device=self.device)
        else:
            self.device, self.put = None, np.array
        self.params = self._load(graph)
        spec = graph.spec
        cos, sin = sp.rope_table(spec.inv_freq, spec.max_ctx)
        self.rope = self.put(cos), self.put(sin)
        self.caches = {}

    def _load(self, graph):
        """Quantized tensors on the backend, by weight name."""
        params = {}
        for op in graph.ops:
            name, bias = op.attrs.get("weight"), op.attrs.get("bias")
            if op.kind in (OpKind.LINEAR, OpKind.LM_HEAD):
                qw = graph.quant[name]
                params[name] = tuple(self.put(a) for a in (qw.w_eff, qw.mult, qw.shift))
            elif op.kind is OpKind.EMBED:
                params[name] = tuple(self.put(a) for a in graph.quant[name])
            elif op.kind is OpKind.RMSNORM:
                params[name] = self.put(graph.quant[name])
            if bias is not None:
                params[bias] = self.put(graph.quant[bias])
        return params

    def reset(self, seq=None):
        """Drop the KV cache of one sequence, or of all when seq is None."""
        if seq is None:
            self.caches.clear()
        else:
            self.caches.pop(seq, None)

    def _cache(self, seq):
        if seq not in self.caches:
            attn = next(op for op in self.graph.ops if op.kind is OpKind.KV_APPEND)
            a = attn.attrs
            self.caches[seq] = _Cache(self.put, self.graph.spec.layers, a["kv_heads"],
                                      a["head_dim"], a["head_dim"] // a["kv_group"])
        return self.caches[seq]

    def step(self, ids, positions, seq=0, trace=False) -> StepResult:
        """Run one step of M tokens `ids` at `positions` of sequence `seq`.

        M may differ from the graph's step rows: every op is row-wise or causal, so one
        quantized graph serves prefill chunks and decode steps alike.
        """
        ids, positions = self._rows(ids, "ids"), self._rows(positions, "positions")
        if ids.shape != positions.shape:
            raise ValueError(f"ids {tuple(ids.shape)!r} and positions "
                             f"{tuple(positions.shape)!r} must both be [M]")
        if int(positions.min()) < 0 or int(positions.max()) >= self.graph.spec.max_ctx:
            raise ValueError(f"positions must lie in [0, {self.graph.spec.max_ctx}), got "
                             f"[{int(positions.min())}, {int(positions.max())}]")
        env = {"ids": ids, "pos": positions}
        cache = self._cache(seq)
        hidden = []
        for op in self.graph.ops:
            env[op.name] = _RUN[op.kind](self, op, [env[n] for n in op.inputs], cache)
            if op.kind is OpKind.ADD and op.name.endswith("mlp.residual"):
                hidden.append(env[op.name])
        values = {k: v for k, v in env.items() if k not in ("ids", "pos")} if trace else {}
        return StepResult(env[self.graph.output], hidden, values)

    def _rows(self, x, what):
        x = self.put(np.asarray(x.tolist() if hasattr(x, "tolist") else x, dtype=np.int64))
        if x.ndim != 1 or x.shape[0] < 1:
            raise ValueError(f"{what} must be a non-empty 1-D sequence, got shape "
                             f"{tuple(x.shape)!r}")
        return x

    # ---- one method per OpKind -------------------------------------------------------------

    def _embed(self, op, args, cache):
        (ids,) = args
        if int(ids.max()) >= op.attrs["vocab"] or int(ids.min()) < 0:
            raise ValueError(f"token ids must lie in [0, {op.attrs['vocab']}), got "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        return nu.embed(ids, *self.params[op.attrs["weight"]])

    def _rmsnorm(self, op, args, cache):
        return sp.rmsnorm_quant(args[0], self.params[op.attrs["weight"]], op.attrs["eps_code"])

    def _linear(self, op, args, cache):
        a8, mant, exp = args[0]
        y = nu.linear(a8, mant, exp, *self.params[op.attrs["weight"]])
        bias = op.attrs["bias"]
        return y if bias is None else sp.add_sat(y, self.params[bias][None, :])

    def _rope(self, op, args, cache):
        x, pos = args
        rows, heads, d = x.shape[0], op.attrs["heads"], op.attrs["head_dim"]
        return sp.rope(x.reshape(rows, heads, d), pos, *self.rope).reshape(rows, heads * d)

    def _kv_append(self, op, args, cache):
        a = op.attrs
        pos = args[2]
        for kind, x in enumerate(args[:2]):
            x = x.reshape(x.shape[0], a["kv_heads"], a["head_dim"]).swapaxes(0, 1)
            cache.write(op.layer, kind, pos, nu.quantize_kv(x, a["kv_bits"], a["kv_group"]))
        return args[0]

    def _attention(self, op, args, cache):
        q, _, pos = args
        a = op.attrs
        rows = q.shape[0]
        out = sp.attention(q.reshape(rows, a["heads"], a["head_dim"]),
                           cache.read(op.layer, 0), cache.read(op.layer, 1), pos,
                           kv_heads=a["kv_heads"], kv_bits=a["kv_bits"], splits=a["splits"],
                           topk=a["topk"])
        return out.reshape(rows, a["heads"] * a["head_dim"])

    def _silu_mul(self, op, args, cache):
        return sp.silu_mul(*args)

    def _add(self, op, args, cache):
        return sp.add_sat(*args)

    def _quant(self, op, args, cache):
        return nu.quantize_act(args[0])


_RUN = {OpKind.EMBED: Reference._embed, OpKind.RMSNORM: Reference._rmsnorm,
        OpKind.LINEAR: Reference._linear, OpKind.LM_HEAD: Reference._linear,
        OpKind.ROPE: Reference._rope, OpKind.KV_APPEND: Reference._kv_append,
        OpKind.ATTENTION: Reference._attention, OpKind.SILU_MUL: Reference._silu_mul,
        OpKind.ADD: Reference._add, OpKind.QUANT: Reference._quant}
"""The reference's implementation of each OpKind."""


# ---- float references ----------------------------------------------------------------------

def float_forward(graph: Graph, ids, capture=()):
    """The graph's float64 function on one prompt at positions 0..M-1 (numpy, no cache).

    Uses `graph.weights` as they are (after smoothing or pruning, before quantization), so
    it checks passes that must keep the float function. Returns (logits [M, vocab], captured)
    with `captured` the outputs of the ops named in `capture`.
    """
    if graph.timing_only:
        raise CompileError("float_forward needs weights; load the model with weights")
    spec = graph.spec
    ids = np.asarray(ids, dtype=np.int64)
    rows = ids.shape[0]
    angle = np.arange(rows, dtype=np.float64)[:, None] * spec.inv_freq[None, :]
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    env = {"ids": ids, "pos": np.arange(rows)}

    def w(name):
        return np.asarray(graph.weights[name], dtype=np.float64)

    def rope(x, heads):
        x = x.reshape(rows, heads, -1)
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).reshape(rows, -1)

    for op in graph.ops:
        a, args = op.attrs, [env[n] for n in op.inputs]
        if op.kind is OpKind.EMBED:
            y = np.asarray(graph.weights[a["weight"]][args[0]], dtype=np.float64)
        elif op.kind is OpKind.RMSNORM:
            x = args[0]
            y = x / np.sqrt((x * x).mean(-1, keepdims=True) + a["eps"]) * w(a["weight"])
        elif op.kind in (OpKind.LINEAR, OpKind.LM_HEAD):
            y = args[0] @ w(a["weight"]).T + (0 if a["bias"] is None else w(a["bias"]))
        elif op.kind is OpKind.ROPE:
            y = rope(args[0], a["heads"])
        elif op.kind is OpKind.KV_APPEND:
            y = (args[0], args[1])
        elif op.kind is OpKind.ATTENTION:
            k, v = (t.reshape(rows, a["kv_heads"], -1).swapaxes(0, 1) for t in args[1])
            y = sp.attention_reference_float(args[0].reshape(rows, a["heads"], -1), k, v,
                                             np.arange(rows), kv_heads=a["kv_heads"])
            y = y.reshape(rows, -1)
        elif op.kind is OpKind.SILU_MUL:
            y = args[0] / (1 + np.exp(-args[0])) * args[1]
        elif op.kind is OpKind.ADD:
            y = args[0] + args[1]
        else:
            y = args[0]
        env[op.name] = y
    return env[graph.output], {name: env[name] for name in capture}


def float_logits(graph: Graph, ids):
    """Logits of the graph's source transformers model on one prompt, float64 [M, vocab]."""
    import torch

    model = graph.meta.get("source")
    if model is None:
        raise CompileError("graph has no source model; build it with frontend.from_hf or load")
    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(ids, dtype=np.int64))[None])
    return out.logits[0].double().cpu().numpy()


def cosine(a, b) -> float:
    """Cosine similarity of two arrays, flattened (float64)."""
    a, b = np.ravel(np.asarray(a, np.float64)), np.ravel(np.asarray(b, np.float64))
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), math.ulp(1.0)))
