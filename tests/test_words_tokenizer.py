"""`data.tokenizer=words`: Raschka's SimpleTokenizerV2, its vocabulary fitted on the training
part only, and the unknown rate that says how much `<|unk|>` flatters a word model."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import compose_train, data_dir, needs_corpus, run_lmlab

from lmlab.data import TextDataModule
from lmlab.data.token_cache import TokenSink
from lmlab.data.tokenization import encode_plain_text
from lmlab.data.tokenizers import EOT, UNK, WordTokenizer, tokenizer_from_state
from lmlab.errors import LmlabError

# The opening of Edith Wharton's "The Verdict" (1908), the tutorial's corpus.
VERDICT = (
    "I HAD always thought Jack Gisburn rather a cheap genius--though a good fellow enough--so "
    "it was no great surprise to me to hear that, in the height of his glory, he had dropped "
    "his painting, married a rich widow, and established himself in a villa on the Riviera. "
    "(Though I rather thought it would have been Rome or Florence.)\n\n"
    '"The height of his glory"--that was what the women called it. I can hear Mrs. Gideon '
    "Thwing--his last Chicago sitter--deploring his unaccountable abdication. \"Of course it's "
    "going to send the value of my picture 'way up; but I don't think of that, Mr. Rickham--"
    "the loss to Arrt is all I think of.\" The word, on Mrs. Thwing's lips, multiplied its _rs_ "
    "as though they were reflected in an endless vista of mirrors. And it was not only the Mrs. "
    "Thwings who mourned. Had not the exquisite Hermia Croft, at the last Grafton Gallery show, "
    'stopped me before Gisburn\'s "Moon-dancers" to say, with tears in her eyes: "We shall not '
    'look upon its like again"?\n'
)


class SimpleTokenizerV2:
    """The tutorial's class (Raschka, "Build a Large Language Model (From Scratch)", ch. 2),
    as printed there: the independent implementation the word tokenizer must match."""

    def __init__(self, vocab: dict[str, int]):
        self.str_to_int = vocab
        self.int_to_str = {i: s for s, i in vocab.items()}

    def encode(self, text: str) -> list[int]:
        preprocessed = re.split(r'([,.:;?_!"()\']|--|\s)', text)
        preprocessed = [item.strip() for item in preprocessed if item.strip()]
        preprocessed = [item if item in self.str_to_int else "<|unk|>" for item in preprocessed]
        return [self.str_to_int[s] for s in preprocessed]

    def decode(self, ids: list[int]) -> str:
        text = " ".join([self.int_to_str[i] for i in ids])
        return re.sub(r'\s+([,.:;?!"()\'])', r"\1", text)


def tutorial_words(text: str) -> list[str]:
    preprocessed = re.split(r'([,.:;?_!"()\']|--|\s)', text)
    return [item.strip() for item in preprocessed if item.strip()]


def tutorial_vocab(text: str) -> dict[str, int]:
    all_tokens = sorted(set(tutorial_words(text)))
    all_tokens.extend(["<|endoftext|>", "<|unk|>"])
    return {token: integer for integer, token in enumerate(all_tokens)}


def words_dm(**kwargs) -> TextDataModule:
    # parts of a few words: a block of 2 fits each
    dm = TextDataModule(tokenizer="words", cache_dir=None, block_size=2, **kwargs)
    dm.setup("fit")
    return dm


TEA = " <|endoftext|> ".join(("Hello, do you like tea?", "In the sunlit terraces of the palace."))


def check_matches_the_tutorial(raw_text: str, tea_decoded: str) -> None:
    """Vocabulary, ids and decoding as the tutorial's on `raw_text` and its example `TEA`,
    which decodes to `tea_decoded` (words outside the story are <|unk|>)."""
    reference = SimpleTokenizerV2(tutorial_vocab(raw_text))
    tok = WordTokenizer.fit(raw_text)
    assert tok.stoi == reference.str_to_int
    for sample in (TEA, raw_text):
        ids = tok.encode(sample)
        assert ids.tolist() == reference.encode(sample)
        assert tok.decode(ids) == reference.decode(reference.encode(sample))
    assert tok.decode(tok.encode(TEA)) == tea_decoded


def test_split_ids_and_decoding_match_the_tutorials_simple_tokenizer_v2():
    check_matches_the_tutorial(
        VERDICT,
        "<|unk|>, <|unk|> <|unk|> like <|unk|>? <|endoftext|> <|unk|> the <|unk|> <|unk|> of the "
        "<|unk|>.",
    )
    # decoding keeps the tutorial's quirks: words joined by spaces, "--" spaced out
    decoded = WordTokenizer.fit(VERDICT).decode(WordTokenizer.fit(VERDICT).encode(VERDICT))
    assert decoded.startswith("I HAD always thought Jack Gisburn rather a cheap genius -- though")


@needs_corpus("the-verdict.txt")
def test_the_whole_verdict_matches_the_tutorial_and_pieces_change_no_token(tmp_path: Path):
    path = data_dir() / "the-verdict.txt"
    raw_text = path.read_text(encoding="utf-8")
    # the tutorial's printed output for its example
    check_matches_the_tutorial(
        raw_text, "<|unk|>, do you like tea? <|endoftext|> In the sunlit terraces of the <|unk|>."
    )
    # tokenized from the file in 200-byte pieces, as a big corpus is: the same ids
    tok = WordTokenizer.fit(raw_text)
    sink = TokenSink(np.dtype(np.uint16))
    encode_plain_text(path, tok, sink, None, chunk_bytes=200)
    (ids,) = sink.finish()
    assert ids.tolist() == SimpleTokenizerV2(tok.stoi).encode(raw_text)


def test_the_vocabulary_comes_from_the_training_part_only(tmp_path: Path):
    lines = ["the cat sat on the mat."] * 9 + ["the zebra sat on the mat."]
    path = tmp_path / "text.txt"
    path.write_text("\n".join(lines) + "\n")
    dm = words_dm(path=str(path))
    assert dm.parts["val"].characters == len(lines[-1]) + 1  # the last line validates
    assert set(dm.tokenizer.itos) == {"the", "cat", "sat", "on", "mat", ".", EOT, UNK}
    val = dm.val_stream.tolist()
    assert dm.tokenizer.decode(val) == "the <|unk|> sat on the mat."
    # negative control: a vocabulary from all the text would know the zebra
    everything = WordTokenizer.fit(path.read_text())
    assert UNK not in everything.decode(everything.encode(lines[-1]))


def test_documents_fit_the_vocabulary_on_their_training_part(tmp_path: Path):
    names = [f"name{i} likes cats" for i in range(20)]  # name18 and name19 validate
    path = tmp_path / "names.txt"
    path.write_text("\n".join(names) + "\n")
    dm = words_dm(path=str(path), split_lines=True, split_seed=None)
    assert set(dm.tokenizer.itos) == {f"name{i}" for i in range(18)} | {"likes", "cats", EOT, UNK}
    assert dm.tokenizer.decode(dm.val_stream.tolist()) == (
        "<|unk|> likes cats <|endoftext|> <|unk|> likes cats"
    )
    # 2 of the 6 word tokens; the boundary between the two documents is not a word
    assert dm.unknown_rates["val"] == pytest.approx(2 / 6)
    assert dm.unknown_rates["train"] == 0.0


def test_min_count_drops_words_seen_fewer_times(tmp_path: Path):
    text = "a rose is a rose is a rose , said Gertrude Stein\n" * 3 + "once only here\n"
    counts = Counter(tutorial_words(text))
    assert WordTokenizer.fit(text).itos[:-2] == sorted(counts)  # negative control: all kept
    for min_count in (2, 4):
        kept = WordTokenizer.fit(text, min_count=min_count).itos
        assert kept == sorted(w for w, n in counts.items() if n >= min_count) + [EOT, UNK]
    assert "once" not in WordTokenizer.fit(text, min_count=2).stoi
    with pytest.raises(LmlabError, match="data.min_count must be a whole number >= 1"):
        TextDataModule(path="x.txt", tokenizer="words", min_count=0)


def test_unknown_rate_equals_an_independent_count(tmp_path: Path):
    train = ["the old man and the sea", "the sun also rises", "a farewell to arms"] * 3
    val = ["the old man and the river", "for whom the bell tolls"]
    path = tmp_path / "books.txt"
    path.write_text("\n".join(train + val) + "\n")
    dm = words_dm(path=str(path), split_lines=True, split_seed=None, train_fraction=9 / 11)
    known = set(tutorial_words(" ".join(train)))
    words = tutorial_words(" ".join(val))
    expected = sum(w not in known for w in words) / len(words)  # river, for, whom, bell, tolls
    assert expected == 5 / 11
    assert dm.unknown_rates["val"] == pytest.approx(expected)


def test_min_count_is_part_of_the_cache_key(tmp_path: Path):
    path = tmp_path / "text.txt"
    path.write_text("a a b\n" * 9 + "a c\n")
    cache = tmp_path / "cache"
    settings = {"cache_dir": cache, "block_size": 1}  # validation is "a c": 2 words
    vocabularies = []
    for min_count in (1, 10, 1):  # the last one is loaded from the first one's entry
        dm = TextDataModule(path=str(path), tokenizer="words", min_count=min_count, **settings)
        dm.setup("fit")
        vocabularies.append(dm.tokenizer.itos)
    # "b" is seen 9 times in the training part, "c" only in validation
    assert vocabularies == [["a", "b", EOT, UNK], ["a", EOT, UNK], ["a", "b", EOT, UNK]]
    assert len(list(cache.glob("*.json"))) == 2
    # it changes no other tokenizer's tokens: a char entry is shared whatever the min_count
    for min_count in (1, 10):
        TextDataModule(path=str(path), min_count=min_count, **settings).setup("fit")
    assert len(list(cache.glob("*.json"))) == 3


def test_state_is_plain_data_and_survives_a_weights_only_load(tmp_path: Path):
    tok = WordTokenizer.fit(VERDICT, min_count=2)
    torch.save({"tokenizer_state": tok.state()}, tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)["tokenizer_state"]
    assert state == {"kind": "words", "words": tok.itos}
    restored = tokenizer_from_state(state)
    assert isinstance(restored, WordTokenizer) and restored.itos == tok.itos
    ids = restored.encode(VERDICT)
    assert ids.tolist() == tok.encode(VERDICT).tolist()
    assert restored.decode(ids) == tok.decode(ids)
    with pytest.raises(LmlabError, match="must list each word once and end with"):
        tokenizer_from_state({"kind": "words", "words": ["a", "b"]})


# -- a real run ----------------------------------------------------------------------------
RUN = [
    "model=bigram",
    "trainer.accelerator=cpu",
    "trainer.max_steps=5",
    "trainer.val_check_interval=5",
]
RUN += ["trainer.enable_progress_bar=false", "callbacks.sample_text.max_new_tokens=5"]


@pytest.fixture(scope="module")
def words_and_char_runs(tmp_path_factory) -> dict[str, Path]:
    """Run directories of 5-step bigram runs on tiny Shakespeare, in words and in characters."""
    from lmlab.train import train

    root = tmp_path_factory.mktemp("words_runs")
    for data in ("shakespeare_words", "shakespeare_char"):
        train(compose_train([f"data={data}", *RUN], root / data))
    return {"words": root / "shakespeare_words", "char": root / "shakespeare_char"}


@pytest.mark.slow
@needs_corpus("tinyshakespeare.txt")
def test_a_words_run_reports_its_unknown_rate_and_is_scored_on_the_chars_text(
    words_and_char_runs: dict[str, Path],
):
    words, char = (
        json.loads((words_and_char_runs[k] / "metrics.json").read_text()) for k in ("words", "char")
    )
    assert words["status"] == "completed"
    # the same validation text: documents, characters and bytes; other tokens
    for part in ("train", "val"):
        for key in ("documents", "characters", "bytes"):
            assert words["data"][part][key] == char["data"][part][key]
    val = words["data"]["val"]
    assert val["tokens"] < char["data"]["val"]["tokens"] / 3
    bits = words["val/loss"] * val["tokens"] / math.log(2)
    assert words["val/bpc"] == pytest.approx(bits / val["characters"], rel=1e-5)
    assert words["val/bpb"] == pytest.approx(bits / val["bytes"], rel=1e-5)
    # the unknown rate, counted here with the tutorial's split from the text itself
    text = (data_dir() / "tinyshakespeare.txt").read_text(encoding="utf-8")
    cut = char["data"]["train"]["characters"]
    known = set(tutorial_words(text[:cut]))
    val_words = tutorial_words(text[cut:])
    assert len(val_words) == val["tokens"]
    unknown = sum(w not in known for w in val_words)
    assert unknown > 0
    assert words["val/unknown_rate"] == pytest.approx(unknown / len(val_words))
    assert "val/unknown_rate" not in char  # only a tokenizer with <|unk|> has one


@pytest.mark.slow
@needs_corpus("tinyshakespeare.txt")
def test_lmlab_sample_decodes_a_words_checkpoint(words_and_char_runs: dict[str, Path]):
    ckpt = words_and_char_runs["words"] / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)["hyper_parameters"]["tokenizer_state"]
    vocabulary = set(state["words"])
    result = run_lmlab(
        "sample", f"ckpt_path={ckpt}", "prompt=First Citizen:", "max_new_tokens=12", "device=cpu"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    text = result.stdout.strip()
    assert text.startswith("First Citizen:")
    continuation = tutorial_words(text)[3:]
    # 12 tokens, each a word of the vocabulary: decoding only removes spaces before punctuation,
    # so the tutorial's split finds them again
    assert len(continuation) == 12
    assert all(w in vocabulary for w in continuation)
