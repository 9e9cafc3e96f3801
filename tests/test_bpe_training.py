"""`lmlab-tokenizer train`: a byte-level BPE learned from exactly lmlab-train's training part,
written as tiktoken ranks that encode exactly as the trained tokenizer does."""

from __future__ import annotations

import base64
import random
from collections import Counter
from pathlib import Path

import pytest
import regex
from helpers import data_dir, needs_corpus, needs_tiktoken

from lmlab.bpe_training import (
    corpus_parts,
    main,
    ranks_file_text,
    same_ids,
    tiktoken_ranks,
    train_bpe,
    train_command,
)
from lmlab.data.datamodule import TextDataModule
from lmlab.data.tokenizers import _GPT2_RE, TiktokenTokenizer, read_ranks_file

VERDICT = ["data=verdict_bpe", f"data.data_dir={data_dir()}"]


def train_cli(out: Path, *args: str, vocab_size: int = 300) -> dict:
    """`lmlab-tokenizer train ARGS vocab_size=N out=OUT compare=none`, in process."""
    values = {"vocab_size": str(vocab_size), "out": str(out), "compare": "none"}
    overrides = [a for a in args if a.startswith("data")]
    values |= dict(a.split("=", 1) for a in args if not a.startswith("data"))
    return train_command(values, overrides)


def datamodule_text(**data) -> dict[str, str | list[str]]:
    """Each part's text as lmlab-train's datamodule holds it (character tokens decoded)."""
    dm = TextDataModule(tokenizer="char", cache_dir=None, **data)
    dm.setup("fit")
    if dm.examples == "documents":
        return {p: [dm.tokenizer.decode(d) for d in dm.documents[p]] for p in dm.documents}
    return {
        "train": dm.tokenizer.decode(dm.train_stream),
        "val": dm.tokenizer.decode(dm.val_stream),
    }


