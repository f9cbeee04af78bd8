"""The instruction set: one table of instructions, and everything derived from it.

Every engine runs a stream of fixed 256-bit words. `INSTRUCTIONS` is the only place an opcode,
a field or a field width is written: encoding, decoding, the assembler, the disassembler, the
program file format and `docs/isa.md` all read it, and the HDL builds its instruction layouts
from `Instr.layout`. Instructions are tile-level macro-operations with loop counts (as VTA's
GEMM/ALU or SK hynix AiM's `MAC_ABK`) that each engine's front end expands into cycles or
DRAM/flash commands, so a 7B decode token is tens of thousands of words.
"""
from __future__ import annotations

import difflib
import re
import struct
import zlib
from dataclasses import dataclass
from enum import Enum, IntEnum
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import numpy as np

from trimem.numerics import WEIGHT_BITS

ISA_VERSION = 1
"""Bumped on any change to the table; program files and bundles record it."""
WORD_BITS = 256
WORD_BYTES = WORD_BITS // 8
OPCODE_BITS = 8
OPCODE_MASK = (1 << OPCODE_BITS) - 1
OP_BITS = 4
"""opcode = engine << OP_BITS | op, so each engine has 16 opcodes."""
MAGIC = b"TRIM"
HEADER = struct.Struct("<4sHHII")
"""Program file header: magic, ISA version, engine id, instruction count, crc32 of the body."""


class IsaError(ValueError):
    """An instruction, program text or program file that breaks the ISA; says where."""

    def at(self, where: str) -> "IsaError":
        return IsaError(f"{self} at {where}")


class Engine(IntEnum):
    """Engine ids: the high nibble of every opcode. CTRL instructions run in every stream."""
    CTRL = 0
    DMA = 1
    MXU = 2
    VPU = 3
    PIM = 4
    CSD = 5


STREAM_ENGINES = tuple(e for e in Engine if e is not Engine.CTRL)
"""Engines that own an instruction stream (a program file)."""


class Space(IntEnum):
    """Memory spaces an address can point into (docs/contract.md, "Memory spaces")."""
    HOST = 0
    HBM = 1
    SRAM = 2
    GBUF = 3
    PRES = 4
    CDRAM = 5
    PIMDRAM = 6
    FLASH = 7


ADDR_BITS = {Space.HOST: 40, Space.HBM: 40, Space.SRAM: 32, Space.GBUF: 32, Space.PRES: 32,
             Space.CDRAM: 32, Space.PIMDRAM: 40, Space.FLASH: 40}
"""Width of a byte address in each space: on-chip and on-drive buffers 32 bits, DRAM/flash 40."""
DMA_ADDR_BITS = max(ADDR_BITS.values())
"""DMA addresses reach any space, so they take the widest width."""
ENUM_BITS = 3
"""Width of an engine or space field."""


class Kind(Enum):
    """How a field's value is checked and written in assembly."""
    UINT = "uint"
    ADDR = "addr"
    ENGINE = "engine"
    SPACE = "space"


_ENUMS = {Kind.ENGINE: Engine, Kind.SPACE: Space}
_NUMBER = re.compile(r"[0-9]+|0[xX][0-9a-fA-F]+")


