"""Run every documented bad input through the real CLI and print a markdown table.

    python scripts/bad_inputs.py > docs/errors-table.md

Each row is one command a user could type: what was wrong, the last line of its stderr (the
one message), its exit status, and whether it stayed clean (exit status 1, no Python
traceback, and `lmlab-...: error:` as the last line). Inputs are made in a temporary
directory, shown as `$TMP`; training runs are a few steps on the CPU. Exits 1 if a row is not
clean, so CI can run it. Needs the corpora in $LMLAB_DATA_DIR and a tiktoken cache in
$TIKTOKEN_CACHE_DIR for the BPE row's contrast (the row itself empties the cache).
"""

from __future__ import annotations

import itertools
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

TINY = ["trainer.accelerator=cpu", "trainer.max_steps=5", "trainer.enable_progress_bar=false"]
TINY_GPT = ["model=gpt", "model.n_layer=1", "model.n_head=2", "model.n_embd=16"]


@dataclass
class Row:
    what: str
    command: str  # the CLI, lmlab-train or lmlab-sample
    args: list[str]
    env: dict[str, str] | None = None


@dataclass
class Result:
    row: Row
    returncode: int
    last_line: str
    traceback: bool

    @property
    def clean(self) -> bool:
        return (
            self.returncode == 1
            and not self.traceback
            and self.last_line.startswith(f"{self.row.command}: error: ")
        )


def cli(command: str) -> list[str]:
    """The installed console script, or the module when it is not on PATH."""
    found = shutil.which(command)
    if found:
        return [found]
    module = {"lmlab-train": "lmlab.train", "lmlab-sample": "lmlab.sample"}[command]
    return [sys.executable, "-m", module]


def run(row: Row, cwd: Path) -> Result:
    env = {**os.environ, **(row.env or {})}
    proc = subprocess.run(
        cli(row.command) + row.args, cwd=cwd, env=env, capture_output=True, text=True
    )
    lines = proc.stderr.strip().splitlines()
    return Result(row, proc.returncode, lines[-1] if lines else "", "Traceback" in proc.stderr)


