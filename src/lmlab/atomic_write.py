"""Atomic file writes: a reader never sees a half-written file."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from lmlab.errors import LmlabError

log = logging.getLogger(__name__)

NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
# torch.save reports a failed write as a RuntimeError from its zip writer, not as an OSError
TORCH_WRITE_FAILED = ("unexpected pos", "file write failed")
STALE_AFTER_S = 24 * 3600  # a temporary file this old belongs to no running write
# `.{name}.{host}.{pid}.{random}.tmp`: the writer's host and pid tell a dead writer's leftovers
# (`.{name}.{random}.tmp`: an older lmlab's, removed only when stale)
_TEMP = re.compile(r"(?:(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.)?[a-z0-9_]{8}\.tmp")


def atomic_write_bytes(
    path: str | Path, write: Callable[[BinaryIO], None], size_hint: int = 0
) -> None:
    """Call `write(file)` on a temporary file beside `path`, then rename it to `path`: the
    rename is atomic within a directory, so `path` holds the old content or the new, whole.
    A full disk is an LmlabError saying how much was needed (`size_hint` bytes, or what was
    written before the failure, whichever is more) and how much is free."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    prefix = f".{path.name}.{host_name()}.{os.getpid()}."
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=".tmp")
    written = 0
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                write(f)
                f.flush()
                os.fsync(f.fileno())  # the data is on disk before the name points at it
            finally:
                written = _position(f)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; give the usual mode
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, Exception) and _is_disk_full(err):
            raise LmlabError(_no_space_message(path, max(written, size_hint))) from err
        raise


def remove_stale_temporaries(path: Path) -> None:
    """Remove the temporary files that interrupted writes to `path` left beside it: those of a
    process on this host that is gone, and any older than a day."""
    prefix, host = f".{path.name}.", host_name()
    try:
        entries = [e for e in os.scandir(path.parent) if e.name.startswith(prefix)]
    except OSError:
        return
    for entry in entries:
        match = _TEMP.fullmatch(entry.name[len(prefix) :])
        if match is None:
            continue  # not a temporary of this target (another file whose name starts alike)
        try:
            old = time.time() - entry.stat(follow_symlinks=False).st_mtime > STALE_AFTER_S
            dead = match["host"] == host and not process_alive(int(match["pid"]))
            if (old or dead) and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                log.info("removed %s, left by a run that did not finish", entry.path)
        except OSError:
            pass  # removed by another writer meanwhile, or not ours to remove


def process_alive(pid: int) -> bool:
    """Whether process `pid` of this host is running (another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process (or a number no pid can be): keep its file
    return True


def host_name() -> str:
    """This host's name, safe in a file name: temporaries carry it with their writer's pid."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"


def _position(f: BinaryIO) -> int:
    try:
        return f.tell()
    except (OSError, ValueError):
        return 0


def _is_disk_full(err: BaseException) -> bool:
    """Whether `err`, or an error it came from, is a write that found no space."""
    seen: set[int] = set()
    chain: BaseException | None = err
    while chain is not None and id(chain) not in seen:
        seen.add(id(chain))
        if isinstance(chain, OSError) and chain.errno in NO_SPACE:
            return True
        failed = isinstance(chain, RuntimeError) and any(
            m in str(chain) for m in TORCH_WRITE_FAILED
        )
        if failed and not isinstance(chain.__cause__ or chain.__context__, OSError):
            return True  # torch gave no reason (a save to a path): a failed write is a full disk
        chain = chain.__cause__ or chain.__context__
    return False


def _no_space_message(path: Path, needed: int) -> str:
    try:
        free = f"{_mb(shutil.disk_usage(path.parent).free)} free on that file system"
    except OSError:
        free = "free space unknown"
    return (
        f"no space left on device writing {path}: at least {_mb(needed)} were needed ({free}); "
        "free some space or set paths.output_dir to another disk"
    )


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    data = text.encode("utf-8")
    atomic_write_bytes(path, lambda f: f.write(data), size_hint=len(data))


def atomic_write_json(path: str | Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
