"""Tokenizers behind one small interface, `Tokenizer` (a new kind is one class here):
characters, regex words with `<|unk|>`, or BPE through tiktoken. `state()` is plain data
(lists, strings, numbers): a checkpoint carries it and loads with
`torch.load(..., weights_only=True)`."""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import DTypeLike

from lmlab.errors import LmlabError

EOT = "<|endoftext|>"
UNK = "<|unk|>"  # the word tokenizer's token for every word outside its vocabulary
# one BPE, two names: `gpt2` downloads two extra files, `r50k_base` is one cached file
ENCODING_ALIASES = {"gpt2": "r50k_base"}
# tiktoken's ranks are 32-bit and <|endoftext|> takes the rank after the largest one.
MAX_RANK = 2**32 - 2
RANKS_FILE_HELP = (
    "give a .tiktoken ranks file as tiktoken writes them: one 'base64-token rank' line per "
    "token, every token and every rank different, covering all 256 single bytes"
)
_GPT2_RE = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
_RANK_TEXT = re.compile(r"[0-9]+")  # int() would also take '+1', '1_000' and other digits
# SimpleTokenizerV2's split (Raschka, "Build a Large Language Model", ch. 2): punctuation,
# double dashes and whitespace are cut off as pieces of their own; whitespace is then dropped.
_WORD_SPLIT = re.compile(r"""([,.:;?_!"()']|--|\s)""")
# ... and its decoding: words joined by spaces, then the space before punctuation taken out
_BEFORE_PUNCTUATION = re.compile(r"""\s+([,.:;?!"()'])""")


class Tokenizer(Protocol):
    """What the data path asks of a tokenizer."""

    piece_bytes: int  # text per piece when a file is tokenized piece by piece

    @property
    def vocab_size(self) -> int: ...
    @property
    def boundary_id(self) -> int: ...  # the token that joins documents into one stream
    def encode(self, text: str) -> np.ndarray: ...
    # the documents' ids joined with the boundary token, and each document's length in tokens
    def encode_documents(self, documents: list[str]) -> tuple[np.ndarray, np.ndarray]: ...
    # the ids of each piece of one text (no boundaries), in order
    def encode_pieces(self, pieces: Iterable[str], dtype: DTypeLike) -> Iterator[np.ndarray]: ...
    def unknown_characters(self, text: str) -> dict[str, int]: ...  # with their counts
    def decode(self, ids: list[int] | np.ndarray) -> str: ...
    def state(self) -> dict[str, Any]: ...  # plain data, for a checkpoint


def document_views(ids: np.ndarray, lengths: np.ndarray, start: int = 0) -> list[np.ndarray]:
    """Each document of `encode_documents`' ids (from `start`), less its boundary token."""
    lengths = lengths.astype(np.int64)  # uint32 + int64 would promote to float64
    starts = start + np.concatenate([[0], np.cumsum(lengths[:-1] + 1)])
    return [ids[s : s + n] for s, n in zip(starts.tolist(), lengths.tolist(), strict=True)]


