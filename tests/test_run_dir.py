"""Every run gets a directory of its own, also two runs started in the same second."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from helpers import TINY_GPT, TINY_TEXT, run_lmlab
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from lmlab.runs.sweeps import RUN_ID_RESOLVER, register_resolvers, run_id

RUN_DIR_NAME = re.compile(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_[0-9a-f]{6}")

# `lmlab-train`, with Hydra's `${now:...}` stopped at one second: two processes then start in
# the same second for certain, however long each takes to import torch.
LMLAB_TRAIN_AT_A_FIXED_TIME = textwrap.dedent(
    """
    import sys
    from datetime import datetime

    import hydra.core.utils

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2030, 1, 2, 3, 4, 5)

    hydra.core.utils.datetime = Frozen  # the `now` resolver's datetime
    from lmlab.train import main

    sys.argv[0] = "lmlab-train"
    main()
    """
)


def tiny_run(corpus: Path, log_dir: Path, seed: int, steps: int) -> list[str]:
    return [
        f"paths.log_dir={log_dir}",
        f"data.path={corpus}",
        "data.cache_dir=null",  # two processes, one corpus: no shared token cache to race on
        "trainer.accelerator=cpu",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        "val_at_start=false",
        "trainer.enable_progress_bar=false",
        "callbacks.sample_text.max_new_tokens=5",
        f"seed={seed}",
    ]


def test_two_runs_started_in_the_same_second_get_a_directory_each(
    tiny_corpus: Path, tmp_path: Path
):
    log_dir = tmp_path / "runs"
    # a different seed and number of steps each: every file shows which run wrote it
    runs = {1: 2, 2: 3}
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    processes = {
        seed: subprocess.Popen(
            [
                sys.executable,
                "-c",
                LMLAB_TRAIN_AT_A_FIXED_TIME,
                *tiny_run(tiny_corpus, log_dir, seed, steps),
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed, steps in runs.items()
    }
    outputs = {seed: p.communicate(timeout=300) for seed, p in processes.items()}
    for seed, p in processes.items():
        assert p.returncode == 0, outputs[seed][1][-3000:]

    run_dirs = sorted((log_dir / "train").iterdir())
    assert len(run_dirs) == 2
    for run_dir in run_dirs:
        assert RUN_DIR_NAME.fullmatch(run_dir.name), run_dir.name
        assert run_dir.name.startswith("2030-01-02_03-04-05_")  # the same second, truly
    for run_dir in run_dirs:
        config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
        seed, steps = config["seed"], config["trainer"]["max_steps"]
        assert runs[seed] == steps
        assert f"run directory: {run_dir}\n" in outputs[seed][0]
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["status"] == "completed" and metrics["steps"] == steps
        checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
        assert checkpoint["global_step"] == steps
        assert yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()).count(
            f"seed={seed}"
        )


def test_the_run_id_is_drawn_once_per_process():
    register_resolvers()
    assert OmegaConf.has_resolver(RUN_ID_RESOLVER)
    first = OmegaConf.create({"run": "a_${lmlab.run_id:}", "sweep": "b_${lmlab.run_id:}"})
    # another config of the same process: Hydra resolves copies of its config (HydraConfig
    # holds one that has lost the resolver cache), and they must name the same directory
    second = OmegaConf.create({"run": "a_${lmlab.run_id:}"})
    ids = {first.run[2:], first.sweep[2:], first.run[2:], second.run[2:], run_id()}
    assert len(ids) == 1
    assert re.fullmatch(r"[0-9a-f]{6}", ids.pop())


def test_two_processes_draw_different_run_ids():
    command = [sys.executable, "-c", "from lmlab.runs.sweeps import run_id; print(run_id())"]
    ids = {subprocess.run(command, capture_output=True, text=True, check=True).stdout for _ in "ab"}
    assert len(ids) == 2


def test_run_and_sweep_directories_end_in_the_run_id(tmp_path: Path):
    register_resolvers()
    with initialize_config_module(config_module="lmlab.conf", version_base="1.3"):
        cfg = compose(
            config_name="train", overrides=[f"paths.log_dir={tmp_path}"], return_hydra_config=True
        )
    run_dir, sweep_dir = Path(cfg.hydra.run.dir), Path(cfg.hydra.sweep.dir)
    assert run_dir.parent == tmp_path / "train"
    assert RUN_DIR_NAME.fullmatch(run_dir.name) and run_dir.name.endswith(f"_{run_id()}")
    assert sweep_dir.parent == tmp_path / "train" / "multirun"
    assert RUN_DIR_NAME.fullmatch(sweep_dir.name) and sweep_dir.name.endswith(f"_{run_id()}")


@pytest.mark.slow
def test_ddp_processes_share_the_run_directory_that_the_first_one_named(
    tiny_corpus: Path, tmp_path: Path
):
    # The second process draws a run id of its own; it must use the first one's directory.
    log_dir = tmp_path / "runs"
    result = run_lmlab(
        "train",
        "trainer=ddp_cpu",
        *tiny_run(tiny_corpus, log_dir, seed=3, steps=4),
        *TINY_GPT,
        "data.block_size=16",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (log_dir / "train").iterdir()
    assert RUN_DIR_NAME.fullmatch(run_dir.name)
    assert (run_dir / "train_process_1.log").is_file()  # the second process ran, in this dir
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "completed"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_a_run_directory_that_cannot_be_written_is_one_line(tmp_path: Path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    result = run_lmlab("train", f"hydra.run.dir={a_file}/run", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"lmlab-train: error: cannot write the run directory {a_file}/run (Not a directory); "
        "free some space there, or give a writable place with hydra.run.dir=DIR or "
        "paths.log_dir=DIR"
    )
    # the negative control: the same command with a writable directory gets past the check
    corpus = tmp_path / "tiny.txt"
    corpus.write_text(TINY_TEXT, encoding="utf-8")
    ok = run_lmlab(
        "train",
        f"hydra.run.dir={tmp_path}/run",
        f"data.path={corpus}",
        "trainer.max_steps=1",
        cwd=tmp_path,
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert (tmp_path / "run" / ".hydra" / "config.yaml").stat().st_size > 0


def test_a_bad_config_is_refused_before_anything_is_written(tmp_path: Path):
    result = run_lmlab("train", f"hydra.run.dir={tmp_path}/run", "model.optimizer.lr=-1")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "lmlab-train: error: model.optimizer.lr=-1 is not allowed; "
        "set model.optimizer.lr to a number > 0"
    )
    assert not (tmp_path / "run").exists()  # no .hydra/, no train.log, no metrics.json
