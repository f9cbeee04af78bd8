"""RTL-vs-emulator diffing: the first differing tensor element or instruction, with context.

Both sides of a comparison are plain data: tensors as numpy arrays, and per stream the
cycle at which each instruction issued. A `Divergence` names where the two first part ways
and renders it for a person: the tensor, the element's index, both values, the neighbouring
elements, and the instruction that wrote the tensor or issued late, with its disassembly.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from trimem import isa

CONTEXT = 3
"""Elements shown on each side of a differing one."""


@dataclass(frozen=True)
class Region:
    """A tensor in a memory: what to compare after a run.

    `writer` is the (engine name, instruction index) whose result it is, when known.
    """
    name: str
    space: str
    addr: int
    dtype: str
    shape: tuple
    writer: tuple | None = None

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize

    def view(self, raw) -> np.ndarray:
        """The region's bytes `raw` as its tensor."""
        return np.frombuffer(bytes(raw), dtype=self.dtype).reshape(self.shape)

    def to_dict(self) -> dict:
        return {"name": self.name, "space": self.space, "addr": self.addr,
                "dtype": self.dtype, "shape": list(self.shape),
                "writer": None if self.writer is None else list(self.writer)}

    @classmethod
    def from_dict(cls, d: dict) -> "Region":
        writer = d.get("writer")
        return cls(d["name"], d["space"], int(d["addr"]), d["dtype"], tuple(d["shape"]),
                   None if writer is None else tuple(writer))


@dataclass
class Divergence:
    """Where the RTL and the emulator first differ: `kind` is "tensor" or "cycles"."""
    kind: str
    where: str
    detail: str
    instruction: str = ""
    context: list = field(default_factory=list)

    def text(self) -> str:
        """A report for a person."""
        lines = [f"first difference ({self.kind}) at {self.where}: {self.detail}"]
        if self.instruction:
            lines.append(f"  instruction: {self.instruction}")
        lines += [f"  {line}" for line in self.context]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "where": self.where, "detail": self.detail,
                "instruction": self.instruction, "context": list(self.context)}


def disassembly(programs: dict, writer) -> str:
    """`ENGINE[i] \\`assembly\\`` of instruction `writer` = (engine name, index) of `programs`
    (engine name -> list of 32-byte words), or "" when unknown."""
    if writer is None:
        return ""
    engine, index = writer
    words = programs.get(engine)
    if words is None or not 0 <= index < len(words):
        return f"{engine}[{index}]"
    return f"{engine}[{index}] `{isa.decode(bytes(words[index])).text}`"


def first_element(name: str, got: np.ndarray, want: np.ndarray) -> Divergence | None:
    """The first element where `got` and `want` differ (row-major), or None when equal."""
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        return Divergence("tensor", name, f"shape {got.shape} != expected {want.shape}")
    bad = np.argwhere(got != want)
    if not bad.size:
        return None
    at = tuple(int(i) for i in bad[0])
    flat_got, flat_want = got.reshape(-1), want.reshape(-1)
    flat = int(np.ravel_multi_index(at, got.shape)) if got.ndim else 0
    lo, hi = max(0, flat - CONTEXT), min(flat_got.size, flat + CONTEXT + 1)
    context = [f"rtl      [{lo}:{hi}] = {flat_got[lo:hi].tolist()}",
               f"emulator [{lo}:{hi}] = {flat_want[lo:hi].tolist()}",
               f"{len(bad)} of {got.size} elements differ"]
    detail = f"rtl {got[at].item()} != emulator {want[at].item()}"
    return Divergence("tensor", f"{name}{list(at)}", detail, context=context)


def diff_tensors(got: dict, want: dict, *, writers: dict | None = None,
                 programs: dict | None = None) -> Divergence | None:
    """The first differing tensor, in the order of `want` (name -> array); `writers` maps a
    name to the (engine, index) that wrote it, shown with its disassembly from `programs`."""
    for name, expected in want.items():
        found = first_element(name, got.get(name, np.zeros(0)), expected)
        if found is not None:
            writer = (writers or {}).get(name)
            found.instruction = disassembly(programs or {}, writer)
            return found
    return None


def diff_issues(rtl: dict, emulator: dict, programs: dict) -> Divergence | None:
    """The first instruction (earliest emulator issue cycle over all streams) whose issue
    cycle differs; `rtl` and `emulator` map an engine name to its instructions' issue cycles."""
    candidates = []
    for engine, want in emulator.items():
        got = list(rtl.get(engine, []))
        for index, cycle in enumerate(want):
            if index >= len(got) or got[index] != cycle:
                candidates.append((cycle, engine, index))
                break
    if not candidates:
        return None
    cycle, engine, index = min(candidates)
    got = list(rtl.get(engine, []))
    rtl_cycle = got[index] if index < len(got) else None
    detail = (f"issues at cycle {rtl_cycle} in the RTL, {cycle} in the emulator"
              if rtl_cycle is not None else
              f"never issues in the RTL (the emulator issues it at cycle {cycle})")
    before = [f"{engine}[{i}] issued at {got[i]} in both"
              for i in range(max(0, index - CONTEXT), index)]
    return Divergence("cycles", f"{engine}[{index}]", detail,
                      disassembly(programs, (engine, index)), before)


def diff_totals(rtl: dict, emulator: dict) -> Divergence | None:
    """The first engine whose stream length in cycles differs (engine name -> cycles)."""
    for engine, want in emulator.items():
        got = rtl.get(engine)
        if got != want:
            return Divergence("cycles", engine,
                              f"the stream takes {got} cycles in the RTL, {want} in the emulator")
    return None
