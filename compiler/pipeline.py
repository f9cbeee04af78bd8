"""The compiler pipeline: the ordered passes, length buckets, and `compile_model`.

A model is lowered once, pruned and quantized once (`MODEL_PASSES`), then re-shaped to each
length bucket (a prefill chunk size or a decode batch, at a context length) and placed,
scheduled and tiled per bucket (`BUCKET_PASSES`); `Graph.verify()` runs after every pass.
The memory map is planned over all buckets at once, so every entry of the bundle shares one
set of weight images, and each bucket becomes one entry whose meta names its phase, rows and
context: the host picks the entry that fits (FlightLLM's length-adaptive compilation).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from trimem.bundle import Bundle, BundleError, is_bundle, write_bundle
from trimem.compiler import emit, frontend, place, quantize, report, schedule, sparsify, tile
from trimem.compiler.ir import PHASES, CompileError, Graph, OpKind, Step
from trimem.config import load_config

MODEL_PASSES = (("sparsify", sparsify.run), ("quantize", quantize.run))
"""Passes over the model's graph, run once: the numbers are the same in every bucket."""
BUCKET_PASSES = (("place", place.run), ("schedule", schedule.run), ("tile", tile.run))
"""Passes over each bucket's graph, in order."""
DEFAULT_BUCKETS = "prefill:64@1024,decode:1@1024,decode:1@4096"
"""Default buckets, each context clamped to the model's max_ctx."""
TEST_SEED = 0


# ---- buckets -------------------------------------------------------------------------------

def _bucket(text: str) -> Step:
    phase, _, rest = text.strip().partition(":")
    rows, _, ctx = rest.partition("@")
    if phase not in PHASES or not rows.isdigit() or not ctx.isdigit():
        raise CompileError(f"bucket {text!r} is not of the form PHASE:ROWS@CTX with PHASE in "
                           f"{PHASES!r}, e.g. 'prefill:64@1024' or 'decode:4@2048'")
    return Step(int(rows), phase, int(ctx))


def parse_buckets(buckets, max_ctx: int) -> list:
    """Steps from "prefill:64@1024,decode:1@4096" or a list of Steps; None = the defaults,
    clamped to `max_ctx`. Duplicates are dropped."""
    if buckets is None:
        steps = [_bucket(b) for b in DEFAULT_BUCKETS.split(",")]
        steps = [Step(min(s.rows, max_ctx), s.phase, min(s.ctx, max_ctx)) for s in steps]
    elif isinstance(buckets, str):
        steps = [_bucket(b) for b in buckets.split(",") if b.strip()]
    else:
        steps = [s if isinstance(s, Step) else Step(*s) for s in buckets]
    if not steps:
        raise CompileError("no buckets given; write e.g. --buckets prefill:64@1024,decode:1@1024")
    for s in steps:
        if s.ctx > max_ctx:
            raise CompileError(f"bucket {s.phase}:{s.rows}@{s.ctx} exceeds the model's max_ctx "
                               f"{max_ctx}; use a context of at most {max_ctx}")
    return list(dict.fromkeys(steps))


def restep(graph: Graph, step: Step) -> Graph:
    """The graph re-shaped to another step: every op's rows, and attention's context."""
    out = graph.clone()
    out.step = step
    for op in out.ops:
        op.attrs["m"] = step.rows
        if op.kind is OpKind.ATTENTION:
            op.attrs["ctx"] = step.ctx
    return out.verify()


# ---- the model -----------------------------------------------------------------------------

def keep_layers(graph: Graph, layers: int) -> Graph:
    """The graph of the first `layers` decoder layers (then the final norm and LM head)."""
    spec = graph.spec
    if not isinstance(layers, int) or not 1 <= layers <= spec.layers:
        raise CompileError(f"--layers {layers!r} must be an integer in [1, {spec.layers}] for "
                           f"model {spec.name!r}")
    if layers == spec.layers:
        return graph
    short = dataclasses.replace(spec, layers=layers)
    weights = None if graph.timing_only else {n: graph.weights[n]
                                              for n in frontend.weight_names(short)}
    st = graph.step
    out = frontend.lower(short, weights, rows=st.rows, phase=st.phase, ctx=st.ctx)
    out.meta.update(graph.meta)
    return out


def load_graph(model, step: Step, timing_only: bool) -> Graph:
    """The model's graph at `step`; without weights when `timing_only` (or when the model is
    a known config name with no weights to load)."""
    shape = {"rows": step.rows, "phase": step.phase, "ctx": step.ctx}
    if isinstance(model, Graph):
        graph = restep(model, step)
    elif timing_only and isinstance(model, str) and model in frontend.MODELS:
        graph = frontend.from_config(model, **shape)
    else:
        graph = frontend.load(model, weights=not timing_only, float_model=False, **shape)
    if timing_only and not graph.timing_only:
        graph = frontend.lower(graph.spec, None, **shape)
    return graph


# ---- test vectors --------------------------------------------------------------------------

