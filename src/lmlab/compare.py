"""`lmlab-compare DIR [DIR ...]`: rank, tabulate and plot every run found under the DIRs.

A run directory holds `metrics.json` (written by `RunSummary`), Hydra's `.hydra/` folder
and TensorBoard event files. Runs are ranked by one metric; the overrides that differ
between runs become columns, and runs that differ only by `seed` share one row.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import re
import statistics
import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table
from rich.text import Text

from lmlab.curves import plot_curves
from lmlab.errors import LmlabError
from lmlab.files import atomic_write_text

log = logging.getLogger("lmlab")

PROG = "lmlab-compare"
SEED_KEY = "seed"
# Summary values shown for every run, in column order: metrics.json key -> header.
METRIC_COLUMNS = {
    "num_params": "params",
    "val/loss": "val/loss",
    "val/bpc": "val/bpc",
    "val/bpb": "val/bpb",
    # Held-out test figures, for reporting only: never a default ranking metric.
    "test/loss": "test/loss",
    "test/bpc": "test/bpc",
    "test/bpb": "test/bpb",
    "steps": "steps",
    "tokens_per_sec": "tokens/s",
    "wall_time_sec": "wall time",
}
COUNT_KEYS = ("num_params", "steps")
# Newer metrics that older runs lack (and test/* only with `test=true`): shown when a run has one.
OPTIONAL_COLUMNS = ("val/bpb", "test/loss", "test/bpc", "test/bpb")
ALPHA = 0.05  # significance level of the best-two comparison; its CI is 1 - ALPHA
SINGLE_SEED_MARK = "*"
# Runs with these statuses have no trustworthy metrics: never grouped, always ranked last.
BROKEN_STATUSES = ("failed", "unknown")
ERROR_WIDTH = 80
SAMPLE_TAIL_LINES = 20
PLOT_SUFFIXES = (".png", ".svg", ".pdf")
RUN_HINT = (
    "a run directory contains metrics.json (written by lmlab-train) and Hydra's .hydra/ folder"
)


@dataclass
class RunRecord:
    """One run directory, as read from disk."""

    path: Path
    name: str  # path relative to the compared directories, for display
    status: str
    metrics: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, str] | None = None  # None: no .hydra/overrides.yaml
    config: dict[str, str] = field(default_factory=dict)  # flattened config + group choices
    error: str | None = None

    def value(self, metric: str) -> float | None:
        """A metric from metrics.json: a top-level number, else one of the best-step values."""
        for source in (self.metrics, self.metrics.get("best") or {}):
            number = _number(source.get(metric))
            if number is not None:
                return number
        return None

    def param(self, key: str, use_overrides: bool) -> str:
        """The value of an override key, or of a config key when overrides are not compared."""
        if use_overrides and self.overrides is not None and key in self.overrides:
            return self.overrides[key]
        # An override missing here means the run used the config's value for it.
        return self.config.get(key, "")


@dataclass
class RunGroup:
    """Runs that share one table row (several only when they differ by seed alone)."""

    runs: list[RunRecord]
    score: float | None  # the ranking metric (mean over the runs); None: ranked last


# ----------------------------------------------------------------------------- discovery


def collect_runs(dirs: Iterable[str | Path]) -> list[RunRecord]:
    """Every run directory under `dirs` (at any depth), sorted by name."""
    roots = [Path(d) for d in dirs]
    if not roots:
        raise LmlabError(f"no directory given; usage: {PROG} DIR [DIR ...]")
    for root in roots:
        if not root.exists():
            raise LmlabError(f"{root} does not exist; pass a run directory or a sweep/log folder")
        if not root.is_dir():
            raise LmlabError(f"{root} is not a directory; pass the folder that holds the run(s)")

    found: dict[Path, Path] = {}  # resolved run dir -> as found (dedupes overlapping DIRs)
    empty = []
    for root in roots:
        runs = _find_run_dirs(root)
        if not runs:
            empty.append(root)
        for run in runs:
            found.setdefault(run.resolve(), run)
    if not found:
        where = ", ".join(str(r) for r in roots)
        raise LmlabError(f"no runs found under {where}; {RUN_HINT} (and TensorBoard event files)")
    for root in empty:
        log.warning("%s: no runs found under %s", PROG, root)

    base = _display_base([r.resolve() for r in roots])
    records = [_read_run(path, _relative_name(resolved, base)) for resolved, path in found.items()]
    return sorted(records, key=lambda r: _natural_key(r.name))


def _natural_key(name: str) -> list[tuple[int, int | str]]:
    """Sweep job folders in numeric order: 2 before 10."""
    parts = re.split(r"(\d+)", name)
    return [(0, int(p)) if p.isdigit() else (1, p) for p in parts if p]


def _find_run_dirs(root: Path) -> list[Path]:
    runs = []
    for dirpath, dirnames, filenames in os.walk(root):
        if "metrics.json" in filenames or ".hydra" in dirnames:
            runs.append(Path(dirpath))
        # Hidden folders (.hydra) and checkpoints never hold runs.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "checkpoints")
    return runs


def _display_base(roots: list[Path]) -> Path:
    base = Path(os.path.commonpath(roots))
    # A single run directory is shown by its own name rather than ".".
    return base.parent if _is_run_dir(base) else base


def _is_run_dir(path: Path) -> bool:
    return (path / "metrics.json").is_file() or (path / ".hydra").is_dir()


def _relative_name(path: Path, base: Path) -> str:
    rel = path.relative_to(base).as_posix()
    return rel if rel != "." else path.name


def _read_run(path: Path, name: str) -> RunRecord:
    record = RunRecord(path=path, name=name, status="unknown")
    metrics_file = path / "metrics.json"
    if metrics_file.is_file():
        try:
            record.metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
            record.status = str(record.metrics.get("status", "unknown"))
            record.error = record.metrics.get("error")
        except (OSError, ValueError) as err:
            record.error = f"unreadable metrics.json: {err}"
    else:
        record.error = "no metrics.json: stopped before its first validation (see train.log)"
    record.overrides = _read_overrides(path / ".hydra" / "overrides.yaml")
    record.config = _read_config(path / ".hydra")
    return record


def _load_yaml(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        log.warning("%s: skipping unreadable %s: %s", PROG, path, err)
        return None


def _read_overrides(path: Path) -> dict[str, str] | None:
    items = _load_yaml(path)
    if items is None:
        return {} if path.is_file() else None  # an empty file: a run with no overrides
    overrides = {}
    for item in items if isinstance(items, list) else []:
        key, sep, value = str(item).partition("=")
        if key.startswith("~"):  # `~key` deletes a key from the config
            value = "(deleted)"
        elif not sep:
            continue
        key = key.lstrip("+~")
        if not key.startswith("hydra."):  # Hydra's own settings are not experiment settings
            overrides[key] = _canonical(value)
    return overrides


def _read_config(hydra_dir: Path) -> dict[str, str]:
    """The composed config, flattened to `a.b.c` keys, plus the config-group choices
    (`model: gpt`) so that a group override can be compared with a run that did not set it."""
    flat: dict[str, str] = {}
    config = _load_yaml(hydra_dir / "config.yaml")
    if isinstance(config, dict):
        _flatten(config, "", flat)
    hydra_cfg = _load_yaml(hydra_dir / "hydra.yaml")
    if isinstance(hydra_cfg, dict):
        choices = (hydra_cfg.get("hydra") or {}).get("runtime", {}).get("choices") or {}
        flat.update({k: _canonical(v) for k, v in choices.items() if not k.startswith("hydra/")})
    return flat


def _flatten(node: dict[str, Any], prefix: str, out: dict[str, str]) -> None:
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            _flatten(value, f"{name}.", out)
        else:
            out[name] = _canonical(value)


def _canonical(value: Any) -> str:
    """One spelling per value, so that `lr=1e-3` on the command line equals `lr: 0.001`."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    text = str(value).strip()
    for parse in (int, float):
        try:
            return str(parse(text))
        except ValueError:
            pass
    return text


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