def joined_documents(pieces: list, boundary_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Each document's ids (`pieces`) joined with the boundary token, and their lengths: what
    `encode_documents` returns."""
    lengths = np.array([len(p) for p in pieces], dtype=np.int64)
    ids = np.full(int(lengths.sum()) + len(pieces) - 1, boundary_id, np.int64)
    for view, piece in zip(document_views(ids, lengths), pieces, strict=True):
        view[:] = piece
    return ids, lengths


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer that holds every id: mapped pages count in memory."""
    return np.min_scalar_type(vocab_size - 1)


def unknown_characters_message(
    unknown: dict[str, int], vocabulary: str = "the vocabulary", counts: bool = False
) -> str:
    """The one wording for characters a vocabulary lacks, the most frequent first:
    `2 character(s) that are not in the vocabulary: 'x', 'z'` (`'x' x3` with `counts`)."""
    chars = sorted(unknown, key=lambda c: (-unknown[c], c))
    shown = ", ".join(f"{c!r} x{unknown[c]}" if counts else repr(c) for c in chars[:20])
    more = f" and {len(chars) - 20} more" if len(chars) > 20 else ""
    return f"{len(chars)} character(s) that are not in {vocabulary}: {shown}{more}"


class CharTokenizer:
    """The vocabulary is the sorted set of distinct characters; ids index into it."""

    boundary = "\n"
    piece_bytes = 16 << 20  # a few hundred MB of temporaries per piece (code points, ids)

    def __init__(self, chars: list[str]):
        if not chars:
            raise LmlabError("a character vocabulary needs at least one character")
        self.itos: list[str] = list(chars)
        self.vocab_size = len(self.itos)
        self.stoi: dict[str, int] = {c: i for i, c in enumerate(self.itos)}
        codepoints = np.array([ord(c) for c in self.itos], dtype=np.int64)
        if np.any(np.diff(codepoints) <= 0):
            raise LmlabError("character vocabulary must be sorted and without repeats")
        # code point -> id, one gather for a whole text; the last entry, -1, is every one above
        self._table = np.full(int(codepoints[-1]) + 2, -1, dtype=np.int32)
        self._table[codepoints] = np.arange(len(codepoints), dtype=np.int32)
        # cheaper still for ASCII text and at most 255 characters: bytes.translate (255: unknown)
        self._bytes_table: bytes | None = None
        if codepoints[-1] < 256 and len(codepoints) < 255:
            table = np.full(256, 255, dtype=np.uint8)
            table[codepoints] = np.arange(len(codepoints))
            self._bytes_table = table.tobytes()

    @classmethod
    def fit(cls, text: str | Iterable[str]) -> CharTokenizer:
        """The sorted distinct characters of a text (or of its pieces), plus the boundary."""
        seen = np.zeros(0x110000, dtype=bool)  # one flag per Unicode code point
        for piece in [text] if isinstance(text, str) else text:
            seen[cls._codepoints(piece)] = True
        return cls(sorted({chr(c) for c in np.flatnonzero(seen).tolist()} | {cls.boundary}))

    @property
    def boundary_id(self) -> int:
        return self.stoi[self.boundary]

    def encode(self, text: str, dtype: DTypeLike = np.int64) -> np.ndarray:
        if self._bytes_table is not None and text.isascii():
            ids = np.frombuffer(text.encode("ascii").translate(self._bytes_table), np.uint8)
            if not (ids == 255).any():
                return ids.astype(dtype)
        ids = self._ids(self._codepoints(text))
        if (ids < 0).any():
            unknown = unknown_characters_message(self.unknown_characters(text))
            raise LmlabError(f"text has {unknown}; use only characters of the training corpus")
        return ids.astype(dtype)

    def encode_documents(self, documents: list[str]) -> tuple[np.ndarray, np.ndarray]:
        ids = self.encode(self.boundary.join(documents))
        return ids, np.array([len(d) for d in documents], dtype=np.int64)

    def encode_pieces(self, pieces: Iterable[str], dtype: DTypeLike) -> Iterator[np.ndarray]:
        return (self.encode(text, dtype) for text in pieces)

    def unknown_characters(self, text: str) -> dict[str, int]:
        codepoints = self._codepoints(text)
        found, counts = np.unique(codepoints[self._ids(codepoints) < 0], return_counts=True)
        return {chr(c): n for c, n in zip(found.tolist(), counts.tolist(), strict=True)}

    @staticmethod
    def _codepoints(text: str) -> np.ndarray:
        if text.isascii():  # a flag of the string, free to ask: one byte a character
            return np.frombuffer(text.encode("ascii"), dtype=np.uint8)
        return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)

    def _ids(self, codepoints: np.ndarray) -> np.ndarray:
        """Each code point's id; -1 for one outside the vocabulary."""
        index = np.minimum(codepoints.astype(np.uint32, copy=False), len(self._table) - 1)
        return self._table[index]

    def decode(self, ids: list[int] | np.ndarray) -> str:
        return "".join(self.itos[int(i)] for i in ids)

    def state(self) -> dict[str, Any]:
        return {"kind": "char", "chars": self.itos}


