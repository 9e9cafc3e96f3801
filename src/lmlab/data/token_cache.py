"""The tokens of a corpus's parts, and the verified cache that keeps them on disk: a corpus is
tokenized once and memory-mapped afterwards.

An entry is `NAME.bin`, the ids of every part one after the other (in the smallest unsigned
type that holds the vocabulary) then each document's length in tokens, and its sidecar
`NAME.json`: where each array starts, the tokenizer's state and a CRC-32 of the `.bin`,
checked at every load (a damaged entry is rebuilt, never trained on). NAME ends in a hash of
the corpus's content and of every setting that changes the tokens. Both files are renamed
into place, the sidecar last, so an entry with a sidecar is whole; a killed run's temporary
file is named after its host and process, and removed once that process is gone."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from lmlab.atomic_write import atomic_write_text, host_name, process_alive
from lmlab.data.corpus import sha256_of
from lmlab.data.tokenizers import Tokenizer, document_views, tokenizer_from_state

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # bump when the bytes of an entry would change for the same corpus
STALE_SECONDS = 24 * 3600  # a temporary file this old is left over, whoever wrote it


@dataclass
class PartStats:
    """What one part of the corpus holds: enough to check that two runs saw the same text."""

    documents: int
    characters: int
    bytes: int
    tokens: int = 0
    start: int = 0  # where its tokens begin in the corpus's stream

    @classmethod
    def of_documents(cls, documents: list[str], tokens: int, start: int = 0) -> PartStats:
        """A part of whole documents: its text is theirs joined with one `\\n`."""
        joins = len(documents) - 1
        nbytes = sum(len(d.encode("utf-8")) for d in documents) + joins
        return cls(len(documents), sum(map(len, documents)) + joins, nbytes, tokens, start)

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
    parts: dict[str, PartStats]  # in stream order
    document_lengths: np.ndarray | None = None  # tokens of each document, in part order

    def part(self, name: str) -> np.ndarray | None:
        stats = self.parts.get(name)
        return None if stats is None else self.ids[stats.start : stats.start + stats.tokens]

    def documents(self, name: str) -> list[np.ndarray]:
        """The token ids of each document of a part (boundaries left out)."""
        if self.document_lengths is None:  # a single-document corpus: each part is one
            return [self.part(name)]
        names, stats = list(self.parts), self.parts[name]
        first = sum(self.parts[p].documents for p in names[: names.index(name)])
        lengths = self.document_lengths[first : first + stats.documents]
        return document_views(self.ids, lengths, stats.start)


class CacheWriteError(OSError):
    """The cache file could not be written (a full disk): the caller tokenizes without it."""


class TokenCache:
    """The entry of one corpus in `directory`, under a key from its content and `settings`."""

    def __init__(self, directory: str | Path, corpus: Path, label: str, settings: dict[str, Any]):
        self.directory = Path(directory).expanduser()
        described = {"format": FORMAT_VERSION, "corpus_sha256": sha256_of(corpus), **settings}
        self.key = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:20]
        readable = re.sub(r"[^\w.-]+", "_", f"{corpus.stem}-{label}")
        self.bin_path = self.directory / f"{readable}-{self.key}.bin"
        self.meta_path = self.bin_path.with_suffix(".json")

    def load(self, named_tokenizer: Callable[[], Tokenizer | None]) -> CorpusTokens | None:
        """The entry's tokens, memory-mapped, when it is whole and its CRC-32 matches; else None
        (and a warning for an entry that cannot be trusted)."""
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
            crc = 0  # read in pieces, not mapped: checking a big entry costs no memory
            with open(self.bin_path, "rb", buffering=0) as f:
                for chunk in iter(lambda: f.read(16 << 20), b""):
                    crc = zlib.crc32(chunk, crc)
        except (OSError, KeyError, TypeError) as err:
            return self._refuse(f"{self.bin_path.name} cannot be read ({err})")
        if crc != meta.get("crc32"):
            return self._refuse(
                f"the CRC-32 of {self.bin_path.name} is {crc:08x}, its sidecar says "
                f"{meta.get('crc32', 0):08x}: bytes of the file were changed"
            )
        state = meta["tokenizer"]  # a fitted vocabulary is stored; a named one is built again
        tokenizer = tokenizer_from_state(state) if state else named_tokenizer()
        parts = {name: PartStats(**stats) for name, stats in meta["parts"].items()}
        arrays = {name: _map(self.bin_path, **spec) for name, spec in meta["arrays"].items()}
        log.info("tokens: loaded from cache %s (%d tokens)", self.bin_path, len(arrays["ids"]))
        return CorpusTokens(arrays["ids"], tokenizer, parts, arrays.get("document_lengths"))

    def _refuse(self, why: str) -> None:
        log.warning("token cache entry %s is damaged: %s; tokenizing again", self.bin_path, why)

    def sink(self, dtype: np.dtype) -> TokenSink:
        """A temporary file in the cache directory; a sink without a cache if it is read-only."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._remove_stale_temporaries()
            tmp = f"{self.bin_path.name}.{host_name()}.{os.getpid()}.{os.urandom(3).hex()}.tmp"
            # open(), not mkstemp: the entry gets the usual mode (umask), readable by the
            # other users of a shared cache
            file = open(self.bin_path.with_name(tmp), "x+b")  # noqa: SIM115 (the sink closes it)
        except OSError as err:
            log.warning(
                "token cache %s cannot be written (%s); tokenizing without a cache. Set "
                "data.cache_dir to a writable directory to tokenize this corpus only once",
                self.directory,
                err,
            )
            return TokenSink(dtype)
        return TokenSink(dtype, file, self)

    def _remove_stale_temporaries(self) -> None:
        """Delete this entry's temporary files whose writer is gone (killed half-way)."""
        for tmp in self.directory.glob(f"{self.bin_path.name}.*.tmp"):
            parts = tmp.name[len(self.bin_path.name) + 1 :].split(".")
            try:
                age = time.time() - tmp.stat().st_mtime
                host, pid = parts[0], int(parts[1])
            except (OSError, IndexError, ValueError):
                continue
            if age > STALE_SECONDS or (host == host_name() and not process_alive(pid)):
                tmp.unlink(missing_ok=True)
                log.info("token cache: removed %s, left by a run that did not finish", tmp.name)


