"""The store under stress: concurrent writers, SIGKILL mid-loop, unique tstamps, dead-run detection."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

import flordb_build as flor
from flordb_build.config import load_config
from flordb_build.store import Store, bump_tstamp
from tests.conftest import GIT_ENV, Project

WRITER = """
import flordb_build as flor
worker = flor.arg("worker", 0)
for i in flor.loop("i", range(50_000)):
    flor.log("value", worker * 1_000_000 + i)
"""

SLOW_LOOP = """
import sys, time
import flordb_build as flor
for i in flor.loop("i", range(1_000_000)):
    flor.log("value", i)
    if i == 2_000:
        print("ready", flush=True)
    if i > 2_000:
        time.sleep(0.0005)
"""


def start(project: Project, script: str) -> subprocess.Popen[str]:
    """Start a script that prints 'ready' once it has logged a few thousand values."""
    proc = subprocess.Popen(
        [sys.executable, script], cwd=project.root, env={**os.environ, **GIT_ENV}, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def test_four_concurrent_writers_lose_no_row(project: Project) -> None:
    project.write("writer.py", WRITER)
    procs = [
        subprocess.Popen(
            [sys.executable, "writer.py", "--kwargs", f"worker={w}"],
            cwd=project.root,
            env={**os.environ, **GIT_ENV},
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(4)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    frame = flor.dataframe("value")
    assert len(frame) == 200_000
    assert frame["run_id"].nunique() == 4
    values = frame["value"].tolist()
    for worker in range(4):
        mine = sorted(v for v in values if v // 1_000_000 == worker)
        assert mine == [worker * 1_000_000 + i for i in range(50_000)]
    conn = sqlite3.connect(project.root / ".flor" / "flor.db")
    statuses = conn.execute("SELECT status, count(*) FROM runs GROUP BY status").fetchall()
    snapshots = conn.execute("SELECT count(DISTINCT snapshot) FROM runs").fetchone()[0]
    conn.close()
    assert statuses == [("ok", 4)]
    assert snapshots == 4
    shadow = project.git("rev-list", "--count", "flor.shadow").strip()
    assert shadow == "4"  # every concurrent snapshot landed on the shadow branch


def test_sigkill_keeps_a_prefix_with_no_holes_and_marks_the_run_killed(project: Project) -> None:
    project.write("slow.py", SLOW_LOOP)
    with start(project, "slow.py") as proc:
        time.sleep(1.5)  # several flush intervals
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)

    conn = sqlite3.connect(project.root / ".flor" / "flor.db")
    assert conn.execute("SELECT status FROM runs").fetchall() == [("running",)]
    conn.close()

    frame = flor.dataframe("value")  # opening the store detects the dead process
    values = frame["value"].tolist()
    assert len(values) > 2_000
    assert values == list(range(len(values)))  # a prefix, no holes
    assert frame["i"].tolist() == values
    conn = sqlite3.connect(project.root / ".flor" / "flor.db")
    assert conn.execute("SELECT status FROM runs").fetchall() == [("killed",)]
    conn.close()


def test_a_live_run_is_not_marked_killed(project: Project) -> None:
    project.write("slow.py", SLOW_LOOP)
    with start(project, "slow.py") as proc:
        store = Store.open(load_config())
        assert store.mark_dead_runs() == []
        assert store.conn.execute("SELECT status FROM runs").fetchall() == [("running",)]
        store.close()
        proc.kill()


def test_logs_reach_the_database_while_the_script_runs(project: Project) -> None:
    project.write("slow.py", SLOW_LOOP)
    with start(project, "slow.py") as proc:
        time.sleep(1.2)
        streamed = len(flor.dataframe("value"))
        proc.kill()
    assert streamed > 2_000  # streamed while running, not held until exit


def test_tstamps_are_unique_to_the_microsecond(project: Project) -> None:
    store = Store.open(load_config())
    row = {"run_id": "a", "projid": "p", "tstamp": "2026-01-01T00:00:00.000001", "status": "ok"}
    first = store.insert_run(row)
    second = store.insert_run({**row, "run_id": "b"})
    store.close()
    assert first == "2026-01-01T00:00:00.000001"
    assert second == "2026-01-01T00:00:00.000002"
    assert bump_tstamp("2026-01-01T23:59:59.999999") == "2026-01-02T00:00:00.000000"


def test_schema_is_created_once_and_opening_twice_is_harmless(project: Project) -> None:
    Store.open(load_config()).close()
    store = Store.open(load_config())
    tables = {r[0] for r in store.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    journal_mode = store.conn.execute("PRAGMA journal_mode").fetchone()[0]
    store.close()
    assert {"runs", "loops", "logs", "pipelines", "tasks", "files", "envs", "checkpoints", "timings"} <= tables
    assert journal_mode == "wal"
    assert (project.root / ".flor" / ".gitignore").read_text().splitlines()[-1] == "*"
    assert project.git("status", "--porcelain") == ""