class WordTokenizer:
    """Raschka's SimpleTokenizerV2: regex words, `<|endoftext|>` between documents and
    `<|unk|>` for every word outside the vocabulary (so any text encodes). The vocabulary is
    the sorted words of the text it is fitted on, then those two tokens, as in the tutorial.
    Decoding joins words with single spaces: line breaks and spacing are not kept."""

    piece_bytes = 4 << 20  # a piece's words are Python strings: a few hundred MB of them

    def __init__(self, words: list[str]):
        self.itos: list[str] = list(words)
        if self.itos[-2:] != [EOT, UNK] or len(set(self.itos)) != len(self.itos):
            raise LmlabError(
                f"a word vocabulary must list each word once and end with {EOT} and {UNK}"
            )
        self.vocab_size = len(self.itos)
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        self.unknown_id = self.stoi[UNK]

    @staticmethod
    def split(text: str) -> list[str]:
        """The tutorial's pieces of a text: punctuation, `--` and words; no whitespace."""
        return [piece.strip() for piece in _WORD_SPLIT.split(text) if piece.strip()]

    @classmethod
    def fit(cls, text: str | Iterable[str], min_count: int = 1) -> WordTokenizer:
        """The words seen at least `min_count` times in a text (or in its pieces), sorted,
        then `<|endoftext|>` and `<|unk|>`."""
        if not isinstance(min_count, int) or isinstance(min_count, bool) or min_count < 1:
            raise LmlabError(f"data.min_count must be a whole number >= 1, got {min_count!r}")
        counts: Counter[str] = Counter()
        for piece in [text] if isinstance(text, str) else text:
            counts.update(cls.split(piece))
        kept = sorted(w for w, n in counts.items() if n >= min_count and w not in (EOT, UNK))
        return cls([*kept, EOT, UNK])

    @property
    def boundary_id(self) -> int:
        return self.stoi[EOT]

    def encode(self, text: str, dtype: DTypeLike = np.int64) -> np.ndarray:
        unknown, get = self.unknown_id, self.stoi.get
        return np.array([get(w, unknown) for w in self.split(text)], dtype=dtype)

    def encode_documents(self, documents: list[str]) -> tuple[np.ndarray, np.ndarray]:
        pieces = [self.encode(d) for d in documents]
        return joined_documents(pieces, self.boundary_id)

    def encode_pieces(self, pieces: Iterable[str], dtype: DTypeLike) -> Iterator[np.ndarray]:
        # a piece ends just before whitespace (read_text_chunks), where the split cuts anyway
        return (self.encode(text, dtype) for text in pieces)

    def unknown_characters(self, text: str) -> dict[str, int]:
        return {}  # every text encodes: an unknown word is <|unk|>

    def decode(self, ids: list[int] | np.ndarray) -> str:
        text = " ".join(self.itos[int(i)] for i in ids)
        return _BEFORE_PUNCTUATION.sub(r"\1", text)

    def state(self) -> dict[str, Any]:
        return {"kind": "words", "words": self.itos}


class TiktokenTokenizer:
    """GPT-2 style BPE from tiktoken: an encoding name or a local `.tiktoken` ranks file."""

    piece_bytes = 2 << 20  # times one piece per thread: tiktoken returns lists of Python ints

    def __init__(self, name: str, ranks: dict[bytes, int] | None = None):
        import tiktoken

        self.name = name
        self._ranks = ranks
        if ranks is None:
            self.encoding = _load_encoding(ENCODING_ALIASES.get(name, name))
        else:
            # tiktoken panics (a Rust panic, not an exception) on shared ranks, and on text
            # with a byte that has no token: both are refused here, before it sees them.
            problems = ["two tokens share a rank"] if len(set(ranks.values())) < len(ranks) else []
            if ranks and not 0 <= min(ranks.values()) <= max(ranks.values()) <= MAX_RANK:
                problems.append(f"a rank is outside 0..{MAX_RANK}")
            if missing := _missing_bytes(ranks):
                problems.append(f"{missing} of the 256 single bytes have no token")
            if problems:
                raise LmlabError(f"the BPE ranks of {name} are not usable: {'; '.join(problems)}")
            self.encoding = tiktoken.Encoding(
                name=Path(name).stem,
                pat_str=_GPT2_RE,  # GPT-2's pre-tokenizer
                mergeable_ranks=ranks,
                # after the largest rank: len(ranks) is a token's rank when ranks have gaps
                special_tokens={EOT: max(ranks.values()) + 1},
            )
        if EOT not in self.encoding.special_tokens_set:
            raise LmlabError(f"encoding {name!r} has no {EOT} token to separate documents")
        self.vocab_size = self.encoding.n_vocab
        self.boundary_id = self.encoding.eot_token
        self._threads = os.cpu_count() or 1

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.encoding.encode(text, allowed_special={EOT}), dtype=np.int64)

    def encode_documents(self, documents: list[str]) -> tuple[np.ndarray, np.ndarray]:
        pieces = self.encoding.encode_ordinary_batch(documents, num_threads=self._threads)
        return joined_documents(pieces, self.boundary_id)

    def encode_pieces(self, pieces: Iterable[str], dtype: DTypeLike) -> Iterator[np.ndarray]:
        pieces = iter(pieces)
        while batch := list(islice(pieces, self._threads)):  # one piece a thread
            for ids in self.encoding.encode_ordinary_batch(batch, num_threads=self._threads):
                yield np.asarray(ids, dtype=dtype)

    def unknown_characters(self, text: str) -> dict[str, int]:
        return {}  # every byte has a token: BPE encodes any text

    def decode(self, ids: list[int] | np.ndarray) -> str:
        ids = [int(i) for i in ids]
        try:
            return self.encoding.decode(ids)
        except KeyError:
            # an id in a gap of the ranks' numbering: a row of the model, but no bytes
            known = {self.boundary_id, *(self._ranks or {}).values()}
            get = self.encoding.decode_single_token_bytes
            data = b"".join(get(i) if i in known else "\ufffd".encode() for i in ids)
            return data.decode("utf-8", errors="replace")

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"kind": "tiktoken", "name": self.name}
        if self._ranks is not None:
            by_rank = sorted(self._ranks.items(), key=lambda item: item[1])
            state["ranks"] = [base64.b64encode(token).decode("ascii") for token, _ in by_rank]
            values = [rank for _, rank in by_rank]
            if values[-1] != len(values) - 1:  # not 0..n-1: ids must come back as they were
                state["rank_values"] = values
        return state


