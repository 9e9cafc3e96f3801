"""Factories for the optional loggers (conf/logger/mlflow.yaml, conf/logger/wandb.yaml).

The YAML points `_target_` here rather than at Lightning's classes so that a missing package is
one line that says what to install, not an ImportError deep inside Hydra's instantiation, and
so that local stores land in the run's folders whatever the working directory."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmlab.errors import LmlabError

if TYPE_CHECKING:
    from lightning.pytorch.loggers import MLFlowLogger, WandbLogger

SQLITE_PREFIX = "sqlite:///"


def require(module: str, option: str, install: str) -> None:
    """Import `module` or refuse `option` with the pip command that provides it."""
    try:
        importlib.import_module(module)
    except ImportError as err:
        raise LmlabError(
            f"{option} needs the Python package {module!r}, which is not installed: "
            f"pip install {install}"
        ) from err


def sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///PATH` URI; None for any other store (a server, a
    database, SQLite in memory)."""
    if not uri.startswith(SQLITE_PREFIX) or uri[len(SQLITE_PREFIX) :] in ("", ":memory:"):
        return None
    return Path(uri[len(SQLITE_PREFIX) :]).expanduser()


def local_sqlite_uri(uri: str) -> str:
    """`sqlite:///runs/mlflow.db` with its path made absolute (relative to the working
    directory, as paths.log_dir is) and its folder created: SQLite creates the file but not
    the folder, and an absolute URI names the same store from any directory. Other URIs are
    returned as they are."""
    path = sqlite_file(uri)
    if path is None:
        return uri
    path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"{SQLITE_PREFIX}{path}"


def prepare_sqlite_store(
    database: Path, tracking_uri: str, experiment_name: str, artifact_location: str | None
) -> None:
    """Create the SQLite store's tables and the experiment, one process at a time: the jobs of
    a parallel sweep (hydra/launcher=joblib) start together, and two processes creating the
    same new store at once leave it broken (alembic's migrations collide), or both create the
    experiment and one fails. An flock on a file beside the store serialises this first step;
    once the tables and the experiment exist, SQLite's own locking is enough."""
    import fcntl

    from mlflow.tracking import MlflowClient

    with open(database.with_name(f"{database.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        client = MlflowClient(tracking_uri)  # creates or upgrades the tables
        if client.get_experiment_by_name(experiment_name) is None:
            client.create_experiment(experiment_name, artifact_location=artifact_location)


def run_label(run_dir: Path) -> str:
    """The run directory's name, with its sweep's for a sweep job (`<sweep>/0_seed-1`): job
    names repeat from sweep to sweep, and a tracker lists the runs of all of them together."""
    from lmlab.runs.sweeps import is_multirun

    return f"{run_dir.parent.name}/{run_dir.name}" if is_multirun() else run_dir.name


def mlflow_logger(
    *,
    experiment_name: str,
    tracking_uri: str,
    output_dir: str,
    run_name: str | None = None,
    artifact_location: str | None = None,
    tags: dict[str, Any] | None = None,
    **kwargs: Any,
) -> MLFlowLogger:
    """Lightning's MLFlowLogger, one MLflow run per lmlab run: named after the run directory
    (`run_label`, unless `run_name` is given) and tagged with its path, so that a run found in
    the MLflow UI leads back to its checkpoints and samples."""
    require("mlflow", "logger=mlflow", "'lmlab[mlflow]' (or: pip install mlflow-skinny)")
    tracking_uri = local_sqlite_uri(tracking_uri)
    database = sqlite_file(tracking_uri)
    if tracking_uri.startswith("sqlite:"):  # MLflow's SQL store: not in mlflow-skinny's deps
        for module in ("sqlalchemy", "alembic"):
            require(module, f"logger.mlflow.tracking_uri={tracking_uri}", "'lmlab[mlflow]'")
    from lightning.pytorch.loggers import MLFlowLogger

    run_dir = Path(output_dir).resolve()
    if artifact_location is not None and "://" not in artifact_location:
        # stored with the experiment when it is created: absolute, or it would mean a
        # different folder from each working directory
        artifact_location = Path(artifact_location).expanduser().resolve().as_uri()
    if database is not None and os.name == "posix":  # fcntl's locks: POSIX only
        prepare_sqlite_store(database, tracking_uri, experiment_name, artifact_location)
    return MLFlowLogger(
        experiment_name=experiment_name,
        run_name=run_name or run_label(run_dir),
        tracking_uri=tracking_uri,
        artifact_location=artifact_location,
        tags={"lmlab.run_dir": str(run_dir), **(tags or {})},
        **kwargs,
    )


def wandb_logger(
    *,
    project: str,
    save_dir: str,
    name: str | None = None,
    offline: bool = True,
    **kwargs: Any,
) -> WandbLogger:
    """Lightning's WandbLogger, offline by default: the run is written under `save_dir` (the
    run directory) as `wandb/offline-run-*`, for `wandb sync` to upload later, and nothing is
    sent while training. The run is named after the run directory (`run_label`) unless
    `name` is given."""
    require("wandb", "logger=wandb", "'lmlab[wandb]' (or: pip install wandb)")
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    # Lightning's WandbLogger never finishes its run (wandb does, at exit) and takes over one
    # still open: in a sweep whose jobs share a process (Hydra's basic launcher) every job
    # would log into the first job's run. An open run here is the previous job's: close it.
    if wandb.run is not None:
        wandb.finish()

    run_dir = Path(save_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    return WandbLogger(
        project=project,
        name=name or run_label(run_dir),
        save_dir=str(run_dir),
        offline=offline,
        **kwargs,
    )
