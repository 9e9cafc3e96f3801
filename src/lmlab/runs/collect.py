"""Run directories found under folders and read back: metrics.json (written by `RunSummary`),
and Hydra's overrides and composed config from the run's `.hydra/` folder."""

from __future__ import annotations

import contextlib
import json
import logging
import math
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
    job: int | None = None  # its job number, when the run is a job of a sweep

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

    @property
    def known_settings(self) -> bool:
        """Whether its settings were read (overrides or config): a run without them cannot be
        said to differ from another only by seed."""
        return self.overrides is not None or bool(self.config)

    @property
    def short_name(self) -> str:
        """The name with a sweep job's folder cut to its number (`sweep/2_model-gpt` ->
        `sweep/2`): the rest spells overrides, which the table shows as columns. Whatever the
        folder name holds after the number (`=`, `-`, `+`, a hash) is not read."""
        head, _, last = self.name.rpartition("/")
        if self.job is None or not (last == str(self.job) or last.startswith(f"{self.job}_")):
            return self.name
        return f"{head}/{self.job}" if head else str(self.job)

    def tokens_per_step(self) -> float | None:
        """Training tokens per optimizer step: data.batch_size (each process's batch) x
        data.block_size x trainer.accumulate_grad_batches x the processes (trainer.devices x
        trainer.num_nodes), from .hydra/config.yaml, else from the hparams.yaml the TensorBoard
        logger writes (which has no trainer.devices: one process assumed). None when a size is
        missing, or the processes are not recorded (`devices: -1`, every GPU there was)."""
        for settings in (self.config, _flat_yaml(self.path / "hparams.yaml")):
            batch = _positive(settings.get("data.batch_size"))
            block = _positive(settings.get("data.block_size"))
            if batch is not None and block is not None:
                devices = _device_count(settings.get("trainer.devices"))
                nodes = _positive(settings.get("trainer.num_nodes")) or 1.0
                accumulate = _positive(settings.get("trainer.accumulate_grad_batches")) or 1.0
                return batch * block * accumulate * devices * nodes if devices else None
        return None


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
        overrides, config, job = _read_hydra(path / ".hydra")
        job = job if job is not None else _job_in_sweep_folder(path)
        records.append(RunRecord(path, name, *read_metrics(path), overrides, config, job))
    return sorted(records, key=lambda r: natural_key(r.name))


# What a Hydra sweeper leaves in the sweep folder: the basic sweeper's multirun.yaml (written
# before the first job), the Optuna sweeper's optimization_results.yaml (after the last).
SWEEP_FILES = ("multirun.yaml", "optimization_results.yaml")


def _job_in_sweep_folder(run_dir: Path) -> int | None:
    """The job number that starts the folder name of a run in a sweep folder (for runs whose
    .hydra/hydra.yaml is missing); None for other runs, whose names may start with digits."""
    match = re.match(r"(\d+)(_|$)", run_dir.name)
    if match is None or not any((run_dir.parent / f).is_file() for f in SWEEP_FILES):
        return None
    return int(match.group(1))


def natural_key(name: str) -> list[tuple[int, int | str]]:
    """Sweep job folders in numeric order: 2 before 10."""
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", name) if p]


def _load_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, yaml.YAMLError) as err:
        log.warning("%s: skipping unreadable %s: %s", PROG, path, err)
        return None


def _read_hydra(hydra_dir: Path) -> tuple[dict[str, str] | None, dict[str, str], int | None]:
    """The run's overrides (None without overrides.yaml), its composed config flattened to
    `a.b.c` keys plus the config-group choices (`model: gpt`, so that a group override can be
    compared with a run that did not set it), and its sweep job number (None for a single
    run), from hydra.yaml."""
    overrides = _read_overrides(hydra_dir / "overrides.yaml")
    flat = _flat_yaml(hydra_dir / "config.yaml")
    hydra_cfg = _load_yaml(hydra_dir / "hydra.yaml")
    hydra = (hydra_cfg.get("hydra") if isinstance(hydra_cfg, dict) else None) or {}
    choices = (hydra.get("runtime") or {}).get("choices") or {}
    flat.update({k: _canonical(v) for k, v in choices.items() if not k.startswith("hydra/")})
    job = None
    if str(hydra.get("mode")) == "MULTIRUN":  # a single run has a job number too: always 0
        job = _whole((hydra.get("job") or {}).get("num"))
    return overrides, flat, job


def _read_overrides(path: Path) -> dict[str, str] | None:
    """`key=value` lines of overrides.yaml as a dict; Hydra's own settings left out."""
    if not path.is_file():
        return None
    overrides = {}
    items = _load_yaml(path)  # None for an empty file
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


def _flat_yaml(path: Path) -> dict[str, str]:
    """A YAML mapping flattened to `a.b.c` keys with canonical values; {} without one."""
    flat: dict[str, str] = {}

    def flatten(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict) and value:
                flatten(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = _canonical(value)

    if isinstance(loaded := _load_yaml(path), dict):
        flatten(loaded, "")
    return flat


def _whole(value: Any) -> int | None:
    try:
        return int(str(value))
    except ValueError:
        return None


def _device_count(value: str | None) -> float | None:
    """Processes per node from trainer.devices as Lightning reads it: a count (`2`), device
    ids (`[0, 1]` or `"0,1"`), absent (the default, 1); None for `-1` or `auto`, whose count
    depends on the machine."""
    if value is None:
        return 1.0
    with contextlib.suppress(ValueError):
        ids = json.loads(value)
        if isinstance(ids, list):
            return float(len(ids)) or None
    if "," in value:
        return float(len([v for v in value.split(",") if v.strip()])) or None
    return _positive(value)


def _positive(value: str | None) -> float | None:
    try:
        number = float(value) if value is not None else math.nan
    except ValueError:
        return None
    return number if math.isfinite(number) and number > 0 else None


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
