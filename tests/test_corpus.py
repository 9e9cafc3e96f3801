from __future__ import annotations

import email.message
import hashlib
import io
import json
import lzma
import re
from pathlib import Path

import pytest
import torch.hub
from conftest import data_dir, needs_corpus

from lmlab.data import corpus as corpus_module
from lmlab.data.corpus import (
    BUILTIN_CORPORA,
    QUOTINGS,
    locate_builtin,
    read_documents,
    shipped_copy,
)
from lmlab.data.tokenization import read_text_chunks
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


def write(path: Path, text: str) -> Path:
    """Exactly these characters as UTF-8: no newline translation."""
    path.write_bytes(text.encode("utf-8"))
    return path


def test_csv_quoted_fields_hold_line_breaks_delimiters_and_quotes(tmp_path: Path):
    path = write(
        tmp_path / "data.csv",
        "id,text,label\r\n"  # csv.writer's row ends
        '1,"line one\nline two",0\r\n'
        '2,"a\ttab, a comma and ""doubled"" quotes",1\r\n'
        '3,"form\x0cfeed, next\x85line, line\u2028separator",0\r\n'
        "4,bare\x0cform feed\x85next line\u2028separator,1\r\n",
    )
    expected = [
        "line one\nline two",
        'a\ttab, a comma and "doubled" quotes',
        "form\x0cfeed, next\x85line, line\u2028separator",
        "bare\x0cform feed\x85next line\u2028separator",
    ]
    assert read_documents(path, text_field="text") == expected
    assert read_documents(path, text_field="text", quoting="csv") == expected


def test_tsv_quoted_fields_hold_line_breaks_tabs_and_commas(tmp_path: Path):
    path = write(
        tmp_path / "reviews.tsv",
        "id\tdocument\tlabel\n"
        '1\t"first line\nsecond line"\t1\n'
        '2\t"a\ttab, a comma"\t0\n'
        '3\tplain "quoted" word\t1\n',
    )
    expected = ["first line\nsecond line", "a\ttab, a comma", 'plain "quoted" word']
    assert read_documents(path, text_field="document") == expected
    assert read_documents(path, text_field="document", quoting="csv") == expected


def test_tsv_with_quoted_fields_read_without_quotes_is_refused(tmp_path: Path):
    path = write(
        tmp_path / "reviews.tsv",
        'id\tdocument\tlabel\n1\t"first line\nsecond line"\t1\n2\t"a\ttab"\t0\n',
    )
    with pytest.raises(
        LmlabError,
        match=r"reviews.tsv:2: 2 field\(s\) where the header has 3 \(read with data.quoting=none\)"
        r".*data.quoting=csv",
    ):
        read_documents(path, text_field="document", quoting="none")


def test_nsmc_style_stray_quotes_are_text(tmp_path: Path):
    path = write(
        tmp_path / "ratings.txt",
        "id\tdocument\tlabel\n"
        '1\t"최고" 영화\t1\n'  # begins with a quote that is no CSV quote
        '2\t정말 "재밌다\t1\n'  # an odd number of quotes
        "3\t\t0\n"
        '4\t"별로\t0\n'  # with row 5: one "quoted field" over two rows, read as CSV
        '5\t끝"\t1\n',
    )
    expected = ['"최고" 영화', '정말 "재밌다', '"별로', '끝"']
    assert read_documents(path, text_field="document", quoting="none") == expected
    assert read_documents(path, text_field="document") == expected
    with pytest.raises(LmlabError, match=r"ratings.txt:2: not valid CSV .*data.quoting=none"):
        read_documents(path, text_field="document", quoting="csv")


@needs_corpus("nsmc_ratings_train.txt")
def test_nsmc_reads_as_written():
    path = data_dir() / "nsmc_ratings_train.txt"
    documents = read_documents(path, text_field="document")
    assert len(documents) == 10_000
    assert documents == read_documents(path, text_field="document", quoting="none")
    assert documents[2] == "짱깨 꺼라ㅡ패쓰"
    assert documents[0].startswith("이종석 한효주 나오는 드라마 이후로")
    assert not any("\t" in d or "\n" in d for d in documents)  # no ids or labels glued on


def test_rows_glued_by_stray_quotes_are_refused_in_auto_mode(tmp_path: Path):
    # Every line is a whole row, and CSV quotes would glue rows 1 and 2 into one field:
    # two readings, neither evidently wrong, so the user says which.
    path = write(
        tmp_path / "ratings.txt",
        'id\tdocument\tlabel\n1\t"좋아요\t1\n2\t최고"\t1\n3\t보통\t0\n',
    )
    with pytest.raises(
        LmlabError, match=r"ratings.txt:2: a quoted field runs over several lines.*quoting=none"
    ):
        read_documents(path, text_field="document")
    assert read_documents(path, text_field="document", quoting="none") == [
        '"좋아요',
        '최고"',
        "보통",
    ]
    assert read_documents(path, text_field="document", quoting="csv") == [
        "좋아요\t1\n2\t최고",
        "보통",
    ]


