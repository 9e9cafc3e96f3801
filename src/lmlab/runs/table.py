"""The comparison table: seed groups ranked by one metric, one row each with the means and
standard deviations of the summary metrics, and Welch's test of the best two rows."""

from __future__ import annotations

import math
import re
import statistics
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lmlab.errors import LmlabError
from lmlab.runs.collect import RunRecord, natural_key, number_or_none

SEED_KEY = "seed"
# Runs with these statuses have no trustworthy metrics: never grouped, always ranked last. A
# pruned run (an Optuna trial stopped early by the sweeper) has real but partial metrics: its
# best value is from a shorter run, so it cannot rank with finished runs either.
BROKEN_STATUSES = ("failed", "unknown", "pruned")
# Settings (override or config values) that are floats are shown to this many significant
# digits, more only where two values of a column would otherwise look the same.
SIGNIFICANT_DIGITS = 4
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
    ranked: bool  # False: failed, pruned, or without a finite metric; such groups go last
    label: str  # its differing settings (`lr=0.01 seed=1`), else what names the group
    names: str = ""  # its runs' names as the table shows them (`0, 1, 2`)

    @property
    def legend(self) -> str:
        """The label with the number of seeds (`model=gpt (3 seeds)`) and a status other
        than completed (`lr=0.1 (pruned)`), for a plot's legend."""
        notes = []
        if len(self.runs) > 1:
            seeds = {r.param(SEED_KEY, r.overrides is not None) for r in self.runs}
            unit = "seeds" if len(seeds) == len(self.runs) else "runs"  # repeats of one seed
            notes.append(f"{len(self.runs)} {unit}")
        if (status := self.runs[0].status) != "completed":
            notes.append(status)
        return self.label + (f" ({', '.join(notes)})" if notes else "")


@dataclass
class RunTable:
    """What `lmlab-compare` shows: the ranked groups and their rows, best first."""

    metric: str
    higher_is_better: bool
    groups: list[RunGroup]
    rows: list[dict[str, Any]]
    # The settings that differ between runs (columns of the rows), each with the significant
    # digits its float values are shown with.
    digits: dict[str, int] = field(default_factory=dict)

    @property
    def n_runs(self) -> int:
        return sum(len(g.runs) for g in self.groups)


def format_setting(value: str, digits: int = SIGNIFICANT_DIGITS) -> str:
    """A float setting to `digits` significant digits (`0.001014299778430435` -> `0.001014`,
    `1e-05` stays); integers, words, lists and several values (`1,2,3`) as they are."""
    if not re.fullmatch(r"[-+]?(\d+\.\d*|\.\d+|\d+(\.\d*)?[eE][-+]?\d+)", value.strip()):
        return value
    return f"{float(value):.{digits}g}"


def setting_digits(values: Iterable[str]) -> int:
    """The significant digits to show a column's values with: SIGNIFICANT_DIGITS, or more if
    two different values would look the same (an Optuna search may try lr=0.0010142 and
    0.0010138)."""
    distinct = set(values)
    for digits in range(SIGNIFICANT_DIGITS, 18):  # 17 digits tell any two doubles apart
        if len({format_setting(v, digits) for v in distinct}) == len(distinct):
            return digits
    return SIGNIFICANT_DIGITS  # equal floats spelled differently (`1` and `1.0`): no help


def metric_values(runs: Sequence[RunRecord], metric: str) -> list[float]:
    """The runs' values of `metric`, leaving out runs without one or with NaN or inf."""
    return [v for v in (r.value(metric) for r in runs) if v is not None and math.isfinite(v)]


