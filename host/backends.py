"""Backends: where a Session's steps run, behind one ABC and a registry.

A step is one entry of a bundle (a phase and length bucket) applied to token ids and
positions, row r writing the KV cache of sequence slot `slots[r]`. Every backend returns the
logits of the real rows (fx int32, bit for bit the same on every backend) and, when it times
the step, the emulator's report in simulated hardware time.

- "torch": the integer reference of `trimem.compiler.reference` (CUDA when available); the
  step's hardware time comes from a timing-only emulator run of the same entry.
- "emulator": the functional and cycle-accurate emulator, with the bundle's images and the
  KV cache kept in its memories from step to step.
- "verilator": the RTL of a small machine (the `trimem-small` system top) on Verilator,
  with the KV cache kept in the RTL's memories from step to step; timed by the emulator too,
  with the RTL's own cycle count beside it.
"""
from __future__ import annotations

import abc
import time
from typing import ClassVar, NamedTuple

import numpy as np

from trimem import isa
from trimem.bundle import Bundle, Entry

KV_INSTRUCTIONS = ("VPU.KVAPP", "VPU.ATTN", "CSD.KVAPP", "CSD.ATTN")
"""Instructions that name a sequence slot (`seq`): a prefill entry is compiled for slot 0."""


class Batch(NamedTuple):
    """One step's rows, padded to the entry's row count.

    Members
    -------
    entry : name of the bundle entry (phase and length bucket) that runs the step.
    ids, pos : int32 [M] token ids and positions, M = the entry's rows.
    slots : int per row, the sequence slot whose KV cache the row reads and extends.
    real : bool [M], the rows whose logits are wanted; the others are padding.
    """
    entry: str
    ids: np.ndarray
    pos: np.ndarray
    slots: tuple
    real: np.ndarray


class StepOutput(NamedTuple):
    """What a backend returns for one Batch.

    Members
    -------
    logits : fx int32 [real rows, vocab], in row order.
    report : the emulator report of the step (simulated seconds, energy, per-engine cycles,
        bytes), or None when the step is not timed.
    wall_s : wall-clock seconds the backend spent.
    """
    logits: np.ndarray
    report: dict | None
    wall_s: float


def retarget(entry: Entry, slot: int) -> dict:
    """The entry's programs with every KV instruction moved to sequence slot `slot`.

    Prefill entries are compiled for slot 0 (docs/contract.md, "Sequence slots"); the host
    runs them for any other slot by rewriting the `seq` field, as a runtime patches a
    descriptor, and leaves every other bit of the stream as compiled.
    """
    if slot == 0:
        return entry.programs
    out = {}
    for engine, words in entry.programs.items():
        new = list(words)
        for i, word in enumerate(words):
            ins = isa.decode(word)
            if ins.name in KV_INSTRUCTIONS:
                new[i] = isa.encode(ins.name, **{**ins.fields, "seq": slot})
        out[engine] = new
    return out


def batch_programs(bundle: Bundle, batch: Batch, cache: dict) -> dict:
    """The programs that run `batch`, retargeted for a prefill's slot and cached in `cache`."""
    entry = bundle.entry(batch.entry)
    slot = batch.slots[0] if entry.kind == "prefill" else 0
    key = (batch.entry, slot)
    if key not in cache:
        cache[key] = retarget(entry, slot)
    return cache[key]


def require_images(bundle: Bundle, where: str) -> None:
    """ValueError for a timing-only bundle, which has nothing to run on `where`."""
    if not bundle.images:
        raise ValueError(f"the bundle has no memory images (a timing-only compile); compile "
                         f"the model with weights to run it on {where}")


def step_inputs(entry: Entry, batch: Batch) -> list:
    """(TensorSpec, array in its dtype) of each input of `entry` for `batch`."""
    given = {"ids": batch.ids, "pos": batch.pos}
    return [(spec, given[spec.name].astype(spec.dtype)) for spec in entry.inputs]


