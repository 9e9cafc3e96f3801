"""Faults around checkpoints: a full disk while saving, leftovers of killed writes, crafted
hyperparameters, file:// paths, and a corpus path that is not a file."""

from __future__ import annotations

import errno
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import run_lmlab

from lmlab import atomic_write
from lmlab.atomic_write import atomic_write_bytes, atomic_write_json
from lmlab.checkpoint import (
    USE_INSTEAD,
    AtomicCheckpointIO,
    check_resumable,
    load_for_sampling,
    read_checkpoint,
)
from lmlab.data.corpus import check_corpus_file
from lmlab.errors import LmlabError
from lmlab.models import MODELS, build_model


def good_checkpoint() -> dict:
    """A plain-data checkpoint of a 3-character bigram model, as lmlab-train would save it."""
    model = build_model("bigram", vocab_size=3, block_size=8)
    return {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "hyper_parameters": {
            "model_name": "bigram",
            "model_hparams": {"vocab_size": 3, "block_size": 8},
            "tokenizer_state": {"kind": "char", "chars": ["a", "b", "c"]},
        },
    }


class FullDisk(io.FileIO):
    """A file on a disk that fills up after `room` bytes."""

    room = 600

    def write(self, data) -> int:
        if self.tell() + len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)


@pytest.fixture
def full_disk(monkeypatch):
    monkeypatch.setattr(atomic_write.os, "fdopen", lambda fd, mode: FullDisk(fd, "wb"))


NO_SPACE = "no space left on device writing {}: at least "
FREE_SOME = "free on that file system); free some space or set paths.output_dir to another disk"


