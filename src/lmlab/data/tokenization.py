"""Tokenizing a corpus: its text split into train / val / test, each part tokenized with the
tokenizer the settings name (or a vocabulary fitted on the corpus: its characters, or the
words of its training part) into one memory-mapped stream, cached once made (token_cache.py).
Documents are read whole; a single plain-text document is cut at line breaks and tokenized
piece by piece straight from the file, so a corpus larger than memory works too."""

from __future__ import annotations

import io
import logging
import mmap
import time
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np

from lmlab.data import corpus
from lmlab.data.token_cache import CacheWriteError, CorpusTokens, PartStats, TokenCache, TokenSink
from lmlab.data.tokenizers import (
    CharTokenizer,
    Tokenizer,
    WordTokenizer,
    build_tokenizer,
    token_dtype,
)
from lmlab.errors import LmlabError

log = logging.getLogger(__name__)

MAX_PIECE_BYTES = 64 << 20  # read_text_chunks cuts anywhere rather than hold more than this
PROGRESS_BYTES = 50 << 20  # a progress bar only for files that take a while
_NEAR_BYTES = 1 << 16  # how far around its target a cut looks for an ASCII character
FITTED = ("char", "words")  # tokenizers whose vocabulary is fitted on the corpus


@dataclass(frozen=True)
class TokenSettings:
    """All but the corpus content that decides the parts and their tokens (the cache key)."""

    tokenizer: str = "char"
    text_field: str | None = None
    split_lines: bool = False
    quoting: str = "auto"
    normalize: str | None = "NFC"
    encoding_errors: str = "strict"
    train_fraction: float = 0.9
    test_fraction: float = 0.0
    split_seed: int | None = 42  # documents are shuffled with it before they are split
    min_count: int = 1  # words: how often a word must occur in the training part to be kept

    @property
    def fractions(self) -> dict[str, float]:
        """Each part's share of the corpus: train, val, and test when one is held out."""
        train, test = self.train_fraction, self.test_fraction
        return {"train": train, "val": 1.0 - train - test} | ({"test": test} if test > 0 else {})


def tokenize_corpus(
    path: Path, settings: TokenSettings, cache_dir: str | Path | None = None
) -> CorpusTokens:
    """The parts of `path` and their tokens, loaded from `cache_dir` or made (and cached)."""
    path = corpus.check_corpus_file(path)
    if cache_dir is None:
        return _tokenize(path, settings, TokenSink)
    key_fields = asdict(settings)
    if settings.tokenizer != "words":  # it changes no other tokens: their entries stay valid
        del key_fields["min_count"]
    if settings.tokenizer not in FITTED and Path(settings.tokenizer).expanduser().is_file():
        key_fields["ranks_sha256"] = corpus.sha256_of(Path(settings.tokenizer).expanduser())
    label = "char" if settings.tokenizer == "char" else Path(settings.tokenizer).stem
    cache = TokenCache(cache_dir, path, label, key_fields)
    if tokens := cache.load(lambda: _named_tokenizer(settings)):
        return tokens
    try:
        return _tokenize(path, settings, cache.sink)
    except CacheWriteError as err:
        log.warning(
            "token cache %s could not be written (%s); tokenizing without a cache. Free some "
            "space or set data.cache_dir to another directory",
            cache.bin_path,
            err.strerror,
        )
        return _tokenize(path, settings, lambda dtype: TokenSink(dtype, io.BytesIO()))