# ----------------------------------------------------------------------------- table


def differing_keys(runs: Sequence[RunRecord]) -> tuple[list[str], bool]:
    """The override keys whose values differ between runs (and whether they are override
    keys: when no run has `.hydra/overrides.yaml`, flattened config keys are compared)."""
    use_overrides = any(r.overrides is not None for r in runs)
    keys: dict[str, None] = {}  # ordered set, in the order users wrote the overrides
    for run in runs:
        source = run.overrides if use_overrides else run.config
        for key in source or {}:
            if use_overrides or not key.startswith("paths."):  # paths differ per run by design
                keys[key] = None
    differ = [k for k in keys if len({r.param(k, use_overrides) for r in runs}) > 1]
    return differ, use_overrides


def rank_groups(
    runs: Sequence[RunRecord],
    metric: str = "val/bpc",
    group_seeds: bool = True,
    higher_is_better: bool = False,
) -> list[RunGroup]:
    """Runs grouped (by everything but the seed) and sorted best first; runs that failed
    or lack the metric come last."""
    available = _available_metrics(runs)
    if available and metric not in available:
        raise LmlabError(
            f"no run has the metric {metric!r}; use --metric with one of: " + ", ".join(available)
        )
    keys, use_overrides = differing_keys(runs)
    groups: dict[tuple[Any, ...], list[RunRecord]] = {}
    for run in runs:
        if group_seeds and run.status not in BROKEN_STATUSES:
            same = tuple(run.param(k, use_overrides) for k in keys if k != SEED_KEY)
            key: tuple[Any, ...] = ("group", run.status, same)
        else:
            key = ("single", run.name)
        groups.setdefault(key, []).append(run)

    ranked = [RunGroup(members, _group_score(members, metric)) for members in groups.values()]
    sign = -1.0 if higher_is_better else 1.0

    def order(group: RunGroup) -> tuple[int, float, list[tuple[int, int | str]]]:
        position = _rank_position(group)
        score = sign * group.score if position == 0 and group.score is not None else 0.0
        return (position, score, _natural_key(group.runs[0].name))

    return sorted(ranked, key=order)


