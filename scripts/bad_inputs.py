"""Run every documented bad input through the real CLI and print a markdown table.

    python scripts/bad_inputs.py > docs/errors-table.md

    python scripts/bad_inputs.py --docs docs/errors.md   # rewrite the table in that page

Each row is one command a user could type, with the message fragment and exit status it must
give: what was wrong, the last line of its stderr (the one message), its exit status, and
whether it stayed clean (the expected exit status and fragment, no Python traceback, and for a
refusal `lmlab-...: error:` as the last line). A few rows are not refusals (exit 0) and check
stdout instead. tests/test_bad_inputs_table.py runs the same table, so the docs cannot drift
from the tests. Inputs are made in a temporary directory, shown as `$TMP`; training runs are a
few steps on the CPU. Exits 1 if a row is not clean, so CI can run it. Needs the corpora in
$LMLAB_DATA_DIR and a tiktoken cache in $TIKTOKEN_CACHE_DIR for the BPE row's contrast (the row
itself empties the cache).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import itertools
import json
import os
import pickle
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from lmlab.atomic_write import host_name

TINY = ["trainer.accelerator=cpu", "trainer.max_steps=5", "trainer.enable_progress_bar=false"]
LITERAL_PROMPT = '"${oc.env:HOME}" said "hi", ok='
TINY_GPT = ["model=gpt", "model.n_layer=1", "model.n_head=2", "model.n_embd=16"]
MODULES = {
    "lmlab-train": "lmlab.train",
    "lmlab-sample": "lmlab.sample",
    "lmlab-eval": "lmlab.evaluate",
    "lmlab-compare": "lmlab.runs.compare",
}
TABLE_HEADER = "| input | command | message (last line of stderr) | exit | clean |"


@dataclass
class Row:
    what: str  # the input, in a few words (also the test id)
    command: str  # the CLI: lmlab-train, lmlab-sample, lmlab-eval or lmlab-compare
    args: list[str]
    env: dict[str, str] | None = None
    expect: str = ""  # a fragment of the message (stderr; stdout when `stream` says so)
    status: int = 1  # the exit status: 1 for a refusal
    stream: str = "stderr"  # where `expect` is looked for; "stdout" for rows that are no refusal
    skip: str | None = None  # why this row cannot run here (then it is not run)
    xfail: str | None = None  # why this row is known not to be clean yet (a bug in src/)
    # A fault row makes its fault before the command (returns why it cannot, or None), may
    # send the command a signal (`interrupt`), checks what is left afterwards (returns what
    # is wrong, or None) and undoes what `prepare` made (a mount).
    prepare: Callable[[], str | None] | None = None
    interrupt: Interrupt | None = None
    check: Callable[[], str | None] | None = None
    finish: Callable[[], None] | None = None


@dataclass
class Interrupt:
    """Send `signum` to the command once `ready()` holds (polled every 10 ms)."""

    signum: signal.Signals
    ready: Callable[[], bool]


@dataclass
class Result:
    row: Row
    returncode: int
    stdout: str
    stderr: str
    check_failed: str | None = None  # what a fault row found wrong afterwards
    not_run: str | None = None  # why a fault row's fault could not be made here

    @property
    def last_line(self) -> str:
        lines = self.stderr.strip().splitlines()
        return lines[-1] if lines else ""

    @property
    def traceback(self) -> bool:
        return "Traceback" in self.stderr

    @property
    def message(self) -> str:
        """What the row is about: the last stderr line or, for a row that is no refusal, the
        line with the fragment."""
        if self.not_run:
            return f"not run here: {self.not_run}"
        if self.row.status == 0:
            text = self.stdout if self.row.stream == "stdout" else self.stderr
            hits = [line for line in text.splitlines() if self.row.expect in line]
            line = " ".join((hits[0] if hits else "").split())
            line = re.sub(r"^\[[^]]*\]\[[^]]*\]\[INFO\] - ", "", line)  # a log line's time
            return f"stdout: {line}" if self.row.stream == "stdout" else line
        return self.last_line

    @property
    def message_line(self) -> bool:
        """A refusal ends on `prog: error: ...`; a signal's end on `prog: ...`."""
        if self.row.status == 0:
            return True
        prefix = "error: " if self.row.status == 1 else ""
        return self.last_line.startswith(f"{self.row.command}: {prefix}")

    @property
    def clean(self) -> bool:
        text = self.stdout if self.row.stream == "stdout" else self.stderr
        return (
            self.returncode == self.row.status
            and not self.check_failed
            and not self.traceback
            and self.row.expect in text
            and self.message_line
        )


