"""Finding, downloading and reading corpora into a list of documents."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmlab.errors import LmlabError

MAX_PIECE_BYTES = 64 << 20  # read_text_chunks cuts anywhere rather than hold more than this
QUOTINGS = ("auto", "csv", "none")  # how TSV/CSV quotes are read (data.quoting)
BOM = "\ufeff"  # a UTF-8 byte order mark: dropped from the start of every file


@dataclass(frozen=True)
class BuiltinCorpus:
    filename: str
    url: str
    sha256: str
    text_field: str | None = None  # the TSV column that holds the text, if any


BUILTIN_CORPORA: dict[str, BuiltinCorpus] = {
    "shakespeare": BuiltinCorpus(
        "tinyshakespeare.txt",
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    ),
    "names": BuiltinCorpus(
        "names.txt",
        "https://raw.githubusercontent.com/karpathy/makemore/master/names.txt",
        "0a30b5557f192f32ab962680889aac5f6fda0f4cecf40a6d0b5694f58ea8cc4d",
    ),
    "verdict": BuiltinCorpus(
        "the-verdict.txt",
        "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch02/01_main-chapter-code/the-verdict.txt",
        "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f",
    ),
    "nsmc": BuiltinCorpus(
        "nsmc_ratings_train.txt",
        "https://raw.githubusercontent.com/KFromage/nsmc/master/ratings_train.txt",
        "60858e49efcc51925eaca070fc567b05b69af1a3167417004db087ec65919cd8",
        text_field="document",
    ),
}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download(url: str, dest: Path) -> None:
    """Download to a temporary file beside `dest`, then rename: never a half-written corpus."""
    from tqdm import tqdm

    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}") as bar:
                for chunk in iter(lambda: response.read(1 << 16), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)


def locate_builtin(name: str, data_dir: str | Path) -> Path:
    """Return the path of a built-in corpus in `data_dir`, downloading it if it is not there."""
    if name not in BUILTIN_CORPORA:
        raise LmlabError(
            f"unknown built-in corpus {name!r}; choose one of {sorted(BUILTIN_CORPORA)} "
            "or give your own file with data.path=FILE"
        )
    corpus = BUILTIN_CORPORA[name]
    data_dir = Path(data_dir).expanduser()
    path = data_dir / corpus.filename
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        try:
            _download(corpus.url, path)
        except OSError as err:
            raise LmlabError(
                f"corpus {corpus.filename} is not in {data_dir} and could not be downloaded from "
                f"{corpus.url} ({err}); download it by hand into that directory, or set "
                "paths.data_dir (or $LMLAB_DATA_DIR) to a directory that has it"
            ) from err
    actual = sha256_of(path)
    if actual != corpus.sha256:
        raise LmlabError(
            f"{path} has SHA-256 {actual}, expected {corpus.sha256}: the file is corrupt or "
            "not the published corpus; delete it so that it is downloaded again"
        )
    return path


def read_documents(
    path: str | Path,
    text_field: str | None = None,
    split_lines: bool = False,
    encoding_errors: str = "strict",
    quoting: str = "auto",
) -> list[str]:
    """Read a corpus file into documents.

    Plain text is one document (or one per line with `split_lines`); with `text_field`, a
    TSV/CSV file gives the named column of each row (its quotes read as `quoting` says, one
    of QUOTINGS) and a JSONL file the named field. Empty documents are dropped.
    """
    if quoting not in QUOTINGS:
        raise LmlabError(f"data.quoting={quoting!r} is not one of {list(QUOTINGS)}; choose one")
    path = check_corpus_file(path)
    text = decode_text(path.read_bytes(), path, 0, encoding_errors)
    if text_field is None:
        # "\n" only: U+2028, U+0085 and form feeds are characters of a line, not breaks
        documents = text.split("\n") if split_lines else [text]
    elif path.suffix.lower() in {".jsonl", ".ndjson"}:
        documents = _jsonl_field(text, text_field, path)
    else:
        documents = _table_column(text, text_field, path, quoting)
    documents = [d for d in documents if d]
    if not documents:
        raise LmlabError(f"corpus {path} has no text; give a file with some text in it")
    return documents


def check_corpus_file(path: str | Path) -> Path:
    """The corpus path, refused with its own message when it is missing or empty."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LmlabError(f"corpus file not found: {path} (check data.path)")
    if path.stat().st_size == 0:
        raise LmlabError(f"corpus {path} has no text; give a file with some text in it")
    return path


