"""The text is split before tokenizing: every tokenizer sees, and is scored on, the same text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import data_dir, needs_corpus, needs_tiktoken

from lmlab.data import TextDataModule
from lmlab.errors import LmlabError


def make_dm(**kwargs) -> TextDataModule:
    dm = TextDataModule(**kwargs)
    dm.setup("fit")
    return dm


def decoded(dm: TextDataModule, part: str) -> str:
    stream = {"train": dm.train_stream, "val": dm.val_stream, "test": dm.test_stream}[part]
    return dm.tokenizer.decode(stream.tolist())


@needs_tiktoken()
@needs_corpus("tinyshakespeare.txt")
@pytest.mark.parametrize("test_fraction", [0.0, 0.1])
def test_characters_and_bpe_are_scored_on_the_same_text(test_fraction: float):
    common = dict(
        corpus="shakespeare",
        data_dir=str(data_dir()),
        train_fraction=0.9 - test_fraction,
        test_fraction=test_fraction,
    )
    char = make_dm(tokenizer="char", **common)
    bpe = make_dm(tokenizer="gpt2", **common)
    parts = ["train", "val"] + (["test"] if test_fraction else [])
    assert list(char.parts) == list(bpe.parts) == parts
    for part in parts:
        # the BPE tokens decode to exactly the characters the char model is scored on
        assert decoded(bpe, part) == decoded(char, part)
        for key in ("documents", "characters", "bytes"):
            assert getattr(bpe.parts[part], key) == getattr(char.parts[part], key)
        assert bpe.parts[part].tokens < char.parts[part].tokens  # a BPE token: ~3 characters
    text = (data_dir() / "tinyshakespeare.txt").read_text()
    assert "".join(decoded(char, part) for part in parts) == text
    val = char.parts["val"]
    share = 0.1  # validation: the tenth before the test part, if there is one
    assert abs(val.characters / len(text) - share) < 0.001  # cut at a line near the fraction
    assert decoded(char, "train").endswith("\n")  # ... just after a line break


def three_line_documents(n: int) -> list[str]:
    return [f"document {i}\nsecond line of {i}\nthird, with more words {i * 7}" for i in range(n)]


def test_documents_holding_line_breaks_split_nine_to_one(tmp_path: Path):
    documents = three_line_documents(1000)
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    dm = make_dm(path=str(path), text_field="text", examples="documents", block_size=64)
    train, val = dm.parts["train"], dm.parts["val"]
    assert (train.documents, val.documents) == (900, 100)
    assert abs(train.characters / (train.characters + val.characters) - 0.9) < 0.01
    read = [dm.tokenizer.decode(d.tolist()) for d in dm.train_documents + dm.val_documents]
    assert sorted(read) == sorted(documents)  # whole documents, line breaks and all
    assert len(dm.val_dataset) == 100  # one window per document: none is cut at its `\n`


def test_a_test_part_holds_out_whole_documents(tmp_path: Path):
    names = [f"name{i:03d}" for i in range(200)]
    path = tmp_path / "names.txt"
    path.write_text("\n".join(names) + "\n")
    dm = make_dm(
        path=str(path),
        split_lines=True,
        examples="documents",
        block_size=8,
        train_fraction=0.8,
        test_fraction=0.1,
    )
    counts = {name: part.documents for name, part in dm.parts.items()}
    assert counts == {"train": 160, "val": 20, "test": 20}
    parts = [decoded(dm, part).split("\n") for part in ("train", "val", "test")]
    assert sorted(sum(parts, [])) == names
    assert parts[2] == [dm.tokenizer.decode(d.tolist()) for d in dm.documents["test"]]
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape[1] == 8


def test_a_single_text_splits_into_three_parts_at_line_breaks(tiny_corpus: Path):
    dm = make_dm(path=str(tiny_corpus), train_fraction=0.8, test_fraction=0.1)
    text = tiny_corpus.read_text()
    pieces = [decoded(dm, part) for part in ("train", "val", "test")]
    assert "".join(pieces) == text
    assert all(piece.endswith("\n") for piece in pieces)
    shares = [len(piece) / len(text) for piece in pieces]
    assert shares == pytest.approx([0.8, 0.1, 0.1], abs=0.02)


def test_no_test_part_unless_asked(tiny_corpus: Path):
    dm = make_dm(path=str(tiny_corpus))
    assert dm.test_stream is None and list(dm.parts) == ["train", "val"]
    with pytest.raises(LmlabError, match="set data.test_fraction"):
        dm.test_dataloader()


def test_too_few_documents_to_split_are_refused(tmp_path: Path):
    path = tmp_path / "three.txt"
    path.write_text("anna\nbob\ncarl\n")
    with pytest.raises(LmlabError, match="3 document\\(s\\), too few to split"):
        make_dm(path=str(path), split_lines=True, examples="documents", test_fraction=0.05)


def test_a_text_without_line_breaks_is_cut_between_characters(tmp_path: Path):
    path = tmp_path / "one_line.txt"
    text = "한국어 " * 300  # no line break: cut before the ASCII space nearest 90%
    path.write_text(text)
    dm = make_dm(path=str(path), block_size=4)
    assert decoded(dm, "train") + decoded(dm, "val") == text
    assert decoded(dm, "val").startswith(" ")
