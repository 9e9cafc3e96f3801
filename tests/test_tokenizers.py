from __future__ import annotations

import base64
import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import needs_tiktoken

from lmlab.data.tokenizers import (
    EOT,
    RANKS_FILE_HELP,
    CharTokenizer,
    TiktokenTokenizer,
    build_tokenizer,
    tokenizer_from_state,
)
from lmlab.errors import LmlabError

# tiktoken names a cached download by the SHA-1 of its URL.
R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
BYTES = {bytes([b]): b for b in range(256)}


def write_ranks(path: Path, ranks: dict[bytes, int], *extra: bytes) -> Path:
    lines = [base64.b64encode(token) + b" %d" % rank for token, rank in ranks.items()]
    path.write_bytes(b"\n".join([*lines, *extra]) + b"\n")
    return path


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
    with pytest.raises(
        LmlabError, match=r"2 character\(s\) that are not in the vocabulary: 'x', 'z'"
    ):
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
    ids, lengths = tok.encode_documents(["Hello", "world"])
    assert lengths.tolist() == [len(tok.encode("Hello")), len(tok.encode("world"))]
    assert ids.tolist() == [*tok.encode("Hello"), 50256, *tok.encode("world")]
    assert tok.decode(ids) == f"Hello{EOT}world"


@needs_tiktoken()
def test_endoftext_in_text_is_allowed_as_special_token():
    tok = build_tokenizer("gpt2")
    assert tok.encode(f"a{EOT}b").tolist()[1] == 50256


@needs_tiktoken()
def test_local_ranks_file_gives_the_same_encoding(tmp_path: Path):
    cached = Path(os.environ["TIKTOKEN_CACHE_DIR"]) / hashlib.sha1(R50K_URL.encode()).hexdigest()
    if not cached.is_file():
        pytest.skip("r50k_base is not in TIKTOKEN_CACHE_DIR")
    ranks = shutil.copy(cached, tmp_path / "gpt2.tiktoken")
    tok = build_tokenizer(str(ranks))
    reference = build_tokenizer("r50k_base")
    assert (tok.vocab_size, tok.boundary_id) == (50257, 50256)
    # contractions, numbers, runs of spaces, punctuation, other scripts: the split pattern
    text = (
        "It had always been his fate -- I'd say so -- to have his name mentioned 1,234 times."
        "\n\n   Tabs\tand  spaces;  you'll see 42nd!  café 영화 😀 <|endoftext|>\n"
    )
    assert tok.encode(text).tolist() == reference.encode(text).tolist()
    restored = tokenizer_from_state(tok.state())
    assert restored.encode(text).tolist() == reference.encode(text).tolist()


def test_a_ranks_file_replaced_at_the_same_path_is_read_again(tmp_path: Path, monkeypatch):
    # A writable tiktoken cache: tiktoken's own loader would copy the first file into it
    # and go on using that copy.
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    path = tmp_path / "mine.tiktoken"
    write_ranks(path, {**BYTES, b"he": 256})
    assert build_tokenizer(str(path)).encode("hehe").tolist() == [256, 256]
    write_ranks(path, {**BYTES, b"ll": 256})
    tok = build_tokenizer(str(path))
    assert tok.encode("hehe").tolist() == [104, 101, 104, 101]
    assert tok.encode("hello").tolist() == [104, 101, 256, 111]
    assert list(cache.iterdir()) == []


def test_endoftext_follows_the_largest_rank_and_gapped_ranks_survive_a_checkpoint(
    tmp_path: Path,
):
    # Ranks need not be 0..n-1: <|endoftext|> gets max + 1, never a rank that a token has.
    path = write_ranks(tmp_path / "gaps.tiktoken", {**BYTES, b"he": 300, b"ll": 257})
    tok = build_tokenizer(str(path))
    assert tok.boundary_id == 301 and tok.vocab_size == 302
    ids = tok.encode(f"hello{EOT}").tolist()
    assert ids == [300, 257, 111, 301]
    restored = tokenizer_from_state(tok.state())
    assert restored.encode(f"hello{EOT}").tolist() == ids
    assert restored.boundary_id == 301
    assert restored.decode(ids) == f"hello{EOT}"
    # an id in a gap has a row in the model and may be sampled: it decodes to U+FFFD
    assert tok.decode([104, 280, 105]) == "h\ufffdi"