def cli(command: str) -> list[str]:
    """The installed console script, or the module when it is not on PATH."""
    found = shutil.which(command)
    if found:
        return [found]
    return [sys.executable, "-m", MODULES[command]]


def run(row: Row, cwd: Path) -> Result:
    if row.prepare and (why := row.prepare()):
        return Result(row, -1, "", "", not_run=why)
    try:
        env = {**os.environ, **(row.env or {})}
        env.pop("COLUMNS", None)  # lmlab-compare's table is 200 wide when piped: one line a run
        proc = subprocess.Popen(
            cli(row.command) + row.args,
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        if row.interrupt:
            while proc.poll() is None and not row.interrupt.ready():
                time.sleep(0.01)
            if proc.poll() is None:
                proc.send_signal(row.interrupt.signum)
        stdout, stderr = proc.communicate()
        result = Result(row, proc.returncode, stdout, stderr)
        if row.check:
            result.check_failed = row.check()
        return result
    finally:
        if row.finish:
            row.finish()


def run_all(rows: list[Row], cwd: Path, workers: int = 2, log: bool = False) -> list[Result]:
    """Every row that is not skipped, `workers` at a time, in the table's order."""

    def one(row: Row) -> Result:
        if log:
            print(f"running: {row.what}", file=sys.stderr)
        return run(row, cwd)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, [row for row in rows if not row.skip]))


