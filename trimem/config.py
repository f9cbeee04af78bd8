"""Hardware configuration: the one description of the machine every part of Trimem reads.

A `HardwareConfig` holds frozen dataclasses of *primary* parameters only, one per engine
(`fpga`, `pim`, `csd`; None when the machine lacks it) plus the `host` GPU/CPU and the
`links` between them. Everything derived (bank counts, capacities, peak MAC/s, bandwidths,
ridge points) is a property, so no figure is ever stored twice. Construction validates every
value: types are strict (an int written as a float is an error), sizes are positive, and each
section's cross-checks reject configurations no hardware could have. Errors are `ConfigError`s
naming the source file, the key path (`pim.tRCD`) and the fix.

Configs are YAML files. The presets ship in `trimem/presets/NAME.yaml`; a file may start
from other presets with `inherits: NAME` (or a list, applied left to right) and override
keys by deep merge; a section set to `null` removes that engine. Units are fixed by the key:
MHz, bytes, GB/s (1e9 B/s), MB/s (1e6 B/s), us, cycles of the section's own clock, W, USD
and pJ. One MAC is two operations when bandwidths are compared with compute (Op/B).
"""
import dataclasses
import difflib
import functools
import hashlib
import json
import math
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import ClassVar, get_args, get_origin

import yaml

SECTIONS = ("fpga", "pim", "csd", "host", "links")
ENGINES = ("fpga", "pim", "csd")
TOP_KEYS = ("name", "description", "inherits") + SECTIONS
WEIGHT_BITS = (4, 8)
"""Weight widths the MXU and PIM datapaths implement (`docs/contract.md`, Weights)."""
PCIE_LANES = (1, 2, 4, 8, 16)
PCIE_GBPS_PER_LANE = {1: 0.25, 2: 0.5, 3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}
"""Usable GB/s per lane and direction: 2.5/5 GT/s with 8b/10b coding (PCIe 1.x/2.x),
8/16/32 GT/s with 128b/130b (3.0/4.0/5.0), 64 GT/s PAM4 with 242/256 FLITs (6.0)."""


class ConfigError(ValueError):
    """A hardware config that cannot be used; the message names the file, the key and the fix."""


def _fail(path: str, problem: str, fix: str) -> ConfigError:
    return ConfigError(f"{path}: {problem}; {fix}")


def _param(unit: str, *, zero_ok: bool = False):
    return field(metadata={"unit": unit, "zero_ok": zero_ok})


def _kind(value) -> str:
    return type(value).__name__


def _numeric_text(value) -> bool:
    try:
        return isinstance(value, str) and math.isfinite(float(value))
    except ValueError:
        return False


