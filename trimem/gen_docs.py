"""Generated reference pages: each one is rendered from the tables in `trimem/`, never kept
by hand, and a test regenerates it and diffs it against the checked-in file.

Regenerate every page from the repository root with `python -m trimem.gen_docs`.
"""
from __future__ import annotations

import re
import struct
import sys
from pathlib import Path

from trimem import isa

REGENERATE = "python -m trimem.gen_docs"


def _banner(source: str) -> list[str]:
    return ["AUTO-GENERATED — DO NOT EDIT.",
            f"Source: {source}, rendered by `trimem/gen_docs.py`.",
            f"Regenerate: `{REGENERATE}` (from the repository root).", ""]


def _table(header: tuple[str, ...], rows: list[tuple]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""]


def _kind(f: isa.Field) -> str:
    if f.kind is isa.Kind.ADDR:
        return f"{f.space.name} addr" if f.space is not None else "addr"
    return f.kind.value


def _allowed(f: isa.Field) -> str:
    if f.choices is not None:
        return ", ".join(f.show(c) for c in f.choices)
    if f.kind is isa.Kind.SPACE:
        return "any space"
    return f"{f.show(f.minimum)}..{f.show(f.max)}"


def _bits(lo: int, width: int) -> str:
    return f"[{lo + width - 1}:{lo}]"


def _header_rows() -> list[tuple]:
    meaning = {"magic": f"`{isa.MAGIC.decode()}`",
               "version": f"ISA version (this one: {isa.ISA_VERSION})",
               "engine": "engine id of the stream",
               "count": "number of words",
               "crc32": "zlib crc32 of the body"}
    codes = re.findall(r"\d*[a-zA-Z]", isa.HEADER.format.lstrip("<"))
    rows, offset = [], 0
    for name, code in zip(meaning, codes, strict=True):
        size = struct.calcsize("<" + code)
        kind = "bytes" if code.endswith("s") else f"u{8 * size} LE"
        rows.append((offset, size, name, kind, meaning[name]))
        offset += size
    rows.append((offset, f"{isa.WORD_BYTES} x count", "body", "words", "the instruction words"))
    return rows


_INTRO = """\
# Instruction set (ISA version {version})

Each engine runs its own stream of fixed {word_bits}-bit ({word_bytes}-byte) words in order;
engines run concurrently and order themselves only through `PUSH`/`POP` tokens. Memories,
number formats and layouts are in `docs/contract.md`, cycle counts in `docs/timing.md`.

## Word encoding

- A word is {word_bytes} bytes, little-endian: bit i of the word is bit i % 8 of byte i // 8.
- Bits {opcode_bits} are the opcode, `engine << {op_bits} | op`.
- Fields follow from bit {first} up, packed LSB-first in table order. Bits above the last field
  are reserved and must be zero.
- Every field is unsigned. Kinds: `uint` (a count), `<SPACE> addr` (a byte address in that
  memory), `addr` (a byte address in the memory a companion `space` field names), `engine`
  and `space` ({enum_bits}-bit ids, tables below).
- Decoding rejects unknown opcodes, set reserved bits and values outside the `allowed` column.
"""

_NOTATION = """\
- `S.fx[a, r, c]`: an r x c row-major matrix of int32 fixed-point values at byte address `a`
  of memory `S`; `.a8` is int8, `.i32` int32, `.scale` one 4-byte scale code (mant, exp) per
  row; `S[a:]` is the bytes from `a`.
- Arithmetic is that of `trimem/numerics.py` (`linear`, `quantize_act`, `dequantize_act`,
  `sat`, `quantize_kv`, and the fixed-point functions `rmsnorm`, `silu`, `fx_mul`, `rope`,
  `scores`, `top_k`, `partial_attn`, `merge`); byte layouts are those of `trimem/layout.py`
  (`unpack_weight_tile`, `kv_offset`, `pack_kv_tokens`); `embedding_rows` and `kv_cache` read
  the embedding table and one head's cached K and V as `docs/contract.md` lays them out.
- `kv` is the bundle's KV cache format (bits, group and the other parameters of `kv_offset`);
  `nm_patterns` comes from the hardware config; `group_size` is in `trimem/isa.py`.
- `token[a, b]` counts the dependency tokens engine `a` has pushed to engine `b` and `b` has
  not yet popped; `self` is the engine running the stream."""

