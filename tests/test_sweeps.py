"""Sweeps: job directory names, failed jobs, the sweep's exit status, Optuna, launchers and
the hyperparameters that TensorBoard's HParams tab compares."""

from __future__ import annotations

import json
import os
import re
import time
from importlib.resources import files
from pathlib import Path

import pytest
import yaml
from helpers import TINY_GPT, compose_train, run_lmlab
from hydra import compose, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep
from hydra.errors import OverrideParseException
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata

from lmlab.callbacks import record_failure
from lmlab.errors import LmlabError
from lmlab.hparams_tab import flat_hparams, run_hparams, session_hparams
from lmlab.runs.collect import collect_runs
from lmlab.runs.sweeps import (
    MAX_DIRNAME_BYTES,
    format_report,
    job_dirname,
    read_sweep,
    swept_keys,
)
from lmlab.runs.table import make_table
from lmlab.train import optimized_value, train

# A job of a second or two: TINY_GPT without its n_head, which each test sets (or sweeps).
TINY_JOB = [
    *(o for o in TINY_GPT if not o.startswith("model.n_head=")),
    "data.block_size=8",
    "trainer.accelerator=cpu",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "callbacks.sample_text.max_new_tokens=20",
]


def compose_with_hydra(overrides: list[str]):
    with initialize_config_module(config_module="lmlab.conf", version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


def job_dirs(sweep: Path) -> list[Path]:
    return sorted((p for p in sweep.iterdir() if (p / ".hydra").is_dir()), key=lambda p: p.name)


# ----------------------------------------------------------------------------- job names


def test_job_dirname_lists_the_overrides_as_typed():
    name = job_dirname(2, ["model=gpt", "data.block_size=64"])
    assert name == "2_model-gpt+data.block_size-64"
    assert job_dirname(0, []) == "0"


def test_job_dirname_is_one_safe_path_component():
    name = job_dirname(
        1,
        [
            "data.path=/corpora/my texts/shakespeare.txt",
            "model.optimizer.lr=0.0036303760732131728",
            "callbacks.sample_text.prompt='To be: or not?'",
            "paths.log_dir=/elsewhere",
        ],
        exclude_keys=["paths.log_dir"],
    )
    assert name == (
        "1_data.path-shakespeare.txt+model.optimizer.lr-0.00363+"
        "callbacks.sample_text.prompt-_To_be__or_not__"
    )
    assert "/" not in name and " " not in name


@pytest.mark.parametrize(
    "overrides",
    [
        ["model=gpt", "data.block_size=64"],
        ["model.optimizer.lr=0.0036303760732131728", "+model.dropout=0.1"],
        ["model.optimizer.betas=[0.9,0.95]", "data.path='/a b/c=d,e.txt'", "seed=~1"],
        [f"model.key_{i}=value_{i}" for i in range(40)],  # capped, with a hash
    ],
)
def test_a_path_through_a_job_directory_pastes_into_ckpt_path(overrides):
    """What lmlab prints (`continue with ckpt_path=...`) must parse as Hydra reads a command
    line, unquoted, and give back the same path."""
    path = f"runs/train/multirun/2026-01-01_00-00-00_abcdef/{job_dirname(2, overrides)}/last.ckpt"
    parsed = OverridesParser.create().parse_overrides([f"ckpt_path={path}"])[0]
    assert parsed.value() == path
    # negative control: the old names (`key=value,key=value`) did not parse
    with pytest.raises(OverrideParseException):
        OverridesParser.create().parse_overrides(["ckpt_path=runs/2_model=gpt,seed=1/last.ckpt"])


def test_job_dirname_shows_only_the_swept_keys_when_known():
    overrides = ["data.path=/x/tiny.txt", "model=gpt", "+model.dropout=0.1", "seed=3"]
    swept = ["model.dropout", "seed"]
    assert job_dirname(0, overrides, swept_keys=swept) == "0_model.dropout-0.1+seed-3"
    assert job_dirname(0, overrides, swept_keys=["other"]).startswith("0_data.path-tiny.txt")


def test_swept_keys_are_command_line_sweeps_and_sweeper_params():
    cfg = compose_with_hydra(["hparams_search=shakespeare_optuna"])
    with open_dict(cfg):
        cfg.hydra.overrides.task = ["model=gpt,mlp", "seed=1", "data.block_size=range(8,32,8)"]
    assert swept_keys(cfg) == [
        "model",
        "data.block_size",
        "model.optimizer.lr",
        "model.n_embd",
        "model.n_layer",
        "model.dropout",
    ]


def test_long_job_dirnames_are_capped_and_kept_apart():
    many = [f"model.key_{i}=value_{i}" for i in range(40)]
    a = job_dirname(0, many)
    b = job_dirname(0, [*many[:-1], "model.key_39=other"])
    assert len(a.encode()) <= MAX_DIRNAME_BYTES + 8  # plus the job number and `_`
    assert a.startswith("0_model.key_0-value_0+") and a != b


def test_sweep_subdir_is_the_job_number_and_its_overrides():
    cfg = compose_with_hydra(
        ["model=gpt", "trainer.enable_progress_bar=false", "seed=7", "hydra.job.num=3"]
    )
    # noisy keys are left out; Hydra's own overrides (hydra.*) never appear
    assert cfg.hydra.sweep.subdir == "3_model-gpt+seed-7"


# ----------------------------------------------------------------------------- failures


def test_a_failing_job_does_not_stop_the_sweep(tmp_path: Path, tiny_corpus: Path):
    sweep = tmp_path / "sweep"
    result = run_lmlab(
        "train",
        "-m",
        f"data.path={tiny_corpus}",
        *TINY_JOB,
        "model.n_head=3,2",  # 16 is not divisible by 3: the first job fails
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    # one directory per job, named by its number and what the sweep varies
    failed_dir, done_dir = job_dirs(sweep)
    assert (failed_dir.name, done_dir.name) == ("0_model.n_head-3", "1_model.n_head-2")

    failed = json.loads((failed_dir / "metrics.json").read_text())
    assert failed["status"] == "failed"
    assert "divisible by model.n_head (3)" in failed["error"]
    assert "divisible by model.n_head (3)" in (failed_dir / "train.log").read_text()
    done = json.loads((done_dir / "metrics.json").read_text())
    assert done["status"] == "completed" and done["steps"] == 4 and done["val/bpc"] > 0
    assert (done_dir / "checkpoints" / "last.ckpt").is_file()
    assert "2 jobs, 1 completed, 1 failed" in result.stdout

    rows = make_table(collect_runs([sweep])).rows
    assert [(r["model.n_head"], r["status"]) for r in rows] == [("2", "completed"), ("3", "failed")]
    assert "divisible" in rows[1]["error"]


def test_read_sweep_counts_only_jobs_of_this_sweep(tmp_path: Path):
    for name, status in (("0_a=1", "completed"), ("1_a=2", "failed"), ("2_a=3", None)):
        (tmp_path / name / ".hydra").mkdir(parents=True)
        (tmp_path / name / ".hydra" / "config.yaml").write_text("{}")
        if status:
            metrics = {"status": status, "error": "boom" if status == "failed" else None}
            (tmp_path / name / "metrics.json").write_text(json.dumps(metrics))
    report = read_sweep(tmp_path)
    assert [(j.path.name, j.status) for j in report.failed] == [
        ("1_a=2", "failed"),
        ("2_a=3", "unknown"),  # no metrics.json: the job died before writing one
    ]
    assert "3 jobs, 1 completed, 2 failed" in format_report(report)
    assert read_sweep(tmp_path, since=time.time() + 60).jobs == []  # an earlier sweep's jobs


def test_record_failure_keeps_what_this_run_wrote_but_not_an_old_file(tmp_path: Path):
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"status": "completed", "val/loss": 1.5, "steps": 40}))
    record_failure(tmp_path, "RuntimeError: late failure", started=time.time() - 60)
    kept = json.loads(metrics.read_text())
    assert kept["status"] == "failed" and kept["val/loss"] == 1.5
    assert kept["error"] == "RuntimeError: late failure"

    record_failure(tmp_path, "LmlabError: bad", started=time.time() + 60)  # file is older
    fresh = json.loads(metrics.read_text())
    assert fresh["status"] == "failed" and fresh["val/loss"] is None and "steps" not in fresh


