"""The graph IR: one decoder step of a LLaMA-family model as a list of LLM operators.

A `Graph` holds the model shape (`ModelSpec`), the step it computes (`Step`: rows, phase,
context bucket), the operators in execution order, the values they pass (each produced by
exactly one op), the float weights and, once quantized, their integer forms. Every pass has
the signature `run(graph, cfg, options) -> graph` and `Graph.verify()` runs after each one,
so a pass that breaks the IR is caught where it broke it (tinygrad's `spec.py`).

Value formats (`docs/contract.md`): `ids` and `pos` are int32 token ids and positions [M];
`fx` is int32 fixed point [M, n]; `a8` is int8 [M, n] with one scale code per row; `kv`
stands for the K and V rows a KV_APPEND wrote into the cache, the dependency ATTENTION reads.
"""
from __future__ import annotations

import copy
import enum
from dataclasses import dataclass, field

import numpy as np

PHASES = ("prefill", "decode")
"""Step phases: prefill runs a prompt chunk of rows, decode one new token per sequence."""
INPUTS = ("ids", "pos")
"""The graph inputs: token ids and their positions, one per row."""


def option(options, key, default):
    """Pass option `key` from a mapping or an attribute object (None means all defaults)."""
    if options is None:
        return default
    if isinstance(options, dict):
        return options.get(key, default)
    return getattr(options, key, default)


class CompileError(ValueError):
    """A model or graph the compiler cannot handle; the message names the op, layer and fix."""


class OpKind(enum.Enum):
    """The LLM operators of the IR; each maps onto one instruction family of the ISA."""
    EMBED = "embed"
    RMSNORM = "rmsnorm"
    LINEAR = "linear"
    ROPE = "rope"
    KV_APPEND = "kv_append"
    ATTENTION = "attention"
    SILU_MUL = "silu_mul"
    ADD = "add"
    QUANT = "quant"
    LM_HEAD = "lm_head"