def test_full_disk_keeps_the_last_good_checkpoint(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "checkpoints" / "last.ckpt"
    checkpoint = good_checkpoint()
    checkpoint["state_dict"]["model.big"] = torch.zeros(250_000)  # 1 MB
    AtomicCheckpointIO().save_checkpoint(checkpoint, path)  # the control: a disk with room
    assert read_checkpoint(path)["state_dict"]["model.big"].shape == (250_000,)
    before = path.read_bytes()
    monkeypatch.setattr(atomic_write.os, "fdopen", lambda fd, mode: FullDisk(fd, "wb"))
    checkpoint["state_dict"]["model.big"] = torch.ones(250_000)
    with pytest.raises(LmlabError) as err:
        AtomicCheckpointIO().save_checkpoint(checkpoint, path)
    message = str(err.value)
    assert message.startswith(NO_SPACE.format(path) + "1.0 MB were needed (")
    assert message.endswith(FREE_SOME) and "\n" not in message
    assert path.read_bytes() == before  # untouched, and still loadable
    assert read_checkpoint(path)["state_dict"]["model.big"].sum() == 0
    assert os.listdir(path.parent) == ["last.ckpt"]  # no temporary file left


def test_full_disk_for_any_atomic_write(tmp_path: Path, full_disk) -> None:
    path = tmp_path / "metrics.json"
    with pytest.raises(LmlabError, match="no space left on device writing .*metrics.json: at"):
        atomic_write_json(path, {"loss": "x" * 2000})
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("errno_", [errno.ENOSPC, errno.EDQUOT])
def test_full_disk_and_quota_errors(tmp_path: Path, errno_: int) -> None:
    def write(f):
        f.write(b"x" * 3_000_000)
        raise OSError(errno_, os.strerror(errno_))

    with pytest.raises(LmlabError, match=r"writing .*out.bin: at least 3.0 MB were needed \("):
        atomic_write_bytes(tmp_path / "out.bin", write)


def test_torch_write_failure_without_a_reason(tmp_path: Path) -> None:
    def torch_fails(f):  # what torch.save to a path raises on a full disk
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    with pytest.raises(LmlabError, match="no space left on device writing "):
        atomic_write_bytes(tmp_path / "a.ckpt", torch_fails, size_hint=5_000_000)
    # other errors stay what they are
    for error in (RuntimeError("CUDA error"), OSError(errno.EIO, "I/O error")):

        def fails(f, error=error):
            raise error

        with pytest.raises(type(error)) as err:
            atomic_write_bytes(tmp_path / "a.ckpt", fails)
        assert not isinstance(err.value, LmlabError)
    assert os.listdir(tmp_path) == []


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_leftovers_of_killed_writes_are_removed(tmp_path: Path) -> None:
    host, name = atomic_write.host_name(), "metrics.json"
    dead = tmp_path / f".{name}.{host}.{dead_pid()}.abcd1234.tmp"
    live = tmp_path / f".{name}.{host}.{os.getpid()}.abcd1234.tmp"
    elsewhere = tmp_path / f".{name}.otherhost.{dead_pid()}.abcd1234.tmp"  # may be running
    old = tmp_path / f".{name}.zyxw9876.tmp"  # an older lmlab's, two days old
    fresh = tmp_path / f".{name}.zyxw5432.tmp"
    other = tmp_path / f".{name}.backup.tmp"  # not a temporary of ours
    other_target = tmp_path / f".{name}.1.{host}.{dead_pid()}.abcd1234.tmp"  # of metrics.json.1
    for path in (dead, live, elsewhere, old, fresh, other, other_target):
        path.write_text("partial")
    two_days_ago = time.time() - 2 * 86400
    os.utime(old, (two_days_ago, two_days_ago))
    seen: list[str] = []
    atomic_write_bytes(tmp_path / name, lambda f: seen.extend(os.listdir(tmp_path)))
    left = set(os.listdir(tmp_path))
    assert not dead.exists() and not old.exists()
    assert {p.name for p in (live, elsewhere, fresh, other, other_target)} <= left
    assert left == {p.name for p in (live, elsewhere, fresh, other, other_target)} | {name}
    # this write's own temporary file carries this host and pid
    (own,) = set(seen) - left
    assert own.startswith(f".{name}.{host}.{os.getpid()}.") and own.endswith(".tmp")


def crafted(tmp_path: Path, name: str, change) -> Path:
    checkpoint = good_checkpoint()
    change(checkpoint["hyper_parameters"])
    path = tmp_path / f"{name}.ckpt"
    torch.save(checkpoint, path)
    return path


def gpt(h, **settings):
    h["model_name"] = "gpt"
    h["model_hparams"] = {"vocab_size": 3, "block_size": 8, "n_head": 1, "n_embd": 4, **settings}


BAD_HPARAMS = {
    "n_head string": (lambda h: gpt(h, n_head="x"), "model_hparams.n_head is 'x', not a whole"),
    "n_head float": (lambda h: gpt(h, n_head=2.5), "model_hparams.n_head is 2.5, not a whole"),
    "bool as int": (lambda h: gpt(h, n_layer=True), "model_hparams.n_layer is True, not a whole"),
    "negative": (lambda h: gpt(h, n_layer=-1), "model_hparams.n_layer is -1, not between 0 and"),
    "dropout": (
        lambda h: gpt(h, dropout=float("nan")),
        "model_hparams.dropout is nan, not a finite",
    ),
    "bias": (lambda h: gpt(h, bias="yes"), "model_hparams.bias is 'yes', not true or false"),
    "huge vocab": (
        lambda h: h["model_hparams"].update(vocab_size=50_000_000),
        "model_hparams.vocab_size is 50000000, over 10,000,000 tokens",
    ),
    "huge model": (
        lambda h: gpt(h, n_embd=2**16, n_layer=100),
        "its model_hparams describe about 5.2e+12 parameters, over 6.9e+10",
    ),
    "unknown model": (
        lambda h: h.update(model_name="transformer9000"),
        f"model_name is 'transformer9000', not one of lmlab's models {sorted(MODELS)}",
    ),
    "hparams not a dict": (
        lambda h: h.update(model_hparams="lots"),
        "model_hparams is str, not a mapping of settings",
    ),
    "unknown setting": (
        lambda h: h["model_hparams"].update(n_wings=2),
        "model_hparams has ['n_wings'], which model 'bigram' does not take",
    ),
    "missing setting": (
        lambda h: h["model_hparams"].pop("vocab_size"),
        "model_hparams lacks ['vocab_size'], which model 'bigram' needs",
    ),
    "no chars": (
        lambda h: h.update(tokenizer_state={"kind": "char"}),
        "tokenizer_state.chars is not a list of the tokenizer's characters",
    ),
    "long chars": (
        lambda h: h["tokenizer_state"].update(chars=["ab", "c"]),
        "tokenizer_state.chars holds something other than single characters",
    ),
    "unknown tokenizer": (
        lambda h: h.update(tokenizer_state={"kind": "sentencepiece"}),
        "tokenizer_state.kind is 'sentencepiece', not 'char', 'words' or 'tiktoken'",
    ),
    "tokenizer not a dict": (
        lambda h: h.update(tokenizer_state=["a"]),
        "tokenizer_state is list, not a mapping",
    ),
}


@pytest.mark.parametrize("name", BAD_HPARAMS)
def test_crafted_hyperparameters_are_refused(tmp_path: Path, name: str) -> None:
    change, fragment = BAD_HPARAMS[name]
    path = crafted(tmp_path, name.replace(" ", "_"), change)
    for check in (read_checkpoint, load_for_sampling, check_resumable):
        with pytest.raises(LmlabError) as err:
            check(path)
        expected = f"{path} is not a usable lmlab checkpoint: {fragment}"
        assert str(err.value).startswith(expected), check.__name__
        assert str(err.value).endswith(f"; {USE_INSTEAD}")


def test_the_good_checkpoint_passes_every_check(tmp_path: Path) -> None:
    path = crafted(tmp_path, "good", lambda h: None)
    assert read_checkpoint(path)["hyper_parameters"]["model_name"] == "bigram"
    assert check_resumable(path)["model_hparams"] == {"vocab_size": 3, "block_size": 8}
    model, tokenizer = load_for_sampling(path)
    assert tokenizer.decode([0, 2]) == "ac"
    gpt_path = crafted(tmp_path, "gpt", lambda h: gpt(h, dropout=0.1, bias=True))
    assert read_checkpoint(gpt_path)["hyper_parameters"]["model_name"] == "gpt"


def test_settings_the_model_refuses_name_the_checkpoint(tmp_path: Path) -> None:
    path = crafted(tmp_path, "zero", lambda h: gpt(h, n_head=0))
    with pytest.raises(LmlabError) as err:
        load_for_sampling(path)
    assert str(err.value) == (
        f"{path} is not a usable lmlab checkpoint: model.n_head must be a positive integer, "
        f"got 0; {USE_INSTEAD}"
    )


def test_lmlab_sample_refuses_crafted_hyperparameters(tmp_path: Path) -> None:
    path = crafted(tmp_path, "n_head", lambda h: gpt(h, n_head="x"))
    result = run_lmlab("sample", f"ckpt_path={path}")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"lmlab-sample: error: {path} is not a usable lmlab checkpoint: model_hparams.n_head is "
        f"'x', not a whole number; {USE_INSTEAD}"
    )
    assert "Traceback" not in result.stdout + result.stderr


