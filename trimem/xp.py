"""One array vocabulary over numpy and torch, so each numeric function is written once.

The golden integer arithmetic in `trimem.numerics` must give the same bits in numpy (the
emulator) and torch (the reference, on CPU or CUDA). Writing every function once against
this namespace, instead of twice, makes that true by construction; the tests then check it.
Only integer-exact operations are offered: float math never enters the runtime numerics.
"""
from __future__ import annotations

import numpy as np

try:
    import torch
except ImportError:  # the emulator and compiler run without torch
    torch = None

FLOAT_EXACT = 1 << 53
"""Integers below this magnitude are exact in float64, and so are their sums."""


def exact_k_step(a_max: float, b_max: float, k: int) -> int:
    """How many terms of an integer dot product a float64 matmul may sum exactly, given the
    largest magnitudes of the operands (0: the operands themselves are not exact in float64).

    Float64 BLAS is several times faster than an int64 matmul; every partial sum of k terms
    below 2**53 in magnitude is exact, so the products are summed in chunks of K that keep
    them there, and the chunks are added in int64.
    """
    if a_max >= FLOAT_EXACT or b_max >= FLOAT_EXACT:
        return 0
    bound = max(a_max * b_max, 1.0)
    return max(k, 1) if bound * k < FLOAT_EXACT else int(FLOAT_EXACT // bound)


class _Numpy:
    name = "numpy"
    int8, int16, int32, int64, uint8 = np.int8, np.int16, np.int32, np.int64, np.uint8

    asarray = staticmethod(np.asarray)
    where = staticmethod(np.where)
    maximum = staticmethod(np.maximum)
    minimum = staticmethod(np.minimum)
    abs = staticmethod(np.abs)
    clip = staticmethod(np.clip)
    arange = staticmethod(np.arange)
    zeros = staticmethod(np.zeros)
    full = staticmethod(np.full)
    stack = staticmethod(np.stack)
    concat = staticmethod(np.concatenate)
    take_along_axis = staticmethod(np.take_along_axis)

    @staticmethod
    def astype(x, dtype):
        return np.asarray(x).astype(dtype)

    @staticmethod
    def is_integer(x):
        """True for integer (signed or unsigned) arrays and Python ints."""
        return np.asarray(x).dtype.kind in "iu"

    @staticmethod
    def sum(x, axis=None, keepdims=False):
        return np.sum(x, axis=axis, keepdims=keepdims, dtype=np.int64)

    @staticmethod
    def amax(x, axis=None, keepdims=False):
        return np.max(x, axis=axis, keepdims=keepdims)

    @staticmethod
    def argmax(x, axis=-1):
        return np.argmax(x, axis=axis)

    @staticmethod
    def sort(x, axis=-1):
        """Values sorted ascending along axis (ties are equal values, so any order agrees)."""
        return np.sort(x, axis=axis)

    @staticmethod
    def bit_length(x):
        """Number of bits of each non-negative int64 (0 for 0)."""
        x = np.asarray(x, dtype=np.int64)
        out = np.zeros(x.shape, dtype=np.int64)
        for shift in (32, 16, 8, 4, 2, 1):
            big = x >= (np.int64(1) << shift)
            out += np.where(big, shift, 0)
            x = np.where(big, x >> shift, x)
        return out + (x > 0)

    @staticmethod
    def matmul_exact(a, b):
        """int64 a @ b, exact: float64 BLAS in chunks of K (`exact_k_step`), else int64."""
        a, b = np.asarray(a), np.asarray(b)
        k = a.shape[-1]
        af, bf = a.astype(np.float64), b.astype(np.float64)
        step = exact_k_step(float(np.abs(af).max(initial=0)), float(np.abs(bf).max(initial=0)),
                            k)
        if step == 0:
            return a.astype(np.int64) @ b.astype(np.int64)
        if step >= k:
            return (af @ bf).astype(np.int64)
        return sum((af[..., s:s + step] @ bf[..., s:s + step, :]).astype(np.int64)
                   for s in range(0, k, step))


class _Torch:
    name = "torch"

    def __getattr__(self, attr):
        dtypes = {"int8": torch.int8, "int16": torch.int16, "int32": torch.int32,
                  "int64": torch.int64, "uint8": torch.uint8}
        if attr in dtypes:
            return dtypes[attr]
        raise AttributeError(attr)

    @staticmethod
    def asarray(x, dtype=None, device=None):
        return torch.as_tensor(x, dtype=dtype, device=device)

    @staticmethod
    def where(c, a, b):
        return torch.where(c, torch.as_tensor(a, device=c.device),
                           torch.as_tensor(b, device=c.device))

    @staticmethod
    def maximum(a, b):
        return torch.maximum(a, torch.as_tensor(b, dtype=a.dtype, device=a.device))

    @staticmethod
    def minimum(a, b):
        return torch.minimum(a, torch.as_tensor(b, dtype=a.dtype, device=a.device))

    abs = staticmethod(torch.abs)
    clip = staticmethod(torch.clamp)
    stack = staticmethod(torch.stack)
    concat = staticmethod(torch.cat)
    take_along_axis = staticmethod(torch.take_along_dim)

    @staticmethod
    def arange(*args, dtype=None, device=None):
        return torch.arange(*args, dtype=dtype, device=device)

    @staticmethod
    def zeros(shape, dtype=None, device=None):
        return torch.zeros(shape, dtype=dtype, device=device)

    @staticmethod
    def full(shape, value, dtype=None, device=None):
        return torch.full(shape, value, dtype=dtype, device=device)

    @staticmethod
    def astype(x, dtype):
        return x.to(dtype)

    @staticmethod
    def is_integer(x):
        return not (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool)

    @staticmethod
    def sum(x, axis=None, keepdims=False):
        x = x.to(torch.int64)
        return x.sum() if axis is None else x.sum(dim=axis, keepdim=keepdims)

    @staticmethod
    def amax(x, axis=None, keepdims=False):
        return x.max() if axis is None else torch.amax(x, dim=axis, keepdim=keepdims)

    @staticmethod
    def argmax(x, axis=-1):
        return torch.argmax(x, dim=axis)

    @staticmethod
    def sort(x, axis=-1):
        return torch.sort(x, dim=axis).values

    @staticmethod
    def bit_length(x):
        x = x.to(torch.int64)
        out = torch.zeros_like(x)
        for shift in (32, 16, 8, 4, 2, 1):
            big = x >= (1 << shift)
            out += torch.where(big, shift, 0)
            x = torch.where(big, x >> shift, x)
        return out + (x > 0).to(torch.int64)

    @staticmethod
    def matmul_exact(a, b):
        """int64 a @ b, exact: float64 GEMM (CUDA has no integer one, and on the CPU it is
        faster) in chunks of K (`exact_k_step`), else int64."""
        k = a.shape[-1]
        af, bf = a.to(torch.float64), b.to(torch.float64)
        step = exact_k_step(float(af.abs().max()) if af.numel() else 0.0,
                            float(bf.abs().max()) if bf.numel() else 0.0, k)
        if step == 0:
            if a.device.type != "cpu":
                raise ValueError("operands beyond 2**53 have no exact matmul on "
                                 f"{a.device.type}; run the reference on the CPU")
            return a.to(torch.int64) @ b.to(torch.int64)
        if step >= k:
            return (af @ bf).to(torch.int64)
        return sum((af[..., s:s + step] @ bf[..., s:s + step, :]).to(torch.int64)
                   for s in range(0, k, step))


NUMPY = _Numpy()
TORCH = _Torch() if torch is not None else None


def namespace(*arrays):
    """The vocabulary for these arrays: torch if any is a tensor, else numpy."""
    if torch is not None and any(isinstance(a, torch.Tensor) for a in arrays):
        return TORCH
    return NUMPY
