"""Exact resume, interruption by a signal, determinism and atomic checkpoints."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import TINY_GPT, compose_train
from lightning.pytorch.utilities.exceptions import SIGTERMException

import lmlab.train as train_module
from lmlab.errors import LmlabError
from lmlab.runs.render import read_scalars
from lmlab.train import train

# A small GPT with dropout: the resumed run must also continue the dropout draws.
GPT = [
    *TINY_GPT,
    "model.n_embd=32",  # wider than TINY_GPT's 16
    "model.dropout=0.1",
    "data.block_size=16",
    "data.batch_size=8",
    "trainer.accelerator=cpu",
    "trainer.max_steps=30",
    "trainer.val_check_interval=10",
    "trainer.log_every_n_steps=4",  # an interval mean in progress when the run stops
    "trainer.enable_progress_bar=false",
]


class SignalAtStep(L.Callback):
    """Sends this process a real signal once training has reached `step`."""

    def __init__(self, step: int, signum: int = signal.SIGTERM):
        self.step = step
        self.signum = signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def _with_callback(monkeypatch, callback: L.Callback) -> None:
    """Training also runs `callback`, after the configured ones."""
    build_run = train_module.build_run
    monkeypatch.setattr(
        train_module, "build_run", lambda cfg, extra=(): build_run(cfg, (*extra, callback))
    )


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.parametrize("examples", ["random", "sliding"])
def test_interrupted_and_resumed_run_ends_like_an_uninterrupted_one(
    tiny_corpus: Path, tmp_path: Path, monkeypatch, examples: str
):
    overrides = [f"data.path={tiny_corpus}", f"data.examples={examples}", *GPT]
    whole = train(compose_train(overrides, tmp_path / "whole"))

    stopped_dir = tmp_path / "stopped"
    with monkeypatch.context() as patch:
        _with_callback(patch, SignalAtStep(13))  # mid-epoch, between two validations
        with pytest.raises(SIGTERMException):
            train(compose_train(overrides, stopped_dir))
    last = stopped_dir / "checkpoints" / "last.ckpt"
    # the signal came during step 13: that step is finished, then saved
    assert torch.load(last, weights_only=True)["global_step"] == 14
    summary = json.loads((stopped_dir / "metrics.json").read_text())
    assert summary["status"] == "interrupted"

    resumed = train(compose_train([*overrides, f"ckpt_path={last}"], stopped_dir))
    assert resumed["steps"] == whole["steps"] == 30
    assert resumed["last"]["val/loss"] == pytest.approx(whole["last"]["val/loss"], abs=1e-6)
    a, b = _weights(tmp_path / "whole/checkpoints/last.ckpt"), _weights(last)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # the training curve after the resume is the uninterrupted one
    curve_whole = dict(read_scalars(tmp_path / "whole", ["train/loss"])["train/loss"])
    curve_resumed = dict(read_scalars(stopped_dir, ["train/loss"])["train/loss"])
    assert sorted(curve_resumed) == sorted(curve_whole) == [4, 8, 12, 16, 20, 24, 28]
    for step in (16, 20, 24, 28):  # 16: the interval the stop cut in two
        assert curve_resumed[step] == pytest.approx(curve_whole[step], abs=1e-5)


def test_ctrl_c_saves_a_checkpoint_after_the_step(tiny_corpus: Path, tmp_path: Path, monkeypatch):
    _with_callback(monkeypatch, SignalAtStep(7, signal.SIGINT))
    with pytest.raises(SIGTERMException):
        train(compose_train([f"data.path={tiny_corpus}", *GPT], tmp_path))
    checkpoint = torch.load(tmp_path / "checkpoints/last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 8  # step 7 was finished first
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


def test_same_seed_gives_the_same_training_curve(tiny_corpus: Path, tmp_path: Path):
    overrides = [f"data.path={tiny_corpus}", *GPT, "trainer.max_steps=15"]
    train(compose_train(overrides, tmp_path / "a"))
    train(compose_train(overrides, tmp_path / "b"))
    train(compose_train([*overrides, "seed=2"], tmp_path / "c"))
    a, b, c = (read_scalars(tmp_path / r, ["train/loss"])["train/loss"] for r in "abc")
    assert len(a) == 3  # steps 3, 7, 11: every 4 steps
    assert a == b
    assert a != c


def test_resume_refuses_a_checkpoint_of_another_corpus(
    tiny_corpus: Path, tmp_path: Path, monkeypatch
):
    overrides = [f"data.path={tiny_corpus}", *GPT, "trainer.max_steps=5"]
    train(compose_train(overrides, tmp_path / "a"))
    other = tmp_path / "other.txt"
    other.write_text(tiny_corpus.read_text(encoding="utf-8").upper(), encoding="utf-8")
    last = tmp_path / "a/checkpoints/last.ckpt"
    with pytest.raises(LmlabError, match="another tokenizer"):
        train(compose_train([*GPT, f"data.path={other}", f"ckpt_path={last}"], tmp_path / "b"))
    # same characters, other text: the tokenizer matches, the tokens do not
    shuffled = tmp_path / "shuffled.txt"
    shuffled.write_text(tiny_corpus.read_text(encoding="utf-8")[::-1], encoding="utf-8")
    with pytest.raises(LmlabError, match="another corpus"):
        train(compose_train([*GPT, f"data.path={shuffled}", f"ckpt_path={last}"], tmp_path / "c"))


def test_resume_with_nothing_left_to_train_is_refused(tiny_corpus: Path, tmp_path: Path):
    overrides = [f"data.path={tiny_corpus}", *GPT]
    train(compose_train([*overrides, "trainer.max_steps=5"], tmp_path / "a"))
    last = tmp_path / "a/checkpoints/last.ckpt"
    for max_steps in (5, 3):
        resumed = [*overrides, f"ckpt_path={last}", f"trainer.max_steps={max_steps}"]
        with pytest.raises(LmlabError, match=f"it is at step 5 and trainer.max_steps={max_steps}"):
            train(compose_train(resumed, tmp_path / f"b{max_steps}"))
    # the negative control: one step more is something to train
    resumed = [*overrides, f"ckpt_path={last}", "trainer.max_steps=6"]
    assert train(compose_train(resumed, tmp_path / "c"))["steps"] == 6


def test_checkpoints_are_written_whole_or_not_at_all(tmp_path: Path, monkeypatch):
    from lmlab.checkpoint import AtomicCheckpointIO

    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, path)

    def fail_halfway(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", fail_halfway)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left


class PoisonWeightsAtStep(L.Callback):
    """Makes the model's weights NaN at `step`, as a diverging run would."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.model.lm_head.weight.fill_(float("nan"))


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    tiny_corpus: Path, tmp_path: Path, monkeypatch
):
    _with_callback(monkeypatch, PoisonWeightsAtStep(13))
    with pytest.raises(LmlabError, match=r"training diverged: train/loss is nan at step 1[4-6]"):
        train(compose_train([f"data.path={tiny_corpus}", *GPT], tmp_path))
    checkpoint = torch.load(tmp_path / "checkpoints/last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 10  # saved at the validation before the NaN
    assert all(torch.isfinite(w).all() for w in checkpoint["state_dict"].values())
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "failed"


def test_metrics_are_written_whole_or_not_at_all(tmp_path: Path, monkeypatch):
    from lmlab.atomic_write import atomic_write_json

    path = tmp_path / "metrics.json"
    atomic_write_json(path, {"status": "running"})
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        atomic_write_json(path, {"status": "completed"})
    assert json.loads(path.read_text()) == {"status": "running"}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