def _rank_position(group: RunGroup) -> int:
    """0 for a group that is ranked, 1 for one that goes last (failed, or no metric)."""
    broken = group.runs[0].status in BROKEN_STATUSES
    return int(broken or group.score is None or not math.isfinite(group.score))


def _group_score(runs: list[RunRecord], metric: str) -> float | None:
    values = [v for v in (r.value(metric) for r in runs) if v is not None]
    return statistics.fmean(values) if values else None


def _available_metrics(runs: Sequence[RunRecord]) -> list[str]:
    names: dict[str, None] = {}
    for run in runs:
        for source in (run.metrics, run.metrics.get("best") or {}):
            names.update({k: None for k, v in source.items() if _number(v) is not None})
    names.pop("step", None)
    return sorted(names)


def build_table(
    runs: Sequence[RunRecord],
    metric: str = "val/bpc",
    group_seeds: bool = True,
    higher_is_better: bool = False,
) -> list[dict[str, Any]]:
    """The comparison table, best first: one dict per row with `rank` (None for runs that
    are not ranked), `run`, `n`, one key per differing override, the metric means and
    `<metric>_std` (None for a single run), `status` and `error`."""
    groups = rank_groups(runs, metric, group_seeds, higher_is_better)
    return rows_from_groups(groups, differing_keys(runs), metric)


def rows_from_groups(
    groups: Sequence[RunGroup], keys: tuple[list[str], bool], metric: str
) -> list[dict[str, Any]]:
    differ, use_overrides = keys
    metric_keys = _metric_keys(metric)
    rows = []
    rank = 0
    for group in groups:
        first = group.runs[0]
        ranked = _rank_position(group) == 0
        rank += ranked
        row: dict[str, Any] = {
            "rank": rank if ranked else None,
            "run": ", ".join(r.name for r in group.runs),
            "n": len(group.runs),
        }
        for key in differ:
            values = dict.fromkeys(r.param(key, use_overrides) for r in group.runs)
            row[key] = ",".join(values)
        for key in metric_keys:
            values = [v for v in (r.value(key) for r in group.runs) if v is not None]
            row[key] = statistics.fmean(values) if values else None
            row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else None
        row["status"] = first.status
        row["error"] = _short_error(first.error) if first.status != "completed" else None
        rows.append(row)
    return rows


def _metric_keys(metric: str) -> list[str]:
    return list(METRIC_COLUMNS) + ([metric] if metric not in METRIC_COLUMNS else [])


