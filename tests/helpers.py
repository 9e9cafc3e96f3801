"""Plain helpers for the tests: constants, skip markers, config composition, the CLI runner.

Fixtures live in conftest.py; test files import these from here (`from helpers import ...`).
Corpora and tiktoken files come only from $LMLAB_DATA_DIR and $TIKTOKEN_CACHE_DIR (CI sets
both); tests that need a file that is not there are skipped: tests never download.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import DictConfig, open_dict

TINY_TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n"
) * 40

# A GPT small enough that a training step takes milliseconds on a CPU: lmlab-train overrides.
TINY_GPT = ["model=gpt", "model.n_layer=1", "model.n_head=2", "model.n_embd=16"]


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


def compose_train(overrides: list[str], output_dir: Path) -> DictConfig:
    """The training config as `lmlab-train` composes it, with outputs in `output_dir`."""
    with initialize_config_module(config_module="lmlab.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def run_lmlab(
    module: str, *args: str, cwd: Path | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    """Run `python -m lmlab.<module> ARGS` as a user would, capturing its output.

    `module` is the command's module under lmlab: lmlab-train is "train", lmlab-sample
    "sample", lmlab-eval "evaluate", lmlab-compare "runs.compare"."""
    return subprocess.run(
        [sys.executable, "-m", f"lmlab.{module}", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class RunsCode:
    """Unpickling this object runs `touch path`: if `path` exists, a loader ran the file's code."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.path))}",))
