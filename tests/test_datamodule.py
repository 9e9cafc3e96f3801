from __future__ import annotations

import math
import unicodedata
from pathlib import Path

import hydra
import pytest
import torch
from conftest import TINY_TEXT, compose_train, data_dir, needs_corpus, needs_tiktoken

from lmlab.data import TextDataModule
from lmlab.data.examples import DocumentWindows, RandomBlockBatches, SlidingWindows
from lmlab.data.tokenizers import CharTokenizer
from lmlab.errors import LmlabError


def make_dm(path: Path, **kwargs) -> TextDataModule:
    dm = TextDataModule(path=str(path), **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def cut_after_nearest_newline(text: str, fraction: float) -> int:
    """Where a single-document ASCII text is split: after the line break nearest the fraction."""
    target = int(len(text) * fraction)
    return min((i + 1 for i, c in enumerate(text) if c == "\n"), key=lambda c: abs(c - target))


def test_a_single_text_is_split_nine_to_one_at_a_line_break(tiny_corpus: Path):
    dm = make_dm(tiny_corpus)
    cut = cut_after_nearest_newline(TINY_TEXT, 0.9)
    assert dm.tokenizer.decode(dm.train_stream.tolist()) == TINY_TEXT[:cut]
    assert dm.tokenizer.decode(dm.val_stream.tolist()) == TINY_TEXT[cut:]
    assert abs(cut - 0.9 * len(TINY_TEXT)) < 60  # a line of this text is shorter
    # one byte a character: compact on disk and in memory
    assert dm.train_stream.dtype == torch.uint8
    assert dm.vocab_size == len(set(TINY_TEXT))
    assert dm.part_summary()["val"] == {
        "documents": 1,
        "characters": len(TINY_TEXT) - cut,
        "bytes": len(TINY_TEXT) - cut,
        "tokens": len(TINY_TEXT) - cut,
    }


def test_train_fraction_is_configurable_and_checked(tiny_corpus: Path):
    dm = make_dm(tiny_corpus, train_fraction=0.5)
    assert len(dm.train_stream) == cut_after_nearest_newline(TINY_TEXT, 0.5)
    with pytest.raises(LmlabError, match="train_fraction must be between 0 and 1"):
        TextDataModule(path=str(tiny_corpus), train_fraction=1.0)
    with pytest.raises(LmlabError, match="test_fraction must be at least 0"):
        TextDataModule(path=str(tiny_corpus), train_fraction=0.9, test_fraction=0.1)


def test_random_blocks_have_targets_shifted_by_one(tiny_corpus: Path):
    dm = make_dm(tiny_corpus, block_size=16, batch_size=4)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (4, 16)
    assert x.dtype == y.dtype == torch.long
    stream = dm.train_stream.tolist()
    for row_x, row_y in zip(x.tolist(), y.tolist(), strict=False):
        assert row_y[:-1] == row_x[1:]
        start = next(i for i in range(len(stream)) if stream[i : i + 16] == row_x)
        assert stream[start + 1 : start + 17] == row_y


def test_random_batches_are_a_function_of_seed_and_step():
    stream = torch.arange(1000)
    a = RandomBlockBatches(stream, 8, 4, num_batches=10, seed=1)
    b = RandomBlockBatches(stream, 8, 4, num_batches=10, seed=1)
    c = RandomBlockBatches(stream, 8, 4, num_batches=10, seed=2)
    assert torch.equal(a[3][0], b[3][0])
    assert not torch.equal(a[3][0], a[4][0])
    assert not torch.equal(a[3][0], c[3][0])


def test_random_blocks_reach_the_last_token():
    stream = torch.arange(10)
    batch = RandomBlockBatches(stream, block_size=9, batch_size=2, num_batches=1, seed=0)[0]
    assert batch[1].max().item() == 9  # only one window fits, ending at the last token


def test_sliding_windows_step_by_stride():
    ds = SlidingWindows(torch.arange(20), block_size=4, stride=3)
    assert len(ds) == 6  # starts 0, 3, .., 15; the window at 15 needs tokens up to 19
    x, y = ds[2]
    assert x.tolist() == [6, 7, 8, 9]
    assert y.tolist() == [7, 8, 9, 10]


def test_sliding_examples_in_the_datamodule(tiny_corpus: Path):
    dm = make_dm(tiny_corpus, examples="sliding", block_size=8, stride=4, batch_size=2)
    assert len(dm.train_dataset) == (len(dm.train_stream) - 9) // 4 + 1
    x, y = next(iter(dm.train_dataloader()))
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_the_deprecated_data_sampling_still_works_and_says_so(tiny_corpus: Path, tmp_path: Path):
    kwargs = dict(block_size=8, stride=4, batch_size=2)
    new = make_dm(tiny_corpus, examples="sliding", **kwargs)
    deprecated = "data.sampling is deprecated: use data.examples=sliding"
    with pytest.warns(FutureWarning, match=deprecated):
        old = make_dm(tiny_corpus, sampling="sliding", **kwargs)
    assert old.examples == new.examples == "sliding"
    for a, b in zip(old.train_dataloader(), new.train_dataloader(), strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    cfg = compose_train([f"data.path={tiny_corpus}", "data.sampling=sliding"], tmp_path)
    with pytest.warns(FutureWarning, match=deprecated):
        assert hydra.utils.instantiate(cfg.data).examples == "sliding"
    with pytest.raises(LmlabError, match="keep data.examples and remove data.sampling"):
        TextDataModule(path=str(tiny_corpus), examples="random", sampling="sliding")
    with pytest.raises(LmlabError, match="data.examples must be one of"):
        TextDataModule(path=str(tiny_corpus), examples="windows")


def test_validation_covers_the_split_in_order(tiny_corpus: Path):
    dm = make_dm(tiny_corpus, block_size=8, batch_size=4)
    x, y = next(iter(dm.val_dataloader()))
    assert x[0].tolist() == dm.val_stream[:8].tolist()
    assert x[1].tolist() == dm.val_stream[8:16].tolist()


def test_corpus_shorter_than_one_block_is_refused(tmp_path: Path):
    path = tmp_path / "short.txt"
    path.write_text("just a few characters here")
    with pytest.raises(
        LmlabError, match="validation part of the corpus has 3 tokens, fewer than one"
    ):
        make_dm(path, block_size=8)


def test_bpc_factor_for_characters_is_one_over_ln2(tiny_corpus: Path):
    dm = make_dm(tiny_corpus)
    assert dm.bpc_factor == pytest.approx(1 / math.log(2))


def test_documents_never_share_a_window_and_padding_is_ignored():
    ds = DocumentWindows([torch.tensor([5, 6]), torch.tensor([7])], block_size=4, boundary_id=0)
    assert ds.x.tolist() == [[0, 5, 6, 0], [0, 7, 0, 0]]
    assert ds.y.tolist() == [[5, 6, 0, -1], [7, 0, -1, -1]]


def test_long_documents_continue_in_the_next_window():
    ds = DocumentWindows([torch.tensor([1, 2, 3, 4, 5])], block_size=4, boundary_id=0)
    assert ds.x.tolist() == [[0, 1, 2, 3], [4, 5, 0, 0]]
    assert ds.y.tolist() == [[1, 2, 3, 4], [5, 0, -1, -1]]


def test_documents_are_shuffled_with_a_fixed_seed_and_split_whole(tmp_path: Path):
    path = tmp_path / "names.txt"
    names = [f"name{chr(97 + i % 26)}{chr(97 + i // 26)}" for i in range(100)]
    path.write_text("\n".join(names) + "\n")
    kwargs = dict(split_lines=True, examples="documents", block_size=8, batch_size=4)
    dm = make_dm(path, seed=1, **kwargs)
    again = make_dm(path, seed=2, **kwargs)  # a different training seed, the same split
    decode = dm.tokenizer.decode
    train = [decode(d) for d in dm.train_documents]
    val = [decode(d) for d in dm.val_documents]
    assert len(train) == 90 and len(val) == 10
    assert sorted(train + val) == sorted(names)
    assert train != names[:90]  # shuffled, not the file order
    assert val == [again.tokenizer.decode(d) for d in again.val_documents]


@needs_tiktoken()
@needs_corpus("the-verdict.txt")
def test_bpe_verdict_has_gpt2_vocab_and_fewer_tokens_than_characters():
    dm = TextDataModule(corpus="verdict", tokenizer="gpt2", data_dir=str(data_dir()), block_size=32)
    dm.setup("fit")
    assert dm.vocab_size == 50257
    val = dm.parts["val"]
    assert 0.15 < val.tokens / val.characters < 0.4  # English BPE: about 4 characters a token
    assert dm.bpc_factor == pytest.approx(val.tokens / val.characters / math.log(2))
    assert dm.bpb_factor == pytest.approx(val.tokens / val.bytes / math.log(2))


@needs_corpus("nsmc_ratings_train.txt")
def test_korean_reviews_give_thousands_of_characters():
    dm = TextDataModule(corpus="nsmc", text_field="document", data_dir=str(data_dir()))
    dm.setup("fit")
    assert 1000 < dm.vocab_size < 4000
    assert "영" in dm.tokenizer.stoi


# -- bad inputs: one LmlabError that says what was wrong and what to do ------------------------
def test_empty_corpus_file_is_refused(tmp_path: Path):
    path = tmp_path / "empty.txt"
    path.write_text("")
    with pytest.raises(LmlabError, match=r"empty.txt has no text; give a file with some text"):
        make_dm(path, cache_dir=str(tmp_path / "tokens"))


def test_bytes_that_are_not_utf8_are_located_in_a_streamed_corpus(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(CharTokenizer, "piece_bytes", 64)  # the bad byte in a later piece
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"plain words here\n" * 30 + "café au lait\n".encode("latin-1"))
    with pytest.raises(
        LmlabError, match=r"not valid UTF-8 \(byte 513: .*data.encoding_errors=replace"
    ):
        make_dm(path)
    dm = make_dm(path, encoding_errors="replace")
    assert "\ufffd" in dm.tokenizer.stoi


def test_tsv_without_the_column_is_refused(tmp_path: Path):
    path = tmp_path / "reviews.tsv"
    path.write_text("id\treview\n" + "1\tgood film\n" * 50)
    with pytest.raises(
        LmlabError, match=r"no column 'document'; its columns are \['id', 'review'\]. Set data"
    ):
        make_dm(path, text_field="document")


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5])
def test_train_fraction_outside_zero_one_is_refused(tiny_corpus: Path, fraction: float):
    with pytest.raises(LmlabError, match=f"train_fraction must be between 0 and 1.*{fraction}"):
        TextDataModule(path=str(tiny_corpus), train_fraction=fraction)


