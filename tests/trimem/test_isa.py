"""The instruction set: table invariants, encoding, assembly, program files, docs and CLI."""
import argparse
import random
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from trimem import gen_docs, isa, isacli
from trimem.isa import Engine, IsaError, Space

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]

GEMM = ("MXU.GEMM m=4 n=8 k=16 a_addr=0x100 s_addr=0x200 w_addr=0x300 o_addr=0x400 bits=4 "
        "nm=0 group_log2=0")


def random_fields(instr: isa.Instr, rng: random.Random) -> dict:
    """In-range values, with the extremes of each field drawn often."""
    out = {}
    for f in instr.fields:
        if f.choices is not None:
            out[f.name] = rng.choice(f.choices)
        else:
            out[f.name] = rng.choice([f.minimum, f.max, rng.randint(f.minimum, f.max)])
    return out


def every_instruction_words(seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    return [isa.encode(i.name, **random_fields(i, rng)) for i in isa.INSTRUCTIONS for _ in range(3)]


def header(engine: int, body: bytes, *, magic=isa.MAGIC, version=isa.ISA_VERSION, count=None,
           crc=None) -> bytes:
    count = len(body) // isa.WORD_BYTES if count is None else count
    crc = zlib.crc32(body) if crc is None else crc
    return isa.HEADER.pack(magic, version, engine, count, crc)


# ---- the table ------------------------------------------------------------------------------

def test_opcodes_are_engine_nibble_and_op_counted_from_zero_in_listing_order():
    for engine in Engine:
        ops = [i.op for i in isa.INSTRUCTIONS if i.engine is engine]
        assert ops == list(range(len(ops)))
    for instr in isa.INSTRUCTIONS:
        assert instr.opcode == instr.engine << 4 | instr.op


def test_the_table_holds_the_contract_mnemonics_in_order():
    assert [i.name for i in isa.INSTRUCTIONS] == [
        "NOP", "HALT", "PUSH", "POP", "DMA.COPY", "MXU.GEMM", "VPU.EMBED", "VPU.RMSNORM",
        "VPU.QUANT", "VPU.ADD", "VPU.SILUMUL", "VPU.ROPE", "VPU.KVAPP", "VPU.ATTN", "PIM.GEMV",
        "CSD.KVAPP", "CSD.ATTN"]


def test_every_instruction_fits_one_word_and_has_semantics():
    for instr in isa.INSTRUCTIONS:
        assert instr.used_bits <= isa.WORD_BITS
        assert instr.doc.strip()


def test_address_fields_take_the_width_of_their_space():
    for instr in isa.INSTRUCTIONS:
        for f in instr.fields:
            if f.kind is isa.Kind.ADDR:
                want = isa.DMA_ADDR_BITS if f.space is None else isa.ADDR_BITS[f.space]
                assert f.width == want, (instr.name, f.name)
    assert isa.ADDR_BITS[Space.SRAM] == 32 and isa.ADDR_BITS[Space.FLASH] == 40


def test_vpu_and_csd_variants_differ_only_in_where_data_lives():
    for name in ("KVAPP", "ATTN"):
        vpu, csd = isa.BY_NAME[f"VPU.{name}"], isa.BY_NAME[f"CSD.{name}"]
        assert vpu.field_names == csd.field_names
        assert {f.space for f in csd.fields if f.kind is isa.Kind.ADDR} == {Space.CDRAM,
                                                                            Space.FLASH}


def test_group_size_zero_means_the_whole_row():
    assert isa.group_size(0, 96) == 96
    assert isa.group_size(5, 96) == 32


# ---- encode / decode ------------------------------------------------------------------------

@pytest.mark.parametrize("instr", isa.INSTRUCTIONS, ids=lambda i: i.name)
def test_every_instruction_round_trips_random_in_range_values(instr):
    rng = random.Random(instr.opcode)
    for _ in range(50):
        fields = random_fields(instr, rng)
        word = isa.encode(instr.name, **fields)
        assert len(word) == isa.WORD_BYTES and word[0] == instr.opcode
        assert isa.decode(word) == isa.Decoded(instr.name, fields)


def test_fields_are_packed_lsb_first_after_the_opcode():
    word = isa.encode("PUSH", dst=Engine.PIM)
    assert int.from_bytes(word, "little") == 0x02 | 4 << 8
    x = int.from_bytes(isa.encode("DMA.COPY", src_space=Space.HBM, src_addr=0xABCDE,
                                  dst_space=Space.FLASH, dst_addr=1, nbytes=0xFFFFFFFF), "little")
    assert x & 0xFF == 0x10
    assert (x >> 8) & 0x7 == Space.HBM
    assert (x >> 11) & (2**40 - 1) == 0xABCDE
    assert (x >> 51) & 0x7 == Space.FLASH
    assert (x >> 54) & (2**40 - 1) == 1
    assert x >> 94 == 0xFFFFFFFF


def test_gemm_encoding_is_pinned():
    word = isa.assemble(GEMM)[0]
    assert word.hex() == ("20" "0400" "0800" "1000" "00010000" "00020000" "00030000" "00040000"
                          "04" + "00" * 8)


def test_decoded_engine_and_space_fields_are_enums():
    assert isa.decode(isa.encode("POP", src=3)).fields["src"] is Engine.VPU
    copy = isa.encode("DMA.COPY", src_space=1, src_addr=0, dst_space=2, dst_addr=0, nbytes=4)
    assert isa.decode(copy).fields["dst_space"] is Space.SRAM


def test_defaults_fill_left_out_fields():
    fields = isa.decode(isa.encode("VPU.ATTN", m=1, seq=0, layer=0, q_heads=4, kv_heads=1,
                                   head_dim=64, q_addr=0, pos_addr=0, o_addr=0,
                                   kv_base=0, layers=2, ctx_log2=9, kv_bits=8)).fields
    assert (fields["splits"], fields["topk"], fields["kv_group_log2"]) == (1, 0, 0)


def test_encode_rejects_a_value_too_wide_for_its_field():
    with pytest.raises(IsaError, match=r"^field 'm' = 70000 does not fit 16 bits \(max 65535\)$"):
        isa.encode("VPU.ADD", m=70000, n=1, a_addr=0, b_addr=0, o_addr=0)


def test_encode_rejects_a_negative_value():
    with pytest.raises(IsaError, match=r"^field 'a_addr' = -4 is negative; fields are unsigned$"):
        isa.encode("VPU.ADD", m=1, n=1, a_addr=-4, b_addr=0, o_addr=0)


def test_encode_rejects_a_non_integer_value():
    with pytest.raises(TypeError, match=r"^field 'n' takes an int, got 2\.0$"):
        isa.encode("VPU.ADD", m=1, n=2.0, a_addr=0, b_addr=0, o_addr=0)


def test_encode_rejects_an_unknown_instruction_suggesting_the_closest():
    with pytest.raises(IsaError,
                       match=r"^unknown instruction 'VPU.ATN'; did you mean 'VPU.ATTN'\?$"):
        isa.encode("VPU.ATN")


def test_encode_accepts_numpy_integers():
    word = isa.encode("VPU.ADD", m=np.int64(2), n=np.uint16(3), a_addr=0, b_addr=0, o_addr=0)
    assert isa.decode(word).fields["n"] == 3


def test_decode_rejects_a_word_of_the_wrong_size():
    with pytest.raises(IsaError, match=r"^a word is 32 bytes, got 31$"):
        isa.decode(bytes(31))


def test_decode_rejects_set_reserved_bits():
    word = bytearray(isa.encode("HALT"))
    word[31] = 0x80
    with pytest.raises(IsaError, match=r"^HALT word has reserved bits set above bit 7$"):
        isa.decode(bytes(word))


def test_decode_rejects_an_engine_field_naming_no_stream():
    word = (0x02 | 7 << 8).to_bytes(32, "little")
    with pytest.raises(IsaError, match=r"^field 'dst' = 7 is not one of DMA, MXU, VPU, PIM, CSD$"):
        isa.decode(word)


# ---- whole streams --------------------------------------------------------------------------

def test_array_decoding_matches_word_decoding():
    words = every_instruction_words()
    cols = isa.decode_program_arrays(words)
    assert set(cols) == {"opcode", *isa.FIELD_NAMES}
    for i, word in enumerate(words):
        decoded = isa.decode(word)
        assert cols["opcode"][i] == word[0]
        for name in isa.FIELD_NAMES:
            assert cols[name][i] == decoded.fields.get(name, 0), (decoded.name, name)


def test_array_decoding_of_an_empty_stream_gives_empty_columns():
    cols = isa.decode_program_arrays([])
    assert cols["opcode"].shape == (0,) and cols["m"].dtype == np.int64


def test_array_decoding_accepts_a_blob_and_a_matrix():
    words = every_instruction_words(1)
    blob = b"".join(words)
    matrix = np.frombuffer(blob, np.uint8).reshape(-1, isa.WORD_BYTES)
    for source in (blob, matrix):
        cols = isa.decode_program_arrays(source)
        assert np.array_equal(cols["kv_base"], isa.decode_program_arrays(words)["kv_base"])


def test_array_decoding_names_the_first_bad_word():
    words = [isa.encode("NOP"), isa.encode("HALT"), bytes([0x2F]) + bytes(31),
             bytes([0x6F]) + bytes(31)]
    with pytest.raises(IsaError, match=r"^unknown opcode 0x2f at word 2 \(byte offset 0x40\)$"):
        isa.decode_program_arrays(words)


def test_array_decoding_rejects_a_value_outside_its_choices():
    word = bytearray(isa.assemble(GEMM)[0])
    word[23] = 5  # bits field at [187:184]: 4 -> 5
    with pytest.raises(IsaError, match=r"^field 'bits' = 5 is not one of 4, 8 at word 1 "
                                       r"\(byte offset 0x20\)$"):
        isa.decode_program_arrays([isa.encode("NOP"), bytes(word)])


def test_array_decoding_rejects_reserved_bits_in_any_limb():
    word = bytearray(isa.assemble(GEMM)[0])
    word[30] = 1
    with pytest.raises(IsaError, match=r"^MXU.GEMM word has reserved bits set above bit 195 "
                                       r"at word 0 \(byte offset 0x0\)$"):
        isa.decode_program_arrays([bytes(word)])


def test_a_list_holding_a_short_word_is_rejected_with_its_index():
    with pytest.raises(IsaError, match=r"^a word is 32 bytes, got 5 at word 1 "
                                       r"\(byte offset 0x20\)$"):
        isa.decode_program_arrays([isa.encode("NOP"), bytes(5)])


# ---- assembly text --------------------------------------------------------------------------

def test_disassembly_of_every_instruction_reassembles_to_the_same_words_and_text():
    words = every_instruction_words(2)
    text = isa.disassemble(words)
    assert len(text.splitlines()) == len(words)
    assert isa.assemble(text) == words
    assert isa.disassemble(isa.assemble(text)) == text


def test_canonical_text_writes_addresses_in_hex_enums_by_name_and_defaults_out():
    text = ("DMA.COPY src_space=HBM src_addr=0x1000 dst_space=SRAM dst_addr=0x0 nbytes=4096\n"
            "PUSH dst=MXU\n" + GEMM + "\nHALT\n")
    assert isa.disassemble(isa.assemble(text)) == text


def test_assembly_takes_comments_blank_lines_hex_and_any_field_order():
    text = ("# a comment line\n\n"
            "  MXU.GEMM bits=4 k=0x10 n=8\tm=4 a_addr=256 s_addr=512 w_addr=768 o_addr=0X400 # x\n"
            "\n")
    assert isa.disassemble(isa.assemble(text)) == GEMM + "\n"


def test_an_empty_program_assembles_to_no_words():
    assert isa.assemble("# nothing\n\n") == []
    assert isa.disassemble([]) == ""


@pytest.mark.parametrize("line, message", [
    ("MXU.GEM m=1", r"unknown instruction 'MXU.GEM'; did you mean 'MXU.GEMM'\?"),
    ("mxu.gemm m=1", r"unknown instruction 'mxu.gemm'; did you mean 'MXU.GEMM'\?"),
    ("FROB", r"unknown instruction 'FROB'; use one of NOP, HALT, PUSH, .*, CSD.ATTN"),
    (GEMM + " mm=3", r"MXU.GEMM has no field 'mm'; did you mean 'm'\?"),
    ("HALT now=1", r"HALT has no field 'now'; its fields are none"),
    ("MXU.GEMM m=1 n=1 a_addr=0 s_addr=0 w_addr=0 o_addr=0",
     r"MXU.GEMM is missing field\(s\) 'k', 'bits'"),
    (GEMM + " m=5", r"field 'm' is given twice"),
    (GEMM.replace("m=4", "m=70000"), r"field 'm' = 70000 does not fit 16 bits \(max 65535\)"),
    (GEMM.replace("m=4", "m=0"), r"field 'm' = 0 is below its minimum 1"),
    (GEMM.replace("bits=4", "bits=5"), r"field 'bits' = 5 is not one of 4, 8"),
    (GEMM.replace("m=4", "m=12a"), r"field 'm' = '12a' is not a number; write decimal \(42\) "
                                   r"or hex \(0x2a\)"),
    (GEMM.replace("m=4", "m=-1"), r"field 'm' = '-1' is not a number; .*"),
    (GEMM.replace("m=4", "m="), r"expected field=value, got 'm='"),
    (GEMM.replace("m=4", "m"), r"expected field=value, got 'm'"),
    ("PUSH dst=FPGA", r"field 'dst' = 'FPGA' names no engine; use one of DMA, MXU, VPU, PIM, "
                      r"CSD"),
    ("PUSH dst=CTRL", r"field 'dst' = CTRL is not one of DMA, MXU, VPU, PIM, CSD"),
    ("POP src=2", r"field 'src' = '2' names no engine; use one of .*"),
    ("DMA.COPY src_space=DISK src_addr=0 dst_space=HBM dst_addr=0 nbytes=1",
     r"field 'src_space' = 'DISK' names no space; use one of HOST, HBM, SRAM, .*"),
])
def test_assembly_errors_name_the_problem_and_the_line(line, message):
    with pytest.raises(IsaError, match=rf"^{message} at line 3$"):
        isa.assemble("NOP\n# comment\n" + line + "\nHALT\n")


def test_a_program_for_one_engine_may_hold_only_its_own_and_ctrl_instructions():
    assert len(isa.assemble("POP src=DMA\n" + GEMM + "\nPUSH dst=VPU\nHALT\n", "MXU")) == 4
    with pytest.raises(IsaError, match=r"^MXU.GEMM belongs to MXU; a VPU program holds "
                                       r"only VPU and CTRL instructions at line 2$"):
        isa.assemble("NOP\n" + GEMM, Engine.VPU)


def test_a_program_engine_must_own_a_stream():
    with pytest.raises(IsaError, match=r"^'ctrl' is not a stream engine; use one of DMA, MXU, "
                                       r"VPU, PIM, CSD$"):
        isa.assemble("NOP", "ctrl")


def test_disassembly_names_the_bad_word_and_its_offset():
    with pytest.raises(IsaError, match=r"^unknown opcode 0xff at word 1 \(byte offset 0x20\)$"):
        isa.disassemble([isa.encode("NOP"), b"\xff" * 32])
    with pytest.raises(IsaError, match=r"^truncated word: 3 of 32 bytes at word 1 "
                                       r"\(byte offset 0x20\)$"):
        isa.disassemble(bytes(35))


# ---- program files --------------------------------------------------------------------------

def vpu_words() -> list[bytes]:
    rng = random.Random(7)
    return [isa.encode(i.name, **random_fields(i, rng)) for i in isa.INSTRUCTIONS
            if i.engine in (Engine.CTRL, Engine.VPU)]


def test_program_bytes_round_trip_with_the_documented_header():
    words = vpu_words()
    data = isa.program_bytes("vpu", words)
    assert data[:16] == struct.pack("<4sHHII", b"TRIM", isa.ISA_VERSION, 3, len(words),
                                    zlib.crc32(b"".join(words)))
    assert isa.parse_program(data) == (Engine.VPU, words)


def test_program_files_round_trip(tmp_path):
    words = vpu_words()
    isa.write_program(tmp_path / "vpu.bin", Engine.VPU, words)
    engine, read = isa.read_program(tmp_path / "vpu.bin")
    assert engine is Engine.VPU and read == words


def test_an_empty_program_file_round_trips():
    assert isa.parse_program(isa.program_bytes(Engine.DMA, [])) == (Engine.DMA, [])


def test_program_bytes_rejects_another_engines_instruction():
    words = [isa.encode("NOP"), isa.assemble(GEMM)[0]]
    with pytest.raises(IsaError, match=r"^MXU.GEMM belongs to MXU; a PIM program holds "
                                       r"only PIM and CTRL instructions at word 1 "
                                       r"\(byte offset 0x20\)$"):
        isa.program_bytes(Engine.PIM, words)


def test_parse_program_rejects_another_engines_instruction_with_its_file_offset():
    body = isa.encode("HALT") + isa.assemble(GEMM)[0]
    with pytest.raises(IsaError, match=r"^MXU.GEMM belongs to MXU; a CSD program holds "
                                       r"only CSD and CTRL instructions at word 1 "
                                       r"\(byte offset 0x30\)$"):
        isa.parse_program(header(Engine.CSD, body) + body)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d[:10], r"truncated program: 10 bytes, shorter than the 16-byte header"),
    (lambda d: d[:-1], r"truncated program: the header says 2 words \(64 bytes\) but 63 bytes "
                       r"follow it at byte offset 0x10"),
    (lambda d: d + b"\0", r"trailing bytes: the header says 2 words \(64 bytes\) but 65 bytes "
                          r"follow it at byte offset 0x10"),
    (lambda d: b"ELF!" + d[4:], r"not a Trimem program: starts with b'ELF!', expected b'TRIM'"),
    (lambda d: d[:4] + struct.pack("<H", 99) + d[6:],
     r"program is ISA version 99 but this Trimem reads version 1; assemble or compile it again"),
    (lambda d: d[:6] + struct.pack("<H", 0) + d[8:],
     r"program header names engine id 0, which owns no stream; use one of DMA=1, MXU=2, VPU=3, "
     r"PIM=4, CSD=5"),
    (lambda d: d[:-1] + b"\x01",
     r"crc32 mismatch: the header says 0x[0-9a-f]{8} but the body has 0x[0-9a-f]{8}; "
     r"the file is corrupt"),
])
def test_parse_program_rejects_a_damaged_file(mutate, message):
    data = isa.program_bytes(Engine.MXU, [isa.assemble(GEMM)[0], isa.encode("HALT")])
    with pytest.raises(IsaError, match=rf"^{message}$"):
        isa.parse_program(mutate(data))


