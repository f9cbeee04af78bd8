"""The batched harness from Python: a top built with `harness.cpp` into a shared library,
driven through ctypes a whole load, run or replay per call (never a Python call per cycle).

`build(design)` Verilates the top with the front ends' program counters and halt flags made
readable (the probes that give every instruction's issue cycle) and every memory of the
design writable (instruction memories and memory arrays, loaded behind their ports),
generates the `ports.h` that binds them by index, and compiles the library (cached,
`trimem.sims.runner`).
`Harness(path)` opens one instance of the model.
"""
from __future__ import annotations

import ctypes
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trimem.sims import runner

SOURCE = Path(__file__).with_name("harness.cpp")
GLUE_VERSION = "3"
"""Revision of `glue`'s output, part of the build's cache key."""
_PORT = re.compile(r"VL_(IN|OUT)\w*\(&(\w+),(\d+),(\d+)")
_PROBE = re.compile(r"^\s*(?:[CSIQ]Data|VlWide<\d+>)/\*(\d+):(\d+)\*/ "
                    r"(\w+__DOT__\w+__DOT__(?:pc|halted));", re.M)
_MEMORY = re.compile(r"^\s*VlUnpacked<(?:[CSIQ]Data|VlWide<\d+>)/\*(\d+):(\d+)\*/, \d+> (\w+);",
                     re.M)
_MODULE = re.compile(r"^module \\?(\S+)", re.M)
_ARRAY = re.compile(r"^\s*reg \[\d+:0\] \\?(\S+) \[\d+:0\];", re.M)
_ESCAPE = re.compile(r"__0([0-9A-F]{2})")
U32P = ctypes.POINTER(ctypes.c_uint32)
U64P = ctypes.POINTER(ctypes.c_uint64)
U8P = ctypes.POINTER(ctypes.c_uint8)
IP = ctypes.POINTER(ctypes.c_int)


def demangle(name: str) -> str:
    """A Verilated C++ name back to the Verilog one (`__0XX` escapes a character)."""
    return _ESCAPE.sub(lambda m: chr(int(m[1], 16)), name)


def control(verilog: str) -> str:
    """The Verilator control file of a harness build: every `pc` and `halted` readable (the
    front ends' are the probes), every memory array of every module writable."""
    lines = ["`verilator_config", 'public_flat_rd -module "*" -var "pc"',
             'public_flat_rd -module "*" -var "halted"']
    modules = _MODULE.split(verilog)[1:]
    for name, body in zip(modules[::2], modules[1::2]):
        lines += [f'public_flat_rw -module "{name}" -var "{var}"' for var in _ARRAY.findall(body)]
    return "\n".join(lines) + "\n"


def _path(cname: str) -> str:
    return ".".join(demangle(part) for part in cname.split("__DOT__")[1:])


def glue(folder: Path) -> None:
    """Write `ports.h` into a Verilated `folder`: every top-level port by its Verilog name,
    then every `pc` and `halted` below the top as a read-only probe, and every memory, each
    named by its path below the top ("frontend.pc", "channel0.bank0.array")."""
    entries = []
    for direction, cname, msb, lsb in _PORT.findall((folder / "Vtop.h").read_text()):
        width = int(msb) - int(lsb) + 1
        entries.append((demangle(cname), f"&top->{cname}", width, direction == "IN"))
    root = (folder / "Vtop___024root.h").read_text()
    for msb, lsb, cname in _PROBE.findall(root):
        entries.append((_path(cname), f"&top->rootp->{cname}", int(msb) - int(lsb) + 1, False))
    mems = [(_path(cname), f"&top->rootp->{cname}", int(msb) - int(lsb) + 1)
            for msb, lsb, cname in _MEMORY.findall(root)]
    lines = ["// AUTO-GENERATED — DO NOT EDIT. Source: trimem/sims/harness.py (glue), from the",
             "// Verilated headers. Regenerate: rebuild the harness (trimem.sims.harness.build).",
             f"#define TM_PORT_COUNT {len(entries)}",
             f"#define TM_MEM_COUNT {len(mems)}",
             "static const char* const TM_PORT_NAMES[] = {",
             *[f'    "{name}",' for name, *_ in entries], "};",
             "static const char* const TM_MEM_NAMES[] = {",
             *[f'    "{name}",' for name, *_ in mems], '    ""};',
             "static void tm_bind(Vtop* top, Port* p, Mem* m) {",
             *[f"    p[{i}] = port({ref}, {width}, {str(inp).lower()});"
               for i, (_, ref, width, inp) in enumerate(entries)],
             *[f"    m[{i}] = mem({ref}, {width});" for i, (_, ref, width) in enumerate(mems)],
             "}", ""]
    (folder / "ports.h").write_text("\n".join(lines))