@dataclass(frozen=True)
class Field:
    """One unsigned bit field of an instruction word.

    `space` is the memory an ADDR field points into (None: a companion SPACE field names it).
    `choices` and `minimum` narrow the values the width allows; `default` lets assembly and
    `encode` leave the field out.
    """
    name: str
    width: int
    kind: Kind
    doc: str
    space: Space | None = None
    choices: tuple[int, ...] | None = None
    minimum: int = 0
    default: int | None = None

    @property
    def max(self) -> int:
        return (1 << self.width) - 1

    def show(self, value: int) -> str:
        """`value` as assembly writes it: enum names, hex addresses, decimal otherwise."""
        enum = _ENUMS.get(self.kind)
        if enum is not None and value in set(enum):
            return enum(value).name
        return f"{value:#x}" if self.kind is Kind.ADDR else str(value)

    def check(self, value) -> int:
        """`value` as stored in the word; IsaError naming the field if it is not allowed."""
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"field {self.name!r} takes an int, got {value!r}")
        value = int(value)
        if value < 0:
            raise IsaError(f"field {self.name!r} = {value} is negative; fields are unsigned")
        if value > self.max:
            raise IsaError(f"field {self.name!r} = {value} does not fit {self.width} bits "
                           f"(max {self.max})")
        if self.choices is not None and value not in self.choices:
            allowed = ", ".join(self.show(c) for c in self.choices)
            raise IsaError(f"field {self.name!r} = {self.show(value)} is not one of {allowed}")
        if value < self.minimum:
            raise IsaError(f"field {self.name!r} = {value} is below its minimum {self.minimum}")
        return value

    def parse(self, text: str) -> int:
        """The value of assembly text `text`: an enum name, or decimal or 0x hex digits."""
        enum = _ENUMS.get(self.kind)
        if enum is not None:
            if text not in enum.__members__:
                names = [enum(c).name for c in self.choices or enum]
                raise IsaError(f"field {self.name!r} = {text!r} names no {self.kind.value}; "
                               f"use one of {', '.join(names)}")
            return int(enum[text])
        if not _NUMBER.fullmatch(text):
            raise IsaError(f"field {self.name!r} = {text!r} is not a number; "
                           f"write decimal (42) or hex (0x2a)")
        return int(text, 0)


@dataclass(frozen=True)
class Instr:
    """One instruction: mnemonic, engine, op number inside the engine, fields and semantics.

    `doc` is the semantics in pseudocode (notation in docs/isa.md).
    """
    name: str
    engine: Engine
    op: int
    fields: tuple[Field, ...]
    doc: str

    def __post_init__(self):
        names = [f.name for f in self.fields]
        if not 0 <= self.op < 1 << OP_BITS:
            raise ValueError(f"{self.name}: op {self.op!r} does not fit {OP_BITS} bits")
        if len(set(names)) != len(names):
            raise ValueError(f"{self.name}: field names {names!r} repeat")
        if self.used_bits > WORD_BITS:
            raise ValueError(f"{self.name}: fields need {self.used_bits} bits, a word has "
                             f"{WORD_BITS}")
        for f in self.fields:
            if f.default is not None:
                f.check(f.default)

    @property
    def opcode(self) -> int:
        return self.engine << OP_BITS | self.op

    @property
    def used_bits(self) -> int:
        return OPCODE_BITS + sum(f.width for f in self.fields)

    @cached_property
    def layout(self) -> tuple[tuple[Field, int], ...]:
        """(field, lowest bit) pairs: fields packed LSB-first right after the opcode."""
        out, lo = [], OPCODE_BITS
        for f in self.fields:
            out.append((f, lo))
            lo += f.width
        return tuple(out)

    @cached_property
    def field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    @cached_property
    def unpackers(self) -> tuple:
        """Per field (field, lowest bit, mask, minimum, allowed values or None, members or
        None): what `decode` needs, looked up once."""
        out = []
        for f, lo in self.layout:
            allowed = None if f.choices is None else frozenset(f.choices)
            members = {int(e): e for e in _ENUMS[f.kind]} if f.kind in _ENUMS else None
            out.append((f, lo, f.max, f.minimum, allowed, members))
        return tuple(out)

    @cached_property
    def packers(self) -> tuple:
        """Per field (name, lowest bit, max, minimum, allowed values or None, default, field):
        what `encode` needs, looked up once."""
        return tuple((f.name, lo, f.max, f.minimum,
                      None if f.choices is None else frozenset(f.choices), f.default, f)
                     for f, lo in self.layout)

    @cached_property
    def name_set(self) -> frozenset:
        """The field names, for `encode`'s check of the names it is given."""
        return frozenset(self.field_names)


def group_size(group_log2: int, k: int) -> int:
    """Weight group size G along k: `1 << group_log2`, where 0 means one group of the whole row."""
    return k if group_log2 == 0 else 1 << group_log2


# ---------------------------------------------------------------------------------------------
# The table. Widths and defaults live only here.
# ---------------------------------------------------------------------------------------------

def _uint(name: str, width: int, doc: str, **kw) -> Field:
    return Field(name, width, Kind.UINT, doc, **kw)


def _addr(name: str, space: Space, doc: str) -> Field:
    return Field(name, ADDR_BITS[space], Kind.ADDR, doc, space=space)


def _engine(name: str, doc: str) -> Field:
    return Field(name, ENUM_BITS, Kind.ENGINE, doc, choices=tuple(int(e) for e in STREAM_ENGINES))


