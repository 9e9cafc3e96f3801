"""`lmlab-tokenizer train data=NAME vocab_size=N out=FILE.tiktoken`: a byte-level BPE trained
on the training part of a corpus and written as a tiktoken ranks file.

GPT-2's 50,257 tokens make the output layer of a small model the largest part of it; a BPE of
a few thousand tokens learned on the corpus itself is one a CPU can afford. Hugging Face
`tokenizers` learns the merges (its `ByteLevel` pre-tokenizer splits with GPT-2's pattern, the
one lmlab's tiktoken encoding of a ranks file uses), and the merges become tiktoken ranks, so
`data.tokenizer=FILE.tiktoken` trains on it like any other ranks file. The text learned from is
exactly the training part that `lmlab-train` trains on (the same split, by the same
functions), so the validation part stays unseen, and the compression is measured on it.
"""

from __future__ import annotations

import argparse
import base64
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from lmlab.cli import log_to_stderr, number, refuse
from lmlab.data import corpus
from lmlab.data.tokenization import (
    TokenSettings,
    line_break_cuts,
    read_part_documents,
    read_text_chunks,
)
from lmlab.errors import LmlabError

log = logging.getLogger("lmlab")

PROG = "lmlab-tokenizer"
# our own keys; `data`, `data.*` and `paths.*` are Hydra overrides of the training config
KEYS = {
    "data": "the corpus: a data config (shakespeare_char, names, nsmc_char, ...); "
    "data.KEY=VALUE overrides it (data.path=FILE for your own corpus)",
    "vocab_size": "tokens of the trained BPE, <|endoftext|> included (at least 257)",
    "out": "the ranks file to write (FILE.tiktoken; required)",
    "min_frequency": "a pair seen fewer times than this is never merged (2)",
    "overwrite": "true: replace an existing out file (false)",
    "compare": "encodings to compare bytes per token with, comma-separated, or none "
    "(gpt2,cl100k_base)",
}
OVERRIDE_PREFIXES = ("data.", "paths.")
DEFAULT_COMPARE = "gpt2,cl100k_base"
PIECE_BYTES = 256 << 10  # plain text reaches the trainer in pieces: parallel, and never whole
CHECK_BYTES = 1 << 20  # validation text on which the file and the trainer must give equal ids
MIN_VOCAB = 257  # the 256 single bytes and <|endoftext|>


@dataclass(frozen=True)
class Part:
    """One part of the corpus as `lmlab-train` splits it: its texts, read afresh each call
    (documents, or pieces of a plain-text file), and how many there are (about, for pieces)."""

    texts: Callable[[], Iterator[str]]
    count: int
    documents: int


def corpus_parts(path: Path, settings: TokenSettings) -> dict[str, Part]:
    """The train / val (/ test) parts of a corpus, split as `tokenization._tokenize` splits
    them: a plain text at the same line breaks, documents shuffled and cut the same way."""
    fractions = settings.fractions
    normalize, errors = settings.normalize, settings.encoding_errors
    if settings.text_field is None and not settings.split_lines:
        cuts = line_break_cuts(path, list(fractions.values()))

        def pieces(start: int, end: int) -> Callable[[], Iterator[str]]:
            def texts() -> Iterator[str]:
                for _, text in read_text_chunks(path, PIECE_BYTES, errors, start, end, normalize):
                    yield text

            return texts

        return {
            name: Part(pieces(start, end), math.ceil((end - start) / PIECE_BYTES), 1)
            for name, (start, end) in zip(fractions, pairwise(cuts), strict=True)
        }
    parts = read_part_documents(path, settings)[1]
    return {
        name: Part(lambda d=docs: iter(d), len(docs), len(docs)) for name, docs in parts.items()
    }


# -- training -----------------------------------------------------------------------------------
def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    min_frequency: int = 2,
    length: int | None = None,
    show_progress: bool = False,
):
    """A `tokenizers.Tokenizer` of byte-level BPE learned from `texts` (streamed), with
    `vocab_size` tokens at most: the 256 single bytes, then the merges in the order learned."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    # GPT-2's regex and no prefix space: the pre-tokens of tiktoken's GPT-2 pattern
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=show_progress,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, seen or not
        special_tokens=[],  # <|endoftext|> is added by tiktoken, after the largest rank
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=length)
    return tokenizer


@cache
def byte_of_char() -> dict[str, int]:
    """GPT-2's `bytes_to_unicode`, inverted: byte-level BPE spells each byte as a printable
    character (itself when printable, else one from U+0100 on); this maps them back."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    return {c: b for b, c in chars.items()}


def tiktoken_ranks(tokenizer) -> dict[bytes, int]:
    """The trained vocabulary as tiktoken ranks: each token's bytes, ranked by its id. The
    trainer numbers the 256 single bytes first and then each new token in the order its merge
    was learned, which is the order tiktoken applies merges in (lowest rank first)."""
    table = byte_of_char()
    vocab = tokenizer.get_vocab()
    ranks = {bytes(table[c] for c in token): rank for token, rank in vocab.items()}
    if sorted(ranks.values()) != list(range(len(vocab))) or len(ranks) != len(vocab):
        raise RuntimeError("the trained vocabulary is not numbered 0..n-1 without repeats")
    if any(len(token) != 1 for token, rank in ranks.items() if rank < 256):
        raise RuntimeError("the trained vocabulary does not start with the 256 single bytes")
    return ranks