_SYNTAX = """\
One instruction per line: the mnemonic, then `field=value` for every field, separated by
spaces, in any order. Values are decimal (`42`) or hex (`0x2a`); engine and space fields take
names (`dst=MXU`, `src_space=HBM`). A field may be left out only where the table gives a
default. `#` starts a comment; blank lines are ignored. CTRL instructions may appear in every
engine's program; any other instruction only in its own engine's program.

The disassembler writes the canonical form: fields in table order, addresses in lowercase hex,
every other number in decimal, defaults written out. Assembling canonical text and
disassembling the words gives the same text back, byte for byte."""


def isa_markdown() -> str:
    """docs/isa.md: encoding, opcode map, program file format and every instruction."""
    out = _banner("`trimem/isa.py` (the `INSTRUCTIONS` table)")
    out.append(_INTRO.format(version=isa.ISA_VERSION, word_bits=isa.WORD_BITS,
                             word_bytes=isa.WORD_BYTES, opcode_bits=_bits(0, isa.OPCODE_BITS),
                             op_bits=isa.OP_BITS, first=isa.OPCODE_BITS,
                             enum_bits=isa.ENUM_BITS))
    out += ["## Engines", ""]
    out += _table(("id", "engine", "stream"),
                  [(int(e), f"`{e.name}`", "-" if e is isa.Engine.CTRL else
                    f"`{e.name.lower()}.bin`") for e in isa.Engine])
    out += ["## Memory spaces", ""]
    out += _table(("id", "space", "address bits"),
                  [(int(s), f"`{s.name}`", isa.ADDR_BITS[s]) for s in isa.Space])
    out += [f"DMA addresses are {isa.DMA_ADDR_BITS} bits wide whatever their space.", "",
            "## Opcode map", ""]
    out += _table(("opcode", "mnemonic", "engine", "bits used"),
                  [(f"`{i.opcode:#04x}`", f"[`{i.name}`](#{_anchor(i)})", i.engine.name,
                    i.used_bits) for i in isa.INSTRUCTIONS])
    out += ["## Assembly text", "", _SYNTAX, "",
            "## Program file", "",
            f"A {isa.HEADER.size}-byte header, then the words. Readers check the magic, the"
            " version,", "that the engine owns a stream, the length, the crc and every word.", ""]
    out += _table(("offset", "bytes", "field", "type", "value"), _header_rows())
    out += ["## Semantics notation", "", _NOTATION, "",
            "## Timing", "",
            "The cycle count of every instruction is defined in [docs/timing.md](timing.md).", "",
            "## Instructions", ""]
    for instr in isa.INSTRUCTIONS:
        out += _instr_section(instr)
    return "\n".join(out).rstrip("\n") + "\n"


def _anchor(instr: isa.Instr) -> str:
    return instr.name.lower().replace(".", "")


def _instr_section(instr: isa.Instr) -> list[str]:
    rows = [(_bits(0, isa.OPCODE_BITS), "opcode", isa.OPCODE_BITS, "-", f"`{instr.opcode:#04x}`",
             "-", f"{instr.engine.name} op {instr.op}")]
    for f, lo in instr.layout:
        default = "-" if f.default is None else f.show(f.default)
        rows.append((_bits(lo, f.width), f"`{f.name}`", f.width, _kind(f), _allowed(f), default,
                     f.doc))
    if instr.used_bits < isa.WORD_BITS:
        rows.append((_bits(instr.used_bits, isa.WORD_BITS - instr.used_bits), "reserved",
                     isa.WORD_BITS - instr.used_bits, "-", "0", "-", "must be zero"))
    out = [f"### {instr.name}", "",
           f"Opcode `{instr.opcode:#04x}` ({instr.engine.name} op {instr.op}).", ""]
    out += _table(("bits", "field", "width", "kind", "allowed", "default", "meaning"), rows)
    return out + ["```", instr.doc, "```", "",
                  "Timing: see [docs/timing.md](timing.md).", ""]


DOCS = {"isa.md": isa_markdown}
"""Generated page name -> function that renders it."""


def main(argv: list[str] | None = None) -> int:
    """Write every page of `DOCS` into the directory `argv[0]` (default `docs`)."""
    argv = sys.argv[1:] if argv is None else argv
    folder = Path(argv[0] if argv else "docs")
    if not folder.is_dir():
        print(f"gen_docs: {folder} is not a directory; run from the repository root or pass "
              f"the docs folder", file=sys.stderr)
        return 1
    for name, render in DOCS.items():
        (folder / name).write_text(render(), encoding="utf-8")
        print(f"wrote {folder / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
