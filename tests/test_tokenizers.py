from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED, needs_tiktoken

from lmlab.data.tokenizers import (
    EOT,
    CharTokenizer,
    TiktokenTokenizer,
    build_tokenizer,
    tokenizer_from_state,
)
from lmlab.errors import LmlabError


def test_char_vocabulary_is_sorted_distinct_characters():
    tok = CharTokenizer.fit("hello world")
    assert tok.itos == sorted(set("hello world\n"))
    assert tok.stoi["h"] == tok.itos.index("h")
    assert tok.vocab_size == len(tok.itos)


def test_char_encode_matches_tutorial_list_comprehension_and_round_trips():
    text = "To be, or not to be: that is the question.\n" * 50
    tok = CharTokenizer.fit(text)
    ids = tok.encode(text)
    assert ids.dtype == np.int64
    assert ids.tolist() == [tok.stoi[c] for c in text]
    assert tok.decode(ids) == text


def test_char_tokenizer_handles_korean():
    text = "영화가 정말 재밌어요\n최고의 영화!"
    tok = CharTokenizer.fit(text)
    assert tok.decode(tok.encode(text)) == text
    assert "영" in tok.stoi


def test_unknown_characters_are_named_in_the_error():
    tok = CharTokenizer.fit("abc")
    with pytest.raises(LmlabError, match=r"2 character\(s\) outside the vocabulary: 'x', 'z'"):
        tok.encode("abxcz")


def test_char_state_is_plain_data_and_restores():
    tok = CharTokenizer.fit("hello")
    state = tok.state()
    assert state == {"kind": "char", "chars": ["\n", "e", "h", "l", "o"]}
    assert tokenizer_from_state(state).encode("hole").tolist() == tok.encode("hole").tolist()


@needs_tiktoken()
def test_gpt2_loads_offline_as_r50k_with_endoftext():
    tok = build_tokenizer("gpt2")
    assert tok.vocab_size == 50257
    assert tok.boundary_id == 50256
    assert tok.decode(tok.encode("Hello world")) == "Hello world"


@needs_tiktoken()
def test_documents_are_joined_with_endoftext():
    tok = build_tokenizer("gpt2")
    ids = tok.encode_documents(["Hello", "world"])
    assert ids.tolist() == [*tok.encode("Hello"), 50256, *tok.encode("world")]
    assert tok.decode(ids) == f"Hello{EOT}world"


@needs_tiktoken()
def test_endoftext_in_text_is_allowed_as_special_token():
    tok = build_tokenizer("gpt2")
    assert tok.encode(f"a{EOT}b").tolist()[1] == 50256


@needs_tiktoken()
def test_local_ranks_file_gives_the_same_encoding(tmp_path: Path):
    ranks = tmp_path / "gpt2.tiktoken"
    shutil.copy(SHARED / "tiktoken_cache" / "0ea1e91bbb3a60f729a8dc8f777fd2fc07cd8df4", ranks)
    tok = build_tokenizer(str(ranks))
    reference = build_tokenizer("r50k_base")
    text = "It had always been his fate to have his name mentioned."
    assert tok.encode(text).tolist() == reference.encode(text).tolist()
    restored = tokenizer_from_state(tok.state())
    assert restored.encode(text).tolist() == reference.encode(text).tolist()


def test_unloadable_encoding_says_how_to_provide_it():
    with pytest.raises(LmlabError, match="TIKTOKEN_CACHE_DIR.*ranks file"):
        TiktokenTokenizer("no_such_encoding")


def test_missing_ranks_file_is_named():
    with pytest.raises(LmlabError, match="ranks file not found: .*missing.tiktoken"):
        build_tokenizer("/nowhere/missing.tiktoken")
