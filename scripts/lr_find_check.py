"""Does the learning-rate finder's suggestion train as well as the configured rate?

    python scripts/lr_find_check.py [--experiments shakespeare_gpt_cpu shakespeare_mlp]
        [--steps 500] [--also-lr 1e-3 ...] [--out DIR] [OVERRIDE ...]

For each experiment, two runs through the lmlab-train CLI, same seed and step count: one at
the configured rate, one with `tune.lr_find=true tune.apply=true` (the finder, then training
at its suggestion); each --also-lr adds a run at that fixed rate. It prints the suggestion,
each run's val/loss at the last step and where the finder's plot is (docs/lr_finder.md).
Extra arguments are lmlab-train overrides for every run. CPU-heavy: minutes per run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def lmlab_train(run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """One lmlab-train run in `run_dir`; its metrics.json, or exit with its output's tail."""
    command = [sys.executable, "-m", "lmlab.train", f"hydra.run.dir={run_dir}", *overrides]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    metrics_path = run_dir / "metrics.json"
    if done.returncode != 0 or not metrics_path.is_file():
        tail = (done.stdout + done.stderr)[-4000:]
        sys.exit(f"lmlab-train failed ({done.returncode}): {' '.join(command)}\n{tail}")
    metrics = json.loads(metrics_path.read_text())
    metrics["check_wall_sec"] = time.perf_counter() - start
    return metrics


def check(
    experiment: str, steps: int, also_lrs: list[float], out: Path, extra: list[str]
) -> dict[str, Any]:
    base = [
        f"experiment={experiment}",
        f"trainer.max_steps={steps}",
        "trainer.enable_progress_bar=false",
        *extra,
    ]
    runs: dict[str, list[str]] = {
        "configured": base,
        "lr_find": [*base, "tune.lr_find=true", "tune.apply=true"],
        **{f"lr={lr:g}": [*base, f"model.optimizer.lr={lr}"] for lr in also_lrs},
    }
    results: dict[str, dict[str, Any]] = {}
    for name, overrides in runs.items():
        run_dir = out / experiment / name.replace("=", "_")
        print(f"[{experiment}] {name}: lmlab-train {' '.join(overrides)}", flush=True)
        results[name] = lmlab_train(run_dir, overrides)
        results[name]["run_dir"] = str(run_dir)

    found = results["lr_find"]["lr_find"]
    lines = [
        f"== {experiment}, {steps} steps ==",
        f"suggestion: {found['suggestion']:.3g} (configured {found['configured']:.3g}, "
        f"applied: {found['applied']})",
    ]
    for name, metrics in results.items():
        rate = found["suggestion"] if name == "lr_find" else None
        label = f"{name} ({rate:.3g})" if rate else name
        lines.append(
            f"val/loss at step {metrics['last'].get('step')}: {metrics['last']['val/loss']:.4f}"
            f"  {label}  [{metrics['check_wall_sec']:.0f}s]"
        )
    configured = results["configured"]["last"]["val/loss"]
    suggested = results["lr_find"]["last"]["val/loss"]
    verdict = "at least as well as" if suggested <= configured else "WORSE than"
    lines.append(
        f"the suggestion trains {verdict} the configured rate ({suggested - configured:+.4f})"
    )
    lines.append(f"plot: {Path(results['lr_find']['run_dir']) / 'lr_find.png'}")
    print("\n".join(lines), flush=True)
    return {"experiment": experiment, "suggestion": found["suggestion"], "runs": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiments", nargs="+", default=["shakespeare_gpt_cpu"])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--also-lr", type=float, action="append", default=[], metavar="LR")
    parser.add_argument("--out", type=Path, help="run directories (default: a new temp dir)")
    args, extra = parser.parse_known_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="lr_find_check-"))
    print(f"runs in {out}", flush=True)
    for experiment in args.experiments:
        check(experiment, args.steps, args.also_lr, out, extra)


if __name__ == "__main__":
    main()
