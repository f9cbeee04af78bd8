"""`trimem asm` and `trimem disasm`: the assembler and disassembler on files.

User errors are raised as `IsaError` (a `ValueError`) or `OSError` naming the file; the
`trimem` entry point prints them on one line and exits with status 1.
"""
from __future__ import annotations

import sys
from pathlib import Path

from trimem import isa


def add_isa_parsers(subparsers) -> None:
    """Register `asm` and `disasm` on an argparse subparsers object."""
    names = [e.name for e in isa.STREAM_ENGINES]
    asm = subparsers.add_parser(
        "asm", help="assemble a text program into a program file",
        description="Assemble FILE.s (one `MNEMONIC field=value ...` per line, see docs/isa.md) "
                    "into a program file for one engine.")
    asm.add_argument("source", metavar="FILE.s", help="assembly text")
    asm.add_argument("-o", "--output", metavar="FILE.bin",
                     help="program file to write (default: FILE.bin beside FILE.s)")
    asm.add_argument("--engine", type=str.upper, choices=names, metavar="NAME",
                     help=f"engine whose stream this is, one of {', '.join(names)} "
                          "(default: the one engine whose instructions the file uses)")
    asm.set_defaults(func=cmd_asm)
    disasm = subparsers.add_parser(
        "disasm", help="print a program file as canonical assembly text",
        description="Print a program file as assembly text that `trimem asm` turns back into "
                    "the same file.")
    disasm.add_argument("program", metavar="FILE.bin", help="program file")
    disasm.set_defaults(func=cmd_disasm)


def _program_engine(source: Path, words: list[bytes]) -> isa.Engine:
    """The one stream engine whose instructions `words` use."""
    used = sorted({isa.BY_OPCODE[w[0]].engine for w in words} - {isa.Engine.CTRL})
    if len(used) != 1:
        found = " and ".join(e.name for e in used) if used else "only CTRL"
        raise isa.IsaError(f"{source}: uses {found} instructions, so its engine is unclear; "
                           f"name it with --engine")
    return used[0]


def cmd_asm(args) -> int:
    """Assemble `args.source` into `args.output`."""
    source = Path(args.source)
    output = Path(args.output) if args.output else source.with_suffix(".bin")
    if output.resolve() == source.resolve():
        raise isa.IsaError(f"{source}: the output would overwrite the source; name another "
                           f"file with -o")
    try:
        words = isa.assemble(source.read_text(), args.engine)
    except isa.IsaError as exc:
        raise isa.IsaError(f"{source}: {exc}") from None
    engine = isa.stream_engine(args.engine) if args.engine else _program_engine(source, words)
    isa.write_program(output, engine, words)
    print(f"wrote {output}: {len(words)} {engine.name} instructions")
    return 0


def cmd_disasm(args) -> int:
    """Print `args.program` as canonical assembly, after a comment naming its engine."""
    engine, words = isa.read_program(args.program)
    sys.stdout.write(f"# {engine.name} program, {len(words)} instructions, "
                     f"ISA version {isa.ISA_VERSION}\n")
    sys.stdout.write(isa.disassemble(words))
    return 0