def build(design: runner.Design) -> Path:
    """The harness library of `design` (built once, cached)."""
    return runner.build_library(design, [SOURCE], control=control(design.verilog.read_text()),
                                glue=glue, version=GLUE_VERSION)


def words(value: int, width: int) -> np.ndarray:
    """`value` as the little-endian 32-bit words of a `width`-bit port."""
    count = (width + 31) // 32
    return np.array([(value >> (32 * i)) & 0xFFFFFFFF for i in range(count)], np.uint32)


def value(w) -> int:
    """The int of little-endian 32-bit words."""
    return sum(int(x) << (32 * i) for i, x in enumerate(w))


@dataclass
class Run:
    """A run to a stop condition: cycles run, whether it stopped, and the logged changes of
    the watched signals as (cycle, watched name, value)."""
    cycles: int
    stopped: bool
    events: list


class Harness:
    """One instance of a harness library's model.

    Parameters
    ----------
    path : path of the shared library (`build`).
    """

    _libraries: dict = {}

    def __init__(self, path):
        self.lib = self._load(str(path))
        self.handle = ctypes.c_void_p(self.lib.tm_open())
        count = self.lib.tm_port_count()
        self.names = [self.lib.tm_port_name(i).decode() for i in range(count)]
        self.index = {name: i for i, name in enumerate(self.names)}
        self.widths = [self.lib.tm_port_width(self.handle, i) for i in range(count)]
        self.memories = {self.lib.tm_mem_name(i).decode(): i
                         for i in range(self.lib.tm_mem_count())}
        self.last_call_s = 0.0
        """Wall seconds of the last `run` or `replay` inside the library (no Python work)."""

    @classmethod
    def _load(cls, path: str):
        lib = cls._libraries.get(path)
        if lib is not None:
            return lib
        lib = ctypes.CDLL(path)
        c = ctypes
        signatures = {
            "tm_port_count": ([], c.c_int), "tm_port_name": ([c.c_int], c.c_char_p),
            "tm_open": ([], c.c_void_p), "tm_close": ([c.c_void_p], None),
            "tm_port_width": ([c.c_void_p, c.c_int], c.c_int),
            "tm_cycle": ([c.c_void_p], c.c_uint64),
            "tm_poke": ([c.c_void_p, c.c_int, U32P], None),
            "tm_peek": ([c.c_void_p, c.c_int, U32P], None),
            "tm_reset": ([c.c_void_p, c.c_int], None),
            "tm_step": ([c.c_void_p, c.c_uint64], None),
            "tm_replay": ([c.c_void_p, c.c_uint64, c.c_int, IP, U32P, c.c_int, c.c_int, IP,
                           U32P, c.c_int, c.c_int, U64P, c.c_uint64], c.c_uint64),
            "tm_run": ([c.c_void_p, c.c_uint64, c.c_int, c.c_int, IP, U64P, c.c_uint64, U64P,
                        IP], c.c_uint64),
            "tm_write": ([c.c_void_p, IP, c.c_int, c.c_uint64, U8P, c.c_uint64], None),
            "tm_read": ([c.c_void_p, IP, c.c_int, c.c_uint64, U8P, c.c_uint64], None),
            "tm_write_hex": ([c.c_void_p, IP, c.c_int, c.c_uint64, c.c_char_p, c.c_int],
                             c.c_int64),
            "tm_load_program": ([c.c_void_p, IP, c.c_int, U8P, c.c_int, c.c_int], None),
            "tm_load_program_hex": ([c.c_void_p, IP, c.c_int, c.c_char_p, c.c_int], c.c_int),
            "tm_mem_count": ([], c.c_int), "tm_mem_name": ([c.c_int], c.c_char_p),
            "tm_mem_info": ([c.c_void_p, c.c_int, IP, IP, U64P], None),
            "tm_mem_write": ([c.c_void_p, c.c_int, c.c_uint64, U8P, c.c_uint64], c.c_int),
            "tm_mem_read": ([c.c_void_p, c.c_int, c.c_uint64, U8P, c.c_uint64], c.c_int),
            "tm_mem_write_hex": ([c.c_void_p, c.c_int, c.c_uint64, c.c_char_p, c.c_int],
                                 c.c_int64),
            "tm_model": ([c.c_void_p, c.c_uint64], c.c_int),
            "tm_model_write": ([c.c_void_p, c.c_int, c.c_uint64, U8P, c.c_uint64], c.c_int),
            "tm_model_read": ([c.c_void_p, c.c_int, c.c_uint64, U8P, c.c_uint64], c.c_int),
            "tm_attach_read": ([c.c_void_p, c.c_int, c.c_int, c.c_int, c.c_uint64], None),
            "tm_attach_write": ([c.c_void_p, c.c_int, c.c_int, c.c_int, c.c_int, c.c_int,
                                 c.c_uint64], None),
        }
        for name, (args, result) in signatures.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, result
        cls._libraries[path] = lib
        return lib

    def close(self) -> None:
        """Free the model."""
        if self.handle:
            self.lib.tm_close(self.handle)
            self.handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- ports --------------------------------------------------------------------------------

    def port(self, name: str) -> int:
        """Index of port or probe `name`; runner.SimError listing them when there is none."""
        found = self.index.get(name)
        if found is None:
            raise runner.SimError(f"the harness has no port {name!r}; it has "
                                  f"{', '.join(self.names)}")
        return found

    def _ports(self, *names) -> ctypes.Array:
        return (ctypes.c_int * len(names))(*[self.port(n) for n in names])

    def poke(self, name: str, v: int) -> None:
        """Set input `name` (held until set again)."""
        i = self.port(name)
        w = words(v, self.widths[i])
        self.lib.tm_poke(self.handle, i, w.ctypes.data_as(U32P))

    def peek(self, name: str) -> int:
        """The value of port or probe `name` in the current cycle."""
        i = self.port(name)
        w = np.zeros((self.widths[i] + 31) // 32, np.uint32)
        self.lib.tm_peek(self.handle, i, w.ctypes.data_as(U32P))
        return value(w)

    @property
    def cycle(self) -> int:
        """Cycles run since the model was opened."""
        return int(self.lib.tm_cycle(self.handle))

    # -- whole runs ---------------------------------------------------------------------------

    def reset(self, cycles: int = 2) -> None:
        """Hold reset for `cycles` cycles."""
        self.lib.tm_reset(self.handle, cycles)

    def step(self, cycles: int) -> None:
        """Run `cycles` cycles with the inputs held."""
        self.lib.tm_step(self.handle, cycles)

    def run(self, stop: str, *, watch=(), max_cycles: int, max_events: int = 1 << 20) -> Run:
        """Run until port `stop` is nonzero in a cycle, at most `max_cycles`, logging every
        change of the `watch` ports and probes."""
        ports = self._ports(*watch)
        events = np.zeros((max_events, 3), np.uint64)
        logged, stopped = ctypes.c_uint64(0), ctypes.c_int(0)
        start = time.perf_counter()
        cycles = self.lib.tm_run(self.handle, max_cycles, self.port(stop), len(watch), ports,
                                 events.ctypes.data_as(U64P), max_events,
                                 ctypes.byref(logged), ctypes.byref(stopped))
        self.last_call_s = time.perf_counter() - start
        if logged.value > max_events:
            raise runner.SimError(f"the run logged {logged.value} changes of {list(watch)}, "
                                  f"more than max_events = {max_events}; raise it")
        rows = events[:logged.value].tolist()
        return Run(int(cycles), bool(stopped.value),
                   [(int(c), watch[int(i)], int(v)) for c, i, v in rows])

    def stimulus(self, inputs: dict) -> "Stimulus":
        """A replay table of `inputs`: port name -> one value per cycle (ints or an integer
        array), or an already split uint32 array [cycles, words of the port]."""
        names = list(inputs)
        columns = [to_words(inputs[n], self.widths[self.port(n)]) for n in names]
        lengths = {len(c) for c in columns}
        if len(lengths) > 1:
            raise ValueError(f"input sequences differ in length: "
                             f"{ {n: len(c) for n, c in zip(names, columns)}!r}")
        table = np.ascontiguousarray(np.concatenate(columns, axis=1), np.uint32)
        return Stimulus(names, table)

    def replay(self, stimulus: "Stimulus", outputs=(), *, when: str | None = None,
               max_records: int | None = None) -> tuple[np.ndarray, dict]:
        """Drive `stimulus` cycle by cycle and sample `outputs` in every cycle where port
        `when` is nonzero (every cycle when None); return the sampled cycle numbers and port
        name -> sampled values (uint64, or ints for ports wider than 64 bits)."""
        table = stimulus.table
        cycles = len(table)
        out_words = [(self.widths[self.port(n)] + 31) // 32 for n in outputs]
        stride = max(sum(out_words), 1)
        rows = cycles if max_records is None else max_records
        out = np.zeros((rows, stride), np.uint32)
        records = np.zeros(rows, np.uint64)
        start = time.perf_counter()
        count = self.lib.tm_replay(
            self.handle, cycles, len(stimulus.names), self._ports(*stimulus.names),
            table.ctypes.data_as(U32P), table.shape[1], len(outputs), self._ports(*outputs),
            out.ctypes.data_as(U32P), stride, -1 if when is None else self.port(when),
            records.ctypes.data_as(U64P), rows)
        self.last_call_s = time.perf_counter() - start
        sampled, at = {}, 0
        for name, n in zip(outputs, out_words):
            sampled[name] = from_words(out[:count, at:at + n])
            at += n
        return records[:count], sampled

    # -- memories of the design, behind their ports --------------------------------------------

    def memory(self, name: str) -> int:
        """Index of the design memory at path `name`; SimError listing them when none."""
        found = self.memories.get(name)
        if found is None:
            raise runner.SimError(f"the design has no memory {name!r}; it has "
                                  f"{', '.join(self.memories)}")
        return found

    def mem_write(self, name: str, addr: int, data, *, width: int = 0) -> None:
        """Write bytes (or, with `width`, a `$readmemh` file of `width`-byte lines) at byte
        `addr` of design memory `name`, its elements seen as consecutive little-endian
        words."""
        i = self.memory(name)
        if width:
            done = self.lib.tm_mem_write_hex(self.handle, i, addr, str(data).encode(), width)
        else:
            buf = np.frombuffer(bytes(data), np.uint8).copy()
            done = self.lib.tm_mem_write(self.handle, i, addr, buf.ctypes.data_as(U8P),
                                         buf.size)
        if done < 0:
            raise runner.SimError(f"cannot write {data if width else 'the bytes'} at {addr:#x} "
                                  f"of memory {name!r}: missing or malformed file, or past its "
                                  f"end")

    def mem_read(self, name: str, addr: int, nbytes: int) -> bytes:
        """Read `nbytes` at byte `addr` of design memory `name`."""
        out = np.zeros(nbytes, np.uint8)
        if self.lib.tm_mem_read(self.handle, self.memory(name), addr,
                                out.ctypes.data_as(U8P), nbytes) < 0:
            raise runner.SimError(f"{nbytes} bytes at {addr:#x} lie past the end of memory "
                                  f"{name!r}")
        return out.tobytes()

    # -- memory models at the ports --------------------------------------------------------

    def model(self, size: int) -> int:
        """A new memory model of `size` bytes (zeros); returns its id."""
        return int(self.lib.tm_model(self.handle, size))

    def model_write(self, model: int, addr: int, data: bytes) -> None:
        """Write bytes into memory model `model`."""
        buf = np.frombuffer(bytes(data), np.uint8).copy()
        if self.lib.tm_model_write(self.handle, model, addr, buf.ctypes.data_as(U8P),
                                   buf.size) < 0:
            raise runner.SimError(f"{buf.size} bytes at {addr:#x} lie past memory model "
                                  f"{model}'s end")

    def model_read(self, model: int, addr: int, nbytes: int) -> bytes:
        """Read bytes from memory model `model`."""
        out = np.zeros(nbytes, np.uint8)
        if self.lib.tm_model_read(self.handle, model, addr, out.ctypes.data_as(U8P),
                                  nbytes) < 0:
            raise runner.SimError(f"{nbytes} bytes at {addr:#x} lie past memory model "
                                  f"{model}'s end")
        return out.tobytes()

    def attach_read(self, model: int, prefix: str, base: int = 0) -> None:
        """Serve read port `prefix` (__addr out, __data in) from `model`: the bytes at
        addr - base, in the cycle after the address."""
        self.lib.tm_attach_read(self.handle, model, self.port(f"{prefix}__addr"),
                                self.port(f"{prefix}__data"), base)

    def attach_write(self, model: int, prefix: str, base: int = 0) -> None:
        """Take the writes of window write port `prefix` (__addr, __data, __mask with a bit per
        byte, __en) into `model`, at addr - base."""
        self.lib.tm_attach_write(self.handle, model,
                                 *(self.port(f"{prefix}__{p}") for p in ("addr", "data", "mask",
                                                                        "en")), base)

    # -- memories and programs through ports -----------------------------------------------

    def _beat(self, data_port: str) -> int:
        return self.widths[self.port(data_port)] // 8

    def write(self, prefix: str, addr: int, data: bytes) -> None:
        """Write `data` at `addr` through window write port `prefix` (`prefix`__addr, __data,
        __mask, __en), a whole beat per cycle."""
        buf = np.frombuffer(bytes(data), np.uint8).copy()
        ports = self._ports(*(f"{prefix}__{p}" for p in ("addr", "data", "mask", "en")))
        self.lib.tm_write(self.handle, ports, self._beat(f"{prefix}__data"), addr,
                          buf.ctypes.data_as(U8P), buf.size)

    def write_hex(self, prefix: str, addr: int, path, width: int) -> int:
        """Write a bundle's `$readmemh` image (`width` bytes per line) at `addr` through
        `prefix`; return the bytes written."""
        ports = self._ports(*(f"{prefix}__{p}" for p in ("addr", "data", "mask", "en")))
        done = self.lib.tm_write_hex(self.handle, ports, self._beat(f"{prefix}__data"), addr,
                                     str(path).encode(), width)
        if done < 0:
            raise runner.SimError(f"{path} is missing or not a $readmemh file of {width}-byte "
                                  f"lines")
        return int(done)

    def read(self, prefix: str, addr: int, nbytes: int) -> bytes:
        """Read `nbytes` from `addr` through window read port `prefix` (__addr, __data)."""
        out = np.zeros(nbytes, np.uint8)
        ports = self._ports(f"{prefix}__addr", f"{prefix}__data")
        self.lib.tm_read(self.handle, ports, self._beat(f"{prefix}__data"), addr,
                         out.ctypes.data_as(U8P), nbytes)
        return out.tobytes()

    def load_program(self, prefix: str, program, word_bytes: int) -> int:
        """Load a program through load port `prefix` (__valid, __payload = word address, then
        the word): a bundle's `.hex` path, or a sequence of `word_bytes`-byte words. Returns
        the words loaded."""
        ports = self._ports(f"{prefix}__valid", f"{prefix}__payload")
        addr_bits = self.widths[self.port(f"{prefix}__payload")] - 8 * word_bytes
        if isinstance(program, (str, Path)):
            count = self.lib.tm_load_program_hex(self.handle, ports, addr_bits,
                                                 str(program).encode(), word_bytes)
            if count < 0:
                raise runner.SimError(f"{program} is missing or not a program .hex of "
                                      f"{word_bytes}-byte words")
            return int(count)
        buf = np.frombuffer(b"".join(bytes(w) for w in program), np.uint8).copy()
        self.lib.tm_load_program(self.handle, ports, addr_bits, buf.ctypes.data_as(U8P),
                                 buf.size // word_bytes, word_bytes)
        return buf.size // word_bytes


@dataclass
class Stimulus:
    """A replay table: the input ports driven and their words per cycle [cycles, words]."""
    names: list
    table: np.ndarray


def to_words(values, width: int) -> np.ndarray:
    """[cycles, words] uint32 of a port's values (ints, an integer array, or already words)."""
    count = (width + 31) // 32
    if isinstance(values, np.ndarray) and values.ndim == 2:
        if values.shape[1] != count:
            raise ValueError(f"a {width}-bit port takes {count} words per cycle, got "
                             f"{values.shape[1]}")
        return values.astype(np.uint32)
    if width <= 64:
        v = np.asarray(values).astype(np.uint64)
        return np.stack([(v >> np.uint64(32 * i)) & np.uint64(0xFFFFFFFF)
                         for i in range(count)], axis=1).astype(np.uint32)
    return np.array([words(int(x), width) for x in values], np.uint32).reshape(-1, count)


def from_words(block: np.ndarray):
    """Values of [rows, words] uint32: uint64 for up to two words, else Python ints."""
    if block.shape[1] <= 2:
        out = block[:, 0].astype(np.uint64)
        if block.shape[1] == 2:
            out |= block[:, 1].astype(np.uint64) << np.uint64(32)
        return out
    return [int.from_bytes(row.tobytes(), "little") for row in block]