class RunsCode:
    """Unpickling this calls os.system: a checkpoint crafted to run code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def make_inputs(tmp: Path) -> tuple[list[Row], Path]:
    """The bad inputs (files in `tmp`) and the marker that crafted pickles would create."""
    marker = tmp / "pickle-ran-code"
    (tmp / "empty.txt").write_text("")
    (tmp / "short.txt").write_text("To be, or not to be, that is the question:\n" * 3)
    (tmp / "latin1.txt").write_bytes("Caf\u00e9 cr\u00e8me, na\u00efve\n".encode("latin-1") * 200)
    (tmp / "reviews.tsv").write_text(
        "id\ttext\tlabel\n" + "".join(f"{i}\tgood film number {i}\t1\n" for i in range(300))
    )
    (tmp / "empty_tiktoken_cache").mkdir()

    # a real char checkpoint: a few steps of the bigram on Shakespeare
    good_run = tmp / "good_run"
    subprocess.run(
        cli("lmlab-train") + [*TINY, f"hydra.run.dir={good_run}"],
        cwd=tmp,
        capture_output=True,
        check=True,
    )
    ckpt = good_run / "checkpoints" / "last.ckpt"
    truncated = tmp / "truncated.ckpt"
    truncated.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    (tmp / "notes.ckpt").write_text("these are my notes, not a checkpoint\n")
    with open(tmp / "bare_pickle.ckpt", "wb") as f:
        pickle.dump({"state_dict": {}, "hyper_parameters": RunsCode(marker)}, f)
    torch.save({"state_dict": {}, "hyper_parameters": RunsCode(marker)}, tmp / "crafted.ckpt")

    run_ids = itertools.count()

    def train(what: str, *args: str, env: dict[str, str] | None = None) -> Row:
        run_dir = f"hydra.run.dir={tmp}/runs/{next(run_ids)}"
        return Row(what, "lmlab-train", [*TINY, run_dir, *args], env)

    rows: list[Row] = []
    rows += [
        train("missing corpus file", "data.path=/nonexistent.txt"),
        train("empty corpus file", f"data.path={tmp}/empty.txt"),
        train(  # three lines: validation is the last line (43 characters), under 64 + 1
            "validation part shorter than one block",
            f"data.path={tmp}/short.txt",
            "data.block_size=64",
        ),
        train("bytes that are not UTF-8", f"data.path={tmp}/latin1.txt"),
        train(
            "TSV without the named column",
            f"data.path={tmp}/reviews.tsv",
            "data.text_field=document",
        ),
        train("train_fraction outside (0, 1)", "data.train_fraction=1.5"),
        train(
            "block_size larger than the model takes",
            *TINY_GPT,
            "model.block_size=32",
            "data.block_size=64",
        ),
        train("n_embd not divisible by n_head", "model=gpt", "model.n_embd=100", "model.n_head=3"),
    ]
    sample = [
        ("prompt outside the vocabulary", [f"ckpt_path={ckpt}", "prompt=€λ"]),
        ("sample: checkpoint does not exist", [f"ckpt_path={tmp}/nope.ckpt"]),
        ("sample: truncated checkpoint", [f"ckpt_path={truncated}"]),
        ("sample: not a checkpoint (text file)", [f"ckpt_path={tmp}/notes.ckpt"]),
        ("sample: crafted pickle (bare)", [f"ckpt_path={tmp}/bare_pickle.ckpt"]),
        ("sample: crafted pickle (torch.save zip)", [f"ckpt_path={tmp}/crafted.ckpt"]),
    ]
    rows += [Row(what, "lmlab-sample", [*args, "max_new_tokens=20"]) for what, args in sample]
    rows += [
        train("train: checkpoint does not exist", f"ckpt_path={tmp}/nope.ckpt"),
        train("train: truncated checkpoint", f"ckpt_path={truncated}"),
        train("train: not a checkpoint (text file)", f"ckpt_path={tmp}/notes.ckpt"),
        train("train: crafted pickle (torch.save zip)", f"ckpt_path={tmp}/crafted.ckpt"),
        train("resume on another corpus (names)", f"ckpt_path={ckpt}", "data=names"),
        train(
            "resume on other tokens, same tokenizer",
            f"ckpt_path={ckpt}",
            "data.train_fraction=0.8",  # the same characters, another training split
        ),
        train(
            "BPE encoding not loadable offline",
            "data=shakespeare_bpe",
            env={"TIKTOKEN_CACHE_DIR": str(tmp / "empty_tiktoken_cache")},
        ),
    ]
    return rows, marker


def markdown(results: list[Result], tmp: Path) -> str:
    def cell(text: str) -> str:
        return text.replace(str(tmp), "$TMP").replace("|", "\\|")

    lines = [
        "| input | command | stderr (last line) | exit | clean |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in results:
        args = " ".join(a for a in r.row.args if a not in TINY and not a.startswith("hydra.run"))
        env = " ".join(f"{k}={v}" for k, v in (r.row.env or {}).items())
        command = f"{env} {r.row.command} {args}".strip()
        flag = "yes" if r.clean else ("no: traceback" if r.traceback else "no")
        lines.append(
            f"| {r.row.what} | `{cell(command)}` | {cell(r.last_line)} | {r.returncode} | {flag} |"
        )
    return "\n".join(lines)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="lmlab-bad-inputs-") as name:
        tmp = Path(name)
        rows, marker = make_inputs(tmp)
        results = []
        for row in rows:
            print(f"running: {row.what}", file=sys.stderr)
            results.append(run(row, tmp))
        print(markdown(results, tmp))
        if marker.exists():
            print("\nA crafted pickle ran its code: the marker file was created.")
            return 1
        print(
            f"\n{sum(r.clean for r in results)} of {len(results)} rows clean; no pickle ran code."
        )
    return 0 if all(r.clean for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