def _short_error(error: str | None) -> str | None:
    if not error:
        return None
    line = next((ln.strip() for ln in str(error).splitlines() if ln.strip()), "")
    return line if len(line) <= ERROR_WIDTH else line[: ERROR_WIDTH - 1] + "…"


def table_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The row keys worth showing: `n`, `*_std`, `error` and the optional metrics only where
    they say something."""
    if not rows:
        return []
    columns = []
    for key in rows[0]:
        if key == "n" and all(r["n"] == 1 for r in rows):
            continue
        optional = key.endswith("_std") or key == "error" or key in OPTIONAL_COLUMNS
        if optional and all(r[key] is None for r in rows):
            continue
        columns.append(key)
    return columns


# ----------------------------------------------------------------------------- formatting


def _format_cell(row: dict[str, Any], key: str, mark_single: bool = False) -> str:
    value = row.get(key)
    if key == "n" and mark_single and value == 1 and row["rank"] is not None:
        return f"1{SINGLE_SEED_MARK}"
    if key in ("rank", "n", "run", "status", "error") or not _is_metric_key(row, key):
        return "-" if value in (None, "") else str(value)
    if value is None:
        return "-"
    std = row.get(f"{key}_std")
    text = _format_number(key, value)
    if std is None or (std == 0 and key in COUNT_KEYS):  # "4.22K ± 0" params says nothing
        return text
    return f"{text} ± {_format_number(key, std)}"


def _is_metric_key(row: dict[str, Any], key: str) -> bool:
    return f"{key}_std" in row


def _format_number(key: str, value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    if key == "num_params":
        return _si(value)
    if key == "tokens_per_sec":
        return _si(value)
    if key == "steps":
        return f"{value:.0f}"
    if key == "wall_time_sec":
        return _duration(value)
    return f"{value:.4f}"


def _si(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _display_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    return [c for c in table_columns(rows) if not c.endswith("_std")]


def marks_single_seed(rows: Sequence[dict[str, Any]]) -> bool:
    """Whether ranked single-run rows get a mark: beside seed means, one run is one draw."""
    sizes = {r["n"] for r in rows if r["rank"] is not None}
    return 1 in sizes and len(sizes) > 1


def _header(key: str) -> str:
    return METRIC_COLUMNS.get(key, key)


def print_table(rows: Sequence[dict[str, Any]], caption: str, console: Console) -> None:
    table = Table(caption=caption, header_style="bold")
    columns = _display_columns(rows)
    mark = marks_single_seed(rows)
    for key in columns:
        numeric = key in ("rank", "n") or key in METRIC_COLUMNS or _is_metric_key(rows[0], key)
        table.add_column(_header(key), justify="right" if numeric else "left", overflow="fold")
    for row in rows:
        # Text cells: run names and errors may contain `[...]`, which is rich markup.
        table.add_row(*(Text(_format_cell(row, key, mark)) for key in columns))
    console.print(table)


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    columns = table_columns(rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(row.get(k)) for k in columns})
    atomic_write_text(path, buffer.getvalue())


def _csv_value(value: Any) -> Any:
    """Counts stay integers ("300", not "300.0"): a group mean of integers is a float."""
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    columns = _display_columns(rows)
    mark = marks_single_seed(rows)

    def line(cells: Iterable[str]) -> str:
        return "| " + " | ".join(_md_escape(c).replace("|", "\\|") for c in cells) + " |"

    out = [line(_header(k) for k in columns), line("---" for _ in columns)]
    out += [line(_format_cell(row, k, mark) for k in columns) for row in rows]
    return "\n".join(out)


def _md_escape(text: str) -> str:
    """`*` (the single-seed mark) would start emphasis in Markdown."""
    return text.replace("*", "\\*")


def write_markdown(
    rows: Sequence[dict[str, Any]],
    path: Path,
    caption: str,
    best: RunRecord | None,
    plot: Path | None,
    note: str | None = None,
) -> None:
    parts = ["# Run comparison", "", _md_escape(caption), "", markdown_table(rows), ""]
    if note is not None:
        parts += [_md_escape(note), ""]
    if plot is not None:
        rel = os.path.relpath(plot.resolve(), path.resolve().parent)
        parts += ["## Validation curves", "", f"![validation curves]({Path(rel).as_posix()})", ""]
    samples = read_samples_tail(best.path) if best is not None else None
    if best is not None and samples:
        # A fence longer than any backtick run in the samples, which are model output.
        fence = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", samples)), default=0))
        title = f"## Samples from the best run ({best.name})"
        parts += [title, "", f"{fence}text", samples, fence, ""]
    atomic_write_text(path, "\n".join(parts))


def read_samples_tail(run_dir: Path, lines: int = SAMPLE_TAIL_LINES) -> str | None:
    """The last lines of the run's samples file (`samples.txt`), if it wrote one."""
    path = run_dir / "samples.txt"
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8", errors="replace").rstrip()
    return "\n".join(text.splitlines()[-lines:]) or None


