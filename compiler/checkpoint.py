"""GGUF checkpoints read with numpy: metadata, float weights and the tokenizer.

A GGUF file (github.com/ggml-org/ggml, docs/gguf.md) is a little-endian header (magic, version,
tensor and key counts), key/value metadata, one descriptor per tensor (name, dims, ggml type,
offset) and then the tensor data, aligned to `general.alignment`. Parsing the header here takes
milliseconds where `gguf.GGUFReader` builds a numpy view per token string; the tensors are
dequantized by the `gguf` package's numpy kernels, the ones transformers' GGUF loader uses, so
the weights are the same floats without building a transformers model.
"""
from __future__ import annotations

import functools
import mmap
import os
import struct
from dataclasses import dataclass

import numpy as np

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
STRING, ARRAY = 8, 9
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
           11: "<q", 12: "<d"}
"""struct formats of the GGUF scalar value types by type id (8 is a string, 9 an array)."""
BYTE_LEVEL_PRES = ("default", "gpt2", "smollm")
"""`tokenizer.ggml.pre` values that split text as GPT-2's byte-level pre-tokenizer does."""
CONTROL, USER_DEFINED = 3, 4
"""`tokenizer.ggml.token_type` of special tokens and of added plain tokens (llama.cpp)."""


class GgufError(ValueError):
    """A file that is not a GGUF checkpoint this reader understands."""


class _Cursor:
    """Reads GGUF values from a buffer, front to back."""

    def __init__(self, buf, path: str):
        self.buf, self.pos, self.path = buf, 0, path

    def scalar(self, fmt: str):
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        size = self.scalar("<Q")
        text = self.buf[self.pos:self.pos + size].decode("utf-8", errors="replace")
        self.pos += size
        return text

    def value(self, kind: int):
        if kind == STRING:
            return self.string()
        if kind == ARRAY:
            inner, count = self.scalar("<I"), self.scalar("<Q")
            if inner in SCALARS:
                items = np.frombuffer(self.buf, np.dtype(SCALARS[inner]), count, self.pos)
                self.pos += items.nbytes
                return items.tolist()
            return [self.value(inner) for _ in range(count)]
        if kind not in SCALARS:
            raise GgufError(f"{self.path}: metadata value type {kind!r} at byte {self.pos} is "
                            f"not a GGUF type; the file is damaged or not GGUF")
        return self.scalar(SCALARS[kind])


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's data lies: ggml type, numpy shape (GGUF dims reversed), byte range."""
    name: str
    ggml_type: int
    shape: tuple
    offset: int
    nbytes: int


@dataclass(frozen=True, eq=False)
class Gguf:
    """A parsed GGUF file: its metadata and tensor descriptors over a read-only mapping."""
    path: str
    meta: dict
    tensors: dict
    data: mmap.mmap

    def array(self, name: str) -> np.ndarray:
        """Tensor `name` as float32, dequantized, in the numpy (row-major) shape."""
        import gguf

        info = self.tensors[name]
        qtype = gguf.GGMLQuantizationType(info.ggml_type)
        raw = np.frombuffer(self.data, np.uint8, info.nbytes, info.offset)
        rows = int(np.prod(info.shape[:-1], dtype=np.int64))
        values = gguf.quants.dequantize(raw.reshape(rows, -1), qtype)
        return np.asarray(values, np.float32).reshape(info.shape)


def _tensor_bytes(path: str, name: str, ggml_type: int, shape: tuple) -> int:
    import gguf

    try:
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    except (KeyError, ValueError) as err:
        raise GgufError(f"{path}: tensor {name!r} has ggml type {ggml_type!r}, which the gguf "
                        f"package cannot dequantize; convert the file to a listed type") from err
    count = int(np.prod(shape, dtype=np.int64))
    if shape[-1] % block:
        raise GgufError(f"{path}: tensor {name!r} rows of {shape[-1]} are not whole blocks of "
                        f"{block}; the file is damaged")
    return count // block * size


@functools.lru_cache(maxsize=4)
def read(path) -> Gguf:
    """Parse the GGUF file at `path` (cached per path); tensors stay on disk until `array`."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    cur = _Cursor(data, path)
    if data[:4] != MAGIC:
        raise GgufError(f"{path} does not start with the GGUF magic {MAGIC!r}; pass a .gguf "
                        f"checkpoint")
    cur.pos = 4
    version = cur.scalar("<I")
    if version not in VERSIONS:
        raise GgufError(f"{path}: GGUF version {version!r} is not one of {VERSIONS!r}; "
                        f"re-convert it with a current llama.cpp")
    n_tensors, n_keys = cur.scalar("<Q"), cur.scalar("<Q")
    meta = {}
    for _ in range(n_keys):
        key = cur.string()
        meta[key] = cur.value(cur.scalar("<I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = [cur.scalar("<Q") for _ in range(cur.scalar("<I"))]
        infos.append((name, cur.scalar("<I"), tuple(reversed(dims)), cur.scalar("<Q")))
    align = meta.get("general.alignment", DEFAULT_ALIGNMENT)
    start = -(-cur.pos // align) * align
    tensors = {}
    for name, ggml_type, shape, offset in infos:
        nbytes = _tensor_bytes(path, name, ggml_type, shape)
        if start + offset + nbytes > len(data):
            raise GgufError(f"{path}: tensor {name!r} runs past the end of the file; the file "
                            f"is truncated")
        tensors[name] = TensorInfo(name, ggml_type, shape, start + offset, nbytes)
    return Gguf(path, meta, tensors, data)


# ---- tokenizer -----------------------------------------------------------------------------

def byte_alphabet() -> dict:
    """GPT-2's byte -> character map: printable Latin-1 bytes stand for themselves, the others
    for the characters from U+0100 on, in byte order (Radford et al., 2019, `encoder.py`)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    shifted = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(shifted)}}


@functools.lru_cache(maxsize=4)
def tokenizer(path):
    """A `tokenizers.Tokenizer` for the byte-level BPE vocabulary stored in the GGUF file, or
    None when its vocabulary is of another kind (`tokenizer.ggml.model` not "gpt2", or a
    pre-tokenizer not in BYTE_LEVEL_PRES).

    It is built as transformers builds one from a GGUF (BPE over the tokens and merges, GPT-2's
    byte-level split, control tokens special and user-defined ones added), without loading the
    GGUF a second time through transformers.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    meta = read(path).meta
    if meta.get("tokenizer.ggml.model") != "gpt2" or \
            meta.get("tokenizer.ggml.pre", "default") not in BYTE_LEVEL_PRES:
        return None
    alphabet = byte_alphabet()
    chars = set(alphabet.values())
    tokens = meta["tokenizer.ggml.tokens"]
    vocab = {t if set(t) <= chars else "".join(alphabet[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None,
                               continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or [0] * len(tokens)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, kind in zip(tokens, types)
                            if kind == CONTROL and set(t) <= chars])
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, kind in zip(tokens, types) if kind == USER_DEFINED and t in vocab])
    return tok