def logits_spec(entry: Entry):
    """The TensorSpec of the entry's logits output."""
    (spec,) = [s for s in entry.outputs if s.name == "logits"]
    return spec


def emulate(config, entry: Entry, programs: dict, batch: Batch, *, memories=None,
            timing_only=False):
    """Run one step on a fresh emulator Machine; return (logits of every row or None, report).

    `memories` (a dict of the emulator's Memory objects by space) carries the images and the
    KV cache from step to step: the machine gets new clocks, resources and statistics, so
    each report covers this step alone, while its memories live on.
    """
    from trimem.emulator import stats
    from trimem.emulator.machine import Machine

    machine = Machine(config, timing_only=timing_only)
    if memories is not None:
        machine.memories = memories
    for spec, data in step_inputs(entry, batch):
        machine.memory(spec.space).write_array(spec.addr, data)
    machine.run(programs)
    report = stats.report(machine)
    report["entry"] = entry.name
    if timing_only:
        return None, report
    spec = logits_spec(entry)
    logits = machine.memory(spec.space).read_array(spec.addr, spec.dtype, spec.shape)
    return np.asarray(logits, np.int32), report


class Backend(abc.ABC):
    """Runs the steps of one compiled model and keeps its KV cache.

    Parameters
    ----------
    bundle : the compiled Bundle (entries, images, hardware).
    graph : the quantized graph the bundle was compiled from (the torch backend executes it).
    config : the bundle's HardwareConfig.
    device : where a backend that can choose computes ("cpu", "cuda"); None picks.
    """
    name: ClassVar[str]

    def __init__(self, bundle: Bundle, graph, config, device=None):
        self.bundle, self.graph, self.config, self.device = bundle, graph, config, device

    @abc.abstractmethod
    def run(self, batch: Batch) -> StepOutput:
        """Run one step; rows extend the KV caches of their slots."""

    @abc.abstractmethod
    def reset(self, slot: int | None = None) -> None:
        """Forget the KV cache of one slot, or of all slots when `slot` is None."""


class TorchBackend(Backend):
    """The integer reference on torch (CUDA when available), timed by the emulator.

    Only real rows are computed, one call per sequence slot; every op is row-wise or causal,
    so the logits equal the emulator's padded batch bit for bit. With `timing` (the default)
    each step also runs timing-only on the emulator for its simulated time and energy.
    """
    name = "torch"

    def __init__(self, bundle, graph, config, device=None, timing=True):
        super().__init__(bundle, graph, config, device)
        if graph is None:
            raise ValueError("the torch backend runs the quantized graph, and this session "
                             "has only a bundle; pass the model too, or use backend='emulator'")
        import torch

        from trimem.compiler.reference import Reference

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.reference = Reference(graph, device=self.device)
        self.timing = timing
        self.programs: dict = {}

    def run(self, batch: Batch) -> StepOutput:
        start = time.perf_counter()
        rows = np.flatnonzero(batch.real)
        out = np.zeros((len(rows), self.graph.spec.vocab), np.int32)
        for slot in dict.fromkeys(batch.slots[r] for r in rows):
            mine = [i for i, r in enumerate(rows) if batch.slots[r] == slot]
            pick = rows[mine]
            step = self.reference.step(batch.ids[pick], batch.pos[pick], seq=slot)
            logits = step.logits
            out[mine] = logits.cpu().numpy() if hasattr(logits, "cpu") else logits
        wall = time.perf_counter() - start
        report = None
        if self.timing:
            entry = self.bundle.entry(batch.entry)
            _, report = emulate(self.config, entry, batch_programs(self.bundle, batch,
                                                                   self.programs),
                                batch, timing_only=True)
        return StepOutput(out, report, wall)

    def reset(self, slot=None) -> None:
        self.reference.reset(slot)


