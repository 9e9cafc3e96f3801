"""What `lmlab-train -m` adds to Hydra's multirun: readable job directories, and a sweep
whose exit status says whether every job completed.

Each job records its own outcome in `metrics.json` (a failed job too, see
`lmlab.callbacks.record_failure`), so the outcome of a sweep is read back from the job
directories: that works whichever launcher ran the jobs (in this process, in joblib
workers, or on SLURM nodes that share the file system).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shlex
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

JOB_DIRNAME_RESOLVER = "lmlab.job_dirname"
RUN_ID_RESOLVER = "lmlab.run_id"
# How the sweeping process tells its jobs which keys vary. An environment variable reaches
# every launcher's jobs: this process's, joblib and submitit children, sbatch's (which
# exports the environment by default).
SWEPT_KEYS_ENV = "LMLAB_SWEPT_KEYS"
# Characters kept in a job directory name; anything else (path separators, quotes, spaces,
# shell wildcards) becomes `_`, so the name is one safe path component on every system.
_UNSAFE = re.compile(r"[^\w.,=+\-~@%\[\]{}]")
# File names are limited to 255 bytes; leave room for what tools append.
MAX_DIRNAME_BYTES = 180


def is_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def threads_per_parallel_job() -> int | None:
    """Under `hydra/launcher=joblib`, n_jobs jobs run at once on this machine: each gets its
    share of the cores (None otherwise). torch would start a thread per core in every job,
    and n_jobs x cores threads on cores slow every job down."""
    if not is_multirun():
        return None
    launcher = HydraConfig.get().launcher
    if "joblib" not in str(launcher.get("_target_", "")):
        return None
    cores = os.cpu_count() or 1
    n_jobs = int(launcher.get("n_jobs") or -1)
    if n_jobs < 0:  # joblib's convention: -1 is every core, -2 all but one, ...
        n_jobs = max(cores + 1 + n_jobs, 1)
    return max(cores // n_jobs, 1)


def job_dirname(
    num: int,
    overrides: Iterable[str],
    exclude_keys: Iterable[str] = (),
    swept_keys: Collection[str] = (),
) -> str:
    """`3_model=gpt,data.block_size=64`: the job number (unique, sorts in launch order), then
    the job's overrides as typed: only the swept ones when `swept_keys` are known (the others
    are the same in every job), never `exclude_keys`. A path value is shortened to its file
    name (`data.path=/a/b/x.txt` -> `data.path=x.txt`), a float to four digits."""
    excluded = set(exclude_keys)
    pairs = [str(o).partition("=") for o in overrides]
    pairs = [p for p in pairs if p[0] not in excluded and p[0].lstrip("+~") not in excluded]
    swept = [p for p in pairs if p[0].lstrip("+~") in swept_keys]
    items = []
    for key, sep, value in swept or pairs:
        if "/" in value or "\\" in value:
            value = re.split(r"[/\\]", value.rstrip("/\\"))[-1]
        value = _short_number(value)
        items.append(f"{key}{sep}{value}")
    name = _UNSAFE.sub("_", ",".join(items))
    if len(name.encode()) > MAX_DIRNAME_BYTES:
        # Keep a readable prefix; the hash keeps two long names apart.
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        name = name.encode()[: MAX_DIRNAME_BYTES - 9].decode(errors="ignore") + "~" + digest
    return f"{num}_{name}" if name else str(num)


def _short_number(value: str) -> str:
    """Four significant digits for a float (Optuna suggests lr=0.0036303760732131728); the
    exact value stays in the job's .hydra/overrides.yaml."""
    if not re.fullmatch(r"[-+]?(\d+\.\d*|\.\d+|\d+(\.\d*)?[eE][-+]?\d+)", value):
        return value
    return f"{float(value):.4g}"


def swept_keys(config: DictConfig) -> list[str]:
    """The keys a sweep varies: command-line sweeps (`model=bigram,mlp`, `lr=interval(...)`)
    and the sweeper's own `params` (an Optuna search space)."""
    parser = OverridesParser.create()
    overrides = parser.parse_overrides([str(o) for o in config.hydra.overrides.task])
    keys = [o.get_key_element() for o in overrides if o.is_sweep_override()]
    params = config.hydra.sweeper.get("params") or {}
    return list(dict.fromkeys([*keys, *(str(k) for k in params)]))


