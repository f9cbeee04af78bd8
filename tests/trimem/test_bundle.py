"""The bundle format: writing, reading, verification and refusal to clobber user files."""
import numpy as np
import pytest
import yaml

from trimem import bundle, isa
from trimem.bundle import Bundle, BundleError, Entry, MemoryImage, TensorSpec

pytestmark = pytest.mark.unit


def make_bundle():
    words = [isa.encode("NOP"), isa.encode("HALT")]
    entry = Entry("decode", "decode", {"mxu": words, "dma": [isa.encode("HALT")]},
                  inputs=[TensorSpec("ids", "HOST", 0, "int32", (1,))],
                  outputs=[TensorSpec("logits", "HOST", 64, "int32", (1, 8))], meta={"ctx": 16})
    image = MemoryImage("hbm_weights", "HBM", 0x1000, np.arange(100, dtype=np.uint8),
                        {"channel": 0})
    tests = {"decode": {"inputs": {"ids": np.array([3], np.int32)},
                        "expected": {"logits": np.arange(8, dtype=np.int32)[None]}}}
    return Bundle({"name": "tiny"}, {"preset": "trimem-small"}, {"weights": 4},
                  {"decode": entry}, [image], tests)


def test_bundle_round_trips_programs_images_and_test_vectors(tmp_path):
    out = bundle.write_bundle(make_bundle(), tmp_path / "b")
    back = bundle.read_bundle(out)
    assert back.entry("decode").programs["mxu"] == make_bundle().entries["decode"].programs["mxu"]
    assert back.entry("decode").inputs[0] == TensorSpec("ids", "HOST", 0, "int32", (1,))
    assert back.entry("decode").meta == {"ctx": 16}
    assert np.array_equal(back.images[0].data, np.arange(100, dtype=np.uint8))
    assert back.images[0].location == {"channel": 0}
    assert np.array_equal(back.tests["decode"]["expected"]["logits"], np.arange(8)[None])
    manifest = yaml.safe_load((out / "manifest.yaml").read_text())
    assert manifest["byte_order"] == "little"
    assert len(manifest["images"][0]["sha256"]) == 64


def test_readmemh_writes_little_endian_words_one_per_line():
    text = bundle.readmemh(np.arange(1, 6, dtype=np.uint8), 4)
    assert text == b"04030201\n00000005\n"


def test_image_hex_file_holds_the_image_bytes(tmp_path):
    out = bundle.write_bundle(make_bundle(), tmp_path / "b", hex_width=4)
    lines = (out / "images/hbm_weights.hex").read_text().split()
    assert lines[0] == "03020100" and len(lines) == 25


def test_large_bundles_carry_no_hex_images(tmp_path, monkeypatch):
    monkeypatch.setattr(bundle, "HEX_LIMIT_BYTES", 99)
    out = bundle.write_bundle(make_bundle(), tmp_path / "b")
    assert not (out / "images/hbm_weights.hex").exists()
    assert "hex" not in yaml.safe_load((out / "manifest.yaml").read_text())["images"][0]


def test_program_hex_has_one_instruction_word_per_line(tmp_path):
    out = bundle.write_bundle(make_bundle(), tmp_path / "b")
    lines = (out / "programs/decode/mxu.hex").read_text().split()
    assert len(lines) == 2 and all(len(x) == 2 * isa.WORD_BYTES for x in lines)


def test_reading_reports_every_missing_and_corrupt_file(tmp_path):
    out = bundle.write_bundle(make_bundle(), tmp_path / "b")
    (out / "images/hbm_weights.bin").write_bytes(b"\x00" * 100)
    (out / "programs/decode/dma.bin").unlink()
    with pytest.raises(BundleError, match=r"(?s)^bundle .* has 2 problem\(s\):.*"
                       r"missing file programs/decode/dma.bin.*"
                       r"corrupt file images/hbm_weights.bin"):
        bundle.read_bundle(out)


def test_reading_a_directory_without_manifest_says_how_to_make_one(tmp_path):
    with pytest.raises(BundleError, match=r"^.* is not a bundle: .*manifest.yaml is missing "
                                          r"\(create one with `trimem compile"):
        bundle.read_bundle(tmp_path)


def test_reading_a_bundle_of_another_version_asks_for_a_recompile(tmp_path):
    out = bundle.write_bundle(make_bundle(), tmp_path / "b")
    manifest = yaml.safe_load((out / "manifest.yaml").read_text())
    manifest["version"] = 99
    (out / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    with pytest.raises(BundleError, match=r"bundle format 99 .*recompile the model$"):
        bundle.read_bundle(out)


def test_writing_into_a_non_empty_non_bundle_directory_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(BundleError, match=r"is not empty and holds no bundle.*--force"):
        bundle.write_bundle(make_bundle(), tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    bundle.write_bundle(make_bundle(), tmp_path, force=True)
    assert bundle.is_bundle(tmp_path)


def test_rewriting_an_existing_bundle_is_allowed(tmp_path):
    bundle.write_bundle(make_bundle(), tmp_path / "b")
    bundle.write_bundle(make_bundle(), tmp_path / "b")
    assert bundle.read_bundle(tmp_path / "b").entry("decode").kind == "decode"


def test_unknown_memory_space_is_rejected_with_the_valid_ones():
    with pytest.raises(BundleError, match=r"^image 'x': unknown memory space 'DDR'; use one of HOST"):
        MemoryImage("x", "DDR", 0, np.zeros(1, np.uint8))


def test_asking_for_a_missing_entry_lists_the_entries():
    with pytest.raises(BundleError, match=r"^bundle has no entry 'prefill'; it has decode$"):
        make_bundle().entry("prefill")