def test_parse_program_names_an_unknown_opcode_by_word_and_file_offset():
    body = isa.encode("NOP") * 2 + bytes([0x2A]) + bytes(31)
    with pytest.raises(IsaError, match=r"^unknown opcode 0x2a at word 2 \(byte offset 0x50\)$"):
        isa.parse_program(header(Engine.MXU, body) + body)


def test_read_program_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.bin"
    path.write_bytes(b"TRIM")
    with pytest.raises(IsaError, match=rf"^{re.escape(str(path))}: truncated program: 4 bytes, "
                                       r"shorter than the 16-byte header$"):
        isa.read_program(path)


# ---- generated docs -------------------------------------------------------------------------

def test_docs_isa_md_is_regenerated_from_the_table():
    text = (ROOT / "docs" / "isa.md").read_text(encoding="utf-8")
    assert text == gen_docs.isa_markdown(), "docs/isa.md is stale; run python -m trimem.gen_docs"


def test_docs_isa_md_says_it_is_generated_and_how_to_regenerate():
    first = gen_docs.isa_markdown().splitlines()[:3]
    assert first[0] == "AUTO-GENERATED — DO NOT EDIT."
    assert "trimem/isa.py" in first[1] and "python -m trimem.gen_docs" in first[2]


def test_docs_show_every_instruction_with_opcode_bits_semantics_and_timing():
    text = gen_docs.isa_markdown()
    for instr in isa.INSTRUCTIONS:
        section = text.split(f"### {instr.name}\n", 1)[1].split("\n### ", 1)[0]
        assert f"Opcode `{instr.opcode:#04x}`" in section
        for f, lo in instr.layout:
            assert f"| [{lo + f.width - 1}:{lo}] | `{f.name}` | {f.width} |" in section
        assert instr.doc in section and "docs/timing.md" in section