def group_label(group: RunGroup, differ: Sequence[str], use_overrides: bool) -> str:
    """A run's label: its differing overrides (`lr=0.01 seed=1`), else its name."""
    label = _group_name(group, differ, use_overrides)
    return f"{label} (n={len(group.runs)})" if len(group.runs) > 1 else label


def _group_name(group: RunGroup, differ: Sequence[str], use_overrides: bool) -> str:
    first = group.runs[0]
    keys = [k for k in differ if not (len(group.runs) > 1 and k == SEED_KEY)]
    return " ".join(f"{k}={first.param(k, use_overrides)}" for k in keys) or first.name


# ----------------------------------------------------------------------------- significance


@dataclass(frozen=True)
class WelchResult:
    """Welch's comparison of two samples; `difference` is mean(a) - mean(b)."""

    mean_a: float
    std_a: float
    n_a: int
    mean_b: float
    std_b: float
    n_b: int
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
    mean_a, mean_b = statistics.fmean(a), statistics.fmean(b)
    var_a, var_b = statistics.variance(a), statistics.variance(b)  # exact 0 for equal values
    sq_a, sq_b = var_a / len(a), var_b / len(b)  # squared standard errors of the means
    df: float | None = None
    p_value: float | None = None
    half = 0.0
    # Both variances zero: t = diff / 0, where scipy answers NaN (or p = 0 with a warning).
    if sq_a + sq_b > 0:
        from scipy import stats  # here, not at the top: scipy costs every command ~0.5 s

        df = (sq_a + sq_b) ** 2 / (sq_a**2 / (len(a) - 1) + sq_b**2 / (len(b) - 1))
        half = float(stats.t.ppf(1 - alpha / 2, df)) * math.sqrt(sq_a + sq_b)
        with warnings.catch_warnings():
            # A constant sample (one seed-proof row) is fine here: its variance is exact.
            warnings.filterwarnings("ignore", "Precision loss", RuntimeWarning)
            p_value = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    diff = mean_a - mean_b
    return WelchResult(
        mean_a=mean_a,
        std_a=math.sqrt(var_a),
        n_a=len(a),
        mean_b=mean_b,
        std_b=math.sqrt(var_b),
        n_b=len(b),
        difference=diff,
        ci_low=diff - half,
        ci_high=diff + half,
        df=df,
        p_value=p_value,
        alpha=alpha,
    )


def significance_line(
    groups: Sequence[RunGroup], keys: tuple[list[str], bool], metric: str
) -> str | None:
    """Whether the best two rows differ by more than seed noise; None without two ranked rows."""
    best = [g for g in groups if _rank_position(g) == 0][:2]
    if len(best) < 2:
        return None
    samples = [[v for r in g.runs if (v := r.value(metric)) is not None] for g in best]
    sides = []
    for group, values in zip(best, samples, strict=True):
        mean = _format_number(metric, statistics.fmean(values))
        spread = f" ± {_format_number(metric, statistics.stdev(values))}" if values[1:] else ""
        seeds = f"{len(values)} seed{'s' if values[1:] else ''}"
        sides.append(f'"{_group_name(group, *keys)}" {mean}{spread} ({seeds})')
    head = f"best two: {sides[0]} vs {sides[1]}: difference "

    if min(len(v) for v in samples) < 2:
        diff = _format_number(metric, statistics.fmean(samples[0]) - statistics.fmean(samples[1]))
        marked = any(len(g.runs) > 1 for g in groups if _rank_position(g) == 0)
        which = f"single-seed rows (marked {SINGLE_SEED_MARK})" if marked else "single runs"
        return f"{head}{diff}; {which} cannot be told from noise: sweep seed=1,2,3"

    result = welch_test(*samples)
    head += _format_number(metric, result.difference)
    if result.p_value is None:  # say so rather than print a NaN p-value
        if result.difference == 0:
            return f"{head}; all runs of both rows have the same value: no difference at all"
        return (
            f"{head}; every seed gave the same value (zero variance), so the t-test is "
            f"undefined: check that {SEED_KEY} changes the run"
        )
    level = round(100 * (1 - result.alpha))
    low, high = (_format_number(metric, x) for x in (result.ci_low, result.ci_high))
    verdict = f"more than noise (p < {result.alpha:g})" if result.significant else "within noise"
    return (
        f"{head}, {level}% CI [{low}, {high}], Welch's t-test p = {result.p_value:.2g}: {verdict}"
    )