def _tokenize(
    path: Path, settings: TokenSettings, open_sink: Callable[[np.dtype], TokenSink]
) -> CorpusTokens:
    """Tokenize every part into one sink, opened by `open_sink(dtype)`."""
    started = time.perf_counter()
    fractions = settings.fractions
    normalize, errors = settings.normalize, settings.encoding_errors
    documents = None  # plain text is one document, cut at line breaks and read piece by piece
    if settings.text_field is None and not settings.split_lines:
        cuts = line_break_cuts(path, list(fractions.values()))
        tokenizer = _named_tokenizer(settings) or _fit_plain_text(path, settings, cuts[1])
    else:
        every, documents = read_part_documents(path, settings)
        # characters: every one of the corpus (all parts), as the tutorials do; words: those of
        # the training part only, so that a word first seen in validation is unknown there
        if settings.tokenizer == "words":
            tokenizer = WordTokenizer.fit(documents["train"], settings.min_count)
        else:
            tokenizer = _named_tokenizer(settings) or CharTokenizer.fit("\n".join(every))
    sink = open_sink(token_dtype(tokenizer.vocab_size))
    parts, lengths = {}, []
    try:
        if documents is None:
            for name, (start, end) in zip(fractions, pairwise(cuts), strict=True):
                first = sink.num_tokens
                chars, nbytes = encode_plain_text(
                    path, tokenizer, sink, normalize, errors, start, end
                )
                parts[name] = PartStats(1, chars, nbytes, sink.num_tokens - first, first)
        else:  # each part's documents joined with the boundary; every document's length
            for name, part in documents.items():
                ids, part_lengths = tokenizer.encode_documents(part)
                parts[name] = PartStats.of_documents(part, len(ids), sink.num_tokens)
                sink.append(ids)
                lengths.append(part_lengths)
        ids, *lengths = sink.finish(np.concatenate(lengths) if lengths else None)
    except BaseException:  # a bad byte half-way: no temporary file is left behind
        sink.discard()
        raise
    seconds = round(time.perf_counter() - started, 3)
    meta = {"corpus": str(path), "settings": asdict(settings), "seconds": seconds}
    meta["parts"] = {name: asdict(stats) for name, stats in parts.items()}
    meta["tokenizer"] = tokenizer.state() if settings.tokenizer in FITTED else None
    sink.commit(meta)
    where = f"cached at {sink.cache.bin_path}" if sink.cache else "not cached"
    log.info("tokens: tokenized %s (%d tokens) in %.1f s, %s", path.name, len(ids), seconds, where)
    return CorpusTokens(ids, tokenizer, parts, *lengths)


def read_part_documents(
    path: Path, settings: TokenSettings
) -> tuple[list[str], dict[str, list[str]]]:
    """Every document of a document corpus (lines, or a TSV/CSV/JSONL field), and the
    documents of each part, shuffled with `split_seed` and cut at the parts' fractions."""
    how = settings.text_field, settings.split_lines, settings.encoding_errors, settings.quoting
    every = corpus.read_documents(path, *how, settings.normalize)
    return every, corpus.split_documents(every, settings.fractions, settings.split_seed, path)


def _named_tokenizer(settings: TokenSettings) -> Tokenizer | None:
    """The tokenizer the settings name; None for `char` and `words`, fitted on the corpus."""
    return None if settings.tokenizer in FITTED else build_tokenizer(settings.tokenizer)


def _fit_plain_text(path: Path, settings: TokenSettings, train_end: int) -> Tokenizer:
    """The vocabulary of a plain-text corpus whose training part is bytes [0, train_end)."""
    normalize, errors = settings.normalize, settings.encoding_errors
    if settings.tokenizer == "words":
        return fit_word_vocabulary(path, normalize, errors, train_end, settings.min_count)
    return fit_char_vocabulary(path, normalize, errors)


def fit_word_vocabulary(
    path: Path,
    normalize: str | None,
    encoding_errors: str = "strict",
    end: int | None = None,
    min_count: int = 1,
    chunk_bytes: int = 0,
) -> WordTokenizer:
    """The word vocabulary of bytes [0, end) of a plain-text file, read piece by piece."""
    chunk_bytes = chunk_bytes or WordTokenizer.piece_bytes
    pieces = read_text_chunks(path, chunk_bytes, encoding_errors, 0, end, normalize, "vocabulary")
    return WordTokenizer.fit((text for _, text in pieces), min_count)


def fit_char_vocabulary(
    path: Path, normalize: str | None, encoding_errors: str = "strict", chunk_bytes: int = 0
) -> CharTokenizer:
    """The character vocabulary of a whole plain-text file, read piece by piece."""
    chunk_bytes = chunk_bytes or CharTokenizer.piece_bytes
    pieces = read_text_chunks(path, chunk_bytes, encoding_errors, 0, None, normalize, "vocabulary")
    return CharTokenizer.fit(text for _, text in pieces)


def encode_plain_text(
    path: Path,
    tokenizer: Tokenizer,
    sink: TokenSink,
    normalize: str | None,
    encoding_errors: str = "strict",
    start: int = 0,
    end: int | None = None,
    chunk_bytes: int = 0,
) -> tuple[int, int]:
    """Append the tokens of bytes [start, end) of the file to `sink` (one document: no
    boundary tokens); return the characters and UTF-8 bytes of the text tokenized."""
    chunk_bytes = chunk_bytes or tokenizer.piece_bytes
    counts = [0, 0]  # characters, bytes

    def pieces() -> Iterator[str]:
        for _, text in read_text_chunks(
            path, chunk_bytes, encoding_errors, start, end, normalize, "tokens"
        ):
            counts[0] += len(text)
            counts[1] += len(text.encode("utf-8"))
            yield text

    for ids in tokenizer.encode_pieces(pieces(), sink.dtype):
        sink.append(ids)
    return counts[0], counts[1]


