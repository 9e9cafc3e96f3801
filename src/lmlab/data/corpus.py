"""Reading a corpus file (plain text, a TSV/CSV column or a JSONL field; the built-in corpora
extracted from the package or downloaded once, and checked against their SHA-256) and splitting
its documents into train / val / test before any tokenizer, so that every tokenizer is scored on
the same characters.
Every error names the file, the line and the setting that fixes it."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import re
import unicodedata
from pathlib import Path
from typing import NamedTuple

import numpy as np

from lmlab.errors import LmlabError

log = logging.getLogger(__name__)

QUOTINGS = ("auto", "csv", "none")  # how TSV/CSV quotes are read (data.quoting)


class BuiltinCorpus(NamedTuple):
    filename: str
    url: str
    sha256: str
    text_field: str | None = None  # the TSV column that holds the text, if any


_GITHUB = "https://raw.githubusercontent.com"
BUILTIN_CORPORA: dict[str, BuiltinCorpus] = {
    "shakespeare": BuiltinCorpus(
        "tinyshakespeare.txt",
        f"{_GITHUB}/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    ),
    "names": BuiltinCorpus(
        "names.txt",
        f"{_GITHUB}/karpathy/makemore/master/names.txt",
        "0a30b5557f192f32ab962680889aac5f6fda0f4cecf40a6d0b5694f58ea8cc4d",
    ),
    "verdict": BuiltinCorpus(
        "the-verdict.txt",
        f"{_GITHUB}/rasbt/LLMs-from-scratch/main/ch02/01_main-chapter-code/the-verdict.txt",
        "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f",
    ),
    "nsmc": BuiltinCorpus(
        "nsmc_ratings_train.txt",
        f"{_GITHUB}/KFromage/nsmc/master/ratings_train.txt",
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


def locate_builtin(name: str, data_dir: str | Path) -> Path:
    """The path of a built-in corpus in `data_dir`; if it is not there, extracted from the copy
    shipped in the package (lmlab.corpora) or, for a corpus not shipped, downloaded."""
    if name not in BUILTIN_CORPORA:
        raise LmlabError(
            f"unknown built-in corpus {name!r}; choose one of {sorted(BUILTIN_CORPORA)} "
            "or give your own file with data.path=FILE"
        )
    corpus = BUILTIN_CORPORA[name]
    path = Path(data_dir).expanduser() / corpus.filename
    if not path.exists() and (shipped := shipped_copy(corpus)) is not None:
        _extract(shipped, path, corpus)
    if not path.exists():  # through a file beside it, renamed once its SHA-256 matches
        import torch.hub

        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(corpus.url, str(path), hash_prefix=corpus.sha256)
        except RuntimeError as err:  # what torch.hub raises for a wrong hash
            got = re.search(r'got "([0-9a-f]+)"', str(err))
            remedy = "nothing was written; try again later, or download it by hand"
            raise _not_the_corpus(corpus.url, got[1] if got else "unknown", corpus, remedy) from err
        except OSError as err:
            raise LmlabError(
                f"corpus {corpus.filename} is not in {path.parent} and could not be downloaded "
                f"from {corpus.url} ({err}); download it by hand into that directory, or set "
                "paths.data_dir (or $LMLAB_DATA_DIR) to a directory that has it"
            ) from err
    actual = sha256_of(path)
    if actual != corpus.sha256:
        raise _not_the_corpus(str(path), actual, corpus, "delete it so that it is downloaded again")
    return path


def shipped_copy(corpus: BuiltinCorpus) -> Path | None:
    """The xz-compressed copy of `corpus` inside the package, if it is one that ships."""
    from importlib.resources import files

    shipped = Path(str(files("lmlab.corpora") / f"{corpus.filename}.xz"))
    return shipped if shipped.is_file() else None


def _extract(shipped: Path, path: Path, corpus: BuiltinCorpus) -> None:
    """Decompress `shipped` to `path` through a temporary file beside it, renamed only once
    its SHA-256 is the published one: a full disk or a damaged package leaves nothing."""
    import lzma

    from lmlab.atomic_write import atomic_write_bytes

    try:
        data = lzma.decompress(shipped.read_bytes())
    except (OSError, lzma.LZMAError) as err:
        raise LmlabError(
            f"the copy of {corpus.filename} shipped with lmlab ({shipped}) cannot be read "
            f"({err}); reinstall lmlab, or put the corpus in {path.parent} yourself"
        ) from None
    if (actual := hashlib.sha256(data).hexdigest()) != corpus.sha256:
        raise _not_the_corpus(str(shipped), actual, corpus, "reinstall lmlab")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, lambda f: f.write(data), len(data))
        log.info("corpus: extracted %s from the copy shipped with lmlab into %s", path.name, path)
    except OSError as err:
        raise LmlabError(
            f"cannot write {path} (the corpus {corpus.filename}, extracted from the copy "
            f"shipped with lmlab): {err.strerror or err}; set paths.data_dir (or "
            "$LMLAB_DATA_DIR) to a directory you can write"
        ) from None


def _not_the_corpus(what: str, actual: str, corpus: BuiltinCorpus, remedy: str) -> LmlabError:
    return LmlabError(
        f"{what} has SHA-256 {actual}, expected {corpus.sha256}: the file is corrupt or not "
        f"the published corpus; {remedy}"
    )


def read_documents(
    path: str | Path,
    text_field: str | None = None,
    split_lines: bool = False,
    encoding_errors: str = "strict",
    quoting: str = "auto",
    normalize: str | None = None,
) -> list[str]:
    """The non-empty documents of a file: plain text whole (a line each with `split_lines`), or
    a TSV/CSV column or JSONL field (`text_field`), each Unicode-normalized as `normalize` says."""
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
    return [unicodedata.normalize(normalize, d) for d in documents] if normalize else documents


def check_corpus_file(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if path.is_dir():
        raise LmlabError(f"{path} is a directory; give data.path=FILE, a text/TSV/CSV/JSONL file")
    if path.exists() and not path.is_file():
        raise LmlabError(f"{path} is not a regular file (a FIFO or device); give a file")
    if not path.is_file():
        raise LmlabError(f"corpus file not found: {path} (check data.path)")
    if path.stat().st_size == 0:
        raise LmlabError(f"corpus {path} has no text; give a file with some text in it")
    return path


def decode_text(data: bytes, path: Path, offset: int, encoding_errors: str) -> str:
    """UTF-8 bytes (from byte `offset` of `path`) to text with universal newlines, less the
    byte order mark that starts a file; a bad byte is reported with its position in the file."""
    try:
        text = data.decode("utf-8", errors=encoding_errors)
    except UnicodeDecodeError as err:
        bad = err.object[err.start : err.start + 4]
        raise LmlabError(
            f"{path} is not valid UTF-8 (byte {offset + err.start}: {bad!r}); "
            "convert it to UTF-8, or set data.encoding_errors=replace to replace bad bytes"
        ) from err
    if offset == 0:
        text = text.removeprefix("\ufeff")  # a byte order mark
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


# -- TSV/CSV -----------------------------------------------------------------------------------
class _BadRow(Exception):
    """A row that does not read as a table row: args are (its first line, what was wrong)."""


# what to try when a file does not read with the quoting asked for
_OTHER_QUOTING = {
    "csv": "set data.quoting=none if the file's quotes are part of its text",
    "none": "set data.quoting=csv if the file quotes fields that hold tabs, commas or line breaks",
}


def _table_column(text: str, column: str, path: Path, quoting: str) -> list[str]:
    delimiter = "\t" if "\t" in text.split("\n", 1)[0] or path.suffix.lower() == ".tsv" else ","
    limit = csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))  # long documents
    try:
        if quoting == "auto":
            header, rows, _ = _read_table_auto(text, delimiter, path)
        else:
            header, rows, _ = _read_table(text, delimiter, quotes=quoting == "csv")
    except _BadRow as bad:  # with the quoting given (auto mode explains its own failures)
        line, reason = bad.args
        raise LmlabError(
            f"{path}:{line}: {reason} (read with data.quoting={quoting}); fix the row, or "
            f"{_OTHER_QUOTING[quoting]}"
        ) from None
    finally:
        csv.field_size_limit(limit)
    if column not in header:
        raise LmlabError(
            f"{path} has no column {column!r}; its columns are {header}. "
            "Set data.text_field to one of them"
        )
    return [row[header.index(column)] for row in rows]


def _read_table_auto(text: str, delimiter: str, path: Path) -> tuple[list, list, int | None]:
    """With CSV quotes when the whole file reads that way, else with quotes as text (NSMC's
    reviews hold stray quotes). A quoted field over several lines, in a file whose every line
    is also a whole row, may be rows glued together by stray quotes: refused, not guessed at."""
    try:
        quoted = _read_table(text, delimiter, quotes=True)
    except _BadRow as quoted_bad:
        try:
            return _read_table(text, delimiter, quotes=False)
        except _BadRow as bare_bad:
            (line, reason), (quoted_line, quoted_reason) = bare_bad.args, quoted_bad.args
            raise LmlabError(
                f"{path}:{line}: {reason} with quotes read as text, and line {quoted_line}: "
                f"{quoted_reason} with CSV quotes; fix those rows, or set data.quoting=csv or "
                "data.quoting=none to say how quotes are read"
            ) from None
    header, _, multiline_at = quoted
    if multiline_at is None or len(header) < 2:
        return quoted  # a single column has no field count to tell the readings apart
    try:
        _read_table(text, delimiter, quotes=False)
    except _BadRow:
        return quoted
    raise LmlabError(
        f"{path}:{multiline_at}: a quoted field runs over several lines, yet every "
        "line is also a whole row when quotes are text; set data.quoting=csv if the quotes "
        "are CSV quotes, or data.quoting=none if they are part of the text"
    )


def _read_table(text: str, delimiter: str, quotes: bool) -> tuple[list, list, int | None]:
    """(header, rows of as many fields, first line of the first row over several lines), with
    strict CSV `quotes` or quotes as text. The csv module reads the whole text, not split
    lines: a quoted field may hold line breaks, and U+0085 or U+2028 never ends a row."""
    quoting = csv.QUOTE_MINIMAL if quotes else csv.QUOTE_NONE
    reader = csv.reader(
        io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting, strict=True
    )
    header, rows, multiline_at, end = None, [], None, 0  # end: the line the last row ended on
    try:
        for row in reader:
            start, end = end + 1, reader.line_num
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
    except csv.Error as err:
        raise _BadRow(end + 1, f"not valid CSV ({err})") from None
    return header or [], rows, multiline_at


# -- JSONL ---------------------------------------------------------------------------------------
# what each value json.loads gives is, in JSON's words
_JSON_TYPES = {str: "a string", int: "a number", float: "a number", bool: "a boolean"}
_JSON_TYPES.update({type(None): "null", list: "an array", dict: "an object"})


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
                f"{path}:{line_no}: the line is {_JSON_TYPES[type(record)]}, not an object; "
                f"give one JSON object with a field {field!r} per line"
            )
        if field not in record:
            raise LmlabError(
                f"{path}:{line_no} has no field {field!r}; its fields are {sorted(record)}. "
                "Set data.text_field to one of them"
            )
        if not isinstance(record[field], str):
            raise LmlabError(
                f"{path}:{line_no}: field {field!r} is {_JSON_TYPES[type(record[field])]}, not "
                "a string; give text in that field, or set data.text_field to a field that "
                "holds text"
            )
        documents.append(record[field])
    return documents


# -- the text split ------------------------------------------------------------------------------
def split_documents(
    documents: list[str], fractions: dict[str, float], seed: int | None, path: Path
) -> dict[str, list[str]]:
    """Whole documents to each part, after a shuffle with a seed of its own (so that every
    training seed of a sweep is scored on the same validation documents)."""
    if seed is not None:
        documents = [documents[i] for i in np.random.default_rng(seed).permutation(len(documents))]
    n = len(documents)
    counts = {name: round(n * f) for name, f in fractions.items()}
    counts["val"] = n - sum(c for name, c in counts.items() if name != "val")
    if min(counts.values()) < 1:
        shares = " / ".join(f"{f:.0%} {p}" for p, f in fractions.items())
        raise LmlabError(
            f"{path} has {n} document(s), too few to split {shares} with at least one document "
            "in each part; use a corpus with more documents, or change data.train_fraction "
            "and data.test_fraction"
        )
    ends = np.cumsum(list(counts.values())).tolist()
    return {
        name: documents[end - counts[name] : end] for name, end in zip(counts, ends, strict=True)
    }
