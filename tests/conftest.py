"""Shared fixtures: offline corpora and tokenizer cache, tiny corpora, composed configs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import DictConfig, open_dict

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# Tests never download: point corpora and tiktoken at local copies unless the caller did.
if (SHARED / "data").is_dir():
    os.environ.setdefault("LMLAB_DATA_DIR", str(SHARED / "data"))
if (SHARED / "tiktoken_cache").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))


@pytest.fixture(scope="session", autouse=True)
def token_cache_dir(tmp_path_factory: pytest.TempPathFactory):
    """Token caches go to a temporary directory, never into the shared data directory."""
    path = tmp_path_factory.mktemp("tokens")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LMLAB_CACHE_DIR", str(path))
        yield path


TINY_TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n"
) * 40


def data_dir() -> Path:
    return Path(os.environ.get("LMLAB_DATA_DIR", "data"))


def needs_corpus(filename: str):
    return pytest.mark.skipif(
        not (data_dir() / filename).is_file(),
        reason=f"{filename} not in $LMLAB_DATA_DIR (tests do not download)",
    )


def needs_tiktoken():
    cache = os.environ.get("TIKTOKEN_CACHE_DIR")
    return pytest.mark.skipif(
        not cache or not Path(cache).is_dir(), reason="TIKTOKEN_CACHE_DIR not set (offline BPE)"
    )


@pytest.fixture
def tiny_corpus(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.txt"
    path.write_text(TINY_TEXT, encoding="utf-8")
    return path


def compose_train(overrides: list[str], output_dir: Path) -> DictConfig:
    """The training config as `lmlab-train` composes it, with outputs in `output_dir`."""
    with initialize_config_module(config_module="lmlab.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


@pytest.fixture
def tiny_train_cfg(tmp_path: Path, tiny_corpus: Path):
    """A seconds-long training config on the tiny corpus; pass extra overrides."""

    def make(*overrides: str) -> DictConfig:
        base = [
            f"data.path={tiny_corpus}",
            "trainer.accelerator=cpu",
            "trainer.max_steps=20",
            "trainer.val_check_interval=10",
            "trainer.log_every_n_steps=5",
            "trainer.enable_progress_bar=false",
        ]
        return compose_train(base + list(overrides), tmp_path / "run")

    return make


def run_lmlab(
    module: str, *args: str, cwd: Path | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    """Run `python -m lmlab.<module> ARGS` as a user would, capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", f"lmlab.{module}", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def gpt_checkpoint(tmp_path_factory) -> Path:
    """`last.ckpt` of a real 30-step char GPT run on the tiny corpus (shared by the tests)."""
    from lmlab.train import train  # imported late: collecting tests stays fast

    root = tmp_path_factory.mktemp("gpt_run")
    corpus = root / "tiny.txt"
    corpus.write_text(TINY_TEXT, encoding="utf-8")
    overrides = [
        f"data.path={corpus}",
        "trainer.accelerator=cpu",
        "trainer.max_steps=30",
        "trainer.val_check_interval=30",
        "trainer.enable_progress_bar=false",
        "model=gpt",
        "model.n_layer=1",
        "model.n_head=2",
        "model.n_embd=16",
        "data.block_size=16",
        "callbacks.sample_text.max_new_tokens=20",
    ]
    train(compose_train(overrides, root / "run"))
    return root / "run" / "checkpoints" / "last.ckpt"
