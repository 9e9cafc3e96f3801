"""`tune.lr_find=true`: Lightning's learning-rate finder before training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmlab.lit_module import LitLanguageModel
from lmlab.train import train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_lr_find_saves_its_plot_and_trains_at_the_suggestion(tiny_train_cfg):
    cfg = tiny_train_cfg(
        "tune.lr_find=true",
        "tune.apply=true",
        "tune.num_training=30",
        "trainer.max_steps=10",
        "trainer.val_check_interval=10",
    )
    summary = train(cfg)
    run = Path(cfg.paths.output_dir)
    assert (run / "lr_find.png").read_bytes()[:8] == PNG_MAGIC

    found = json.loads((run / "metrics.json").read_text())["lr_find"]
    assert found == summary["lr_find"]
    assert found["applied"] is True and found["configured"] == 0.01
    assert cfg.tune.min_lr <= found["suggestion"] <= cfg.tune.max_lr
    # the finder restores the initial weights: training starts from scratch, for max_steps
    assert summary["steps"] == 10

    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    hparams = saved["hyper_parameters"]
    assert hparams["optimizer"]["lr"] == pytest.approx(found["suggestion"])
    # the optimizer itself trained at the suggestion (its schedule's base rate)
    for group in saved["optimizer_states"][0]["param_groups"]:
        assert group["initial_lr"] == pytest.approx(found["suggestion"])
    # bigram.yaml: constant schedule with min_lr 1e-3 at lr 1e-2; the ratio is kept
    assert hparams["scheduler"]["min_lr"] == pytest.approx(found["suggestion"] / 10)


def test_lr_find_without_apply_keeps_the_configured_rate(tiny_train_cfg):
    cfg = tiny_train_cfg("tune.lr_find=true", "tune.num_training=20", "trainer.max_steps=5")
    summary = train(cfg)
    assert summary["lr_find"]["applied"] is False
    run = Path(cfg.paths.output_dir)
    hparams = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]
    assert hparams["optimizer"]["lr"] == 0.01


def test_set_learning_rate_moves_the_schedule_floor_with_it():
    module = LitLanguageModel(
        "bigram",
        {"vocab_size": 5, "block_size": 4},
        optimizer={"lr": 1e-3, "weight_decay": 0.0},
        scheduler={"decay": "cosine", "warmup_steps": 0, "min_lr": 1e-4},
    )
    module.set_learning_rate(3e-3)
    assert module.hparams.optimizer == {"lr": 3e-3, "weight_decay": 0.0}
    assert module.hparams.scheduler["min_lr"] == pytest.approx(3e-4)
