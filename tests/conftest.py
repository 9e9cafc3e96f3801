"""Shared fixtures: the token cache, a tiny corpus, tiny training configs, a trained GPT.

Plain helpers (constants, skip markers, compose_train, run_lmlab) live in helpers.py. Corpora
and tiktoken files come from $LMLAB_DATA_DIR and $TIKTOKEN_CACHE_DIR only (CI sets both).
"""

from __future__ import annotations

from pathlib import Path

import pytest

# The data tests still import these from here (`from conftest import ...`).
from helpers import (  # noqa: F401
    TINY_GPT,
    TINY_TEXT,
    compose_train,
    data_dir,
    needs_corpus,
    needs_tiktoken,
    run_lmlab,
)
from omegaconf import DictConfig


@pytest.fixture(scope="session", autouse=True)
def token_cache_dir(tmp_path_factory: pytest.TempPathFactory):
    """Token caches go to a temporary directory, never into the shared data directory."""
    path = tmp_path_factory.mktemp("tokens")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LMLAB_CACHE_DIR", str(path))
        yield path


@pytest.fixture
def tiny_corpus(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.txt"
    path.write_text(TINY_TEXT, encoding="utf-8")
    return path


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
        *TINY_GPT,
        "data.block_size=16",
        "callbacks.sample_text.max_new_tokens=20",
    ]
    train(compose_train(overrides, root / "run"))
    return root / "run" / "checkpoints" / "last.ckpt"
