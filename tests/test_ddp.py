"""DDP on CPU: two processes under Hydra, one run directory, batches shared between ranks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import TINY_GPT, run_lmlab
from omegaconf import OmegaConf

from lmlab.data.examples import BatchNumberSampler, WindowBatchSampler, shard
from lmlab.runs.distributed import process_command


def test_each_rank_draws_its_own_share_of_every_batch():
    ranks = [list(BatchNumberSampler(4, rank=r, world_size=2)) for r in (0, 1)]
    assert ranks == [[0, 2, 4, 6], [1, 3, 5, 7]]  # global batch n*2 + r: never the same
    windows = [list(WindowBatchSampler(20, 3, seed=1, rank=r, world_size=2)) for r in (0, 1)]
    seen = [i for rank in windows for batch in rank for i in batch]
    assert len(seen) == len(set(seen)) == 18  # 3 global batches of 2 x 3 distinct windows
    assert sorted(shard(5, 0, 2) + shard(5, 1, 2)) == [0, 1, 2, 3, 4]  # validation: no padding


def test_a_resumed_sampler_continues_where_the_run_stopped():
    whole = list(WindowBatchSampler(40, 4, seed=3, position=lambda: (0, 0)))
    rest = list(WindowBatchSampler(40, 4, seed=3, position=lambda: (0, 6)))
    assert rest == whole[6:]
    next_epoch = list(WindowBatchSampler(40, 4, seed=3, position=lambda: (1, 10)))
    assert next_epoch != whole  # a new permutation each epoch


def test_extra_processes_get_the_jobs_overrides_and_directory():
    hydra_cfg = OmegaConf.create(
        {
            "overrides": {"task": ["trainer=ddp_cpu", "seed=2"]},
            "runtime": {"output_dir": "/runs/multirun/x/1_seed=2,model=gpt"},
            "job": {"name": "train"},
        }
    )
    command = process_command(hydra_cfg, local_rank=1)
    assert command[1:3] == ["-m", "lmlab.train"]
    assert "-m" not in command[3:] and "--multirun" not in command  # no sweep of its own
    assert command[3:5] == ["trainer=ddp_cpu", "seed=2"]
    # quoted: `,` and `=` in a job directory name would otherwise be parsed as a sweep
    assert 'hydra.run.dir="/runs/multirun/x/1_seed=2,model=gpt"' in command
    assert "hydra.output_subdir=null" in command


@pytest.mark.slow
def test_ddp_cpu_trains_two_processes_into_one_run_directory(tiny_corpus: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    result = run_lmlab(
        "train",
        "trainer=ddp_cpu",
        f"data.path={tiny_corpus}",
        f"hydra.run.dir={run_dir}",
        *TINY_GPT,
        "data.block_size=16",
        "trainer.max_steps=10",
        "trainer.val_check_interval=5",
        "trainer.enable_progress_bar=false",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "tiny.txt"]  # no stray dirs
    events = list(run_dir.glob("events.out.tfevents.*"))
    assert events and len({e.name.split(".")[4] for e in events}) == 1  # one process wrote
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 10
    assert torch.isfinite(torch.tensor(summary["val/loss"]))
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "train_process_1.log").is_file()  # the second process ran, in this dir
    # printed by rank zero only: at the start (with the tensorboard command) and at the end
    assert result.stdout.count("run directory:") == 2
    assert result.stdout.count("tensorboard --logdir") == 1