def ranks_file_text(ranks: dict[bytes, int]) -> str:
    """A `.tiktoken` file: `base64-token rank` lines, in rank order."""
    by_rank = sorted(ranks.items(), key=lambda item: item[1])
    return "".join(f"{base64.b64encode(token).decode('ascii')} {rank}\n" for token, rank in by_rank)


# -- compression and the equivalence check ------------------------------------------------------
def count_tokens(tokenizer, texts: Iterable[str]) -> int:
    """Tokens of the texts, each encoded on its own (no boundary tokens), by an lmlab
    TiktokenTokenizer."""
    return sum(len(ids) for ids in tokenizer.encode_pieces(texts, np.uint32))


def first_texts(texts: Iterable[str], limit_bytes: int) -> list[str]:
    """The leading texts holding about `limit_bytes` of UTF-8 (the last one cut short)."""
    taken, size = [], 0
    for text in texts:
        if size >= limit_bytes:
            break
        text = text[: limit_bytes - size]
        taken.append(text)
        size += len(text.encode("utf-8"))
    return taken


def same_ids(trained, encoding, texts: list[str]) -> tuple[bool, int]:
    """Whether tiktoken's `encoding` gives the trained tokenizer's ids on every text, and the
    number of tokens compared."""
    ours = [e.ids for e in trained.encode_batch(texts, add_special_tokens=False)]
    theirs = encoding.encode_ordinary_batch(texts)
    return ours == theirs, sum(len(ids) for ids in theirs)


