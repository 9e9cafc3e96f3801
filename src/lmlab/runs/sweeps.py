"""What `lmlab-train -m` adds to Hydra's multirun: readable job directories, and a sweep whose
exit status says whether every job completed. Each job records its outcome in `metrics.json` (a
failed job too), so it is read back from the job directories: that works whichever launcher ran
the jobs (in this process, in joblib workers, or on SLURM nodes sharing the file system)."""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import os
import re
import secrets
import shlex
import sys
import tempfile
import time
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any, NamedTuple

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, read_write

from lmlab.runs.collect import read_metrics

JOB_DIRNAME_RESOLVER = "lmlab.job_dirname"
RUN_ID_RESOLVER = "lmlab.run_id"
# How the sweeping process tells its jobs which keys vary: an environment variable reaches every
# launcher's jobs (this process's, joblib and submitit children, sbatch's exported environment).
SWEPT_KEYS_ENV = "LMLAB_SWEPT_KEYS"
# Characters kept in a job directory name; anything else (path separators, quotes, spaces,
# shell wildcards, and `=` `,` `~` brackets, which Hydra's override grammar would read) becomes
# `_`: the name is one safe path component, and a path through it pastes unquoted into
# `ckpt_path=...`.
_UNSAFE = re.compile(r"[^\w.+\-@%]")
# File names are limited to 255 bytes; leave room for what tools append.
MAX_DIRNAME_BYTES = 180


def is_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def threads_per_parallel_job() -> int | None:
    """Each job's share of the cores when `hydra/launcher=joblib` runs n_jobs at once (else None):
    a torch thread per core in every job would slow every job down."""
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
    """`3_model-gpt+data.block_size-64`: the job number (unique, sorts in launch order), then its
    overrides as `key-value` joined by `+` (only the swept ones when known; never
    `exclude_keys`), a path shortened to its file name, a float (as Optuna suggests) to four
    digits: .hydra/ keeps the exact values."""
    excluded = set(exclude_keys)
    pairs = [str(o).partition("=") for o in overrides]
    pairs = [p for p in pairs if p[0] not in excluded and p[0].lstrip("+~") not in excluded]
    items = []
    for key, sep, value in [p for p in pairs if p[0].lstrip("+~") in swept_keys] or pairs:
        value = re.split(r"[/\\]", value.rstrip("/\\"))[-1]  # a path's last component
        if re.fullmatch(r"[-+]?(\d+\.\d*|\.\d+|\d+(\.\d*)?[eE][-+]?\d+)", value):
            value = f"{float(value):.4g}"
        items.append(f"{key.lstrip('+~')}-{value}" if sep else key)
    name = "+".join(_UNSAFE.sub("_", item) for item in items)
    if len(name.encode()) > MAX_DIRNAME_BYTES:
        # Keep a readable prefix; the hash keeps two long names apart.
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        name = name.encode()[: MAX_DIRNAME_BYTES - 9].decode(errors="ignore") + "@" + digest
    return f"{num}_{name}" if name else str(num)


def swept_keys(config: DictConfig) -> list[str]:
    """The keys a sweep varies: command-line sweeps (`model=bigram,mlp`, `lr=interval(...)`)
    and the sweeper's own `params` (an Optuna search space)."""
    parser = OverridesParser.create()
    overrides = parser.parse_overrides([str(o) for o in config.hydra.overrides.task])
    keys = [o.get_key_element() for o in overrides if o.is_sweep_override()]
    params = config.hydra.sweeper.get("params") or {}
    return list(dict.fromkeys([*keys, *(str(k) for k in params)]))


@functools.cache
def run_id() -> str:
    """Six random hex digits, drawn once per process, that keep two runs started in the same
    second out of each other's run directory (not the pid: pids repeat across machines)."""
    return secrets.token_hex(3)


def register_resolvers() -> None:
    """`${lmlab.job_dirname:...}` names sweep jobs, `${lmlab.run_id:}` keeps runs apart
    (conf/hydra/default.yaml). Joblib and submitit workers resolve them too: they import this
    module with the task function."""

    def job_dirname_resolver(num: Any, overrides: Any, exclude: Any = ()) -> str:
        swept = [k for k in os.environ.get(SWEPT_KEYS_ENV, "").split(",") if k]
        return job_dirname(int(num), overrides or (), exclude or (), swept)

    if not OmegaConf.has_resolver(JOB_DIRNAME_RESOLVER):
        OmegaConf.register_new_resolver(JOB_DIRNAME_RESOLVER, job_dirname_resolver)
    if not OmegaConf.has_resolver(RUN_ID_RESOLVER):
        # Cached in the config, and Hydra carries that cache into the configs of sweep jobs,
        # pickled ones too (joblib, submitit): the jobs of a sweep all find its directory,
        # even in a worker process whose own run_id() differs.
        OmegaConf.register_new_resolver(RUN_ID_RESOLVER, run_id, use_cache=True)


