"""DDP under Hydra: the extra processes of a run work in that run's directory.

For `strategy=ddp` on one machine Lightning starts processes 1..N-1 by running the command
line again. Its Hydra variant passes `hydra.run.dir` as configured, which is not the job's
directory in a sweep, and passes `-m` on, so every extra process would start a sweep of its
own. Here each extra process gets the job's own overrides and the job's output directory.
(Under SLURM or torchrun every process is started by the cluster, and none of this is used.)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from omegaconf import DictConfig


def _quoted(value: str) -> str:
    # Hydra parses override values: a job directory like `0_model=gpt,seed=1` must be quoted
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def process_command(hydra_cfg: DictConfig, local_rank: int) -> list[str]:
    """The command line of process `local_rank` of the job described by `hydra_cfg`."""
    return [
        sys.executable,
        "-m",
        "lmlab.train",
        *hydra_cfg.overrides.task,
        f"hydra.run.dir={_quoted(hydra_cfg.runtime.output_dir)}",
        f"hydra.job.name={hydra_cfg.job.name}_process_{local_rank}",
        "hydra.output_subdir=null",  # .hydra/ is the first process's to write
    ]


def _subprocess_command(local_rank: int) -> tuple[Sequence[str], str]:
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd

    return process_command(HydraConfig.get(), local_rank), get_original_cwd()


def use_job_directory_for_ddp_processes() -> None:
    """Make Lightning's DDP launcher start its processes with `process_command`."""
    from lightning.pytorch.strategies.launchers import subprocess_script

    subprocess_script._hydra_subprocess_cmd = _subprocess_command


@contextmanager
def distributed_job() -> Iterator[None]:
    """Run one job; afterwards leave no trace of its DDP processes, so that the next job of a
    sweep, in this same process, starts its own: Lightning leaves the process group open and
    its rank variables (LOCAL_RANK, WORLD_SIZE, ...) in the environment, where the next
    launcher would take them as a sign that the processes were started already."""
    import torch.distributed as dist

    environment = dict(os.environ)
    try:
        yield
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(environment)
