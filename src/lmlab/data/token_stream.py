"""A corpus file -> its text split into train / val / test -> their tokens, cached.

The text is split before any tokenizer sees it, so every tokenizer (characters, BPE, anything
added later) is trained and scored on exactly the same characters:

- a corpus of many documents (TSV/CSV/JSONL rows, or lines with `split_lines`) is shuffled
  with `split_seed` and cut at document boundaries: the first `train_fraction` of the
  documents train, the last `test_fraction` test, the rest validate;
- a single plain-text document is cut at the line break nearest to each fraction of its
  bytes, and each part is tokenized piece by piece, in bounded memory.

Within a part, documents are joined with the tokenizer's boundary (`\\n` or `<|endoftext|>`);
the part's text, for counting characters and bytes, is its documents joined with one `\\n`.
"""

from __future__ import annotations

import logging
import math
import os
import time
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from lmlab.data.corpus import check_corpus_file, read_documents, sha256_of
from lmlab.data.streaming import encode_plain_text, fit_char_vocabulary
from lmlab.data.token_cache import CacheWriteError, MemorySink, TokenCache, TokenSink, cache_key
from lmlab.data.tokenizers import (
    CharTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    build_tokenizer,
    token_dtype,
)
from lmlab.errors import LmlabError

log = logging.getLogger(__name__)

PARTS = ("train", "val", "test")
_NEAR_BYTES = 1 << 16  # first look for a line break this far around a cut


@dataclass(frozen=True)
class TokenSettings:
    """Everything besides the corpus content that decides the parts and their tokens (hence
    the cache key)."""

    tokenizer: str = "char"
    text_field: str | None = None
    split_lines: bool = False
    quoting: str = "auto"
    normalize: str | None = "NFC"
    encoding_errors: str = "strict"
    train_fraction: float = 0.9
    test_fraction: float = 0.0
    split_seed: int | None = 42  # documents are shuffled with it before they are split

    @property
    def one_document(self) -> bool:
        """Plain text read as one document: split at line breaks, tokenized in pieces."""
        return self.text_field is None and not self.split_lines

    def part_fractions(self) -> dict[str, float]:
        fractions = {"train": self.train_fraction, "val": 1.0 - self.train_fraction}
        if self.test_fraction > 0:
            fractions["val"] -= self.test_fraction
            fractions["test"] = self.test_fraction
        return fractions

    def key_fields(self) -> dict[str, Any]:
        fields = asdict(self)
        if self.tokenizer != "char" and Path(self.tokenizer).expanduser().is_file():
            fields["ranks_sha256"] = sha256_of(Path(self.tokenizer).expanduser())
        return fields


@dataclass
class PartStats:
    """What one part of the corpus holds: enough to check that two runs saw the same text."""

    documents: int
    characters: int
    bytes: int
    tokens: int = 0
    start: int = 0  # where its tokens begin in the corpus's stream

    def public(self) -> dict[str, int]:
        return {k: v for k, v in asdict(self).items() if k != "start"}

    def factors(self) -> tuple[float, float]:
        """(bpc, bpb) = loss * factor: nats -> bits, tokens -> characters or UTF-8 bytes."""
        bits_per_token = self.tokens / math.log(2)
        return bits_per_token / max(self.characters, 1), bits_per_token / max(self.bytes, 1)


@dataclass
class CorpusTokens:
    ids: np.ndarray  # every part's tokens, one after the other; memory-mapped
    tokenizer: Tokenizer
    parts: dict[str, PartStats]
    document_lengths: np.ndarray | None = None  # tokens of each document, in part order
    meta: dict[str, Any] = field(default_factory=dict)

    def part(self, name: str) -> np.ndarray | None:
        stats = self.parts.get(name)
        return None if stats is None else self.ids[stats.start : stats.start + stats.tokens]

    def documents(self, name: str) -> list[np.ndarray]:
        """The token ids of each document of a part (boundaries left out)."""
        if self.document_lengths is None:  # a single-document corpus: each part is one
            return [self.part(name)]
        first = sum(self.parts[p].documents for p in PARTS[: PARTS.index(name)])
        lengths = self.document_lengths[first : first + self.parts[name].documents]
        lengths = lengths.astype(np.int64)  # uint32 + int64 would promote to float64
        # each document but the last of the part is followed by one boundary token
        starts = self.parts[name].start + np.concatenate([[0], np.cumsum(lengths[:-1] + 1)])
        return [self.ids[s : s + n] for s, n in zip(starts.tolist(), lengths.tolist(), strict=True)]


