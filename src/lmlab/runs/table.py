"""The comparison table: seed groups ranked by one metric, one row each with the means and
standard deviations of the summary metrics, and Welch's test of the best two rows."""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lmlab.errors import LmlabError
from lmlab.runs.collect import RunRecord, natural_key, number_or_none

SEED_KEY = "seed"
# Runs with these statuses have no trustworthy metrics: never grouped, always ranked last.
BROKEN_STATUSES = ("failed", "unknown")
# Summary values shown for every run, in column order; test/* are held-out figures, for
# reporting only: never a default ranking metric.
VAL_KEYS, TEST_KEYS = ("val/loss", "val/bpc", "val/bpb"), ("test/loss", "test/bpc", "test/bpb")
METRIC_KEYS = ("num_params", *VAL_KEYS, *TEST_KEYS, "steps", "tokens_per_sec", "wall_time_sec")
# Newer metrics that older runs lack (and test/* only with `test=true`): shown when a run has one.
OPTIONAL_COLUMNS = ("val/bpb", *TEST_KEYS)
ALPHA = 0.05  # significance level of the best-two comparison; its CI is 1 - ALPHA


@dataclass
class RunGroup:
    """Runs that share one table row (several only when they differ by seed alone)."""

    runs: list[RunRecord]
    ranked: bool  # False: failed, or without a finite metric; such groups go last
    label: str  # its differing overrides (`lr=0.01 seed=1`), else its run's name


@dataclass
class RunTable:
    """What `lmlab-compare` shows: the ranked groups and their rows, best first."""

    metric: str
    higher_is_better: bool
    groups: list[RunGroup]
    rows: list[dict[str, Any]]


def metric_values(runs: Sequence[RunRecord], metric: str) -> list[float]:
    """The runs' values of `metric`, leaving out runs without one or with NaN or inf."""
    return [v for v in (r.value(metric) for r in runs) if v is not None and math.isfinite(v)]


def make_table(
    runs: Sequence[RunRecord],
    metric: str = "val/bpc",
    group_seeds: bool = True,
    higher_is_better: bool = False,
) -> RunTable:
    """Runs grouped (by everything but the seed) and ranked best first; runs that failed or
    lack the metric come last. A row has `rank` (None for runs that are not ranked), `run`,
    `n`, one key per differing override, the metric means and `<metric>_std` (None for a
    single run), `status` and `error`."""
    sources = [source for r in runs for source in r.metric_sources()]
    available = {k for s in sources for k, v in s.items() if number_or_none(v) is not None}
    available.discard("step")
    if available and metric not in available:
        known = ", ".join(sorted(available))
        raise LmlabError(f"no run has the metric {metric!r}; use --metric with one of: {known}")
    # The keys whose values differ between runs: override keys, or flattened config keys
    # when no run has .hydra/overrides.yaml (but not paths.*, which differ per run by design).
    use_overrides = any(r.overrides is not None for r in runs)
    keys = [k for r in runs for k in (r.overrides if use_overrides else r.config) or {}]
    keys = [k for k in keys if use_overrides or not k.startswith("paths.")]
    differ = [k for k in dict.fromkeys(keys) if len({r.param(k, use_overrides) for r in runs}) > 1]

    # Runs that agree on every differing key but the seed share a row, in order of first
    # appearance; broken runs (and every run, without `group_seeds`) are alone.
    grouped: dict[tuple[Any, ...], list[RunRecord]] = {}
    for run in runs:
        key: tuple[Any, ...] = (run.name,)
        if group_seeds and run.status not in BROKEN_STATUSES:
            key = (run.status, tuple(run.param(k, use_overrides) for k in differ if k != SEED_KEY))
        grouped.setdefault(key, []).append(run)
    sign = -1.0 if higher_is_better else 1.0
    ranking = []
    for members in grouped.values():
        first, n = members[0], len(members)
        row: dict[str, Any] = {"rank": None, "run": ", ".join(r.name for r in members), "n": n}
        for key in differ:
            row[key] = ",".join(dict.fromkeys(r.param(key, use_overrides) for r in members))
        nonfinite = []  # NaN or inf values are left out of the means, and said so
        for key in dict.fromkeys([*METRIC_KEYS, metric]):
            values = metric_values(members, key)
            row[key] = statistics.fmean(values) if values else None
            row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else None
            if bad := sum(r.value(key) is not None for r in members) - len(values):
                nonfinite.append(f"{key} not finite in {bad} of {n} runs")
                row[key] = row[key] if values else math.nan  # "nan", not a missing "-"
        row["status"] = first.status
        # The first non-blank line of the error, cut to 80 characters.
        error = first.error if first.status != "completed" else "; ".join(nonfinite) or None
        line = next((ln.strip() for ln in str(error).splitlines() if ln.strip()), "")
        row["error"] = (line if len(line) <= 80 else line[:79] + "…") if error else None

        score = row[metric] if row[metric] is not None else math.nan
        ranked = first.status not in BROKEN_STATUSES and math.isfinite(score)
        keys = [k for k in differ if not (n > 1 and k == SEED_KEY)]
        label = " ".join(f"{k}={first.param(k, use_overrides)}" for k in keys) or first.name
        order = (not ranked, sign * score if ranked else 0.0, natural_key(first.name))
        ranking.append((order, RunGroup(members, ranked, label), row))
    ranking.sort(key=lambda item: item[0])
    for index, (_, group, row) in enumerate(ranking):  # ranked groups first
        row["rank"] = index + 1 if group.ranked else None
    groups, rows = [g for _, g, _ in ranking], [r for _, _, r in ranking]
    return RunTable(metric, higher_is_better, groups, rows)


