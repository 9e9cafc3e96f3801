"""SLURM jobs that outlast their time limit are requeued and resume by themselves.

The slow test runs on a real one-node SLURM cluster (scripts/slurm_test_cluster.sh): a sweep of
two jobs, each longer than its time limit, is requeued at its limit and ends where an
uninterrupted run ends. It runs where SLURM is installed (`apt-get install slurm-wlm munge`)
and we are root, to start the daemons; elsewhere it is skipped. It takes about five minutes on
two cores: `pytest -m slow tests/test_slurm_cluster.py -s` prints the job ids and figures.

The in-process test drives the same path without SLURM, with submitit's own signal handler.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from helpers import TINY_GPT, compose_train, data_dir, needs_corpus
from lightning.pytorch.utilities.exceptions import SIGTERMException
from submitit.core.job_environment import SignalHandler
from submitit.helpers import DelayedSubmission

import lmlab.train as train_module
from lmlab.runs import requeue
from lmlab.train import train

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_SCRIPT = ROOT / "scripts" / "slurm_test_cluster.sh"
CLUSTER_DIR = Path(os.environ.get("LMLAB_SLURM_DIR", "/tmp/lmlab-slurm"))

# Each run trains this many steps, and in the sweep every step also waits PAUSE_S: its
# training then outlasts one time limit on any machine (a quiet fast one included), while the
# figures, which do not depend on time, stay those of the uninterrupted runs.
STEPS = 600
PAUSE_S = 0.22
# SLURM's smallest limit is a minute; a job spends a good part of that starting Python and
# torch, hence two.
TIME_LIMIT_MIN = 2
SEEDS = (1, 2)

# The same small character GPT for the sweep and the uninterrupted runs. One thread each:
# the two jobs share two cores, and the same thread count everywhere keeps the sums in the
# same order. Text samples and embeddings are left out: they only cost time here.
RUN = [
    f"data.path={data_dir() / 'tinyshakespeare.txt'}",
    "model=gpt",
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=64",
    "data.block_size=64",
    "data.batch_size=16",
    f"trainer.max_steps={STEPS}",
    "trainer.val_check_interval=200",
    "trainer.limit_val_batches=20",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "callbacks.sample_text=null",
    "callbacks.embeddings=null",
    "print_config=false",
]
SLURM = [
    "hydra/launcher=slurm",
    "hydra.launcher.partition=debug",
    f"hydra.launcher.timeout_min={TIME_LIMIT_MIN}",
    # SLURM adds its 30 s check period to this: USR2 comes 10-40 s before the limit, and the
    # kill at the limit at least 30 s after the signal
    "hydra.launcher.signal_delay_s=10",
    "hydra.launcher.max_num_timeout=10",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=2",
    "hydra.launcher.gpus_per_node=null",
    "+callbacks.pause._target_=lmlab_test_pause.Pause",
]


PAUSE = f"""
import time

import lightning as L


class Pause(L.Callback):
    def on_train_batch_end(self, *args):
        time.sleep({PAUSE_S})
