"""`trimem hw`: list the hardware presets, show one resolved with its derived figures, check a file.

Each command takes the parsed arguments, prints, and returns the exit code. A preset or file
that cannot be loaded raises `ConfigError` out of `hw show` for the CLI to report in one line;
`hw check` reports it itself, since finding the problem is its job.
"""
import argparse
import json
import sys
from dataclasses import fields

from trimem.config import SECTIONS, ConfigError, HardwareConfig, list_presets, load_config

BINARY_PREFIXES = ("", "Ki", "Mi", "Gi", "Ti", "Pi")
DECIMAL_PREFIXES = ("", "k", "M", "G", "T", "P")


def derived_figures(cfg: HardwareConfig) -> list[tuple[str, str, str, float, str]]:
    """(section, key, label, value, unit) rows: peak rates, bandwidths and ridge points."""
    rows = []
    if (f := cfg.fpga) is not None:
        rows += [("fpga", "macs_per_cycle", "MACs per cycle", f.macs_per_cycle, "MAC"),
                 ("fpga", "peak_macs_per_s", "peak MAC/s, dense", f.peak_macs_per_s, "MAC/s")]
        rows += [("fpga", f"effective_macs_per_s[{i}]", f"dense-equivalent MAC/s at {n}:{m}",
                  f.effective_macs_per_s(i), "MAC/s")
                 for i, (n, m) in enumerate(f.nm_patterns) if i]
        rows += [("fpga", "hbm_bytes", "HBM capacity", f.hbm_bytes, "B"),
                 ("fpga", "hbm_gbps", "HBM bandwidth", f.hbm_gbps * 1e9, "B/s"),
                 ("fpga", "hbm_bytes_per_cycle", "HBM bytes per cycle", f.hbm_bytes_per_cycle,
                  "B/cycle"),
                 ("fpga", "ridge_op_per_byte", "ridge point vs HBM", f.ridge_op_per_byte,
                  "Op/B")]
    if (p := cfg.pim) is not None:
        rows += [("pim", "total_banks", "banks", p.total_banks, "banks"),
                 ("pim", "capacity_bytes", "DRAM capacity", p.capacity_bytes, "B"),
                 ("pim", "peak_macs_per_s", "peak MAC/s, all banks", p.peak_macs_per_s, "MAC/s"),
                 ("pim", "internal_gbps", "internal (row buffer) bandwidth",
                  p.internal_gbps * 1e9, "B/s"),
                 ("pim", "external_gbps", "external (channel bus) bandwidth",
                  p.external_gbps * 1e9, "B/s"),
                 ("pim", "internal_bytes_per_cycle", "internal bytes per cycle",
                  p.internal_bytes_per_cycle, "B/cycle"),
                 ("pim", "ridge_op_per_byte", "ridge point vs row buffers", p.ridge_op_per_byte,
                  "Op/B"),
                 ("pim", "refresh_fraction", "time lost to refresh", p.refresh_fraction * 100,
                  "%")]
    if (c := cfg.csd) is not None:
        rows += [("csd", "capacity_bytes", "flash capacity", c.capacity_bytes, "B"),
                 ("csd", "peak_macs_per_s", "engine peak MAC/s", c.peak_macs_per_s, "MAC/s"),
                 ("csd", "internal_gbps", "internal flash bandwidth", c.internal_gbps * 1e9,
                  "B/s"),
                 ("csd", "array_gbps", "NAND array read rate", c.array_gbps * 1e9, "B/s"),
                 ("csd", "pcie_gbps", "PCIe bandwidth", c.pcie_gbps * 1e9, "B/s"),
                 ("csd", "ridge_op_per_byte", "ridge point vs flash", c.ridge_op_per_byte,
                  "Op/B")]
    h = cfg.host
    rows += [("host", "peak_flops", "peak FLOP/s", h.peak_flops, "FLOP/s"),
             ("host", "mem_gbps", "memory bandwidth", h.mem_gbps * 1e9, "B/s"),
             ("host", "ridge_op_per_byte", "ridge point vs memory", h.ridge_op_per_byte, "Op/B")]
    return rows