def test_a_diverged_run_fails_with_a_hint(tiny_train_cfg):
    cfg = tiny_train_cfg(
        *TINY_GPT,
        "model.optimizer.lr=1e10",
        "model.scheduler.warmup_steps=0",
        "trainer.log_every_n_steps=1",
    )
    with pytest.raises(LmlabError, match=r"training diverged: train/loss is nan .* lower"):
        train(cfg)
    summary = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert summary["status"] == "failed" and "diverged" in summary["error"]


def test_optimized_value_is_the_best_finite_value():
    summary = {"val/bpc": 2.5, "best": {"val/loss": 1.7, "val/ppl": 5.5}}
    assert optimized_value(summary, "val/bpc") == 2.5
    assert optimized_value(summary, "val/ppl") == 5.5
    assert optimized_value({"val/bpc": float("nan")}, "val/bpc") is None
    assert optimized_value({}, "val/bpc") is None


# ----------------------------------------------------------------------------- TensorBoard


def test_hparams_are_logged_with_the_best_metrics(tiny_train_cfg):
    cfg = tiny_train_cfg("data.block_size=16")
    summary = train(cfg)
    events = EventAccumulator(cfg.paths.output_dir)
    events.Reload()
    [bpc] = events.Scalars("val_best/bpc")
    assert bpc.value == pytest.approx(summary["best"]["val/bpc"]) and bpc.step == 20
    [loss] = events.Scalars("val_best/loss")
    assert loss.value == pytest.approx(summary["best"]["val/loss"])
    # a session of its own, no experiment definition: TensorBoard makes one for all the runs
    # it is shown, with the union of their keys (one run's definition would hide the others')
    tags = events.PluginTagToContent("hparams")
    assert "_hparams_/experiment" not in tags
    start = metadata.parse_session_start_info_plugin_data(tags["_hparams_/session_start_info"])
    assert start.hparams["model/optimizer/lr"].number_value == 0.01
    assert start.hparams["data/block_size"].number_value == 16  # a number, not "16"
    assert start.hparams["model/optimizer/betas/1"].number_value == 0.999  # a list's items
    assert start.hparams["model"].string_value == "bigram"  # sorts before model/...
    assert "model/name" not in start.hparams
    assert "trainer/gradient_clip_val" not in start.hparams  # null: no "None" column
    assert start.group_name == Path(cfg.paths.output_dir).name.rsplit("_", 1)[-1]
    logged = yaml.safe_load((Path(cfg.paths.output_dir) / "hparams.yaml").read_text())
    assert logged["data"]["block_size"] == 16 and logged["model"]["optimizer"]["lr"] == 0.01


