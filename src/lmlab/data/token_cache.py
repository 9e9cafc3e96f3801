"""Token streams cached on disk: a corpus is tokenized once and memory-mapped afterwards.

An entry is `NAME.bin` (the ids as uint8, uint16 or uint32: the smallest that holds the
vocabulary) and `NAME.json` (the tokenizer's state, the number of tokens, the format
version). NAME ends in a key that hashes the corpus file's content and every setting that
changes the tokens, so a changed corpus or tokenizer never meets a stale entry. Both files
are written to a temporary file first and renamed into place, the sidecar last: an entry
with a sidecar is complete, and a run killed half-way leaves only a `.tmp` file that is
never read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import IO, Any

import numpy as np

from lmlab.data.corpus import sha256_of
from lmlab.files import atomic_write_text

log = logging.getLogger(__name__)

# Bump when the bytes of an entry would change for the same corpus and settings.
FORMAT_VERSION = 1


def cache_key(corpus: Path, settings: dict[str, Any]) -> str:
    """A hash of the corpus content and of the settings that decide its tokens."""
    described = {"format": FORMAT_VERSION, "corpus_sha256": sha256_of(corpus), **settings}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:20]


class TokenCache:
    """The entry of one corpus under one key in `directory`."""

    def __init__(self, directory: str | Path, corpus: Path, label: str, key: str):
        self.directory = Path(directory).expanduser()
        self.key = key
        readable = re.sub(r"[^\w.-]+", "_", f"{corpus.stem}-{label}")
        self.bin_path = self.directory / f"{readable}-{key}.bin"
        self.meta_path = self.bin_path.with_suffix(".json")

    def load(self) -> tuple[np.ndarray, dict[str, Any]] | None:
        """The cached ids (a copy-on-write memmap: nothing read until used) and sidecar."""
        try:
            meta = json.loads(self.meta_path.read_text())
            dtype = np.dtype(meta["dtype"])
            complete = self.bin_path.stat().st_size == meta["num_tokens"] * dtype.itemsize
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if meta.get("format") != FORMAT_VERSION or meta.get("key") != self.key or not complete:
            return None
        return _map(self.bin_path, dtype, meta["num_tokens"]), meta

    def sink(self, dtype: np.dtype) -> TokenSink:
        """A temporary file in the cache directory, or an anonymous one when that directory
        cannot be written (the run goes on, without a cache)."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            file = tempfile.NamedTemporaryFile(  # noqa: SIM115 (the sink closes it)
                dir=self.directory, prefix=self.bin_path.name + ".", suffix=".tmp", delete=False
            )
        except OSError as err:
            log.warning(
                "token cache %s cannot be written (%s); tokenizing without a cache. Set "
                "data.cache_dir to a writable directory to tokenize this corpus only once",
                self.directory,
                err,
            )
            return TokenSink(dtype)
        return TokenSink(dtype, file, self)

    def write_meta(self, meta: dict[str, Any]) -> None:
        atomic_write_text(self.meta_path, json.dumps(meta, indent=1))


class TokenSink:
    """Token ids appended to a file: `finish()` maps them, `commit()` publishes the entry."""

    def __init__(
        self, dtype: np.dtype, file: IO[bytes] | None = None, cache: TokenCache | None = None
    ):
        self.dtype = np.dtype(dtype)
        # Without a cache: an anonymous file, gone when closed, keeps the ids out of memory.
        self.file = file if file is not None else tempfile.TemporaryFile()  # noqa: SIM115
        self.cache = cache
        self.num_tokens = 0

    @property
    def cached_at(self) -> Path | None:
        return self.cache.bin_path if self.cache is not None else None

    def append(self, ids: np.ndarray) -> None:
        self.file.write(memoryview(np.ascontiguousarray(ids, dtype=self.dtype)))
        self.num_tokens += len(ids)

    def finish(self) -> np.ndarray:
        """The ids written, memory-mapped (the map outlives the file object and a rename)."""
        self.file.flush()
        ids = _map(self.file, self.dtype, self.num_tokens)
        self.file.close()
        return ids

    def commit(self, meta: dict[str, Any]) -> None:
        """Rename the finished file into place, then write the sidecar that vouches for it."""
        if self.cache is None:
            return
        tmp = Path(self.file.name)
        meta.update(format=FORMAT_VERSION, key=self.cache.key, dtype=self.dtype.name)
        try:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())  # the data is on disk before a name points to it
            os.replace(tmp, self.cache.bin_path)
            self.cache.write_meta(meta)
        except OSError as err:
            log.warning("token cache %s not written (%s)", self.cache.bin_path, err)
            self.cache = None
        finally:
            tmp.unlink(missing_ok=True)

    def discard(self) -> None:
        self.file.close()
        if self.cache is not None:
            Path(self.file.name).unlink(missing_ok=True)


def _map(file: Path | IO[bytes], dtype: np.dtype, num_tokens: int) -> np.ndarray:
    if num_tokens == 0:  # mmap cannot map an empty file
        return np.zeros(0, dtype=dtype)
    # mode "c": writable for torch.from_numpy (no warning), yet never writes to the file.
    return np.memmap(file, dtype=dtype, mode="c", shape=(num_tokens,))
