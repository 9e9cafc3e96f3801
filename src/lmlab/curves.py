"""Training curves of runs: TensorBoard scalars read back, and drawn with matplotlib."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from lmlab.errors import LmlabError


def read_scalars(run_dir: Path, tags: Sequence[str]) -> dict[str, list[tuple[int, float]]]:
    """`(step, value)` points of the given TensorBoard tags, from the run's event files
    (several files, as after a resume, are merged; a later value for a step wins)."""
    # Imported here: only --plot needs tensorboard's reader, and it is slow to import.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points: dict[str, dict[int, float]] = {tag: {} for tag in tags}
    for folder in _event_dirs(run_dir):
        acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every point
        acc.Reload()
        available = set(acc.Tags().get("scalars", []))
        for tag in tags:
            if tag in available:
                points[tag].update({e.step: e.value for e in acc.Scalars(tag)})
    return {tag: sorted(p.items()) for tag, p in points.items() if p}


def _event_dirs(run_dir: Path) -> list[Path]:
    if any(run_dir.glob("events.out.tfevents.*")):
        return [run_dir]
    # Other logger settings put event files in a subfolder (e.g. `version_0/`).
    return sorted(
        {p.parent for p in run_dir.rglob("events.out.tfevents.*") if "checkpoints" not in p.parts}
    )


def plot_curves(run_groups: Sequence[Sequence[Path]], labels: Sequence[str], path: Path) -> None:
    """val/loss (and train/loss, when logged) against step; one colour and one legend entry
    per group of run directories (a group: runs that differ only by seed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tags = ("val/loss", "train/loss")
    curves = [[read_scalars(run_dir, tags) for run_dir in group] for group in run_groups]
    if not any("val/loss" in c for per_group in curves for c in per_group):
        raise LmlabError(
            "no run has TensorBoard val/loss points to plot: event files "
            "(events.out.tfevents.*) are written with logger=tensorboard; drop --plot"
        )
    panels = [t for t in tags if any(t in c for per_group in curves for c in per_group)]
    # The Agg canvas directly, not pyplot: no global backend state, works without a display.
    fig = Figure(figsize=(6 * len(panels), 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, tag in zip(axes, panels, strict=True):
        for index, (per_group, label) in enumerate(zip(curves, labels, strict=True)):
            color = f"C{index % 10}"
            labelled = False  # a seed group: one legend entry for all its lines
            for points in (c.get(tag) for c in per_group):
                if points:
                    steps, values = zip(*points, strict=True)
                    # markers: a run validated once is still a visible point
                    marker = "o" if len(steps) < 30 else None
                    ax.plot(
                        steps,
                        values,
                        color=color,
                        marker=marker,
                        markersize=3,
                        label=None if labelled else label,
                    )
                    labelled = True
        ax.set_xlabel("step")
        ax.set_ylabel(tag)
        ax.set_title(tag)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, format=path.suffix.lstrip("."), dpi=120)
        os.replace(tmp, path)  # a reader never sees half a picture
    finally:
        tmp.unlink(missing_ok=True)