@pytest.fixture(scope="module")
def verdict_bpe(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bpe") / "verdict-300.tiktoken"
    return out, train_cli(out, *VERDICT)


@needs_corpus("the-verdict.txt")
def test_trains_on_exactly_the_training_part_of_lmlab_train():
    verdict = data_dir() / "the-verdict.txt"
    parts = corpus_parts(verdict, TextDataModule(path=str(verdict)).settings)
    expected = datamodule_text(path=str(verdict))
    assert "".join(parts["train"].texts()) == expected["train"]
    assert "".join(parts["val"].texts()) == expected["val"]
    assert expected["train"] + expected["val"] == verdict.read_text(encoding="utf-8")


def test_documents_are_split_as_lmlab_train_splits_them(tmp_path: Path):
    table = tmp_path / "reviews.tsv"
    rows = [f"{i}\treview number {i} says {'good' if i % 3 else 'bad'}" for i in range(50)]
    table.write_text("id\tdocument\n" + "\n".join(rows) + "\n", encoding="utf-8")
    data = {"path": str(table), "text_field": "document", "train_fraction": 0.8}
    data["examples"] = "documents"  # so that the datamodule keeps each document
    parts = corpus_parts(table, TextDataModule(**data).settings)
    expected = datamodule_text(**data)
    assert list(parts["train"].texts()) == expected["train"]
    assert list(parts["val"].texts()) == expected["val"]
    assert list(parts["train"].texts()) != [r.split("\t")[1] for r in rows[:40]]  # shuffled


@needs_corpus("the-verdict.txt")
def test_vocab_size_counts_endoftext_and_the_file_holds_bytes_then_merges(verdict_bpe):
    out, result = verdict_bpe
    ranks = read_ranks_file(out)
    assert sorted(ranks.values()) == list(range(299))
    assert {t for t, r in ranks.items() if r < 256} == {bytes([b]) for b in range(256)}
    assert TiktokenTokenizer(str(out), ranks).vocab_size == 300 == result["vocab_size"]
    # each learned token is a merge of two tokens ranked before it
    for token, rank in ranks.items():
        if rank >= 256:
            splits = [(token[:i], token[i:]) for i in range(1, len(token))]
            assert any(ranks.get(a, rank) < rank and ranks.get(b, rank) < rank for a, b in splits)


@needs_corpus("the-verdict.txt")
def test_the_first_merge_is_the_most_frequent_pair_of_bytes_in_the_training_text(verdict_bpe):
    out, _ = verdict_bpe
    verdict = data_dir() / "the-verdict.txt"
    train = datamodule_text(path=str(verdict))["train"]
    pairs: Counter[bytes] = Counter()
    for word in regex.findall(_GPT2_RE, train):  # counted here, without the trainer
        data = word.encode("utf-8")
        pairs.update(data[i : i + 2] for i in range(len(data) - 1))
    first = {r: t for t, r in read_ranks_file(out).items()}[256]
    assert pairs[first] == max(pairs.values())
    assert pairs[first] > sorted(pairs.values())[-3]  # a clear winner, not a tie broken somehow


@needs_corpus("the-verdict.txt")
def test_the_ranks_file_encodes_validation_text_exactly_as_the_trained_tokenizer(verdict_bpe):
    out, _ = verdict_bpe
    verdict = data_dir() / "the-verdict.txt"
    text = datamodule_text(path=str(verdict))
    trained = train_bpe([text["train"]], 299)  # trained again here, on the text read here
    assert tiktoken_ranks(trained) == read_ranks_file(out)
    ours = TiktokenTokenizer(str(out), read_ranks_file(out))
    val = text["val"].split("\n")
    agree, compared = same_ids(trained, ours.encoding, val)
    assert agree and compared == sum(len(ours.encode(line)) for line in val) > 300
    assert same_ids(trained, ours.encoding, [text["val"]])[0]  # whole, not line by line
    # negative control: the same tokens with the merges ranked in another order
    ranks = read_ranks_file(out)
    merged = [t for t, r in sorted(ranks.items(), key=lambda x: x[1]) if r >= 256]
    random.Random(0).shuffle(merged)
    shuffled = {t: r for t, r in ranks.items() if r < 256} | {
        t: 256 + i for i, t in enumerate(merged)
    }
    other = TiktokenTokenizer("shuffled.tiktoken", shuffled)
    assert same_ids(trained, other.encoding, val)[0] is False


def test_the_validation_part_is_never_learned_from(tmp_path: Path):
    # the file's order, half and half: the word only the validation half holds
    lines = ["plain words and more plain words"] * 20 + ["qxqxqx qxqxqx qxqxqx"] * 20
    corpus = tmp_path / "lines.txt"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    common = [f"data.path={corpus}", "data.split_lines=true", "data.split_seed=null"]
    half = "data.train_fraction=0.5"
    train_cli(tmp_path / "a.tiktoken", *common, half, vocab_size=280)
    assert not any(b"qx" in t for t in read_ranks_file(tmp_path / "a.tiktoken"))
    # control: the same text, validation half first, and "qx" is learned
    corpus.write_text("\n".join(lines[::-1]) + "\n", encoding="utf-8")
    train_cli(tmp_path / "b.tiktoken", *common, half, vocab_size=280)
    assert any(b"qx" in t for t in read_ranks_file(tmp_path / "b.tiktoken"))


@needs_corpus("the-verdict.txt")
@needs_tiktoken()
def test_bytes_per_token_on_the_validation_part(tmp_path: Path, capsys):
    out = tmp_path / "v.tiktoken"
    main(["train", *VERDICT, "vocab_size=300", f"out={out}", "compare=gpt2"])
    printed = capsys.readouterr().out
    val = datamodule_text(path=str(data_dir() / "the-verdict.txt"))["val"]
    nbytes = len(val.encode("utf-8"))
    for name, tokenizer in [
        (out.name, TiktokenTokenizer(str(out), read_ranks_file(out))),
        ("gpt2", TiktokenTokenizer("gpt2")),
    ]:
        tokens = len(tokenizer.encoding.encode_ordinary(val))
        row = f"{name:<28} {tokenizer.vocab_size:>7} {tokens:>12,} {nbytes / tokens:>12.3f}"
        assert row in printed
    assert f"{nbytes:,} bytes" in printed


def test_ranks_file_text_is_the_tiktoken_format(tmp_path: Path):
    ranks = {bytes([b]): b for b in range(256)} | {b"\xe1\x84": 256, b" the": 257}
    path = tmp_path / "x.tiktoken"
    path.write_text(ranks_file_text(ranks), encoding="ascii")
    assert read_ranks_file(path) == ranks
    lines = path.read_text().splitlines()
    assert lines[:2] == ["AA== 0", "AQ== 1"]
    assert lines[256:] == [base64.b64encode(b"\xe1\x84").decode() + " 256", "IHRoZQ== 257"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["vocab_size=256", "out=x.tiktoken"], "give vocab_size=N with N >= 257"),
        (["vocab_size=300"], "give the file to write: out=FILE.tiktoken"),
        (["vocab_size=300", "out=x.txt"], "does not end in .tiktoken"),
        (["vocab_size=300", "out=x.tiktoken", "vocab=3"], "unknown argument 'vocab=3'"),
        (["vocab_size=300", "out=x.tiktoken", "data=nope"], "Could not find 'data/nope'"),
        (["vocab_size=300", "out=x.tiktoken", "data.nokey=1"], "Could not override 'data.nokey'"),
    ],
)
def test_bad_arguments_are_one_line(tmp_path: Path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["train", *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 1
    assert err.startswith("lmlab-tokenizer: error: ") and message in err
    assert err.count("\n") == 1
    assert not list(tmp_path.iterdir())  # nothing written


def test_an_existing_file_is_kept_unless_overwrite_is_true(tmp_path: Path, tiny_corpus, capsys):
    out = tmp_path / "mine.tiktoken"
    out.write_text("precious\n")
    args = ["train", f"data.path={tiny_corpus}", "vocab_size=270", f"out={out}", "compare=none"]
    with pytest.raises(SystemExit):
        main(args)
    assert "exists; give another out=FILE, or overwrite=true" in capsys.readouterr().err
    assert out.read_text() == "precious\n"
    main([*args, "overwrite=true"])
    assert len(read_ranks_file(out)) == 269
    assert [p.name for p in tmp_path.iterdir() if p.name != "tiny.txt"] == ["mine.tiktoken"]


@pytest.mark.slow
def test_lmlab_train_trains_on_the_file(tmp_path: Path, tiny_corpus, tiny_train_cfg):
    from lmlab.train import train

    out = tmp_path / "tiny-300.tiktoken"
    train_cli(out, f"data.path={tiny_corpus}")
    summary = train(tiny_train_cfg(f"data.tokenizer={out}"))
    val = datamodule_text(path=str(tiny_corpus))["val"]
    ours = TiktokenTokenizer(str(out), read_ranks_file(out))
    assert summary["data"]["val"]["tokens"] == len(ours.encode(val))
    assert len(ours.encode(val)) < len(val.encode("utf-8"))  # merges were used
