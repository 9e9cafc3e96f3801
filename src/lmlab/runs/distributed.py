"""DDP under Hydra. For `strategy=ddp` on one machine Lightning starts processes 1..N-1 by
running the command line again, with `hydra.run.dir` as configured (not the job's directory in a
sweep) and with `-m`, so that each would start a sweep of its own. Here each extra process gets
the job's own overrides and output directory. (Under SLURM or torchrun none of this is used.)"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_original_cwd
from omegaconf import DictConfig


def process_command(hydra_cfg: DictConfig, local_rank: int) -> list[str]:
    """The command line of process `local_rank` of the job described by `hydra_cfg`."""
    # Quoted: Hydra parses override values, and would take `0_model=gpt,seed=1` for a sweep.
    run_dir = hydra_cfg.runtime.output_dir.replace("\\", "\\\\").replace('"', '\\"')
    name = f"{hydra_cfg.job.name}_process_{local_rank}"
    # hydra.output_subdir=null: .hydra/ is the first process's to write
    command = [f'hydra.run.dir="{run_dir}"', f"hydra.job.name={name}", "hydra.output_subdir=null"]
    return [sys.executable, "-m", "lmlab.train", *hydra_cfg.overrides.task, *command]


def use_job_directory_for_ddp_processes() -> None:
    """Make Lightning's DDP launcher start its processes with `process_command`."""
    # Imported here: private_apis imports lightning, which `lmlab-train --help` must not load.
    from lmlab.private_apis import set_ddp_process_command

    set_ddp_process_command(
        lambda rank: (process_command(HydraConfig.get(), rank), get_original_cwd())
    )


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