def _job_dirname_resolver(num: Any, overrides: Any, exclude: Any = ()) -> str:
    swept = [k for k in os.environ.get(SWEPT_KEYS_ENV, "").split(",") if k]
    return job_dirname(int(num), overrides or (), exclude or (), swept)


_run_id: str | None = None


def run_id() -> str:
    """Six random hex digits, drawn once per process: the suffix that keeps two runs started
    in the same second (on this machine or another one sharing the file system) out of each
    other's run directory. Random rather than the pid: pids repeat across machines."""
    global _run_id
    if _run_id is None:
        _run_id = secrets.token_hex(3)
    return _run_id


def register_resolvers() -> None:
    """`${lmlab.job_dirname:...}` names sweep jobs, `${lmlab.run_id:}` keeps runs apart
    (conf/hydra/default.yaml). Joblib and submitit workers resolve them too: they import this
    module with the task function."""
    if not OmegaConf.has_resolver(JOB_DIRNAME_RESOLVER):
        OmegaConf.register_new_resolver(JOB_DIRNAME_RESOLVER, _job_dirname_resolver)
    if not OmegaConf.has_resolver(RUN_ID_RESOLVER):
        # Cached in the config, and Hydra carries that cache into the configs of sweep jobs,
        # pickled ones too (joblib, submitit): the jobs of a sweep all find its directory,
        # even in a worker process whose own run_id() differs.
        OmegaConf.register_new_resolver(RUN_ID_RESOLVER, run_id, use_cache=True)


@dataclass
class JobOutcome:
    path: Path
    status: str
    error: str | None = None


@dataclass
class SweepReport:
    sweep_dir: Path
    jobs: list[JobOutcome] = field(default_factory=list)

    @property
    def failed(self) -> list[JobOutcome]:
        return [j for j in self.jobs if j.status != "completed"]


def read_sweep(sweep_dir: Path, since: float = 0.0) -> SweepReport:
    """The outcome of every job directory under `sweep_dir` that a job wrote after `since`
    (a sweep re-run into the same directory must not count the old jobs)."""
    report = SweepReport(sweep_dir)
    for config in sorted(sweep_dir.glob("**/.hydra/config.yaml")):
        if config.stat().st_mtime < since:
            continue
        job = config.parent.parent
        report.jobs.append(_read_outcome(job))
    return report


def _read_outcome(job: Path) -> JobOutcome:
    try:
        metrics: dict[str, Any] = json.loads((job / "metrics.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return JobOutcome(job, "unknown", "no metrics.json: the job stopped before writing it")
    except (OSError, ValueError) as err:
        return JobOutcome(job, "unknown", f"unreadable metrics.json: {err}")
    return JobOutcome(job, str(metrics.get("status", "unknown")), metrics.get("error"))


# The outcome of the last sweep run in this process, for `lmlab-train`'s exit status.
_last_report: SweepReport | None = None


def last_sweep_report() -> SweepReport | None:
    return _last_report


class SweepStatus(Callback):
    """A Hydra callback (conf/hydra/default.yaml): after the last job, prints how many jobs
    completed and which failed (with their errors), and keeps the report for the exit status."""

    def __init__(self) -> None:
        self.sweep_dir: Path | None = None
        self.start = 0.0
        self._saved_env: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _last_report
        _last_report = None
        self.sweep_dir = Path(str(config.hydra.sweep.dir))
        self.start = time.time() - 1.0  # file times may be rounded to the second
        self._saved_env = os.environ.get(SWEPT_KEYS_ENV)
        os.environ[SWEPT_KEYS_ENV] = ",".join(swept_keys(config))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        global _last_report
        if self._saved_env is None:
            os.environ.pop(SWEPT_KEYS_ENV, None)
        else:
            os.environ[SWEPT_KEYS_ENV] = self._saved_env
        if self.sweep_dir is None:
            return
        report = read_sweep(self.sweep_dir, since=self.start)
        _last_report = report
        # print, not log: after the jobs, logging still writes to the last job's train.log
        print(format_report(report), flush=True)


def format_report(report: SweepReport) -> str:
    done = len(report.jobs) - len(report.failed)
    lines = [f"sweep {report.sweep_dir}: {len(report.jobs)} jobs, {done} completed"]
    if report.failed:
        lines[0] += f", {len(report.failed)} failed"
        for job in report.failed:
            lines.append(f"  {job.status}: {job.path.name}: {job.error or 'no error recorded'}")
    lines.append(f"compare the runs: lmlab-compare {shlex.quote(str(report.sweep_dir))}")
    return "\n".join(lines)
