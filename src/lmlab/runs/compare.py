"""`lmlab-compare DIR [DIR ...]`: rank, tabulate and plot every run found under the DIRs: the
overrides that differ between runs become columns, and runs that differ only by seed share a row."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from lmlab.cli import refuse
from lmlab.errors import LmlabError
from lmlab.runs import render
from lmlab.runs.collect import PROG, collect_runs
from lmlab.runs.table import make_table

PLOT_SUFFIXES = (".png", ".svg", ".pdf")
EXAMPLE_NAMES = {"--csv": "table.csv", "--markdown": "report.md", "--plot": "curves.png"}


def check_output(option: str, path: Path) -> None:
    """Refuse an output path that cannot be written, before anything is written. Missing
    folders are made, so the test is on the nearest folder that exists."""
    if path.is_dir():
        example = path / EXAMPLE_NAMES[option]
        raise LmlabError(f"{option} {path} is a directory; give a file name, e.g. {example}")
    folder = next((p for p in path.absolute().parents if p.exists()), Path.cwd())
    if not folder.is_dir():
        raise LmlabError(f"{option} {path}: {folder} is a file; give a path in a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise LmlabError(f"{option} {path}: cannot write in {folder}; give a writable folder")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Rank, tabulate and plot the runs found under each DIR (a run directory, "
        "a Hydra sweep folder or a whole log folder); runs that differ only by seed share a row. "
        "The settings that differ between runs (read from each run's .hydra/overrides.yaml) are "
        "columns; the terminal and Markdown tables and the plot's legend show float settings to "
        "4 significant digits, and a sweep's jobs by their number.",
    )
    add = parser.add_argument
    add("dirs", nargs="+", metavar="DIR", help="folder(s) to search for runs")
    add("--metric", default="val/bpc", help="metrics.json value to rank by (default: val/bpc)")
    add("--higher-is-better", action="store_true", help="largest value first (e.g. tokens_per_sec)")
    add("--no-group", dest="group_seeds", action="store_false", help="one row per run")
    add(
        "--csv",
        type=Path,
        metavar="FILE",
        help="also write the table as CSV, at full precision: exact settings and metric values, "
        "full run names",
    )
    add("--markdown", type=Path, metavar="FILE", help="also write a Markdown report, with samples")
    add("--plot", type=Path, metavar="FILE.png", help="write validation (and training) loss curves")
    add(
        "--x",
        choices=list(render.X_AXES),
        help="with --plot, the x axis: optimizer step (default), training tokens (step x "
        "data.batch_size x data.block_size x trainer.accumulate_grad_batches) or wall-clock "
        "seconds since the run's first TensorBoard event",
    )
    args = parser.parse_args(argv)
    # Wide output when piped: a narrow default would fold every column.
    console = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 200)
    say = functools.partial(console.print, markup=False, highlight=False)
    try:
        if args.plot is not None and args.plot.suffix.lower() not in PLOT_SUFFIXES:
            message = f"--plot {args.plot}: unknown image type; end the name with one of "
            raise LmlabError(message + ", ".join(PLOT_SUFFIXES))
        if args.x is not None and args.plot is None:
            raise LmlabError(f"--x {args.x} sets the plot's x axis: add --plot FILE.png")
        for option in EXAMPLE_NAMES:
            if (path := getattr(args, option[2:])) is not None:
                check_output(option, path)
        runs = collect_runs(args.dirs)
        table = make_table(runs, args.metric, args.group_seeds, args.higher_is_better)
        title = render.caption(table)
        render.print_table(table, title, console)
        # With --no-group every row is one run by request: "single seed" would be no news.
        note = render.significance_line(table) if args.group_seeds else None
        if note is not None:
            say(note)
        if args.csv is not None:
            render.write_csv(table, args.csv)
            say(f"wrote {args.csv}")
        if args.plot is not None:
            render.plot_curves(table, args.plot, args.x or "step")
            say(f"wrote {args.plot}")
        if args.markdown is not None:
            render.write_markdown(table, args.markdown, title, args.plot, note)
            say(f"wrote {args.markdown}")
    except LmlabError as err:
        refuse(PROG, err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