def test_gen_docs_writes_into_the_given_folder(tmp_path, capsys):
    assert gen_docs.main([str(tmp_path)]) == 0
    assert (tmp_path / "isa.md").read_text(encoding="utf-8") == gen_docs.isa_markdown()
    assert gen_docs.main([str(tmp_path / "missing")]) == 1
    assert "is not a directory" in capsys.readouterr().err


# ---- command line ---------------------------------------------------------------------------

def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="trimem")
    isacli.add_isa_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_asm_then_disasm_reproduces_the_program_file(tmp_path, capsys):
    source = tmp_path / "prog.s"
    source.write_text("# vpu\n" + isa.disassemble(vpu_words()))
    assert run_cli(["asm", str(source)]) == 0
    count = len(vpu_words())
    assert capsys.readouterr().out == f"wrote {tmp_path / 'prog.bin'}: {count} VPU instructions\n"
    assert run_cli(["disasm", str(tmp_path / "prog.bin")]) == 0
    listing = capsys.readouterr().out
    assert listing.startswith(f"# VPU program, {count} instructions, ISA version 1\n")
    again = tmp_path / "again.s"
    again.write_text(listing)
    assert run_cli(["asm", str(again), "-o", str(tmp_path / "again.bin")]) == 0
    assert (tmp_path / "again.bin").read_bytes() == (tmp_path / "prog.bin").read_bytes()