def decode_text(data: bytes, path: Path, offset: int, encoding_errors: str) -> str:
    """UTF-8 bytes (from byte `offset` of `path`) to text with universal newlines, as
    `read_text` gives it, less the byte order mark that starts a file (it is no character of
    the text); a bad byte is reported with its position in the file."""
    try:
        text = data.decode("utf-8", errors=encoding_errors)
    except UnicodeDecodeError as err:
        bad = err.object[err.start : err.start + 4]
        raise LmlabError(
            f"{path} is not valid UTF-8 (byte {offset + err.start}: {bad!r}); "
            "convert it to UTF-8, or set data.encoding_errors=replace to replace bad bytes"
        ) from err
    if offset == 0 and text.startswith(BOM):
        text = text[len(BOM) :]
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def read_text_chunks(
    path: Path,
    chunk_bytes: int,
    encoding_errors: str = "strict",
    start: int = 0,
    end: int | None = None,
) -> Iterator[tuple[int, str]]:
    """Yield (file position reached, text) for pieces of about `chunk_bytes` of bytes
    [start, end) of a plain-text file (the whole file by default; a byte order mark at its
    start is no part of the text).

    Pieces are cut where the text, its NFC form and (given a space or newline after a letter
    within a few pieces, as any prose has) its BPE tokens stay those of the whole file.
    """
    offset = start  # file position of data[0]
    data = b""
    with open(path, "rb") as f:
        f.seek(start)
        while True:
            wanted = chunk_bytes if end is None else min(chunk_bytes, end - offset - len(data))
            block = f.read(wanted) if wanted > 0 else b""
            data = data + block if data else block
            if not data:
                return
            if not block:
                cut = len(data)
            else:
                # No exact cut in sight: read on, up to a few pieces, before a near-exact one.
                cut = _cut_point(data, exact=len(data) < 4 * chunk_bytes)
                if cut is None:
                    continue
            piece, data = data[:cut], data[cut:]
            yield offset + cut, decode_text(piece, path, offset, encoding_errors)
            offset += cut


def _cut_point(data: bytes, exact: bool) -> int | None:
    """Where to end a piece of `data`, or None to read on first.

    Exact: before a space or newline that follows a letter. Every tiktoken pattern ends a
    pre-token after a letter and starts one at the whitespace, and nothing composes across
    it in NFC. Else, after a newline or before an ASCII character: exact for characters and
    NFC, at worst a different BPE split of a run of whitespace or of one word.
    """
    pos = len(data)
    for _ in range(1000):
        pos = max(data.rfind(b" ", 0, pos), data.rfind(b"\n", 0, pos))
        if pos <= 0:
            break
        before = data[max(0, pos - 4) : pos].decode("utf-8", errors="ignore")
        if before[-1:].isalpha():
            return pos
    if exact:
        return None
    newline = data.rfind(b"\n")
    if newline >= 0:
        return newline + 1  # after it: keeps CRLF together
    tail = np.frombuffer(data, dtype=np.uint8)[-(1 << 16) :]
    ascii_at = np.flatnonzero(tail < 0x80)  # no ASCII character composes with the one before
    if len(ascii_at) and len(data) - len(tail) + ascii_at[-1] > 0:
        return len(data) - len(tail) + int(ascii_at[-1])
    if len(data) < MAX_PIECE_BYTES:
        return None
    lead = len(data) - 1  # megabytes without ASCII: at least never inside a UTF-8 character
    while lead > 0 and data[lead] & 0xC0 == 0x80:
        lead -= 1
    return lead or len(data)


# -- TSV/CSV -----------------------------------------------------------------------------------
class _BadRow(Exception):
    """A row that does not read as a table row: where it starts and what was wrong."""

    def __init__(self, line: int, reason: str):
        super().__init__(f"line {line}: {reason}")
        self.line = line
        self.reason = reason


@dataclass
class _Table:
    header: list[str]
    rows: list[list[str]]
    multiline_at: int | None  # first line of the first row whose quoted field holds a "\n"


def _table_column(text: str, column: str, path: Path, quoting: str) -> list[str]:
    first_line = text.split("\n", 1)[0]
    delimiter = "\t" if "\t" in first_line or path.suffix.lower() == ".tsv" else ","
    with _no_field_size_limit(len(text)):
        table = _read_table_as(text, delimiter, quoting, path)
    if column not in table.header:
        raise LmlabError(
            f"{path} has no column {column!r}; its columns are {table.header}. "
            "Set data.text_field to one of them"
        )
    index = table.header.index(column)
    return [row[index] for row in table.rows]


# what to try when a file does not read with the quoting asked for
_OTHER_QUOTING = {
    "csv": "set data.quoting=none if the file's quotes are part of its text",
    "none": "set data.quoting=csv if the file quotes fields that hold tabs, commas or line breaks",
}