def _inputs(step: Step, vocab: int, rng) -> dict:
    ids = rng.integers(vocab, size=step.rows).astype(np.int32)
    if step.phase == "prefill":
        pos = np.arange(step.rows, dtype=np.int32)
    else:
        pos = np.zeros(step.rows, dtype=np.int32)
    return {"ids": ids, "pos": pos}


def test_vectors(qgraph: Graph, graphs: list) -> dict:
    """Per entry: inputs and the integer reference's logits for them.

    Each entry starts from an empty KV cache: a prefill entry gets positions 0..M-1 of
    sequence slot 0, a decode entry position 0 in each row's own slot. Timing-only graphs
    get inputs alone, with decode rows at the last position of the context bucket, so a
    timing run reads the whole bucket.
    """
    rng = np.random.default_rng(TEST_SEED)
    ref = None if qgraph.timing_only else _reference(qgraph)
    out = {}
    for graph in graphs:
        inputs = _inputs(graph.step, graph.spec.vocab, rng)
        name = emit.entry_name(graph)
        if ref is None:
            if graph.step.phase == "decode":
                inputs["pos"][:] = graph.step.ctx - 1
            out[name] = {"inputs": inputs}
            continue
        ref.reset()
        if graph.step.phase == "prefill":
            logits = ref.step(inputs["ids"], inputs["pos"]).logits
        else:
            logits = np.concatenate([np.asarray(ref.step(inputs["ids"][i:i + 1],
                                                         inputs["pos"][i:i + 1], seq=i).logits)
                                     for i in range(graph.step.rows)])
        out[name] = {"inputs": inputs, "expected": {"logits": np.asarray(logits, np.int32)}}
    return out


def _reference(graph: Graph):
    from trimem.compiler.reference import Reference

    return Reference(graph, backend="numpy")


# ---- compile -------------------------------------------------------------------------------

def _refuse_overwrite(out, force: bool) -> None:
    path = Path(out)
    if not force and path.exists() and any(path.iterdir()) and not is_bundle(path):
        raise BundleError(f"{path} is not empty and holds no bundle; choose an empty or new "
                          f"directory, or pass --force to write into it anyway")


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="entry", leave=False)


def _hardware(cfg, hw) -> dict:
    preset = hw if isinstance(hw, str) and hw == cfg.name else None
    return {"name": cfg.name, "preset": preset, "hash": cfg.config_hash(),
            "config": cfg.to_dict()}


def _model_meta(graph: Graph, memory, timing_only: bool) -> dict:
    s = graph.spec
    return {"name": s.name, "arch": s.arch, "layers": s.layers, "hidden": s.hidden,
            "heads": s.heads, "kv_heads": s.kv_heads, "head_dim": s.head_dim,
            "intermediate": s.intermediate, "vocab": s.vocab, "max_ctx": s.max_ctx,
            "tied_embeddings": s.tied_embeddings, "timing_only": timing_only,
            "kv": dict(memory.kv), "kv_home": memory.kv_region.space}


def _quant_meta(graph: Graph, options: dict) -> dict:
    qs = graph.meta["quant"]
    nm = sparsify.parse_nm(options["sparsity"])
    ids = options["calib_ids"]
    return {"spec": str(qs), "w_bits": qs.w_bits, "w_group": qs.w_group, "a_bits": qs.a_bits,
            "kv_bits": qs.kv_bits, "kv_group": qs.kv_group, "head_bits": qs.head_bits or qs.w_bits,
            "sparsity": None if nm == (1, 1) else f"{nm[0]}:{nm[1]}",
            "sparse_blocks": options["sparse_blocks"],
            "prune_metric": None if nm == (1, 1) else options["prune_metric"],
            "smooth_alpha": options["smooth_alpha"],
            "calib_text": options["calib_text"],
            "calib_ids": None if ids is None else [int(i) for i in ids]}


def needs_calibration(options: dict, timing_only: bool) -> bool:
    """Whether a pass reads the calibration prompt: SmoothQuant, or Wanda pruning."""
    if timing_only:
        return False
    wanda = sparsify.parse_nm(options["sparsity"]) != (1, 1) and \
        options["prune_metric"] == sparsify.METRICS[0]
    return options["smooth_alpha"] is not None or wanda


def calibration(graph: Graph, calib_text, calib_ids):
    """(text, ids) of the calibration prompt: `calib_ids` as given; else `calib_text`, by
    default `quantize.CALIB_TEXT`, in the model's tokenizer; (None, None) leaves the choice to
    `quantize.calibration_ids` (fixed-seed random ids where the model has no tokenizer)."""
    if calib_ids is not None:
        return None, np.asarray(calib_ids)
    text = quantize.CALIB_TEXT if calib_text is None else calib_text
    if not isinstance(text, str) or not text.strip():
        raise CompileError(f"calib_text {calib_text!r} must be a non-empty string")
    ids = frontend.prompt_ids(graph, text)
    if ids is None and calib_text is not None:
        raise CompileError(f"model {graph.spec.name!r} has no tokenizer at hand for calib_text; "
                           f"pass calib_ids (token ids) instead")
    return (None, None) if ids is None else (text, ids)


