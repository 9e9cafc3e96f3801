"""Two `lmlab-train` workers share one Optuna study: in a real PostgreSQL server (a throwaway
cluster this test starts), and in one SQLite file. Together they run the study's 6 trials,
each once, and the median pruner stops the trials that fall behind.

The PostgreSQL case is skipped, with the reason, where the server's programs (`initdb`,
`pg_ctl`; Debian: apt-get install postgresql) or psycopg2 (pip install 'lmlab[postgres]') are
missing."""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from test_optuna_sweeper import BAD_LR, GOOD_LR, lmlab_train, tiny_search_args, trial_table

pytestmark = pytest.mark.slow


def _postgres_program(name: str) -> str | None:
    """On PATH, else in Debian's versioned directory (the newest)."""
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))[-1:]
    return found if isinstance(found, str) else next(iter(found), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres_url(tmp_path: Path) -> Iterator[str]:
    """A PostgreSQL server of its own on a free local port, stopped and removed afterwards."""
    initdb, pg_ctl = _postgres_program("initdb"), _postgres_program("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("PostgreSQL's initdb/pg_ctl not found (Debian: apt-get install postgresql)")
    pytest.importorskip("psycopg2", reason="psycopg2 missing: pip install 'lmlab[postgres]'")
    # The server refuses to run as root: then it runs as the user postgres, in a directory
    # that user can reach (root's tmp_path is private to root).
    as_root = os.geteuid() == 0
    root = Path(tempfile.mkdtemp(prefix="lmlab-pg-")) if as_root else tmp_path / "pg"
    root.mkdir(exist_ok=True)
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
    if as_root:
        shutil.chown(root, "postgres")

    def run(*command: str) -> None:
        subprocess.run([*prefix, *command], check=True, capture_output=True, timeout=120)

    data, port = root / "data", _free_port()
    try:
        run(initdb, "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync")
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
        run(pg_ctl, "-D", str(data), "-l", str(root / "server.log"), "-o", options, "-w", "start")
        # the driver named: SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
        run(pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop")
    finally:
        if as_root:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["postgresql", "sqlite"])
def storage(request, tmp_path: Path) -> str:
    if request.param == "postgresql":
        return request.getfixturevalue("postgres_url")
    return f"sqlite:///{tmp_path / 'shared.db'}"  # one file for both workers


def test_two_workers_share_one_study(storage: str, tmp_path: Path):
    args = tiny_search_args(tmp_path)
    shared = [f"hydra.sweeper.storage={storage}", "hydra.sweeper.study_name=two_workers"]
    sweeps = [tmp_path / "worker_a", tmp_path / "worker_b"]  # as on two machines
    workers = [lmlab_train(*args, *shared, f"hydra.sweep.dir={s}", cwd=tmp_path) for s in sweeps]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    for worker, output in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, output[-3000:]

    table = trial_table(storage, "two_workers")
    print(f"\n{storage.split(':')[0]}: trials (number, state, value, params):")
    for row in table:
        print("  ", *row)
    ran = [t for t in table if t[1] in ("COMPLETE", "PRUNED")]
    numbers = [n for n, *_ in ran]
    assert len(ran) == 6 and len(set(numbers)) == 6  # the budget, no trial twice
    assert all(t[1] == "FAIL" for t in table if t[0] not in numbers)  # surplus ones, never run
    # each worker's first trial (lr 0.1) completes; its trials at lr 1e-6 fall behind and are
    # pruned at their first validation
    for _, state, _, params in ran:
        lr = params["model.optimizer.lr"]
        assert (lr, state) in ((GOOD_LR, "COMPLETE"), (BAD_LR, "PRUNED"))
    assert {state for _, state, *_ in ran} == {"COMPLETE", "PRUNED"}

    # both workers ran trials, each trial once: one job directory per trial, over both sweeps
    study = optuna.load_study(study_name="two_workers", storage=storage)
    assert len({t.user_attrs["worker"] for t in study.trials if t.number in numbers}) == 2
    jobs = {
        int(job.name.split("_")[0]): job
        for sweep in sweeps
        for job in sweep.iterdir()
        if (job / ".hydra").is_dir()
    }
    assert sorted(jobs) == sorted(numbers)
    for number, state, *_ in ran:
        status = json.loads((jobs[number] / "metrics.json").read_text())["status"]
        assert status == {"COMPLETE": "completed", "PRUNED": "pruned"}[state]
    best = f"Best parameters: {{'model.optimizer.lr': {GOOD_LR}}}"
    assert all(best in output for output in outputs)
