"""Tokenizing a plain-text corpus piece by piece, in memory bounded by the piece size.

Characters take two passes (the vocabulary must be known before the first id is written);
BPE takes one, several pieces at a time on tiktoken's threads. Pieces are cut where the
tokens do not change (see `read_text_chunks`), so the result equals tokenizing the whole text.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from lmlab.data.corpus import read_text_chunks
from lmlab.data.token_cache import TokenSink
from lmlab.data.tokenizers import CharTokenizer, TiktokenTokenizer, Tokenizer, text_codepoints

CHAR_CHUNK_BYTES = 16 << 20  # ~250 MB of temporaries per piece (code points, ids)
BPE_CHUNK_BYTES = 2 << 20  # times one piece per thread: tiktoken returns lists of Python ints
PROGRESS_BYTES = 50 << 20  # a progress bar only for corpora that take a while


def fit_char_vocabulary(
    path: Path,
    normalize: str | None,
    encoding_errors: str = "strict",
    chunk_bytes: int = CHAR_CHUNK_BYTES,
) -> CharTokenizer:
    seen = np.zeros(0x110000, dtype=bool)  # one flag per Unicode code point
    for text in _normalized_chunks(path, chunk_bytes, normalize, encoding_errors, "vocabulary"):
        seen[text_codepoints(text)] = True
    return CharTokenizer.from_codepoints(np.flatnonzero(seen))


def encode_plain_text(
    path: Path,
    tokenizer: Tokenizer,
    sink: TokenSink,
    normalize: str | None,
    encoding_errors: str = "strict",
    start: int = 0,
    end: int | None = None,
    chunk_bytes: int | None = None,
) -> tuple[int, int]:
    """Append the tokens of bytes [start, end) of the file to `sink` (one document: no
    boundary tokens); return the characters and UTF-8 bytes of the text tokenized."""
    bpe = isinstance(tokenizer, TiktokenTokenizer)
    chunk_bytes = chunk_bytes or (BPE_CHUNK_BYTES if bpe else CHAR_CHUNK_BYTES)
    chunks = _normalized_chunks(path, chunk_bytes, normalize, encoding_errors, "tokens", start, end)
    characters = nbytes = 0
    threads = os.cpu_count() or 1
    batch: list[str] = []
    for text in chunks:
        characters += len(text)
        nbytes += len(text.encode("utf-8"))
        if not bpe:
            sink.append(tokenizer.encode(text, dtype=sink.dtype))
            continue
        batch.append(text)
        if len(batch) == threads:
            _encode_batch(tokenizer, batch, sink, threads)
            batch = []
    if bpe:
        _encode_batch(tokenizer, batch, sink, threads)
    return characters, nbytes


def _encode_batch(
    tokenizer: TiktokenTokenizer, batch: list[str], sink: TokenSink, threads: int
) -> None:
    for ids in tokenizer.encoding.encode_ordinary_batch(batch, num_threads=threads):
        sink.append(np.asarray(ids, dtype=sink.dtype))


def _normalized_chunks(
    path: Path,
    chunk_bytes: int,
    normalize: str | None,
    encoding_errors: str,
    what: str,
    start: int = 0,
    end: int | None = None,
) -> Iterator[str]:
    from tqdm import tqdm

    end = path.stat().st_size if end is None else end
    with tqdm(
        total=end - start,
        unit="B",
        unit_scale=True,
        desc=f"{path.name}: {what}",
        disable=end - start < PROGRESS_BYTES,
        mininterval=2.0,  # a few lines in a log file, not thousands
    ) as bar:
        done = start
        for position, text in read_text_chunks(path, chunk_bytes, encoding_errors, start, end):
            bar.update(position - done)
            done = position
            yield unicodedata.normalize(normalize, text) if normalize else text
