"""GGUF checkpoints read with numpy: the reader, lowering without transformers, the tokenizer."""
import numpy as np
import pytest

from trimem.compiler import checkpoint, frontend
from trimem.compiler.ir import CompileError
from trimem.compiler.reference import float_forward

pytestmark = pytest.mark.unit

HF_TO_GGUF = {"attn_norm": "attn_norm", "mlp_norm": "ffn_norm", "attn.q": "attn_q",
              "attn.k": "attn_k", "attn.v": "attn_v", "attn.o": "attn_output",
              "mlp.gate": "ffn_gate", "mlp.up": "ffn_up", "mlp.down": "ffn_down"}


def permute_rope_rows(w, heads):
    """llama.cpp's q/k row order: each head's two rotated halves interleaved row by row."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, graph, *, extra=None):
    """The float graph as an F32 llama GGUF, the way llama.cpp's converter lays it out."""
    import gguf

    s = graph.spec
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(s.layers)
    writer.add_context_length(s.max_ctx)
    writer.add_embedding_length(s.hidden)
    writer.add_feed_forward_length(s.intermediate)
    writer.add_head_count(s.heads)
    writer.add_head_count_kv(s.kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(s.rms_eps)
    writer.add_vocab_size(s.vocab)
    tensors = {"token_embd.weight": graph.weights["embed"],
               "output_norm.weight": graph.weights["norm"],
               "output.weight": graph.weights["lm_head"], **(extra or {})}
    for i in range(s.layers):
        for ir, name in HF_TO_GGUF.items():
            w = np.asarray(graph.weights[f"layers.{i}.{ir}"])
            if ir in ("attn.q", "attn.k"):
                w = permute_rope_rows(w, s.heads if ir == "attn.q" else s.kv_heads)
            tensors[f"blk.{i}.{name}.weight"] = w
    for name, w in tensors.items():
        writer.add_tensor(name, np.ascontiguousarray(w, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_gguf_of_the_tiny_llama_lowers_to_the_same_weights_and_function(tiny_llama, tmp_path):
    want = frontend.from_hf(tiny_llama)
    got = frontend.from_gguf(write_gguf(tmp_path / "tiny.gguf", want))
    assert got.spec.layers == 2 and not got.spec.tied_embeddings
    assert (got.spec.heads, got.spec.kv_heads, got.spec.vocab) == (4, 2, 256)
    assert set(got.weights) == set(want.weights)
    for name, w in want.weights.items():
        np.testing.assert_array_equal(got.weights[name], w, err_msg=name)
    assert got.spec.rms_eps == float(np.float32(want.spec.rms_eps))
    ids = [3, 17, 200, 5]
    np.testing.assert_allclose(float_forward(got, ids)[0], float_forward(want, ids)[0],
                               rtol=1e-6, atol=1e-9)
    assert got.meta["gguf"] == str(tmp_path / "tiny.gguf")


def test_unpermuting_inverts_llama_cpp_row_order():
    w = np.arange(2 * 8 * 3).reshape(16, 3)
    np.testing.assert_array_equal(frontend.unpermute_rope_rows(permute_rope_rows(w, 2), 2), w)
    assert frontend.unpermute_rope_rows(w, 2)[:4, 0].tolist() == [0, 6, 12, 18]


def test_a_gguf_tensor_outside_llama_is_rejected_with_its_name(tiny_llama, tmp_path):
    graph = frontend.from_hf(tiny_llama)
    path = write_gguf(tmp_path / "odd.gguf", graph,
                      extra={"blk.1.attn_q_norm.weight": np.ones(16, np.float32)})
    with pytest.raises(CompileError, match=r"^op 'layers\.1' \(layer 1\): GGUF tensor "
                                           r"'blk\.1\.attn_q_norm\.weight' is not supported"):
        frontend.from_gguf(path)


def test_a_file_that_is_not_gguf_is_rejected(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(CompileError, match=r"^cannot read GGUF '.*model\.gguf': .* does not "
                                           r"start with the GGUF magic b'GGUF'"):
        frontend.from_gguf(path)


def test_a_truncated_gguf_is_rejected(tiny_llama, tmp_path):
    path = write_gguf(tmp_path / "cut.gguf", frontend.from_hf(tiny_llama))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CompileError, match=r"runs past the end of the file; the file is "
                                           r"truncated$"):
        frontend.from_gguf(path)


def test_the_byte_alphabet_maps_all_256_bytes_to_distinct_characters():
    alphabet = checkpoint.byte_alphabet()
    assert sorted(alphabet) == list(range(256)) and len(set(alphabet.values())) == 256
    assert alphabet[ord("A")] == "A" and alphabet[ord(" ")] == "\u0120"


# ---- the real SmolLM2-135M -----------------------------------------------------------------

@pytest.mark.e2e
def test_smollm2_tokenizer_from_the_gguf_matches_transformers():
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (convert_gguf_tokenizer,
                                                                       get_gguf_tokenizer)

    path = frontend.smollm2_gguf()
    want, _ = convert_gguf_tokenizer(*get_gguf_tokenizer(path)[:2])
    got = checkpoint.tokenizer(path)
    for text in ("Rivers shape the land they cross.", "Hello <|im_start|> 12345 world!\n\n x",
                 "naïve café — 3.14159, ½ déjà vu"):
        assert got.encode(text).ids == want.encode(text).ids, text


@pytest.mark.slow
@pytest.mark.e2e
def test_smollm2_read_with_numpy_equals_the_transformers_weights(smollm2_graph):
    got = frontend.from_gguf(frontend.smollm2_gguf())
    assert got.spec.tied_embeddings and got.weights["lm_head"] is got.weights["embed"]
    assert set(got.weights) == set(smollm2_graph.weights)
    for name, w in smollm2_graph.weights.items():
        np.testing.assert_array_equal(got.weights[name], w, err_msg=name)
