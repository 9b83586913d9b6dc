"""Readers never write: ``flor.dataframe``, ``flor.query``, ``flor.latest`` and every read command
leave ``.flor/`` as they found it, also beside a dead run, and work on a disk that takes no writes.

"As they found it": every file under ``.flor/`` byte for byte, ``flor.db`` and ``flor.db-wal``
included; ``-shm`` is excluded (SQLite's readers keep their read marks there). Where no ``-wal``
existed (every connection had closed), SQLite's read-only WAL reader may leave an empty one: it
holds no page, so the store reads the same.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import flordb_build as flor
from flordb_build.config import load_config
from flordb_build.errors import StoreError
from flordb_build.store import DEAD_RUN_ERROR, SCHEMA_VERSION

from .conftest import GIT_ENV, Project

TRAIN = """\
import flordb_build as flor
with open("model.txt", "w") as fh:
    for epoch in flor.loop("epoch", range(2)):
        flor.log("loss", 1.0 / (epoch + 1))
        fh.write(str(epoch))
"""
KILLED = """\
import os, signal
import flordb_build as flor
flor.log("loss", 3.0)
flor.commit()
flor.log("y", 2)
os.kill(os.getpid(), signal.SIGKILL)  # leaves a run 'running' that a writing open would mark killed
"""

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="a read-only bind mount needs root")


def flor_files(root: Path) -> dict[str, bytes]:
    """Every file under ``root/.flor`` but SQLite's ``-shm``, by relative path."""
    flor_dir = root / ".flor"
    return {
        str(path.relative_to(flor_dir)): path.read_bytes()
        for path in sorted(flor_dir.rglob("*"))
        if path.is_file() and not path.name.endswith("-shm")
    }


def assert_unchanged(before: dict[str, bytes], after: dict[str, bytes], what: str) -> None:
    appeared = {name: data for name, data in after.items() if name not in before}
    assert appeared in ({}, {"flor.db-wal": b""}), (what, sorted(appeared))  # see the module docstring
    assert {name: after.get(name) for name in before} == before, (what, [n for n in before if after.get(n) != before[n]])


def cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flordb_build", *args], cwd=cwd, env={**os.environ, **GIT_ENV},
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )


def read_commands(run_ids: list[str], out_dir: Path) -> list[tuple[str, ...]]:
    """Every command that only reads the store (ui serves the same readers: reader.reading)."""
    return [
        ("runs",), ("runs", "--format", "csv"), ("dataframe", "loss"), ("dataframe",),
        ("dataframe", "loss", "--latest"), ("query", "SELECT status FROM runs"), ("pipelines",), ("tasks",),
        ("dag",), ("lineage", "model.txt"), ("diff", run_ids[0], run_ids[-1]),
        ("plot", "loss", "-o", str(out_dir / "loss.html")),
    ]


@pytest.fixture
def with_dead_run(project: Project) -> tuple[Project, list[str], str]:
    """A pipeline task (make side), a plain run, then a run killed with SIGKILL: 'running' in the file."""
    project.write("train.py", TRAIN)
    project.write("killed.py", KILLED)
    project.commit_all("scripts")
    done = cli(project.root, "exec", "--task", "train", "--deps", "train.py", "--targets", "model.txt", "--",
               sys.executable, "train.py")
    assert done.returncode == 0, done.stderr
    project.run("train.py")
    assert project.run("killed.py", check=False).returncode != 0
    conn = sqlite3.connect(f"file:{project.root / '.flor' / 'flor.db'}?mode=ro", uri=True)
    rows = conn.execute("SELECT run_id, status FROM runs ORDER BY tstamp").fetchall()
    conn.close()
    assert rows[-1][1] == "running"
    return project, [r[0] for r in rows], rows[-1][0]


