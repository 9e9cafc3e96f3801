"""Run directories found under folders and read back: metrics.json (written by `RunSummary`),
and Hydra's overrides and composed config from the run's `.hydra/` folder."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lmlab.errors import LmlabError

log = logging.getLogger("lmlab")

PROG = "lmlab-compare"


@dataclass
class RunRecord:
    """One run directory, as read from disk."""

    path: Path
    name: str  # path relative to the compared directories, for display
    metrics: dict[str, Any]
    status: str
    error: str | None
    overrides: dict[str, str] | None  # None: no .hydra/overrides.yaml
    config: dict[str, str]  # flattened config + group choices

    def metric_sources(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return self.metrics, self.metrics.get("best") or {}

    def value(self, metric: str) -> float | None:
        """A metric from metrics.json: a top-level number, else one of the best-step values."""
        numbers = (number_or_none(source.get(metric)) for source in self.metric_sources())
        return next((n for n in numbers if n is not None), None)

    def param(self, key: str, use_overrides: bool) -> str:
        """The value of an override key, or of a config key when overrides are not compared."""
        if use_overrides and self.overrides is not None and key in self.overrides:
            return self.overrides[key]
        # An override missing here means the run used the config's value for it.
        return self.config.get(key, "")


def read_metrics(run_dir: Path) -> tuple[dict[str, Any], str, str | None]:
    """A run's metrics.json, status and error; the status is "unknown" without the file."""
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}, "unknown", "no metrics.json: stopped before its first validation (see train.log)"
    except (OSError, ValueError) as err:
        return {}, "unknown", f"unreadable metrics.json: {err}"
    if not isinstance(metrics, dict):  # valid JSON, but `[]`, `3`, `"x"` or `null`
        return {}, "unknown", "metrics.json is not a JSON object"
    return metrics, str(metrics.get("status", "unknown")), metrics.get("error")


def _is_run(path: Path) -> bool:
    return (path / "metrics.json").is_file() or (path / ".hydra").is_dir()


def collect_runs(dirs: Iterable[str | Path]) -> list[RunRecord]:
    """Every run directory under `dirs` (at any depth), sorted by name."""
    roots = [Path(d) for d in dirs]
    for root in roots:
        if not root.exists():
            raise LmlabError(f"{root} does not exist; pass a run directory or a sweep/log folder")
        if not root.is_dir():
            raise LmlabError(f"{root} is not a directory; pass the folder that holds the run(s)")

    found: dict[Path, Path] = {}  # resolved run dir -> as found (dedupes overlapping DIRs)
    empty = []
    for root in roots:
        runs = []
        for dirpath, dirnames, _ in os.walk(root):
            if _is_run(Path(dirpath)):
                runs.append(Path(dirpath))
            # Hidden folders (.hydra) and checkpoints never hold runs.
            dirnames[:] = sorted(d for d in dirnames if d[0] != "." and d != "checkpoints")
        if not runs:
            empty.append(root)
        for run in runs:
            found.setdefault(run.resolve(), run)
    if not found:
        raise LmlabError(
            f"no runs found under {', '.join(map(str, roots))}; a run directory contains "
            "metrics.json (written by lmlab-train) and Hydra's .hydra/ folder (and TensorBoard "
            "event files)"
        )
    for root in empty:
        log.warning("%s: no runs found under %s", PROG, root)

    base = Path(os.path.commonpath([r.resolve() for r in roots]))
    base = base.parent if _is_run(base) else base  # one run directory shown by its name, not "."
    records = []
    for resolved, path in found.items():
        name = resolved.relative_to(base).as_posix()
        records.append(RunRecord(path, name, *read_metrics(path), *_read_hydra(path / ".hydra")))
    return sorted(records, key=lambda r: natural_key(r.name))


def natural_key(name: str) -> list[tuple[int, int | str]]:
    """Sweep job folders in numeric order: 2 before 10."""
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", name) if p]


def _load_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, yaml.YAMLError) as err:
        log.warning("%s: skipping unreadable %s: %s", PROG, path, err)
        return None


def _read_hydra(hydra_dir: Path) -> tuple[dict[str, str] | None, dict[str, str]]:
    """The run's overrides (None without overrides.yaml) and its composed config, flattened to
    `a.b.c` keys, plus the config-group choices (`model: gpt`) so that a group override can be
    compared with a run that did not set it."""
    overrides: dict[str, str] | None = None
    if (hydra_dir / "overrides.yaml").is_file():
        overrides = {}
        items = _load_yaml(hydra_dir / "overrides.yaml")  # None for an empty file
        for item in items if isinstance(items, list) else []:
            key, sep, value = str(item).partition("=")
            if key.startswith("~"):  # `~key` deletes a key from the config
                value = "(deleted)"
            elif not sep:
                continue
            key = key.lstrip("+~")
            if not key.startswith("hydra."):  # Hydra's own settings are not experiment settings
                overrides[key] = _canonical(value)

    flat: dict[str, str] = {}

    def flatten(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict) and value:
                flatten(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = _canonical(value)

    if isinstance(config := _load_yaml(hydra_dir / "config.yaml"), dict):
        flatten(config, "")
    if isinstance(hydra_cfg := _load_yaml(hydra_dir / "hydra.yaml"), dict):
        choices = (hydra_cfg.get("hydra") or {}).get("runtime", {}).get("choices") or {}
        flat.update({k: _canonical(v) for k, v in choices.items() if not k.startswith("hydra/")})
    return overrides, flat


def _canonical(value: Any) -> str:
    """One spelling per value, so that `lr=1e-3` on the command line equals `lr: 0.001`."""
    if value is None or isinstance(value, (bool, list, dict)):
        return json.dumps(value)  # null, true, false, or JSON
    text = str(value).strip()
    for parse in (int, float):
        with contextlib.suppress(ValueError):
            return str(parse(text))
    return text


def number_or_none(value: Any) -> float | None:
    return None if isinstance(value, bool) or not isinstance(value, (int, float)) else float(value)
