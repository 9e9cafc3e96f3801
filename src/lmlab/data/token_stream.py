"""A corpus file -> its token stream and tokenizer, from the token cache when it has them.

Plain text (one document per file) is tokenized in pieces, in bounded memory; TSV/CSV/JSONL
columns and one-document-per-line corpora are read whole (they are small) and their stream
is cached all the same.
"""

from __future__ import annotations

import logging
import time
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmlab.data.corpus import check_corpus_file, read_documents, sha256_of
from lmlab.data.streaming import encode_plain_text, fit_char_vocabulary
from lmlab.data.token_cache import TokenCache, TokenSink, cache_key
from lmlab.data.tokenizers import (
    CharTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    build_tokenizer,
    token_dtype,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenSettings:
    """Everything besides the corpus content that decides the tokens (hence the cache key)."""

    tokenizer: str = "char"
    text_field: str | None = None
    split_lines: bool = False
    normalize: str | None = "NFC"
    encoding_errors: str = "strict"
    shuffle_seed: int | None = None  # documents are shuffled with it before they are joined

    @property
    def streams(self) -> bool:
        """One plain-text document: tokenized piece by piece."""
        return self.text_field is None and not self.split_lines and self.shuffle_seed is None

    def key_fields(self) -> dict[str, Any]:
        fields = asdict(self)
        if self.tokenizer != "char" and Path(self.tokenizer).expanduser().is_file():
            fields["ranks_sha256"] = sha256_of(Path(self.tokenizer).expanduser())
        return fields


@dataclass
class CorpusTokens:
    ids: np.ndarray  # uint16/uint32, memory-mapped: pages are read from disk as they are used
    tokenizer: Tokenizer
    num_documents: int
    meta: dict[str, Any] = field(default_factory=dict)
    cache: TokenCache | None = None

    def characters(self, start: int) -> int:
        """Characters of the text of ids[start:] (what val/bpc divides by)."""
        if not isinstance(self.tokenizer, TiktokenTokenizer):
            return len(self.ids) - start  # one token per character
        counts = self.meta.setdefault("characters_from", {})
        if str(start) not in counts:  # decoding 10% of a big corpus is worth remembering
            counts[str(start)] = self.tokenizer.count_characters(self.ids[start:])
            if self.cache is not None:
                with suppress(OSError):  # a read-only cache: counted again next time
                    self.cache.write_meta(self.meta)
        return counts[str(start)]


def tokenize_corpus(
    path: Path, settings: TokenSettings, cache_dir: str | Path | None = None
) -> CorpusTokens:
    """The token stream of `path`, loaded from `cache_dir` or tokenized (and cached there)."""
    path = check_corpus_file(path)
    cache = None
    if cache_dir is not None:
        label = "char" if settings.tokenizer == "char" else Path(settings.tokenizer).stem
        cache = TokenCache(cache_dir, path, label, cache_key(path, settings.key_fields()))
        hit = cache.load()
        if hit is not None:
            ids, meta = hit
            log.info("tokens: loaded from cache %s (%d tokens)", cache.bin_path, len(ids))
            return CorpusTokens(
                ids, _restore_tokenizer(settings, meta), meta["num_documents"], meta, cache
            )
    started = time.perf_counter()
    if settings.streams:
        tokenizer = _build_tokenizer(settings, path=path)
        sink = _open_sink(cache, tokenizer)
        num_documents = 1
        with _discarded_on_error(sink):
            encode_plain_text(path, tokenizer, sink, settings.normalize, settings.encoding_errors)
    else:
        documents = _read_documents(path, settings)
        tokenizer = _build_tokenizer(settings, documents=documents)
        sink = _open_sink(cache, tokenizer)
        num_documents = len(documents)
        with _discarded_on_error(sink):
            sink.append(_encode_documents(tokenizer, documents))
    ids = sink.finish()
    meta = {
        "corpus": str(path),
        "settings": asdict(settings),
        "num_tokens": len(ids),
        "num_documents": num_documents,
        "tokenizer": tokenizer.state() if isinstance(tokenizer, CharTokenizer) else None,
        "seconds": round(time.perf_counter() - started, 3),
    }
    sink.commit(meta)
    where = f"cached at {sink.cached_at}" if sink.cached_at else "not cached"
    log.info(
        "tokens: tokenized %s (%d tokens) in %.1f s, %s",
        path.name,
        len(ids),
        meta["seconds"],
        where,
    )
    return CorpusTokens(ids, tokenizer, num_documents, meta, cache if sink.cached_at else None)


def _read_documents(path: Path, settings: TokenSettings) -> list[str]:
    documents = read_documents(
        path, settings.text_field, settings.split_lines, settings.encoding_errors
    )
    if settings.normalize:
        documents = [unicodedata.normalize(settings.normalize, d) for d in documents]
    if settings.shuffle_seed is not None:
        # Split whole documents, after a shuffle with a seed of its own, so that every
        # training seed of a sweep is scored on the same validation documents.
        order = np.random.default_rng(settings.shuffle_seed).permutation(len(documents))
        documents = [documents[i] for i in order]
    return documents


def _build_tokenizer(
    settings: TokenSettings, path: Path | None = None, documents: list[str] | None = None
) -> Tokenizer:
    if settings.tokenizer != "char":
        return build_tokenizer(settings.tokenizer)
    if documents is not None:
        return CharTokenizer.fit(CharTokenizer.boundary.join(documents))
    return fit_char_vocabulary(path, settings.normalize, settings.encoding_errors)


def _restore_tokenizer(settings: TokenSettings, meta: dict[str, Any]) -> Tokenizer:
    if meta.get("tokenizer") is not None:
        return CharTokenizer(meta["tokenizer"]["chars"])
    return build_tokenizer(settings.tokenizer)


def _encode_documents(tokenizer: Tokenizer, documents: list[str]) -> np.ndarray:
    if isinstance(tokenizer, TiktokenTokenizer):
        return tokenizer.encode_documents(documents)
    return tokenizer.encode(tokenizer.boundary.join(documents))


def _open_sink(cache: TokenCache | None, tokenizer: Tokenizer) -> TokenSink:
    dtype = token_dtype(tokenizer.vocab_size)
    return cache.sink(dtype) if cache is not None else TokenSink(dtype)


@contextmanager
def _discarded_on_error(sink: TokenSink) -> Iterator[TokenSink]:
    """A failed tokenization (a bad byte half-way) leaves no temporary file behind."""
    try:
        yield sink
    except BaseException:
        sink.discard()
        raise
