"""`lmlab-train ckpt_path=<run>/checkpoints/last.ckpt` continues that run in its directory, with
its own overrides: the `continue with: lmlab-train ckpt_path=...` line a stopped run prints
works pasted."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from helpers import TINY_GPT, run_lmlab

from lmlab.runs.collect import read_metrics
from lmlab.runs.render import read_scalars
from lmlab.runs.resume import resume_arguments


def fake_run(tmp_path: Path, overrides: list[str]) -> Path:
    run = tmp_path / "sweep" / "1_model-gpt+seed-3"
    (run / ".hydra").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (run / ".hydra" / "config.yaml").write_text("seed: 3\n")
    return run


def test_the_runs_overrides_come_first_and_typed_ones_win(tmp_path: Path):
    saved = ["model=gpt", "seed=3", "trainer.max_steps=20", "ckpt_path=/old.ckpt"]
    run = fake_run(tmp_path, [*saved, "hydra.job.num=1"])
    ckpt = f"ckpt_path={run}/checkpoints/last.ckpt"
    args = resume_arguments([ckpt, "trainer.max_steps=40"])
    assert args == [
        "model=gpt",
        "seed=3",
        ckpt,
        "trainer.max_steps=40",
        f'hydra.run.dir="{run}"',
    ]
    # the earlier config is kept, as Hydra writes the resumed run's over it
    assert (run / ".hydra" / "before-resume-1" / "config.yaml").read_text() == "seed: 3\n"


def test_nothing_is_added_outside_a_run_directory_or_in_a_sweep(tmp_path: Path):
    run = fake_run(tmp_path, ["model=gpt"])
    ckpt = f"ckpt_path={run}/checkpoints/last.ckpt"
    for args in (
        ["-m", ckpt],  # a sweep: each job has its own directory
        [ckpt, "hydra.run.dir=/elsewhere"],  # a directory given: the user's choice
        [f"ckpt_path={tmp_path}/loose.ckpt"],  # not in a run directory
        ["model=gpt"],
    ):
        assert resume_arguments(args) == args
    assert not (run / ".hydra" / "before-resume-1").exists()


def test_a_pasted_checkpoint_path_resumes_the_run_in_place(tmp_path: Path, tiny_corpus: Path):
    run = tmp_path / "multirun" / "1_model-gpt+seed-3"
    first = run_lmlab(
        "train",
        f"data.path={tiny_corpus}",
        *TINY_GPT,
        "seed=3",
        "trainer.max_steps=10",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
    )
    assert first.returncode == 0, first.stderr[-2000:]
    # only the path, unquoted, and a longer budget: the model and seed come from the run
    resumed = run_lmlab(
        "train",
        f"ckpt_path={run}/checkpoints/last.ckpt",
        "trainer.max_steps=20",
        "trainer.enable_progress_bar=false",
        cwd=tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"continuing {run}" in resumed.stdout
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 20
    assert summary["best"]["step"] in {10, 12, 14, 16, 18, 20}  # kept across the resume
    # one TensorBoard run: the validation curve goes on where it stopped
    steps = [step for step, _ in read_scalars(run, ["val/loss"])["val/loss"]]
    assert steps == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 16, 18, 20]
    assert read_metrics(run)[1] == "completed"
    assert not (tmp_path / "runs").exists()  # no second run directory


def test_ckpt_path_auto_starts_fresh_then_resumes(tmp_path: Path, tiny_corpus: Path):
    """ckpt_path=auto makes a command restartable: the first time it starts fresh, later it
    continues from the run directory's last.ckpt (a requeued SLURM job runs it again)."""
    command = [
        f"data.path={tiny_corpus}",
        *TINY_GPT,
        "ckpt_path=auto",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    first = run_lmlab("train", *command, "trainer.max_steps=10", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "no " in first.stdout and "starting fresh" in first.stdout
    again = run_lmlab("train", *command, "trainer.max_steps=20", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "ckpt_path=auto: resuming from" in again.stdout
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["steps"] == 20
    # resumed, not restarted: no second validation at step 0
    steps = [step for step, _ in read_scalars(tmp_path / "run", ["val/loss"])["val/loss"]]
    assert steps.count(0) == 1 and steps[-1] == 20
