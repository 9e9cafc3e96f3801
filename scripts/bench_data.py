"""Data-pipeline figures: batch sampling, tokenization throughput, token cache, peak memory.

    python scripts/bench_data.py                  # full size: 100 MB tokenization, 1 GB corpus
    python scripts/bench_data.py --quick          # small sizes, to check that it all runs
    python scripts/bench_data.py --size-mb 100 --size-gb 1.0 --only batch,tokenize,large

Each bench_* function returns a dict of figures (and prints it), so another script in
scripts/ can `from bench_data import bench_tokenization`. Needs tiny Shakespeare in
$LMLAB_DATA_DIR and, for BPE, the gpt2 (r50k_base) file in $TIKTOKEN_CACHE_DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmlab.data import TextDataModule
from lmlab.data.corpus import locate_builtin
from lmlab.data.examples import RandomBlockBatches
from lmlab.data.token_cache import TokenSink
from lmlab.data.tokenization import encode_plain_text, fit_char_vocabulary
from lmlab.data.tokenizers import build_tokenizer, token_dtype

MB = 1 << 20
# Runs a command and prints its peak RSS: RUSAGE_CHILDREN of a process with no other child.
PEAK_RSS_WRAPPER = (
    "import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
    "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
    "sys.exit(code)"
)


def shakespeare_path() -> Path:
    return locate_builtin("shakespeare", os.environ.get("LMLAB_DATA_DIR", "data"))


def report(name: str, figures: dict[str, Any]) -> dict[str, Any]:
    print(f"{name}: {json.dumps(figures, indent=1)}", flush=True)
    return figures


def _per_call(fn, repeats: int) -> float:
    fn()  # warm up
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats


def bench_batch_sampling(
    batch_size: int = 64, block_size: int = 256, repeats: int = 200
) -> dict[str, Any]:
    """One gather (RandomBlockBatches) vs the tutorials' Python loop of slices + stack."""
    with tempfile.TemporaryDirectory() as cache:
        dm = TextDataModule(path=str(shakespeare_path()), cache_dir=cache, block_size=block_size)
        dm.setup("fit")
        stream = dm.train_stream  # uint16, memory-mapped
        ours = RandomBlockBatches(stream, block_size, batch_size, repeats + 1, seed=1)
        step = iter(range(repeats + 1))
        ours_s = _per_call(lambda: ours[next(step)], repeats)

        data = stream.long().clone()  # the tutorial's torch.tensor(encode(text), dtype=long)

        def get_batch() -> tuple[torch.Tensor, torch.Tensor]:
            ix = torch.randint(len(data) - block_size, (batch_size,))
            x = torch.stack([data[i : i + block_size] for i in ix])
            y = torch.stack([data[i + 1 : i + block_size + 1] for i in ix])
            return x, y

        tutorial_s = _per_call(get_batch, repeats)
    return report(
        "batch sampling",
        {
            "batch": f"{batch_size} x {block_size}",
            "ours_us_per_batch": round(ours_s * 1e6, 1),
            "tutorial_us_per_batch": round(tutorial_s * 1e6, 1),
            "speedup": round(tutorial_s / ours_s, 1),
        },
    )


def make_corpus(path: Path, size_bytes: int, shuffle_lines: bool = False, seed: int = 0) -> Path:
    """Tiny Shakespeare repeated (or its lines shuffled, block by block) to `size_bytes`."""
    text = shakespeare_path().read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    rng = random.Random(seed)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < size_bytes:
            if shuffle_lines:
                rng.shuffle(lines)
                text = "".join(lines)
            piece = text[: size_bytes - written]
            f.write(piece)
            written += len(piece.encode("utf-8"))
    return path


