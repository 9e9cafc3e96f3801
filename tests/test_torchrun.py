"""torchrun: rank 0 decides the run's name and command line, every rank runs in that directory,
and training equals `trainer=ddp_cpu` (where Lightning starts the second process itself)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TINY_GPT, run_lmlab

from lmlab.errors import LmlabError
from lmlab.runs import distributed
from lmlab.runs.distributed import RUN_NAME_ENV, torchrun_arguments


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_torchrun_rank(monkeypatch: pytest.MonkeyPatch, rank: int, port: int) -> None:
    """The environment torchrun gives process `rank` of 2, on one machine, with the store served
    by the agent (here: by the test)."""
    values = {
        "RANK": rank,
        "GROUP_RANK": 0,
        "LOCAL_RANK": rank,
        "LOCAL_WORLD_SIZE": 2,
        "WORLD_SIZE": 2,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": port,
        "TORCHELASTIC_USE_AGENT_STORE": "True",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.delenv(RUN_NAME_ENV, raising=False)


def test_the_other_ranks_take_rank_zeros_arguments_and_run_name(monkeypatch):
    from torch.distributed import TCPStore

    port = free_port()
    agent = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)  # as torchrun's
    monkeypatch.setattr(distributed, "_stores", [])
    resumed = ["model=gpt", "seed=2", 'hydra.run.dir="/runs/a,b"']  # what resume() made of it

    as_torchrun_rank(monkeypatch, 0, port)
    rank0 = torchrun_arguments(["seed=2"], lambda args: resumed)
    name0 = os.environ[RUN_NAME_ENV]

    as_torchrun_rank(monkeypatch, 1, port)
    # rank 1's own resume() is never asked: only rank 0 keeps a resumed run's earlier config
    rank1 = torchrun_arguments(["seed=2"], lambda args: pytest.fail("rank 1 resumed"))
    assert rank0 == resumed
    assert rank1 == [*resumed, "hydra.job.name=train_process_1", "hydra.output_subdir=null"]
    assert os.environ[RUN_NAME_ENV] == name0
    # the time stamp and suffix of conf/hydra/default.yaml's run.dir, drawn once
    stamp, suffix = name0.rsplit("_", 1)
    assert len(stamp) == len("2024-01-31_12-00-00") and len(suffix) == 6

    # a restarted rank 0 (torchrun --max-restarts) keeps the first decision
    as_torchrun_rank(monkeypatch, 0, port)
    assert torchrun_arguments(["seed=3"], lambda args: args) == resumed
    assert os.environ[RUN_NAME_ENV] == name0
    del agent


def test_outside_torchrun_each_process_resumes_by_itself(monkeypatch):
    for name in ("RANK", "GROUP_RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert torchrun_arguments(["seed=1"], lambda args: [*args, "x=1"]) == ["seed=1", "x=1"]


def test_a_sweep_under_torchrun_is_refused(monkeypatch):
    as_torchrun_rank(monkeypatch, 0, free_port())
    with pytest.raises(LmlabError, match="torchrun runs one training job"):
        torchrun_arguments(["-m", "seed=1,2"], lambda args: args)


SETTINGS = [
    *TINY_GPT,
    "data.block_size=16",
    "trainer.max_steps=10",
    "trainer.val_check_interval=5",
    "trainer.enable_progress_bar=false",
    "print_config=false",
]


@pytest.mark.slow
def test_torchrun_writes_one_run_directory_and_trains_as_ddp_cpu(
    tiny_corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # torchrun sets OMP_NUM_THREADS=1 for its processes; the other runs get the same, so that
    # all compute with the same number of threads
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv(RUN_NAME_ENV, raising=False)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    result = subprocess.run(
        [*torchrun, "--nproc_per_node=2", "-m", "lmlab.train", "trainer=ddp_cpu"]
        + [f"data.path={tiny_corpus}", f"paths.log_dir={tmp_path / 'logs'}", *SETTINGS],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "logs" / "train").iterdir())
    assert len(runs) == 1, runs  # not one per rank
    run = runs[0]
    assert (run / ".hydra" / "config.yaml").is_file()
    assert (run / "train.log").is_file() and (run / "train_process_1.log").is_file()
    assert "train_process_1" not in (run / "train.log").read_text()  # each rank its own log
    assert result.stdout.count("run directory:") == 2  # rank 0 only: at the start and the end

    common = [f"data.path={tiny_corpus}", *SETTINGS]
    ddp = run_lmlab("train", "trainer=ddp_cpu", f"hydra.run.dir={tmp_path / 'ddp'}", *common)
    # the negative control: one process, so half the global batch
    single = run_lmlab("train", "trainer=cpu", f"hydra.run.dir={tmp_path / 'single'}", *common)
    assert ddp.returncode == 0 and single.returncode == 0, ddp.stderr[-2000:] + single.stderr
    metrics = [json.loads((d / "metrics.json").read_text()) for d in (run, tmp_path / "ddp")]
    single_loss = json.loads((tmp_path / "single" / "metrics.json").read_text())["val/loss"]
    assert metrics[0]["steps"] == metrics[1]["steps"] == 10
    assert metrics[0]["val/loss"] == metrics[1]["val/loss"]  # bit for bit
    assert metrics[0]["best"] == metrics[1]["best"]
    assert single_loss != metrics[0]["val/loss"]  # the comparison can tell runs apart