def _read_table_as(text: str, delimiter: str, quoting: str, path: Path) -> _Table:
    """The table as `quoting` reads it; a row that does not fit is refused with its line."""
    if quoting in _OTHER_QUOTING:
        try:
            return _read_table(text, delimiter, quotes=quoting == "csv")
        except _BadRow as bad:
            raise LmlabError(
                f"{path}:{bad.line}: {bad.reason} (read with data.quoting={quoting}); fix the "
                f"row, or {_OTHER_QUOTING[quoting]}"
            ) from None
    return _read_table_auto(text, delimiter, path)


def _read_table_auto(text: str, delimiter: str, path: Path) -> _Table:
    """With CSV quotes when the whole file reads that way, else with quotes as text.

    A file written without quoting (NSMC's reviews hold stray quotes, and some begin with
    one) fails the strict CSV reading or its field counts, and reads as it is. A quoted
    field over several lines, in a file whose every line is also a whole row, may be rows
    glued together by stray quotes: that file is refused rather than guessed at.
    """
    try:
        quoted = _read_table(text, delimiter, quotes=True)
    except _BadRow as quoted_bad:
        try:
            return _read_table(text, delimiter, quotes=False)
        except _BadRow as bare_bad:
            raise LmlabError(
                f"{path}:{bare_bad.line}: {bare_bad.reason} with quotes read as text, and "
                f"line {quoted_bad.line}: {quoted_bad.reason} with CSV quotes; fix those rows, "
                "or set data.quoting=csv or data.quoting=none to say how quotes are read"
            ) from None
    if quoted.multiline_at is None or len(quoted.header) < 2:
        return quoted  # a single column has no field count to tell the readings apart
    try:
        _read_table(text, delimiter, quotes=False)
    except _BadRow:
        return quoted
    raise LmlabError(
        f"{path}:{quoted.multiline_at}: a quoted field runs over several lines, yet every "
        "line is also a whole row when quotes are text; set data.quoting=csv if the quotes "
        "are CSV quotes, or data.quoting=none if they are part of the text"
    )


def _read_table(text: str, delimiter: str, quotes: bool) -> _Table:
    """Header and rows, each row with the header's number of fields; blank lines skipped.

    The csv module reads the whole text, not pre-split lines: a quoted field may hold line
    breaks, and a form feed, U+0085 or U+2028 is text, never a row's end. With `quotes`,
    strict CSV quoting (a quote that opens a field must close it, before a delimiter or a
    line break); without, csv.QUOTE_NONE (quotes are text).
    """
    reader = csv.reader(
        io.StringIO(text, newline=""),
        delimiter=delimiter,
        quoting=csv.QUOTE_MINIMAL if quotes else csv.QUOTE_NONE,
        strict=True,
    )
    header: list[str] | None = None
    rows: list[list[str]] = []
    multiline_at = None
    end = 0  # the line the previous row ended on
    while True:
        start = end + 1
        try:
            row = next(reader, None)
        except csv.Error as err:
            raise _BadRow(start, f"not valid CSV ({err})") from None
        if row is None:
            break
        end = reader.line_num
        if not row:
            continue  # a blank line
        if end > start and multiline_at is None:
            multiline_at = start
        if header is None:
            header = row
        elif len(row) != len(header):
            raise _BadRow(start, f"{len(row)} field(s) where the header has {len(header)}")
        else:
            rows.append(row)
    return _Table(header or [], rows, multiline_at)


@contextmanager
def _no_field_size_limit(size: int) -> Iterator[None]:
    """Let the csv module read fields as long as the text (a document may be long)."""
    old = csv.field_size_limit()
    csv.field_size_limit(max(old, size + 1))
    try:
        yield
    finally:
        csv.field_size_limit(old)


# -- JSONL ---------------------------------------------------------------------------------------
def _json_type(value: object) -> str:
    """What a JSON value is, in JSON's words."""
    if value is None:
        return "null"
    if isinstance(value, bool):  # before the numbers: a bool is an int
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    names = {str: "a string", list: "an array", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def _jsonl_field(text: str, field: str, path: Path) -> list[str]:
    documents = []
    # "\n" only: a JSON string may hold a raw U+2028, U+2029 or U+0085 (json.dumps writes
    # them with ensure_ascii=False), where str.splitlines() would break the line
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip(" \t"):
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise LmlabError(f"{path}:{line_no} is not valid JSON ({err.msg})") from err
        if not isinstance(record, dict):
            raise LmlabError(
                f"{path}:{line_no}: the line is {_json_type(record)}, not an object; give one "
                f"JSON object with a field {field!r} per line"
            )
        if field not in record:
            raise LmlabError(
                f"{path}:{line_no} has no field {field!r}; its fields are {sorted(record)}. "
                "Set data.text_field to one of them"
            )
        value = record[field]
        if not isinstance(value, str):
            raise LmlabError(
                f"{path}:{line_no}: field {field!r} is {_json_type(value)}, not a string; "
                "give text in that field, or set data.text_field to a field that holds text"
            )
        documents.append(value)
    return documents
