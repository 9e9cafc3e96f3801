"""Pruning inside a trial's job: the Optuna sweeper (hydra_plugins.lmlab_optuna_sweeper) tells
each job which trial it is, and this callback reports the optimized metric to that trial at
every validation and stops the run when the study's pruner says the trial is falling behind.

The sweeper passes the trial as environment variables, set through Hydra's
`hydra.job.env_set` override of the job: every launcher carries them to where the job runs
(this process, joblib workers, SLURM nodes), DDP processes inherit them, and being Hydra's
settings rather than the task's they stay out of the job's `overrides.yaml`, so neither a job
directory's name, `lmlab-compare`'s columns nor a resumed run (`ckpt_path=...`) carry them.

A pruned run raises `optuna.TrialPruned` out of `trainer.fit`: `RunSummary` records
`"status": "pruned"` in `metrics.json`, and `lmlab-train` returns a `PrunedTrial` to the
sweeper, which records the trial as pruned."""

from __future__ import annotations

import logging
import os
import random
import time
import warnings
from typing import Any, NamedTuple

import lightning as L
import optuna
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

log = logging.getLogger("lmlab")

STORAGE_ENV = "LMLAB_OPTUNA_STORAGE"
STUDY_ENV = "LMLAB_OPTUNA_STUDY"
TRIAL_ENV = "LMLAB_OPTUNA_TRIAL"  # the trial's number in its study


class PrunedTrial(NamedTuple):
    """What a pruned job returns to the sweeper (a plain tuple: it pickles through every
    launcher)."""

    step: int
    value: float | None


def trial_environment(storage: str, study_name: str, number: int) -> dict[str, str]:
    return {STORAGE_ENV: storage, STUDY_ENV: study_name, TRIAL_ENV: str(number)}


def open_storage(url: str, attempts: int = 5, **kwargs: Any) -> optuna.storages.RDBStorage:
    """An RDB storage for `url`; SQLite waits for a lock up to a minute, since several workers
    and their jobs write to one file. Workers that start together race to create the tables
    of a new database, and all but one fail: those try again once the tables are there."""
    from sqlalchemy.exc import SQLAlchemyError

    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():  # heartbeat arguments are marked experimental
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
        except SQLAlchemyError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 + random.random())
    raise AssertionError("unreachable")


def pruning_callbacks(cfg: DictConfig) -> tuple[L.Callback, ...]:
    """The pruning callback when this job is an Optuna trial, else nothing."""
    storage, study, number = (os.environ.get(k) for k in (STORAGE_ENV, STUDY_ENV, TRIAL_ENV))
    if not (storage and study and number):
        return ()
    monitor = str(cfg.get("optimized_metric") or "val/bpc")
    return (OptunaPruning(storage, study, int(number), monitor, _configured_pruner()),)


def _configured_pruner() -> dict[str, Any] | None:
    """hydra.sweeper.pruner of this job's config (the sweeper's settings travel with it)."""
    if not HydraConfig.initialized():
        return None
    pruner = HydraConfig.get().sweeper.get("pruner")
    return pruner if pruner is None else dict(pruner)


class PrunedAtStep(optuna.TrialPruned):
    """The pruning callback's stop, with where it stopped."""

    def __init__(self, message: str, step: int, value: float | None) -> None:
        super().__init__(message)
        self.step, self.value = step, value


def pruned_result(err: BaseException) -> PrunedTrial | None:
    """The job's return value when `err` is the pruning callback's stop, else None."""
    if not isinstance(err, optuna.TrialPruned):
        return None
    return PrunedTrial(int(getattr(err, "step", -1)), getattr(err, "value", None))


class OptunaPruning(L.Callback):
    """Reports `monitor` at each validation of `fit` (not the check at step 0, nor the final
    estimate after it) to trial `number` of the study, at the step it was measured, and raises
    `optuna.TrialPruned` when the pruner (`hydra.sweeper.pruner`, e.g. MedianPruner) prunes it.
    Only the first process talks to the database; under DDP the others follow its decision."""

    def __init__(
        self,
        storage: str,
        study_name: str,
        number: int,
        monitor: str,
        pruner: dict[str, Any] | None = None,
    ) -> None:
        self.storage_url, self.study_name, self.number = storage, study_name, number
        self.monitor = monitor
        self.pruner = pruner
        self._trial: optuna.trial.Trial | None = None
        self._disabled = False

    @rank_zero_only
    def _open_trial(self) -> None:
        if self._trial is not None or self._disabled:
            return
        storage = open_storage(self.storage_url)
        pruner = instantiate(self.pruner) if self.pruner else optuna.pruners.NopPruner()
        study = optuna.load_study(study_name=self.study_name, storage=storage, pruner=pruner)
        study_id = storage.get_study_id_from_name(self.study_name)
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, self.number)
        state = storage.get_trial(trial_id).state
        if state != optuna.trial.TrialState.RUNNING:  # e.g. a finished trial's job run again
            log.warning(f"optuna trial {self.number} is {state.name}: not reporting to it")
            self._disabled = True
            return
        self._trial = optuna.trial.Trial(study, trial_id)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        value = trainer.callback_metrics.get(self.monitor)
        step = trainer.global_step
        prune = self._report(None if value is None else float(value), step)
        if trainer.world_size > 1:
            prune = trainer.strategy.broadcast(prune, src=0)
        if prune:
            shown = "" if value is None else f": {self.monitor} {float(value):.4f}"
            message = f"pruned at step {step}{shown}, behind the study's other trials"
            log.info(f"optuna trial {self.number} {message}")
            raise PrunedAtStep(message, step, None if value is None else float(value))

    def _report(self, value: float | None, step: int) -> bool:
        """Report to the trial and ask the pruner (rank zero only; False elsewhere)."""
        if rank_zero_only.rank != 0:
            return False
        self._open_trial()
        if self._trial is None or value is None or value != value:  # NaN: nothing to compare
            return False
        self._trial.report(value, step)
        return self._trial.should_prune()