def _coerce(path: str, value, tp):
    """`value` checked against the annotation `tp`; ints become floats, lists become tuples."""
    if tp is bool:
        if type(value) is not bool:
            raise _fail(path, f"expected true or false, got {value!r} ({_kind(value)})",
                        "write true or false")
        return value
    if tp is int:
        if type(value) is int:
            return value
        if type(value) is float and value.is_integer():
            raise _fail(path, f"expected an integer, got {value!r} (float)",
                        f"write {int(value)} without a decimal point")
        raise _fail(path, f"expected an integer, got {value!r} ({_kind(value)})",
                    "write a whole number")
    if tp is float:
        if type(value) in (int, float):
            if not math.isfinite(value):
                raise _fail(path, f"expected a finite number, got {value!r}", "write a number")
            return float(value)
        hint = ("YAML reads an exponent without a decimal point as text: write e.g. 1.0e9"
                if _numeric_text(value) else "write a number")
        raise _fail(path, f"expected a number, got {value!r} ({_kind(value)})", hint)
    if tp is str:
        if not isinstance(value, str) or not value.strip():
            raise _fail(path, f"expected non-empty text, got {value!r}", "write a quoted string")
        return value
    if get_origin(tp) is tuple:
        args = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise _fail(path, f"expected a list, got {value!r} ({_kind(value)})",
                        "write a YAML list such as [1, 2]")
        if args[-1] is Ellipsis:
            return tuple(_coerce(f"{path}[{i}]", v, args[0]) for i, v in enumerate(value))
        if len(value) != len(args):
            raise _fail(path, f"expected a list of {len(args)} items, got {list(value)!r}",
                        f"give exactly {len(args)} items")
        return tuple(_coerce(f"{path}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    raise TypeError(f"{path}: unsupported annotation {tp!r}")


class _Section:
    """Shared validation: strict types, positive numbers, then the section's own `_check`."""
    section: ClassVar[str]

    def __post_init__(self):
        for f in fields(self):
            path = f"{self.section}.{f.name}"
            value = _coerce(path, getattr(self, f.name), f.type)
            object.__setattr__(self, f.name, value)
            zero_ok = f.metadata["zero_ok"]
            if f.type in (int, float) and not (value > 0 or (zero_ok and value == 0)):
                bound, word = (">= 0", "non-negative") if zero_ok else ("> 0", "positive")
                raise _fail(path, f"must be {bound}, got {value!r}",
                            f"give a {word} {f.metadata['unit']} value")
        self._check()

    def _check(self):
        """Cross-checks between keys; sections that have some override this."""

    def _need(self, ok: bool, key: str, problem: str, fix: str):
        if not ok:
            raise _fail(f"{self.section}.{key}", problem, fix)


@dataclass(frozen=True)
class FpgaConfig(_Section):
    """The FPGA matrix engine (sparse DSP chains fed from HBM) and its vector unit.

    Also stands for an NPU (NeuPIMs) or a controller ASIC (PIM-GPT): a chain is a column of
    `chain_length` MAC units that reduces one dot product per cycle.
    """
    section: ClassVar[str] = "fpga"
    clock_mhz: float = _param("MHz")
    dsp_chains: int = _param("count")
    chain_length: int = _param("MACs")
    nm_patterns: tuple[tuple[int, int], ...] = _param("[n, m] list")
    weight_bits: tuple[int, ...] = _param("bits list")
    sram_bytes: int = _param("bytes")
    hbm_channels: int = _param("count")
    hbm_channel_bytes: int = _param("bytes")
    hbm_gbps_per_channel: float = _param("GB/s")
    hbm_latency_cycles: int = _param("cycles", zero_ok=True)
    hbm_interleave_bytes: int = _param("bytes")
    vpu_lanes: int = _param("lanes")
    on_chip_decode: bool = _param("bool")
    dsp_total: int = _param("count")
    power_w: float = _param("W")
    price_usd: float = _param("USD")
    energy_pj_per_mac: float = _param("pJ", zero_ok=True)
    energy_pj_per_hbm_byte: float = _param("pJ/B", zero_ok=True)
    energy_pj_per_sram_byte: float = _param("pJ/B", zero_ok=True)

    def _check(self):
        pats = self.nm_patterns
        self._need(len(pats) > 0 and pats[0] == (1, 1), "nm_patterns",
                   f"must start with the dense pattern [1, 1] (index 0 means dense in MXU.GEMM), "
                   f"got {[list(p) for p in pats]!r}", "put [1, 1] first")
        for i, (n, m) in enumerate(pats):
            self._need(1 <= n <= m, f"nm_patterns[{i}]",
                       f"[{n}, {m}] is not an N:M pattern (need 1 <= n <= m: keep n of every m)",
                       "write it as [kept, block], e.g. [2, 4]")
        self._need(len(set(pats)) == len(pats), "nm_patterns",
                   f"lists a pattern twice: {[list(p) for p in pats]!r}", "list each once")
        bits = self.weight_bits
        self._need(len(bits) > 0 and set(bits) <= set(WEIGHT_BITS) and len(set(bits)) == len(bits),
                   "weight_bits", f"got {list(bits)!r}",
                   f"list each supported width once, from {list(WEIGHT_BITS)}")
        self._need(self.macs_per_cycle <= self.dsp_total, "dsp_chains",
                   f"{self.dsp_chains} chains x chain_length {self.chain_length} = "
                   f"{self.macs_per_cycle} DSPs exceeds dsp_total = {self.dsp_total}",
                   "use fewer or shorter chains, or a larger device")
        for key in ("sram_bytes", "hbm_interleave_bytes"):
            self._need(getattr(self, key) % self.chain_length == 0, key,
                       f"{getattr(self, key)} is not a multiple of chain_length = "
                       f"{self.chain_length} (the MXU tiles K in whole chains)",
                       "round it to a multiple of chain_length")
        self._need(self.hbm_channel_bytes % self.hbm_interleave_bytes == 0, "hbm_interleave_bytes",
                   f"{self.hbm_interleave_bytes} does not divide hbm_channel_bytes = "
                   f"{self.hbm_channel_bytes}", "pick an interleave that divides a channel")

    @property
    def clock_hz(self) -> float:
        return self.clock_mhz * 1e6

    @property
    def macs_per_cycle(self) -> int:
        return self.dsp_chains * self.chain_length

    @property
    def peak_macs_per_s(self) -> float:
        """Dense peak; `effective_macs_per_s` gives the rate an N:M pattern appears to reach."""
        return self.macs_per_cycle * self.clock_hz

    def effective_macs_per_s(self, nm: int) -> float:
        """Dense-equivalent MAC/s with pattern `nm_patterns[nm]`: n of every m weights are
        stored and multiplied, so each hardware MAC stands for m/n dense ones."""
        count = len(self.nm_patterns)
        if not 0 <= nm < count:
            raise ValueError(f"N:M index {nm!r} out of range; fpga.nm_patterns has {count} "
                             f"patterns, use 0..{count - 1}")
        n, m = self.nm_patterns[nm]
        return self.peak_macs_per_s * m / n

    @property
    def hbm_bytes(self) -> int:
        return self.hbm_channels * self.hbm_channel_bytes

    @property
    def hbm_gbps(self) -> float:
        return self.hbm_channels * self.hbm_gbps_per_channel

    @property
    def hbm_bytes_per_cycle(self) -> float:
        return self.hbm_gbps * 1e9 / self.clock_hz

    @property
    def ridge_op_per_byte(self) -> float:
        """Dense Op/B above which the MXU, not HBM, bounds a GEMM (2 Op per MAC)."""
        return 2 * self.peak_macs_per_s / (self.hbm_gbps * 1e9)


@dataclass(frozen=True)
class PimConfig(_Section):
    """DRAM banks with MAC lanes beside the row buffer; timings in cycles of `clock_mhz`."""
    section: ClassVar[str] = "pim"
    clock_mhz: float = _param("MHz")
    channels: int = _param("count")
    bank_groups: int = _param("count")
    banks_per_group: int = _param("count")
    rows: int = _param("count")
    row_bytes: int = _param("bytes")
    burst_bytes: int = _param("bytes")
    mac_lanes: int = _param("MACs")
    gbuf_bytes: int = _param("bytes")
    result_bytes: int = _param("bytes")
    dual_row_buffer: bool = _param("bool")
    shared_with_hbm: bool = _param("bool")
    channel_gbps: float = _param("GB/s")
    tRCD: int = _param("cycles")
    tRP: int = _param("cycles")
    tRAS: int = _param("cycles")
    tCCD_S: int = _param("cycles")
    tCCD_L: int = _param("cycles")
    tRRD_S: int = _param("cycles")
    tRRD_L: int = _param("cycles")
    tFAW: int = _param("cycles")
    tWR: int = _param("cycles")
    tRTP: int = _param("cycles")
    tRFC: int = _param("cycles")
    tREFI: int = _param("cycles")
    power_w: float = _param("W")
    price_usd: float = _param("USD")
    energy_pj_per_act: float = _param("pJ", zero_ok=True)
    energy_pj_per_mac: float = _param("pJ", zero_ok=True)
    energy_pj_per_byte: float = _param("pJ/B", zero_ok=True)

    def _check(self):
        for big, small, why in (
                ("tRAS", "tRCD", "a row stays open at least until it can be read"),
                ("tRRD_L", "tRRD_S", "activates in one bank group are spaced no closer than "
                                     "across groups"),
                ("tCCD_L", "tCCD_S", "column commands in one bank group are spaced no closer "
                                     "than across groups"),
                ("tFAW", "tRRD_S", "the four-activate window spans at least one activate gap")):
            self._need(getattr(self, big) >= getattr(self, small), big,
                       f"{getattr(self, big)} is less than pim.{small} = {getattr(self, small)} "
                       f"({why})", f"set {big} >= {small}")
        self._need(self.tREFI > self.tRFC, "tREFI",
                   f"{self.tREFI} is not more than pim.tRFC = {self.tRFC} (the bank would "
                   f"never leave refresh)", "set tREFI > tRFC")
        self._need(self.row_bytes % self.burst_bytes == 0, "burst_bytes",
                   f"{self.burst_bytes} does not divide pim.row_bytes = {self.row_bytes}",
                   "a row must hold a whole number of column bursts")
        self._need(self.mac_lanes <= self.burst_bytes, "mac_lanes",
                   f"{self.mac_lanes} int8 lanes exceed the {self.burst_bytes} bytes one column "
                   f"access delivers", "set mac_lanes <= burst_bytes")
        self._need(self.gbuf_bytes % self.burst_bytes == 0, "gbuf_bytes",
                   f"{self.gbuf_bytes} is not a multiple of pim.burst_bytes = {self.burst_bytes} "
                   f"(the global buffer is written one burst at a time)",
                   "round it to a multiple of burst_bytes")

    @property
    def clock_hz(self) -> float:
        return self.clock_mhz * 1e6

    @property
    def banks_per_channel(self) -> int:
        return self.bank_groups * self.banks_per_group

    @property
    def total_banks(self) -> int:
        return self.channels * self.banks_per_channel

    @property
    def bank_bytes(self) -> int:
        return self.rows * self.row_bytes

    @property
    def channel_bytes(self) -> int:
        return self.banks_per_channel * self.bank_bytes

    @property
    def capacity_bytes(self) -> int:
        return self.channels * self.channel_bytes

    @property
    def gbuf_total_bytes(self) -> int:
        return self.channels * self.gbuf_bytes

    @property
    def result_total_bytes(self) -> int:
        return self.channels * self.result_bytes

    @property
    def peak_macs_per_s(self) -> float:
        """All banks in lockstep, one column access per bank per PIM clock (AiM-style MAC_ABK)."""
        return self.total_banks * self.mac_lanes * self.clock_hz

    @property
    def internal_bytes_per_cycle(self) -> int:
        return self.total_banks * self.burst_bytes

    @property
    def internal_gbps(self) -> float:
        """Bytes all row buffers deliver to their MAC lanes; compare `external_gbps`."""
        return self.internal_bytes_per_cycle * self.clock_hz / 1e9

    @property
    def external_gbps(self) -> float:
        return self.channels * self.channel_gbps

    @property
    def ridge_op_per_byte(self) -> float:
        """Op/B of the in-bank MACs against the row-buffer bandwidth (below 1 for in-die PIM)."""
        return 2 * self.peak_macs_per_s / (self.internal_gbps * 1e9)

    @property
    def refresh_fraction(self) -> float:
        """Share of time a bank is blocked by refresh."""
        return self.tRFC / self.tREFI


CSD_ENGINES = ("sequential", "streaming")
"""Organisations of the CSD attention engine (`csd.engine`, docs/timing.md, "CSD"): the RTL's
schedule with one page in flight and one job per (query row, kv head), or InstInfer's
pipelined engine streaming every page once, for all rows, over all channels and dies."""


@dataclass(frozen=True)
class CsdConfig(_Section):
    """A computational storage drive: NAND flash, on-drive DRAM and an attention engine."""
    section: ClassVar[str] = "csd"
    clock_mhz: float = _param("MHz")
    channels: int = _param("count")
    dies: int = _param("count")
    planes: int = _param("count")
    blocks: int = _param("count")
    pages_per_block: int = _param("count")
    page_bytes: int = _param("bytes")
    tR_us: float = _param("us")
    tPROG_us: float = _param("us")
    channel_mbps: float = _param("MB/s")
    engine_lanes: int = _param("MACs")
    engine: str = _param("text")
    dram_bytes: int = _param("bytes")
    pcie_gen: int = _param("generation")
    pcie_lanes: int = _param("lanes")
    power_w: float = _param("W")
    price_usd: float = _param("USD")
    energy_pj_per_page_read: float = _param("pJ", zero_ok=True)
    energy_pj_per_page_program: float = _param("pJ", zero_ok=True)
    energy_pj_per_mac: float = _param("pJ", zero_ok=True)

    def _check(self):
        self._need(self.engine in CSD_ENGINES, "engine", f"unknown engine {self.engine!r}",
                   f"use one of {', '.join(CSD_ENGINES)}")
        self._need(self.page_bytes & (self.page_bytes - 1) == 0, "page_bytes",
                   f"{self.page_bytes} is not a power of two", "use e.g. 4096 or 16384")
        self._need(self.tPROG_us >= self.tR_us, "tPROG_us",
                   f"{self.tPROG_us} is less than csd.tR_us = {self.tR_us} (NAND programs "
                   f"slower than it reads)", "set tPROG_us >= tR_us")
        self._need(self.pcie_gen in PCIE_GBPS_PER_LANE, "pcie_gen",
                   f"unknown PCIe generation {self.pcie_gen!r}",
                   f"use one of {sorted(PCIE_GBPS_PER_LANE)}")
        self._need(self.pcie_lanes in PCIE_LANES, "pcie_lanes",
                   f"{self.pcie_lanes} is not a PCIe link width", f"use one of {list(PCIE_LANES)}")
        self._need(self.dram_bytes % self.page_bytes == 0, "dram_bytes",
                   f"{self.dram_bytes} is not a multiple of csd.page_bytes = {self.page_bytes} "
                   f"(the DRAM stages whole pages)", "round it to a multiple of page_bytes")

    @property
    def clock_hz(self) -> float:
        return self.clock_mhz * 1e6

    @property
    def pages(self) -> int:
        return self.channels * self.dies * self.planes * self.blocks * self.pages_per_block

    @property
    def capacity_bytes(self) -> int:
        return self.pages * self.page_bytes

    @property
    def internal_gbps(self) -> float:
        """Flash-bus bandwidth into the engine, all channels busy."""
        return self.channels * self.channel_mbps / 1e3

    @property
    def array_gbps(self) -> float:
        """Page-read rate of the NAND arrays with every plane reading; above `internal_gbps`
        when the channel buses, not the cells, are the bottleneck."""
        planes = self.channels * self.dies * self.planes
        return planes * self.page_bytes / (self.tR_us * 1e3)

    @property
    def pcie_gbps(self) -> float:
        return PCIE_GBPS_PER_LANE[self.pcie_gen] * self.pcie_lanes

    @property
    def peak_macs_per_s(self) -> float:
        return self.engine_lanes * self.clock_hz

    @property
    def ridge_op_per_byte(self) -> float:
        """Op/B of the attention engine against the internal flash bandwidth."""
        return 2 * self.peak_macs_per_s / (self.internal_gbps * 1e9)


@dataclass(frozen=True)
class HostConfig(_Section):
    """The host GPU or CPU, modelled as a roofline."""
    section: ClassVar[str] = "host"
    name: str = _param("text")
    peak_tflops: float = _param("TFLOP/s")
    mem_gbps: float = _param("GB/s")
    mem_bytes: int = _param("bytes")
    kernel_launch_us: float = _param("us", zero_ok=True)
    power_w: float = _param("W")
    price_usd: float = _param("USD")

    @property
    def peak_flops(self) -> float:
        return self.peak_tflops * 1e12

    @property
    def ridge_op_per_byte(self) -> float:
        return self.peak_flops / (self.mem_gbps * 1e9)


@dataclass(frozen=True)
class LinksConfig(_Section):
    """Host to accelerator PCIe, and the peer-to-peer path between GPU and devices."""
    section: ClassVar[str] = "links"
    pcie_gbps: float = _param("GB/s")
    pcie_latency_us: float = _param("us", zero_ok=True)
    p2p_gbps: float = _param("GB/s")
    p2p_latency_us: float = _param("us", zero_ok=True)


SECTION_TYPES = {"fpga": FpgaConfig, "pim": PimConfig, "csd": CsdConfig, "host": HostConfig,
                 "links": LinksConfig}


@dataclass(frozen=True, kw_only=True)
class HardwareConfig:
    """A whole machine: the engines it has, its host and links."""
    name: str
    description: str
    fpga: FpgaConfig | None = None
    pim: PimConfig | None = None
    csd: CsdConfig | None = None
    host: HostConfig
    links: LinksConfig

    def __post_init__(self):
        for key in ("name", "description"):
            _coerce(key, getattr(self, key), str)
        for key, cls in SECTION_TYPES.items():
            value = getattr(self, key)
            if not isinstance(value, cls) and not (value is None and key in ENGINES):
                raise TypeError(f"{key}: expected {cls.__name__}, got {value!r}")
        if not self.engines:
            raise _fail("fpga|pim|csd", "the config has no engine section",
                        "give at least one of fpga, pim, csd")
        pim = self.pim
        if pim is not None and pim.shared_with_hbm:
            fpga = self.fpga
            if fpga is None or (fpga.hbm_channels, fpga.hbm_channel_bytes) != \
                    (pim.channels, pim.channel_bytes):
                have = "no fpga section" if fpga is None else \
                    f"fpga has {fpga.hbm_channels} x {fpga.hbm_channel_bytes} B"
                raise _fail("pim.shared_with_hbm", f"PIM channels are {pim.channels} x "
                            f"{pim.channel_bytes} B but {have}",
                            "make fpga.hbm_channels / hbm_channel_bytes match the PIM channels, "
                            "or set shared_with_hbm: false")

    @property
    def engines(self) -> tuple[str, ...]:
        return tuple(e for e in ENGINES if getattr(self, e) is not None)

    def space_bytes(self, space) -> int | None:
        """Bytes of memory space `space` (an `isa.Space` or its name) on this machine
        (docs/contract.md, "Memory spaces"); None for HOST, which is unbounded."""
        fpga, pim, csd = self.fpga, self.pim, self.csd
        return {
            "HOST": lambda: None,
            "HBM": lambda: fpga.hbm_bytes,
            "SRAM": lambda: fpga.sram_bytes,
            "GBUF": lambda: pim.gbuf_total_bytes,
            "PRES": lambda: pim.result_total_bytes,
            "CDRAM": lambda: csd.dram_bytes,
            "PIMDRAM": lambda: pim.capacity_bytes,
            "FLASH": lambda: csd.capacity_bytes,
        }[getattr(space, "name", space)]()

    def to_dict(self) -> dict:
        """Plain dict of the resolved config (lists, not tuples); `load_config_dict` reads it."""
        return _plain(dataclasses.asdict(self))

    def config_hash(self) -> str:
        """sha256 of the canonical JSON of `to_dict()`: equal configs, equal hashes."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# ---- loading -----------------------------------------------------------------------------------

class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice instead of silently keeping the last."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} is given "
                                  f"twice; keep one")
            seen.add(key)
        return super().construct_mapping(node, deep)


def _read_yaml(text: str, source: str) -> dict:
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top, got "
                          f"{_kind(data)}; start from a preset (`trimem hw show NAME`)")
    return data


def _unknown(path: str, key, valid) -> ConfigError:
    """The error for an unknown key, suggesting a valid key with the same letters (a swap) or
    else the closest one by difflib, ignoring case."""
    by_lower = {v.lower(): v for v in valid}
    typed = str(key).lower()
    close = [v for v in by_lower if sorted(v) == sorted(typed)] or \
        difflib.get_close_matches(typed, list(by_lower), n=1, cutoff=0.6)
    fix = f"did you mean {by_lower[close[0]]!r}?" if close else \
        f"valid keys are {', '.join(valid)}"
    return _fail(f"{path}{key}", "unknown key", fix)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _resolve(data: dict, source: str, base_dir: Path | None, chain: tuple) -> dict:
    """`data` with its `inherits` chain merged in, parents first."""
    parents = data.get("inherits", [])
    parents = [parents] if isinstance(parents, str) else parents
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise ConfigError(f"{source}: inherits: expected a preset name or a list of them, got "
                          f"{parents!r}; write e.g. `inherits: trimem-all`")
    if parents and "name" not in data:
        raise ConfigError(f"{source}: name: missing key; a config that inherits must give its "
                          f"own name, or two machines would share one")
    merged: dict = {}
    for parent in parents:
        path = base_dir / parent if base_dir is not None and parent.endswith(".yaml") else None
        key = str(path.resolve()) if path else parent
        if key in chain:
            raise ConfigError(f"{source}: inherits: cycle {' -> '.join(chain + (key,))}; "
                              f"remove one of these inherits")
        if path is not None:
            text, parent_source, parent_dir = _read_file(path), str(path), path.parent
        else:
            text, parent_source, parent_dir = _preset_text(parent), f"preset {parent}", None
        parent_data = _resolve(_read_yaml(text, parent_source), parent_source, parent_dir,
                               chain + (key,))
        merged = _merge(merged, parent_data)
    own = {k: v for k, v in data.items() if k != "inherits"}
    return _merge(merged, own)


def _build(data: dict) -> HardwareConfig:
    for key in data:
        if key not in TOP_KEYS:
            raise _unknown("", key, TOP_KEYS)
    for key in ("name", "description", "host", "links"):
        if data.get(key) is None:
            what = "section" if key in SECTIONS else "key"
            raise _fail(key, f"missing {what}", f"add `{key}:` (see docs/config.md)")
    sections = {}
    for key, cls in SECTION_TYPES.items():
        body = data.get(key)
        if body is None:
            continue
        if not isinstance(body, dict):
            raise _fail(key, f"expected a mapping of keys, got {body!r}",
                        f"write `{key}:` followed by indented `key: value` lines")
        names = [f.name for f in fields(cls)]
        for k in body:
            if k not in names:
                raise _unknown(f"{key}.", k, names)
        missing = [n for n in names if n not in body]
        if missing:
            raise _fail(key, f"missing {', '.join(map(repr, missing))}",
                        "add every key of the section (see docs/config.md)")
        sections[key] = cls(**body)
    return HardwareConfig(name=data["name"], description=data["description"], **sections)


def load_config_dict(d: dict, source: str = "<dict>") -> HardwareConfig:
    """Validate a config given as a dict (as `to_dict()` or a YAML file gives it)."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a dict, got {_kind(d)}")
    return _load(d, source, None, ())


def _load(data: dict, source: str, base_dir: Path | None, chain: tuple) -> HardwareConfig:
    resolved = _resolve(data, source, base_dir, chain)
    try:
        return _build(resolved)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _read_file(path: Path) -> str:
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; give a YAML file or one of the presets: "
                          f"{', '.join(list_presets())}")
    return path.read_text()


