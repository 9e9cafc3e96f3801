"""The sweeper's config, registered as `hydra/sweeper: optuna`: the keys of the former
hydra-optuna-sweeper plugin (`sampler`, `direction`, `storage`, `study_name`, `n_trials`,
`n_jobs`, `max_failure_rate`, `params`), plus `pruner` and the heartbeat that finds trials
whose worker died."""

# No `from __future__ import annotations`: Hydra's plugin scan runs this module before it is in
# sys.modules, where dataclasses would look string annotations up.
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.lmlab_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    # instantiated with hydra.utils.instantiate: any optuna.samplers.* with its arguments
    sampler: Any = field(default_factory=lambda: {"_target_": "optuna.samplers.TPESampler"})
    # used by each trial's job, which reports its validation values and stops when told;
    # null: never prune
    pruner: Any = field(default_factory=lambda: {"_target_": "optuna.pruners.MedianPruner"})
    direction: str = "minimize"  # or maximize: what to do with the job's optimized_metric
    # any SQLAlchemy URL (sqlite:///path.db, postgresql://user:password@host/db); null: an
    # SQLite file optuna.db in the sweep directory
    storage: str | None = None
    # the study in the storage; workers that name the same storage and study share it. null:
    # "lmlab" in the default storage (one study per sweep directory); required with `storage`
    study_name: str | None = None
    n_trials: int = 20  # trials of the whole study, over every worker (running ones included)
    n_jobs: int = 1  # trials asked for at once and launched together (a batch)
    # stop the search when more than this fraction of a batch's trials fail
    max_failure_rate: float = 0.0
    # key -> Hydra sweep expression: choice(...), range(...), interval(...), tag(log, ...)
    params: dict[str, str] | None = None
    # seconds between the heartbeats a worker records for its running trials; a running
    # trial without one for `grace_period` seconds (default: 2 x interval) belongs to a worker
    # that died: it is failed and its parameters queued again
    heartbeat_interval: int = 30
    grace_period: int | None = None


ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf)