class EmulatorBackend(Backend):
    """The functional and cycle-accurate emulator; images are placed once, and the KV cache
    stays in the emulated HBM or flash between steps."""
    name = "emulator"

    def __init__(self, bundle, graph, config, device=None):
        super().__init__(bundle, graph, config, device)
        require_images(bundle, "the emulator")
        self.programs: dict = {}
        self.memories: dict = {}
        self._place_images()

    def _place_images(self) -> None:
        from trimem.emulator.machine import Machine

        machine = Machine(self.config)
        for image in self.bundle.images:
            machine.memory(image.space).write(image.addr, image.data)
        self.memories = machine.memories

    def run(self, batch: Batch) -> StepOutput:
        start = time.perf_counter()
        entry = self.bundle.entry(batch.entry)
        logits, report = emulate(self.config, entry, batch_programs(self.bundle, batch,
                                                                    self.programs),
                                 batch, memories=self.memories)
        return StepOutput(logits[batch.real], report, time.perf_counter() - start)

    def reset(self, slot=None) -> None:
        """Nothing to clear: a slot's cache is rewritten from position 0 before it is read,
        since every row writes its K and V before its attention reads them."""


class VerilatorBackend(Backend):
    """The bundle's machine as RTL on Verilator, through the batched harness of `trimem cosim`.

    The design is built once (cached on disk), the images are placed before the first step,
    and each step writes its programs and inputs, runs every stream to HALT and reads the
    logits back; the memories, KV cache included, live on in the design between steps. The
    report is a timing-only emulator run of the step, with `rtl_cycles` beside its `cycles`.
    """
    name = "verilator"

    def __init__(self, bundle, graph, config, device=None):
        super().__init__(bundle, graph, config, device)
        from trimem.hdl.system import check_system
        from trimem.sims import cosim, tops

        require_images(bundle, "the RTL")
        engines = {e for entry in bundle.entries.values() for e in entry.programs}
        spaces = {img.space for img in bundle.images} | {
            t.space for entry in bundle.entries.values() for t in entry.inputs + entry.outputs}
        self.top = tops.choose(dict.fromkeys(engines), spaces)(config)
        try:
            check_system(config)
            self.harness = cosim.open_top(self.top.name, config, **self.top.design_kwargs())
        except ValueError as exc:
            raise ValueError(f"the RTL co-simulates small machines, and {config.name!r} is not "
                             f"one ({exc}); compile for hw='trimem-small' or use "
                             f"backend='emulator'") from None
        self.top.attach(self.harness)
        self.programs: dict = {}
        self.placed = False

    def run(self, batch: Batch) -> StepOutput:
        from trimem.sims import cosim

        start = time.perf_counter()
        entry = self.bundle.entry(batch.entry)
        programs = batch_programs(self.bundle, batch, self.programs)
        _, report = emulate(self.config, entry, programs, batch, timing_only=True)
        images = [] if self.placed else [(img.space, img.addr, img.data.tobytes())
                                         for img in self.bundle.images]
        images += [(spec.space, spec.addr, data.tobytes())
                   for spec, data in step_inputs(entry, batch)]
        spec = logits_spec(entry)
        rtl = cosim.run_top(self.harness, self.top, programs, images,
                            [("logits", spec.space, spec.addr, spec.nbytes)],
                            max_cycles=cosim.CYCLE_MARGIN * report["cycles"] + cosim.SLACK)
        self.placed = True
        logits = np.frombuffer(rtl.got["logits"], spec.dtype).reshape(spec.shape)
        report["rtl_cycles"] = rtl.cycles
        return StepOutput(np.asarray(logits, np.int32)[batch.real], report,
                          time.perf_counter() - start)

    def reset(self, slot=None) -> None:
        """Nothing to clear, as on the emulator: a row writes its K and V before reading them."""

    def close(self) -> None:
        """Free the Verilated design."""
        self.harness.close()


BACKENDS = {"torch": TorchBackend, "emulator": EmulatorBackend, "verilator": VerilatorBackend}
"""The registered backends by name: each is called as (bundle, graph, config, device)."""


def get_backend(name: str):
    """The backend factory registered as `name`; ValueError listing the valid names otherwise."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; valid backends: {sorted(BACKENDS)!r}")
    return BACKENDS[name]