class TokenSink:
    """Token ids appended to the cache's temporary file, an anonymous one (a big corpus stays
    out of memory) or a BytesIO (the disk is full). `finish()` maps them, `commit()` publishes."""

    def __init__(
        self, dtype: np.dtype, file: IO[bytes] | None = None, cache: TokenCache | None = None
    ):
        self.dtype = np.dtype(dtype)
        self.file = file if file is not None else tempfile.TemporaryFile()  # noqa: SIM115
        self.cache = cache
        self.num_tokens = self.num_bytes = self.crc32 = 0
        self.arrays: dict[str, dict[str, Any]] = {}

    def append(self, ids: np.ndarray) -> None:
        self._write(np.ascontiguousarray(ids, dtype=self.dtype))
        self.num_tokens += len(ids)

    def _write(self, array: np.ndarray) -> None:
        """A failed write to the cache's file (a full disk) is a CacheWriteError."""
        data = memoryview(array).cast("B")
        try:
            self.file.write(data)
            self.file.flush()  # all on disk whenever finish() maps the file
        except OSError as err:
            if self.cache is None:
                raise
            raise CacheWriteError(err.errno, f"{self.cache.directory}: {err.strerror}") from err
        self.crc32 = zlib.crc32(data, self.crc32)
        self.num_bytes += len(data)

    def finish(self, document_lengths: np.ndarray | None = None) -> list[np.ndarray]:
        """The ids (and the documents' lengths, when given), memory-mapped from the file."""
        self.arrays["ids"] = {"dtype": self.dtype.name, "offset": 0, "count": self.num_tokens}
        if document_lengths is not None:
            self._write(np.zeros(-self.num_bytes % 8, dtype=np.uint8))  # aligned for mapping
            spec = {"dtype": "uint32", "offset": self.num_bytes, "count": len(document_lengths)}
            self.arrays["document_lengths"] = spec
            self._write(np.ascontiguousarray(document_lengths, dtype=np.uint32))
        mapped = [_map(self.file, **spec) for spec in self.arrays.values()]
        self.file.close()
        return mapped

    def commit(self, meta: dict[str, Any]) -> None:
        """Rename the finished file into place, then write the sidecar that vouches for it."""
        if self.cache is None:
            return
        tmp = Path(self.file.name)
        meta.update(format=FORMAT_VERSION, key=self.cache.key, bytes=self.num_bytes)
        meta.update(crc32=self.crc32, arrays=self.arrays)
        try:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())  # the data is on disk before a name points to it
            os.replace(tmp, self.cache.bin_path)
            atomic_write_text(self.cache.meta_path, json.dumps(meta, indent=1))
        except OSError as err:
            log.warning("token cache %s not written (%s)", self.cache.bin_path, err)
            self.cache = None
        finally:
            tmp.unlink(missing_ok=True)

    def discard(self) -> None:
        self.file.close()
        if self.cache is not None:
            Path(self.file.name).unlink(missing_ok=True)


def _map(file: Path | IO[bytes], dtype: str, count: int, offset: int = 0) -> np.ndarray:
    if count == 0:  # mmap cannot map an empty range
        return np.zeros(0, dtype=dtype)
    if isinstance(file, io.BytesIO):  # a copy: the BytesIO is closed next
        return np.frombuffer(bytearray(file.getbuffer()), dtype, count, offset)
    # mode "c": writable for torch.from_numpy (no warning), yet never writes to the file.
    return np.memmap(file, dtype=dtype, mode="c", shape=(count,), offset=offset)