def test_asm_takes_the_engine_from_the_option_when_the_program_is_only_ctrl(tmp_path):
    source = tmp_path / "sync.s"
    source.write_text("POP src=MXU\nHALT\n")
    message = r": uses only CTRL instructions, so its engine is unclear; name it with --engine$"
    with pytest.raises(IsaError, match="^" + re.escape(str(source)) + message):
        run_cli(["asm", str(source)])
    assert run_cli(["asm", str(source), "--engine", "pim", "-o", str(tmp_path / "p.bin")]) == 0
    assert isa.read_program(tmp_path / "p.bin")[0] is Engine.PIM


def test_asm_rejects_a_file_mixing_engines(tmp_path):
    source = tmp_path / "mixed.s"
    source.write_text(GEMM + "\nVPU.ADD m=1 n=1 a_addr=0 b_addr=0 o_addr=0\n")
    with pytest.raises(IsaError, match=r"uses MXU and VPU instructions, so its engine is unclear"):
        run_cli(["asm", str(source)])


def test_asm_errors_name_the_file_and_line(tmp_path):
    source = tmp_path / "bad.s"
    source.write_text("NOP\nMXU.GEMM m=1\n")
    message = r": MXU.GEMM is missing field\(s\) 'n', 'k', .* at line 2$"
    with pytest.raises(IsaError, match="^" + re.escape(str(source)) + message):
        run_cli(["asm", str(source)])
    assert not (tmp_path / "bad.bin").exists()


def test_asm_refuses_to_overwrite_its_source(tmp_path):
    source = tmp_path / "prog.bin"
    source.write_text("HALT\n")
    with pytest.raises(IsaError, match=r"the output would overwrite the source; name another "
                                       r"file with -o$"):
        run_cli(["asm", str(source), "--engine", "DMA"])


def test_asm_rejects_an_unknown_engine_option(capsys):
    with pytest.raises(SystemExit) as exc:
        run_cli(["asm", "x.s", "--engine", "gpu"])
    assert exc.value.code == 2
    assert "invalid choice: 'GPU'" in capsys.readouterr().err


def test_disasm_of_a_missing_or_damaged_file_is_a_user_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        run_cli(["disasm", str(tmp_path / "none.bin")])
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"NOPE" + bytes(12))
    with pytest.raises(IsaError, match=rf"^{re.escape(str(bad))}: not a Trimem program"):
        run_cli(["disasm", str(bad)])