def read_ranks_file(path: str | Path) -> dict[bytes, int]:
    """The ranks of a `.tiktoken` file (`base64-token rank` lines), read from the file itself
    each time (tiktoken's loader caches a local file by its path, and goes on using the copy
    after the file is replaced). Anything else is one LmlabError that names the line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LmlabError(f"tiktoken ranks file not found: {path} (check data.tokenizer)")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise LmlabError(f"cannot read the tiktoken ranks file {path}: {err}") from None

    def bad(number: int, problem: str) -> LmlabError:
        return LmlabError(
            f"{path} is not a tiktoken ranks file: line {number} {problem}; {RANKS_FILE_HELP}"
        )

    ranks: dict[bytes, int] = {}
    lines: dict[bytes | int, int] = {}  # where each token (bytes) and rank (int) was read
    # less the byte-order mark some editors write
    for number, raw in enumerate(data.removeprefix(b"\xef\xbb\xbf").split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise bad(number, "is not UTF-8 text") from None
        if not (fields := line.split()):
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
        for key, what in ((token, f"token {token_text}"), (rank, f"rank {rank}")):
            if key in lines:
                raise bad(number, f"{what} is also on line {lines[key]}")
        ranks[token] = rank
        lines[token] = lines[rank] = number
    if not ranks:
        raise LmlabError(
            f"{path} is not a tiktoken ranks file: it has no tokens; {RANKS_FILE_HELP}"
        )
    if missing := _missing_bytes(ranks):
        raise LmlabError(
            f"{path} is not a complete tiktoken ranks file: {missing} of the 256 single bytes "
            f"have no token, so text with them could not be encoded; {RANKS_FILE_HELP}"
        )
    return ranks


def _missing_bytes(ranks: dict[bytes, int]) -> str:
    """The single bytes without a token, as `2 (0x00, 0x68)`; "" when there are none."""
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    shown = ", ".join(f"0x{b:02x}" for b in missing[:8]) + (", ..." if len(missing) > 8 else "")
    return f"{len(missing)} ({shown})" if missing else ""


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
                "or set data.tokenizer to char, words or a local .tiktoken ranks file"
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


def build_tokenizer(spec: str) -> Tokenizer:
    """A tiktoken encoding name or `.tiktoken` ranks file (`char` and `words` are fitted on a
    corpus: `CharTokenizer.fit`, `WordTokenizer.fit`)."""
    if spec.endswith(".tiktoken") or os.sep in spec:
        path = Path(spec).expanduser()
        return TiktokenTokenizer(str(path), read_ranks_file(path))
    return TiktokenTokenizer(spec)


def tokenizer_from_state(state: dict[str, Any]) -> Tokenizer:
    kind = state.get("kind")
    if kind == "char":
        return CharTokenizer(list(state["chars"]))
    if kind == "words":
        return WordTokenizer(list(state["words"]))
    if kind != "tiktoken":
        raise LmlabError(f"unknown tokenizer kind {kind!r} in checkpoint")
    ranks = None
    if "ranks" in state:  # ranks 0..n-1 are stored as the tokens alone, in rank order
        values = state.get("rank_values") or range(len(state["ranks"]))
        ranks = dict(zip(map(base64.b64decode, state["ranks"]), values, strict=True))
    return TiktokenTokenizer(state["name"], ranks)
