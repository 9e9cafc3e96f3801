"""End-to-end: composed configs, a tiny training run, its run directory and the CLI."""

from __future__ import annotations

import json
import math
import os
import re
from importlib.resources import files
from pathlib import Path

import hydra
import pytest
import torch
from helpers import TINY_TEXT, compose_train, data_dir, needs_corpus, needs_tiktoken, run_lmlab
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lmlab.checkpoint import load_for_sampling
from lmlab.cli import train_help
from lmlab.lit_module import lm_loss
from lmlab.models import check_block_size
from lmlab.train import build_lit_module, train, validation_interval

CONF = files("lmlab.conf")  # the installed config tree, wherever the checkout is


def group_options(group: str) -> list[str]:
    names = (f.name for f in CONF.joinpath(group).iterdir() if f.name.endswith(".yaml"))
    return sorted(n[:-5] for n in names if n != "base.yaml")


@pytest.mark.parametrize("data", group_options("data"))
@pytest.mark.parametrize("model", group_options("model"))
def test_every_data_and_model_config_composes(data: str, model: str, tmp_path: Path):
    cfg = compose_train([f"data={data}", f"model={model}"], tmp_path)
    assert cfg.model.name == model
    assert cfg.data.block_size > 0
    datamodule = hydra.utils.instantiate(cfg.data)
    assert datamodule.block_size == cfg.data.block_size


@pytest.mark.parametrize("trainer", group_options("trainer"))
def test_every_trainer_config_builds_a_trainer(trainer: str, tmp_path: Path):
    cfg = compose_train([f"trainer={trainer}"], tmp_path)
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        pytest.skip(f"trainer={trainer} needs a CUDA GPU")
    built = hydra.utils.instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert built.max_steps == cfg.trainer.max_steps
    assert built.accumulate_grad_batches == cfg.trainer.get("accumulate_grad_batches", 1)


# 12.9e9 parameters (51 GB) do not fit a test machine: its data and model are built at 1 layer
SHRUNK = {"gpt_large_fsdp": ["model.n_layer=1", "model.n_head=2", "model.n_embd=64"]}


@pytest.mark.parametrize("experiment", group_options("experiment"))
def test_every_experiment_builds_its_data_and_model(experiment: str, tmp_path: Path):
    """The experiment's datamodule and LightningModule, built for real from its config: the
    model takes the data's vocabulary and windows, and at initialisation scores close to a
    uniform guess over the vocabulary (ln V) on a real training batch."""
    cfg = compose_train([f"experiment={experiment}", *SHRUNK.get(experiment, [])], tmp_path)
    corpus = cfg.data.get("path") or cfg.data.corpus
    if cfg.data.get("path") is None and not any(data_dir().glob(f"*{corpus}*")):
        pytest.skip(f"corpus {corpus} not in $LMLAB_DATA_DIR (tests do not download)")
    if cfg.data.tokenizer not in ("char", "words") and not os.environ.get("TIKTOKEN_CACHE_DIR"):
        pytest.skip("TIKTOKEN_CACHE_DIR not set (offline BPE)")
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    module = build_lit_module(cfg.model, datamodule, cfg.data)
    check_block_size(module.model, datamodule.block_size)
    assert module.hparams.model_hparams["vocab_size"] == datamodule.vocab_size
    x, y = next(iter(datamodule.train_dataloader()))
    assert x.shape == (cfg.data.batch_size, cfg.data.block_size) == y.shape
    with torch.no_grad():
        logits = module(x)
        loss = lm_loss(logits, y)
    assert logits.shape == (*x.shape, datamodule.vocab_size)
    assert abs(float(loss) - math.log(datamodule.vocab_size)) < 0.5


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
    # the validation before the first step, then the validations after steps 10 and 20
    val_loss = events.Scalars("val/loss")
    assert [e.step for e in val_loss] == [0, 10, 20]
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