class JobOutcome(NamedTuple):
    path: Path
    status: str
    error: str | None


class SweepReport(NamedTuple):
    sweep_dir: Path
    jobs: list[JobOutcome]

    @property
    def failed(self) -> list[JobOutcome]:
        """Jobs that neither completed nor were pruned (an Optuna trial stopped early by its
        pruner: an outcome of the search, not an error)."""
        return [j for j in self.jobs if j.status not in ("completed", "pruned")]

    @property
    def pruned(self) -> list[JobOutcome]:
        return [j for j in self.jobs if j.status == "pruned"]


def read_sweep(sweep_dir: Path, since: float = 0.0) -> SweepReport:
    """The outcome of every job directory under `sweep_dir` that a job wrote after `since`
    (a sweep re-run into the same directory must not count the old jobs)."""
    configs = sorted(sweep_dir.glob("**/.hydra/config.yaml"))
    jobs = [c.parent.parent for c in configs if c.stat().st_mtime >= since]
    return SweepReport(sweep_dir, [JobOutcome(job, *read_metrics(job)[1:]) for job in jobs])


# The outcome of the last sweep run in this process, for `lmlab-train`'s exit status.
_last_report: SweepReport | None = None


def last_sweep_report() -> SweepReport | None:
    return _last_report


class RunDirectoryCheck(Callback):
    """A Hydra callback (conf/hydra/default.yaml): before Hydra writes `.hydra/` and opens
    `train.log` in the run (or sweep) directory, check the config (lmlab.config_check) and
    that something can be written there; otherwise one line says what is wrong, instead of a
    logging traceback and a 0-byte config. A sweep's jobs are checked as they start."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from lmlab.cli import refuse
        from lmlab.config_check import check_config
        from lmlab.errors import LmlabError

        # as run_job will see it: the run's directory, and HydraConfig for `${hydra:...}`
        # resolved on Hydra's own config first: `${now:...}` is cached there, so the directory
        # checked is the one Hydra creates a moment later
        run_dir = Path(str(config.hydra.run.dir)).absolute()
        config = copy.deepcopy(config)
        with read_write(config.hydra.runtime):
            config.hydra.runtime.output_dir = str(run_dir)
        HydraConfig.instance().set_config(config)
        try:
            check_config(config)
        except LmlabError as err:
            refuse("lmlab-train", err)
        _check_writable(run_dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_writable(Path(str(config.hydra.sweep.dir)), "hydra.sweep.dir")


def _check_writable(directory: Path, key: str) -> None:
    # the directories this check makes, removed again on refusal: nothing is left behind
    created = [p for p in (directory, *directory.parents) if not p.exists()]
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory) as probe:  # a full disk fails on data, too
            probe.write(bytes(1 << 16))
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as err:
        for made in created:  # innermost first
            with contextlib.suppress(OSError):
                made.rmdir()
        print(
            f"lmlab-train: error: cannot write the run directory {directory} ({err.strerror}); "
            f"free some space there, or give a writable place with {key}=DIR or paths.log_dir=DIR",
            file=sys.stderr,
        )
        sys.exit(1)


class SweepStatus(Callback):
    """A Hydra callback (conf/hydra/default.yaml): after the last job, prints how many jobs
    completed and which failed (with their errors), and keeps the report for the exit status."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _last_report
        _last_report = None
        self.sweep_dir = Path(str(config.hydra.sweep.dir))
        self.start = time.time() - 1.0  # file times may be rounded to the second
        self.saved_env = os.environ.get(SWEPT_KEYS_ENV)
        os.environ[SWEPT_KEYS_ENV] = ",".join(swept_keys(config))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        global _last_report
        os.environ.pop(SWEPT_KEYS_ENV, None)
        if self.saved_env is not None:
            os.environ[SWEPT_KEYS_ENV] = self.saved_env
        _last_report = read_sweep(self.sweep_dir, since=self.start)
        # print, not log: after the jobs, logging still writes to the last job's train.log
        print(format_report(_last_report), flush=True)


def format_report(report: SweepReport) -> str:
    failed, pruned, n = report.failed, report.pruned, len(report.jobs)
    head = f"sweep {report.sweep_dir}: {n} jobs, {n - len(failed) - len(pruned)} completed"
    head += f", {len(pruned)} pruned" if pruned else ""
    lines = [head + (f", {len(failed)} failed" if failed else "")]
    lines += [f"  {j.status}: {j.path.name}: {j.error or 'no error recorded'}" for j in failed]
    lines.append(f"compare the runs: lmlab-compare {shlex.quote(str(report.sweep_dir))}")
    return "\n".join(lines)
