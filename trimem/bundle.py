"""The bundle: the compiler's output directory, the only thing emulator, co-sim and host load.

A bundle holds `manifest.yaml`, one instruction stream per engine and entry point
(`programs/<entry>/<engine>.bin`), memory images (`images/<name>.bin`, plus a `$readmemh`
`.hex` for images small enough to simulate), the hardware config it was compiled for, and
optional test vectors (`tests/<entry>/<name>.npy`). Every file is listed in the manifest with
its sha256; reading verifies all of them and reports every problem at once.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from trimem import isa

FORMAT = "trimem-bundle"
FORMAT_VERSION = 1
BYTE_ORDER = "little"
HEX_LIMIT_BYTES = 16 << 20
"""Bundles whose images total up to this size also get `$readmemh` files for every image
(RTL co-simulation runs only small bundles; large ones would triple their size in text)."""
DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
"""The manifest's YAML writer: libyaml's where PyYAML has it (the same text, several times
faster than the pure-Python SafeDumper)."""


class BundleError(ValueError):
    """A bundle that cannot be written or read; the message lists every problem found."""


@dataclass
class TensorSpec:
    """A tensor the host places in (input) or reads from (output) a memory before/after a run."""
    name: str
    space: str
    addr: int
    dtype: str
    shape: tuple

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize

    def to_dict(self) -> dict:
        return {"name": self.name, "space": self.space, "addr": self.addr,
                "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict) -> "TensorSpec":
        return cls(d["name"], d["space"], int(d["addr"]), d["dtype"], tuple(d["shape"]))


@dataclass
class MemoryImage:
    """Bytes preloaded into one memory space at an address before any program runs.

    `location` records the physical placement (HBM channel, PIM channel/bank, flash channel)
    for readers such as the RTL loader; the address alone is what the programs use.
    """
    name: str
    space: str
    addr: int
    data: np.ndarray
    location: dict = field(default_factory=dict)

    def __post_init__(self):
        self.data = np.ascontiguousarray(self.data, dtype=np.uint8).reshape(-1)
        if self.space not in isa.Space.__members__:
            raise BundleError(f"image {self.name!r}: unknown memory space {self.space!r}; "
                              f"use one of {', '.join(isa.Space.__members__)}")


@dataclass
class Entry:
    """One entry point (a phase and length bucket): a program per engine plus its I/O."""
    name: str
    kind: str
    programs: dict
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)


@dataclass
class Bundle:
    model: dict
    hardware: dict
    quant: dict
    entries: dict
    images: list = field(default_factory=list)
    tests: dict = field(default_factory=dict)
    """entry name -> {"inputs": {name: array}, "expected": {name: array}}"""
    report: dict = field(default_factory=dict)

    def entry(self, name: str) -> Entry:
        if name not in self.entries:
            raise BundleError(f"bundle has no entry {name!r}; it has {', '.join(self.entries)}")
        return self.entries[name]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def readmemh(data: np.ndarray, width: int) -> bytes:
    """`$readmemh` text of `data`, `width` bytes per line, little-endian words."""
    data = np.asarray(data, dtype=np.uint8)
    pad = (-len(data)) % width
    words = np.concatenate([data, np.zeros(pad, np.uint8)]).reshape(-1, width)[:, ::-1]
    text = np.empty((len(words), 2 * width + 1), np.uint8)
    text[:, 0:-1:2] = _HEX_DIGITS[words >> 4]
    text[:, 1:-1:2] = _HEX_DIGITS[words & 15]
    text[:, -1] = ord("\n")
    return text.tobytes()


_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", np.uint8)


def is_bundle(path) -> bool:
    return (Path(path) / "manifest.yaml").is_file()


def write_bundle(bundle: Bundle, path, *, force: bool = False, hex_width: int = 8) -> Path:
    """Write `bundle` to directory `path`.

    An existing bundle at `path` is replaced; a non-empty directory that is not a bundle is
    refused unless `force`, so nothing the user keeps there is overwritten by accident.
    """
    out = Path(path)
    if out.exists() and any(out.iterdir()) and not is_bundle(out) and not force:
        raise BundleError(f"{out} is not empty and holds no bundle; choose an empty or new "
                          f"directory, or pass --force to write into it anyway")
    out.mkdir(parents=True, exist_ok=True)
    files = {}

    def put(rel: str, data: bytes) -> dict:
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        files[rel] = _sha256(data)
        return {"file": rel, "sha256": files[rel], "bytes": len(data)}

    entries = []
    for entry in bundle.entries.values():
        progs = {}
        for engine, words in entry.programs.items():
            body = isa.program_bytes(isa.Engine[engine.upper()], words)
            progs[engine.lower()] = put(f"programs/{entry.name}/{engine.lower()}.bin", body)
            progs[engine.lower()]["instructions"] = len(words)
            put(f"programs/{entry.name}/{engine.lower()}.hex",
                readmemh(np.frombuffer(b"".join(words), np.uint8), isa.WORD_BYTES))
        entries.append({"name": entry.name, "kind": entry.kind, "programs": progs,
                        "inputs": [t.to_dict() for t in entry.inputs],
                        "outputs": [t.to_dict() for t in entry.outputs], "meta": entry.meta})
    images = []
    with_hex = sum(image.data.size for image in bundle.images) <= HEX_LIMIT_BYTES
    for image in bundle.images:
        rec = {"name": image.name, "space": image.space, "addr": image.addr,
               "location": image.location, **put(f"images/{image.name}.bin", image.data.tobytes())}
        if with_hex:
            put(f"images/{image.name}.hex", readmemh(image.data, hex_width))
            rec["hex"] = {"file": f"images/{image.name}.hex", "width_bytes": hex_width}
        images.append(rec)
    tests = {}
    for entry_name, vectors in bundle.tests.items():
        tests[entry_name] = {}
        for group in ("inputs", "expected"):
            tests[entry_name][group] = {}
            for name, array in vectors.get(group, {}).items():
                buf = io.BytesIO()
                np.save(buf, np.asarray(array), allow_pickle=False)
                tests[entry_name][group][name] = put(f"tests/{entry_name}/{group}_{name}.npy",
                                                     buf.getvalue())
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "isa_version": isa.ISA_VERSION,
                "byte_order": BYTE_ORDER, "model": bundle.model, "hardware": bundle.hardware,
                "quant": bundle.quant, "entries": entries, "images": images, "tests": tests,
                "report": bundle.report}
    (out / "manifest.yaml").write_text(yaml.dump(manifest, Dumper=DUMPER, sort_keys=False))
    return out


def read_bundle(path, *, verify: bool = True) -> Bundle:
    """Read a bundle, checking format, versions and every file's presence and sha256."""
    root = Path(path)
    manifest_path = root / "manifest.yaml"
    if not manifest_path.is_file():
        raise BundleError(f"{root} is not a bundle: {manifest_path} is missing "
                          f"(create one with `trimem compile MODEL --hw PRESET -o {root}`)")
    try:
        m = yaml.safe_load(manifest_path.read_text())
    except yaml.YAMLError as exc:
        raise BundleError(f"{manifest_path}: not valid YAML: {exc}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise BundleError(f"{manifest_path}: format is {m.get('format') if isinstance(m, dict) else m!r}, "
                          f"expected {FORMAT!r}")
    if m.get("version") != FORMAT_VERSION or m.get("isa_version") != isa.ISA_VERSION:
        raise BundleError(f"{manifest_path}: bundle format {m.get('version')} / ISA "
                          f"{m.get('isa_version')} but this Trimem reads format {FORMAT_VERSION} "
                          f"/ ISA {isa.ISA_VERSION}; recompile the model")
    problems = []

    def load(rec: dict) -> bytes | None:
        f = root / rec["file"]
        if not f.is_file():
            problems.append(f"missing file {rec['file']}")
            return None
        data = f.read_bytes()
        if verify and _sha256(data) != rec["sha256"]:
            problems.append(f"corrupt file {rec['file']}: sha256 does not match the manifest")
            return None
        return data

    entries = {}
    for e in m.get("entries", []):
        programs = {}
        for engine, rec in e["programs"].items():
            data = load(rec)
            if data is not None:
                eng, words = isa.parse_program(data)
                if eng != isa.Engine[engine.upper()]:
                    problems.append(f"{rec['file']} holds an {eng.name} program, expected {engine.upper()}")
                programs[engine] = words
        entries[e["name"]] = Entry(e["name"], e["kind"], programs,
                                   [TensorSpec.from_dict(t) for t in e["inputs"]],
                                   [TensorSpec.from_dict(t) for t in e["outputs"]], e.get("meta", {}))
    images = []
    for rec in m.get("images", []):
        data = load(rec)
        if data is not None:
            images.append(MemoryImage(rec["name"], rec["space"], int(rec["addr"]),
                                      np.frombuffer(data, np.uint8), rec.get("location", {})))
    tests = {}
    for entry_name, groups in m.get("tests", {}).items():
        tests[entry_name] = {}
        for group, arrays in groups.items():
            tests[entry_name][group] = {}
            for name, rec in arrays.items():
                data = load(rec)
                if data is not None:
                    tests[entry_name][group][name] = np.load(io.BytesIO(data), allow_pickle=False)
    if problems:
        raise BundleError(f"bundle {root} has {len(problems)} problem(s):\n  - "
                          + "\n  - ".join(problems) + "\nrecompile it with `trimem compile`")
    return Bundle(m["model"], m["hardware"], m["quant"], entries, images, tests, m.get("report", {}))