def tokenize_corpus(
    path: Path, settings: TokenSettings, cache_dir: str | Path | None = None
) -> CorpusTokens:
    """The parts of `path` and their tokens, loaded from `cache_dir` or made (and cached)."""
    path = check_corpus_file(path)
    cache = None
    if cache_dir is not None:
        label = "char" if settings.tokenizer == "char" else Path(settings.tokenizer).stem
        cache = TokenCache(cache_dir, path, label, cache_key(path, settings.key_fields()))
        meta = cache.load()
        if meta is not None:
            tokens = _from_cache(cache, meta, settings)
            log.info("tokens: loaded from cache %s (%d tokens)", cache.bin_path, len(tokens.ids))
            return tokens
    try:
        return _tokenize(path, settings, cache)
    except CacheWriteError as err:
        log.warning(
            "token cache %s could not be written (%s); tokenizing without a cache. Free some "
            "space or set data.cache_dir to another directory",
            cache.bin_path if cache else cache_dir,
            err.strerror,
        )
        return _tokenize(path, settings, None, in_memory=True)


def _tokenize(
    path: Path, settings: TokenSettings, cache: TokenCache | None, in_memory: bool = False
) -> CorpusTokens:
    started = time.perf_counter()
    if settings.one_document:
        tokenizer = _build_tokenizer(settings, path=path)
        cuts = line_break_cuts(path, list(settings.part_fractions().values()))
        sink = _open_sink(cache, tokenizer, in_memory)
        parts: dict[str, PartStats] = {}
        with _discarded_on_error(sink):
            for name, (start, end) in zip(settings.part_fractions(), pairwise(cuts), strict=True):
                before = sink.num_tokens
                characters, nbytes = encode_plain_text(
                    path, tokenizer, sink, settings.normalize, settings.encoding_errors, start, end
                )
                parts[name] = PartStats(1, characters, nbytes, sink.num_tokens - before, before)
            (ids,) = sink.finish()
        lengths = None
    else:
        by_part = _split_documents(read_normalized_documents(path, settings), settings, path)
        everything = [d for docs in by_part.values() for d in docs]
        tokenizer = _build_tokenizer(settings, documents=everything)
        sink = _open_sink(cache, tokenizer, in_memory)
        parts, all_lengths = {}, []
        with _discarded_on_error(sink):
            for name, documents in by_part.items():
                ids, lengths = _encode_documents(tokenizer, documents)
                nbytes = sum(len(d.encode("utf-8")) for d in documents) + len(documents) - 1
                characters = sum(len(d) for d in documents) + len(documents) - 1
                parts[name] = PartStats(
                    len(documents), characters, nbytes, len(ids), sink.num_tokens
                )
                sink.append(ids)
                all_lengths.append(lengths)
            ids, lengths = sink.finish(np.concatenate(all_lengths))
    meta = {
        "corpus": str(path),
        "settings": asdict(settings),
        "parts": {name: asdict(stats) for name, stats in parts.items()},
        "tokenizer": tokenizer.state() if isinstance(tokenizer, CharTokenizer) else None,
        "seconds": round(time.perf_counter() - started, 3),
    }
    sink.commit(meta)
    where = f"cached at {sink.cached_at}" if sink.cached_at else "not cached"
    seconds = meta["seconds"]
    log.info("tokens: tokenized %s (%d tokens) in %.1f s, %s", path.name, len(ids), seconds, where)
    return CorpusTokens(ids, tokenizer, parts, lengths, meta)


def _from_cache(cache: TokenCache, meta: dict[str, Any], settings: TokenSettings) -> CorpusTokens:
    parts = {name: PartStats(**stats) for name, stats in meta["parts"].items()}
    return CorpusTokens(
        cache.array(meta, "ids"),
        _restore_tokenizer(settings, meta),
        parts,
        cache.array(meta, "document_lengths"),
        meta,
    )


# -- the text split --------------------------------------------------------------------------
def _split_documents(
    documents: list[str], settings: TokenSettings, path: Path
) -> dict[str, list[str]]:
    """Whole documents to each part, after a shuffle with a seed of its own (so that every
    training seed of a sweep is scored on the same validation documents)."""
    if settings.split_seed is not None:
        order = np.random.default_rng(settings.split_seed).permutation(len(documents))
        documents = [documents[i] for i in order]
    n = len(documents)
    counts = {name: round(n * f) for name, f in settings.part_fractions().items()}
    counts["val"] = n - sum(c for name, c in counts.items() if name != "val")
    if min(counts.values()) < 1:
        shares = " / ".join(f"{f:.0%} {p}" for p, f in settings.part_fractions().items())
        raise LmlabError(
            f"{path} has {n} document(s), too few to split {shares} with at least one document "
            "in each part; use a corpus with more documents, or change data.train_fraction "
            "and data.test_fraction"
        )
    parts, start = {}, 0
    for name, count in counts.items():
        parts[name] = documents[start : start + count]
        start += count
    return parts


