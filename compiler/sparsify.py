"""The sparsify pass: N:M magnitude pruning of the decoder linears.

Each selected linear keeps the n largest |w| of every m consecutive input weights
(`numerics.nm_prune_mask`) and its `nm` attr becomes (n, m), which the MXU and PIM read as
values plus in-block indices (`numerics.nm_pack`, `layout.pack_weight_tile`). Pruning works on
the float weights and must run before the quantize pass, which then quantizes the pruned
weights: pruned positions quantize to exactly zero, so the integer weight keeps the pattern.
The LM head is never pruned.
"""
from __future__ import annotations

import re

import numpy as np

from trimem import numerics as nu
from trimem.compiler.ir import CompileError, Graph, OpKind, option
from trimem.layout import DENSE

BLOCKS = {"mlp": ("mlp",), "attn": ("attn",), "all": ("attn", "mlp")}
"""Which linears a `sparse_blocks` choice prunes, by the linears' `block` attr."""


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


def prune(w, n, m):
    """Float weight [N, K] with all but the n largest |w| of each m-block set to zero."""
    w = np.asarray(w, dtype=np.float64)
    return np.where(nu.nm_prune_mask(w, n, m), w, 0.0)


def run(graph: Graph, cfg=None, options=None) -> Graph:
    """Prune the selected linears; returns a new, verified graph.

    Options: "sparsity" ("n:m", (n, m) or None for dense; default None) and "sparse_blocks"
    ("mlp", "attn" or "all"; default "mlp"). With a hardware config `cfg`, the pattern must
    be among `cfg.fpga.nm_patterns`.
    """
    nm = parse_nm(option(options, "sparsity", None))
    blocks = option(options, "sparse_blocks", "mlp")
    if blocks not in BLOCKS:
        raise CompileError(f"sparse_blocks {blocks!r} is not one of {sorted(BLOCKS)!r}")
    if graph.quantized:
        raise CompileError("sparsify must run before quantize: prune the float weights, then "
                           "quantize them")
    if cfg is not None and nm not in cfg.fpga.nm_patterns:
        raise CompileError(f"sparsity {nm[0]}:{nm[1]} is not in the hardware's "
                           f"fpga.nm_patterns {cfg.fpga.nm_patterns!r}; pick one of those")
    graph = graph.clone()
    if nm == DENSE:
        return graph.verify()
    n, m = nm
    for op in graph.ops:
        if op.kind is not OpKind.LINEAR or op.attrs["block"] not in BLOCKS[blocks]:
            continue
        if op.attrs["k"] % m:
            raise CompileError(f"{op.where}: k={op.attrs['k']!r} is not a multiple of m={m!r} "
                               f"for {n}:{m} sparsity; pick another pattern or leave the "
                               f"{op.attrs['block']} block dense")
        op.attrs["nm"] = nm
        name = op.attrs["weight"]
        if graph.weights[name] is not None:
            graph.weights[name] = prune(graph.weights[name], n, m)
    graph.meta["sparsity"] = {"nm": nm, "blocks": blocks}
    return graph.verify()
