"""Every bad input in scripts/bad_inputs.py's table, run through the real CLI: the expected
exit status and message, no traceback, and (for a refusal) `<prog>: error: ...` as the last
line of stderr. The same table makes docs/errors.md, so the page cannot drift from this test."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import bad_inputs  # noqa: E402

pytestmark = pytest.mark.slow

# The rows are built for a placeholder directory at collection time (only their names and
# order are used); the session fixture builds them again for the real inputs.
ROWS = bad_inputs.table(Path("/placeholder"))


def param(index: int, row: bad_inputs.Row):
    marks = [pytest.mark.xfail(strict=True, reason=row.xfail)] if row.xfail else []
    return pytest.param(index, id=row.what, marks=marks)


@pytest.fixture(scope="session")
def results(tmp_path_factory) -> tuple[dict[str, bad_inputs.Result], Path]:
    """Make the inputs once and run every row (two at a time); the results by row, and the
    marker file a crafted pickle would create."""
    tmp = tmp_path_factory.mktemp("bad-inputs")
    rows, marker = bad_inputs.make_inputs(tmp)
    assert [row.what for row in rows] == [row.what for row in ROWS]
    return {r.row.what: r for r in bad_inputs.run_all(rows, tmp)}, marker


def test_rows_are_unique():
    whats = [row.what for row in ROWS]
    assert len(whats) == len(set(whats))
    assert all(row.expect for row in ROWS)


@pytest.mark.parametrize("index", [param(i, row) for i, row in enumerate(ROWS)])
def test_bad_input(results, index):
    row = ROWS[index]
    if row.skip:
        pytest.skip(row.skip)
    result = results[0][row.what]
    if result.not_run:
        pytest.skip(result.not_run)
    row = result.row  # the row built for the real inputs: its fragment may name them
    text = result.stdout if row.stream == "stdout" else result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == row.status, result.stderr
    assert row.expect in text, text
    assert result.message_line, result.stderr  # `prog: error: ...` for a refusal
    assert result.check_failed is None, result.check_failed  # what a fault left behind
    assert result.clean


def test_no_traceback_over_the_table(results):
    by_row, marker = results
    assert [what for what, r in by_row.items() if r.traceback] == []
    assert not marker.exists(), "a crafted pickle ran its code"


def test_docs_list_every_row():
    page = (Path(__file__).resolve().parents[1] / "docs" / "errors.md").read_text()
    missing = [row.what for row in ROWS if f"| {row.what} |" not in page]
    assert missing == [], "rerun: python scripts/bad_inputs.py --docs docs/errors.md"