def test_bpe_encoding_missing_offline_says_what_to_do(tiny_corpus, tmp_path, monkeypatch):
    import requests
    import tiktoken.registry

    def offline(*args, **kwargs):
        raise requests.ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    monkeypatch.setattr(requests, "get", offline)  # never download, even with a network
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # nothing loaded already
    empty = tmp_path / "empty_cache"
    empty.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(empty))
    with pytest.raises(LmlabError) as err:
        make_dm(tiny_corpus, tokenizer="cl100k_base")
    message = str(err.value)
    assert f"'cl100k_base': its BPE file is not in TIKTOKEN_CACHE_DIR (now {empty})" in message
    assert "could not be downloaded (ConnectionError: Failed to resolve" in message
    assert "To work offline, set TIKTOKEN_CACHE_DIR" in message and "ranks file" in message


def test_korean_in_nfd_is_normalised_to_one_character_per_syllable(tmp_path: Path):
    text = "영화가 정말 재밌어요\n최고의 영화!\n" * 20
    path = tmp_path / "nfd.txt"
    path.write_text(unicodedata.normalize("NFD", text), encoding="utf-8")
    dm = make_dm(path)
    assert "영" in dm.tokenizer.stoi and "\u110b" not in dm.tokenizer.stoi  # no lone jamo
    assert len(dm.train_stream) + len(dm.val_stream) == len(text)
    assert dm.tokenizer.decode(torch.cat([dm.train_stream, dm.val_stream]).tolist()) == text
