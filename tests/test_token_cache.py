from __future__ import annotations

import errno
import io
import json
import logging
import os
import stat
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_TEXT, needs_tiktoken

from lmlab.atomic_write import host_name
from lmlab.data import tokenization
from lmlab.data.corpus import read_documents
from lmlab.data.datamodule import TextDataModule
from lmlab.data.token_cache import TokenCache, TokenSink
from lmlab.data.tokenization import encode_plain_text, fit_char_vocabulary, read_text_chunks
from lmlab.data.tokenizers import CharTokenizer, build_tokenizer

# Hangul (3 bytes each, in NFD: 2-3 jamo per syllable), CRLF, blank-line runs, digits, a
# 4-byte emoji: every piece edge of a tiny chunk size lands next to one of them.
MIXED_TEXT = (
    "영화가 정말 재밌어요\r\n최고의 영화!\n\n\n"
    + unicodedata.normalize("NFD", "한국어 문장입니다\n")
    + "To be, or not to be: that is the question.\n   \n"
    + "1234567 numbers 89\n😀 emoji line\ncafé au lait's\n"
) * 5


def make_dm(path: Path, cache_dir: Path | None, **kwargs) -> TextDataModule:
    dm = TextDataModule(path=str(path), cache_dir=str(cache_dir) if cache_dir else None, **kwargs)
    dm.setup("fit")
    return dm


def stream(dm: TextDataModule) -> list[int]:
    return torch.cat([dm.train_stream, dm.val_stream]).tolist()


def entries(cache_dir: Path, suffix: str = "*") -> list[Path]:
    return sorted(cache_dir.glob(f"*.{suffix}")) if cache_dir.is_dir() else []