def test_file_urls_are_checked_as_local_paths(tmp_path: Path) -> None:
    good = crafted(tmp_path, "good", lambda h: None)
    assert check_resumable(f"file://{good}")["model_name"] == "bigram"
    assert load_for_sampling(f"file://{good}")[1].decode([1]) == "b"
    with pytest.raises(LmlabError, match=f"^checkpoint not found: {tmp_path}/nope.ckpt; give"):
        check_resumable(f"file://{tmp_path}/nope.ckpt")
    bad = crafted(tmp_path, "bad", lambda h: gpt(h, n_head="x"))
    for url in (f"file://{bad}", f"file://localhost{bad}", f"file:{bad}"):
        with pytest.raises(LmlabError, match="n_head is 'x', not a whole number"):
            check_resumable(url)
    # other schemes (and a file on another host) are Lightning's to resolve
    for url in ("s3://bucket/run/last.ckpt", "file://otherhost/x.ckpt", "last"):
        assert check_resumable(url) is None


def test_corpus_path_that_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(LmlabError) as err:
        check_corpus_file(tmp_path)
    assert str(err.value) == (
        f"{tmp_path} is a directory; give data.path=FILE, a text/TSV/CSV/JSONL file"
    )
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(LmlabError) as err:
        check_corpus_file(fifo)
    assert str(err.value) == f"{fifo} is not a regular file (a FIFO or device); give a file"
    with pytest.raises(LmlabError) as err:
        check_corpus_file(tmp_path / "nope.txt")
    assert str(err.value) == f"corpus file not found: {tmp_path / 'nope.txt'} (check data.path)"
    text = tmp_path / "tiny.txt"
    text.write_text("some text\n")
    assert check_corpus_file(text) == text
