"""lmlab's Optuna sweeper (hydra_plugins.lmlab_optuna_sweeper): the search space parsed from
Hydra's sweep syntax, the trial budget shared by workers through the database, a stopped
worker's trial run again on resume, pruned trials in the sweep summary and in lmlab-compare,
and (slow) a search interrupted and resumed on SQLite."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from helpers import TINY_TEXT, compose_train
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from hydra_plugins.lmlab_optuna_sweeper._impl import (
    FAILURE,
    RETRY_OF,
    SURPLUS,
    OptunaSearch,
    fail_stale_trials,
    spent,
)
from hydra_plugins.lmlab_optuna_sweeper._space import format_value, parse_search_space
from lmlab.errors import LmlabError
from lmlab.optuna_pruning import OptunaPruning, PrunedTrial
from lmlab.runs.compare import main as compare_main
from lmlab.runs.sweeps import format_report, read_sweep

optuna.logging.set_verbosity(optuna.logging.WARNING)

# A search of seconds: the bigram on TINY_TEXT, 40 steps, a validation every 10. The learning
# rate is 0.1 (val/loss falls from 3.5 to 1.4) or 1e-6 (stays at 3.5, ln of the vocabulary).
# RandomSampler(seed=11) draws 0.1, 1e-6, 1e-6, 1e-6, 0.1 in each worker, so each worker's
# first trial completes, and its next ones, far behind at step 10, are pruned there by the
# median pruner (1 completed trial is enough).
TINY_SEARCH = """\
# @package _global_
defaults:
  - override /model: bigram
  - override /hydra/sweeper: optuna
optimized_metric: val/loss
val_at_start: false
print_config: false
data:
  block_size: 8
  batch_size: 16
trainer:
  accelerator: cpu
  max_steps: 40
  val_check_interval: 10
  log_every_n_steps: 10
  enable_progress_bar: false
  enable_model_summary: false
callbacks:
  sample_text: null
  embeddings: null
hydra:
  mode: MULTIRUN
  sweeper:
    sampler:
      _target_: optuna.samplers.RandomSampler
      seed: 11
    pruner:
      _target_: optuna.pruners.MedianPruner
      n_startup_trials: 1
      n_warmup_steps: 0
    study_name: tiny
    n_trials: 6
    heartbeat_interval: 1
    grace_period: 3
    params:
      model.optimizer.lr: choice(0.1, 1e-6)