def test_scalars_are_at_steps_done_with_no_epoch_scalar(tiny_train_cfg):
    """One step convention: a scalar at step 10 is the state after 10 steps, as in samples,
    checkpoints, metrics.json and the console (Lightning's own is one less)."""
    cfg = tiny_train_cfg("trainer.val_check_interval=10", "trainer.log_every_n_steps=5")
    train(cfg)
    events = EventAccumulator(cfg.paths.output_dir)
    events.Reload()
    # sorted: the validation at step 0 has an event file of its own, and files are read in the
    # order of their names, which end in a per-process counter (...9 sorts after ...10)
    assert sorted(e.step for e in events.Scalars("val/loss")) == [0, 10, 20]
    assert sorted(e.step for e in events.Scalars("train/loss")) == [5, 10, 15, 20]
    assert "epoch" not in events.Tags()["scalars"]


def test_session_hparams_put_the_model_and_its_architecture_first():
    params = {
        "model": {
            "name": "gpt",
            "n_layer": 4,
            "n_embd": 128,
            "bias": False,
            "dropout": None,
            "block_size": 64,
            "optimizer": {"lr": 1e-3},
        },
        "seed": 1,
    }
    columns = session_hparams(params)
    assert list(columns)[:2] == ["model", "model/arch"]
    assert columns["model"] == "gpt"
    assert columns["model/arch"] == "n_layer=4 n_embd=128 bias=False"  # null left out
    assert columns["model/optimizer/lr"] == 1e-3 and columns["seed"] == 1
    # TensorBoard's first columns are the differing ones by name: these two sort first
    assert sorted(columns)[:2] == ["model", "model/arch"]