def line_break_cuts(path: Path, fractions: list[float]) -> list[int]:
    """Byte offsets [0, cut, ..., size] of a plain-text file: each cut is just after the line
    break nearest to the running fraction of its bytes (a cut between two lines changes
    neither the characters nor their NFC form; a text without line breaks is cut before the
    nearest ASCII character)."""
    size = path.stat().st_size
    cuts = [0]
    with open(path, "rb") as f:
        for share in np.cumsum(fractions)[:-1].tolist():
            cuts.append(_nearest_cut(f, size, int(size * share)))
    cuts.append(size)
    if any(b <= a for a, b in pairwise(cuts)):
        raise LmlabError(
            f"{path} is too short to split into {len(fractions)} parts at line breaks; use a "
            "longer corpus, or change data.train_fraction and data.test_fraction"
        )
    return cuts


def _nearest_cut(f, size: int, target: int) -> int:
    radius = _NEAR_BYTES
    while True:
        lo, hi = max(0, target - radius), min(size, target + radius)
        f.seek(lo)
        window = np.frombuffer(f.read(hi - lo), np.uint8)
        after_newline = np.flatnonzero(window == 0x0A) + lo + 1
        after_newline = after_newline[after_newline < size]
        if len(after_newline):
            return int(after_newline[np.argmin(np.abs(after_newline - target))])
        if lo == 0 and hi == size:
            break
        radius *= 4
    # no line break anywhere: before the ASCII character nearest the target, if any
    lo = max(0, target - _NEAR_BYTES)
    f.seek(lo)
    ascii_at = np.flatnonzero(np.frombuffer(f.read(2 * _NEAR_BYTES), np.uint8) < 0x80) + lo
    ascii_at = ascii_at[(ascii_at > 0) & (ascii_at < size)]
    if len(ascii_at):
        return int(ascii_at[np.argmin(np.abs(ascii_at - target))])
    f.seek(target)
    while target < size and f.read(1)[0] & 0xC0 == 0x80:  # not inside a UTF-8 character
        target += 1
    return target


# -- tokenizing ------------------------------------------------------------------------------
def read_normalized_documents(path: Path, settings: TokenSettings) -> list[str]:
    """The corpus's documents as the settings read them, Unicode-normalized."""
    documents = read_documents(
        path,
        settings.text_field,
        settings.split_lines,
        settings.encoding_errors,
        quoting=settings.quoting,
    )
    if settings.normalize:
        documents = [unicodedata.normalize(settings.normalize, d) for d in documents]
    return documents


def _build_tokenizer(
    settings: TokenSettings, path: Path | None = None, documents: list[str] | None = None
) -> Tokenizer:
    if settings.tokenizer != "char":
        return build_tokenizer(settings.tokenizer)
    # the vocabulary is every character of the corpus (all parts), as the tutorials do
    if documents is not None:
        return CharTokenizer.fit(CharTokenizer.boundary.join(documents))
    return fit_char_vocabulary(path, settings.normalize, settings.encoding_errors)


def _restore_tokenizer(settings: TokenSettings, meta: dict[str, Any]) -> Tokenizer:
    if meta.get("tokenizer") is not None:
        return CharTokenizer(meta["tokenizer"]["chars"])
    return build_tokenizer(settings.tokenizer)


def _encode_documents(tokenizer: Tokenizer, documents: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Ids of the documents joined with the boundary token, and each document's length."""
    if isinstance(tokenizer, TiktokenTokenizer):
        pieces = tokenizer.encoding.encode_ordinary_batch(
            documents, num_threads=os.cpu_count() or 1
        )
        lengths = np.array([len(p) for p in pieces], dtype=np.int64)
        ids = np.full(int(lengths.sum()) + len(pieces) - 1, tokenizer.boundary_id, np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths[:-1] + 1)])
        for start, piece in zip(starts.tolist(), pieces, strict=True):
            ids[start : start + len(piece)] = piece
        return ids, lengths
    ids = tokenizer.encode(tokenizer.boundary.join(documents))
    return ids, np.array([len(d) for d in documents], dtype=np.int64)


def _open_sink(cache: TokenCache | None, tokenizer: Tokenizer, in_memory: bool) -> TokenSink:
    dtype = token_dtype(tokenizer.vocab_size)
    if in_memory:
        return MemorySink(dtype)
    return cache.sink(dtype) if cache is not None else TokenSink(dtype)


@contextmanager
def _discarded_on_error(sink: TokenSink) -> Iterator[TokenSink]:
    """A failed tokenization (a bad byte half-way) leaves no temporary file behind."""
    try:
        yield sink
    except BaseException:
        sink.discard()
        raise
