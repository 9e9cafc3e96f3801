"""Distributed runs under Hydra: one run directory and one job's settings for every process.

- `strategy=ddp` (or fsdp) on one machine: Lightning starts processes 1..N-1 by running the
  command line again, with `hydra.run.dir` as configured (not the job's directory in a sweep)
  and with `-m`, so that each would start a sweep of its own. Here each extra process gets the
  job's own overrides and output directory (`process_command`).
- torchrun starts every process itself, and each would compose its own run directory from its
  own clock and random suffix. Here rank 0 decides the run's name and command line and the
  other ranks take them from it, through the store torchrun serves its workers
  (`torchrun_arguments`).

(Under SLURM each task gets the job's directory from the launcher: none of this is used.)"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_original_cwd
from omegaconf import DictConfig

from lmlab.errors import LmlabError
from lmlab.runs.sweeps import run_id

# What torchrun sets for each process it starts (Lightning's TorchElasticEnvironment looks for
# the same four); Lightning's own launcher sets neither GROUP_RANK nor LOCAL_WORLD_SIZE.
TORCHRUN_VARIABLES = ("RANK", "GROUP_RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
# The last part of the run directory (conf/hydra/default.yaml reads it when set): under torchrun
# rank 0 sets it for every rank; otherwise each run draws its own time stamp and suffix.
RUN_NAME_ENV = "LMLAB_RUN_NAME"
RUN_NAME_FORMAT = "%Y-%m-%d_%H-%M-%S"  # as the run.dir line formats ${now:...}
# Namespaced: the store is torchrun's own, shared with torch.distributed's keys.
DECISION_KEY = "lmlab/rank_zero_decision"
# How long ranks 1..N-1 wait for rank 0 to decide (it does so first thing, before any import
# of torch's models or data: seconds, unless rank 0 failed to start).
DECISION_TIMEOUT = timedelta(minutes=5)
# The store of rank 0, kept alive while ranks 1..N-1 read from it (see _torchrun_store).
_stores: list[Any] = []


def process_command(hydra_cfg: DictConfig, local_rank: int) -> list[str]:
    """The command line of process `local_rank` of the job described by `hydra_cfg`."""
    # Quoted: Hydra parses override values, and would take `0_model=gpt,seed=1` for a sweep.
    run_dir = hydra_cfg.runtime.output_dir.replace("\\", "\\\\").replace('"', '\\"')
    command = [
        f'hydra.run.dir="{run_dir}"',
        *extra_process_overrides(hydra_cfg.job.name, local_rank),
    ]
    return [sys.executable, "-m", "lmlab.train", *hydra_cfg.overrides.task, *command]


def extra_process_overrides(job_name: str, rank: int) -> list[str]:
    """What sets process `rank` (not 0) of a run apart: its own log file, `<job>_process_N.log`,
    and no `.hydra/` of its own (the first process writes the run's)."""
    return [f"hydra.job.name={job_name}_process_{rank}", "hydra.output_subdir=null"]


def under_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def torchrun_arguments(args: list[str], resume: Callable[[list[str]], list[str]]) -> list[str]:
    """The overrides this process runs with: `resume(args)` (a checkpoint of a run brings that
    run's overrides and directory). Under torchrun rank 0 computes them, with the run's name,
    and every other rank takes both from it, adding `extra_process_overrides`: the ranks
    share one run directory however far apart their clocks read, and only rank 0 keeps the
    earlier config of a resumed run."""
    if not under_torchrun():
        return resume(args)
    if any(arg in ("-m", "--multirun") for arg in args):
        raise LmlabError(
            "torchrun runs one training job; a sweep (-m) under torchrun would start one sweep "
            "per process. Run the sweep with lmlab-train -m trainer=ddp (Lightning starts each "
            "job's processes), or start torchrun once per job"
        )
    rank = int(os.environ["RANK"])
    store = _torchrun_store(rank)
    if rank == 0:
        args = resume(args)
        name = os.environ.get(RUN_NAME_ENV) or f"{time.strftime(RUN_NAME_FORMAT)}_{run_id()}"
        proposal = json.dumps({"args": args, "run_name": name})
        # the first decision stands: workers restarted by torchrun (--max-restarts) find the
        # same run directory, and no rank can read a decision that is replaced afterwards
        decision = store.compare_set(DECISION_KEY, "", proposal)
    else:
        decision = store.get(DECISION_KEY)  # waits until rank 0 has decided
    decided = json.loads(decision)
    os.environ[RUN_NAME_ENV] = decided["run_name"]
    if rank == 0:
        return decided["args"]
    return [*decided["args"], *extra_process_overrides("train", rank)]


def _torchrun_store(rank: int) -> Any:
    """A client of the TCPStore that torchrun's agent serves its workers at MASTER_ADDR:
    MASTER_PORT (TORCHELASTIC_USE_AGENT_STORE=True, torchrun's default). Without the agent's
    store rank 0 serves it, as init_process_group would; multi_tenant lets that later
    init_process_group of the same process share the port."""
    from torch.distributed import TCPStore

    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    store = TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=rank == 0 and not agent_store,
        timeout=DECISION_TIMEOUT,
        wait_for_workers=False,
        multi_tenant=True,
    )
    _stores.append(store)
    return store


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
