"""`lmlab-train ckpt_path=<run>/checkpoints/last.ckpt` continues that run, in its directory.

A checkpoint inside an lmlab run directory brings the run's own overrides (its
`.hydra/overrides.yaml`: `model=gpt`, a sweep job's swept values, ...) and its directory
(`hydra.run.dir`), so the line `continue with: lmlab-train ckpt_path=...` that a stopped run
prints works when pasted as it is, and the resumed run's curves continue in the same TensorBoard run
instead of starting a new one. What is typed on the command line wins over what was saved.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

# Saved overrides that are not carried over: the checkpoint to resume is the one given now,
# and Hydra's own settings belong to the earlier command.
NOT_CARRIED = ("ckpt_path", "hydra.")
SWEEP_FLAGS = ("-m", "--multirun")


def resume_arguments(args: list[str]) -> list[str]:
    """`args` (the command line after the program name), with the saved overrides of the run
    that holds `ckpt_path` put in front, and its directory as `hydra.run.dir`. Unchanged when
    there is no such run, in a sweep (each job has its own directory), or when
    `hydra.run.dir` is given."""
    ckpt = _last_value(args, "ckpt_path")
    if ckpt is None or any(a in SWEEP_FLAGS for a in args):
        return args
    run_dir = run_directory_of(ckpt)
    if run_dir is None or _last_value(args, "hydra.run.dir") is not None:
        return args
    try:
        saved = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) or []
    except (OSError, yaml.YAMLError):
        return args  # not readable as a run's overrides: the checkpoint alone is resumed
    if not isinstance(saved, list):
        return args
    typed = {_key(a) for a in args if "=" in a}
    carried = [
        str(o) for o in saved if not str(o).startswith(NOT_CARRIED) and _key(str(o)) not in typed
    ]
    _keep_earlier_config(run_dir)
    print(f"lmlab-train: continuing {run_dir} ({' '.join(carried) or 'its defaults'})")
    return [*carried, *args, f"hydra.run.dir={_quoted(run_dir)}"]


def run_directory_of(ckpt: str) -> Path | None:
    """The lmlab run directory that holds checkpoint `ckpt` (`<run>/checkpoints/x.ckpt`,
    with `<run>/.hydra/overrides.yaml`), or None."""
    path = Path(ckpt.removeprefix("file://")).absolute()
    run_dir = path.parent.parent
    if path.parent.name != "checkpoints" or not (run_dir / ".hydra" / "overrides.yaml").is_file():
        return None
    return run_dir


def _keep_earlier_config(run_dir: Path) -> None:
    """Hydra writes the resumed run's `.hydra/*.yaml` over the earlier ones: keep those in
    `.hydra/before-resume-N/`."""
    hydra_dir = run_dir / ".hydra"
    number = 1 + sum(1 for p in hydra_dir.glob("before-resume-*") if p.is_dir())
    keep = hydra_dir / f"before-resume-{number}"
    keep.mkdir()
    for saved in hydra_dir.glob("*.yaml"):
        shutil.copy2(saved, keep / saved.name)


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _last_value(args: list[str], key: str) -> str | None:
    values = [a.split("=", 1)[1] for a in args if "=" in a and _key(a) == key]
    return values[-1] if values else None


def _quoted(path: Path) -> str:
    """A path as one Hydra override value: quoted, as it may hold characters of the grammar."""
    return '"' + str(path).replace("\\", "\\\\").replace('"', '\\"') + '"'