def make_table(
    runs: Sequence[RunRecord],
    metric: str = "val/bpc",
    group_seeds: bool = True,
    higher_is_better: bool = False,
) -> RunTable:
    """Runs grouped (by everything but the seed) and ranked best first; runs that failed, were
    pruned or lack the metric come last. A row has `rank` (None for runs that are not ranked),
    `run`, `n`, one key per differing setting, the metric means and `<metric>_std` (None for a
    single run), `status` and `error`."""
    check_metric(runs, metric)
    # The keys whose values differ between runs: override keys, or flattened config keys
    # when no run has .hydra/overrides.yaml.
    use_overrides = any(r.overrides is not None for r in runs)
    differ = differing_keys(runs, use_overrides)
    digits = {k: setting_digits(r.param(k, use_overrides) for r in runs) for k in differ}
    sign = -1.0 if higher_is_better else 1.0
    ranking = []
    for members in group_runs(runs, differ, use_overrides, group_seeds):
        first = members[0]
        row = make_row(members, differ, use_overrides, metric)
        score = row[metric] if row[metric] is not None else math.nan
        ranked = first.status not in BROKEN_STATUSES and math.isfinite(score)
        label = group_label(members, differ, use_overrides, digits)
        # Sweep jobs by number only when the settings that tell them apart are columns.
        names = ", ".join(r.short_name if differ else r.name for r in members)
        order = (not ranked, sign * score if ranked else 0.0, natural_key(first.name))
        ranking.append((order, RunGroup(members, ranked, label, names), row))
    ranking.sort(key=lambda item: item[0])
    for index, (_, group, row) in enumerate(ranking):  # ranked groups first
        row["rank"] = index + 1 if group.ranked else None
    groups, rows = [g for _, g, _ in ranking], [r for _, _, r in ranking]
    return RunTable(metric, higher_is_better, groups, rows, digits)


def check_metric(runs: Sequence[RunRecord], metric: str) -> None:
    """An LmlabError naming the known metrics when no run has `metric`."""
    sources = [source for r in runs for source in r.metric_sources()]
    available = {k for s in sources for k, v in s.items() if number_or_none(v) is not None}
    available.discard("step")
    if available and metric not in available:
        known = ", ".join(sorted(available))
        raise LmlabError(f"no run has the metric {metric!r}; use --metric with one of: {known}")


def differing_keys(runs: Sequence[RunRecord], use_overrides: bool) -> list[str]:
    """The override keys (else config keys, but not paths.*, which differ per run by design)
    whose values are not the same in every run, in order of first appearance."""
    keys = [k for r in runs for k in (r.overrides if use_overrides else r.config) or {}]
    keys = [k for k in keys if use_overrides or not k.startswith("paths.")]
    return [k for k in dict.fromkeys(keys) if len({r.param(k, use_overrides) for r in runs}) > 1]


def group_runs(
    runs: Sequence[RunRecord], differ: Sequence[str], use_overrides: bool, group_seeds: bool
) -> list[list[RunRecord]]:
    """Runs that agree on every differing key but the seed, in order of first appearance.
    Broken runs, runs whose settings were not read (no .hydra/: nothing says they are alike)
    and every run without `group_seeds` are alone."""
    grouped: dict[tuple[Any, ...], list[RunRecord]] = {}
    for run in runs:
        key: tuple[Any, ...] = (run.name,)
        if group_seeds and run.status not in BROKEN_STATUSES and run.known_settings:
            key = (run.status, tuple(run.param(k, use_overrides) for k in differ if k != SEED_KEY))
        grouped.setdefault(key, []).append(run)
    return list(grouped.values())


def make_row(
    members: Sequence[RunRecord], differ: Sequence[str], use_overrides: bool, metric: str
) -> dict[str, Any]:
    """One table row: the runs' names and settings (exact values), metric means and stds,
    status and the first line of the error."""
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
    error = first.error if first.status != "completed" else "; ".join(nonfinite) or None
    if first.status == "pruned" and not error and (steps := first.value("steps")) is not None:
        error = f"pruned at step {steps:.0f}"
    # The first non-blank line of the error, cut to 80 characters.
    line = next((ln.strip() for ln in str(error).splitlines() if ln.strip()), "")
    row["error"] = (line if len(line) <= 80 else line[:79] + "…") if error else None
    return row


def group_label(
    members: Sequence[RunRecord], differ: Sequence[str], use_overrides: bool, digits: dict[str, int]
) -> str:
    """What names a row: its differing settings (`lr=0.001014 seed=1`; the seed only for a
    single run); for seeds of a setting that nothing else differs from, the overrides they
    share (`model=gpt`), or `default config` when they share none; else the run names."""
    first = members[0]
    keys = [k for k in differ if not (len(members) > 1 and k == SEED_KEY)]
    if keys:
        values = (format_setting(first.param(k, use_overrides), digits[k]) for k in keys)
        return " ".join(f"{k}={v}" for k, v in zip(keys, values, strict=True))
    if len(members) == 1:  # nothing differs between the runs compared
        return first.name
    if all(r.overrides is not None for r in members):
        shared = [
            f"{k}={format_setting(v)}"
            for k, v in (first.overrides or {}).items()
            if k != SEED_KEY and all((r.overrides or {}).get(k) == v for r in members)
        ]
        return " ".join(shared) or "default config"
    return ", ".join(r.short_name for r in members)


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