def compile_model(model, hw, *, quant="w4a8kv4", sparsity=None, sparse_layers="mlp",
                  prune_metric=None, buckets=None, layers=None, timing_only=False,
                  placement=None, interleave=None, smooth_alpha="auto", calib_text=None,
                  calib_ids=None, weight_slot_bytes=None, with_tests=True, out=None,
                  force=False, progress=False) -> Bundle:
    """Compile `model` for hardware `hw` into a Bundle, written to `out` when given.

    model : a known config name ("llama2-7b", "smollm2-135m", ...), a model directory, a
        .gguf file, a transformers model object or a Graph.
    hw : a preset name, a YAML path or a HardwareConfig.
    quant : "w4a8kv4", "w8a8kv8", ... (`quantize.QuantSpec`).
    sparsity, sparse_layers : an N:M pattern ("2:4") and the blocks it prunes ("mlp",
        "attn", "all").
    prune_metric : "wanda" (|W| times the input channel norm over the calibration prompt;
        the default) or "magnitude" (|W|), `sparsify.METRICS`.
    buckets : "prefill:64@1024,decode:1@4096" (PHASE:ROWS@CTX), a list of Steps, or None.
    layers : keep the first N decoder layers.
    timing_only : shapes only; the bundle has programs but no images or expected outputs.
    placement : overrides per op kind, {"linear": "mxu", "attention": "csd"}.
    interleave : sub-batch interleaving of batched decode (None = where it applies).
    smooth_alpha : SmoothQuant migration strength in [0, 1] (or {kind: alpha}); "auto" =
        `quantize.SMOOTH_ALPHA` when the model has weights, none for timing-only; None = off.
    calib_text, calib_ids : the calibration prompt of Wanda pruning and SmoothQuant, as text
        in the model's tokenizer or as token ids; default `quantize.CALIB_TEXT`.
    weight_slot_bytes : SRAM bytes of each of the two MXU weight slots.
    with_tests : add the reference's expected logits for a test input to each entry.
    """
    cfg = load_config(hw)
    if cfg.fpga is None:
        raise CompileError(f"hardware {cfg.name!r} has no fpga section, and every op but KV "
                           f"append and attention runs on the FPGA's MXU and VPU; pick a "
                           f"preset with an FPGA, e.g. trimem-all")
    if out is not None:
        _refuse_overwrite(out, force)
    if calib_text is not None and calib_ids is not None:
        raise CompileError("pass calib_text or calib_ids, not both; the ids are the prompt "
                           "already tokenized")
    metric = prune_metric or sparsify.METRICS[0]
    if metric not in sparsify.METRICS:
        raise CompileError(f"prune_metric {prune_metric!r} is not one of "
                           f"{list(sparsify.METRICS)!r}")
    options = {"quant": quant, "sparsity": sparsity, "sparse_blocks": sparse_layers,
               "prune_metric": metric, "placement": placement, "interleave": interleave,
               "smooth_alpha": smooth_alpha, "weight_slot_bytes": weight_slot_bytes,
               "calib_text": None, "calib_ids": None}
    graph = load_graph(model, Step(1, "decode", 1), timing_only)
    if smooth_alpha == "auto":
        options["smooth_alpha"] = None if graph.timing_only else quantize.SMOOTH_ALPHA
    steps = parse_buckets(buckets, graph.spec.max_ctx)
    graph = restep(graph, steps[0])
    if layers is not None:
        graph = keep_layers(graph, layers)
    if needs_calibration(options, graph.timing_only):
        options["calib_text"], options["calib_ids"] = calibration(graph, calib_text, calib_ids)
    for _, run in MODEL_PASSES:
        graph = run(graph, cfg, options).verify()
    graphs = []
    for step in steps:
        g = restep(graph, step)
        for _, run in BUCKET_PASSES:
            g = run(g, cfg, options).verify()
        graphs.append(g)
    memory = tile.plan_memory(graphs, cfg)
    entries = [emit.emit_entry(g, cfg, memory) for g in _progress(graphs, progress, "emit")]
    images = [] if graph.timing_only else emit.build_images(graph, cfg, memory)
    image_bytes: dict = {}
    for image in images:
        image_bytes[image.space] = image_bytes.get(image.space, 0) + int(image.data.size)
    tests = test_vectors(graph, graphs) if with_tests else {}
    bundle = Bundle(model=_model_meta(graph, memory, graph.timing_only),
                    hardware=_hardware(cfg, hw), quant=_quant_meta(graph, options),
                    entries={e.name: e for e in entries}, images=images, tests=tests,
                    report=report.build(cfg, graphs, entries, memory, image_bytes))
    if out is not None:
        write_bundle(bundle, out, force=force)
    return bundle
