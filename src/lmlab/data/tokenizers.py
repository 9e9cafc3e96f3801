"""Tokenizers behind one small interface: characters, or BPE through tiktoken.

A tokenizer's `state()` is plain data (lists, strings, numbers) so that a checkpoint
can carry it and be loaded with `torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import DTypeLike

from lmlab.errors import LmlabError

EOT = "<|endoftext|>"
# Encodings that are the same BPE under another name: `gpt2` downloads two extra files,
# `r50k_base` is the identical encoding from a single cached file (works offline).
ENCODING_ALIASES = {"gpt2": "r50k_base"}


class Tokenizer(Protocol):
    name: str
    boundary: str  # joins documents into one stream

    @property
    def vocab_size(self) -> int: ...

    @property
    def boundary_id(self) -> int: ...

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids: list[int] | np.ndarray) -> str: ...

    def state(self) -> dict[str, Any]: ...


class CharTokenizer:
    """The vocabulary is the sorted set of distinct characters; ids index into it."""

    boundary = "\n"

    def __init__(self, chars: list[str]):
        if not chars:
            raise LmlabError("a character vocabulary needs at least one character")
        self.name = "char"
        self.itos: list[str] = list(chars)
        self.stoi: dict[str, int] = {c: i for i, c in enumerate(self.itos)}
        codepoints = np.array([ord(c) for c in self.itos], dtype=np.int64)
        if np.any(np.diff(codepoints) <= 0):
            raise LmlabError("character vocabulary must be sorted and without repeats")
        # A table from code point to id lets encode() look every character up in one gather
        # (O(n), unlike a search); its last entry, -1, stands for every code point above.
        self._table = np.full(int(codepoints[-1]) + 2, -1, dtype=np.int32)
        self._table[codepoints] = np.arange(len(codepoints), dtype=np.int32)
        # Latin-1 text with at most 255 characters (English): bytes.translate, ~10x faster;
        # 255 marks a character outside the vocabulary.
        self._bytes_table: bytes | None = None
        if codepoints[-1] < 256 and len(codepoints) < 255:
            table = np.full(256, 255, dtype=np.uint8)
            table[codepoints] = np.arange(len(codepoints))
            self._bytes_table = table.tobytes()

    @classmethod
    def fit(cls, text: str) -> CharTokenizer:
        return cls.from_codepoints(np.unique(text_codepoints(text)))

    @classmethod
    def from_codepoints(cls, codepoints: np.ndarray) -> CharTokenizer:
        """The vocabulary of the distinct code points seen (sorted), plus the boundary."""
        chars = {chr(c) for c in np.unique(codepoints).tolist()}
        chars.add(cls.boundary)  # documents are joined with it, so it must be encodable
        return cls(sorted(chars))

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    @property
    def boundary_id(self) -> int:
        return self.stoi[self.boundary]

    def encode(self, text: str, dtype: DTypeLike = np.int64) -> np.ndarray:
        if self._bytes_table is not None and text.isascii():
            ids = np.frombuffer(text.encode("ascii").translate(self._bytes_table), np.uint8)
            if not (ids == 255).any():
                return ids.astype(dtype)
        codepoints = text_codepoints(text).astype(np.uint32, copy=False)
        ids = self._table[np.minimum(codepoints, len(self._table) - 1)]
        unknown = ids < 0
        if unknown.any():
            missing = sorted({chr(c) for c in codepoints[unknown].tolist()})
            shown = ", ".join(repr(c) for c in missing[:20])
            more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
            raise LmlabError(
                f"text has {len(missing)} character(s) outside the vocabulary: {shown}{more}; "
                "use only characters of the training corpus"
            )
        return ids.astype(dtype)

    def decode(self, ids: list[int] | np.ndarray) -> str:
        return "".join(self.itos[int(i)] for i in ids)

    def state(self) -> dict[str, Any]:
        return {"kind": "char", "chars": self.itos}


class TiktokenTokenizer:
    """GPT-2 style BPE from tiktoken: an encoding name or a local `.tiktoken` ranks file."""

    boundary = EOT

    def __init__(self, name: str, ranks: dict[bytes, int] | None = None):
        import tiktoken

        self.name = name
        self._ranks = ranks
        if ranks is not None:
            r50k = _load_encoding("r50k_base", quiet=True)
            pat_str = r50k._pat_str if r50k is not None else _GPT2_PATTERN
            self.encoding = tiktoken.Encoding(
                name=Path(name).stem,
                pat_str=pat_str,
                mergeable_ranks=ranks,
                special_tokens={EOT: len(ranks)},
            )
        else:
            self.encoding = _load_encoding(ENCODING_ALIASES.get(name, name))
        if EOT not in self.encoding.special_tokens_set:
            raise LmlabError(f"encoding {name!r} has no {EOT} token to separate documents")

    @classmethod
    def from_ranks_file(cls, path: str | Path) -> TiktokenTokenizer:
        from tiktoken.load import load_tiktoken_bpe

        path = Path(path).expanduser()
        if not path.is_file():
            raise LmlabError(f"tiktoken ranks file not found: {path} (check data.tokenizer)")
        return cls(str(path), load_tiktoken_bpe(str(path)))

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    @property
    def boundary_id(self) -> int:
        return self.encoding.eot_token

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.encoding.encode(text, allowed_special={EOT}), dtype=np.int64)

    def encode_documents(self, documents: list[str]) -> np.ndarray:
        """Encode documents on several threads and join them with the boundary token."""
        pieces = self.encoding.encode_ordinary_batch(documents, num_threads=os.cpu_count() or 1)
        out: list[int] = []
        for i, piece in enumerate(pieces):
            if i:
                out.append(self.boundary_id)
            out.extend(piece)
        return np.asarray(out, dtype=np.int64)

    def decode(self, ids: list[int] | np.ndarray) -> str:
        return self.encoding.decode([int(i) for i in ids])

    def count_characters(self, ids: np.ndarray, piece: int = 1 << 20) -> int:
        """len(decode(ids)) without building the text: UTF-8 bytes that start a character."""
        count = 0
        for start in range(0, len(ids), piece):
            data = self.encoding.decode_bytes(ids[start : start + piece].tolist())
            count += int(np.count_nonzero(np.frombuffer(data, np.uint8) & 0xC0 != 0x80))
        return count

    def state(self) -> dict[str, Any]:
        if self._ranks is None:
            return {"kind": "tiktoken", "name": self.name}
        by_rank = sorted(self._ranks.items(), key=lambda item: item[1])
        return {
            "kind": "tiktoken",
            "name": self.name,
            "ranks": [base64.b64encode(token).decode("ascii") for token, _ in by_rank],
        }


_GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)


def _load_encoding(name: str, quiet: bool = False):
    import tiktoken

    try:
        return tiktoken.get_encoding(name)
    except Exception as err:  # tiktoken raises ValueError, OSError or requests errors
        if quiet:
            return None
        cache = os.environ.get("TIKTOKEN_CACHE_DIR", "<unset>")
        if name not in tiktoken.list_encoding_names():
            raise LmlabError(
                f"unknown tiktoken encoding {name!r}; known encodings are "
                f"{sorted({*tiktoken.list_encoding_names(), *ENCODING_ALIASES})}, found in "
                f"TIKTOKEN_CACHE_DIR (now {cache}) or downloaded once; "
                "or set data.tokenizer to a local .tiktoken ranks file"
            ) from err
        # The download error of an offline machine is pages long: its first line will do.
        reason = f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
        raise LmlabError(
            f"cannot load the tiktoken encoding {name!r}: its BPE file is not in "
            f"TIKTOKEN_CACHE_DIR (now {cache}) and could not be downloaded ({reason}). "
            "To work offline, set TIKTOKEN_CACHE_DIR to a directory that holds the cached "
            "encoding file (tiktoken names it by the SHA-1 of its URL; copy it from a machine "
            "that has it), or set data.tokenizer to a local .tiktoken ranks file (or to char)"
        ) from err


def build_tokenizer(spec: str, corpus_text: str | None = None) -> Tokenizer:
    """`char` (fitted on the corpus), a tiktoken encoding name, or a `.tiktoken` ranks file."""
    if spec == "char":
        if corpus_text is None:
            raise LmlabError("a char tokenizer is fitted on a corpus; none was given")
        return CharTokenizer.fit(corpus_text)
    if spec.endswith(".tiktoken") or os.sep in spec:
        return TiktokenTokenizer.from_ranks_file(spec)
    return TiktokenTokenizer(spec)


def tokenizer_from_state(state: dict[str, Any]) -> Tokenizer:
    kind = state.get("kind")
    if kind == "char":
        return CharTokenizer(list(state["chars"]))
    if kind == "tiktoken":
        if "ranks" in state:
            ranks = {base64.b64decode(tok): i for i, tok in enumerate(state["ranks"])}
            return TiktokenTokenizer(state["name"], ranks)
        return TiktokenTokenizer(state["name"])
    raise LmlabError(f"unknown tokenizer kind {kind!r} in checkpoint")


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer that holds every id: one byte a token for most character
    vocabularies, two for GPT-2's BPE. The stream is memory-mapped, and the pages a run
    touches count in its memory: a 1 GB English corpus maps 1 GB, not 2 (or 8 as int64)."""
    if vocab_size <= 1 << 8:
        return np.dtype(np.uint8)
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def text_codepoints(text: str) -> np.ndarray:
    if text.isascii():  # a flag of the string: free to ask, and a 4x smaller array
        return np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
