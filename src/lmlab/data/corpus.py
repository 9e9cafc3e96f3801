"""Finding, downloading and reading corpora into a list of documents."""

from __future__ import annotations

import csv
import hashlib
import json
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmlab.errors import LmlabError

MAX_PIECE_BYTES = 64 << 20  # read_text_chunks cuts anywhere rather than hold more than this


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
) -> list[str]:
    """Read a corpus file into documents.

    Plain text is one document (or one per line with `split_lines`); with `text_field`, a
    TSV/CSV file gives the named column of each row and a JSONL file the named field.
    """
    path = check_corpus_file(path)
    text = decode_text(path.read_bytes(), path, 0, encoding_errors)
    if text_field is None:
        documents = text.splitlines() if split_lines else [text]
    elif path.suffix.lower() in {".jsonl", ".ndjson"}:
        documents = _jsonl_field(text, text_field, path)
    else:
        documents = _table_column(text, text_field, path)
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
    `read_text` gives it; a bad byte is reported with its position in the file."""
    try:
        text = data.decode("utf-8", errors=encoding_errors)
    except UnicodeDecodeError as err:
        bad = err.object[err.start : err.start + 4]
        raise LmlabError(
            f"{path} is not valid UTF-8 (byte {offset + err.start}: {bad!r}); "
            "convert it to UTF-8, or set data.encoding_errors=replace to replace bad bytes"
        ) from err
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def read_text_chunks(
    path: Path, chunk_bytes: int, encoding_errors: str = "strict"
) -> Iterator[tuple[int, str]]:
    """Yield (bytes read so far, text) for pieces of about `chunk_bytes` of a plain-text file.

    Pieces are cut where the text, its NFC form and (given a space or newline after a letter
    within a few pieces, as any prose has) its BPE tokens stay those of the whole file.
    """
    offset = 0  # file position of data[0]
    data = b""
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk_bytes)
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


def _table_column(text: str, column: str, path: Path) -> list[str]:
    first_line = text.split("\n", 1)[0]
    delimiter = "\t" if "\t" in first_line or path.suffix.lower() == ".tsv" else ","
    # QUOTE_NONE for TSV: review corpora contain bare quotes that are part of the text.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.DictReader(text.splitlines(), delimiter=delimiter, quoting=quoting)
    if reader.fieldnames is None or column not in reader.fieldnames:
        raise LmlabError(
            f"{path} has no column {column!r}; its columns are {reader.fieldnames}. "
            "Set data.text_field to one of them"
        )
    return [row[column] or "" for row in reader]


def _jsonl_field(text: str, field: str, path: Path) -> list[str]:
    documents = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise LmlabError(f"{path}:{line_no} is not valid JSON ({err.msg})") from err
        if field not in record:
            raise LmlabError(
                f"{path}:{line_no} has no field {field!r}; its fields are {sorted(record)}. "
                "Set data.text_field to one of them"
            )
        documents.append(str(record[field]))
    return documents
