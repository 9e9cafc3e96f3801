"""Token streams cached on disk: a corpus is tokenized once and memory-mapped afterwards.

An entry is `NAME.bin` and `NAME.json`. The `.bin` holds the token ids of every part of the
corpus (train, val, test, one after the other) in the smallest unsigned type that holds the
vocabulary, followed for multi-document corpora by each document's length in tokens. The
`.json` sidecar says where each array starts, the tokenizer's state, and a CRC-32 of the
whole `.bin`, which is verified every time the entry is loaded: a damaged entry is rebuilt,
never trained on. NAME ends in a key that hashes the corpus file's content and every setting
that changes the tokens, so a changed corpus or tokenizer never meets a stale entry.

Both files are written to a temporary file first and renamed into place, the sidecar last: an
entry with a sidecar is complete. A run killed half-way leaves a `.tmp` file named after its
host and process; a later run removes it once that process is gone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import tempfile
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np

from lmlab.data.corpus import sha256_of
from lmlab.files import atomic_write_text

log = logging.getLogger(__name__)

# Bump when the bytes of an entry would change for the same corpus and settings.
FORMAT_VERSION = 2
STALE_SECONDS = 24 * 3600  # a temporary file this old is left over, whoever wrote it
_READ_BYTES = 16 << 20


def cache_key(corpus: Path, settings: dict[str, Any]) -> str:
    """A hash of the corpus content and of the settings that decide its tokens."""
    described = {"format": FORMAT_VERSION, "corpus_sha256": sha256_of(corpus), **settings}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:20]


def file_crc32(path: Path) -> int:
    """CRC-32 of a file, read in pieces into one buffer: the file is not mapped, so checking
    a 1 GB entry does not count 1 GB in the process's memory."""
    crc = 0
    buffer = bytearray(_READ_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            crc = zlib.crc32(view[:n], crc)
    return crc


class CacheWriteError(OSError):
    """The cache file could not be written (a full disk): the caller tokenizes without it."""


class TokenCache:
    """The entry of one corpus under one key in `directory`."""

    def __init__(self, directory: str | Path, corpus: Path, label: str, key: str):
        self.directory = Path(directory).expanduser()
        self.key = key
        readable = re.sub(r"[^\w.-]+", "_", f"{corpus.stem}-{label}")
        self.bin_path = self.directory / f"{readable}-{key}.bin"
        self.meta_path = self.bin_path.with_suffix(".json")

    def load(self) -> dict[str, Any] | None:
        """The entry's sidecar when the entry is whole and its CRC-32 matches; None (and a
        warning for an entry that exists but cannot be trusted) otherwise."""
        try:
            meta = json.loads(self.meta_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            return self._refuse(f"its sidecar {self.meta_path.name} is unreadable ({err})")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
            return self._refuse("it was written by another version of lmlab")
        if meta.get("key") != self.key:
            return self._refuse("its sidecar belongs to another corpus or settings")
        try:
            size = self.bin_path.stat().st_size
            if size != meta["bytes"]:
                return self._refuse(f"{self.bin_path.name} has {size} bytes, not {meta['bytes']}")
            started = time.perf_counter()
            crc = file_crc32(self.bin_path)
        except (OSError, KeyError, TypeError) as err:
            return self._refuse(f"{self.bin_path.name} cannot be read ({err})")
        if crc != meta.get("crc32"):
            return self._refuse(
                f"the CRC-32 of {self.bin_path.name} is {crc:08x}, its sidecar says "
                f"{meta.get('crc32', 0):08x}: bytes of the file were changed"
            )
        log.debug("token cache: CRC-32 checked in %.2f s", time.perf_counter() - started)
        return meta

    def _refuse(self, why: str) -> None:
        log.warning("token cache entry %s is damaged: %s; tokenizing again", self.bin_path, why)
        return None

    def array(self, meta: dict[str, Any], name: str) -> np.ndarray | None:
        """One array of a loaded entry, memory-mapped (nothing read until used)."""
        spec = meta["arrays"].get(name)
        if spec is None:
            return None
        return _map(self.bin_path, np.dtype(spec["dtype"]), spec["count"], spec["offset"])

    def sink(self, dtype: np.dtype) -> TokenSink:
        """A temporary file in the cache directory, or a sink without a cache when that
        directory cannot be written (the run goes on, tokenizing every time)."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.remove_stale_temporaries()
            tmp = self.bin_path.with_name(
                f"{self.bin_path.name}.{_host()}.{os.getpid()}.{os.urandom(3).hex()}.tmp"
            )
            # open(), not mkstemp: the entry gets the usual mode (umask), readable by the
            # other users of a shared cache
            file = open(tmp, "x+b")  # noqa: SIM115 (the sink closes it)
        except OSError as err:
            log.warning(
                "token cache %s cannot be written (%s); tokenizing without a cache. Set "
                "data.cache_dir to a writable directory to tokenize this corpus only once",
                self.directory,
                err,
            )
            return TokenSink(dtype)
        return TokenSink(dtype, file, self)

    def remove_stale_temporaries(self) -> None:
        """Delete this entry's temporary files whose writer is gone (killed half-way)."""
        for tmp in self.directory.glob(f"{self.bin_path.name}.*.tmp"):
            parts = tmp.name[len(self.bin_path.name) + 1 :].split(".")
            try:
                age = time.time() - tmp.stat().st_mtime
                host, pid = parts[0], int(parts[1])
            except (OSError, IndexError, ValueError):
                continue
            if age > STALE_SECONDS or (host == _host() and not _process_alive(pid)):
                tmp.unlink(missing_ok=True)
                log.info("token cache: removed %s, left by a run that did not finish", tmp.name)

    def write_meta(self, meta: dict[str, Any]) -> None:
        atomic_write_text(self.meta_path, json.dumps(meta, indent=1))


class TokenSink:
    """Token ids appended to a file (the cache's temporary file, or an anonymous one that
    keeps a big corpus out of memory): `finish()` maps them, `commit()` publishes the entry."""

    def __init__(
        self, dtype: np.dtype, file: IO[bytes] | None = None, cache: TokenCache | None = None
    ):
        self.dtype = np.dtype(dtype)
        self.file = file if file is not None else tempfile.TemporaryFile()  # noqa: SIM115
        self.cache = cache
        self.num_tokens = 0
        self.num_bytes = 0
        self.crc32 = 0
        self.arrays: dict[str, dict[str, Any]] = {}

    @property
    def cached_at(self) -> Path | None:
        return self.cache.bin_path if self.cache is not None else None

    def append(self, ids: np.ndarray) -> None:
        self._write(np.ascontiguousarray(ids, dtype=self.dtype))
        self.num_tokens += len(ids)

    def _write(self, array: np.ndarray) -> None:
        data = memoryview(array).cast("B")
        with self._cache_errors():
            self.file.write(data)
        self.crc32 = zlib.crc32(data, self.crc32)
        self.num_bytes += len(data)

    @contextmanager
    def _cache_errors(self) -> Iterator[None]:
        """A failed write to the cache's file (a full disk) is a CacheWriteError: the caller
        tokenizes without the cache. Without one, the error is the caller's to see."""
        try:
            yield
        except OSError as err:
            if self.cache is None:
                raise
            raise CacheWriteError(err.errno, f"{self.cache.directory}: {err.strerror}") from err

    def finish(self, document_lengths: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
        """The ids (and the documents' lengths, when given), memory-mapped from the file."""
        self.arrays["ids"] = {"dtype": self.dtype.name, "offset": 0, "count": self.num_tokens}
        if document_lengths is not None:
            lengths = np.ascontiguousarray(document_lengths, dtype=np.uint32)
            self._write(np.zeros(-self.num_bytes % 8, dtype=np.uint8))  # aligned for mapping
            self.arrays["document_lengths"] = {
                "dtype": "uint32",
                "offset": self.num_bytes,
                "count": len(lengths),
            }
            self._write(lengths)
        with self._cache_errors():
            self.file.flush()
        mapped = tuple(
            _map(self.file, np.dtype(spec["dtype"]), spec["count"], spec["offset"])
            for spec in self.arrays.values()
        )
        self.file.close()
        return mapped

    def commit(self, meta: dict[str, Any]) -> None:
        """Rename the finished file into place, then write the sidecar that vouches for it."""
        if self.cache is None:
            return
        tmp = Path(self.file.name)
        meta.update(
            format=FORMAT_VERSION,
            key=self.cache.key,
            bytes=self.num_bytes,
            crc32=self.crc32,
            arrays=self.arrays,
        )
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


class MemorySink(TokenSink):
    """Ids kept in memory: what is left when the cache's disk fills up half-way."""

    def __init__(self, dtype: np.dtype):
        self.dtype = np.dtype(dtype)
        self.cache = None
        self.num_tokens = 0
        self.pieces: list[np.ndarray] = []

    def append(self, ids: np.ndarray) -> None:
        self.pieces.append(np.asarray(ids, dtype=self.dtype))
        self.num_tokens += len(ids)

    def finish(self, document_lengths: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
        ids = np.concatenate(self.pieces) if self.pieces else np.zeros(0, self.dtype)
        if document_lengths is None:
            return (ids,)
        return ids, np.asarray(document_lengths, dtype=np.uint32)

    def commit(self, meta: dict[str, Any]) -> None:
        pass

    def discard(self) -> None:
        self.pieces = []


def _map(file: Path | IO[bytes], dtype: np.dtype, count: int, offset: int = 0) -> np.ndarray:
    if count == 0:  # mmap cannot map an empty range
        return np.zeros(0, dtype=dtype)
    # mode "c": writable for torch.from_numpy (no warning), yet never writes to the file.
    return np.memmap(file, dtype=dtype, mode="c", shape=(count,), offset=offset)


def _host() -> str:
    return re.sub(r"[^\w-]+", "_", socket.gethostname()) or "host"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True
