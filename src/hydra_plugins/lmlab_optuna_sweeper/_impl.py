"""The search: an Optuna study in a database, asked for trials and told their outcomes
(Optuna's ask-and-tell interface), each trial run as one job by Hydra's configured launcher.

The study lives in a database (by default an SQLite file in the sweep directory), which is
what lets several workers share one search and an interrupted search resume:

- the budget is counted in the database: a worker stops asking once the study holds
  `n_trials` trials that are complete, pruned, failed or still running, whoever ran them;
- the database numbers the trials, so no two workers run the same one; a job directory is
  named by its trial's number (`3_model.optimizer.lr-0.001`);
- a worker records a heartbeat for each trial it runs. A trial whose worker was stopped
  (Ctrl-C, SIGTERM) is failed at once, one whose worker died (SIGKILL, a lost machine) when
  its heartbeat is `grace_period` seconds old; either way its parameters are queued again,
  and neither counts against the budget: resuming runs them first.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import socket
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from optuna.trial import FrozenTrial, Trial, TrialState
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from lmlab.errors import LmlabError
from lmlab.optuna_pruning import PrunedTrial, open_storage, trial_environment

from ._space import SearchSpace, parse_search_space

log = logging.getLogger(__name__)

DEFAULT_STUDY = "lmlab"
DATABASE_FILE = "optuna.db"
RESULTS_FILE = "optimization_results.yaml"
# User attributes the sweeper sets on trials (shown by optuna-dashboard):
FAILURE = "failure"  # why a trial's job failed; such a trial counts against the budget
RETRY_OF = "retry_of"  # the trial whose worker stopped or died, rerun with its parameters
SURPLUS = "surplus"  # asked for when other workers had spent the budget: never run
WORKER = "worker"  # host:pid of the worker that runs the trial
JOB_DIR = "job_dir"


class OptunaSearch:
    """The keys of `hydra.sweeper` (config.OptunaSweeperConf) and the search they describe."""

    def __init__(
        self,
        sampler: Any,
        pruner: Any,
        direction: str,
        storage: str | None,
        study_name: str | None,
        n_trials: int,
        n_jobs: int,
        max_failure_rate: float,
        params: DictConfig | None,
        heartbeat_interval: int,
        grace_period: int | None,
    ) -> None:
        if direction not in ("minimize", "maximize"):
            raise LmlabError(
                f"hydra.sweeper.direction={direction}: use minimize or maximize (lmlab-train "
                "returns one value, its optimized_metric)"
            )
        if n_trials < 1 or n_jobs < 1:
            raise LmlabError("hydra.sweeper.n_trials and hydra.sweeper.n_jobs must be >= 1")
        if not 0.0 <= max_failure_rate <= 1.0:
            raise LmlabError("hydra.sweeper.max_failure_rate must be between 0 and 1")
        if storage and not study_name:
            raise LmlabError(
                f"hydra.sweeper.storage={storage} needs hydra.sweeper.study_name: the name that "
                "the workers of one search share (a database may hold many studies)"
            )
        if heartbeat_interval < 1:
            raise LmlabError("hydra.sweeper.heartbeat_interval must be >= 1 (seconds)")
        # Hydra has instantiated both already (their configs have a _target_); the pruner is
        # used by each job, which builds its own from hydra.sweeper.pruner
        self.sampler, self.pruner = sampler, pruner
        self.direction = direction
        self.storage_url, self.study_name = storage, study_name or DEFAULT_STUDY
        self.n_trials, self.n_jobs, self.max_failure_rate = n_trials, n_jobs, max_failure_rate
        self.params = OmegaConf.to_container(params) if params is not None else None
        self.heartbeat_interval, self.grace_period = heartbeat_interval, grace_period
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )

    # ------------------------------------------------------------------ the study

    def open_study(self, sweep_dir: Path) -> optuna.Study:
        """Create the study, or load it when the storage has it already (a resumed search, or
        another worker's)."""
        if self.storage_url is None:
            sweep_dir.mkdir(parents=True, exist_ok=True)
            self.storage_url = f"sqlite:///{(sweep_dir / DATABASE_FILE).absolute()}"
        stale_callback = _stale_callback_argument()
        try:
            self.storage = open_storage(
                self.storage_url,
                heartbeat_interval=self.heartbeat_interval,
                grace_period=self.grace_period,
                **{stale_callback: self._requeue_stale},
            )
        except (SQLAlchemyError, ImportError, ValueError) as err:
            raise LmlabError(
                f"cannot open the Optuna storage {shown_url(self.storage_url)}: "
                f"{str(err).splitlines()[0]}; check hydra.sweeper.storage (PostgreSQL needs "
                "pip install 'lmlab[postgres]', a URL postgresql+psycopg2://... and a running "
                "server)"
            ) from err
        study = optuna.create_study(
            storage=self.storage,
            sampler=_instance(self.sampler),
            study_name=self.study_name,
            direction=self.direction,
            load_if_exists=True,
        )
        if study.direction.name.lower() != self.direction:
            raise LmlabError(
                f"study {self.study_name!r} in {shown_url(self.storage_url)} was created to "
                f"{study.direction.name.lower()}, not to {self.direction}: set "
                "hydra.sweeper.direction to match, or use another hydra.sweeper.study_name"
            )
        return study

    def _requeue_stale(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Called by Optuna for a running trial whose heartbeat stopped (now failed)."""
        log.warning(
            f"trial {trial.number} was left running by a worker that stopped "
            f"({trial.user_attrs.get(WORKER, 'unknown')}): marked failed; its parameters are "
            "queued to run again"
        )
        study.enqueue_trial(trial.params, user_attrs={RETRY_OF: trial.number})

    # ------------------------------------------------------------------ the loop

    def sweep(self, arguments: list[str]) -> None:
        space = parse_search_space(self.params, arguments)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")  # as Hydra's basic sweeper
        study = self.open_study(sweep_dir)
        fail_stale_trials(study)
        log.info(
            f"Optuna {optuna.__version__} study {self.study_name!r} in "
            f"{shown_url(self.storage_url)}: "
            f"{describe(study.get_trials(deepcopy=False))}; budget {self.n_trials} trials"
        )
        log.info(f"Sampler: {type(study.sampler).__name__}; pruner: {self._pruner_name()}")
        while batch := self.ask(study, space):
            returns = self.run_batch(study, batch, space)
            failed = sum(self.tell(study, t, r) for t, r in zip(batch, returns, strict=True))
            if failed and failed / len(batch) > self.max_failure_rate:
                raise LmlabError(
                    f"{failed} of {len(batch)} trials of a batch failed "
                    f"(hydra.sweeper.max_failure_rate={self.max_failure_rate}); see their "
                    "train.log; the study keeps every trial so far"
                )
            fail_stale_trials(study)  # another worker's, that died
        self.write_results(study, sweep_dir)

    def ask(self, study: optuna.Study, space: SearchSpace) -> list[Trial]:
        """Up to n_jobs new trials while the study's budget lasts (counted over every worker).
        Queued trials (parameters of an interrupted trial) come first: `ask` takes them."""
        batch: list[Trial] = []
        while len(batch) < self.n_jobs and spent(study.get_trials(deepcopy=False)) < self.n_trials:
            with _quiet_heartbeat_warnings():
                trial = study.ask(space.distributions)
            # Two workers may both have seen one trial left and asked: the database's numbering
            # decides, and the later trial is never run.
            trials = study.get_trials(deepcopy=False)
            if spent(t for t in trials if t.number <= trial.number) > self.n_trials:
                trial.set_user_attr(SURPLUS, "the budget was spent by other workers")
                study.tell(trial, state=TrialState.FAIL)
                break
            trial.set_user_attr(WORKER, self.worker)
            self.storage.record_heartbeat(self.trial_id(trial))
            batch.append(trial)
        return batch

    def run_batch(
        self, study: optuna.Study, batch: list[Trial], space: SearchSpace
    ) -> list[JobReturn]:
        """Launch the batch's jobs, each numbered by its trial (runs of consecutive numbers go
        to the launcher together), with a heartbeat for the trials while they run."""
        returns: list[JobReturn] = []
        try:
            with self._heartbeat([self.trial_id(t) for t in batch]):
                for run in consecutive(batch):
                    overrides = [self.job_overrides(t, space) for t in run]
                    returns += self.launcher.launch(overrides, initial_job_idx=run[0].number)
        except BaseException as err:  # Ctrl-C, SIGTERM: the trials are not lost
            for trial, ret in zip(batch, returns, strict=False):  # jobs that ended
                self.tell(study, trial, ret)
            for trial in batch[len(returns) :]:
                self._interrupted(study, trial, err)
            raise
        return returns

    def job_overrides(self, trial: Trial, space: SearchSpace) -> list[str]:
        env = trial_environment(self.storage_url or "", self.study_name, trial.number)
        return [
            *space.overrides(trial.params),
            *(f"++hydra.job.env_set.{k}={_quoted(v)}" for k, v in env.items()),
        ]

    def tell(self, study: optuna.Study, trial: Trial, ret: JobReturn) -> bool:
        """Record the job's outcome in the study; True when the trial failed."""
        job_dir = _job_dir(ret)
        if job_dir is not None:
            trial.set_user_attr(JOB_DIR, job_dir)
        try:
            value = ret.return_value  # re-raises the job's exception, when it raised one
        except Exception as err:
            value, failure = None, f"{type(err).__name__}: {err}"
        else:
            failure = "the job failed; see its train.log" if value is None else None
        if isinstance(value, PrunedTrial):
            study.tell(trial, state=TrialState.PRUNED)
            return False
        if failure is None:
            try:
                number = float(value)
            except (TypeError, ValueError):
                number, failure = math.nan, f"the job returned {value!r}, not a number"
            if failure is None and not math.isfinite(number):
                failure = f"the job returned {number}"
        if failure is not None:
            trial.set_user_attr(FAILURE, failure)
            study.tell(trial, state=TrialState.FAIL)
            log.warning(f"trial {trial.number} failed: {failure}")
            return True
        study.tell(trial, number)
        return False

    def trial_id(self, trial: Trial) -> int:
        """The trial's id in the storage (its number counts within the study)."""
        study_id = self.storage.get_study_id_from_name(self.study_name)
        return self.storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)

    def _interrupted(self, study: optuna.Study, trial: Trial, err: BaseException) -> None:
        if self.storage.get_trial(self.trial_id(trial)).state != TrialState.RUNNING:
            return
        study.tell(trial, state=TrialState.FAIL)
        study.enqueue_trial(trial.params, user_attrs={RETRY_OF: trial.number})
        log.warning(
            f"trial {trial.number} did not finish ({type(err).__name__}): marked failed, its "
            "parameters queued to run again when the search resumes (the same command, with "
            "the same hydra.sweep.dir, or the same hydra.sweeper.storage and study_name)"
        )

    @contextmanager
    def _heartbeat(self, trial_ids: Sequence[int]) -> Iterator[None]:
        """Record a heartbeat for each trial every heartbeat_interval seconds, in a thread,
        while the launcher runs their jobs."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.heartbeat_interval):
                for trial_id in trial_ids:
                    try:
                        self.storage.record_heartbeat(trial_id)
                    except Exception as err:  # a database hiccup must not kill the search
                        log.warning(f"could not record a heartbeat: {err}")

        thread = threading.Thread(target=beat, name="optuna-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    # ------------------------------------------------------------------ the results

    def write_results(self, study: optuna.Study, sweep_dir: Path) -> None:
        trials = study.get_trials(deepcopy=False)
        log.info(f"study {self.study_name!r}: {describe(trials)}")
        if not any(t.state == TrialState.COMPLETE for t in trials):
            log.warning("no trial completed: no best parameters")
            return
        best = study.best_trial
        log.info(f"Best parameters: {best.params}")
        log.info(f"Best value: {best.value} (trial {best.number})")
        results = {
            "name": "optuna",
            "study_name": self.study_name,
            "best_trial": best.number,
            "best_params": best.params,
            "best_value": best.value,
        }
        OmegaConf.save(OmegaConf.create(results), sweep_dir / RESULTS_FILE)

    def _pruner_name(self) -> str:
        return type(_instance(self.pruner)).__name__ if self.pruner else "none"


def spent(trials: Any) -> int:
    """Trials that count against the budget: complete, pruned, running, and failed because
    their job failed; not those whose worker stopped (rerun), nor surplus ones."""
    counted = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    return sum(
        t.state in counted or (t.state == TrialState.FAIL and FAILURE in t.user_attrs)
        for t in trials
    )


def describe(trials: Sequence[FrozenTrial]) -> str:
    """`6 trials: 2 complete, 4 pruned`."""
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
    parts = ", ".join(f"{n} {state}" for state, n in counts.items())
    return f"{len(trials)} trials" + (f": {parts}" if parts else "")


def consecutive(batch: Sequence[Trial]) -> list[list[Trial]]:
    """The batch cut into runs of consecutive trial numbers (the launcher numbers its jobs
    from a first number on; another worker's trials may fall in between)."""
    runs: list[list[Trial]] = []
    for trial in sorted(batch, key=lambda t: t.number):
        if runs and runs[-1][-1].number + 1 == trial.number:
            runs[-1].append(trial)
        else:
            runs.append([trial])
    return runs


@contextmanager
def _quiet_heartbeat_warnings() -> Iterator[None]:
    """Optuna marks its heartbeat experimental, and expects it to be used by Study.optimize,
    which records the heartbeats itself; here the sweeper's own thread records them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
        yield


def fail_stale_trials(study: optuna.Study) -> None:
    """Fail the running trials whose heartbeat stopped; `_requeue_stale` is called for each."""
    with _quiet_heartbeat_warnings():
        optuna.storages.fail_stale_trials(study)


def _instance(obj: Any) -> Any:
    """A sampler or pruner: as Hydra instantiated it, or instantiated from its config."""
    return instantiate(obj) if isinstance(obj, (dict, DictConfig)) else obj


def _job_dir(ret: JobReturn) -> str | None:
    try:
        return str(ret.hydra_cfg.hydra.runtime.output_dir)
    except Exception:  # a job that failed before Hydra set up its directory
        return None


def shown_url(url: str) -> str:
    """A storage URL for a log line: its password, if any, as ***."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy can read: RDBStorage says so
        return url


def _quoted(value: str) -> str:
    """A string as a quoted override value (a URL's `:`, `?` or `=` are read literally)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _stale_callback_argument() -> str:
    """RDBStorage's argument for the callback on stale trials: renamed in Optuna 4.9."""
    parameters = inspect.signature(optuna.storages.RDBStorage).parameters
    if "heartbeat_stale_trial_callback" in parameters:
        return "heartbeat_stale_trial_callback"
    return "failed_trial_callback"
