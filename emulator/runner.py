"""Run one entry of a bundle: place images and inputs, run the streams, read and check outputs.

The hardware config comes from the bundle (`hardware.config`, a full config dict, or
`hardware.preset`, a preset name checked against `hardware.hash` when given). Inputs come from
the caller or else from the bundle's test vectors; expected outputs, when the bundle has them,
are compared bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trimem import isa
from trimem.bundle import Bundle, read_bundle
from trimem.config import load_config, load_config_dict
from trimem.emulator import stats
from trimem.emulator.engine import EmulatorError
from trimem.emulator.machine import Machine


@dataclass
class RunResult:
    """A finished run: the report (plain data), the outputs read back, and the machine."""
    report: dict
    outputs: dict = field(default_factory=dict)
    machine: Machine | None = None


def bundle_config(bundle: Bundle):
    """The hardware config a bundle was compiled for."""
    hw = bundle.hardware or {}
    if "config" in hw:
        config = load_config_dict(hw["config"], source="bundle hardware.config")
    elif "preset" in hw:
        config = load_config(hw["preset"])
    else:
        raise EmulatorError(f"bundle hardware {hw!r} names no config; it needs `preset` (a "
                            f"preset name) or `config` (a full config); recompile the model")
    want = hw.get("hash")
    if want is not None and want != config.config_hash():
        raise EmulatorError(f"bundle was compiled for hardware hash {want} but config "
                            f"{config.name!r} now hashes to {config.config_hash()}; recompile "
                            f"the model for this config")
    return config


def _place(machine: Machine, spec, array) -> None:
    array = np.asarray(array)
    if tuple(array.shape) != tuple(spec.shape):
        raise EmulatorError(f"input {spec.name!r} has shape {tuple(array.shape)!r}, the entry "
                            f"expects {tuple(spec.shape)!r}")
    machine.memory(spec.space).write_array(spec.addr, array.astype(spec.dtype))


def compare(outputs: dict, expected: dict) -> dict:
    """Per output name: equal bit for bit, and where not, how many elements differ and the
    first one that does."""
    result = {}
    for name, want in expected.items():
        got = outputs.get(name)
        if got is None or got.shape != want.shape:
            shape = None if got is None else got.shape
            result[name] = {"match": False, "problem": f"shape {shape} != expected {want.shape}"}
            continue
        diff = np.argwhere(got != want)
        entry = {"match": not diff.size, "mismatches": int(len(diff))}
        if diff.size:
            at = tuple(int(i) for i in diff[0])
            entry["first"] = {"index": list(at), "got": got[at].item(), "expected": want[at].item()}
        result[name] = entry
    return result


def run_bundle(bundle, entry: str | None = None, *, timing_only: bool = False,
               inputs: dict | None = None, config=None) -> RunResult:
    """Run `entry` (default: the first) of `bundle` (a Bundle or a bundle directory).

    In timing-only mode the memory images are not placed (a timing-only bundle has none)
    and no outputs are read; the inputs still are, since timing depends on positions and ids.
    """
    if isinstance(bundle, (str, Path)):
        bundle = read_bundle(bundle)
    name = entry if entry is not None else next(iter(bundle.entries), None)
    if name is None:
        raise EmulatorError("the bundle has no entries; recompile the model")
    ent = bundle.entry(name)
    config = bundle_config(bundle) if config is None else load_config(config)
    machine = Machine(config, timing_only=timing_only)
    if not timing_only:
        for image in bundle.images:
            machine.memory(image.space).write(image.addr, image.data)
    vectors = bundle.tests.get(name, {})
    given = inputs if inputs is not None else vectors.get("inputs", {})
    for spec in ent.inputs:
        if spec.name in given:
            _place(machine, spec, given[spec.name])
        elif not timing_only:
            raise EmulatorError(f"entry {name!r} needs input {spec.name!r}; pass it in inputs "
                                f"or compile the bundle with test vectors")
    machine.run({isa.stream_engine(e): words for e, words in ent.programs.items()})
    result = RunResult(stats.report(machine), machine=machine)
    result.report["entry"] = name
    if not timing_only:
        result.outputs = {spec.name: machine.memory(spec.space).read_array(
            spec.addr, spec.dtype, spec.shape) for spec in ent.outputs}
        expected = vectors.get("expected")
        if expected:
            checks = compare(result.outputs, expected)
            result.report["outputs"] = checks
            result.report["outputs_match"] = all(c["match"] for c in checks.values())
    return result