def test_a_run_validates_ten_times_and_samples_at_each_validation(tiny_train_cfg):
    """val_check_interval=null: a tenth of max_steps. A sample at every validation, the
    final one included, though 31 steps is no multiple of the interval (3): it runs after
    fit(), and once only."""
    cfg = tiny_train_cfg("trainer.max_steps=31", "trainer.val_check_interval=null")
    train(cfg)
    run = Path(cfg.paths.output_dir)
    events = EventAccumulator(str(run), size_guidance={"tensors": 0})  # 0: keep them all
    events.Reload()
    expected = [3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 31]
    assert [e.step for e in events.Scalars("val/loss")] == [0, *expected]
    sampled = re.findall(r"=== step (\d+), sample 1 ===", (run / "samples.txt").read_text())
    assert [int(s) for s in sampled] == expected
    assert [e.step for e in events.Tensors("samples/text_summary")] == expected


@pytest.mark.parametrize(("max_steps", "interval"), [(300, 30), (31, 3), (5, 1), (-1, 500)])
def test_validation_interval_is_a_tenth_of_the_run(max_steps: int, interval: int):
    cfg = OmegaConf.create({"max_steps": max_steps, "val_check_interval": None})
    assert validation_interval(cfg) == interval
    cfg.val_check_interval = 7  # a value the user set is kept
    assert validation_interval(cfg) == 7


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


@pytest.mark.slow
@pytest.mark.parametrize("experiment", group_options("experiment"))
def test_every_experiment_trains_one_step(experiment: str, tmp_path: Path):
    """`debug=fdr`: one training and one validation batch of the real experiment, through the
    command line; the run directory records one completed step."""
    if experiment == "verdict_gpt_bpe" and not os.environ.get("TIKTOKEN_CACHE_DIR"):
        pytest.skip("TIKTOKEN_CACHE_DIR not set (offline BPE)")
    result = run_lmlab(
        "train",
        f"experiment={experiment}",
        *SHRUNK.get(experiment, []),
        "debug=fdr",
        "trainer=cpu",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 1


def test_cli_names_a_missing_corpus_in_one_line(tmp_path: Path):
    result = run_lmlab("train", "data.path=/nonexistent.txt", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "lmlab-train: error: corpus file not found: /nonexistent.txt (check data.path)"
    )


def test_cli_refuses_a_corpus_shorter_than_one_block(tmp_path: Path):
    short = tmp_path / "short.txt"
    short.write_text("tiny corpus")
    result = run_lmlab("train", f"data.path={short}", "data.block_size=64", cwd=tmp_path)
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


def test_ctrl_c_outside_the_training_loop_is_one_line(monkeypatch, capsys):
    """Ctrl-C while the corpus is tokenized (before the loop's own handler is installed)."""
    import lmlab.train as train_module

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "_hydra_main", interrupted)
    monkeypatch.setattr("sys.argv", ["lmlab-train"])
    with pytest.raises(SystemExit) as stopped:
        train_module.main()
    assert stopped.value.code == 130  # 128 + SIGINT, as a shell reports it
    assert capsys.readouterr().err == "lmlab-train: interrupted (Ctrl-C)\n"


def test_help_lists_groups_experiments_and_examples():
    text = train_help()
    experiments = sorted(f.stem for f in (CONF / "experiment").glob("*.yaml"))
    listed = re.findall(r"^  (\w+) +\S", text.split("Experiments")[1].split("Examples")[0], re.M)
    assert listed == experiments
    [data_line] = [line for line in text.splitlines() if line.startswith("  data ")]
    options = sorted(f.stem for f in (CONF / "data").glob("*.yaml") if f.stem != "base")
    assert data_line.split()[1:] == [f"{o}," for o in options[:-1]] + options[-1:]
    assert "base" not in data_line  # what the data options build on is no option
    assert "lmlab-train -m model=bigram,mlp,gpt" in text and "-sc install=bash" in text