"""
GOOD_LR, BAD_LR = 0.1, 1e-6


def tiny_search_args(root: Path) -> list[str]:
    """lmlab-train arguments for TINY_SEARCH, its config and corpus written under `root`."""
    conf = root / "conf" / "hparams_search"
    conf.mkdir(parents=True, exist_ok=True)
    (conf / "tiny_optuna.yaml").write_text(TINY_SEARCH, encoding="utf-8")
    corpus = root / "tiny.txt"
    corpus.write_text(TINY_TEXT, encoding="utf-8")
    return [
        "hparams_search=tiny_optuna",
        f"hydra.searchpath=[file://{root / 'conf'}]",
        f"data.path={corpus}",
    ]


def lmlab_train(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lmlab.train", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def trial_table(storage: str, study_name: str) -> list[tuple[int, str, float | None, dict]]:
    study = optuna.load_study(study_name=study_name, storage=storage)
    return [(t.number, t.state.name, t.value, t.params) for t in study.trials]


# ----------------------------------------------------------------------------- search space


def test_the_search_space_is_read_as_the_former_plugin_wrote_it():
    params = {
        "model.optimizer.lr": "tag(log, interval(1e-4, 1e-2))",
        "model.n_embd": "choice(64, 128, 192)",
        "model.n_layer": "range(2, 8, 2)",
        "model.dropout": "interval(0.0, 0.2)",
        "data.block_size": "tag(int, interval(8, 64))",
    }
    space = parse_search_space(params, ["model=gpt", "model.n_embd=128"])
    assert space.distributions == {
        "model.optimizer.lr": FloatDistribution(1e-4, 1e-2, log=True),
        # Hydra's range excludes its stop, as Python's does: 2, 4, 6 (not 8)
        "model.n_layer": IntDistribution(2, 6, step=2),
        "model.dropout": FloatDistribution(0.0, 0.2),
        "data.block_size": IntDistribution(8, 64),
    }
    # a plain value on the command line fixes a key that params searches
    assert space.fixed == ["model=gpt", "model.n_embd=128"]
    overrides = space.overrides(
        {
            "model.optimizer.lr": 0.001,
            "model.n_layer": 4,
            "model.dropout": 0.1,
            "data.block_size": 9,
        }
    )
    assert overrides == [
        "model=gpt",
        "model.n_embd=128",
        "model.optimizer.lr=0.001",
        "model.n_layer=4",
        "model.dropout=0.1",
        "data.block_size=9",
    ]


def test_choices_keep_their_types_and_come_back_as_the_same_values():
    space = parse_search_space({"+x": "choice(1, 'a b', true, 2.5, gpt, '3')"}, [])
    assert space.distributions == {"x": CategoricalDistribution([1, "a b", True, 2.5, "gpt", "3"])}
    assert space.override_keys == {"x": "+x"}  # the `+` of a new key is kept for the job
    parser = OverridesParser.create()
    for value in [1, "a b", True, 2.5, None, "gpt", "3", "it's", "x=1,y"]:
        (override,) = parser.parse_overrides([f"x={format_value(value)}"])
        assert override.value() == value and type(override.value()) is type(value)


def test_a_key_that_cannot_be_sampled_is_refused():
    with pytest.raises(LmlabError, match="empty range"):
        parse_search_space({"a": "range(5, 1)"}, [])
    with pytest.raises(LmlabError, match="log-scale interval needs low > 0"):
        parse_search_space({"a": "tag(log, interval(0, 1))"}, [])


# ----------------------------------------------------------------------------- the budget


def make_search(storage: str, n_trials: int, n_jobs: int = 1, **kw) -> OptunaSearch:
    settings = dict(
        sampler={"_target_": "optuna.samplers.RandomSampler", "seed": 0},
        pruner=None,
        direction="minimize",
        storage=storage,
        study_name="s",
        n_trials=n_trials,
        n_jobs=n_jobs,
        max_failure_rate=0.0,
        params=None,
        heartbeat_interval=1,
        grace_period=None,
    )
    return OptunaSearch(**{**settings, **kw})


def job_return(value) -> JobReturn:
    ret = JobReturn()
    ret.status, ret.return_value = JobStatus.COMPLETED, value
    return ret


def test_two_workers_share_one_budget_and_never_get_the_same_trial(tmp_path: Path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    space = parse_search_space({"lr": "interval(0.0, 1.0)"}, [])
    a, b = make_search(storage, 5, n_jobs=2), make_search(storage, 5, n_jobs=2)
    study_a, study_b = a.open_study(tmp_path), b.open_study(tmp_path)
    first_a = a.ask(study_a, space)  # 2 running
    first_b = b.ask(study_b, space)  # 2 more: 4 of 5
    second_a = a.ask(study_a, space)  # the last one
    assert [len(first_a), len(first_b), len(second_a)] == [2, 2, 1]
    assert b.ask(study_b, space) == []  # spent, though nothing has finished yet
    numbers = [t.number for t in [*first_a, *first_b, *second_a]]
    assert sorted(numbers) == [0, 1, 2, 3, 4]
    # outcomes: a value, pruned, failed; all count against the budget
    a.tell(study_a, first_a[0], job_return(0.5))
    a.tell(study_a, first_a[1], job_return(PrunedTrial(10, 3.0)))
    assert b.tell(study_b, first_b[0], job_return(None)) is True  # failed
    states = {n: s for n, s, *_ in trial_table(storage, "s")}
    assert [states[n] for n in numbers[:3]] == ["COMPLETE", "PRUNED", "FAIL"]
    assert spent(study_b.get_trials()) == 5 and a.ask(study_a, space) == []


def test_a_trial_asked_after_another_worker_spent_the_budget_is_never_run(tmp_path: Path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    space = parse_search_space({"lr": "interval(0.0, 1.0)"}, [])
    a, b = make_search(storage, 2), make_search(storage, 2)
    study_a, study_b = a.open_study(tmp_path), b.open_study(tmp_path)
    assert len(a.ask(study_a, space)) == 1
    # b sees one trial left, but a takes it between b's count and b's ask
    ask = study_b.ask

    def a_asks_first(*args, **kwargs):
        study_b.ask = ask
        a.ask(study_a, space)
        return ask(*args, **kwargs)

    study_b.ask = a_asks_first
    assert b.ask(study_b, space) == []
    trials = study_b.get_trials()
    assert [(t.number, t.state) for t in trials] == [
        (0, TrialState.RUNNING),
        (1, TrialState.RUNNING),
        (2, TrialState.FAIL),
    ]
    assert SURPLUS in trials[2].user_attrs and spent(trials) == 2


def test_a_trial_left_running_by_a_dead_worker_runs_again_on_resume(tmp_path: Path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    space = parse_search_space({"lr": "interval(0.0, 1.0)"}, [])
    dead = make_search(storage, 3, grace_period=2)
    study = dead.open_study(tmp_path)
    done, left = dead.ask(study, space), dead.ask(study, space)
    dead.tell(study, done[0], job_return(0.25))
    # its worker was killed: no tell, no more heartbeats
    resumed = make_search(storage, 3, n_jobs=2, grace_period=2)
    study = resumed.open_study(tmp_path)
    fail_stale_trials(study)  # its heartbeat is fresh: still running (negative control)
    assert study.get_trials()[1].state == TrialState.RUNNING
    assert spent(study.get_trials()) == 2
    time.sleep(3)
    fail_stale_trials(study)
    trials = study.get_trials()
    assert trials[1].state == TrialState.FAIL and FAILURE not in trials[1].user_attrs
    assert trials[2].state == TrialState.WAITING  # its parameters, queued
    assert spent(trials) == 1  # the interrupted trial does not count against the budget
    rerun = resumed.ask(study, space)
    assert len(rerun) == 2 and rerun[0].number == 2
    assert rerun[0].params == left[0].params and rerun[0].user_attrs[RETRY_OF] == 1
    assert rerun[1].params != left[0].params  # a new one, drawn by the sampler


def test_a_storage_that_cannot_be_opened_is_one_clear_error(tmp_path: Path):
    search = make_search(f"sqlite:///{tmp_path / 'no' / 'such' / 'dir' / 'x.db'}", 1)
    with pytest.raises(LmlabError, match="cannot open the Optuna storage sqlite:///"):
        search.open_study(tmp_path)
    with pytest.raises(LmlabError, match="needs hydra.sweeper.study_name"):
        make_search("sqlite:///x.db", 1, study_name=None)


# ----------------------------------------------------------------------------- pruning


def test_a_pruned_run_stops_at_the_validation_and_says_pruned(tmp_path: Path):
    """The callback reports val/loss to the trial; a pruner that prunes anything above 0
    stops the run at its first validation (step 10 of 40)."""
    from lmlab.train import build_run

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(storage=storage, study_name="p")
    trial = study.ask()
    corpus = tmp_path / "tiny.txt"
    corpus.write_text(TINY_TEXT, encoding="utf-8")
    cfg = compose_train(
        [
            f"data.path={corpus}",
            "trainer.accelerator=cpu",
            "trainer.max_steps=40",
            "trainer.val_check_interval=10",
            "trainer.enable_progress_bar=false",
            "callbacks.sample_text=null",
            "callbacks.embeddings=null",
        ],
        tmp_path / "run",
    )
    pruner = {"_target_": "optuna.pruners.ThresholdPruner", "upper": 0.0}
    callback = OptunaPruning(storage, "p", trial.number, "val/loss", pruner)
    run = build_run(cfg, (callback,))
    with pytest.raises(optuna.TrialPruned) as raised:
        run.trainer.fit(run.module, datamodule=run.datamodule)
    assert raised.value.step == 10 and run.trainer.global_step == 10
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "pruned" and metrics["steps"] == 10
    assert metrics["error"].startswith("PrunedAtStep: pruned at step 10: val/loss ")
    reported = optuna.load_study(study_name="p", storage=storage).trials[0].intermediate_values
    assert reported == {10: pytest.approx(metrics["last"]["val/loss"])}


def _job(root: Path, name: str, status: str, loss: float, steps: int, error: str | None = None):
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "config.yaml").write_text("{}")
    metrics = {"status": status, "val/loss": loss, "val/bpc": loss, "steps": steps}
    (job / "metrics.json").write_text(json.dumps({**metrics, "error": error}))


def test_pruned_is_its_own_state_in_the_sweep_summary_and_in_lmlab_compare(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    _job(sweep, "0_lr-0.1", "completed", 1.43, 40)
    _job(sweep, "1_lr-1e-06", "pruned", 3.50, 10, "PrunedAtStep: pruned at step 10")
    _job(sweep, "2_lr-0.2", "failed", 9.0, 3, "LmlabError: diverged")
    report = read_sweep(sweep)
    assert [j.path.name for j in report.failed] == ["2_lr-0.2"]  # pruned is not a failure
    assert format_report(report).splitlines()[:2] == [
        f"sweep {sweep}: 3 jobs, 1 completed, 1 pruned, 1 failed",
        "  failed: 2_lr-0.2: LmlabError: diverged",
    ]
    assert compare_main([str(sweep), "--metric", "val/loss"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "_lr-" in line]
    # ranked: the completed run first; the pruned one after it, unranked, with its status
    assert "0_lr-0.1" in rows[0] and "completed" in rows[0]
    assert "1_lr-1e-06" in rows[1] and "pruned" in rows[1] and "step 10" in rows[1]
    assert "2_lr-0.2" in rows[2] and "failed" in rows[2]


# ----------------------------------------------------------------------------- resume


@pytest.mark.slow
def test_an_interrupted_search_resumes_where_it_stopped(tmp_path: Path):
    """Kill a one-worker SQLite search (SIGKILL: nothing is cleaned up) while a trial runs,
    after at least two have finished, then run the same command again with the same sweep
    directory."""
    sweep = tmp_path / "sweep"
    args = [*tiny_search_args(tmp_path), f"hydra.sweep.dir={sweep}"]
    storage = f"sqlite:///{sweep / 'optuna.db'}"
    first = lmlab_train(*args, cwd=tmp_path)
    deadline = time.time() + 240
    while time.time() < deadline:
        time.sleep(0.5)
        if (sweep / "optuna.db").is_file():
            try:
                states = [s for _, s, *_ in trial_table(storage, "tiny")]
            except KeyError:  # the database is there, the study not yet
                continue
            # a trial running after at least two finished ones (a poll may miss a short one)
            if len(states) >= 3 and states[-1] == "RUNNING":
                break
    first.send_signal(signal.SIGKILL)
    first.wait()
    before = trial_table(storage, "tiny")
    print("\nafter the kill (number, state, value, params):", *before, sep="\n  ")
    killed = len(before) - 1  # the number of the trial the kill interrupted
    assert [s for _, s, *_ in before][killed:] == ["RUNNING"]
    assert all(s in ("COMPLETE", "PRUNED") for _, s, *_ in before[:killed])
    time.sleep(4)  # the grace period (3 s) of the killed worker's heartbeat
    second = lmlab_train(*args, cwd=tmp_path)
    output, _ = second.communicate(timeout=300)
    assert second.returncode == 0, output[-3000:]
    after = trial_table(storage, "tiny")
    print("after the resume:", *after, sep="\n  ")
    assert after[:killed] == before[:killed]  # kept, not run again
    assert after[killed][1] == "FAIL"  # the killed worker's trial
    assert f"trial {killed} was left running by a worker that stopped" in output
    ran = [t for t in after if t[1] in ("COMPLETE", "PRUNED")]
    assert len(ran) == 6 and len(after) == 7  # the budget: 6 trials that ran
    assert after[killed + 1][3] == before[killed][3]  # its parameters ran first, next
    # one job directory per trial that ran, named by its number (and the killed trial's, if
    # the kill came after Hydra made it)
    jobs = {int(p.name.split("_")[0]) for p in sweep.iterdir() if (p / ".hydra").is_dir()}
    assert jobs - {killed} == {n for n, *_ in ran} == set(range(7)) - {killed}
    statuses = {
        n: json.loads(next(sweep.glob(f"{n}_*/metrics.json")).read_text())["status"]
        for n, state, *_ in ran
    }
    assert statuses == {n: {"COMPLETE": "completed", "PRUNED": "pruned"}[s] for n, s, *_ in ran}
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_params"] == {"model.optimizer.lr": GOOD_LR}