def test_single_column_csv_reads_its_quoted_line_breaks(tmp_path: Path):
    path = write(tmp_path / "data.csv", 'text\n"one\ntwo"\nthree\n')
    assert read_documents(path, text_field="text") == ["one\ntwo", "three"]


def test_table_that_reads_neither_way_names_both_rows(tmp_path: Path):
    path = write(tmp_path / "reviews.tsv", 'id\tdocument\tlabel\n1\t"a\tb"\t1\n2\tshort\n')
    with pytest.raises(
        LmlabError,
        match=r"reviews.tsv:2: 4 field\(s\) where the header has 3 with quotes read as text, "
        r"and line 3: 2 field\(s\) where the header has 3 with CSV quotes; .*"
        r"data.quoting=csv or data.quoting=none",
    ):
        read_documents(path, text_field="document")


def test_unknown_quoting_is_refused(tmp_path: Path):
    path = write(tmp_path / "data.csv", "text\na\n")
    assert QUOTINGS == ("auto", "csv", "none")
    with pytest.raises(
        LmlabError, match=r"data.quoting='maybe' is not one of \['auto', 'csv', 'none'\]"
    ):
        read_documents(path, text_field="text", quoting="maybe")


def test_jsonl_strings_keep_unicode_line_separators(tmp_path: Path):
    texts = ["a\u2028b", "c\u2029d", "e\x85f", "g\x0ch", 'tab\tand "quote"']
    lines = [json.dumps({"id": i, "text": t}, ensure_ascii=False) for i, t in enumerate(texts)]
    path = write(tmp_path / "data.jsonl", "\n".join(lines[:2] + [""] + lines[2:]) + "\n")
    raw = path.read_text(encoding="utf-8")
    assert "\u2028" in raw and "\u2029" in raw and "\x85" in raw  # raw, as json.dumps wrote them
    assert read_documents(path, text_field="text") == texts


@pytest.mark.parametrize(
    ("line", "what"),
    [
        ('{"text": 5}', "field 'text' is a number, not a string"),
        ('{"text": null}', "field 'text' is null, not a string"),
        ('{"text": ["a"]}', "field 'text' is an array, not a string"),
        ('{"text": true}', "field 'text' is a boolean, not a string"),
        ('["text"]', "the line is an array, not an object"),
        ('"text"', "the line is a string, not an object"),
    ],
)
def test_jsonl_line_that_gives_no_string_is_refused_with_its_line(
    tmp_path: Path, line: str, what: str
):
    path = write(tmp_path / "data.jsonl", '{"text": "ok"}\n\n' + line + "\n")
    with pytest.raises(LmlabError, match=rf"data.jsonl:3: {re.escape(what)}"):
        read_documents(path, text_field="text")


def test_split_lines_breaks_at_newlines_only(tmp_path: Path):
    path = write(tmp_path / "lines.txt", "one\u2028still\x0cone\x85line\nsecond\n\nthird")
    assert read_documents(path, split_lines=True) == [
        "one\u2028still\x0cone\x85line",
        "second",
        "third",
    ]


BOM = b"\xef\xbb\xbf"


def test_bom_is_dropped_from_text(tmp_path: Path):
    path = tmp_path / "names.txt"
    path.write_bytes(BOM + b"emma\nava\n")
    assert read_documents(path) == ["emma\nava\n"]
    assert read_documents(path, split_lines=True) == ["emma", "ava"]


def test_bom_is_dropped_from_tsv_column_names(tmp_path: Path):
    path = tmp_path / "reviews.tsv"
    path.write_bytes(BOM + "document\tlabel\n좋다\t1\n".encode())
    assert read_documents(path, text_field="document") == ["좋다"]
    with pytest.raises(LmlabError, match=r"its columns are \['document', 'label'\]"):
        read_documents(path, text_field="text")


def test_bom_is_dropped_from_csv(tmp_path: Path):
    path = tmp_path / "data.csv"
    path.write_bytes(BOM + b'"text",n\n"a, b",1\n')  # a quoted first column name
    for quoting in ("auto", "csv"):
        assert read_documents(path, text_field="text", quoting=quoting) == ["a, b"]