def table_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The row keys worth showing: `n`, `*_std`, `error` and the optional metrics only where
    they say something."""
    optional = [k for k in rows[0] if k.endswith("_std") or k == "error" or k in OPTIONAL_COLUMNS]
    hidden = {k for k in optional if all(r[k] is None for r in rows)}
    hidden |= {"n"} if all(r["n"] == 1 for r in rows) else set()
    return [k for k in rows[0] if k not in hidden]


@dataclass(frozen=True)
class WelchResult:
    """Welch's comparison of two samples; `difference` is mean(a) - mean(b)."""

    difference: float
    ci_low: float  # confidence interval of the difference, at level 1 - alpha
    ci_high: float
    df: float | None  # Welch-Satterthwaite degrees of freedom; None: zero variance in both
    p_value: float | None  # two-sided; None: the t-test is undefined (zero variance in both)
    alpha: float = ALPHA

    @property
    def significant(self) -> bool:
        return self.p_value is not None and self.p_value < self.alpha


def welch_test(a: Sequence[float], b: Sequence[float], alpha: float = ALPHA) -> WelchResult:
    """Welch's t-test (unequal variances) of two samples of at least two values each, and
    the 1 - alpha confidence interval of the difference of their means."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError("Welch's t-test needs at least two values in each sample")
    sq_a = statistics.variance(a) / len(a)  # squared standard errors of the means; exact 0
    sq_b = statistics.variance(b) / len(b)  # for equal values
    diff = statistics.fmean(a) - statistics.fmean(b)
    # Both variances zero: t = diff / 0, where scipy answers NaN (or p = 0 with a warning).
    if sq_a + sq_b == 0:
        return WelchResult(diff, diff, diff, None, None, alpha)
    from scipy import stats  # here, not at the top: importing scipy slows every command

    df = (sq_a + sq_b) ** 2 / (sq_a**2 / (len(a) - 1) + sq_b**2 / (len(b) - 1))
    half = float(stats.t.ppf(1 - alpha / 2, df)) * math.sqrt(sq_a + sq_b)
    with warnings.catch_warnings():
        # A constant sample (one seed-proof row) is fine here: its variance is exact.
        warnings.filterwarnings("ignore", "Precision loss", RuntimeWarning)
        p_value = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    return WelchResult(diff, diff - half, diff + half, df, p_value, alpha)