"""


def _missing() -> str | None:
    for tool in ("sbatch", "scontrol", "slurmctld", "slurmd", "munged"):
        if shutil.which(tool) is None:
            return f"no {tool}: apt-get install slurm-wlm munge to run this test"
    if os.geteuid() != 0:
        return "starting the test cluster's daemons needs root"
    return None


needs_slurm = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))


class SignalAtStep(L.Callback):
    """Sends this process `signum` once training has reached `step`."""

    def __init__(self, step: int, signum: int):
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class Resubmittable:
    """What hydra-submitit-launcher's launcher is to submitit: a job whose `checkpoint()`
    resubmits it with the same arguments."""

    def __call__(self) -> None:
        pass

    def checkpoint(self) -> DelayedSubmission:
        return DelayedSubmission(self)


@pytest.mark.slow  # three short trainings
def test_the_time_limit_signal_saves_after_the_step_then_submitit_requeues(
    tiny_corpus: Path, tmp_path: Path, monkeypatch
):
    overrides = [
        f"data.path={tiny_corpus}",
        *TINY_GPT,
        "data.block_size=16",
        "trainer.accelerator=cpu",
        "trainer.max_steps=30",
        "trainer.val_check_interval=10",
        "trainer.enable_progress_bar=false",
    ]
    whole = train(compose_train(overrides, tmp_path / "whole"))

    # submitit's handler for the signal, as a submitit job installs it, but with the job's
    # `scontrol requeue` recorded instead of run
    requeued: list[int] = []
    delayed = DelayedSubmission(Resubmittable())
    delayed.set_timeout(timeout_min=1, max_num_timeout=3)
    paths = SimpleNamespace(submitted_pickle=tmp_path / "submitted.pkl")
    job_env = SimpleNamespace(global_rank=0, _requeue=requeued.append)
    handler = SignalHandler(job_env, paths, delayed)
    previous = signal.signal(signal.SIGUSR2, handler.checkpoint_and_try_requeue)
    stopped = tmp_path / "stopped"
    build_run = train_module.build_run
    try:
        with monkeypatch.context() as patch:
            signal_at_13 = SignalAtStep(13, signal.SIGUSR2)  # mid-epoch, between validations
            patch.setattr(
                train_module,
                "build_run",
                lambda cfg, extra=(): build_run(cfg, (*extra, signal_at_13)),
            )
            with pytest.raises(SIGTERMException):
                train(compose_train(overrides, stopped))
        # the step under way was finished and saved, and nothing was requeued yet
        last = stopped / "checkpoints" / "last.ckpt"
        assert torch.load(last, weights_only=True)["global_step"] == 14
        assert requeued == [] and not paths.submitted_pickle.exists()
        assert signal.getsignal(signal.SIGUSR2) == handler.checkpoint_and_try_requeue
        # then submitit resubmits the job (one time limit of 1 + 3 used) and exits
        with pytest.raises(SystemExit):
            requeue.requeue_if_signalled()
        assert requeued == [2] and paths.submitted_pickle.is_file()
    finally:
        signal.signal(signal.SIGUSR2, previous)

    # The requeued job: the same command, no ckpt_path, SLURM's restart count set.
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    resumed = train(compose_train(overrides, stopped))
    assert resumed["steps"] == whole["steps"] == 30
    assert resumed["last"]["val/loss"] == whole["last"]["val/loss"]


def test_after_training_the_signal_requeues_nothing(tmp_path: Path):
    """A time-limit signal after training (the last validation, the test part, the writing)
    must not requeue: the requeued job would find its last.ckpt finished."""
    requeued: list[int] = []
    delayed = DelayedSubmission(Resubmittable())
    delayed.set_timeout(timeout_min=1, max_num_timeout=3)
    paths = SimpleNamespace(submitted_pickle=tmp_path / "submitted.pkl")
    handler = SignalHandler(
        SimpleNamespace(global_rank=0, _requeue=requeued.append), paths, delayed
    )
    previous = signal.signal(signal.SIGUSR2, handler.checkpoint_and_try_requeue)
    try:
        assert requeue.hold_during_training(trainer=None)
        requeue.release()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert requeued == [] and not paths.submitted_pickle.exists()
        assert not requeue.was_signalled()
        # the control: submitit's own handler, as Lightning's teardown puts it back, requeues
        signal.signal(signal.SIGUSR2, handler.checkpoint_and_try_requeue)
        with pytest.raises(SystemExit):
            os.kill(os.getpid(), signal.SIGUSR2)
        assert requeued == [2]
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_only_submitits_handler_is_taken_over_and_only_a_requeued_job_resumes(monkeypatch):
    own = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: own.append(signum))
    try:
        assert requeue.hold_during_training(trainer=None) is False
        os.kill(os.getpid(), signal.SIGUSR2)
        assert own == [signal.SIGUSR2]  # someone else's handler is left alone
    finally:
        signal.signal(signal.SIGUSR2, previous)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert requeue.ckpt_path_for_this_job(None) is None
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert requeue.ckpt_path_for_this_job(None) is None
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert requeue.ckpt_path_for_this_job(None) == "auto"
    assert requeue.ckpt_path_for_this_job("x.ckpt") == "x.ckpt"  # a given path wins


def _cluster(command: str) -> str:
    result = subprocess.run(
        [str(CLUSTER_SCRIPT), command], capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def slurm_env() -> dict[str, str]:
    """The environment of a client of the test cluster; a cluster this fixture started is
    stopped afterwards, one that was running is left running."""
    was_running = "slurmctld: running" in _cluster("status")
    _cluster("start")
    env = {
        **os.environ,
        "SLURM_CONF": str(CLUSTER_DIR / "slurm.conf"),
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
    }
    yield env
    if not was_running:
        _cluster("stop")


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: float) -> str:
    """Run lmlab-train to the end; its output (stdout and stderr)."""
    log = cwd / f"lmlab-train-{time.monotonic_ns()}.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "lmlab.train", *args],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            process.wait(timeout=timeout)
        finally:
            if process.poll() is None:
                process.kill()
    text = log.read_text()
    assert process.returncode == 0, text[-3000:]
    return text


def _last_val_loss(run_dir: Path) -> float:
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == STEPS, summary
    return summary["last"]["val/loss"]


def _restarts(job_id: str, env: dict[str, str]) -> int:
    """How many times SLURM requeued the job, once it has completed (its result reaches
    lmlab-train a moment before the job ends; finished jobs stay listed for MinJobAge)."""
    for _ in range(60):
        shown = subprocess.run(
            ["scontrol", "show", "job", job_id], capture_output=True, text=True, env=env
        ).stdout
        if "JobState=COMPLETED" in shown:
            return int(re.search(r"Restarts=(\d+)", shown).group(1))
        time.sleep(1)
    raise AssertionError(f"job {job_id} did not complete: {shown}")


@pytest.mark.slow
@needs_slurm
@needs_corpus("tinyshakespeare.txt")
def test_a_sweep_outlasting_its_time_limit_is_requeued_and_ends_like_an_uninterrupted_run(
    tmp_path: Path, slurm_env: dict[str, str]
):
    # The uninterrupted runs, one per seed, side by side (no SLURM).
    reference = {seed: tmp_path / "reference" / f"seed-{seed}" for seed in SEEDS}
    started = time.monotonic()
    processes = {
        seed: subprocess.Popen(
            [sys.executable, "-m", "lmlab.train", *RUN, f"seed={seed}", f"hydra.run.dir={d}"],
            cwd=tmp_path,
            env=slurm_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed, d in reference.items()
    }
    for process in processes.values():
        _, err = process.communicate(timeout=900)
        assert process.returncode == 0, err[-3000:]
    reference_seconds = time.monotonic() - started
    expected = {seed: _last_val_loss(d) for seed, d in reference.items()}
    # negative control: the two seeds end apart, so equal figures below are not a constant
    assert expected[1] != expected[2]

    # The sweep on SLURM: the run directory is not given, so `${now:...}_${lmlab.run_id:}`
    # names it; a requeued job that resolved it again would write to a second directory.
    log_dir = tmp_path / "runs"
    (tmp_path / "pause").mkdir()
    (tmp_path / "pause" / "lmlab_test_pause.py").write_text(PAUSE)
    sweep_env = {**slurm_env, "PYTHONPATH": str(tmp_path / "pause")}
    seeds = ",".join(str(s) for s in SEEDS)
    started = time.monotonic()
    output = _run(
        ["-m", *RUN, *SLURM, f"paths.log_dir={log_dir}", f"seed={seeds}"],
        tmp_path,
        sweep_env,
        timeout=1800,
    )
    sweep_seconds = time.monotonic() - started

    sweeps = list((log_dir / "train" / "multirun").iterdir())
    assert len(sweeps) == 1, sweeps  # one sweep directory, however often its jobs restarted
    jobs = sorted(p for p in sweeps[0].iterdir() if (p / ".hydra").is_dir())
    assert [p.name for p in jobs] == [f"{i}_seed-{s}" for i, s in enumerate(SEEDS)], output
    # submitit's folder per array task: <array job id>_<task id>
    submitit_dirs = (sweeps[0] / ".submitit").iterdir()
    job_ids = sorted(p.name for p in submitit_dirs if re.fullmatch(r"\d+_\d+", p.name))
    assert len(job_ids) == len(SEEDS), job_ids

    rows = []
    for seed, job_dir, job_id in zip(SEEDS, jobs, job_ids, strict=True):
        restarts = _restarts(job_id, slurm_env)
        log = (job_dir / "train.log").read_text()
        resumed = log.count("ckpt_path=auto: resuming from")
        assert restarts >= 1, f"job {job_id} was never requeued: {log[-3000:]}"
        # every requeued attempt took ckpt_path=auto, and at least one found a checkpoint
        assert log.count("requeued SLURM job (restart") == restarts, log[-3000:]
        assert resumed >= 1, log[-3000:]
        got = _last_val_loss(job_dir)
        rows.append((job_id, seed, restarts, resumed, got, expected[seed]))
        assert got == expected[seed], (job_id, got, expected[seed])

    print(f"\nuninterrupted runs: {reference_seconds:.0f} s; SLURM sweep: {sweep_seconds:.0f} s")
    print("| job | seed | requeues | resumed from last.ckpt | val/loss (SLURM) | uninterrupted |")
    for job_id, seed, restarts, resumed, got, want in rows:
        print(f"| {job_id} | {seed} | {restarts} | {resumed} | {got!r} | {want!r} |")
