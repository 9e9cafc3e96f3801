from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from conftest import data_dir, needs_corpus

from lmlab.data import corpus
from lmlab.data.corpus import BUILTIN_CORPORA, locate_builtin, read_documents
from lmlab.errors import LmlabError


def test_plain_text_is_one_document_or_one_per_line(tmp_path: Path):
    path = tmp_path / "names.txt"
    path.write_text("emma\nolivia\n\nava\n")
    assert read_documents(path) == ["emma\nolivia\n\nava\n"]
    assert read_documents(path, split_lines=True) == ["emma", "olivia", "ava"]


def test_tsv_column_with_bare_quotes(tmp_path: Path):
    path = tmp_path / "reviews.txt"
    path.write_text(
        'id\tdocument\tlabel\n1\t"최고" 영화\t1\n2\t\t0\n3\t별로\t0\n', encoding="utf-8"
    )
    assert read_documents(path, text_field="document") == ['"최고" 영화', "별로"]


def test_csv_column(tmp_path: Path):
    path = tmp_path / "data.csv"
    path.write_text('title,text\na,"hello, world"\nb,second\n')
    assert read_documents(path, text_field="text") == ["hello, world", "second"]


def test_jsonl_field(tmp_path: Path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "n": 1}) for t in ["one", "two"]) + "\n")
    assert read_documents(path, text_field="text") == ["one", "two"]


def test_missing_column_lists_the_columns(tmp_path: Path):
    path = tmp_path / "reviews.tsv"
    path.write_text("id\treview\n1\tgood\n")
    with pytest.raises(
        LmlabError, match=r"no column 'document'; its columns are \['id', 'review'\]"
    ):
        read_documents(path, text_field="document")


def test_missing_file_is_named():
    with pytest.raises(LmlabError, match="corpus file not found: /nonexistent.txt"):
        read_documents("/nonexistent.txt")


def test_empty_corpus_is_refused(tmp_path: Path):
    path = tmp_path / "empty.txt"
    path.write_text("")
    with pytest.raises(LmlabError, match="has no text"):
        read_documents(path)


def test_bytes_that_are_not_utf8_are_located_and_can_be_replaced(tmp_path: Path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café au lait".encode("latin-1"))
    with pytest.raises(LmlabError, match=r"not valid UTF-8 \(byte 3.*data.encoding_errors=replace"):
        read_documents(path)
    assert read_documents(path, encoding_errors="replace") == ["caf\ufffd au lait"]


@needs_corpus("tinyshakespeare.txt")
def test_builtin_corpus_is_found_in_the_data_dir_and_checked():
    path = locate_builtin("shakespeare", data_dir())
    assert path.name == "tinyshakespeare.txt"


def test_corrupt_builtin_corpus_is_refused(tmp_path: Path):
    (tmp_path / "names.txt").write_text("not the real names\n")
    with pytest.raises(LmlabError, match="SHA-256 .* delete it"):
        locate_builtin("names", tmp_path)


@needs_corpus("the-verdict.txt")
def test_missing_builtin_corpus_is_downloaded_and_verified(tmp_path: Path, monkeypatch):
    payload = (data_dir() / "the-verdict.txt").read_bytes()
    requested = []

    class FakeResponse(io.BytesIO):
        headers = {"Content-Length": str(len(payload))}

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def fake_urlopen(url, timeout):
        requested.append(url)
        return FakeResponse(payload)

    monkeypatch.setattr(corpus.urllib.request, "urlopen", fake_urlopen)
    path = locate_builtin("verdict", tmp_path / "fresh")
    assert requested == [BUILTIN_CORPORA["verdict"].url]
    assert path.read_bytes() == payload
    assert not list(path.parent.glob("*.part"))


def test_failed_download_leaves_no_partial_file(tmp_path: Path, monkeypatch):
    def refuse(url, timeout):
        raise OSError("network unreachable")

    monkeypatch.setattr(corpus.urllib.request, "urlopen", refuse)
    with pytest.raises(LmlabError, match="could not be downloaded .* download it by hand"):
        locate_builtin("names", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_unknown_builtin_corpus_lists_the_choices(tmp_path: Path):
    with pytest.raises(LmlabError, match="unknown built-in corpus 'wiki'"):
        locate_builtin("wiki", tmp_path)