def test_second_setup_loads_the_cache_without_tokenizing(
    tiny_corpus, tmp_path, monkeypatch, caplog
):
    cache = tmp_path / "tokens"
    caplog.set_level(logging.INFO, logger="lmlab")
    first = make_dm(tiny_corpus, cache)
    assert [p.suffix for p in entries(cache)] == [".bin", ".json"]
    assert "tokenized tiny.txt" in caplog.text and "cached at" in caplog.text

    def refuse(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(tokenization, "encode_plain_text", refuse)
    monkeypatch.setattr(tokenization, "fit_char_vocabulary", refuse)
    caplog.clear()
    second = make_dm(tiny_corpus, cache)
    assert "loaded from cache" in caplog.text
    assert stream(second) == stream(first)
    assert second.tokenizer.itos == first.tokenizer.itos
    assert second.parts == first.parts


def test_cached_and_fresh_tokenization_are_identical(tiny_corpus, tmp_path):
    fresh = make_dm(tiny_corpus, None)
    make_dm(tiny_corpus, tmp_path)
    cached = make_dm(tiny_corpus, tmp_path)
    assert stream(cached) == stream(fresh)
    assert cached.tokenizer.itos == fresh.tokenizer.itos
    assert cached.tokenizer.decode(stream(cached)) == TINY_TEXT
    x, y = cached.train_dataset[0]
    assert x.dtype == y.dtype == torch.long


def test_changed_content_or_settings_give_a_new_key(tiny_corpus, tmp_path, monkeypatch):
    make_dm(tiny_corpus, tmp_path)
    assert len(entries(tmp_path, "bin")) == 1
    tiny_corpus.write_text(TINY_TEXT.replace("Citizen", "Soldier"))  # same path, new content
    changed = make_dm(tiny_corpus, tmp_path)
    assert "Soldier" in changed.tokenizer.decode(stream(changed))
    assert len(entries(tmp_path, "bin")) == 2
    make_dm(tiny_corpus, tmp_path, normalize=None)
    assert len(entries(tmp_path, "bin")) == 3
    # documents are shuffled before the split: an entry per split seed, and per split
    kwargs = dict(split_lines=True, examples="documents", block_size=4)
    make_dm(tiny_corpus, tmp_path, **kwargs)
    make_dm(tiny_corpus, tmp_path, split_seed=7, **kwargs)
    assert len(entries(tmp_path, "bin")) == 5
    make_dm(tiny_corpus, tmp_path, train_fraction=0.8)
    assert len(entries(tmp_path, "bin")) == 6


@needs_tiktoken()
def test_bpe_stream_is_cached_with_its_character_count(tiny_corpus, tmp_path, monkeypatch):
    fresh = make_dm(tiny_corpus, None, tokenizer="gpt2", block_size=8)
    first = make_dm(tiny_corpus, tmp_path, tokenizer="gpt2", block_size=8)
    (bin_path,) = entries(tmp_path, "bin")
    assert "tiny-gpt2-" in bin_path.name and first.train_stream.dtype == torch.uint16
    assert len(entries(tmp_path, "bin")) == 1  # the char entry of other tests is elsewhere
    monkeypatch.setattr(tokenization, "encode_plain_text", pytest.fail)
    second = make_dm(tiny_corpus, tmp_path, tokenizer="gpt2", block_size=8)
    assert stream(second) == stream(first) == stream(fresh)
    assert second.parts == fresh.parts
    monkeypatch.undo()
    make_dm(tiny_corpus, tmp_path, tokenizer="cl100k_base", block_size=8)
    assert len(entries(tmp_path, "bin")) == 2  # another tokenizer, another key


@pytest.mark.parametrize("chunk_bytes", [1, 5, 16, 64])
def test_chunks_cut_nowhere_that_changes_the_text(tmp_path, chunk_bytes):
    path = tmp_path / "mixed.txt"
    path.write_bytes(MIXED_TEXT.encode("utf-8"))
    pieces = [text for _, text in read_text_chunks(path, chunk_bytes)]
    assert len(pieces) > 5
    assert "".join(pieces) == read_documents(path)[0]
    # each piece normalises alone as it does in the whole text (no jamo sequence split)
    whole = unicodedata.normalize("NFC", "".join(pieces))
    assert "".join(unicodedata.normalize("NFC", p) for p in pieces) == whole


@pytest.mark.parametrize("chunk_bytes", [3, 16, 64])
def test_streamed_char_tokens_equal_whole_text_tokens(tmp_path, chunk_bytes):
    path = tmp_path / "mixed.txt"
    path.write_bytes(MIXED_TEXT.encode("utf-8"))
    text = unicodedata.normalize("NFC", read_documents(path)[0])
    reference = CharTokenizer.fit(text)
    tokenizer = fit_char_vocabulary(path, "NFC", chunk_bytes=chunk_bytes)
    assert tokenizer.itos == reference.itos
    assert "한" in tokenizer.stoi and "\u1112" not in tokenizer.stoi  # syllables, not jamo
    sink = TokenSink(np.dtype(np.uint16))
    encode_plain_text(path, tokenizer, sink, "NFC", chunk_bytes=chunk_bytes)
    assert sink.finish()[0].tolist() == reference.encode(text).tolist()


@needs_tiktoken()
@pytest.mark.parametrize("encoding", ["gpt2", "cl100k_base"])
@pytest.mark.parametrize("chunk_bytes", [16, 64, 256])
def test_streamed_bpe_tokens_equal_whole_text_tokens(tmp_path, encoding, chunk_bytes):
    path = tmp_path / "mixed.txt"
    path.write_bytes((MIXED_TEXT + TINY_TEXT).encode("utf-8"))
    text = unicodedata.normalize("NFC", read_documents(path)[0])
    tokenizer = build_tokenizer(encoding)
    sink = TokenSink(np.dtype(np.uint32))
    encode_plain_text(path, tokenizer, sink, "NFC", chunk_bytes=chunk_bytes)
    assert sink.finish()[0].tolist() == tokenizer.encoding.encode_ordinary(text)


def test_read_only_cache_dir_falls_back_with_a_warning(tiny_corpus, tmp_path, caplog):
    blocked = tmp_path / "a_file"
    blocked.write_text("not a directory")  # even root cannot create a directory inside it
    with caplog.at_level(logging.WARNING, logger="lmlab"):
        dm = make_dm(tiny_corpus, blocked / "tokens")
    assert "cannot be written" in caplog.text and "without a cache" in caplog.text
    assert dm.tokenizer.decode(stream(dm)) == TINY_TEXT


def test_stale_or_partial_files_are_never_trusted(tiny_corpus, tmp_path):
    expected = stream(make_dm(tiny_corpus, tmp_path))
    (bin_path,) = entries(tmp_path, "bin")
    meta_path = bin_path.with_suffix(".json")
    # a killed run's temporary file, and a truncated entry (new files: the old ones are mapped)
    (tmp_path / f"{bin_path.name}.otherhost.1.x1y2.tmp").write_bytes(b"\xff" * 10)
    truncated = bin_path.read_bytes()[:100]
    bin_path.unlink()
    bin_path.write_bytes(truncated)
    assert stream(make_dm(tiny_corpus, tmp_path)) == expected
    assert bin_path.stat().st_size == len(TINY_TEXT)  # rewritten whole (uint8)
    assert len(list(tmp_path.glob("*.tmp"))) == 1  # another host's file: not ours to judge
    # a .bin without its sidecar (killed between the two renames) is tokenized again
    meta_path.unlink()
    bin_path.unlink()
    bin_path.write_bytes(b"\x00\x00" * len(TINY_TEXT))
    assert stream(make_dm(tiny_corpus, tmp_path)) == expected


def test_failed_tokenization_leaves_no_file(tmp_path, monkeypatch):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"good text\n" * 20 + b"\xff bad byte\n")
    monkeypatch.setattr(CharTokenizer, "piece_bytes", 16)
    # fail in the second pass, with tokens already written to the temporary file
    vocabulary = CharTokenizer.fit("good text\n bad byte")
    monkeypatch.setattr(tokenization, "fit_char_vocabulary", lambda *args: vocabulary)
    cache = tmp_path / "tokens"
    with pytest.raises(Exception, match="byte 200"):
        make_dm(path, cache)
    assert entries(cache) == []