def test_ranks_files_in_the_usual_variants_are_read(tmp_path: Path):
    lines = [base64.b64encode(t) + b" %d" % r for t, r in {**BYTES, b"he": 256}.items()]
    path = tmp_path / "windows.tiktoken"
    path.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(lines[:100] + [b"", b"  "] + lines[100:]))
    assert build_tokenizer(str(path)).encode("hehe").tolist() == [256, 256]


BAD_RANKS_FILES = {
    "one field": (b"IQ==\n", "line 1 has 1 field, not 2: 'IQ=='"),
    "three fields": (b"IQ== 0 1\n", "line 1 has 3 fields, not 2: 'IQ== 0 1'"),
    "bad base64": (b"IQ== 0\n@@x 1\n", "line 2 token '@@x' is not base64"),
    "bad padding": (b"IQ 0\n", "line 1 token 'IQ' is not base64"),
    "a word as rank": (b"IQ== zero\n", "line 1 rank 'zero' is not a whole number"),
    "a negative rank": (b"IQ== -1\n", "line 1 rank '-1' is not a whole number"),
    "a fraction as rank": (b"IQ== 1.5\n", "line 1 rank '1.5' is not a whole number"),
    "a rank too large": (
        b"IQ== 4294967295\n",
        "line 1 rank '4294967295' is above 4294967294, the largest tiktoken takes",
    ),
    "a thousand-digit rank": (b"IQ== " + b"9" * 1000 + b"\n", "is above 4294967294"),
    "a repeated token": (b"IQ== 0\nIg== 1\nIQ== 2\n", "line 3 token IQ== is also on line 1"),
    "a repeated rank": (b"IQ== 0\nIg== 1\nIw== 1\n", "line 3 rank 1 is also on line 2"),
    "not UTF-8": (b"IQ== 0\nY2Fm\xe9 1\n", "line 2 is not UTF-8 text"),
    "binary junk": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "line 1 is not UTF-8 text"),
    "binary junk that is UTF-8": (b"\x00\x00\x00 \x01\n", "line 1 token '\\x00\\x00\\x00' is not"),
    "an empty file": (b"", "it has no tokens"),
    "only blank lines": (b"\n \n\t\n", "it has no tokens"),
}


@pytest.mark.parametrize("content, message", BAD_RANKS_FILES.values(), ids=BAD_RANKS_FILES.keys())
def test_a_bad_ranks_file_is_one_clear_error(tmp_path: Path, content: bytes, message: str):
    path = tmp_path / "bad.tiktoken"
    path.write_bytes(content)
    with pytest.raises(LmlabError) as info:
        build_tokenizer(str(path))
    assert type(info.value) is LmlabError
    text = str(info.value)
    assert text.startswith(f"{path} is not a tiktoken ranks file: ")
    assert message in text
    assert text.endswith(RANKS_FILE_HELP)


def test_a_ranks_file_without_every_byte_is_refused_before_tiktoken_panics(tmp_path: Path):
    # tiktoken builds such an encoding, then panics (a Rust panic) on text with the byte
    ranks = {token: rank for token, rank in BYTES.items() if token not in (b"h", b"\x00")}
    path = write_ranks(tmp_path / "partial.tiktoken", ranks)
    with pytest.raises(LmlabError) as info:
        build_tokenizer(str(path))
    assert type(info.value) is LmlabError
    assert str(info.value) == (
        f"{path} is not a complete tiktoken ranks file: 2 (0x00, 0x68) of the 256 single bytes "
        f"have no token, so text with them could not be encoded; {RANKS_FILE_HELP}"
    )


def test_unusable_ranks_in_a_checkpoint_are_refused_before_tiktoken_panics():
    tokens = [base64.b64encode(bytes([b])).decode() for b in range(256)]
    shared = {
        "kind": "tiktoken",
        "name": "x.tiktoken",
        "ranks": tokens,
        "rank_values": [0, *range(255)],
    }
    with pytest.raises(LmlabError, match="x.tiktoken are not usable: two tokens share a rank"):
        tokenizer_from_state(shared)
    partial = {"kind": "tiktoken", "name": "x.tiktoken", "ranks": tokens[1:]}
    with pytest.raises(LmlabError, match=r"1 \(0x00\) of the 256 single bytes have no token"):
        tokenizer_from_state(partial)


def test_unloadable_encoding_says_how_to_provide_it():
    with pytest.raises(LmlabError, match="TIKTOKEN_CACHE_DIR.*ranks file"):
        TiktokenTokenizer("no_such_encoding")


def test_missing_ranks_file_is_named():
    with pytest.raises(LmlabError, match="ranks file not found: .*missing.tiktoken"):
        build_tokenizer("/nowhere/missing.tiktoken")