def bench_tokenization(size_mb: float = 100, tutorial_mb: float = 10) -> dict[str, Any]:
    """Char and BPE throughput of the streaming path, the tutorial's list comprehension, and
    TextDataModule.setup() start-up without and with the token cache."""
    figures: dict[str, Any] = {"corpus_mb": size_mb}
    with tempfile.TemporaryDirectory() as tmp:
        path = make_corpus(Path(tmp) / "shakespeare_x.txt", int(size_mb * MB))
        size = path.stat().st_size / MB

        started = time.perf_counter()
        tokenizer = fit_char_vocabulary(path, "NFC")
        sink = TokenSink(token_dtype(tokenizer.vocab_size))
        encode_plain_text(path, tokenizer, sink, "NFC")
        (ids,) = sink.finish()
        figures["char_ours_mb_s"] = round(size / (time.perf_counter() - started), 1)
        figures["char_ours_note"] = "read + NFC + vocabulary pass + encode + write, whole file"

        text = path.read_text(encoding="utf-8")[: int(tutorial_mb * MB)]
        stoi = {ch: i for i, ch in enumerate(sorted(set(text)))}
        started = time.perf_counter()
        listed = [stoi[c] for c in text]
        seconds = time.perf_counter() - started
        figures["char_tutorial_mb_s"] = round(len(text) / MB / seconds, 1)
        figures["char_tutorial_note"] = f"[stoi[c] for c in text] on a {tutorial_mb:g} MB slice"
        best = float("inf")
        for _ in range(3):  # best of 3: a single 10 MB pass is short enough to catch a hiccup
            started = time.perf_counter()
            encoded = tokenizer.encode(text, dtype=token_dtype(tokenizer.vocab_size))
            best = min(best, time.perf_counter() - started)
        figures["char_encode_ours_mb_s"] = round(len(text) / MB / best)
        figures["char_encode_note"] = "CharTokenizer.encode on the same slice, in memory, best of 3"
        assert (
            encoded.tolist() == [tokenizer.stoi[c] for c in text[:1000]] + encoded[1000:].tolist()
        )
        figures["char_encode_speedup"] = round(
            figures["char_encode_ours_mb_s"] / figures["char_tutorial_mb_s"], 1
        )
        figures["char_pipeline_speedup"] = round(
            figures["char_ours_mb_s"] / figures["char_tutorial_mb_s"], 1
        )
        assert len(listed) == len(text) and len(ids) >= len(text)
        del text, listed, ids, encoded

        bpe = build_tokenizer("gpt2")
        started = time.perf_counter()
        sink = TokenSink(token_dtype(bpe.vocab_size))
        encode_plain_text(path, bpe, sink, "NFC")
        num_tokens = len(sink.finish()[0])
        figures["bpe_ours_mb_s"] = round(size / (time.perf_counter() - started), 1)
        figures["bpe_threads"] = os.cpu_count()
        figures["bpe_tokens"] = num_tokens

        for tokenizer_spec in ("char", "gpt2"):
            for attempt in ("first", "cached"):
                dm = TextDataModule(
                    path=str(path), tokenizer=tokenizer_spec, cache_dir=str(Path(tmp) / "tokens")
                )
                started = time.perf_counter()
                dm.setup("fit")
                figures[f"setup_{tokenizer_spec}_{attempt}_s"] = round(
                    time.perf_counter() - started, 2
                )
    return report("tokenization", figures)


def bench_large_corpus(size_gb: float = 1.0, steps: int = 20) -> dict[str, Any]:
    """Tokenize a ~size_gb corpus and train a few steps in a fresh process: its peak RSS."""
    figures: dict[str, Any] = {"corpus_gb": size_gb}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.txt"
        started = time.perf_counter()
        make_corpus(path, int(size_gb * 1024 * MB), shuffle_lines=True)
        figures["generate_s"] = round(time.perf_counter() - started, 1)
        for attempt in ("first", "cached"):
            command = [
                sys.executable,
                "-m",
                "lmlab.train",
                f"data.path={path}",
                f"data.cache_dir={Path(tmp) / 'tokens'}",
                "data.block_size=64",
                "data.batch_size=32",
                "model=gpt",
                "model.n_layer=2",
                "model.n_embd=64",
                "model.n_head=2",
                "trainer.accelerator=cpu",
                f"trainer.max_steps={steps}",
                f"trainer.val_check_interval={steps}",
                "trainer.limit_val_batches=4",  # the val split is ~100M tokens: a sample
                "trainer.enable_progress_bar=false",
                "logger=csv",
                f"hydra.run.dir={Path(tmp) / f'run_{attempt}'}",
            ]
            started = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-c", PEAK_RSS_WRAPPER, *command], capture_output=True, text=True
            )
            seconds = time.perf_counter() - started
            if done.returncode != 0:
                raise RuntimeError(
                    f"training failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
                )
            log = done.stdout + done.stderr
            tokenized = re.search(r"tokens: (tokenized .*|loaded from cache .*)", log)
            peak_kb = int(re.search(r"PEAK_RSS_KB (\d+)", log).group(1))
            figures[f"{attempt}_wall_s"] = round(seconds, 1)
            figures[f"{attempt}_tokens_log"] = tokenized.group(1) if tokenized else None
            figures[f"{attempt}_peak_rss_gb"] = round(peak_kb / (1 << 20), 2)
    return report("large corpus", figures)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 MB / 0.05 GB: a quick check")
    parser.add_argument("--size-mb", type=float, default=100)
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--only", default="batch,tokenize,large")
    args = parser.parse_args()
    if args.quick:
        args.size_mb, args.size_gb = 20, 0.05
    torch.manual_seed(0)
    np.random.seed(0)
    which = set(args.only.split(","))
    if "batch" in which:
        bench_batch_sampling()
    if "tokenize" in which:
        bench_tokenization(args.size_mb, tutorial_mb=min(10, args.size_mb))
    if "large" in which:
        bench_large_corpus(args.size_gb)


if __name__ == "__main__":
    main()