def _presets_dir():
    return resources.files("trimem").joinpath("presets")


def list_presets() -> list[str]:
    """Names of the presets shipped in `trimem/presets/`."""
    return sorted(p.name[:-5] for p in _presets_dir().iterdir() if p.name.endswith(".yaml"))


def _preset_text(name: str) -> str:
    if name not in list_presets():
        close = difflib.get_close_matches(name, list_presets(), n=1)
        hint = f"did you mean {close[0]!r}? (or give a path to a .yaml file)" if close else \
            f"use one of {', '.join(list_presets())}, or a path to a .yaml file"
        raise ConfigError(f"unknown hardware preset {name!r}; {hint}")
    return _presets_dir().joinpath(f"{name}.yaml").read_text()


@functools.lru_cache(maxsize=None)
def _load_preset(name: str) -> HardwareConfig:
    source = f"preset {name}"
    cfg = _load(_read_yaml(_preset_text(name), source), source, None, (name,))
    if cfg.name != name:
        raise ConfigError(f"{source}: name: {cfg.name!r} differs from the file name; "
                          f"set `name: {name}`")
    return cfg


def load_config(name_or_path) -> HardwareConfig:
    """The config of a preset name, a YAML file path, or an already loaded `HardwareConfig`."""
    if isinstance(name_or_path, HardwareConfig):
        return name_or_path
    text = str(name_or_path)
    path = Path(text)
    if text not in list_presets() and (path.suffix in (".yaml", ".yml") or path.exists()):
        return _load(_read_yaml(_read_file(path), text), text, path.parent,
                     (str(path.resolve()),))
    return _load_preset(text)
