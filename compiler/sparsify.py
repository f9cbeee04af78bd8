"""The sparsify pass: N:M pruning of the decoder linears, activation-aware by default.

Each selected linear keeps, in every m consecutive input weights of an output row, the n with
the highest score, and its `nm` attr becomes (n, m), which the MXU and PIM read as values plus
in-block indices (`numerics.nm_pack`, `layout.pack_weight_tile`). The default score is Wanda's
|W_ij| * ||X_j||_2 (Sun et al., "A Simple and Effective Pruning Approach for Large Language
Models", arXiv:2306.11695), with ||X_j||_2 the norm of input channel j over the calibration
prompt of `quantize.calibrate`: a small weight on a channel that carries large activations
matters more than a large weight on a quiet one. "magnitude" scores by |W_ij| alone. The
pruned graph keeps those statistics of the unpruned model in `meta["calibration"]`, and a
SmoothQuant migration in the quantize pass reuses them instead of a second calibration pass
(Wanda's score is unchanged by SmoothQuant's per-channel scaling, X_j / s_j times W_ij * s_j).
Pruning works on the float weights and must run before the quantize pass, which then
quantizes the pruned weights: pruned positions quantize to exactly zero, so the integer weight
keeps the pattern. The LM head is never pruned.
"""
from __future__ import annotations

import re

import numpy as np

from trimem import numerics as nu
from trimem.compiler.ir import CompileError, Graph, OpKind, option
from trimem.compiler.quantize import calibrate
from trimem.layout import DENSE

BLOCKS = {"mlp": ("mlp",), "attn": ("attn",), "all": ("attn", "mlp")}
"""Which linears a `sparse_blocks` choice prunes, by the linears' `block` attr."""
METRICS = ("wanda", "magnitude")
"""Pruning scores: |W_ij| * ||X_j||_2 over the calibration prompt, or |W_ij|; the first is
the default."""


def parse_nm(value) -> tuple:
    """(n, m) from "2:4", (2, 4), [2, 4] or None (dense)."""
    if value is None:
        return DENSE
    if isinstance(value, list):
        value = tuple(value)
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", value)
        value = (int(match.group(1)), int(match.group(2))) if match else value
    if (not isinstance(value, tuple) or len(value) != 2
            or not all(isinstance(v, int) for v in value) or not 1 <= value[0] <= value[1]):
        raise CompileError(f"sparsity {value!r} is not an N:M pattern; write it as 'n:m' with "
                           "1 <= n <= m, e.g. '2:4'")
    return value


def prune(w, n, m, x_norm=None):
    """Float weight [N, K] with all but the n best-scored weights of each m-block set to zero.

    The score is |w_ij| * x_norm_j (Wanda) given the input channel norms `x_norm` [K], else
    |w_ij|; ties keep the lower index (`numerics.nm_prune_mask`).
    """
    w = np.asarray(w, dtype=np.float64)
    score = w if x_norm is None else w * np.asarray(x_norm, dtype=np.float64)[None, :]
    return np.where(nu.nm_prune_mask(score, n, m), w, 0.0)


def _selected(graph, blocks, nm):
    """The linears `blocks` prunes, checked against the pattern."""
    n, m = nm
    ops = [op for op in graph.ops
           if op.kind is OpKind.LINEAR and op.attrs["block"] in BLOCKS[blocks]]
    for op in ops:
        if op.attrs["k"] % m:
            raise CompileError(f"{op.where}: k={op.attrs['k']!r} is not a multiple of m={m!r} "
                               f"for {n}:{m} sparsity; pick another pattern or leave the "
                               f"{op.attrs['block']} block dense")
    return ops


def run(graph: Graph, cfg=None, options=None) -> Graph:
    """Prune the selected linears; returns a new, verified graph.

    Options: "sparsity" ("n:m", (n, m) or None for dense; default None), "sparse_blocks"
    ("mlp", "attn" or "all"; default "mlp"), "prune_metric" (one of METRICS; None means
    "wanda") and "calib_ids" (the calibration prompt, default `quantize.calibration_ids`).
    With a hardware config `cfg`, the pattern must be among `cfg.fpga.nm_patterns`.
    """
    nm = parse_nm(option(options, "sparsity", None))
    blocks = option(options, "sparse_blocks", "mlp")
    metric = option(options, "prune_metric", None) or METRICS[0]
    if blocks not in BLOCKS:
        raise CompileError(f"sparse_blocks {blocks!r} is not one of {sorted(BLOCKS)!r}")
    if metric not in METRICS:
        raise CompileError(f"prune_metric {metric!r} is not one of {list(METRICS)!r}")
    if graph.quantized:
        raise CompileError("sparsify must run before quantize: prune the float weights, then "
                           "quantize them")
    if cfg is not None and nm not in cfg.fpga.nm_patterns:
        raise CompileError(f"sparsity {nm[0]}:{nm[1]} is not in the hardware's "
                           f"fpga.nm_patterns {cfg.fpga.nm_patterns!r}; pick one of those")
    out = graph.clone()
    if nm == DENSE:
        return out.verify()
    ops = _selected(out, blocks, nm)
    meta = {"nm": nm, "blocks": blocks, "metric": metric}
    norms = {}
    if metric == "wanda" and not graph.timing_only:
        calib = calibrate(graph, option(options, "calib_ids", None))
        out.meta["calibration"], norms = calib, calib.norm
        meta["calib_tokens"] = len(calib.ids)
    for op in ops:
        op.attrs["nm"] = nm
        name = op.attrs["weight"]
        if out.weights[name] is not None:
            out.weights[name] = prune(out.weights[name], *nm, norms.get(op.name))
    out.meta["sparsity"] = meta
    return out.verify()