M = _uint("m", 16, "rows (tokens) processed", minimum=1)
N_OUT = _uint("n", 16, "output channels (columns of O)", minimum=1)
N_ROW = _uint("n", 16, "elements per row", minimum=1)
K = _uint("k", 16, "input channels (reduction length)", minimum=1)
BITS = _uint("bits", 4, "weight bits", choices=WEIGHT_BITS)
NM = _uint("nm", 4, "N:M sparsity pattern index into the config's `nm_patterns` (0 = dense)",
           default=0)
GROUP_LOG2 = _uint("group_log2", 4, "log2 of the weight group size along k (0 = whole row)",
                   default=0)
HEADS = _uint("heads", 8, "heads per row", minimum=1)
Q_HEADS = _uint("q_heads", 8, "query heads per row (a multiple of kv_heads)", minimum=1)
KV_HEADS = _uint("kv_heads", 8, "key/value heads per row", minimum=1)
HEAD_DIM = _uint("head_dim", 12, "elements per head (even)", minimum=2)
SEQ = _uint("seq", 8, "sequence slot of the KV cache")
LAYER = _uint("layer", 8, "layer of the KV cache")
SPLITS = _uint("splits", 8, "split-K partitions of the keys, merged at the end", minimum=1,
               default=1)
TOPK = _uint("topk", 16, "keep the top-k keys by score (0 = keep all)", default=0)
KV_BITS = _uint("kv_bits", 4, "bits of the cached K and V values", choices=WEIGHT_BITS)
KV_GROUP_LOG2 = _uint("kv_group_log2", 4,
                      "log2 of the KV group size along head_dim (0 = whole head)", default=0)
LAYERS = _uint("layers", 8, "layers in the KV cache (its layout stride)", minimum=1)
CTX_LOG2 = _uint("ctx_log2", 5, "log2 of the tokens each cache region holds (max_ctx)")
KV_GEOMETRY = (LAYERS, CTX_LOG2, KV_BITS, KV_GROUP_LOG2)
"""Fields that fix the KV layout: kv = dict(layers, max_ctx=2**ctx_log2, head_dim,
bits=kv_bits, group=group_size(kv_group_log2, head_dim), page_bytes from the config)."""

_KVAPP = """\
K = {act}.fx[k_addr, m, kv_heads * head_dim];  V = {act}.fx[v_addr, m, kv_heads * head_dim]
pos = {act}.i32[pos_addr, m]
for t in range(m), h in range(kv_heads), (kind, X) in (("K", K), ("V", V)):
    at = kv_base + kv_offset(seq, layer, h, kind, pos[t], **kv)
    {cache}[at:] = pack_kv_tokens(*quantize_kv(X[t, h], kv.bits, kv.group), kv.bits){note}"""

_ATTN = """\
Q = {act}.fx[q_addr, m, q_heads * head_dim];  pos = {act}.i32[pos_addr, m]
for t in range(m), h in range(q_heads):
    Kc, Vc = kv_cache({cache}[kv_base:], seq, layer, h // (q_heads // kv_heads), **kv)
    keys = range(pos[t] + 1)                             # causal
    s = scores(Q[t, h], Kc[keys])
    keys = top_k(keys, s, topk) if topk else keys        # V rows of pruned keys are not read
    parts = [partial_attn(s[p], Vc[p]) for p in split(keys, splits)]
    O[t, h] = merge(parts)                               # online-softmax (o, max, sum) merge
{act}.fx[o_addr, m, q_heads * head_dim] = O{note}"""