class RunsCode:
    """Unpickling this calls os.system: a checkpoint crafted to run code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def make_inputs(tmp: Path) -> tuple[list[Row], Path]:
    """Make the bad inputs (files in `tmp`); the rows, and the marker crafted pickles would
    create."""
    marker = tmp / "pickle-ran-code"
    (tmp / "empty.txt").write_text("")
    (tmp / "short.txt").write_text("To be, or not to be, that is the question:\n" * 3)
    (tmp / "latin1.txt").write_bytes("Caf\u00e9 cr\u00e8me, na\u00efve\n".encode("latin-1") * 200)
    (tmp / "reviews.tsv").write_text(
        "id\ttext\tlabel\n" + "".join(f"{i}\tgood film number {i}\t1\n" for i in range(300))
    )
    (tmp / "empty_tiktoken_cache").mkdir()
    (tmp / "a_directory").mkdir()
    os.mkfifo(tmp / "a_fifo")
    (tmp / "compare_list_json" / "run1").mkdir(parents=True)
    (tmp / "compare_list_json" / "run1" / "metrics.json").write_text("[1, 2, 3]\n")

    # a seed group whose second run diverged: NaN val/loss (lmlab-compare leaves it out)
    for seed, loss in ((1, 1.5), (2, float("nan")), (3, 1.7)):
        run = tmp / "compare_nan" / f"seed{seed}"
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "overrides.yaml").write_text(f"- model=gpt\n- seed={seed}\n")
        metrics = {"status": "completed", "val/loss": loss, "val/bpc": loss / 0.693, "steps": 20}
        (run / "metrics.json").write_text(json.dumps(metrics))
    # a corpus holding every character of the literal-prompt row's prompt
    (tmp / "quotes.txt").write_text(f"{LITERAL_PROMPT} So she said.\n" * 400)
    subprocess.run(
        cli("lmlab-train") + [*TINY, f"data.path={tmp}/quotes.txt", f"hydra.run.dir={tmp}/quotes"],
        cwd=tmp,
        capture_output=True,
        check=True,
    )

    # a real char checkpoint: a few steps of the bigram on Shakespeare (all sample/eval rows)
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

    # the real checkpoint with one thing in its hyper_parameters wrong
    good = torch.load(ckpt, map_location="cpu", weights_only=False)

    def crafted(name: str, change) -> None:
        checkpoint = copy.deepcopy(good)
        change(checkpoint["hyper_parameters"])
        torch.save(checkpoint, tmp / name)

    def n_head_string(hp: dict) -> None:
        hp["model_name"] = "gpt"
        hp["model_hparams"] = {
            "block_size": 8,
            "vocab_size": 65,
            "n_layer": 1,
            "n_head": "2",
            "n_embd": 16,
        }

    crafted("n_head_string.ckpt", n_head_string)
    crafted("no_chars.ckpt", lambda hp: hp["tokenizer_state"].pop("chars"))
    crafted("huge_vocab.ckpt", lambda hp: hp["model_hparams"].update(vocab_size=100_000_000_000))
    return table(tmp), marker


def table(tmp: Path) -> list[Row]:
    """The rows, for inputs made in `tmp` by make_inputs (this makes nothing)."""
    ckpt = tmp / "good_run" / "checkpoints" / "last.ckpt"
    run_ids = itertools.count()

    def train(what: str, *args: str, expect: str, env: dict[str, str] | None = None) -> Row:
        run_dir = f"hydra.run.dir={tmp}/runs/{next(run_ids)}"
        return Row(what, "lmlab-train", [*TINY, run_dir, *args], env, expect)

    def sample(what: str, *args: str, expect: str) -> Row:
        return Row(what, "lmlab-sample", [*args, "max_new_tokens=20"], expect=expect)

    def evaluate(what: str, *args: str, expect: str) -> Row:
        return Row(what, "lmlab-eval", list(args), expect=expect)

    def compare(what: str, *args: str, expect: str, **kw) -> Row:
        return Row(what, "lmlab-compare", list(args), expect=expect, **kw)

    not_ckpt = "is not a usable lmlab checkpoint"
    rows: list[Row] = [
        Row(  # not a refusal: the prompt reaches the tokenizer byte for byte, nothing resolved
            "sample: a prompt with ${...}, quotes, commas and =",
            "lmlab-sample",
            [f"ckpt_path={tmp}/quotes/checkpoints/last.ckpt", f"prompt={LITERAL_PROMPT}"]
            + ["max_new_tokens=5"],
            expect=LITERAL_PROMPT,
            status=0,
            stream="stdout",
        ),
        Row(
            "run directory under a file",
            "lmlab-train",
            [*TINY, f"paths.log_dir={tmp}/notes.ckpt"],
            expect="cannot write the run directory",
        ),
    ]
    rows += [
        train(
            "missing corpus file",
            "data.path=/nonexistent.txt",
            expect="corpus file not found: /nonexistent.txt",
        ),
        train("empty corpus file", f"data.path={tmp}/empty.txt", expect="has no text"),
        train(  # three lines: validation is the last line (43 characters), under 64 + 1
            "validation part shorter than one block",
            f"data.path={tmp}/short.txt",
            "data.block_size=64",
            expect="fewer than one block of 64 + 1",
        ),
        train(
            "bytes that are not UTF-8",
            f"data.path={tmp}/latin1.txt",
            expect="is not valid UTF-8",
        ),
        train(
            "TSV without the named column",
            f"data.path={tmp}/reviews.tsv",
            "data.text_field=document",
            expect="has no column 'document'",
        ),
        train(
            "train_fraction outside (0, 1)",
            "data.train_fraction=1.5",
            expect="data.train_fraction must be between 0 and 1",
        ),
        train(
            "block_size larger than the model takes",
            *TINY_GPT,
            "model.block_size=32",
            "data.block_size=64",
            expect="is longer than model.block_size (32)",
        ),
        train(
            "n_embd not divisible by n_head",
            "model=gpt",
            "model.n_embd=100",
            "model.n_head=3",
            expect="must be divisible by model.n_head (3)",
        ),
    ]
    rows += [
        sample(
            "prompt outside the vocabulary",
            f"ckpt_path={ckpt}",
            "prompt=€λ",
            expect="not in the checkpoint's vocabulary",
        ),
        sample(
            "sample: checkpoint does not exist",
            f"ckpt_path={tmp}/nope.ckpt",
            expect="checkpoint not found",
        ),
        sample(
            "sample: truncated checkpoint", f"ckpt_path={tmp}/truncated.ckpt", expect="truncated"
        ),
        sample(
            "sample: not a checkpoint (text file)",
            f"ckpt_path={tmp}/notes.ckpt",
            expect="is not a checkpoint",
        ),
        sample(
            "sample: crafted pickle (bare)",
            f"ckpt_path={tmp}/bare_pickle.ckpt",
            expect="was refused and not unpickled",
        ),
        sample(
            "sample: crafted pickle (torch.save zip)",
            f"ckpt_path={tmp}/crafted.ckpt",
            expect="was refused and not loaded",
        ),
    ]
    rows += [
        train(
            "train: checkpoint does not exist",
            f"ckpt_path={tmp}/nope.ckpt",
            expect="checkpoint not found",
        ),
        train("train: truncated checkpoint", f"ckpt_path={tmp}/truncated.ckpt", expect="truncated"),
        train(
            "train: not a checkpoint (text file)",
            f"ckpt_path={tmp}/notes.ckpt",
            expect="is not a checkpoint",
        ),
        train(
            "train: crafted pickle (torch.save zip)",
            f"ckpt_path={tmp}/crafted.ckpt",
            expect="was refused and not loaded",
        ),
        train(
            "resume on another corpus (names)",
            f"ckpt_path={ckpt}",
            "trainer.max_steps=10",  # past the checkpoint's step 5, or that is refused first
            "data=names",
            expect="it was trained with another tokenizer",
        ),
        train(
            "resume on other tokens, same tokenizer",
            f"ckpt_path={ckpt}",
            "trainer.max_steps=10",
            "data.train_fraction=0.8",  # the same characters, another training split
            expect="it was trained on another corpus",
        ),
        train(
            "BPE encoding not loadable offline",
            "data=shakespeare_bpe",
            env={"TIKTOKEN_CACHE_DIR": str(tmp / "empty_tiktoken_cache")},
            expect="cannot load the tiktoken encoding",
        ),
    ]

    def setting(key: str, value: str, expect: str = "is not allowed") -> Row:
        return train(f"{key}={value}", f"{key}={value}", expect=f"{key}{expect}")

    rows += [
        setting("model.optimizer.lr", "-0.01", "=-0.01 is not allowed"),
        setting("model.optimizer.betas", "[1.5,0.9]", "=[1.5, 0.9] is not allowed"),
        setting("data.val_batch_size", "-1", "=-1 is not allowed"),
        setting("trainer.val_check_interval", "0", "=0 is not allowed"),
        setting("data.batch_size", "1.5", "=1.5 is not allowed"),
        setting("data.encoding_errors", "bogus", "='bogus' is not allowed"),
        setting(
            "data.encoding_errors",
            "surrogateescape",
            "='surrogateescape' is not allowed: it decodes bad bytes to lone surrogates",
        ),
        setting("data.normalize", "bogus", "='bogus' is not allowed"),
        train(
            "misspelt data key (+data.blok_size=8)",
            "+data.blok_size=8",
            expect="did you mean data.block_size?",
        ),
        setting("data.block_size", "abc", "='abc' is not allowed"),
        setting("data.stride", "0", "=0 is not allowed"),
        Row(
            "trainer=gpu without a CUDA GPU",
            "lmlab-train",
            [*TINY[1:], f"hydra.run.dir={tmp}/runs/{next(run_ids)}", "trainer=gpu"],
            expect="trainer.accelerator=gpu but this machine has no CUDA GPU",
            skip="this machine has a CUDA GPU" if torch.cuda.is_available() else None,
        ),
        setting("trainer.max_steps", "0", "=0 trains nothing"),
        train(
            "unexpanded ${HOME} in data.path",
            "data.path=${HOME}/x.txt",  # one argv element: no shell expands it
            expect="${HOME} is not a config key",
        ),
        train(
            "data.path is a directory",
            f"data.path={tmp}/a_directory",
            expect="is a directory; give data.path=FILE",
        ),
        train(
            "data.path is a FIFO",
            f"data.path={tmp}/a_fifo",
            expect="is not a regular file (a FIFO or device)",
        ),
        train(
            "train: file:// checkpoint URL that does not exist",
            f"ckpt_path=file://{tmp}/missing.ckpt",
            expect=f"checkpoint not found: {tmp}/missing.ckpt",
        ),
        train(
            "resume with max_steps at or below the checkpoint's step",
            f"ckpt_path={ckpt}",
            "trainer.max_steps=3",
            expect="it is at step 5 and trainer.max_steps=3, so there is nothing to train",
        ),
        setting("data.quoting", "bogus", "='bogus' is not allowed"),
        train(
            "data.examples=bogus",
            "data.examples=bogus",
            expect="data.examples must be one of ('random', 'sliding', 'documents'), got 'bogus'",
        ),
        train(
            "data.sampling disagrees with data.examples",
            "data.sampling=sliding",
            "data.examples=random",
            expect="data.examples=random and data.sampling=sliding disagree",
        ),
    ]
    rows += [
        sample(
            "sample: temperature=nan",
            f"ckpt_path={ckpt}",
            "temperature=nan",
            expect="temperature must be 0 (greedy) or more, got nan",
        ),
        Row(
            "sample: max_new_tokens=1.5",
            "lmlab-sample",
            [f"ckpt_path={ckpt}", "max_new_tokens=1.5"],
            expect="max_new_tokens must be a whole number, got '1.5'",
        ),
        sample(
            "sample: top_k=1.5",
            f"ckpt_path={ckpt}",
            "top_k=1.5",
            expect="top_k must be a whole number, got '1.5'",
        ),
        sample("sample: top_p=2", f"ckpt_path={ckpt}", "top_p=2", expect="top_p must be in (0, 1]"),
        sample(
            "sample: misspelt key (tempreature)",
            f"ckpt_path={ckpt}",
            "tempreature=0.5",
            expect="unknown argument 'tempreature=0.5'",
        ),
        sample(
            "sample: checkpoint with n_head as a string",
            f"ckpt_path={tmp}/n_head_string.ckpt",
            expect=f"{not_ckpt}: model_hparams.n_head is '2', not a whole number",
        ),
        sample(
            "sample: checkpoint whose tokenizer lacks its characters",
            f"ckpt_path={tmp}/no_chars.ckpt",
            expect=f"{not_ckpt}: tokenizer_state.chars is not a list",
        ),
        sample(
            "sample: checkpoint with vocab_size 1e11",
            f"ckpt_path={tmp}/huge_vocab.ckpt",
            expect=f"{not_ckpt}: model_hparams.vocab_size is 100000000000",
        ),
    ]
    rows += [
        evaluate(
            "eval: split=train",
            f"ckpt_path={ckpt}",
            "split=train",
            expect="split must be val or test, got 'train'",
        ),
        evaluate(
            "eval: unknown key",
            f"ckpt_path={ckpt}",
            "bogus_key=1",
            expect="unknown argument 'bogus_key=1'",
        ),
        evaluate(
            "eval: batch_size=0",
            f"ckpt_path={ckpt}",
            "batch_size=0",
            expect="batch_size must be a positive whole number, got '0'",
        ),
        evaluate(
            "eval: no ckpt_path",
            "split=val",
            expect="give the checkpoint to score: lmlab-eval ckpt_path=PATH",
        ),
    ]
    rows += [
        compare(  # not a refusal: the run is listed, with its error
            "compare: metrics.json not a JSON object",
            f"{tmp}/compare_list_json",
            expect="metrics.json is not a JSON object",
            status=0,
            stream="stdout",
        ),
        compare(
            "compare: --csv is a directory",
            f"{tmp}/compare_list_json",
            "--csv",
            f"{tmp}/a_directory",
            expect="is a directory; give a file name",
        ),
        compare(  # not a refusal: the group's mean leaves the NaN run out, and says so
            "compare: NaN val/loss in a seed group",
            f"{tmp}/compare_nan",
            expect="not finite in 1 of 3 runs",
            status=0,
            stream="stdout",
        ),
        compare(
            "compare: directory does not exist",
            f"{tmp}/no_such_dir",
            expect="does not exist; pass a run directory or a sweep/log folder",
        ),
    ]
    return rows + fault_rows(tmp)


def fault_rows(tmp: Path) -> list[Row]:
    """Faults around a run rather than bad input: full and read-only disks (tmpfs mounts,
    so root only), and signals while tokenizing. Each checks what is left afterwards."""
    root = None if os.geteuid() == 0 else "needs root, to mount a tmpfs"
    huge = tmp / "huge.txt"  # about 100 MB: tokenizing takes about a second, time to interrupt
    quick = [*TINY, "trainer.limit_val_batches=2", f"data.path={huge}"]
    gpt = ["model=gpt", "model.n_layer=2", "model.n_head=2", "model.n_embd=64"]
    gpt += ["data.block_size=32", "trainer.val_check_interval=10"]
    full_ckpt = tmp / "full_ckpt"
    last = full_ckpt / "run" / "checkpoints" / "last.ckpt"
    before: dict[str, str] = {}

    def mount(where: Path, *options: str, fill: bool = False) -> str | None:
        where.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", where])
        if done.returncode != 0:
            return f"mount -t tmpfs failed (exit {done.returncode})"
        if fill:
            _fill(where)
        return None

    def umount(where: Path) -> Callable[[], None]:
        def finish() -> None:
            subprocess.run(["umount", "-l", where], capture_output=True)

        return finish

    def empty(where: Path, but: str = "") -> Callable[[], str | None]:
        def check() -> str | None:
            left = [p.name for p in where.rglob("*") if p.name != but]
            return f"left behind: {left}" if left else None

        return check

    def full_before_save() -> str | None:
        if why := mount(full_ckpt, "size=4m"):
            return why
        args = [*TINY[1:], *gpt, "trainer.max_steps=10", f"hydra.run.dir={full_ckpt}/run"]
        subprocess.run(cli("lmlab-train") + args, cwd=tmp, capture_output=True, check=True)
        before["sha"] = hashlib.sha256(last.read_bytes()).hexdigest()
        _fill(full_ckpt, leave=200 << 10)
        return None

    def last_ckpt_kept() -> str | None:
        if hashlib.sha256(last.read_bytes()).hexdigest() != before.get("sha"):
            return "last.ckpt changed"
        torch.load(last, weights_only=True)  # still loads
        metrics = json.loads((full_ckpt / "run" / "metrics.json").read_text())
        if metrics["status"] != "failed" or "no space left" not in metrics.get("error", ""):
            return f"metrics.json says {metrics['status']}: {metrics.get('error')}"
        return None

    def temporaries(cache: Path) -> list[Path]:
        return sorted(cache.rglob("*.tmp")) if cache.is_dir() else []

    def no_temporaries(cache: Path) -> Callable[[], str | None]:
        return lambda: f"left behind: {temporaries(cache)}" if temporaries(cache) else None

    def killed_while_tokenizing(signum: signal.Signals, cache: Path) -> Callable[[], str | None]:
        def prepare() -> str | None:
            _write_huge_corpus(huge)
            env = {**os.environ, "LMLAB_CACHE_DIR": str(cache)}
            args = [*quick, f"hydra.run.dir={cache}-killed"]
            quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
            proc = subprocess.Popen(cli("lmlab-train") + args, cwd=tmp, env=env, **quiet)
            while proc.poll() is None and not temporaries(cache):
                time.sleep(0.01)
            proc.send_signal(signum)
            proc.wait()
            return None if temporaries(cache) else "the run finished tokenizing before the kill"

        return prepare

    def leftover_checkpoint_temporary() -> str | None:
        """What a checkpoint save killed half-way leaves: a temporary file named after its
        writer's host and pid (a pid that is gone), beside last.ckpt."""
        run = tmp / "ckpt_leftover"
        args = [*TINY, f"hydra.run.dir={run}"]
        subprocess.run(cli("lmlab-train") + args, cwd=tmp, capture_output=True, check=True)
        gone = _dead_pid()
        (run / "checkpoints" / f".last.ckpt.{host_name()}.{gone}.abcd1234.tmp").write_bytes(
            bytes(1 << 20)
        )
        return None

    def killed_row(signum: signal.Signals, cache: Path) -> Row:
        """Not a refusal: the next run cleans up after the one killed while tokenizing."""
        name = signal.Signals(signum).name
        return Row(
            f"{name} while tokenizing: the next run removes the leftover",
            "lmlab-train",
            [*quick, f"hydra.run.dir={tmp}/after_{name.lower()}"],
            env={"LMLAB_CACHE_DIR": str(cache)},
            expect=removed,
            status=0,
            stream="stdout",
            prepare=killed_while_tokenizing(signum, cache),
            check=no_temporaries(cache),
        )

    run_dir = f"hydra.run.dir={tmp}/ckpt_leftover"
    int_cache, kill_cache, term_cache = (tmp / n for n in ("cache_int", "cache_kill", "cache_term"))
    removed = "left by a run that did not finish"
    return [
        Row(
            "run directory on a full disk",
            "lmlab-train",
            [*TINY, f"hydra.run.dir={tmp}/full_start/run"],
            expect="(No space left on device)",
            skip=root,
            prepare=lambda: mount(tmp / "full_start", "size=1m", fill=True),
            check=empty(tmp / "full_start", but="filler"),
            finish=umount(tmp / "full_start"),
        ),
        Row(
            "run directory on a read-only disk",
            "lmlab-train",
            [*TINY, f"hydra.run.dir={tmp}/read_only/run"],
            expect="(Read-only file system)",
            skip=root,
            prepare=lambda: mount(tmp / "read_only", "ro", "size=1m"),
            check=empty(tmp / "read_only"),
            finish=umount(tmp / "read_only"),
        ),
        Row(
            "disk full while a checkpoint is saved",
            "lmlab-train",
            [*TINY[1:], *gpt, "trainer.max_steps=20", f"hydra.run.dir={full_ckpt}/run"]
            + [f"ckpt_path={last}"],
            expect="no space left on device writing",
            skip=root,
            prepare=full_before_save,
            check=last_ckpt_kept,
            finish=umount(full_ckpt),
        ),
        Row(
            "Ctrl-C while tokenizing",
            "lmlab-train",
            [*quick, f"hydra.run.dir={tmp}/interrupted"],
            env={"LMLAB_CACHE_DIR": str(int_cache)},
            expect="lmlab-train: interrupted (Ctrl-C)",
            status=130,
            prepare=lambda: _write_huge_corpus(huge),
            interrupt=Interrupt(signal.SIGINT, lambda: bool(temporaries(int_cache))),
            check=no_temporaries(int_cache),
        ),
        killed_row(signal.SIGKILL, kill_cache),
        killed_row(signal.SIGTERM, term_cache),
        Row(  # not a refusal: the resumed run removes the killed save's temporary file
            "checkpoint save killed half-way: the next save removes the leftover",
            "lmlab-train",
            [*TINY[1:], "trainer.max_steps=10", run_dir]
            + [f"ckpt_path={tmp}/ckpt_leftover/checkpoints/last.ckpt"],
            expect=removed,
            status=0,
            stream="stdout",
            prepare=leftover_checkpoint_temporary,
            check=no_temporaries(tmp / "ckpt_leftover" / "checkpoints"),
        ),
    ]