def test_bom_is_dropped_from_jsonl(tmp_path: Path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(BOM + b'{"text": "x"}\n{"text": "y"}\n')
    assert read_documents(path, text_field="text") == ["x", "y"]


def test_bom_is_dropped_from_the_first_text_chunk(tmp_path: Path):
    path = tmp_path / "big.txt"
    path.write_bytes(BOM + b"word " * 50)
    chunks = list(read_text_chunks(path, chunk_bytes=8))
    assert len(chunks) > 5
    assert not chunks[0][1].startswith("\ufeff")
    assert "".join(text for _, text in chunks) == "word " * 50
    assert chunks[-1][0] == path.stat().st_size


def test_text_chunks_of_a_byte_range(tmp_path: Path):
    path = tmp_path / "big.txt"
    path.write_bytes(BOM + b"word " * 50)
    start, end = len(BOM) + 5 * 10, len(BOM) + 5 * 20
    chunks = list(read_text_chunks(path, 8, start=start, end=end))
    assert "".join(text for _, text in chunks) == "word " * 10
    assert chunks[-1][0] == end


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


class FakeResponse(io.BytesIO):
    """What torch.hub reads a download from: a body and its headers."""

    def info(self) -> email.message.Message:
        headers = email.message.Message()
        headers["Content-Length"] = str(len(self.getvalue()))
        return headers


def serve(monkeypatch, respond) -> list[str]:
    """Downloads answered by `respond(url)`; returns the URLs asked for."""
    requested = []

    def fake_urlopen(request):
        requested.append(request.full_url)
        return respond(request.full_url)

    monkeypatch.setattr(torch.hub, "urlopen", fake_urlopen)
    return requested


@pytest.fixture
def not_shipped(monkeypatch):
    """Every built-in corpus taken for one that does not ship in the package: downloaded."""
    monkeypatch.setattr(corpus_module, "shipped_copy", lambda corpus: None)


def test_every_shipped_corpus_is_the_published_one():
    """The package's xz copies decompress to the bytes whose SHA-256 the table publishes."""
    for corpus in BUILTIN_CORPORA.values():
        shipped = shipped_copy(corpus)
        assert shipped is not None, f"{corpus.filename} does not ship"
        data = lzma.decompress(shipped.read_bytes())
        assert hashlib.sha256(data).hexdigest() == corpus.sha256


@needs_corpus("names.txt")
def test_shipped_corpus_is_extracted_without_the_network(tmp_path: Path, monkeypatch):
    def refuse(url):
        raise OSError("network unreachable")

    requested = serve(monkeypatch, refuse)
    path = locate_builtin("names", tmp_path / "fresh")
    assert requested == []  # nothing was downloaded
    assert path.read_bytes() == (data_dir() / "names.txt").read_bytes()
    assert list(path.parent.iterdir()) == [path]  # no temporary file left beside it


def test_a_damaged_shipped_copy_is_refused_and_nothing_written(tmp_path: Path, monkeypatch):
    damaged = tmp_path / "names.txt.xz"
    damaged.write_bytes(lzma.compress(b"emma\nolivia\n"))  # valid xz, not the corpus
    monkeypatch.setattr(corpus_module, "shipped_copy", lambda corpus: damaged)
    expected = BUILTIN_CORPORA["names"].sha256
    with pytest.raises(LmlabError, match=f"expected {expected}.*reinstall lmlab"):
        locate_builtin("names", tmp_path / "data")
    assert not (tmp_path / "data").exists()
    damaged.write_bytes(b"not xz at all")
    with pytest.raises(LmlabError, match="shipped with lmlab .* cannot be read"):
        locate_builtin("names", tmp_path / "data")
    assert not (tmp_path / "data").exists()


@needs_corpus("the-verdict.txt")
def test_missing_builtin_corpus_is_downloaded_and_verified(
    tmp_path: Path, monkeypatch, not_shipped
):
    payload = (data_dir() / "the-verdict.txt").read_bytes()
    requested = serve(monkeypatch, lambda url: FakeResponse(payload))
    path = locate_builtin("verdict", tmp_path / "fresh")
    assert requested == [BUILTIN_CORPORA["verdict"].url]
    assert path.read_bytes() == payload
    assert list(path.parent.iterdir()) == [path]  # no temporary file left beside it


def test_failed_download_leaves_no_partial_file(tmp_path: Path, monkeypatch, not_shipped):
    def refuse(url):
        raise OSError("network unreachable")

    serve(monkeypatch, refuse)
    with pytest.raises(LmlabError, match="could not be downloaded .* download it by hand"):
        locate_builtin("names", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_download_that_is_not_the_corpus_is_refused_and_not_kept(
    tmp_path: Path, monkeypatch, not_shipped
):
    serve(monkeypatch, lambda url: FakeResponse(b"<html>rate limited</html>"))
    expected = BUILTIN_CORPORA["names"].sha256
    with pytest.raises(LmlabError, match=f"has SHA-256 [0-9a-f]{{64}}, expected {expected}"):
        locate_builtin("names", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_unknown_builtin_corpus_lists_the_choices(tmp_path: Path):
    with pytest.raises(LmlabError, match="unknown built-in corpus 'wiki'"):
        locate_builtin("wiki", tmp_path)
