"""Co-simulation of whole bundles: the RTL on Verilator beside the emulator, bit for bit and
cycle for cycle.

`cosim(bundle)` runs one entry of a compiled bundle on the emulator and on the smallest HDL
top that holds every stream and memory the entry uses (`trimem.sims.tops`): the MXU or VPU
top for one such stream over the SRAM, the PIM top for one PIM stream over the PIM memories,
else the `trimem-small` system top (DMA, MXU, VPU, PIM and CSD streams over HOST, HBM, SRAM,
GBUF, PRES, PIMDRAM, CDRAM and FLASH). The RTL side is the batched harness (`trimem.sims.harness`): the
bundle's `.hex` programs and images are loaded, the inputs written, and the design runs to
HALT in one call; then the outputs are read back and compared with the emulator's, and every
instruction's issue cycle with the emulator's schedule. The
first difference is reported with the instruction's disassembly (`trimem.sims.diff`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from trimem import isa
from trimem.bundle import read_bundle
from trimem.sims import diff, harness, runner, tops

RESET_CYCLES = 2
CYCLE_MARGIN = 4
"""A run may take this many times the emulator's cycles (plus SLACK) before it is stopped."""
SLACK = 10_000


@dataclass
class CosimResult:
    """One entry on the RTL and the emulator."""
    entry: str
    top: str
    bit_exact: bool
    cycle_exact: bool
    rtl_cycles: int
    emulator_cycles: int
    wall_s: float
    divergence: diff.Divergence | None = None
    outputs: dict = field(default_factory=dict)

    @property
    def cycles_per_s(self) -> float:
        """Simulated RTL cycles per wall second of the run."""
        return self.rtl_cycles / self.wall_s if self.wall_s > 0 else 0.0

    def report(self) -> dict:
        """Plain data, the `trimem cosim --json` output."""
        return {"entry": self.entry, "top": self.top, "bit_exact": self.bit_exact,
                "cycle_exact": self.cycle_exact, "rtl_cycles": self.rtl_cycles,
                "emulator_cycles": self.emulator_cycles, "wall_s": self.wall_s,
                "cycles_per_s": self.cycles_per_s,
                "divergence": None if self.divergence is None else self.divergence.to_dict()}


# ---------------------------------------------------------------------------------------------
# Building and opening tops
# ---------------------------------------------------------------------------------------------

_OPEN: dict = {}


def open_top(name: str, cfg, **kwargs) -> harness.Harness:
    """A fresh harness instance of top `name` for `cfg`, built once per process and cached on
    disk across processes."""
    key = runner.digest(name, cfg.config_hash(), kwargs)
    lib = _OPEN.get(key)
    if lib is None:
        lib = _OPEN[key] = harness.build(runner.design(name, cfg, **kwargs))
    return harness.Harness(lib)


@dataclass
class TopRun:
    """What the RTL did: the bytes read back, every stream's issue cycles (from the streams'
    cycle 0), and the wall time of the run."""
    got: dict
    issues: dict
    wall_s: float

    @property
    def cycles(self) -> int:
        """The run's length: the last HALT's issue cycle."""
        return max((cycles[-1] for cycles in self.issues.values() if cycles), default=0)


def run_top(h: harness.Harness, top: tops.Top, programs: dict, images: list, reads: list, *,
            max_cycles: int) -> TopRun:
    """Load `programs` (engine -> a `.hex` path or 32-byte words) and `images` ((space, addr,
    bytes) or (space, addr, .hex path, bytes per line, bytes)) into `top`, run it until every
    stream has halted, and read back `reads` ((name, space, addr, nbytes))."""
    h.reset(RESET_CYCLES)
    for engine, program in programs.items():
        top.load_program(h, engine, program)
    for space, addr, *data in images:
        if len(data) == 3:
            top.write_hex(h, space, addr, *data)
        else:
            top.write(h, space, addr, data[0])
    h.poke("run", 1)
    run = h.run("halted", watch=top.watch(), max_cycles=max_cycles)
    h.poke("run", 0)
    h.step(1)
    if not run.stopped:
        raise runner.SimError(f"the {top.name} top did not halt within {max_cycles} cycles")
    if h.peek("error"):
        raise runner.SimError(f"the {top.name} top stopped on `error`: a front end or engine "
                              f"met a word it cannot run")
    got = {name: top.read(h, space, addr, nbytes) for name, space, addr, nbytes in reads}
    issues = top.issues(run.events)
    return TopRun(got, {e.name: issues[e.name] for e in map(isa.stream_engine, programs)},
                  h.last_call_s)


