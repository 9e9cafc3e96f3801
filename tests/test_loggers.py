"""The optional loggers (conf/logger/mlflow.yaml, wandb.yaml): real tiny runs, read back with
each tool's own client and checked against the run's independent records (metrics.csv from
the CSV logger, TensorBoard's events, metrics.json)."""

from __future__ import annotations

import csv
import json
import multiprocessing
import struct
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
import pytest
from helpers import compose_train, run_lmlab
from hydra.errors import InstantiationException
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from omegaconf import open_dict
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lmlab.errors import LmlabError
from lmlab.loggers import local_sqlite_uri, mlflow_logger
from lmlab.train import train

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient


def csv_history(run_dir: Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of `key` as the CSV logger wrote it: one row per logging call."""
    with open(run_dir / "metrics.csv", newline="") as f:
        return [(int(r["step"]), float(r[key])) for r in csv.DictReader(f) if r[key]]


def assert_same_points(
    got: list[tuple[int, float]], expected: list[tuple[int, float]], rel: float = 1e-12
) -> None:
    """The same steps, and values equal to `rel` (MLflow keeps doubles, the CSV file their
    repr: equal; TensorBoard keeps float32)."""
    assert [s for s, _ in got] == [s for s, _ in expected]
    assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=rel)


def mlflow_history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_mlflow_records_the_config_and_every_validation(tiny_train_cfg, tmp_path: Path):
    """Two runs into the default local store under paths.log_dir, with a second logger each
    (the list syntax): MLflow holds each run's own parameters and the same metric points as
    the CSV logger's and TensorBoard's records of that run."""
    tracking = pytest.importorskip("mlflow.tracking")
    log_dir = tmp_path / "runs"
    cfg_a = tiny_train_cfg("logger=[csv,mlflow]", f"paths.log_dir={log_dir}", "seed=1")
    cfg_b = tiny_train_cfg(
        "logger=[tensorboard,mlflow]",
        f"paths.log_dir={log_dir}",
        "seed=2",
        "model.optimizer.lr=0.05",
    )
    with open_dict(cfg_b):
        cfg_b.paths.output_dir = str(tmp_path / "run_b")
    train(cfg_a)
    train(cfg_b)
    dir_a, dir_b = Path(cfg_a.paths.output_dir), Path(cfg_b.paths.output_dir)

    store = log_dir / "mlflow.db"
    assert store.is_file()  # the default: one store for all the runs under paths.log_dir
    client = tracking.MlflowClient(tracking_uri=f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("train")  # task_name
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == ["run", "run_b"]  # named after their run directories
    run_a, run_b = runs["run"], runs["run_b"]
    assert run_a.info.status == run_b.info.status == "FINISHED"
    assert run_a.data.tags["lmlab.run_dir"] == str(dir_a.resolve())

    # parameters: lmlab's hyperparameters, flattened with "/", as the configs set them
    params_a, params_b = run_a.data.params, run_b.data.params
    for params, cfg in ((params_a, cfg_a), (params_b, cfg_b)):
        assert params["model/name"] == cfg.model.name == "bigram"
        assert float(params["model/optimizer/lr"]) == cfg.model.optimizer.lr
        assert params["seed"] == str(cfg.seed)
        assert params["trainer/max_steps"] == str(cfg.trainer.max_steps) == "20"
        assert params["data/block_size"] == str(cfg.data.block_size)
        assert params["data/tokenizer"] == "char"
        assert "model/n_embd" not in params  # a bigram has none: only keys the config has
    assert (params_a["seed"], params_b["seed"]) == ("1", "2")
    assert (float(params_a["model/optimizer/lr"]), float(params_b["model/optimizer/lr"])) == (
        0.01,
        0.05,
    )

    # metrics: validation at steps 0, 10 and 20, the loss every 5 steps, values as the CSV
    # logger recorded them in the same run
    id_a, id_b = run_a.info.run_id, run_b.info.run_id
    val_a = mlflow_history(client, id_a, "val/loss")
    assert [step for step, _ in val_a] == [0, 10, 20]
    assert_same_points(val_a, csv_history(dir_a, "val/loss"))
    assert_same_points(mlflow_history(client, id_a, "val/bpc"), csv_history(dir_a, "val/bpc"))
    train_a = mlflow_history(client, id_a, "train/loss")
    assert [step for step, _ in train_a] == [5, 10, 15, 20]
    assert_same_points(train_a, csv_history(dir_a, "train/loss"))
    summary_a = json.loads((dir_a / "metrics.json").read_text())
    assert val_a[-1][1] == pytest.approx(summary_a["val/loss"], rel=1e-12)
    assert val_a[-1][1] < val_a[0][1]  # a real loss curve: it falls as the bigram learns

    # run B's points are its own: TensorBoard's record of B, not run A's values
    val_b = mlflow_history(client, id_b, "val/loss")
    events = EventAccumulator(str(dir_b))
    events.Reload()
    tb_b = [(e.step, e.value) for e in events.Scalars("val/loss")]
    assert_same_points(val_b, tb_b, rel=1e-6)
    assert [v for _, v in val_b] != pytest.approx([v for _, v in val_a], rel=1e-6)
    assert not (dir_b / "metrics.csv").exists()  # B had no CSV logger


def test_tracking_uri_can_be_set(tmp_path: Path, monkeypatch):
    """logger.mlflow.tracking_uri names any store; a relative SQLite path is made absolute
    (the same store from any working directory) and its folder is created, since SQLite
    creates the file but not the folder."""
    monkeypatch.chdir(tmp_path)
    default = compose_train(["logger=mlflow", "paths.log_dir=lab"], tmp_path)
    assert default.logger.mlflow.tracking_uri == "sqlite:///lab/mlflow.db"
    uri = "sqlite:///elsewhere/store.db"
    cfg = compose_train(["logger=mlflow", f"logger.mlflow.tracking_uri={uri}"], tmp_path)
    assert cfg.logger.mlflow.tracking_uri == uri
    assert local_sqlite_uri(uri) == f"sqlite:///{tmp_path / 'elsewhere' / 'store.db'}"
    assert (tmp_path / "elsewhere").is_dir()
    for other in ("http://localhost:5000", "sqlite://", "postgresql://u@h/db"):
        assert local_sqlite_uri(other) == other  # servers, in-memory: untouched


@pytest.mark.parametrize(
    ("choice", "kinds"),
    [("[tensorboard,csv]", (TensorBoardLogger, CSVLogger)), ("csv", (CSVLogger,))],
)
def test_logger_lists_compose(choice: str, kinds: tuple[type, ...], tmp_path: Path):
    cfg = compose_train([f"logger={choice}"], tmp_path)
    built = [hydra.utils.instantiate(c) for c in cfg.logger.values()]
    assert tuple(type(b) for b in built) == kinds
    assert all(Path(b.save_dir) == tmp_path for b in built)  # the run directory


def _start_mlflow_run(store: Path, run_dir: Path, results: Any) -> None:
    try:
        logger = mlflow_logger(
            experiment_name="train", tracking_uri=f"sqlite:///{store}", output_dir=str(run_dir)
        )
        results.put(logger.run_id)
    except Exception as err:  # reported to the test, which names it
        results.put(f"{type(err).__name__}: {err}")


@pytest.mark.slow
def test_parallel_jobs_share_a_new_store(tmp_path: Path):
    """Three processes that start runs in a store that does not exist yet, at once (a sweep
    on hydra/launcher=joblib): without the lock around the store's creation, alembic's
    migrations collide and the store is left broken."""
    tracking = pytest.importorskip("mlflow.tracking")
    store = tmp_path / "mlflow.db"
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    jobs = [
        context.Process(target=_start_mlflow_run, args=(store, tmp_path / f"run{i}", results))
        for i in range(3)
    ]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(timeout=120)
    run_ids = sorted(results.get(timeout=5) for _ in jobs)
    client = tracking.MlflowClient(tracking_uri=f"sqlite:///{store}")
    runs = client.search_runs([client.get_experiment_by_name("train").experiment_id])
    assert sorted(r.info.run_id for r in runs) == run_ids
    assert sorted(r.info.run_name for r in runs) == ["run0", "run1", "run2"]


@pytest.mark.parametrize(
    ("option", "install"),
    [
        ("mlflow", "'lmlab[mlflow]' (or: pip install mlflow-skinny)"),
        ("wandb", "'lmlab[wandb]' (or: pip install wandb)"),
    ],
)
def test_a_missing_package_names_the_pip_command(
    option: str, install: str, tmp_path: Path, monkeypatch
):
    cfg = compose_train([f"logger={option}", f"paths.log_dir={tmp_path}"], tmp_path / "run")
    monkeypatch.setitem(sys.modules, option, None)  # `import mlflow` (or wandb) now fails
    with pytest.raises(InstantiationException) as caught:
        hydra.utils.instantiate(cfg.logger[option])
    err = caught.value.__cause__
    assert isinstance(err, LmlabError)
    assert str(err) == (
        f"logger={option} needs the Python package '{option}', which is not installed: "
        f"pip install {install}"
    )
    assert list(tmp_path.iterdir()) == []  # nothing written: no store, no run directory


def test_cli_without_mlflow_is_one_line(tiny_corpus: Path, tmp_path: Path, monkeypatch):
    """lmlab-train logger=mlflow where `import mlflow` fails: one line, exit status 1."""
    shadow = tmp_path / "shadow" / "mlflow"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named mlflow')\n")
    monkeypatch.setenv("PYTHONPATH", str(shadow.parent))
    result = run_lmlab(
        "train",
        "logger=mlflow",
        f"data.path={tiny_corpus}",
        f"paths.log_dir={tmp_path / 'runs'}",
        "trainer.accelerator=cpu",
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "lmlab-train: error: logger=mlflow needs the Python package 'mlflow', which is not "
        "installed: pip install 'lmlab[mlflow]' (or: pip install mlflow-skinny)"
    )


def wandb_records(path: Path) -> list[Any]:
    """The records of an offline W&B run file (`run-<id>.wandb`): a 7-byte header, then
    LevelDB-style log blocks of 32 KiB whose chunks (4-byte checksum, 2-byte length, 1-byte
    type: 1 whole, 2 first, 3 middle, 4 last) carry wandb's protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        room = block - pos % block
        _checksum, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if room < 7 or (kind == 0 and length == 0):  # the padded end of a block
            pos += room
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def finished_wandb_records(path: Path, timeout: float = 30.0) -> list[Any]:
    """The records of the run file once it ends with the run's exit record: wandb.finish()
    returns before wandb's service process has flushed the file, which can still hold only
    its header for a moment."""
    from google.protobuf.message import DecodeError

    deadline = time.monotonic() + timeout
    while True:
        try:
            records = wandb_records(path)
        except DecodeError:  # a record cut where the file is being written
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} has no exit record after {timeout} s")
        time.sleep(0.1)