# ----------------------------------------------------------------------------- command


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Rank, tabulate and plot the runs found under each DIR (a run directory, "
        "a Hydra sweep folder or a whole log folder).",
    )
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="folder(s) to search for runs")
    parser.add_argument(
        "--metric",
        default="val/bpc",
        help="metrics.json value to rank by (default: val/bpc; e.g. val/loss, val/ppl)",
    )
    parser.add_argument(
        "--higher-is-better",
        action="store_true",
        help="rank the largest value first (e.g. for --metric tokens_per_sec)",
    )
    parser.add_argument(
        "--no-group",
        dest="group_seeds",
        action="store_false",
        help="one row per run, even for runs that differ only by seed",
    )
    parser.add_argument("--csv", type=Path, metavar="FILE", help="also write the table as CSV")
    parser.add_argument(
        "--markdown",
        type=Path,
        metavar="FILE",
        help="also write a Markdown report: the table, the plot and the best run's samples",
    )
    parser.add_argument(
        "--plot",
        type=Path,
        metavar="FILE.png",
        help="write validation (and training) loss curves of all runs",
    )
    return parser


def compare(args: argparse.Namespace, console: Console) -> None:
    if args.plot is not None and args.plot.suffix.lower() not in PLOT_SUFFIXES:
        raise LmlabError(
            f"--plot {args.plot}: unknown image type; end the name with one of "
            + ", ".join(PLOT_SUFFIXES)
        )
    runs = collect_runs(args.dirs)
    groups = rank_groups(runs, args.metric, args.group_seeds, args.higher_is_better)
    keys = differing_keys(runs)
    rows = rows_from_groups(groups, keys, args.metric)

    order = "higher" if args.higher_is_better else "lower"
    caption = f"{len(runs)} runs in {len(rows)} rows, ranked by {args.metric} ({order} is better)"
    if marks_single_seed(rows):
        caption += f"; {SINGLE_SEED_MARK} single seed"
    print_table(rows, caption, console)
    # With --no-group every row is one run by request: "single seed" would be no news.
    note = significance_line(groups, keys, args.metric) if args.group_seeds else None
    if note is not None:
        _say(console, note)
    if args.csv is not None:
        write_csv(rows, args.csv)
        _say(console, f"wrote {args.csv}")
    if args.plot is not None:
        labels = [group_label(g, *keys) for g in groups]
        plot_curves([[run.path for run in g.runs] for g in groups], labels, args.plot)
        _say(console, f"wrote {args.plot}")
    if args.markdown is not None:
        best = best_run(groups, args.metric, args.higher_is_better)
        write_markdown(rows, args.markdown, caption, best, args.plot, note)
        _say(console, f"wrote {args.markdown}")


def _say(console: Console, message: str) -> None:
    console.print(message, markup=False, highlight=False)


def best_run(groups: Sequence[RunGroup], metric: str, higher_is_better: bool) -> RunRecord | None:
    """The best single run of the top row (the report shows its samples)."""
    if not groups or _rank_position(groups[0]) != 0:
        return None
    sign = -1.0 if higher_is_better else 1.0
    scored = [(sign * v, r.name, r) for r in groups[0].runs if (v := r.value(metric)) is not None]
    return min(scored)[2] if scored else None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Wide output when piped: a narrow default would fold every column.
    wide = sys.stdout.isatty() or "COLUMNS" in os.environ
    console = Console(width=None if wide else 200)
    try:
        compare(args, console)
    except LmlabError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
