"""The comparison table shown: in the terminal (rich), as CSV, as a Markdown report, and the
runs' training curves (TensorBoard scalars read back, drawn with matplotlib)."""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import os
import re
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from lmlab.atomic_write import atomic_write_bytes, atomic_write_text
from lmlab.errors import LmlabError
from lmlab.runs.collect import PROG
from lmlab.runs.table import (
    SEED_KEY,
    RunTable,
    format_setting,
    metric_values,
    table_columns,
    welch_test,
)

log = logging.getLogger("lmlab")

SINGLE_SEED_MARK = "*"
HEADERS = {"num_params": "params", "tokens_per_sec": "tokens/s", "wall_time_sec": "wall time"}
SAMPLE_TAIL_LINES = 20
CURVE_TAGS = ("val/loss", "train/loss")
# What a curve's points can be plotted against, and the axis label of each.
X_AXES = {"step": "step", "tokens": "training tokens", "time": "seconds since the run's start"}


def format_number(key: str, value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    if key in ("num_params", "tokens_per_sec"):
        for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
            if abs(value) >= scale:
                return f"{value / scale:.2f}{unit}"
        return f"{value:.0f}"
    if key == "steps":
        return f"{value:.0f}"
    if key == "wall_time_sec":
        if value < 60:
            return f"{value:.1f}s"
        minutes, secs = divmod(round(value), 60)
        hours, minutes = divmod(minutes, 60)
        return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
    if 0 < abs(value) < 1e-3:  # four places would show 0.0000: four significant digits
        return f"{value:.4g}"
    return f"{value:.4f}"


def marks_single_seed(rows: Sequence[dict[str, Any]]) -> bool:
    """Whether ranked single-run rows get a mark: beside seed means, one run is one draw."""
    sizes = {r["n"] for r in rows if r["rank"] is not None}
    return 1 in sizes and len(sizes) > 1


def _grid(table: RunTable, raw: bool = False) -> tuple[list[str], list[list[Any]]]:
    """The columns shown and each row's cells: raw values (for CSV: full names and settings),
    else text, with settings rounded (format_setting), sweep jobs by number and a metric's
    `*_std` in the metric's cell (`1.2000 ± 0.0100`)."""
    rows = table.rows
    columns = [c for c in table_columns(rows) if raw or not c.endswith("_std")]
    mark = marks_single_seed(rows)

    def cell(row: dict[str, Any], key: str, names: str) -> Any:
        value, std = row[key], row.get(f"{key}_std")
        if raw:  # counts stay integers ("300", not "300.0"): a mean of integers is a float
            whole = isinstance(value, float) and value.is_integer() and abs(value) < 2**53
            return "" if value is None else int(value) if whole else value
        if key == "run":
            return names
        if key in table.digits:
            return format_setting(value, table.digits[key]) if value != "" else "-"
        if key == "n" and mark and value == 1 and row["rank"] is not None:
            return f"1{SINGLE_SEED_MARK}"
        if value is None or f"{key}_std" not in row:  # missing, or not a metric
            return "-" if value in (None, "") else str(value)
        plain = std is None or (std == 0 and key in ("num_params", "steps"))  # "4.22K ± 0"
        return format_number(key, value) + ("" if plain else f" ± {format_number(key, std)}")

    pairs = zip(rows, table.groups, strict=True)
    return columns, [[cell(row, key, group.names) for key in columns] for row, group in pairs]


def caption(table: RunTable) -> str:
    order = "higher" if table.higher_is_better else "lower"
    mark = f"; {SINGLE_SEED_MARK} single seed" if marks_single_seed(table.rows) else ""
    rows = f"{plural(table.n_runs, 'run')} in {plural(len(table.rows), 'row')}"
    return f"{rows}, ranked by {table.metric} ({order} is better){mark}"


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def print_table(table: RunTable, title: str, console: Console) -> None:
    columns, cells = _grid(table)
    table_view = Table(caption=title, header_style="bold")
    for key in columns:
        numeric = key in ("rank", "n") or f"{key}_std" in table.rows[0]
        justify = "right" if numeric else "left"
        table_view.add_column(HEADERS.get(key, key), justify=justify, overflow="fold")
    for line in cells:
        # Text cells: run names and errors may contain `[...]`, which is rich markup.
        table_view.add_row(*map(Text, line))
    console.print(table_view)


def write_csv(table: RunTable, path: Path) -> None:
    """The rows with full-precision numbers, settings as given and the runs' full names."""
    columns, cells = _grid(table, raw=True)
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([columns, *cells])
    atomic_write_text(path, buffer.getvalue())


def write_markdown(
    table: RunTable, path: Path, title: str, plot: Path | None, note: str | None
) -> None:
    """The report: the table, the significance note, the plot and the best run's samples."""
    columns, cells = _grid(table)

    def line(texts: Iterable[str]) -> str:
        return "| " + " | ".join(t.replace("*", "\\*").replace("|", "\\|") for t in texts) + " |"

    # `*` (the single-seed mark) would start emphasis, and `|` end a cell.
    parts = ["# Run comparison", "", title.replace("*", "\\*"), ""]
    parts += [line(HEADERS.get(k, k) for k in columns), line("---" for _ in columns)]
    parts += [*map(line, cells), ""]
    if note is not None:
        parts += [note.replace("*", "\\*"), ""]
    if plot is not None:
        rel = os.path.relpath(plot.resolve(), path.resolve().parent)
        parts += ["## Validation curves", "", f"![validation curves]({Path(rel).as_posix()})", ""]
    top = table.groups[0]
    if top.ranked:  # the samples of the top row's best run
        sign = -1.0 if table.higher_is_better else 1.0
        runs = [r for r in top.runs if math.isfinite(r.value(table.metric) or math.nan)]
        best = min(runs, key=lambda r: (sign * (r.value(table.metric) or 0.0), r.name))
        file = best.path / "samples.txt"
        text = file.read_text(encoding="utf-8", errors="replace").rstrip() if file.is_file() else ""
        samples = "\n".join(text.splitlines()[-SAMPLE_TAIL_LINES:])
        if samples:
            # A fence longer than any backtick run in the samples, which are model output.
            fence = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", samples)), default=0))
            title = f"## Samples from the best run ({best.name})"
            parts += [title, "", f"{fence}text", samples, fence, ""]
    atomic_write_text(path, "\n".join(parts))


def significance_line(table: RunTable) -> str | None:
    """Whether the best two rows differ by more than seed noise; None without two ranked rows."""
    metric, ranked = table.metric, [g for g in table.groups if g.ranked]
    if len(ranked) < 2:
        return None
    samples = [metric_values(g.runs, metric) for g in ranked[:2]]
    sides = []
    for group, values in zip(ranked[:2], samples, strict=True):
        mean = format_number(metric, statistics.fmean(values))
        spread = f" ± {format_number(metric, statistics.stdev(values))}" if values[1:] else ""
        sides.append(f'"{group.label}" {mean}{spread} ({len(values)} seed{"s" if spread else ""})')
    head = f"best two: {sides[0]} vs {sides[1]}: difference "

    if min(len(v) for v in samples) < 2:
        diff = format_number(metric, statistics.fmean(samples[0]) - statistics.fmean(samples[1]))
        marked = any(len(g.runs) > 1 for g in ranked)
        which = f"single-seed rows (marked {SINGLE_SEED_MARK})" if marked else "single runs"
        return f"{head}{diff}; {which} cannot be told from noise: sweep seed=1,2,3"

    result = welch_test(*samples)
    head += format_number(metric, result.difference)
    if result.p_value is None:  # say so rather than print a NaN p-value
        if result.difference == 0:
            return f"{head}; all runs of both rows have the same value: no difference at all"
        return (
            f"{head}; every seed gave the same value (zero variance), so the t-test is "
            f"undefined: check that {SEED_KEY} changes the run"
        )
    level = round(100 * (1 - result.alpha))
    low, high = (format_number(metric, x) for x in (result.ci_low, result.ci_high))
    verdict = f"more than noise (p < {result.alpha:g})" if result.significant else "within noise"
    return (
        f"{head}, {level}% CI [{low}, {high}], Welch's t-test p = {result.p_value:.2g}: {verdict}"
    )


def read_scalars(run_dir: Path, tags: Sequence[str]) -> dict[str, list[tuple[int, float]]]:
    """`(step, value)` points of the given TensorBoard tags, from the run's event files
    (several files, as after a resume, are merged; a later value for a step wins)."""
    events = read_scalar_events(run_dir, tags)
    return {tag: [(step, value) for step, _, value in points] for tag, points in events.items()}


def read_scalar_events(
    run_dir: Path, tags: Sequence[str]
) -> dict[str, list[tuple[int, float, float]]]:
    """`(step, seconds since the run's first event, value)` points of the given TensorBoard
    tags, as read_scalars merges them. Events carry their wall-clock time; the first event is
    the one a logger writes when it opens its file, as training starts (or an earlier point,
    should a clock have been set back)."""
    # Imported here: only --plot needs tensorboard's reader, and it is slow to import.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folders = [run_dir]
    if not any(run_dir.glob("events.out.tfevents.*")):
        # Other logger settings put event files in a subfolder (e.g. `version_0/`).
        events = run_dir.rglob("events.out.tfevents.*")
        folders = sorted({p.parent for p in events if "checkpoints" not in p.parts})
    points: dict[str, dict[int, tuple[float, float]]] = {tag: {} for tag in tags}
    start = math.inf
    for folder in folders:
        acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every point
        acc.Reload()
        with contextlib.suppress(ValueError):  # raised for a folder without events
            start = min(start, acc.FirstEventTimestamp())
        for tag in points.keys() & set(acc.Tags().get("scalars", [])):
            points[tag].update({e.step: (e.wall_time, e.value) for e in acc.Scalars(tag)})
    start = min([start, *(time for p in points.values() for time, _ in p.values())])
    return {
        tag: [(step, time - start, value) for step, (time, value) in sorted(p.items())]
        for tag, p in points.items()
        if p
    }


def curve_x(
    points: Sequence[tuple[int, float, float]], x: str, tokens_per_step: float | None
) -> list[float]:
    """The points' positions on the x axis: step, tokens trained (step x tokens per step) or
    seconds since the run's first event."""
    if x == "tokens":
        if tokens_per_step is None:
            raise ValueError("tokens need the run's tokens per step")
        return [step * tokens_per_step for step, _, _ in points]
    return [float(seconds if x == "time" else step) for step, seconds, _ in points]


def tokens_per_step(table: RunTable, x: str) -> dict[Path, float | None]:
    """Each run's tokens per step for `--x tokens` (warning about runs without one, which are
    left out of the plot), else {}."""
    if x != "tokens":
        return {}
    sizes = {run.path: run.tokens_per_step() for g in table.groups for run in g.runs}
    missing = [run.name for g in table.groups for run in g.runs if sizes[run.path] is None]
    if len(missing) == len(sizes):
        raise LmlabError(
            "--x tokens needs data.batch_size and data.block_size (and a trainer.devices "
            "count, not -1), read from each run's .hydra/config.yaml or hparams.yaml; no run "
            "has them: use --x step or --x time"
        )
    if missing:
        log.warning(
            "%s: left out of the plot: %s (tokens per step unknown: no data.batch_size and "
            "data.block_size, or trainer.devices=-1)",
            PROG,
            ", ".join(missing),
        )
    return sizes


def plot_curves(table: RunTable, path: Path, x: str = "step") -> None:
    """val/loss (and train/loss, when logged) against step, tokens or time (`x`); one colour
    and one legend entry per row (a row: runs that differ only by seed), in one legend below
    the panels, where long labels (a search's settings) do not squash them. Rows that are not
    ranked (failed, pruned) are dotted."""
    if x not in X_AXES:
        raise LmlabError(f"unknown x axis {x!r}; use one of: {', '.join(X_AXES)}")
    sizes = tokens_per_step(table, x)
    curves = [[read_scalar_events(run.path, CURVE_TAGS) for run in g.runs] for g in table.groups]
    logged = {tag for per_group in curves for c in per_group for tag in c}
    if "val/loss" not in logged:
        raise LmlabError(
            "no run has TensorBoard val/loss points to plot: event files "
            "(events.out.tfevents.*) are written with logger=tensorboard; drop --plot"
        )
    panels = [t for t in CURVE_TAGS if t in logged]
    labels = [group.legend for group in table.groups]
    fig, columns = legend_figure(len(panels), labels)
    colors = group_colors(len(table.groups))
    handles: dict[int, Any] = {}  # one legend entry per row: its first line
    for ax, tag in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        for index, (per_group, group) in enumerate(zip(curves, table.groups, strict=True)):
            for run, run_curves in zip(group.runs, per_group, strict=True):
                if not run_curves.get(tag) or (x == "tokens" and sizes[run.path] is None):
                    continue
                points = run_curves[tag]
                xs, values = curve_x(points, x, sizes.get(run.path)), [v for *_, v in points]
                marker = "o" if len(xs) < 30 else None  # one validation is still a point
                style = "-" if group.ranked else ":"
                (line,) = ax.plot(
                    xs, values, color=colors[index], linestyle=style, marker=marker, markersize=3
                )
                handles.setdefault(index, line)
        ax.set(xlabel=X_AXES[x], ylabel=tag, title=tag)
        if x == "tokens":  # 400k, 1.2M: not 1200000 under every tick
            from matplotlib.ticker import EngFormatter

            ax.xaxis.set_major_formatter(EngFormatter())
        ax.grid(alpha=0.3)
    order = sorted(handles)
    fig.legend(
        [handles[i] for i in order],
        [labels[i] for i in order],
        loc="outside lower center",
        ncols=columns,
        fontsize="small",
        frameon=False,
    )
    save_figure(fig, path)


# Characters of a small legend label per inch of figure width (about 8-point text).
LEGEND_CHARS_PER_INCH = 14


def legend_figure(panels: int, labels: Sequence[str]) -> tuple[Any, int]:
    """A figure for `panels` side by side with room below for a legend of `labels`, and the
    legend's number of columns: as many as fit the width, which grows for a long label."""
    widest = max(map(len, labels), default=0) + 6  # the line sample and the gap
    width = max(6.0 * panels, widest / LEGEND_CHARS_PER_INCH)
    columns = max(1, min(len(labels), int(width * LEGEND_CHARS_PER_INCH // widest)))
    rows = math.ceil(len(labels) / columns)
    return new_figure(width, 4.5 + 0.22 * rows), columns


def group_colors(n: int) -> list[Any]:
    """A distinct colour per row: tab10 or tab20 while they suffice (a search has 20 trials
    or more), else evenly spaced along viridis."""
    from matplotlib import colormaps

    if n <= 20:
        cmap = colormaps["tab10" if n <= 10 else "tab20"]
        return [cmap(i) for i in range(n)]
    cmap = colormaps["viridis"]
    return [cmap(i / (n - 1)) for i in range(n)]


def new_figure(width: float, height: float) -> Any:
    """A matplotlib figure on the Agg canvas directly, not through pyplot: no global backend
    state, and it works without a display."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, path: Path) -> None:
    """Written atomically: a reader never sees half a picture."""
    atomic_write_bytes(path, lambda f: fig.savefig(f, format=path.suffix.lstrip("."), dpi=120))