@dataclass(frozen=True, eq=False)
class ModelSpec:
    """The shape of a LLaMA-family decoder, everything the compiler needs besides weights.

    Members
    -------
    name : model name (a known config name, a path or the HF `name_or_path`).
    arch : HF `model_type`, e.g. "llama", "qwen2", "mistral".
    layers, hidden, heads, kv_heads, head_dim, intermediate, vocab : sizes.
    rms_eps : RMSNorm epsilon.
    inv_freq : float64 [head_dim // 2], RoPE inverse frequencies after any rope_scaling.
    tied_embeddings : the LM head is the transposed token embedding.
    attention_bias : q, k and v projections carry biases (Qwen2); o never does here.
    mlp_bias : gate, up and down projections carry biases.
    max_ctx : longest context the model supports (max_position_embeddings).
    """
    name: str
    arch: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    rms_eps: float
    inv_freq: np.ndarray
    tied_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    max_ctx: int = 4096

    def __post_init__(self):
        for key in ("layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate",
                    "vocab", "max_ctx"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise CompileError(f"model {self.name!r}: {key} must be a positive integer, "
                                   f"got {value!r}; fix the model config")
        if self.heads % self.kv_heads:
            raise CompileError(f"model {self.name!r}: heads {self.heads!r} is not a multiple "
                               f"of kv_heads {self.kv_heads!r}; GQA needs whole groups")
        if self.head_dim % 2:
            raise CompileError(f"model {self.name!r}: head_dim {self.head_dim!r} must be even "
                               "for RoPE pairs")
        if np.shape(self.inv_freq) != (self.head_dim // 2,):
            raise CompileError(f"model {self.name!r}: inv_freq must have shape "
                               f"{(self.head_dim // 2,)!r}, got {np.shape(self.inv_freq)!r}")

    @property
    def q_dim(self) -> int:
        """Width of the query projection: heads * head_dim."""
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of the key and of the value projection: kv_heads * head_dim."""
        return self.kv_heads * self.head_dim

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 = MHA, heads = MQA)."""
        return self.heads // self.kv_heads


@dataclass(frozen=True)
class Step:
    """The one step shape a graph computes.

    Members
    -------
    rows : M, token rows per step (the prompt chunk in prefill, 1 in single-sequence decode).
    phase : "prefill" or "decode".
    ctx : context bucket, the most cached tokens (including these rows) attention reads.
    """
    rows: int
    phase: str
    ctx: int

    def __post_init__(self):
        if self.phase not in PHASES:
            raise CompileError(f"step phase {self.phase!r} is not one of {PHASES!r}")
        if not isinstance(self.rows, int) or self.rows < 1:
            raise CompileError(f"step rows {self.rows!r} must be a positive integer")
        if not isinstance(self.ctx, int) or self.ctx < self.rows:
            raise CompileError(f"step ctx {self.ctx!r} must be an integer >= rows "
                               f"{self.rows!r}; pick a larger context bucket")


@dataclass(frozen=True)
class Value:
    """A tensor passed between ops: name, shape and format (`ids`, `pos`, `fx`, `a8`, `kv`)."""
    name: str
    shape: tuple
    fmt: str


@dataclass(eq=False)
class Op:
    """One operator of the IR.

    Members
    -------
    kind : the OpKind.
    name : dotted, unique, e.g. "layers.3.mlp.gate"; also the name of its one output value.
    layer : decoder layer index, None for the embedding, the final norm and the LM head.
    inputs : names of the values it reads, in the order of `SIGNATURES`.
    attrs : sizes and parameters; the required keys per kind are in `SIGNATURES` and,
        after quantization, `QUANT_ATTRS`.
    engine : "MXU", "VPU", "PIM" or "CSD" once placed, None before.
    annotations : free-form notes of later passes (tiles, addresses, timing estimates).
    """
    kind: OpKind
    name: str
    layer: int | None
    inputs: tuple
    attrs: dict
    engine: str | None = None
    annotations: dict = field(default_factory=dict)

    @property
    def output(self) -> str:
        """Name of the value this op produces (its own name)."""
        return self.name

    @property
    def where(self) -> str:
        """The op and layer, as error messages name them."""
        layer = "" if self.layer is None else f" (layer {self.layer})"
        return f"op {self.name!r}{layer}"

    def __str__(self):
        attrs = " ".join(f"{key}={_fmt(value)}" for key, value in self.attrs.items()
                         if value is not None)
        engine = f" @{self.engine}" if self.engine else ""
        inputs = ", ".join("%" + name for name in self.inputs)
        return f"%{self.name} = {self.kind.name}({inputs}) {attrs}{engine}".rstrip()


def _fmt(value):
    """Attr value as printed: N:M pairs as "n:m", everything else by str()."""
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return f"{value[0]}:{value[1]}"
    return str(value)


# ---- the IR spec: per kind, input formats, output format, attrs and shapes --------------------

@dataclass(frozen=True)
class Signature:
    """What an op of one kind reads, writes and must carry in attrs.

    Members
    -------
    inputs : formats of the inputs, in order.
    output : format of the output.
    attrs : attr keys every op of the kind carries.
    shapes : attrs -> (list of input shapes, output shape).
    """
    inputs: tuple
    output: str
    attrs: tuple
    shapes: object


def _embed_shapes(a):
    return [(a["m"],)], (a["m"], a["n"])


def _linear_shapes(a):
    return [(a["m"], a["k"])], (a["m"], a["n"])


def _rows_shapes(count):
    """Shapes of a row-wise op over `count` [m, n] inputs."""
    return lambda a: ([(a["m"], a["n"])] * count, (a["m"], a["n"]))


def _rope_shapes(a):
    width = a["heads"] * a["head_dim"]
    return [(a["m"], width), (a["m"],)], (a["m"], width)


def _kv_shapes(a):
    width = a["kv_heads"] * a["head_dim"]
    return [(a["m"], width), (a["m"], width), (a["m"],)], (a["m"], width)


def _attention_shapes(a):
    width, kv_width = a["heads"] * a["head_dim"], a["kv_heads"] * a["head_dim"]
    return [(a["m"], width), (a["m"], kv_width), (a["m"],)], (a["m"], width)


_LINEAR_ATTRS = ("m", "n", "k", "weight", "bias", "block", "nm")
SIGNATURES = {
    OpKind.EMBED: Signature(("ids",), "fx", ("m", "n", "vocab", "weight"), _embed_shapes),
    OpKind.RMSNORM: Signature(("fx",), "a8", ("m", "n", "weight", "eps"), _rows_shapes(1)),
    OpKind.LINEAR: Signature(("a8",), "fx", _LINEAR_ATTRS, _linear_shapes),
    OpKind.ROPE: Signature(("fx", "pos"), "fx", ("m", "heads", "head_dim"), _rope_shapes),
    OpKind.KV_APPEND: Signature(("fx", "fx", "pos"), "kv", ("m", "kv_heads", "head_dim"),
                                _kv_shapes),
    OpKind.ATTENTION: Signature(("fx", "kv", "pos"), "fx",
                                ("m", "heads", "kv_heads", "head_dim", "ctx", "splits", "topk"),
                                _attention_shapes),
    OpKind.SILU_MUL: Signature(("fx", "fx"), "fx", ("m", "n"), _rows_shapes(2)),
    OpKind.ADD: Signature(("fx", "fx"), "fx", ("m", "n"), _rows_shapes(2)),
    OpKind.QUANT: Signature(("fx",), "a8", ("m", "n"), _rows_shapes(1)),
    OpKind.LM_HEAD: Signature(("a8",), "fx", _LINEAR_ATTRS + ("tied",), _linear_shapes),
}
"""The IR spec per OpKind: input formats in order, output format, required attrs, shapes."""

QUANT_ATTRS = {
    OpKind.RMSNORM: ("eps_code",),
    OpKind.LINEAR: ("bits", "group"),
    OpKind.LM_HEAD: ("bits", "group"),
    OpKind.KV_APPEND: ("kv_bits", "kv_group"),
    OpKind.ATTENTION: ("kv_bits", "kv_group"),
}
"""Attrs the quantize pass adds; required once `Graph.quantized` is set."""


@dataclass(eq=False)
class Graph:
    """One decoder step: spec, step shape, ops in execution order and their data.

    Members
    -------
    spec : the ModelSpec.
    step : the Step (rows, phase, context bucket).
    ops : Op list in execution order.
    weights : name -> float numpy array, or None for every entry in timing-only graphs.
        Linear weights are [n, k] (HF layout), norm gammas and biases [n], the embedding
        [vocab, hidden]; with tied embeddings "lm_head" is the same array as "embed".
    quant : name -> integer form after quantization (see `trimem.compiler.quantize`).
    meta : graph-wide records: "quant" (QuantSpec), "sparsity", "smooth", and "source"
        (the transformers model the frontend read, for float comparisons).
    quantized : set by the quantize pass; from then on `QUANT_ATTRS` are required.
    """
    spec: ModelSpec
    step: Step
    ops: list
    weights: dict
    quant: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    quantized: bool = False

    @property
    def timing_only(self) -> bool:
        """True when the graph carries shapes only (built from a config, no weights)."""
        return all(w is None for w in self.weights.values())

    @property
    def output(self) -> str:
        """Name of the logits value (the last op's output)."""
        return self.ops[-1].output

    def values(self) -> dict:
        """Every value by name, graph inputs first, with shape and format."""
        rows = self.step.rows
        out = {name: Value(name, (rows,), name) for name in INPUTS}
        for op in self.ops:
            sig = SIGNATURES[op.kind]
            out[op.name] = Value(op.name, sig.shapes(op.attrs)[1], sig.output)
        return out

    def op(self, name: str) -> Op:
        """The op called `name`; CompileError listing close names if there is none."""
        for op in self.ops:
            if op.name == name:
                return op
        near = [op.name for op in self.ops if name.split(".")[-1] in op.name][:5]
        raise CompileError(f"no op named {name!r}; similar names: {near!r}")

    def linears(self) -> list:
        """The LINEAR and LM_HEAD ops, in order."""
        return [op for op in self.ops if op.kind in (OpKind.LINEAR, OpKind.LM_HEAD)]

    def clone(self) -> Graph:
        """A copy whose ops, attrs and dicts are new; weight and quant arrays are shared."""
        return Graph(self.spec, self.step, copy.deepcopy(self.ops), dict(self.weights),
                     dict(self.quant), dict(self.meta), self.quantized)

    def verify(self) -> Graph:
        """Check the IR spec; raise CompileError naming the first bad op. Returns self."""
        fmts = {name: name for name in INPUTS}
        shapes = {name: (self.step.rows,) for name in INPUTS}
        for op in self.ops:
            _verify_op(self, op, fmts, shapes)
            sig = SIGNATURES[op.kind]
            fmts[op.name] = sig.output
            shapes[op.name] = sig.shapes(op.attrs)[1]
        if not self.ops or self.ops[-1].kind is not OpKind.LM_HEAD:
            raise CompileError("the graph must end with the LM_HEAD op; a pass dropped it")
        return self

    def __str__(self):
        s, st = self.spec, self.step
        head = (f"graph {s.name} ({s.arch}): layers={s.layers} hidden={s.hidden} "
                f"heads={s.heads}/{s.kv_heads} head_dim={s.head_dim} "
                f"intermediate={s.intermediate} vocab={s.vocab}\n"
                f"step {st.phase} rows={st.rows} ctx={st.ctx}"
                f"{' quantized' if self.quantized else ''}"
                f"{' timing-only' if self.timing_only else ''}")
        return "\n".join([head] + [str(op) for op in self.ops])


def _verify_op(graph, op, fmts, shapes):
    if not isinstance(op.kind, OpKind):
        raise CompileError(f"{op.where} has kind {op.kind!r}, not an OpKind")
    if op.name in fmts:
        raise CompileError(f"{op.where}: the name is already defined; op names must be unique")
    if op.layer is not None and not 0 <= op.layer < graph.spec.layers:
        raise CompileError(f"{op.where}: layer {op.layer!r} is outside "
                           f"[0, {graph.spec.layers}); fix the layer index")
    sig = SIGNATURES[op.kind]
    need = sig.attrs + (QUANT_ATTRS.get(op.kind, ()) if graph.quantized else ())
    missing = [key for key in need if key not in op.attrs]
    if missing:
        raise CompileError(f"{op.where}: {op.kind.name} is missing attrs {missing!r}; the pass "
                           "that built it must set them")
    if op.attrs["m"] != graph.step.rows:
        raise CompileError(f"{op.where}: m={op.attrs['m']!r} differs from the step rows "
                           f"{graph.step.rows!r}; rebuild the graph for this step")
    if len(op.inputs) != len(sig.inputs):
        raise CompileError(f"{op.where}: {op.kind.name} takes {len(sig.inputs)} inputs "
                           f"{sig.inputs!r}, got {op.inputs!r}")
    in_shapes, _ = sig.shapes(op.attrs)
    for name, fmt, shape in zip(op.inputs, sig.inputs, in_shapes):
        if name not in fmts:
            raise CompileError(f"{op.where}: input {name!r} is not defined before use; "
                               "order ops so producers come first")
        if fmts[name] != fmt:
            raise CompileError(f"{op.where}: input {name!r} is {fmts[name]!r}, expected "
                               f"{fmt!r}; insert a QUANT or fix the wiring")
        if tuple(shapes[name]) != tuple(shape):
            raise CompileError(f"{op.where}: input {name!r} has shape {shapes[name]!r}, "
                               f"expected {shape!r} from the attrs")
    for key in ("weight", "bias"):
        name = op.attrs.get(key)
        if name is not None and name not in graph.weights:
            raise CompileError(f"{op.where}: {key} {name!r} is not in graph.weights; the "
                               "frontend must load it")
    if graph.quantized and op.kind in (OpKind.LINEAR, OpKind.LM_HEAD):
        name = op.attrs["weight"]
        if graph.weights.get(name) is not None and name not in graph.quant:
            raise CompileError(f"{op.where}: weight {name!r} has no quantized form; run the "
                               "quantize pass")
