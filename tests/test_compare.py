"""`lmlab-compare`: discovery, ranking, seed grouping, failed runs, CSV/Markdown/plot output."""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmlab.runs.collect import collect_runs
from lmlab.runs.compare import main
from lmlab.runs.render import read_scalars
from lmlab.runs.table import make_table, table_columns, welch_test


def make_run(
    run_dir: Path,
    overrides: list[str] | None = None,
    *,
    loss: float | None = None,
    bpc: float | None = None,
    status: str = "completed",
    curve: list[tuple[int, float]] | None = None,
    config: dict[str, Any] | None = None,
    samples: str | None = None,
    job: int | None = None,
    **extra: Any,
) -> Path:
    """A run directory as `lmlab-train` leaves it, with only the files under test; `job`: a
    sweep's job, with the .hydra/hydra.yaml Hydra writes for one."""
    run_dir.mkdir(parents=True)
    metrics: dict[str, Any] = {
        "status": status,
        "val/loss": loss,
        "val/bpc": bpc,
        "best": {"step": 20, "val/loss": loss, "val/bpc": bpc} if loss is not None else {},
        "num_params": 4225,
        "steps": 20,
        "tokens_per_sec": 1000.0,
        "wall_time_sec": 2.0,
        **extra,
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    hydra = run_dir / ".hydra"
    hydra.mkdir()
    if overrides is not None:
        (hydra / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if config is not None:
        (hydra / "config.yaml").write_text(yaml.safe_dump(config))
    if job is not None:
        hydra_cfg = {"hydra": {"mode": "MULTIRUN", "job": {"num": job, "name": "train"}}}
        (hydra / "hydra.yaml").write_text(yaml.safe_dump(hydra_cfg))
    if curve:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(run_dir))
        for step, value in curve:
            writer.add_scalar("val/loss", value, step)
            writer.add_scalar("train/loss", value + 0.1, step)
        writer.close()
    if samples is not None:
        (run_dir / "samples.txt").write_text(samples)
    return run_dir


def test_ranks_by_val_bpc_by_default_and_by_metric_on_request(tmp_path: Path) -> None:
    # The BPE run has the highest loss per token but the lowest bits per character.
    make_run(tmp_path / "char_small", ["data.block_size=8"], loss=1.5, bpc=2.2)
    make_run(tmp_path / "char_big", ["data.block_size=64"], loss=1.2, bpc=1.7)
    make_run(tmp_path / "bpe", ["data.block_size=16"], loss=4.0, bpc=1.4)
    runs = collect_runs([tmp_path])

    by_bpc = make_table(runs).rows
    assert [r["run"] for r in by_bpc] == ["bpe", "char_big", "char_small"]
    assert [r["rank"] for r in by_bpc] == [1, 2, 3]
    by_loss = make_table(runs, metric="val/loss").rows
    assert [r["run"] for r in by_loss] == ["char_big", "char_small", "bpe"]


def test_higher_is_better_reverses_the_ranking(tmp_path: Path) -> None:
    make_run(tmp_path / "slow", ["model=gpt"], loss=1.0, bpc=1.0, tokens_per_sec=10.0)
    make_run(tmp_path / "fast", ["model=bigram"], loss=2.0, bpc=2.0, tokens_per_sec=90.0)
    rows = make_table(collect_runs([tmp_path]), "tokens_per_sec", higher_is_better=True).rows
    assert [r["run"] for r in rows] == ["fast", "slow"]


def test_unknown_metric_is_an_error_listing_the_known_ones(tmp_path: Path) -> None:
    make_run(tmp_path / "a", [], loss=1.0, bpc=1.4)
    with pytest.raises(ValueError, match="no run has the metric 'val/acc'.*val/bpc"):
        make_table(collect_runs([tmp_path]), metric="val/acc")


def test_only_differing_overrides_become_columns(tmp_path: Path) -> None:
    common = ["model=gpt", "debug=limit"]
    make_run(tmp_path / "sweep" / "0", [*common, "data.block_size=8"], loss=1.0, bpc=1.4)
    make_run(tmp_path / "sweep" / "1", [*common, "data.block_size=16"], loss=0.9, bpc=1.3)
    rows = make_table(collect_runs([tmp_path / "sweep"])).rows
    assert {r["data.block_size"] for r in rows} == {"8", "16"}
    assert "model" not in rows[0] and "debug" not in rows[0]
    assert [r["run"] for r in rows] == ["1", "0"]  # names relative to the compared folder


def test_an_override_missing_from_one_run_is_compared_with_its_config_value(
    tmp_path: Path,
) -> None:
    # `lr=1e-3` spelled on the command line equals the default `lr: 0.001` of the other run.
    config = {"model": {"optimizer": {"lr": 0.001}}, "seed": 1}
    make_run(tmp_path / "a", ["model.optimizer.lr=1e-3"], loss=1.0, bpc=1.4, config=config)
    make_run(tmp_path / "b", [], loss=1.1, bpc=1.5, config=config)
    make_run(tmp_path / "c", ["model.optimizer.lr=0.01"], loss=0.9, bpc=1.3, config=config)
    rows = make_table(collect_runs([tmp_path]), group_seeds=False).rows
    assert {r["run"]: r["model.optimizer.lr"] for r in rows} == {
        "a": "0.001",
        "b": "0.001",
        "c": "0.01",
    }


def test_without_overrides_files_flattened_configs_are_compared(tmp_path: Path) -> None:
    def config(layers: int, out: str) -> dict[str, Any]:
        return {"model": {"n_layer": layers, "n_embd": 64}, "paths": {"output_dir": out}}

    make_run(tmp_path / "a", None, loss=1.0, bpc=1.4, config=config(2, "a"))
    make_run(tmp_path / "b", None, loss=0.9, bpc=1.3, config=config(4, "b"))
    rows = make_table(collect_runs([tmp_path])).rows
    assert [(r["run"], r["model.n_layer"]) for r in rows] == [("b", "4"), ("a", "2")]
    assert "model.n_embd" not in rows[0]
    assert "paths.output_dir" not in rows[0]  # differs for every run by design


def test_runs_that_differ_only_by_seed_share_a_row_with_mean_std_and_n(tmp_path: Path) -> None:
    losses = [1.0, 1.2, 1.4]
    for seed, loss in enumerate(losses, start=1):
        make_run(tmp_path / f"lr1_s{seed}", ["lr=0.1", f"seed={seed}"], loss=loss, bpc=loss)
    make_run(tmp_path / "lr2_s1", ["lr=0.2", "seed=1"], loss=1.1, bpc=1.1)
    runs = collect_runs([tmp_path])

    rows = make_table(runs).rows
    assert [r["lr"] for r in rows] == ["0.2", "0.1"]  # 1.1 beats the mean 1.2
    group = rows[1]
    assert group["n"] == 3
    assert group["seed"] == "1,2,3"
    assert group["val/loss"] == pytest.approx(statistics.fmean(losses))
    assert group["val/loss_std"] == pytest.approx(statistics.stdev(losses))
    assert rows[0]["n"] == 1 and rows[0]["val/loss_std"] is None

    ungrouped = make_table(runs, group_seeds=False).rows
    assert len(ungrouped) == 4
    assert all(r["n"] == 1 for r in ungrouped)


def test_failed_and_dead_runs_rank_last_with_their_error(tmp_path: Path) -> None:
    make_run(tmp_path / "ok", ["lr=0.1"], loss=1.5, bpc=2.0)
    long_error = "RuntimeError: CUDA out of memory. " + "x" * 200 + "\nsecond line"
    # A failed run's best metric may look good; it still must not win.
    make_run(tmp_path / "oom", ["lr=0.2"], loss=0.5, bpc=0.7, status="failed", error=long_error)
    (tmp_path / "died" / ".hydra").mkdir(parents=True)  # no metrics.json at all
    rows = make_table(collect_runs([tmp_path])).rows

    assert [r["run"] for r in rows] == ["ok", "died", "oom"]
    assert [r["rank"] for r in rows] == [1, None, None]
    failed = rows[2]
    assert failed["status"] == "failed"
    assert failed["error"].startswith("RuntimeError: CUDA out of memory.")
    assert len(failed["error"]) <= 80 and "second line" not in failed["error"]
    assert rows[1]["status"] == "unknown"
    assert "no metrics.json" in rows[1]["error"]
    assert rows[0]["error"] is None


def test_failed_seeds_are_not_hidden_in_a_group(tmp_path: Path) -> None:
    make_run(tmp_path / "s1", ["seed=1"], loss=1.0, bpc=1.0)
    make_run(tmp_path / "s2", ["seed=2"], loss=1.2, bpc=1.2)
    make_run(tmp_path / "s3", ["seed=3"], status="failed", error="ValueError: nan loss")
    rows = make_table(collect_runs([tmp_path])).rows
    assert [(r["run"], r["n"], r["status"]) for r in rows] == [
        ("s1, s2", 2, "completed"),
        ("s3", 1, "failed"),
    ]


def test_sweep_jobs_are_found_at_any_depth_in_numeric_order(tmp_path: Path) -> None:
    for job in (10, 2, 1):
        make_run(tmp_path / "multirun" / "day" / str(job), [f"seed={job}"], loss=1.0, bpc=1.0)
    (tmp_path / "multirun" / "day" / "multirun.yaml").write_text("hydra: {}\n")
    names = [r.name for r in collect_runs([tmp_path])]
    assert names == ["multirun/day/1", "multirun/day/2", "multirun/day/10"]


def test_one_run_directory_is_named_after_itself(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run1", [], loss=1.0, bpc=1.0)
    assert [r.name for r in collect_runs([run])] == ["run1"]


def test_csv_holds_one_line_per_row_with_raw_numbers(tmp_path: Path, capsys) -> None:
    make_run(tmp_path / "runs" / "a", ["data.block_size=8"], loss=1.25, bpc=1.8)
    make_run(tmp_path / "runs" / "b", ["data.block_size=16"], loss=1.0, bpc=1.5)
    out = tmp_path / "out" / "table.csv"
    assert main([str(tmp_path / "runs"), "--csv", str(out)]) == 0

    rows = list(csv.DictReader(out.open()))
    assert [(r["rank"], r["run"], r["data.block_size"]) for r in rows] == [
        ("1", "b", "16"),
        ("2", "a", "8"),
    ]
    assert float(rows[1]["val/loss"]) == 1.25
    assert rows[0]["status"] == "completed"
    assert "error" not in rows[0]  # no run failed: no empty column
    printed = capsys.readouterr().out
    assert "data.block_size" in printed and printed.index("│ b ") < printed.index("│ a ")


def test_markdown_has_the_table_the_plot_and_the_best_runs_samples(tmp_path: Path) -> None:
    samples = "\n".join(f"sample line {i}" for i in range(30))
    runs = tmp_path / "runs"
    make_run(runs / "best", ["lr=0.1"], loss=1.0, bpc=1.4, samples=samples, curve=[(9, 1.5)])
    make_run(runs / "worse", ["lr=0.2"], loss=2.0, bpc=2.8, samples="not me", curve=[(9, 2.5)])
    report, plot = tmp_path / "report" / "report.md", tmp_path / "report" / "curves.png"
    args = [str(runs), "--markdown", str(report), "--plot", str(plot)]
    assert main(args) == 0

    text = report.read_text()
    assert "| rank | run | lr | params | val/loss | val/bpc |" in text
    assert "| 1 | best | 0.1 | 4.22K | 1.0000 | 1.4000 |" in text
    assert "![validation curves](curves.png)" in text
    assert "sample line 29" in text and "sample line 5\n" not in text  # only the tail
    assert "not me" not in text


def test_plot_is_a_png_of_the_logged_curves(tmp_path: Path) -> None:
    curve = [(9, 2.0), (19, 1.5), (29, 1.25)]
    run = make_run(tmp_path / "runs" / "a", ["lr=0.1"], loss=1.25, bpc=1.8, curve=curve)
    make_run(tmp_path / "runs" / "b", ["lr=0.2"], loss=1.5, bpc=2.1, curve=[(9, 2.1), (19, 1.5)])

    points = read_scalars(run, ["val/loss", "train/loss", "val/bpc"])
    assert points["val/loss"] == [(s, pytest.approx(v)) for s, v in curve]
    assert [s for s, _ in points["train/loss"]] == [9, 19, 29]
    assert "val/bpc" not in points  # never logged

    plot = tmp_path / "curves.png"
    assert main([str(tmp_path / "runs"), "--plot", str(plot)]) == 0
    assert plot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and plot.stat().st_size > 1000
    assert not list(tmp_path.glob(".curves.png*"))  # no temporary file left behind


def assert_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 1


def test_plot_without_event_files_is_a_clear_error(tmp_path: Path, capsys) -> None:
    make_run(tmp_path / "a", [], loss=1.0, bpc=1.4)
    assert_refused([str(tmp_path), "--plot", str(tmp_path / "p.png")])
    assert "no run has TensorBoard val/loss points" in capsys.readouterr().err


def test_missing_dir_exits_1_with_a_message(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nope"
    assert_refused([str(missing)])
    err = capsys.readouterr().err
    assert err.startswith("lmlab-compare: error: ")
    assert f"{missing} does not exist" in err


def test_a_dir_without_runs_says_what_a_run_dir_contains(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert_refused([str(tmp_path / "empty")])
    err = capsys.readouterr().err
    assert f"no runs found under {tmp_path / 'empty'}" in err
    assert "metrics.json" in err and ".hydra" in err


def test_the_command_line_exit_code_is_1_on_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lmlab.runs.compare", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "lmlab-compare: error:" in result.stderr and "does not exist" in result.stderr


# ----------------------------------------------------------------------------- new metrics


def test_test_columns_appear_only_when_a_run_has_them(tmp_path: Path, capsys) -> None:
    make_run(tmp_path / "old" / "a", ["lr=0.1"], loss=1.0, bpc=1.4)
    make_run(tmp_path / "old" / "b", ["lr=0.2"], loss=1.1, bpc=1.5)
    assert main([str(tmp_path / "old")]) == 0
    printed = capsys.readouterr().out
    assert "test/" not in printed and "val/bpb" not in printed

    new = tmp_path / "new"
    make_run(new / "a", ["lr=0.1"], loss=1.0, bpc=1.4, **{"val/bpb": 1.2, "test/bpc": 1.45})
    make_run(new / "b", ["lr=0.2"], loss=1.1, bpc=1.5, **{"val/bpb": 1.3})
    rows = make_table(collect_runs([new])).rows
    columns = table_columns(rows)
    assert {"val/bpb", "test/bpc"} <= set(columns)
    assert "test/loss" not in columns and "test/bpb" not in columns  # no run has them
    assert [r["test/bpc"] for r in rows] == [1.45, None]

    out = tmp_path / "t.csv"
    assert main([str(new), "--csv", str(out), "--markdown", str(tmp_path / "t.md")]) == 0
    assert [r["test/bpc"] for r in csv.DictReader(out.open())] == ["1.45", ""]
    assert "| val/loss | val/bpc | val/bpb | test/bpc | steps |" in (tmp_path / "t.md").read_text()
    assert "test/bpc" in capsys.readouterr().out


def test_seed_groups_average_the_test_metrics(tmp_path: Path) -> None:
    for seed, test_bpc in enumerate([1.4, 1.6], start=1):
        make_run(
            tmp_path / f"s{seed}", [f"seed={seed}"], loss=1.0, bpc=1.5, **{"test/bpc": test_bpc}
        )
    (row,) = make_table(collect_runs([tmp_path])).rows
    assert row["test/bpc"] == pytest.approx(1.5)
    assert row["test/bpc_std"] == pytest.approx(statistics.stdev([1.4, 1.6]))


def test_ranking_ignores_test_metrics_unless_asked(tmp_path: Path) -> None:
    # `lucky` is best on the test part but worse on validation: selecting by test is leakage.
    make_run(tmp_path / "lucky", ["lr=0.1"], loss=1.0, bpc=1.5, **{"test/bpc": 1.0})
    make_run(tmp_path / "steady", ["lr=0.2"], loss=1.0, bpc=1.4, **{"test/bpc": 1.6})
    runs = collect_runs([tmp_path])
    assert [r["run"] for r in make_table(runs).rows] == ["steady", "lucky"]
    assert [r["run"] for r in make_table(runs, metric="test/bpc").rows] == ["lucky", "steady"]


# ----------------------------------------------------------------------------- significance


def _t_two_sided_p(t: float, df: float, steps: int = 20_000) -> float:
    """P(|T| > |t|) for Student's t with `df` degrees of freedom, by Simpson's rule on the
    density: independent of scipy."""
    norm = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))

    def density(x: float) -> float:
        return norm * (1 + x * x / df) ** (-(df + 1) / 2)

    h = abs(t) / steps
    inner = sum((4 if i % 2 else 2) * density(i * h) for i in range(1, steps))
    return 1 - 2 * h / 3 * (density(0.0) + inner + density(abs(t)))


def test_welch_test_matches_the_formulas_by_hand() -> None:
    a, b = [2.33, 2.35, 2.343, 2.338], [2.40, 2.405, 2.399]
    se2_a, se2_b = statistics.variance(a) / 4, statistics.variance(b) / 3
    se = math.sqrt(se2_a + se2_b)
    df = (se2_a + se2_b) ** 2 / (se2_a**2 / 3 + se2_b**2 / 2)  # Welch-Satterthwaite
    diff = statistics.fmean(a) - statistics.fmean(b)

    result = welch_test(a, b)
    assert result.difference == pytest.approx(diff)
    assert result.df == pytest.approx(df)
    assert result.p_value == pytest.approx(_t_two_sided_p(diff / se, df), rel=1e-6)
    assert result.p_value < 0.05 and result.significant
    # The interval is centred on the difference, and its half-width is the t quantile that
    # leaves 5% in the two tails.
    assert (result.ci_low + result.ci_high) / 2 == pytest.approx(diff)
    quantile = (result.ci_high - result.ci_low) / 2 / se
    assert _t_two_sided_p(quantile, df) == pytest.approx(0.05, rel=1e-6)
    assert result.ci_high < 0  # both ends below zero, as p < 0.05 says


def test_welch_test_negative_control_is_within_noise() -> None:
    same = welch_test([1.0, 1.2, 1.4], [1.4, 1.0, 1.2])  # the same values, reordered
    assert same.difference == pytest.approx(0.0, abs=1e-12)
    assert same.p_value == pytest.approx(1.0)
    assert same.ci_low < 0 < same.ci_high and not same.significant

    rng = random.Random(0)  # two samples drawn from one distribution
    a, b = ([rng.gauss(2.0, 0.05) for _ in range(5)] for _ in range(2))
    drawn = welch_test(a, b)
    assert drawn.p_value > 0.05 and drawn.ci_low < 0 < drawn.ci_high


def test_welch_test_with_zero_variance_gives_no_nan() -> None:
    identical = welch_test([1.5, 1.5, 1.5], [1.5, 1.5])
    assert identical.p_value is None and identical.df is None and not identical.significant
    assert (identical.ci_low, identical.ci_high) == (0.0, 0.0)
    constant = welch_test([1.0, 1.0], [2.0, 2.0])
    assert constant.p_value is None and (constant.ci_low, constant.ci_high) == (-1.0, -1.0)
    one_sided = welch_test([1.0, 1.0, 1.0], [1.1, 1.2, 1.3])  # one variance zero: defined
    assert one_sided.df == pytest.approx(2.0) and 0 < one_sided.p_value < 1
    with pytest.raises(ValueError, match="at least two values"):
        welch_test([1.0], [1.0, 2.0])


def _seed_sweep(root: Path, settings: dict[str, list[float]]) -> None:
    for setting, values in settings.items():
        for seed, bpc in enumerate(values, start=1):
            make_run(
                root / f"{setting}_{seed}", [f"model={setting}", f"seed={seed}"], loss=bpc, bpc=bpc
            )


def test_seed_sweeps_of_two_settings_print_the_significance_line(tmp_path: Path, capsys) -> None:
    _seed_sweep(tmp_path / "runs", {"gpt": [2.33, 2.35, 2.343], "mlp": [2.40, 2.405, 2.399]})
    report = tmp_path / "report.md"
    assert main([str(tmp_path / "runs"), "--markdown", str(report)]) == 0

    result = welch_test([2.33, 2.35, 2.343], [2.40, 2.405, 2.399])
    line = (
        'best two: "model=gpt" 2.3410 ± 0.0101 (3 seeds) vs "model=mlp" 2.4013 ± 0.0032 '
        f"(3 seeds): difference -0.0603, 95% CI [{result.ci_low:.4f}, {result.ci_high:.4f}], "
        f"Welch's t-test p = {result.p_value:.2g}: more than noise (p < 0.05)"
    )
    printed = capsys.readouterr().out
    assert line in printed.splitlines()
    assert printed.index("┃ rank") < printed.index("best two:")  # after the table
    assert line in report.read_text().splitlines()
    assert "*" not in printed  # every row has several seeds: nothing to mark


def test_overlapping_seed_sweeps_are_within_noise(tmp_path: Path, capsys) -> None:
    _seed_sweep(tmp_path, {"gpt": [2.30, 2.40, 2.35], "mlp": [2.36, 2.31, 2.41]})
    assert main([str(tmp_path)]) == 0
    assert capsys.readouterr().out.rstrip().endswith(": within noise")


def test_identical_seed_values_say_so_plainly(tmp_path: Path, capsys) -> None:
    _seed_sweep(tmp_path, {"gpt": [2.3, 2.3], "mlp": [2.4, 2.4]})
    assert main([str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "zero variance" in printed and "the t-test is undefined" in printed
    assert "nan" not in printed.lower()


def test_a_single_seed_row_is_marked_and_not_judged(tmp_path: Path, capsys) -> None:
    _seed_sweep(tmp_path, {"gpt": [2.33, 2.35, 2.343], "mlp": [2.2]})
    assert main([str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "│ 1* │" in printed and "* single seed" in printed
    assert (
        'best two: "model=mlp seed=1" 2.2000 (1 seed) vs "model=gpt" 2.3410 ± 0.0101 (3 seeds): '
        "difference -0.1410; single-seed rows (marked *) cannot be told from noise: "
        "sweep seed=1,2,3"
    ) in printed
    assert "p =" not in printed


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("text", ["[]", "3", '"x"', "null"])
def test_metrics_json_that_is_not_an_object_is_listed_as_unreadable(
    tmp_path: Path, capsys, text: str
) -> None:
    make_run(tmp_path / "ok", ["lr=0.1"], loss=1.0, bpc=1.4)
    (make_run(tmp_path / "odd", ["lr=0.2"], loss=0.5, bpc=0.5) / "metrics.json").write_text(text)
    rows = make_table(collect_runs([tmp_path])).rows
    assert [(r["run"], r["rank"], r["status"]) for r in rows] == [
        ("ok", 1, "completed"),
        ("odd", None, "unknown"),
    ]
    assert rows[1]["error"] == "metrics.json is not a JSON object"
    assert main([str(tmp_path)]) == 0
    assert "metrics.json is not a JSON object" in capsys.readouterr().out


def test_non_finite_seeds_are_left_out_of_the_group_statistics(tmp_path: Path, capsys) -> None:
    for seed, loss in enumerate([1.0, float("nan"), 1.4, float("inf")], start=1):
        make_run(tmp_path / f"a{seed}", ["lr=0.1", f"seed={seed}"], loss=loss, bpc=loss)
    for seed, loss in enumerate([1.1, 1.3], start=1):  # the negative control: all finite
        make_run(tmp_path / f"b{seed}", ["lr=0.2", f"seed={seed}"], loss=loss, bpc=loss)
    for seed in (1, 2):  # no finite value at all: not ranked, shown as nan
        make_run(tmp_path / f"c{seed}", ["lr=0.3", f"seed={seed}"], loss=math.nan, bpc=1.0)
    rows = make_table(collect_runs([tmp_path]), metric="val/loss").rows

    assert [(r["lr"], r["rank"], r["n"]) for r in rows] == [
        ("0.1", 1, 4),
        ("0.2", 2, 2),
        ("0.3", None, 2),
    ]
    assert rows[0]["val/loss"] == pytest.approx(1.2)
    assert rows[0]["val/loss_std"] == pytest.approx(statistics.stdev([1.0, 1.4]))
    assert (
        rows[0]["error"] == "val/loss not finite in 2 of 4 runs; val/bpc not finite in 2 of 4 runs"
    )
    assert rows[1]["val/loss"] == pytest.approx(1.2)
    assert rows[1]["val/loss_std"] == pytest.approx(statistics.stdev([1.1, 1.3]))
    assert rows[1]["error"] is None
    assert math.isnan(rows[2]["val/loss"]) and rows[2]["val/loss_std"] is None
    assert rows[2]["val/bpc"] == 1.0 and rows[2]["error"] == "val/loss not finite in 2 of 2 runs"

    assert main([str(tmp_path), "--metric", "val/loss"]) == 0
    printed = capsys.readouterr().out
    assert '"lr=0.1" 1.2000 ± 0.2828 (2 seeds) vs "lr=0.2" 1.2000 ± 0.1414 (2 seeds)' in printed


def test_a_single_nan_run_ranks_last(tmp_path: Path) -> None:
    make_run(tmp_path / "nan", ["lr=0.1"], loss=math.nan, bpc=math.nan)
    make_run(tmp_path / "ok", ["lr=0.2"], loss=2.0, bpc=2.0)
    rows = make_table(collect_runs([tmp_path])).rows
    assert [(r["run"], r["rank"]) for r in rows] == [("ok", 1), ("nan", None)]
    assert (
        rows[1]["error"] == "val/loss not finite in 1 of 1 runs; val/bpc not finite in 1 of 1 runs"
    )


@pytest.mark.parametrize("option", ["--csv", "--markdown", "--plot"])
def test_an_output_path_that_is_a_directory_is_refused_before_writing(
    tmp_path: Path, capsys, option: str
) -> None:
    make_run(tmp_path / "runs" / "a", ["lr=0.1"], loss=1.0, bpc=1.4)
    out = tmp_path / "out.png"  # a directory, with a name --plot accepts
    out.mkdir()
    csv_file = tmp_path / "t.csv"
    extra = [] if option == "--csv" else ["--csv", str(csv_file)]
    assert_refused([str(tmp_path / "runs"), *extra, option, str(out)])
    example = {"--csv": "table.csv", "--markdown": "report.md", "--plot": "curves.png"}[option]
    captured = capsys.readouterr()
    assert captured.err == (
        f"lmlab-compare: error: {option} {out} is a directory; "
        f"give a file name, e.g. {out / example}\n"
    )
    assert captured.out == "" and not csv_file.exists()  # checked before anything


def test_an_output_path_under_a_file_is_refused(tmp_path: Path, capsys) -> None:
    make_run(tmp_path / "runs" / "a", ["lr=0.1"], loss=1.0, bpc=1.4)
    (tmp_path / "notes.txt").write_text("x")
    out = tmp_path / "notes.txt" / "sub" / "t.csv"
    assert_refused([str(tmp_path / "runs"), "--csv", str(out)])
    assert capsys.readouterr().err == (
        f"lmlab-compare: error: --csv {out}: {tmp_path / 'notes.txt'} is a file; "
        "give a path in a folder\n"
    )


def test_an_output_path_in_a_read_only_folder_is_refused(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    make_run(tmp_path / "runs" / "a", ["lr=0.1"], loss=1.0, bpc=1.4)
    out = tmp_path / "new" / "report.md"  # a missing folder is made, in a folder that exists
    # Tests may run as root, for whom every folder is writable: the check is what is tested.
    monkeypatch.setattr("lmlab.runs.compare.os.access", lambda path, mode: False)
    assert_refused([str(tmp_path / "runs"), "--markdown", str(out)])
    assert capsys.readouterr().err == (
        f"lmlab-compare: error: --markdown {out}: cannot write in {tmp_path}; "
        "give a writable folder\n"
    )
    assert not (tmp_path / "new").exists()


# ----------------------------------------------------------------------------- sweeps, readable

# An Optuna search's overrides, as its sweeper writes them to each trial's overrides.yaml: the
# floats it suggests at full precision. The job folders are named without `=` (`0_model...-`).
OPTUNA_TRIALS = [
    ("0.001014299778430435", "128", "0.17220442168506447", 2.0),
    ("0.00034567891234", "64", "0.013105771847962622", 2.2),
    ("1e-05", "192", "0.1", 2.4),
]


def _optuna_sweep(root: Path) -> Path:
    for num, (lr, width, dropout, bpc) in enumerate(OPTUNA_TRIALS):
        overrides = [
            "hparams_search=shakespeare_optuna",
            f"model.optimizer.lr={lr}",
            f"model.n_embd={width}",
            f"model.dropout={dropout}",
        ]
        name = f"{num}_model.optimizer.lr-{float(lr):.4g}+model.n_embd-{width}"
        make_run(root / name, overrides, loss=bpc, bpc=bpc, job=num, curve=[(10, bpc + 1)])
    return root


def test_optuna_settings_are_rounded_for_people_and_exact_in_the_csv(
    tmp_path: Path, capsys
) -> None:
    sweep = _optuna_sweep(tmp_path / "sweep")
    csv_file, report = tmp_path / "t.csv", tmp_path / "r.md"
    assert main([str(sweep), "--csv", str(csv_file), "--markdown", str(report)]) == 0
    printed = capsys.readouterr().out
    # Four significant digits, worked out by hand: 0.001014|2997..., 0.0003456|789...
    for shown in ("0.001014", "0.0003457", "1e-05", "0.1722", "0.01311", "0.1"):
        assert f"│ {shown} " in printed
    assert "0.0010142" not in printed and "0.17220" not in printed
    assert "│ 128 " in printed  # integers are not floats: as they are
    assert "| 1 | 0 | 0.001014 | 128 | 0.1722 |" in report.read_text()

    rows = list(csv.DictReader(csv_file.open()))
    assert [r["model.optimizer.lr"] for r in rows] == [lr for lr, *_ in OPTUNA_TRIALS]
    assert rows[0]["model.dropout"] == "0.17220442168506447"
    assert rows[0]["run"] == "0_model.optimizer.lr-0.001014+model.n_embd-128"  # full names


def test_the_legend_names_trials_by_rounded_settings(tmp_path: Path, monkeypatch) -> None:
    sweep = _optuna_sweep(tmp_path / "sweep")
    fig = plot_figure(sweep, tmp_path, monkeypatch)
    assert legend_texts(fig) == [
        "model.optimizer.lr=0.001014 model.n_embd=128 model.dropout=0.1722",
        "model.optimizer.lr=0.0003457 model.n_embd=64 model.dropout=0.01311",
        "model.optimizer.lr=1e-05 model.n_embd=192 model.dropout=0.1",
    ]


def test_floats_that_round_alike_get_the_digits_that_tell_them_apart(tmp_path: Path) -> None:
    make_run(tmp_path / "a", ["lr=0.0010142", "wd=0.1234567"], loss=1.0, bpc=1.0)
    make_run(tmp_path / "b", ["lr=0.0010138", "wd=0.2"], loss=1.1, bpc=1.1)
    table = make_table(collect_runs([tmp_path]))
    # lr: 0.001014 for both at 4 digits, so 5; wd (the negative control) keeps 4.
    assert table.digits == {"lr": 5, "wd": 4}
    assert [g.label for g in table.groups] == ["lr=0.0010142 wd=0.1235", "lr=0.0010138 wd=0.2"]


def test_sweep_jobs_are_shown_by_number_and_each_override_once(tmp_path: Path, capsys) -> None:
    sweep = tmp_path / "sweep"
    gpt, mlp = ["model=gpt", "data.block_size=8"], ["model=mlp", "data.block_size=16"]
    make_run(sweep / "0_model-gpt+data.block_size-8", gpt, loss=1.0, bpc=1.5, job=0)
    make_run(sweep / "1_model-mlp+data.block_size-16", mlp, loss=1.0, bpc=1.2, job=1)
    assert main([str(sweep)]) == 0
    printed = capsys.readouterr().out
    assert "│    1 │ 1   │ mlp   │ 16 " in printed and "│    2 │ 0   │ gpt   │ 8 " in printed
    assert "model-" not in printed and "block_size-" not in printed  # not in the run column


def test_job_numbers_come_from_hydra_or_a_sweep_folder_not_from_any_digits(tmp_path: Path) -> None:
    # Without hydra.yaml, a folder with Hydra's multirun.yaml marks its runs as sweep jobs.
    make_run(tmp_path / "sweep" / "3_lr-0.1", ["lr=0.1"], loss=1.0, bpc=1.0)
    (tmp_path / "sweep" / "multirun.yaml").write_text("hydra: {}\n")
    # The negative control: a run named with digits outside a sweep keeps its name.
    make_run(tmp_path / "runs" / "2024_baseline", ["lr=0.2"], loss=1.1, bpc=1.1)
    runs = collect_runs([tmp_path])
    assert [(r.name, r.job, r.short_name) for r in runs] == [
        ("runs/2024_baseline", None, "runs/2024_baseline"),
        ("sweep/3_lr-0.1", 3, "sweep/3"),
    ]


def test_settings_are_read_from_overrides_yaml_not_from_directory_names(tmp_path: Path) -> None:
    # Names that spell other values (or none): overrides.yaml decides.
    make_run(tmp_path / "0_lr=0.5", ["lr=0.1"], loss=1.0, bpc=1.0, job=0)
    make_run(tmp_path / "1_lr-0.5", ["lr=0.2"], loss=1.1, bpc=1.1, job=1)
    make_run(tmp_path / "2_x", ["lr=0.3"], loss=1.2, bpc=1.2, job=2)
    table = make_table(collect_runs([tmp_path]))
    assert [r["lr"] for r in table.rows] == ["0.1", "0.2", "0.3"]
    assert [g.names for g in table.groups] == ["0", "1", "2"]


@pytest.mark.parametrize(
    ("seeds", "others", "caption"),
    [
        ([1, 2, 3], [], "3 runs in 1 row,"),
        ([1], [], "1 run in 1 row,"),
        ([1, 2], ["mlp"], "3 runs in 2 rows,"),
    ],
)
def test_the_caption_counts_runs_and_rows(
    tmp_path: Path, capsys, seeds: list[int], others: list[str], caption: str
) -> None:
    for seed in seeds:
        make_run(tmp_path / f"gpt_{seed}", ["model=gpt", f"seed={seed}"], loss=1.0, bpc=1.0 + seed)
    for model in others:
        make_run(tmp_path / model, [f"model={model}", "seed=1"], loss=1.0, bpc=2.0)
    assert main([str(tmp_path)]) == 0
    assert caption in capsys.readouterr().out


def test_runs_whose_settings_are_unknown_are_not_grouped(tmp_path: Path) -> None:
    # No .hydra/ at all: nothing says that these runs differ only by seed.
    for name, bpc in (("a", 1.0), ("b", 2.0), ("c", 3.0)):
        (tmp_path / "bare" / name).mkdir(parents=True)
        metrics = {"status": "completed", "val/loss": bpc, "val/bpc": bpc}
        (tmp_path / "bare" / name / "metrics.json").write_text(json.dumps(metrics))
    table = make_table(collect_runs([tmp_path / "bare"]))
    assert [(r["run"], r["n"]) for r in table.rows] == [("a", 1), ("b", 1), ("c", 1)]
    # The negative control: runs whose overrides say they differ by seed alone share a row.
    for seed in (1, 2, 3):
        make_run(tmp_path / "seeds" / f"s{seed}", ["model=gpt", f"seed={seed}"], loss=1, bpc=1)
    assert [r["n"] for r in make_table(collect_runs([tmp_path / "seeds"])).rows] == [3]


def test_a_seed_group_is_named_by_its_setting_in_the_legend(tmp_path: Path, monkeypatch) -> None:
    sweep = tmp_path / "sweep"
    for num, seed in enumerate((1, 2, 3)):
        name = f"{num}_model-gpt+seed-{seed}"
        make_run(
            sweep / name, ["model=gpt", f"seed={seed}"], loss=1, bpc=1, job=num, curve=[(5, 2)]
        )
    table = make_table(collect_runs([sweep]))
    assert [(g.label, g.names) for g in table.groups] == [("model=gpt", "0, 1, 2")]
    assert legend_texts(plot_figure(sweep, tmp_path, monkeypatch)) == ["model=gpt (3 seeds)"]

    # Beside another setting, the group is named by what differs: the model.
    for num, seed in enumerate((1, 2), start=3):
        name = f"{num}_model-mlp+seed-{seed}"
        make_run(
            sweep / name, ["model=mlp", f"seed={seed}"], loss=2, bpc=2, job=num, curve=[(5, 3)]
        )
    texts = legend_texts(plot_figure(sweep, tmp_path, monkeypatch))
    assert texts == ["model=gpt (3 seeds)", "model=mlp (2 seeds)"]


def test_pruned_trials_rank_last_and_say_so(tmp_path: Path, capsys, monkeypatch) -> None:
    # The pruned trial's best value is better, from a shorter run: it must not win.
    make_run(tmp_path / "0_a", ["lr=0.1"], loss=1.5, bpc=2.0, job=0, curve=[(10, 2.0)])
    pruned = make_run(
        tmp_path / "1_b",
        ["lr=0.2"],
        loss=0.9,
        bpc=1.2,
        status="pruned",
        job=1,
        steps=500,
        curve=[(10, 1.2)],
    )
    make_run(tmp_path / "2_c", ["lr=0.3"], loss=1.6, bpc=2.1, job=2, curve=[(10, 2.1)])
    rows = make_table(collect_runs([tmp_path])).rows
    assert [(r["lr"], r["rank"], r["status"]) for r in rows] == [
        ("0.1", 1, "completed"),
        ("0.3", 2, "completed"),
        ("0.2", None, "pruned"),
    ]
    assert rows[2]["error"] == "pruned at step 500"  # no error recorded: said from its steps
    assert main([str(tmp_path)]) == 0
    assert "│    - │ 1   │ 0.2 " in capsys.readouterr().out
    # An error the sweeper recorded is shown as it is.
    metrics = json.loads((pruned / "metrics.json").read_text())
    (pruned / "metrics.json").write_text(json.dumps({**metrics, "error": "TrialPruned: step 500"}))
    assert make_table(collect_runs([tmp_path])).rows[2]["error"] == "TrialPruned: step 500"
    fig = plot_figure(tmp_path, tmp_path, monkeypatch)
    assert legend_texts(fig) == ["lr=0.1", "lr=0.3", "lr=0.2 (pruned)"]
    styles = [line.get_linestyle() for line in fig.axes[0].get_lines()]
    assert styles == ["-", "-", ":"]  # rows in table order; the pruned one dotted


# ----------------------------------------------------------------------------- plot x axis


def plot_figure(runs: Path, tmp_path: Path, monkeypatch, *args: str) -> Any:
    """The figure `lmlab-compare --plot` draws, kept instead of saved."""
    kept = []
    monkeypatch.setattr("lmlab.runs.render.save_figure", lambda fig, path: kept.append(fig))
    assert main([str(runs), "--plot", str(tmp_path / "p.png"), *args]) == 0
    return kept[-1]


def legend_texts(fig: Any) -> list[str]:
    (legend,) = fig.legends  # one legend for the figure, below the panels
    return [t.get_text() for t in legend.get_texts()]


def curve_xs(fig: Any) -> list[list[float]]:
    """The x values of each val/loss line, in the order drawn (the table's)."""
    return [list(map(float, line.get_xdata())) for line in fig.axes[0].get_lines()]


def test_plot_x_axis_tokens_is_steps_times_tokens_per_step(
    tmp_path: Path, monkeypatch, caplog
) -> None:
    # 4 sequences of 8 tokens, 2 batches a step: 64 tokens a step.
    config = {"data": {"batch_size": 4, "block_size": 8}, "trainer": {"accumulate_grad_batches": 2}}
    make_run(tmp_path / "a", ["lr=0.1"], loss=1, bpc=1, config=config, curve=[(10, 2), (20, 1)])
    # Without .hydra/config.yaml, the sizes come from the hparams.yaml the logger writes.
    b = make_run(tmp_path / "b", ["lr=0.2"], loss=2, bpc=2, curve=[(10, 3), (30, 2)])
    (b / "hparams.yaml").write_text(yaml.safe_dump({"data": {"batch_size": 2, "block_size": 16}}))

    # Two processes of 4 x 8 tokens a batch (data.batch_size is each process's): 64 a step.
    two = {"data": {"batch_size": 4, "block_size": 8}, "trainer": {"devices": [0, 1]}}
    make_run(tmp_path / "c", ["lr=0.3"], loss=3, bpc=3, config=two, curve=[(5, 4)])
    # `devices: -1` (every GPU there was) does not say how many: left out, with a warning.
    every = {"data": {"batch_size": 4, "block_size": 8}, "trainer": {"devices": -1}}
    make_run(tmp_path / "d", ["lr=0.4"], loss=4, bpc=4, config=every, curve=[(5, 5)])

    with caplog.at_level(logging.WARNING, logger="lmlab"):
        fig = plot_figure(tmp_path, tmp_path, monkeypatch, "--x", "tokens")
    assert curve_xs(fig) == [[640.0, 1280.0], [320.0, 960.0], [320.0]]
    assert fig.axes[0].get_xlabel() == "training tokens"
    assert "left out of the plot: d (tokens per step unknown" in caplog.text
    # The negative control: by step (the default), the same curves sit at their steps.
    xs = curve_xs(plot_figure(tmp_path, tmp_path, monkeypatch))
    assert xs == [[10, 20], [10, 30], [5], [5]]


def test_plot_by_tokens_without_sizes_is_a_clear_error(tmp_path: Path, capsys) -> None:
    make_run(tmp_path / "a", ["lr=0.1"], loss=1.0, bpc=1.4, curve=[(10, 2.0)])
    assert_refused([str(tmp_path), "--plot", str(tmp_path / "p.png"), "--x", "tokens"])
    assert "--x tokens needs data.batch_size and data.block_size" in capsys.readouterr().err


def test_x_without_plot_is_refused(tmp_path: Path, capsys) -> None:
    make_run(tmp_path / "a", ["lr=0.1"], loss=1.0, bpc=1.4)
    assert_refused([str(tmp_path), "--x", "time"])
    assert "--x time sets the plot's x axis: add --plot" in capsys.readouterr().err


def write_timed_curve(run_dir: Path, points: list[tuple[int, float, float]]) -> None:
    """val/loss points `(step, value, wall_time)`, in an event file opened now."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(run_dir))
    for step, value, wall_time in points:
        writer.add_scalar("val/loss", value, step, walltime=wall_time)
    writer.close()


def test_plot_x_axis_time_counts_from_the_runs_first_event(tmp_path: Path, monkeypatch) -> None:
    import time

    a = make_run(tmp_path / "a", ["lr=0.1"], loss=1.0, bpc=1.0)
    # Points logged before the file was opened (a set-back clock): the first point is the
    # first event, so the times are the offsets from it.
    write_timed_curve(a, [(10, 2.0, 1000.0), (20, 1.5, 1010.0), (30, 1.0, 1030.5)])
    b = make_run(tmp_path / "b", ["lr=0.2"], loss=2.0, bpc=2.0)
    opened = time.time()  # the file's first event (its version record) is written when opened
    write_timed_curve(b, [(10, 3.0, opened + 100.0), (20, 2.5, opened + 160.0)])
    after = time.time()

    (xs_a, xs_b) = curve_xs(plot_figure(tmp_path, tmp_path, monkeypatch, "--x", "time"))
    assert xs_a == pytest.approx([0.0, 10.0, 30.5])
    assert 100.0 - (after - opened) - 0.01 <= xs_b[0] <= 100.0 + 0.01
    assert xs_b[1] - xs_b[0] == pytest.approx(60.0)
