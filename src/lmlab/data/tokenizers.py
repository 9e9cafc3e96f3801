"""Tokenizers behind one small interface: characters, or BPE through tiktoken.

A tokenizer's `state()` is plain data (lists, strings, numbers) so that a checkpoint
can carry it and be loaded with `torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import DTypeLike

from lmlab.errors import LmlabError

EOT = "<|endoftext|>"
# Encodings that are the same BPE under another name: `gpt2` downloads two extra files,
# `r50k_base` is the identical encoding from a single cached file (works offline).
ENCODING_ALIASES = {"gpt2": "r50k_base"}
# tiktoken's ranks are 32-bit and <|endoftext|> takes the rank after the largest one.
MAX_RANK = 2**32 - 2
RANKS_FILE_HELP = (
    "give a .tiktoken ranks file as tiktoken writes them: one 'base64-token rank' line per "
    "token, every token and every rank different, covering all 256 single bytes"
)
# ASCII digits only: int() would also take '+1', '1_000' and other scripts' digits.
_RANK_TEXT = re.compile(r"[0-9]+")


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
        self._decodable: set[int] | None = None  # ids with bytes, for decode() (gapped ranks)
        if ranks is not None:
            # tiktoken panics (a Rust panic, not an exception) on shared ranks, and on text
            # with a byte that has no token: both are refused here, before it sees them.
            _check_ranks(ranks, name)
            self.encoding = tiktoken.Encoding(
                name=Path(name).stem,
                pat_str=_GPT2_PATTERN,
                mergeable_ranks=ranks,
                # After the largest rank: len(ranks) would be a token's rank too when the
                # ranks are not 0..n-1.
                special_tokens={EOT: max(ranks.values()) + 1},
            )
        else:
            self.encoding = _load_encoding(ENCODING_ALIASES.get(name, name))
        if EOT not in self.encoding.special_tokens_set:
            raise LmlabError(f"encoding {name!r} has no {EOT} token to separate documents")

    @classmethod
    def from_ranks_file(cls, path: str | Path) -> TiktokenTokenizer:
        path = Path(path).expanduser()
        return cls(str(path), read_ranks_file(path))

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
        ids = [int(i) for i in ids]
        try:
            return self.encoding.decode(ids)
        except KeyError:
            # An id in a gap of a ranks file's numbering is in the vocabulary (the model has a
            # row for it, and may sample it) but stands for no bytes: shown as U+FFFD.
            if self._decodable is None:
                self._decodable = {self.boundary_id, *(self._ranks or {}).values()}
            unknown = "\ufffd".encode()
            pieces = [
                self.encoding.decode_single_token_bytes(i) if i in self._decodable else unknown
                for i in ids
            ]
            return b"".join(pieces).decode("utf-8", errors="replace")

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
        state: dict[str, Any] = {
            "kind": "tiktoken",
            "name": self.name,
            "ranks": [base64.b64encode(token).decode("ascii") for token, _ in by_rank],
        }
        values = [rank for _, rank in by_rank]
        if values[-1] != len(values) - 1:  # not 0..n-1: the ids must come back as they were
            state["rank_values"] = values
        return state


_GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)


def read_ranks_file(path: str | Path) -> dict[bytes, int]:
    """The ranks of a `.tiktoken` file (`base64-token rank` lines), read from the file itself
    on every call: tiktoken's loader copies a local file into TIKTOKEN_CACHE_DIR under the
    hash of its path, and goes on using that copy after the file is replaced. Anything that
    is not a complete ranks file is one LmlabError that names the line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LmlabError(f"tiktoken ranks file not found: {path} (check data.tokenizer)")

    def bad(number: int, problem: str) -> LmlabError:
        return LmlabError(
            f"{path} is not a tiktoken ranks file: line {number} {problem}; {RANKS_FILE_HELP}"
        )

    ranks: dict[bytes, int] = {}
    token_lines: dict[bytes, int] = {}
    rank_lines: dict[int, int] = {}
    try:
        with path.open("rb") as file:
            for number, raw in enumerate(file, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise bad(number, "is not UTF-8 text") from None
                if number == 1:
                    line = line.removeprefix("\ufeff")  # the byte-order mark of some editors
                fields = line.split()
                if not fields:
                    continue
                if len(fields) != 2:
                    count = f"{len(fields)} field{'s' if len(fields) > 1 else ''}"
                    raise bad(number, f"has {count}, not 2: {_shown(line.strip())}")
                token_text, rank_text = fields
                try:
                    token = base64.b64decode(token_text, validate=True)
                except (binascii.Error, ValueError):
                    raise bad(number, f"token {_shown(token_text)} is not base64") from None
                if not _RANK_TEXT.fullmatch(rank_text):
                    raise bad(number, f"rank {_shown(rank_text)} is not a whole number")
                # the length first: int() refuses strings of thousands of digits
                if len(rank_text) > len(str(MAX_RANK)) or int(rank_text) > MAX_RANK:
                    problem = f"is above {MAX_RANK}, the largest tiktoken takes"
                    raise bad(number, f"rank {_shown(rank_text)} {problem}")
                rank = int(rank_text)
                if token in token_lines:
                    raise bad(number, f"token {token_text} is also on line {token_lines[token]}")
                if rank in rank_lines:
                    raise bad(number, f"rank {rank} is also on line {rank_lines[rank]}")
                ranks[token] = rank
                token_lines[token] = rank_lines[rank] = number
    except OSError as err:
        raise LmlabError(f"cannot read the tiktoken ranks file {path}: {err}") from None
    if not ranks:
        raise LmlabError(
            f"{path} is not a tiktoken ranks file: it has no tokens; {RANKS_FILE_HELP}"
        )
    missing = _missing_bytes(ranks)
    if missing:
        raise LmlabError(
            f"{path} is not a complete tiktoken ranks file: {_bytes_shown(missing)} of the 256 "
            f"single bytes have no token, so text with them could not be encoded; "
            f"{RANKS_FILE_HELP}"
        )
    return ranks


def _check_ranks(ranks: dict[bytes, int], name: str) -> None:
    """What tiktoken needs of ranks from any source (a file, a checkpoint's state)."""
    problems = []
    if len(set(ranks.values())) != len(ranks):
        problems.append("two tokens share a rank")
    if ranks and not 0 <= min(ranks.values()) <= max(ranks.values()) <= MAX_RANK:
        problems.append(f"a rank is outside 0..{MAX_RANK}")
    missing = _missing_bytes(ranks)
    if missing:
        problems.append(f"{_bytes_shown(missing)} of the 256 single bytes have no token")
    if problems:
        raise LmlabError(f"the BPE ranks of {name} are not usable: {'; '.join(problems)}")


def _missing_bytes(ranks: dict[bytes, int]) -> list[int]:
    return [b for b in range(256) if bytes([b]) not in ranks]


def _bytes_shown(missing: list[int]) -> str:
    shown = ", ".join(f"0x{b:02x}" for b in missing[:8])
    return f"{len(missing)} ({shown}{', ...' if len(missing) > 8 else ''})"


def _shown(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _load_encoding(name: str):
    import tiktoken

    try:
        return tiktoken.get_encoding(name)
    except Exception as err:  # tiktoken raises ValueError, OSError or requests errors
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
            # Checkpoints of ranks that are 0..n-1 store only the tokens, in rank order.
            values = state.get("rank_values") or range(len(state["ranks"]))
            tokens = [base64.b64decode(tok) for tok in state["ranks"]]
            return TiktokenTokenizer(state["name"], dict(zip(tokens, values, strict=True)))
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