INSTRUCTIONS = (
    Instr("NOP", Engine.CTRL, 0, (), "pass  # one cycle"),
    Instr("HALT", Engine.CTRL, 1, (), "halt()  # the stream ends"),
    Instr("PUSH", Engine.CTRL, 2, (_engine("dst", "engine that receives the token"),),
          "token[self, dst] += 1"),
    Instr("POP", Engine.CTRL, 3, (_engine("src", "engine that sent the token"),),
          "wait until token[src, self] > 0\ntoken[src, self] -= 1"),
    Instr("DMA.COPY", Engine.DMA, 0, (
        Field("src_space", ENUM_BITS, Kind.SPACE, "memory read"),
        Field("src_addr", DMA_ADDR_BITS, Kind.ADDR, "source byte address in src_space"),
        Field("dst_space", ENUM_BITS, Kind.SPACE, "memory written"),
        Field("dst_addr", DMA_ADDR_BITS, Kind.ADDR, "destination byte address in dst_space"),
        _uint("nbytes", 32, "bytes copied")),
        "dst_space[dst_addr : dst_addr + nbytes] = src_space[src_addr : src_addr + nbytes]"),
    Instr("MXU.GEMM", Engine.MXU, 0, (
        M, N_OUT, K,
        _addr("a_addr", Space.SRAM, "A: m x k a8 activations"),
        _addr("s_addr", Space.SRAM, "scale codes of A's rows"),
        _addr("w_addr", Space.SRAM, "packed weight tile [n, k], brought in by DMA.COPY"),
        _addr("o_addr", Space.SRAM, "O: m x n fx outputs"),
        BITS, NM, GROUP_LOG2),
        "a8 = SRAM.a8[a_addr, m, k];  mant, exp = SRAM.scale[s_addr, m]\n"
        "W = unpack_weight_tile(SRAM[w_addr:], n, k, bits, fpga.nm_patterns[nm],\n"
        "                       group_size(group_log2, k))\n"
        "SRAM.fx[o_addr, m, n] = linear(a8, mant, exp, W.w_eff, W.mult, W.shift)"),
    Instr("VPU.EMBED", Engine.VPU, 0, (
        M, N_ROW,
        _addr("ids_addr", Space.SRAM, "m token ids (i32)"),
        _addr("table_addr", Space.HBM, "int8 embedding table with a scale code per row"),
        _addr("o_addr", Space.SRAM, "m x n fx outputs")),
        "ids = SRAM.i32[ids_addr, m]\n"
        "q, mant, exp = embedding_rows(HBM[table_addr:], ids, n)  # int8 rows, scale codes\n"
        "SRAM.fx[o_addr, m, n] = dequantize_act(q, mant, exp)"),
    Instr("VPU.RMSNORM", Engine.VPU, 1, (
        M, N_ROW,
        _addr("x_addr", Space.SRAM, "m x n fx inputs"),
        _addr("g_addr", Space.SRAM, "n fx gamma values"),
        _addr("o_addr", Space.SRAM, "m x n a8 outputs"),
        _addr("s_addr", Space.SRAM, "scale codes of the output rows")),
        "X = SRAM.fx[x_addr, m, n];  gamma = SRAM.fx[g_addr, 1, n]\n"
        "SRAM.a8[o_addr, m, n], SRAM.scale[s_addr, m] = quantize_act(rmsnorm(X, gamma))"),
    Instr("VPU.QUANT", Engine.VPU, 2, (
        M, N_ROW,
        _addr("x_addr", Space.SRAM, "m x n fx inputs"),
        _addr("o_addr", Space.SRAM, "m x n a8 outputs"),
        _addr("s_addr", Space.SRAM, "scale codes of the output rows")),
        "SRAM.a8[o_addr, m, n], SRAM.scale[s_addr, m] = quantize_act(SRAM.fx[x_addr, m, n])"),
    Instr("VPU.ADD", Engine.VPU, 3, (
        M, N_ROW,
        _addr("a_addr", Space.SRAM, "m x n fx inputs"),
        _addr("b_addr", Space.SRAM, "m x n fx inputs"),
        _addr("o_addr", Space.SRAM, "m x n fx outputs")),
        "SRAM.fx[o_addr, m, n] = sat(SRAM.fx[a_addr, m, n] + SRAM.fx[b_addr, m, n], 32)"),
    Instr("VPU.SILUMUL", Engine.VPU, 4, (
        M, N_ROW,
        _addr("a_addr", Space.SRAM, "m x n fx gate inputs"),
        _addr("b_addr", Space.SRAM, "m x n fx up inputs"),
        _addr("o_addr", Space.SRAM, "m x n fx outputs")),
        "SRAM.fx[o_addr, m, n] = fx_mul(silu(SRAM.fx[a_addr, m, n]), SRAM.fx[b_addr, m, n])"),
    Instr("VPU.ROPE", Engine.VPU, 5, (
        M, HEADS, HEAD_DIM,
        _addr("x_addr", Space.SRAM, "m x (heads * head_dim) fx inputs"),
        _addr("pos_addr", Space.SRAM, "m token positions (i32)"),
        _addr("table_addr", Space.SRAM, "cos/sin table"),
        _addr("o_addr", Space.SRAM, "m x (heads * head_dim) fx outputs")),
        "X = SRAM.fx[x_addr, m, heads * head_dim];  pos = SRAM.i32[pos_addr, m]\n"
        "for t in range(m), h in range(heads):\n"
        "    O[t, h] = rope(X[t, h], pos[t], SRAM[table_addr:])  # rotate pairs by cos/sin\n"
        "SRAM.fx[o_addr, m, heads * head_dim] = O"),
    Instr("VPU.KVAPP", Engine.VPU, 6, (
        M, SEQ, LAYER, KV_HEADS, HEAD_DIM,
        _addr("k_addr", Space.SRAM, "m x (kv_heads * head_dim) fx keys"),
        _addr("v_addr", Space.SRAM, "m x (kv_heads * head_dim) fx values"),
        _addr("pos_addr", Space.SRAM, "m token positions (i32)"),
        _addr("kv_base", Space.HBM, "base of the KV cache"), *KV_GEOMETRY),
        _KVAPP.format(act="SRAM", cache="HBM", note="")),
    Instr("VPU.ATTN", Engine.VPU, 7, (
        M, SEQ, LAYER, Q_HEADS, KV_HEADS, HEAD_DIM,
        _addr("q_addr", Space.SRAM, "m x (q_heads * head_dim) fx queries"),
        _addr("pos_addr", Space.SRAM, "m query positions (i32)"),
        _addr("o_addr", Space.SRAM, "m x (q_heads * head_dim) fx outputs"),
        _addr("kv_base", Space.HBM, "base of the KV cache"), *KV_GEOMETRY,
        SPLITS, TOPK),
        _ATTN.format(act="SRAM", cache="HBM", note="")),
    Instr("PIM.GEMV", Engine.PIM, 0, (
        M, N_OUT, K,
        _addr("x_addr", Space.GBUF, "m x k a8 inputs, in each selected channel's buffer"),
        _addr("s_addr", Space.GBUF, "scale codes of the input rows"),
        _addr("w_addr", Space.PIMDRAM, "row-aligned byte offset of the tiles in each bank"),
        _addr("o_addr", Space.PRES, "m x n fx outputs"),
        _uint("ch_mask", 32, "PIM channels used (bit c = channel c)", minimum=1),
        BITS, NM, GROUP_LOG2),
        "banks = the banks of the channels in ch_mask, channel-major;  U = len(banks)\n"
        "for u, bank in enumerate(banks):                 # output channels j with j % U == u\n"
        "    W[u] = unpack_weight_tile(bank[w_addr:], ceil((n - u) / U), k, bits,\n"
        "                              nm_patterns[nm], group_size(group_log2, k))\n"
        "for t in range(m):                               # one vector after another\n"
        "    a8 = GBUF.a8[x_addr, m, k][t];  mant, exp = GBUF.scale[s_addr, m][t]\n"
        "    for j in range(n):                           # every bank at once\n"
        "        w = W[j % U]\n"
        "        PRES.fx[o_addr, m, n][t, j] = linear(a8, mant, exp, w.w_eff, w.mult,\n"
        "                                             w.shift)[j // U]"),
    Instr("CSD.KVAPP", Engine.CSD, 0, (
        M, SEQ, LAYER, KV_HEADS, HEAD_DIM,
        _addr("k_addr", Space.CDRAM, "m x (kv_heads * head_dim) fx keys"),
        _addr("v_addr", Space.CDRAM, "m x (kv_heads * head_dim) fx values"),
        _addr("pos_addr", Space.CDRAM, "m token positions (i32)"),
        _addr("kv_base", Space.FLASH, "base of the KV cache"), *KV_GEOMETRY),
        _KVAPP.format(act="CDRAM", cache="FLASH",
                      note="\n# a flash page is programmed once it is full")),
    Instr("CSD.ATTN", Engine.CSD, 1, (
        M, SEQ, LAYER, Q_HEADS, KV_HEADS, HEAD_DIM,
        _addr("q_addr", Space.CDRAM, "m x (q_heads * head_dim) fx queries"),
        _addr("pos_addr", Space.CDRAM, "m query positions (i32)"),
        _addr("o_addr", Space.CDRAM, "m x (q_heads * head_dim) fx outputs"),
        _addr("kv_base", Space.FLASH, "base of the KV cache"), *KV_GEOMETRY,
        SPLITS, TOPK),
        _ATTN.format(act="CDRAM", cache="FLASH",
                     note="\n# the splits run in parallel on the flash channels")),
)