def wandb_offline_run(run_dir: Path) -> tuple[Any, dict[str, Any], list[tuple[int, float]]]:
    """The run record, the config and the (step, val/loss) points of the one offline W&B
    run in `run_dir`."""
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    (path,) = offline.glob("run-*.wandb")
    run, config, val_loss = None, {}, []
    for record in finished_wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            config.update({i.key: json.loads(i.value_json) for i in run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            # wandb splits keys with "/" into nested keys: "val/loss" is ["val", "loss"]
            items = record.history.item
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}
            if "val/loss" in row:
                val_loss.append((row["trainer/global_step"], row["val/loss"]))
    return run, config, val_loss


def test_wandb_offline_records_the_config_and_every_validation(
    tiny_train_cfg, tmp_path: Path, monkeypatch
):
    """logger=wandb writes an offline run into each run directory, named after it, with
    lmlab's hyperparameters as its config and the validation points that the CSV logger
    recorded. Two runs in one process (a sweep on Hydra's basic launcher): two W&B runs."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg_a = tiny_train_cfg("logger=[csv,wandb]", "seed=3")
    cfg_b = tiny_train_cfg("logger=[csv,wandb]", "seed=4", "model.optimizer.lr=0.05")
    with open_dict(cfg_b):
        cfg_b.paths.output_dir = str(tmp_path / "run_b")
    try:
        train(cfg_a)
        train(cfg_b)
    finally:
        wandb.finish()  # what wandb does at exit
    runs = {}
    for cfg in (cfg_a, cfg_b):
        run_dir = Path(cfg.paths.output_dir)
        run, config, val_loss = wandb_offline_run(run_dir)
        assert run is not None, f"no W&B run of its own in {run_dir}"
        assert (run.display_name, run.project) == (run_dir.name, "train")
        assert config["model"]["name"] == cfg.model.name
        assert config["model"]["optimizer"]["lr"] == cfg.model.optimizer.lr
        assert (config["seed"], config["trainer"]["max_steps"]) == (cfg.seed, 20)
        assert "n_embd" not in config["model"]
        assert [step for step, _ in val_loss] == [0, 10, 20]
        assert_same_points(val_loss, csv_history(run_dir, "val/loss"))
        runs[run.run_id] = val_loss
    assert len(runs) == 2  # not one run taken over by the second job