def test_a_damaged_entry_is_rebuilt_and_the_log_says_so(tiny_corpus, tmp_path, caplog):
    expected = stream(make_dm(tiny_corpus, tmp_path))
    (bin_path,) = entries(tmp_path, "bin")
    damaged = bytearray(bin_path.read_bytes())
    damaged[100:104] = bytes([damaged[100] ^ 1, 0, 0, 0])  # same size, other tokens
    bin_path.unlink()  # a new file: the old one may still be mapped
    bin_path.write_bytes(bytes(damaged))
    with caplog.at_level(logging.WARNING, logger="lmlab"):
        rebuilt = make_dm(tiny_corpus, tmp_path)
    assert "is damaged" in caplog.text and "CRC-32" in caplog.text
    assert stream(rebuilt) == expected
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lmlab"):
        assert stream(make_dm(tiny_corpus, tmp_path)) == expected
    assert "loaded from cache" in caplog.text and "is damaged" not in caplog.text


def test_a_foreign_sidecar_is_not_trusted(tiny_corpus, tmp_path, caplog):
    expected = stream(make_dm(tiny_corpus, tmp_path))
    (meta_path,) = entries(tmp_path, "json")
    meta = json.loads(meta_path.read_text())
    meta["key"] = "0" * 20
    meta_path.write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="lmlab"):
        assert stream(make_dm(tiny_corpus, tmp_path)) == expected
    assert "another corpus or settings" in caplog.text


def test_cache_files_get_the_usual_mode(tiny_corpus, tmp_path):
    old = os.umask(0o022)
    try:
        make_dm(tiny_corpus, tmp_path / "tokens")
    finally:
        os.umask(old)
    modes = {p.suffix: stat.S_IMODE(p.stat().st_mode) for p in entries(tmp_path / "tokens")}
    assert modes == {".bin": 0o644, ".json": 0o644}  # other users of a shared cache read them


def test_a_full_disk_means_tokenizing_without_the_cache(tiny_corpus, tmp_path, monkeypatch, caplog):
    class FullDisk(io.RawIOBase):
        def __init__(self, file):
            self.file = file
            self.name = file.name

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            self.file.close()

    real_sink = TokenCache.sink

    def sink_on_a_full_disk(self, dtype):
        sink = real_sink(self, dtype)
        sink.file = FullDisk(sink.file)
        return sink

    expected = stream(make_dm(tiny_corpus, None))
    monkeypatch.setattr(TokenCache, "sink", sink_on_a_full_disk)
    with caplog.at_level(logging.WARNING, logger="lmlab"):
        dm = make_dm(tiny_corpus, tmp_path / "tokens")
    assert "No space left on device" in caplog.text and "without a cache" in caplog.text
    assert stream(dm) == expected
    assert list((tmp_path / "tokens").iterdir()) == []  # no entry, no temporary file


def test_temporaries_of_finished_processes_are_removed(tiny_corpus, tmp_path):
    make_dm(tiny_corpus, tmp_path)
    (bin_path,) = entries(tmp_path, "bin")
    bin_path.with_suffix(".json").unlink()  # force a rebuild, which cleans up first
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    host = host_name()
    dead = tmp_path / f"{bin_path.name}.{host}.{ended.pid}.aaaaaa.tmp"
    alive = tmp_path / f"{bin_path.name}.{host}.{os.getpid()}.bbbbbb.tmp"
    for tmp in (dead, alive):
        tmp.write_bytes(b"\x00" * 10)
    make_dm(tiny_corpus, tmp_path)
    assert not dead.exists()  # its writer is gone: a killed run's leftover
    assert alive.exists()  # a writer still running (here: this process) keeps its file