def _fill(where: Path, leave: int = 0) -> None:
    """Fill the file system at `where`, leaving about `leave` bytes free."""
    free = shutil.disk_usage(where).free - leave
    with open(where / "filler", "wb") as f:
        while free > 0:
            try:
                free -= f.write(bytes(min(free, 1 << 20)))
                f.flush()
            except OSError:
                break


def _write_huge_corpus(path: Path) -> None:
    """Shakespeare, 90 times over (written once, whole, for whichever row needs it first)."""
    if path.exists():
        return
    text = (Path(os.environ.get("LMLAB_DATA_DIR", "data")) / "tinyshakespeare.txt").read_bytes()
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}")
    tmp.write_bytes(text * 90)
    os.replace(tmp, path)


def _dead_pid() -> int:
    """The pid of a process that has ended (and was this host's)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def markdown(results: list[Result], tmp: Path) -> str:
    def cell(text: str) -> str:
        return text.replace(str(tmp), "$TMP").replace("|", "\\|")

    lines = [TABLE_HEADER, "| --- | --- | --- | --- | --- |"]
    for r in results:
        # the run directory is left out, but for a fault row: it is where the fault is
        args = " ".join(
            shlex.quote(a)
            for a in r.row.args
            if a not in TINY and (r.row.prepare or not a.startswith("hydra.run"))
        )
        env = " ".join(f"{k}={v}" for k, v in (r.row.env or {}).items())
        command = f"{env} {r.row.command} {args}".strip()
        flag = "yes" if r.clean else ("no: traceback" if r.traceback else "no")
        if r.check_failed:
            flag = f"no: {r.check_failed}"
        if r.not_run:
            flag = "not run"
        if r.row.xfail:
            flag += f" (known: {r.row.xfail})"
        lines.append(
            f"| {cell(r.row.what)} | `{cell(command)}` | {cell(r.message)} | {r.returncode} "
            f"| {flag} |"
        )
    return "\n".join(lines)


def summary(results: list[Result]) -> str:
    ran = [r for r in results if not r.not_run]
    return f"{sum(r.clean for r in ran)} of {len(ran)} rows clean; no pickle ran code."


def write_docs(page: Path, text: str, count: int) -> None:
    """Replace the table and its summary line in `page` (the rest of the page is kept) and the
    count in "N bad inputs"."""
    old = page.read_text()
    start = old.index("| input | command |")
    end = old.index(" no pickle ran code.", start) + len(" no pickle ran code.")
    new = old[:start] + text + old[end:]
    new = re.sub(r"\b\d+ bad inputs\b", f"{count} bad inputs", new)
    page.write_text(new)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=Path, help="rewrite the table in this page as well")
    parser.add_argument("--workers", type=int, default=2, help="rows run at a time (default 2)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lmlab-bad-inputs-") as name:
        tmp = Path(name)
        rows, marker = make_inputs(tmp)
        results = run_all(rows, tmp, workers=args.workers, log=True)
        ran_code = marker.exists()
        text = markdown(results, tmp)
        if not ran_code:
            text += "\n\n" + summary(results)
        print(text)
        if ran_code:
            print("\nA crafted pickle ran its code: the marker file was created.")
            return 1
        if args.docs:
            write_docs(args.docs, text, len(results))
    return 0 if all(r.clean or r.row.xfail or r.not_run for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