def _scaled(value: float, base: int, prefixes) -> tuple[float, str]:
    i = 0
    while abs(value) >= base and i < len(prefixes) - 1:
        value /= base
        i += 1
    return value, prefixes[i]


def human(value: float, unit: str) -> str:
    """`value` with an SI prefix (binary for byte sizes), three significant digits; other
    units get thousands separators instead."""
    if unit == "B":
        scaled, prefix = _scaled(value, 1024, BINARY_PREFIXES)
    elif unit.endswith("/s"):
        scaled, prefix = _scaled(value, 1000, DECIMAL_PREFIXES)
    elif isinstance(value, int) or abs(value) >= 100:
        return f"{value:,.0f} {unit}"
    else:
        scaled, prefix = value, ""
    return f"{scaled:.3g} {prefix}{unit}"


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _value(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, tuple):
        return json.dumps(v)
    return str(v)


def show_text(cfg: HardwareConfig) -> str:
    """The resolved config section by section, then the derived figures, as aligned tables."""
    out = [f"{cfg.name}: {cfg.description}", f"engines: {', '.join(cfg.engines)}",
           f"sha256: {cfg.config_hash()}"]
    for key in SECTIONS:
        section = getattr(cfg, key)
        if section is None:
            continue
        rows = []
        for f in fields(section):
            v = getattr(section, f.name)
            unit = f.metadata["unit"]
            extra = f" ({human(v, 'B')})" if unit == "bytes" and v >= 1024 else ""
            rows.append((f"  {f.name}", _value(v), unit + extra))
        out += ["", f"{key}:", _table(rows)]
    derived = [(f"  {s}", label, human(v, unit)) for s, _, label, v, unit in derived_figures(cfg)]
    out += ["", "derived:", _table(derived)]
    return "\n".join(out)


def show_json(cfg: HardwareConfig) -> dict:
    derived: dict = {}
    for section, key, _, value, _ in derived_figures(cfg):
        derived.setdefault(section, {})[key] = value
    return {"config": cfg.to_dict(), "sha256": cfg.config_hash(), "derived": derived}


def hw_list(args) -> int:
    rows = [("name", "engines", "description")]
    for name in list_presets():
        cfg = load_config(name)
        rows.append((name, "+".join(cfg.engines), cfg.description))
    print(_table(rows))
    return 0


def hw_show(args) -> int:
    cfg = load_config(args.name)
    print(json.dumps(show_json(cfg), indent=2) if args.json else show_text(cfg))
    return 0


def hw_check(args) -> int:
    try:
        cfg = load_config(args.file)
    except ConfigError as exc:
        print(f"invalid: {exc}", file=sys.stderr)
        return 1
    print(f"ok: {args.file} is {cfg.name!r} with {', '.join(cfg.engines)} "
          f"(sha256 {cfg.config_hash()[:16]})")
    return 0


def add_hw_parser(subparsers) -> argparse.ArgumentParser:
    """Register `hw list`, `hw show NAME [--json]` and `hw check FILE`."""
    hw = subparsers.add_parser("hw", help="list, show and check hardware configs")
    sub = hw.add_subparsers(dest="hw_command", metavar="ACTION", required=True)
    p = sub.add_parser("list", help="list the shipped presets")
    p.set_defaults(func=hw_list)
    p = sub.add_parser("show", help="print a resolved config with its derived figures")
    p.add_argument("name", help="preset name or path to a .yaml config")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=hw_show)
    p = sub.add_parser("check", help="validate a config file; exit 1 with the problem if bad")
    p.add_argument("file", help="path to a .yaml config (or a preset name)")
    p.set_defaults(func=hw_check)
    return hw