BY_NAME = {i.name: i for i in INSTRUCTIONS}
BY_OPCODE = {i.opcode: i for i in INSTRUCTIONS}
FIELD_NAMES = tuple(dict.fromkeys(f.name for i in INSTRUCTIONS for f in i.fields))
"""Every field name in the table, first-seen order: the columns of `decode_program_arrays`."""
if len(BY_NAME) != len(INSTRUCTIONS) or len(BY_OPCODE) != len(INSTRUCTIONS):
    raise ValueError("INSTRUCTIONS repeats a mnemonic or an opcode")


def lookup(name: str) -> Instr:
    """The instruction called `name`; the error suggests the closest mnemonic."""
    if name in BY_NAME:
        return BY_NAME[name]
    close = difflib.get_close_matches(name.upper(), BY_NAME, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"use one of {', '.join(BY_NAME)}"
    raise IsaError(f"unknown instruction {name!r}; {hint}")


def stream_engine(engine) -> Engine:
    """The stream engine named by `engine`: an Engine, its id, or its name in any case."""
    found = None
    if isinstance(engine, str):
        found = Engine.__members__.get(engine.upper())
    elif isinstance(engine, (int, np.integer)) and not isinstance(engine, bool):
        found = {int(e): e for e in Engine}.get(int(engine))
    if found not in STREAM_ENGINES:
        raise IsaError(f"{engine!r} is not a stream engine; use one of "
                       f"{', '.join(e.name for e in STREAM_ENGINES)}")
    return found


# ---------------------------------------------------------------------------------------------
# Words
# ---------------------------------------------------------------------------------------------

class Decoded(NamedTuple):
    """A decoded word: mnemonic and field values (engine and space fields as enums)."""
    name: str
    fields: dict

    @property
    def text(self) -> str:
        """The canonical assembly line."""
        instr = BY_NAME[self.name]
        return " ".join([self.name] + [f"{f.name}={f.show(self.fields[f.name])}"
                                       for f in instr.fields])


def _field(instr: Instr, name: str) -> Field:
    if name in instr.field_names:
        return instr.fields[instr.field_names.index(name)]
    close = difflib.get_close_matches(name, instr.field_names, n=1)
    hint = (f"did you mean {close[0]!r}?" if close else
            f"its fields are {', '.join(instr.field_names) or 'none'}")
    raise IsaError(f"{instr.name} has no field {name!r}; {hint}")


def _require(instr: Instr, given: dict) -> None:
    missing = [f.name for f in instr.fields if f.name not in given and f.default is None]
    if missing:
        raise IsaError(f"{instr.name} is missing field(s) {', '.join(map(repr, missing))}")


def _pack(instr: Instr, given: dict) -> bytes:
    """One pass over the field table: plain ints in range go straight into the word; anything
    else (a missing field, a numpy int, a bad value) takes the checked path for its
    conversion or its error."""
    if not given.keys() <= instr.name_set:
        for name in given.keys() - instr.name_set:
            _field(instr, name)
    word = instr.opcode
    for name, lo, top, minimum, allowed, default, f in instr.packers:
        value = given.get(name, default)
        if (value is None or value.__class__ is bool or not isinstance(value, int)
                or not minimum <= value <= top or (allowed is not None and value not in allowed)):
            _require(instr, given)
            value = f.check(value)
        word |= value << lo
    return word.to_bytes(WORD_BYTES, "little")


def encode(instr_name: str, **fields) -> bytes:
    """One 32-byte word; every field without a table default must be given."""
    return _pack(lookup(instr_name), fields)


def decode(word: bytes) -> Decoded:
    """The instruction in one 32-byte word; rejects unknown opcodes, set reserved bits and
    field values the table does not allow."""
    if len(word) != WORD_BYTES:
        raise IsaError(f"a word is {WORD_BYTES} bytes, got {len(word)}")
    x = int.from_bytes(word, "little")
    instr = BY_OPCODE.get(x & OPCODE_MASK)
    if instr is None:
        raise IsaError(f"unknown opcode {x & OPCODE_MASK:#04x}")
    if x >> instr.used_bits:
        raise IsaError(f"{instr.name} word has reserved bits set above bit {instr.used_bits - 1}")
    fields = {}
    for f, lo, mask, minimum, allowed, members in instr.unpackers:
        value = (x >> lo) & mask
        if value < minimum or (allowed is not None and value not in allowed):
            f.check(value)
        fields[f.name] = value if members is None else members[value]
    return Decoded(instr.name, fields)


def _where(index: int, base: int) -> str:
    return f"word {index} (byte offset {base + index * WORD_BYTES:#x})"


def _word_matrix(words, base: int = 0) -> np.ndarray:
    """`words` (a list of 32-byte words, a bytes-like blob or an (n, 32) uint8 array) as an
    (n, 32) uint8 array."""
    if isinstance(words, np.ndarray):
        data = np.ascontiguousarray(words, dtype=np.uint8).reshape(-1)
    elif isinstance(words, (bytes, bytearray, memoryview)):
        data = np.frombuffer(words, np.uint8)
    else:
        for i, w in enumerate(words):
            if len(w) != WORD_BYTES:
                raise IsaError(f"a word is {WORD_BYTES} bytes, got {len(w)} at {_where(i, base)}")
        data = np.frombuffer(b"".join(words), np.uint8)
    if data.size % WORD_BYTES:
        whole = data.size // WORD_BYTES
        raise IsaError(f"truncated word: {data.size % WORD_BYTES} of {WORD_BYTES} bytes "
                       f"at {_where(whole, base)}")
    return data.reshape(-1, WORD_BYTES)


def _field_mask(instr: Instr) -> np.ndarray:
    """Per 64-bit limb, the bits `instr` uses."""
    used = (1 << instr.used_bits) - 1
    return np.array([(used >> (64 * i)) & (2**64 - 1) for i in range(WORD_BITS // 64)], np.uint64)


def _decode_matrix(data: np.ndarray, base: int) -> dict[str, np.ndarray]:
    n = len(data)
    limbs = data.view("<u8")
    opcode = data[:, 0].copy()
    cols = {"opcode": opcode} | {name: np.zeros(n, np.int64) for name in FIELD_NAMES}
    ok = np.zeros(n, bool)
    for op in np.unique(opcode):
        instr = BY_OPCODE.get(int(op))
        if instr is None:
            continue
        rows = np.flatnonzero(opcode == op)
        sub = limbs[rows]
        good = ~np.any(sub & ~_field_mask(instr), axis=1)
        for f, lo in instr.layout:
            limb, off = divmod(lo, 64)
            v = sub[:, limb] >> np.uint64(off)
            if off + f.width > 64:
                v |= sub[:, limb + 1] << np.uint64(64 - off)
            v = (v & np.uint64(f.max)).astype(np.int64)
            if f.choices is not None:
                good &= np.isin(v, f.choices)
            good &= v >= f.minimum
            cols[f.name][rows] = v
        ok[rows] = good
    bad = np.flatnonzero(~ok)
    if bad.size:
        i = int(bad[0])
        try:
            decode(data[i].tobytes())
        except IsaError as exc:
            raise exc.at(_where(i, base)) from None
    return cols


def decode_program_arrays(words) -> dict[str, np.ndarray]:
    """Decode a whole stream at once: `opcode` (uint8) and one int64 column per name in
    `FIELD_NAMES` (0 where a word's instruction lacks that field), validated like `decode`."""
    return _decode_matrix(_word_matrix(words), 0)


def _foreign(instr: Instr, stream: Engine) -> IsaError:
    return IsaError(f"{instr.name} belongs to {instr.engine.name}; a {stream.name} program "
                    f"holds only {stream.name} and CTRL instructions")


def _check_stream(data: np.ndarray, stream: Engine, base: int) -> None:
    owner = data[:, 0] >> OP_BITS
    bad = np.flatnonzero((owner != Engine.CTRL) & (owner != stream))
    if bad.size:
        i = int(bad[0])
        raise _foreign(BY_OPCODE[int(data[i, 0])], stream).at(_where(i, base))


# ---------------------------------------------------------------------------------------------
# Assembly text
# ---------------------------------------------------------------------------------------------

def _assemble_line(tokens: list[str], stream: Engine | None) -> bytes:
    instr = lookup(tokens[0])
    if stream is not None and instr.engine not in (Engine.CTRL, stream):
        raise _foreign(instr, stream)
    given = {}
    for token in tokens[1:]:
        name, eq, text = token.partition("=")
        if not (eq and name and text):
            raise IsaError(f"expected field=value, got {token!r}")
        if name in given:
            raise IsaError(f"field {name!r} is given twice")
        given[name] = _field(instr, name).parse(text)
    return _pack(instr, given)


def assemble(text: str, engine=None) -> list[bytes]:
    """Words of assembly `text`: one `MNEMONIC field=value ...` per line, `#` comments.

    With `engine` (an Engine or its name) only that engine's and CTRL instructions are allowed.
    """
    stream = None if engine is None else stream_engine(engine)
    words = []
    for lineno, line in enumerate(text.splitlines(), 1):
        tokens = line.split("#", 1)[0].split()
        if tokens:
            try:
                words.append(_assemble_line(tokens, stream))
            except IsaError as exc:
                raise exc.at(f"line {lineno}") from None
    return words


def disassemble(words) -> str:
    """Canonical assembly of `words`: one line each, fields in table order, addresses in hex."""
    data = _word_matrix(words)
    lines = []
    for i, row in enumerate(data):
        try:
            lines.append(decode(row.tobytes()).text + "\n")
        except IsaError as exc:
            raise exc.at(_where(i, 0)) from None
    return "".join(lines)


# ---------------------------------------------------------------------------------------------
# Program files
# ---------------------------------------------------------------------------------------------

def program_bytes(engine, words) -> bytes:
    """A program file's bytes: the 16-byte header, then the words, all validated."""
    stream = stream_engine(engine)
    data = _word_matrix(words)
    _decode_matrix(data, 0)
    _check_stream(data, stream, 0)
    body = data.tobytes()
    return HEADER.pack(MAGIC, ISA_VERSION, stream, len(data), zlib.crc32(body)) + body


def parse_program(data: bytes) -> tuple[Engine, list[bytes]]:
    """(engine, words) of a program file's bytes; checks header, length, crc and every word."""
    data = bytes(data)
    if len(data) < HEADER.size:
        raise IsaError(f"truncated program: {len(data)} bytes, shorter than the "
                       f"{HEADER.size}-byte header")
    magic, version, engine_id, count, crc = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise IsaError(f"not a Trimem program: starts with {magic!r}, expected {MAGIC!r}")
    if version != ISA_VERSION:
        raise IsaError(f"program is ISA version {version} but this Trimem reads version "
                       f"{ISA_VERSION}; assemble or compile it again")
    if engine_id not in STREAM_ENGINES:
        raise IsaError(f"program header names engine id {engine_id}, which owns no stream; "
                       f"use one of {', '.join(f'{e.name}={e.value}' for e in STREAM_ENGINES)}")
    stream = Engine(engine_id)
    body = data[HEADER.size:]
    if len(body) != count * WORD_BYTES:
        problem = "truncated program" if len(body) < count * WORD_BYTES else "trailing bytes"
        raise IsaError(f"{problem}: the header says {count} words ({count * WORD_BYTES} bytes) "
                       f"but {len(body)} bytes follow it at byte offset {HEADER.size:#x}")
    if zlib.crc32(body) != crc:
        raise IsaError(f"crc32 mismatch: the header says {crc:#010x} but the body has "
                       f"{zlib.crc32(body):#010x}; the file is corrupt")
    matrix = _word_matrix(body, HEADER.size)
    _decode_matrix(matrix, HEADER.size)
    _check_stream(matrix, stream, HEADER.size)
    return stream, [body[i:i + WORD_BYTES] for i in range(0, len(body), WORD_BYTES)]


def write_program(path, engine, words) -> None:
    """Write `words` as `engine`'s program file at `path`."""
    Path(path).write_bytes(program_bytes(engine, words))


def read_program(path) -> tuple[Engine, list[bytes]]:
    """(engine, words) of the program file at `path`; errors name the file."""
    try:
        return parse_program(Path(path).read_bytes())
    except IsaError as exc:
        raise IsaError(f"{path}: {exc}") from None