# -- the command --------------------------------------------------------------------------------
def parse_args(argv: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """(our keys' values, Hydra overrides) of `lmlab-tokenizer train key=value ...`."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="Tokenizers trained on a corpus's training part."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    train = commands.add_parser(
        "train",
        help="a byte-level BPE written as a tiktoken ranks file",
        description="Train a byte-level BPE (GPT-2's split pattern) on the training part of a "
        "corpus, write it as a tiktoken ranks file, and show its bytes per token on the "
        "validation part. Use it with lmlab-train data.tokenizer=FILE.tiktoken.",
        epilog="keys: " + "; ".join(f"{k}: {v}" for k, v in KEYS.items()) + ". Example: "
        f"{PROG} train data=shakespeare_char vocab_size=2048 out=shakespeare-2048.tiktoken",
    )
    train.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    values: dict[str, str] = {}
    overrides: list[str] = []
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if sep and (key == "data" or key.startswith(OVERRIDE_PREFIXES)):
            overrides.append(item)
        elif sep and key in KEYS:
            values[key] = value
        else:
            known = ", ".join([*KEYS, "data.KEY", "paths.KEY"])
            raise LmlabError(f"unknown argument {item!r}; {PROG} train takes {known}")
    return values, overrides


def data_config(overrides: list[str]) -> dict[str, Any]:
    """`lmlab-train`'s `data` config with the overrides, resolved (paths.data_dir and all)."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_module(config_module="lmlab.conf", version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides)
        return OmegaConf.to_container(cfg.data, resolve=True)
    except (HydraException, OmegaConfBaseException) as err:
        # what was wrong and the options, less Hydra's search path and its `+key=` advice
        # (a new data key would reach nothing here)
        text = str(err).split("Config search path")[0].split("To append to your config")[0]
        if text.startswith("Could not override"):
            text += " The config has no such key; `lmlab-train --cfg job` shows its keys."
        raise LmlabError(f"{' '.join(text.split())} (in {' '.join(overrides)})") from None


def read_options(values: dict[str, str]) -> tuple[int, Path, int, bool, list[str]]:
    """vocab_size, out, min_frequency, overwrite and the encodings to compare with."""
    vocab_size = number(values, "vocab_size", int, None)
    if vocab_size is None or vocab_size < MIN_VOCAB:
        raise LmlabError(
            f"give vocab_size=N with N >= {MIN_VOCAB} (the 256 single bytes, <|endoftext|> "
            f"and the merges to learn), got {values.get('vocab_size')!r}"
        )
    if not values.get("out"):
        raise LmlabError("give the file to write: out=FILE.tiktoken")
    out = Path(values["out"]).expanduser()
    if out.suffix != ".tiktoken":
        raise LmlabError(
            f"out={values['out']} does not end in .tiktoken, which is how data.tokenizer tells "
            "a ranks file from an encoding name; name it FILE.tiktoken"
        )
    overwrite = values.get("overwrite", "false").strip().lower()
    if overwrite not in ("true", "false"):
        raise LmlabError(f"overwrite must be true or false, got {values['overwrite']!r}")
    if out.is_dir():
        raise LmlabError(f"out={out} is a directory; give a file name ending in .tiktoken")
    if out.exists() and overwrite != "true":
        raise LmlabError(f"{out} exists; give another out=FILE, or overwrite=true to replace it")
    min_frequency = number(values, "min_frequency", int, 2)
    if min_frequency is None or min_frequency < 0:
        raise LmlabError(f"min_frequency must be 0 or more, got {values['min_frequency']!r}")
    compare = values.get("compare", DEFAULT_COMPARE)
    names = [] if compare.strip().lower() in ("", "none") else compare.split(",")
    return vocab_size, out, min_frequency, overwrite == "true", [n.strip() for n in names]


def train_command(values: dict[str, str], overrides: list[str]) -> dict[str, Any]:
    """Train, write and measure; the figures the summary shows."""
    from lmlab.data.datamodule import TextDataModule
    from lmlab.data.tokenizers import TiktokenTokenizer, build_tokenizer

    vocab_size, out, min_frequency, _, compare = read_options(values)
    settings = {k: v for k, v in data_config(overrides).items() if k != "_target_"}
    datamodule = TextDataModule(**settings)  # the corpus and its split, as lmlab-train reads them
    path = corpus.check_corpus_file(datamodule.corpus_path())
    parts = corpus_parts(path, datamodule.settings)
    train_part, val_part = parts["train"], parts["val"]

    counted = [0, 0]  # characters, bytes of the training part

    def training_texts() -> Iterator[str]:
        for text in train_part.texts():
            counted[0] += len(text)
            counted[1] += len(text.encode("utf-8"))
            yield text

    started = time.perf_counter()
    trained = train_bpe(
        training_texts(), vocab_size - 1, min_frequency, train_part.count, sys.stderr.isatty()
    )
    seconds = time.perf_counter() - started
    ranks = tiktoken_ranks(trained)
    ours = TiktokenTokenizer(str(out), ranks)  # refuses ranks tiktoken could not use
    check = first_texts(val_part.texts(), CHECK_BYTES)
    agree, checked_tokens = same_ids(trained, ours.encoding, check)
    if not agree:
        raise RuntimeError(
            f"tiktoken with the trained ranks encodes the validation text differently from the "
            f"trainer (on {checked_tokens} tokens); the ranks are not written"
        )
    from lmlab.atomic_write import atomic_write_text

    atomic_write_text(out, ranks_file_text(ranks))

    val_bytes = sum(len(t.encode("utf-8")) for t in val_part.texts())
    table = [(out.name, ours.vocab_size, count_tokens(ours, val_part.texts()))]
    for name in compare:
        try:
            other = build_tokenizer(name)
        except LmlabError as err:
            log.warning("bytes per token of %s left out: %s", name, err)
            continue
        table.append((name, other.vocab_size, count_tokens(other, val_part.texts())))
    return {
        "corpus": str(path),
        "train_documents": train_part.documents,
        "train_characters": counted[0],
        "train_bytes": counted[1],
        "vocab_size": ours.vocab_size,
        "merges": len(ranks) - 256,
        "asked_vocab_size": vocab_size,
        "seconds": seconds,
        "out": str(out),
        "checked_tokens": checked_tokens,
        "val_documents": val_part.documents,
        "val_bytes": val_bytes,
        "bytes_per_token": {name: (size, tokens) for name, size, tokens in table},
    }


def summary(result: dict[str, Any]) -> str:
    """What `lmlab-tokenizer train` prints at the end."""
    lines = [
        f"corpus: {result['corpus']}",
        f"training part: {result['train_documents']} document(s), "
        f"{result['train_characters']:,} characters, {result['train_bytes']:,} bytes",
        f"trained: {result['vocab_size']} tokens (256 bytes + {result['merges']} merges + "
        f"<|endoftext|>) in {result['seconds']:.1f} s",
    ]
    if result["vocab_size"] < result["asked_vocab_size"]:
        lines.append(
            f"  (vocab_size={result['asked_vocab_size']} asked: the corpus has no more pairs "
            "seen min_frequency times)"
        )
    lines += [
        f"written: {result['out']}  (use: lmlab-train data.tokenizer={result['out']})",
        f"checked: tiktoken with the file gives the trainer's ids on {result['checked_tokens']:,}"
        " tokens of validation text",
        f"validation part: {result['val_documents']} document(s), {result['val_bytes']:,} bytes",
        f"  {'tokenizer':<28} {'vocab':>7} {'tokens':>12} {'bytes/token':>12}",
    ]
    for name, (size, tokens) in result["bytes_per_token"].items():
        per = result["val_bytes"] / tokens if tokens else float("nan")
        lines.append(f"  {name:<28} {size:>7} {tokens:>12,} {per:>12.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    log_to_stderr()
    try:
        values, overrides = parse_args(sys.argv[1:] if argv is None else argv)
        result = train_command(values, overrides)
    except LmlabError as err:
        refuse(PROG, err)
    print(summary(result))


if __name__ == "__main__":
    main()