# ---------------------------------------------------------------------------------------------
# Bundles
# ---------------------------------------------------------------------------------------------

def _hex_images(root: Path) -> dict:
    """Image name -> (hex path, bytes per line, bytes) from a bundle's manifest."""
    manifest = yaml.safe_load((root / "manifest.yaml").read_text())
    return {rec["name"]: (root / rec["hex"]["file"], rec["hex"]["width_bytes"], rec["bytes"])
            for rec in manifest.get("images", []) if rec.get("hex")}


def cosim(bundle, entry: str | None = None) -> CosimResult:
    """Run `entry` (default: the first) of the bundle directory `bundle` on the RTL and the
    emulator and compare outputs and cycles (see the module docstring)."""
    from trimem.emulator.runner import bundle_config, run_bundle

    root = Path(bundle)
    b = read_bundle(root)
    name = entry if entry is not None else next(iter(b.entries), None)
    if name is None:
        raise ValueError(f"bundle {str(root)!r} has no entries; recompile it")
    ent = b.entry(name)
    cfg = bundle_config(b)
    spaces = {img.space for img in b.images} | {t.space for t in ent.inputs + ent.outputs}
    kind = tops.choose(ent.programs, spaces)
    if kind is None:
        raise runner.SimError(
            f"entry {name!r} runs streams {sorted(ent.programs)} over spaces {sorted(spaces)}; "
            f"no HDL top holds them all (the largest, {tops.TOPS[-1].name}, runs "
            f"{', '.join(e.name for e in tops.TOPS[-1].frontends)} over "
            f"{', '.join(tops.TOPS[-1].spaces)})")
    top = kind(cfg)
    inputs = b.tests.get(name, {}).get("inputs", {})
    missing = [s.name for s in ent.inputs if s.name not in inputs]
    if missing:
        raise ValueError(f"entry {name!r} has no test inputs {missing!r}; compile the bundle "
                         f"with test vectors")
    emulated = run_bundle(b, name)
    streams = {e: emulated.machine.streams[isa.stream_engine(e)] for e in ent.programs}
    hexes = _hex_images(root)
    images = [(img.space, img.addr, *hexes[img.name]) if img.name in hexes
              else (img.space, img.addr, img.data) for img in b.images]
    images += [(s.space, s.addr, np.asarray(inputs[s.name]).astype(s.dtype).tobytes())
               for s in ent.inputs]
    programs = {e: root / "programs" / name / f"{e}.hex" for e in ent.programs}
    longest = max(int(st.ends[-1]) for st in streams.values())
    with open_top(top.name, cfg, **top.design_kwargs()) as h:
        top.attach(h)
        rtl = run_top(h, top, programs, images,
                      [(s.name, s.space, s.addr, s.nbytes) for s in ent.outputs],
                      max_cycles=CYCLE_MARGIN * longest + SLACK)
    words = {e.upper(): ent.programs[e] for e in ent.programs}
    got = {s.name: np.frombuffer(rtl.got[s.name], s.dtype).reshape(s.shape)
           for s in ent.outputs}
    timing = diff.diff_issues(rtl.issues, {e.upper(): [int(c) for c in st.starts]
                                           for e, st in streams.items()}, words)
    data = diff.diff_tensors(got, emulated.outputs, programs=words)
    return CosimResult(name, top.name, data is None, timing is None, rtl.cycles, longest,
                       rtl.wall_s, timing or data, got)
