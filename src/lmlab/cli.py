"""What lmlab's command lines share: `key=value` arguments taken literally (lmlab-sample,
lmlab-eval), one way to refuse bad input, and lmlab-train's `--help`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from lmlab.errors import LmlabError


def refuse(prog: str, err: BaseException) -> NoReturn:
    """One line on stderr and exit status 1; the traceback only with HYDRA_FULL_ERROR=1 (the
    variable Hydra uses for the same purpose in lmlab-train)."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise err
    print(f"{prog}: error: {err}", file=sys.stderr)
    sys.exit(1)


def parse_key_values(
    prog: str, description: str, keys: dict[str, str], argv: Sequence[str]
) -> dict[str, str]:
    """`key=value` arguments as strings, split at the first `=` and otherwise untouched: a
    value (a prompt, a path) is never parsed, quoted or resolved. `keys` maps each accepted key
    to its help text."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog="keys: " + "; ".join(f"{k}: {v}" for k, v in keys.items()),
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    values: dict[str, str] = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in keys:
            raise LmlabError(f"unknown argument {item!r}; {prog} takes {', '.join(keys)}")
        values[key] = value
    return values


def number(values: dict[str, str], key: str, kind: Callable[[str], float | int], default):
    """`values[key]` read as `kind` (int or float); `null`/`none` is None; a clear error."""
    if key not in values:
        return default
    text = values[key]
    if text.strip().lower() in ("null", "none"):
        return None
    try:
        return kind(text)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise LmlabError(f"{key} must be {what}, got {text!r}") from None


def log_to_stderr() -> None:
    """lmlab's log lines (warnings, progress) as plain messages on stderr."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger("lmlab").addHandler(handler)
    logging.getLogger("lmlab").setLevel(logging.INFO)


# What each config group chooses, for --help.
GROUP_HELP = {
    "callbacks": "what runs alongside training",
    "data": "the corpus and its tokenizer",
    "debug": "shortened runs for checking that things work",
    "experiment": "named, reproducible experiments",
    "hparams_search": "an Optuna search, run with -m",
    "logger": "where curves go; logger=[tensorboard,csv] for several",
    "model": "the rung of the ladder",
    "paths": "where runs and corpora live",
    "trainer": "device and strategy",
}
EXAMPLES = (
    "lmlab-train                                    the tutorial's bigram on tiny Shakespeare",
    "lmlab-train experiment=shakespeare_gpt_cpu     a small GPT, minutes on a laptop CPU",
    "lmlab-train model=gpt data=names trainer.max_steps=2000",
    "lmlab-train -m model=bigram,mlp,gpt trainer.max_steps=300     a sweep: one run each",
    "lmlab-train -m hparams_search=shakespeare_optuna              an Optuna search",
    "lmlab-train ckpt_path=runs/train/<run>/checkpoints/last.ckpt  resume a run",
)


def train_help() -> str:
    """`lmlab-train --help`: lmlab's config groups and experiments, and a few examples.
    Hydra's own help lists the groups by copying its whole config repository once per group,
    which takes most of a second; this reads the installed config tree."""
    from importlib.resources import files

    root = files("lmlab.conf")
    lines = []
    for group in sorted(d.name for d in root.iterdir() if d.is_dir() and d.name != "hydra"):
        folder = root.joinpath(group)
        # base.yaml is what the other options of a group build on, not an option
        names = sorted(f.name[:-5] for f in folder.iterdir() if f.name.endswith(".yaml"))
        names = [n for n in names if n != "base"]
        if group == "experiment":
            continue
        lines.append(f"  {group:<15} {', '.join(names)}")
        if group in GROUP_HELP:
            lines.append(f"  {'':<15} {GROUP_HELP[group]}")
    experiments = [
        f"  {f.name[:-5]:<22} {_first_comment(f.read_text())}"
        for f in sorted(root.joinpath("experiment").iterdir(), key=lambda f: f.name)
        if f.name.endswith(".yaml")
    ]
    return "\n".join(
        [
            "lmlab-train: train a language model: one run, or with -m a Hydra sweep.",
            "",
            "usage: lmlab-train [group=option ...] [key=value ...] [-m] [--cfg job]",
            "",
            "Config groups (group=option):",
            *lines,
            "",
            "Experiments (experiment=NAME):",
            *experiments,
            "",
            "Examples:",
            *(f"  {e}" for e in EXAMPLES),
            "",
            "Any key of the composed config can be set: lmlab-train model=gpt model.n_embd=64",
            "  --cfg job        print the composed config (with your overrides) and exit",
            "  -m a=1,2 b=x,y   a sweep: one run per combination",
            "  print_config=false   do not print the config tree at start",
            "  --hydra-help     Hydra's own options (launchers, ...)",
            "",
            "Tab completion of groups and keys (bash; zsh and fish alike):",
            '  eval "$(lmlab-train -sc install=bash)"',
        ]
    )


def _first_comment(text: str) -> str:
    """An experiment's first comment line (up to a colon), as its one-line description."""
    comments = [line[1:].strip() for line in text.splitlines() if line.startswith("#")]
    comments = [c for c in comments if not c.startswith("@package")]
    first = (comments or [""])[0].split(": ")[0].rstrip(".,;")
    return first if len(first) <= 70 else first[:67].rsplit(" ", 1)[0] + " ..."