@pytest.mark.slow
def test_reads_leave_the_store_byte_identical_and_show_a_dead_run_killed(
    with_dead_run: tuple[Project, list[str], str], tmp_path: Path
) -> None:
    project, run_ids, dead = with_dead_run
    before = flor_files(project.root)
    assert (project.root / ".flor" / "flor.db-wal").exists()  # the killed run left its writes there

    api: list[tuple[str, Callable[[], Any]]] = [
        ("dataframe", lambda: flor.dataframe("loss")),
        ("dataframe()", lambda: flor.dataframe()),
        ("latest", lambda: flor.latest(flor.dataframe("loss"))),
        ("query", lambda: flor.query("SELECT run_id, status, error FROM runs")),
        ("flordb_logs", lambda: flor.query("SELECT count(*) AS n FROM flordb_logs")),
    ]
    for what, read in api:
        read()
        assert_unchanged(before, flor_files(project.root), what)
    for args in read_commands(run_ids, tmp_path):
        proc = cli(project.root, *args)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, (args, proc.stderr)
        assert_unchanged(before, flor_files(project.root), " ".join(args))

    # A dead run reads as a writing open would have marked it, in SQL too (reader.show_dead_runs_killed).
    status = flor.query("SELECT run_id, status, error FROM runs").set_index("run_id")
    assert status.loc[dead, "status"] == "killed" and status.loc[dead, "error"] == DEAD_RUN_ERROR
    assert set(status["status"]) == {"ok", "killed"}
    assert flor.query("SELECT count(*) AS n FROM runs WHERE status = 'running'")["n"][0] == 0
    assert f"{dead}" in cli(project.root, "runs", "--status", "killed", "--format", "csv").stdout
    assert_unchanged(before, flor_files(project.root), "status reads")

    # The first writing open marks it for real.
    assert cli(project.root, "migrate").returncode == 0
    conn = sqlite3.connect(f"file:{project.root / '.flor' / 'flor.db'}?mode=ro", uri=True)
    assert conn.execute("SELECT status FROM runs WHERE run_id = ?", (dead,)).fetchone()[0] == "killed"
    conn.close()


@pytest.mark.slow
@needs_root
def test_reads_work_on_a_read_only_bind_mount(with_dead_run: tuple[Project, list[str], str], tmp_path: Path) -> None:
    project, run_ids, dead = with_dead_run
    view = tmp_path / "read-only"
    view.mkdir()
    before = flor_files(project.root)
    subprocess.run(["mount", "--bind", str(project.root), str(view)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], check=True)
        config = load_config(view)
        assert flor.dataframe("loss", config=config)["loss"].notna().sum() == 5
        status = flor.query("SELECT run_id, status FROM runs", config=config).set_index("run_id")["status"]
        assert status[dead] == "killed"
        for args in read_commands(run_ids, tmp_path):
            proc = cli(view, *args)
            assert proc.returncode == 0 and "Traceback" not in proc.stderr, (args, proc.stderr)
    finally:
        subprocess.run(["umount", str(view)], check=True)
    assert flor_files(project.root) == before


def test_a_store_of_an_older_schema_is_refused_unchanged_until_a_write_migrates_it(project: Project) -> None:
    """Decision: readers never migrate, and a partial schema would read as missing rows: a clear error."""
    project.write("train.py", TRAIN)
    project.run("train.py")
    db = project.root / ".flor" / "flor.db"
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION - 1}")
    conn.close()
    before = flor_files(project.root)
    for read in (lambda: flor.dataframe("loss"), lambda: flor.query("SELECT 1")):
        with pytest.raises(StoreError, match=rf"schema version {SCHEMA_VERSION - 1}, older .* 'flordb-build migrate'"):
            read()
    proc = cli(project.root, "runs")
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1 and "flordb-build migrate" in proc.stderr
    assert_unchanged(before, flor_files(project.root), "old schema reads")

    assert cli(project.root, "migrate").returncode == 0
    assert flor.dataframe("loss")["loss"].tolist() == [1.0, 0.5]