# -- a plain-text file, piece by piece -------------------------------------------------------
def read_text_chunks(
    path: Path,
    chunk_bytes: int,
    encoding_errors: str = "strict",
    start: int = 0,
    end: int | None = None,
    normalize: str | None = None,
    progress: str = "",
) -> Iterator[tuple[int, str]]:
    """(file position reached, normalized text) for pieces of about `chunk_bytes` of bytes
    [start, end) of a plain-text file (a progress bar for a big file), cut where the text, its
    NFC form and (given a space or newline after a letter within a few pieces, as any prose
    has) its BPE tokens stay those of the whole file."""
    from tqdm import tqdm

    end = path.stat().st_size if end is None else end
    offset, data = start, b""  # data[0] is at file position `offset`
    quiet = not progress or end - start < PROGRESS_BYTES
    bar = tqdm(total=end - start, unit="B", unit_scale=True, disable=quiet, mininterval=2.0)
    with open(path, "rb") as f, bar:
        bar.set_description(f"{path.name}: {progress}")
        f.seek(start)
        while True:
            block = f.read(max(0, min(chunk_bytes, end - offset - len(data))))
            data += block
            if not data:
                return
            cut = _cut_point(data, exact=len(data) < 4 * chunk_bytes) if block else len(data)
            if cut is None:
                continue  # no exact cut in sight: read on, up to a few pieces
            text = corpus.decode_text(data[:cut], path, offset, encoding_errors)
            offset, data = offset + cut, data[cut:]
            bar.update(cut)
            yield offset, unicodedata.normalize(normalize, text) if normalize else text


def _cut_point(data: bytes, exact: bool) -> int | None:
    """Where to end a piece of `data`, or None to read on first. Exact: before a space or
    newline that follows a letter (every tiktoken pattern ends a pre-token after a letter and
    starts one at the whitespace, and nothing composes across it in NFC). Else after a newline
    or before an ASCII character: exact for characters and NFC, at worst another BPE split of
    a run of whitespace or of one word."""
    pos = len(data)
    for _ in range(1000):
        pos = max(data.rfind(b" ", 0, pos), data.rfind(b"\n", 0, pos))
        if pos <= 0:
            break
        if data[max(0, pos - 4) : pos].decode("utf-8", errors="ignore")[-1:].isalpha():
            return pos
    if exact:
        return None
    if (newline := data.rfind(b"\n")) >= 0:
        return newline + 1  # after it: keeps CRLF together
    if cut := _before_ascii(data, len(data), max(0, len(data) - _NEAR_BYTES)):
        return cut
    if len(data) < MAX_PIECE_BYTES:
        return None
    lead = len(data) - 1  # megabytes without ASCII: at least never inside a UTF-8 character
    while lead > 0 and data[lead] & 0xC0 == 0x80:
        lead -= 1
    return lead or len(data)


def _before_ascii(data: bytes | mmap.mmap, target: int, lo: int, hi: int = 0) -> int | None:
    """The position nearest `target` in [lo, hi or the end), above 0, of an ASCII character:
    none composes with the one before, so a cut there is between characters."""
    at = np.flatnonzero(np.frombuffer(data[lo : hi or len(data)], np.uint8) < 0x80) + lo
    at = at[at > 0]
    return int(at[np.argmin(np.abs(at - target))]) if len(at) else None


def line_break_cuts(path: Path, fractions: list[float]) -> list[int]:
    """Byte offsets [0, cut, ..., size] of a plain-text file, each just after the line break
    nearest its share of the bytes (which changes neither the characters nor their NFC form),
    or, in a text without line breaks, before the nearest ASCII character."""
    size = path.stat().st_size
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        shares = np.cumsum(fractions)[:-1].tolist()
        cuts = [0, *(_nearest_cut(data, int(size * share)) for share in shares), size]
    if any(b <= a for a, b in pairwise(cuts)):
        raise LmlabError(
            f"{path} is too short to split into {len(fractions)} parts at line breaks; use a "
            "longer corpus, or change data.train_fraction and data.test_fraction"
        )
    return cuts


def _nearest_cut(data: mmap.mmap, target: int) -> int:
    size = len(data)
    # just after the nearest "\n" at or before the target, or after it (not the file's last byte)
    after = [data.rfind(b"\n", 0, target) + 1, data.find(b"\n", target, size - 1) + 1]
    if after := [a for a in after if a > 0]:
        return min(after, key=lambda a: abs(a - target))
    lo = max(0, target - _NEAR_BYTES)
    if cut := _before_ascii(data, target, lo, lo + 2 * _NEAR_BYTES):
        return cut
    while target < size and data[target] & 0xC0 == 0x80:  # not inside a UTF-8 character
        target += 1
    return target
