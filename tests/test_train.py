"""End-to-end: composed configs, a tiny training run, its run directory and the CLI."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import hydra
import pytest
import torch
from conftest import TINY_TEXT, compose_train, needs_corpus, needs_tiktoken, run_lmlab
from hydra import compose, initialize_config_module
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lmlab.checkpoint import load_for_sampling
from lmlab.train import train

CONF = Path(__file__).resolve().parents[1] / "src" / "lmlab" / "conf"


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if p.stem != "base")


@pytest.mark.parametrize("data", group_options("data"))
@pytest.mark.parametrize("model", group_options("model"))
def test_every_data_and_model_config_composes(data: str, model: str, tmp_path: Path):
    cfg = compose_train([f"data={data}", f"model={model}"], tmp_path)
    assert cfg.model.name == model
    assert cfg.data.block_size > 0
    datamodule = hydra.utils.instantiate(cfg.data)
    assert datamodule.block_size == cfg.data.block_size


@pytest.mark.parametrize("trainer", group_options("trainer"))
def test_every_trainer_config_composes(trainer: str, tmp_path: Path):
    cfg = compose_train([f"trainer={trainer}"], tmp_path)
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"


@pytest.mark.parametrize("experiment", group_options("experiment"))
def test_every_experiment_composes(experiment: str, tmp_path: Path):
    cfg = compose_train([f"experiment={experiment}"], tmp_path)
    assert cfg.trainer.max_steps > 0


def test_sample_config_composes():
    with initialize_config_module(config_module="lmlab.conf", version_base="1.3"):
        cfg = compose(config_name="sample", overrides=["ckpt_path=x.ckpt", "top_k=1"])
    assert cfg.ckpt_path == "x.ckpt" and cfg.top_k == 1


def test_data_dir_defaults_to_the_environment(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("LMLAB_DATA_DIR", "/somewhere/corpora")
    cfg = compose_train([], tmp_path)
    assert cfg.data.data_dir == "/somewhere/corpora"


def test_tiny_run_writes_the_run_directory(tiny_train_cfg):
    cfg = tiny_train_cfg()
    train(cfg)
    run = Path(cfg.paths.output_dir)

    summary = json.loads((run / "metrics.json").read_text())
    assert summary["status"] == "completed"
    assert summary["steps"] == 20
    assert summary["num_params"] == summary_expected_params(cfg)
    assert summary["val/loss"] > 0 and summary["val/bpc"] > summary["val/loss"]
    assert summary["tokens_per_sec"] > 0

    events = EventAccumulator(str(run))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "val/loss", "val/bpc", "val/bpb", "val/ppl", "train/lr"} <= tags
    assert "train/tokens_per_sec" in tags
    # the validation before the first step, then (Lightning numbers logged steps from 0)
    # the validations after steps 10 and 20
    val_loss = events.Scalars("val/loss")
    assert [e.step for e in val_loss] == [0, 9, 19]
    vocab_size = len(set(TINY_TEXT))
    assert abs(val_loss[0].value - math.log(vocab_size)) < 0.05  # an untrained bigram: ln V
    # what was scored: both parts of the tiny corpus, characters = bytes = tokens (ASCII)
    parts = summary["data"]
    assert parts["train"]["characters"] + parts["val"]["characters"] == len(TINY_TEXT)
    assert parts["val"]["bytes"] == parts["val"]["tokens"] == parts["val"]["characters"]
    assert "samples" in " ".join(events.Tags()["tensors"])

    assert (run / "checkpoints" / "last.ckpt").is_file()
    samples = (run / "samples.txt").read_text()
    assert "=== step 20, sample 1 ===" in samples


def summary_expected_params(cfg) -> int:
    vocab = len(set(Path(cfg.data.path).read_text()))
    return vocab * vocab  # the bigram table


def test_checkpoint_holds_model_and_tokenizer(tiny_train_cfg):
    cfg = tiny_train_cfg()
    train(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    raw = torch.load(ckpt, weights_only=True)  # plain data only
    assert raw["hyper_parameters"]["tokenizer_state"]["kind"] == "char"
    model, tokenizer = load_for_sampling(ckpt)
    assert tokenizer.decode(tokenizer.encode("Speak")) == "Speak"
    logits = model(torch.tensor([tokenizer.encode("Speak").tolist()]))
    assert logits.shape == (1, 5, tokenizer.vocab_size)


def test_loss_falls_on_the_tiny_corpus(tiny_train_cfg):
    cfg = tiny_train_cfg("trainer.max_steps=200", "trainer.val_check_interval=100")
    summary = train(cfg)
    first_loss = torch.log(torch.tensor(float(len(set(Path(cfg.data.path).read_text())))))
    assert summary["best"]["val/loss"] < 0.6 * first_loss.item()


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run_lmlab("train", *args, cwd=cwd, timeout=120)


def test_cli_names_a_missing_corpus_in_one_line(tmp_path: Path):
    result = run_cli("data.path=/nonexistent.txt", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "lmlab-train: error: corpus file not found: /nonexistent.txt (check data.path)"
    )


def test_cli_refuses_a_corpus_shorter_than_one_block(tmp_path: Path):
    short = tmp_path / "short.txt"
    short.write_text("tiny corpus")
    result = run_cli(f"data.path={short}", "data.block_size=64", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().startswith("lmlab-train: error: the training part of the corpus")
    assert "\n" not in result.stderr.strip()


@pytest.mark.slow
@needs_corpus("the-verdict.txt")
@needs_tiktoken()
def test_bpe_run_on_the_verdict_logs_bpc(tmp_path: Path):
    cfg = compose_train(
        ["data=verdict_bpe", "trainer.max_steps=20", "trainer.val_check_interval=20"], tmp_path
    )
    summary = train(cfg)
    assert summary["last"]["val/bpc"] == pytest.approx(
        summary["last"]["val/loss"] * cfg_bpc_factor(cfg), rel=1e-4
    )


def cfg_bpc_factor(cfg) -> float:
    dm = hydra.utils.instantiate(cfg.data)
    dm.setup("fit")
    return dm.bpc_factor