def test_flat_hparams_keep_native_types():
    params = {"model": {"betas": [0.9, 0.95], "dropout": None, "bias": True}, "seed": 3}
    assert flat_hparams(params) == {
        "model/betas/0": 0.9,
        "model/betas/1": 0.95,
        "model/bias": True,
        "seed": 3,
    }


def test_run_hparams_are_the_keys_worth_comparing(tmp_path: Path):
    params = run_hparams(compose_train(["model=gpt"], tmp_path))
    assert params["model"]["n_embd"] == 128 and params["model"]["optimizer"]["lr"] == 1e-3
    assert params["data"]["tokenizer"] == "char" and params["seed"] == 1337
    assert set(params) == {"model", "data", "trainer", "seed"}  # no paths, no callbacks
    assert "data_dir" not in params["data"] and "_target_" not in params["model"]


# ----------------------------------------------------------------------------- Optuna


def test_optuna_search_composes_with_its_search_space():
    cfg = compose_with_hydra(["hparams_search=shakespeare_optuna"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert sweeper.sampler.seed is not None and sweeper.direction == "minimize"
    assert sweeper.n_trials == 20
    assert cfg.hydra.mode == RunMode.MULTIRUN and cfg.optimized_metric == "val/bpc"

    # The search space as the sweeper reads it: each param parsed as a Hydra override value.
    parsed = OverridesParser.create().parse_overrides(
        [f"{k}={v}" for k, v in sweeper.params.items()]
    )
    assert all(o.is_sweep_override() for o in parsed)  # nothing fixed: every param is searched
    space = {o.get_key_element(): o.value() for o in parsed}
    lr, dropout = space["model.optimizer.lr"], space["model.dropout"]
    assert isinstance(lr, IntervalSweep) and lr.tags == {"log"}  # searched on a log scale
    assert (lr.start, lr.end) == (1e-4, 1e-2)
    assert isinstance(dropout, IntervalSweep) and not dropout.tags
    assert (dropout.start, dropout.end) == (0.0, 0.2)
    assert isinstance(space["model.n_layer"], ChoiceSweep)
    assert space["model.n_layer"].list == [2, 4, 6]
    assert isinstance(space["model.n_embd"], ChoiceSweep)
    assert space["model.n_embd"].list == [64, 128, 192]
    # every width of the space splits into the fixed number of heads
    assert all(n_embd % cfg.model.n_head == 0 for n_embd in space["model.n_embd"].list)


@pytest.mark.slow
def test_optuna_search_finishes_and_reports_the_best_parameters(tmp_path: Path, tiny_corpus: Path):
    sweep = tmp_path / "optuna"
    result = run_lmlab(
        "train",
        "hparams_search=shakespeare_optuna",  # MULTIRUN by itself: no -m
        "hydra.sweeper.n_trials=2",
        f"data.path={tiny_corpus}",
        *[o for o in TINY_JOB if not o.startswith(("model.n_embd", "model.n_layer"))],
        # a smaller space than the real one, still searched (n_head 4 divides both widths)
        "model.n_embd=choice(16,32)",
        "model.n_layer=choice(1,2)",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(results["best_params"]) == {
        "model.optimizer.lr",
        "model.n_embd",
        "model.dropout",
        "model.n_layer",
    }
    jobs = job_dirs(sweep)
    assert len(jobs) == 2
    # named by the searched parameters only, floats shortened
    assert re.fullmatch(
        r"0_model.optimizer.lr-[0-9.e-]+\+model.n_embd-(16|32)\+model.n_layer-[12]\+"
        r"model.dropout-[0-9.e-]+",
        jobs[0].name,
    )
    values = [json.loads((j / "metrics.json").read_text())["val/bpc"] for j in jobs]
    assert results["best_value"] == pytest.approx(min(values))
    assert "Best parameters" in result.stdout + result.stderr


@pytest.mark.slow
def test_a_failed_trial_does_not_stop_the_optuna_search(tmp_path: Path, tiny_corpus: Path):
    sweep = tmp_path / "optuna"
    result = run_lmlab(
        "train",
        "hparams_search=shakespeare_optuna",
        "hydra.sweeper.n_trials=2",
        f"data.path={tiny_corpus}",
        *[o for o in TINY_JOB if not o.startswith("model.n_embd")],
        "model.n_embd=choice(16,24)",
        "model.n_head=3",  # 16 is not divisible by 3: those trials fail
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    statuses = {
        json.loads((j / "metrics.json").read_text())["status"]: j.name for j in job_dirs(sweep)
    }
    assert set(statuses) == {"failed", "completed"}  # the seeded TPE tries both widths
    assert "model.n_embd-16" in statuses["failed"]
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_params"]["model.n_embd"] == 24


# ----------------------------------------------------------------------------- launchers


def test_joblib_launcher_composes():
    cfg = compose_with_hydra(["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"])
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher")
    assert cfg.hydra.launcher.n_jobs == 2


def test_submitit_local_launcher_composes():
    cfg = compose_with_hydra(["hydra/launcher=submitit_local"])
    assert cfg.hydra.launcher._target_.endswith("submitit_launcher.LocalLauncher")


def test_slurm_launcher_matches_the_trainer_and_makes_an_sbatch_script(tmp_path: Path, monkeypatch):
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    cfg = compose_with_hydra(
        [
            "hydra/launcher=slurm",
            "trainer=gpu",
            "trainer.devices=4",
            "trainer.num_nodes=2",
            "hydra.launcher.partition=gpu",
            f"hydra.launcher.submitit_folder={tmp_path}/%j",
            "hydra.launcher.name=lmlab",
        ]
    )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    # one srun task per device and node: what Lightning's SLURMEnvironment expects
    assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.nodes) == (4, 4, 2)
    assert launcher.timeout_min > 0 and launcher.mem_gb > 0 and launcher.array_parallelism > 0

    # Build the executor as the plugin does (SlurmLauncher.launch), up to the sbatch script;
    # submitit only checks that `srun` exists.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    params = OmegaConf.to_container(launcher, resolve=True)
    params.pop("_target_")
    executor = submitit.AutoExecutor(
        cluster="slurm",
        folder=params.pop("submitit_folder"),
        slurm_max_num_timeout=params.pop("max_num_timeout"),
    )
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    script = executor._executor._make_submission_file_text("python -m lmlab.train", "0")
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --time=240",
    ):
        assert line in script


@pytest.mark.slow
def test_joblib_runs_two_jobs(tmp_path: Path, tiny_corpus: Path):
    sweep = tmp_path / "joblib"
    result = run_lmlab(
        "train",
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        f"data.path={tiny_corpus}",
        *TINY_JOB,
        "model.n_head=2",
        "seed=1,2",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    jobs = job_dirs(sweep)
    assert [j.name for j in jobs] == ["0_seed-1", "1_seed-2"]
    for job in jobs:
        assert json.loads((job / "metrics.json").read_text())["status"] == "completed"
    assert "2 jobs, 2 completed" in result.stdout


def test_hparams_search_group_holds_only_composable_configs():
    group = files("lmlab.conf").joinpath("hparams_search")  # the installed config tree
    names = sorted(f.name[:-5] for f in group.iterdir() if f.name.endswith(".yaml"))
    assert names  # the group is found: an empty loop would check nothing
    for name in names:
        cfg = compose_with_hydra([f"hparams_search={name}"])
        assert cfg.hydra.sweeper.params, name


@pytest.mark.parametrize(
    ("target", "n_jobs", "cores", "threads"),
    [
        ("hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", 2, 2, 1),
        ("hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", -1, 8, 1),
        ("hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", 2, 16, 8),
        ("hydra._internal.core_plugins.basic_launcher.BasicLauncher", None, 2, None),
    ],
)
def test_parallel_jobs_share_the_cores(monkeypatch, target, n_jobs, cores, threads):
    import lmlab.runs.sweeps as sweeps

    hydra_cfg = OmegaConf.create({"launcher": {"_target_": target, "n_jobs": n_jobs}})
    monkeypatch.setattr(sweeps, "is_multirun", lambda: True)
    monkeypatch.setattr(sweeps.HydraConfig, "get", staticmethod(lambda: hydra_cfg))
    monkeypatch.setattr(sweeps.os, "cpu_count", lambda: cores)
    assert sweeps.threads_per_parallel_job() == threads
