"""The store under stress: concurrent writers, SIGKILL mid-loop, unique tstamps, dead-run detection."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import flordb_build as flor
from flordb_build.config import load_config
from flordb_build.errors import NotAStoreError
from flordb_build.store import Store, bump_tstamp, coalesce_loops, loop_contexts, write_transaction
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

    frame = flor.dataframe("value")
    values = frame["value"].tolist()
    assert len(values) > 2_000
    assert values == list(range(len(values)))  # a prefix, no holes
    assert frame["i"].tolist() == values
    # A reader shows the dead run killed without writing it (reader.py); a writing open marks it.
    assert flor.query("SELECT status FROM runs")["status"].tolist() == ["killed"]
    conn = sqlite3.connect(project.root / ".flor" / "flor.db")
    assert conn.execute("SELECT status FROM runs").fetchall() == [("running",)]
    Store.open(load_config()).close()
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
    tables = {r[0] for r in store.conn.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")}
    journal_mode = store.conn.execute("PRAGMA journal_mode").fetchone()[0]
    store.close()
    assert {"runs", "loops", "logs", "pipelines", "tasks", "files", "envs", "checkpoints", "timings"} <= tables
    assert {"task_files", "file_sets"} <= tables  # what the files view reads (filesets.py)
    assert journal_mode == "wal"
    assert (project.root / ".flor" / ".gitignore").read_text().splitlines()[-1] == "*"
    assert project.git("status", "--porcelain") == ""


def test_consecutive_iterations_are_stored_as_blocks(project: Project) -> None:
    project.write(
        "nested.py",
        """
        import flordb_build as flor
        for epoch in flor.loop("epoch", range(3)):
            for step in flor.loop("step", range(1000)):
                flor.log("loss", epoch * 1000 + step)
            for doc in flor.loop("doc", ["a", "b"]):
                flor.log("chars", len(doc))
        """,
    )
    project.run("nested.py")
    store = Store.open(load_config())
    (run_id,) = store.conn.execute("SELECT run_id FROM runs").fetchone()
    blocks = store.conn.execute("SELECT name, count(*), sum(count) FROM loops GROUP BY name ORDER BY name").fetchall()
    contexts = loop_contexts(store.conn, run_id)
    store.close()
    # 3000 steps in a handful of rows (a block may split at a flush), documents keep their values.
    assert [(name, total) for name, _rows, total in blocks] == [("doc", 6), ("epoch", 3), ("step", 3000)]
    assert dict((name, rows) for name, rows, _ in blocks)["step"] <= 12
    assert len(contexts) == 3009 and [c[0] for c in contexts] == sorted({c[0] for c in contexts})
    steps = [c for c in contexts if c[2] == "step"]
    assert [c[3] for c in steps] == list(range(1000)) * 3
    frame = flor.dataframe("loss")
    assert frame["loss"].tolist() == list(range(3000))
    assert frame["step"].tolist() == list(range(1000)) * 3 and frame["epoch"].tolist() == [0] * 1000 + [1] * 1000 + [2] * 1000
    assert flor.dataframe("chars")["doc_value"].tolist() == ["a", "b"] * 3


def test_coalesce_loops_merges_only_true_runs() -> None:
    entries = [
        (1, 0, "epoch", 0, None),
        (2, 1, "step", 0, None),
        (3, 1, "step", 1, None),
        (4, 1, "step", 2, None),
        (5, 1, "doc", 0, "a.txt"),  # a value: never merged
        (6, 1, "doc", 1, "b.txt"),
        (7, 0, "epoch", 1, None),
        (8, 7, "step", 0, None),  # another parent: a new block
        (10, 7, "step", 1, None),  # a gap in ctx ids: a new block
    ]
    assert coalesce_loops(entries) == [
        (1, 0, "epoch", 0, 1, None),
        (2, 1, "step", 0, 3, None),
        (5, 1, "doc", 0, 1, "a.txt"),
        (6, 1, "doc", 1, 1, "b.txt"),
        (7, 0, "epoch", 1, 1, None),
        (8, 7, "step", 0, 1, None),
        (10, 7, "step", 1, 1, None),
    ]


def test_packed_columns_hold_their_values_alone_and_read_with_rows(project: Project) -> None:
    project.write(
        "kinds.py",
        """
        import flordb_build as flor
        for step in flor.loop("step", range(500)):
            flor.log("loss", step / 7)
            flor.log("count", step * 3)
            flor.log("tag", f"s{step}")
            flor.log("mixed", step if step % 2 else step + 0.5)
        """,
    )
    project.run("kinds.py")
    names = ("loss", "count", "tag", "mixed")
    expected = {
        "loss": [s / 7 for s in range(500)],
        "count": [s * 3 for s in range(500)],
        "tag": [f"s{s}" for s in range(500)],
        "mixed": [s if s % 2 else s + 0.5 for s in range(500)],
    }
    frame = flor.dataframe(*names)
    for name in names:
        assert frame[name].tolist() == expected[name], name
    assert frame["count"].dtype == "int64" and frame["loss"].dtype == "float64"

    store = Store.open(load_config())
    formats = dict(store.conn.execute("SELECT name, group_concat(DISTINCT format) FROM log_columns GROUP BY name"))
    assert {name: formats[name] for name in ("loss", "count", "tag")} == {"loss": "f8", "count": "i8", "tag": "rows"}
    # A chunk of "mixed" holds both kinds, so it stays rows; only a flush that happened to take
    # one value of it alone (a busy machine's timing) packs that value.
    mixed = store.conn.execute("SELECT count, format FROM log_columns WHERE name = 'mixed'").fetchall()
    assert all(fmt == "rows" for count, fmt in mixed if count > 1) and sum(count for count, _f in mixed) == 500
    # A packed value has no `logs` row (schema 7); the text has rows only.
    run_rows = dict(store.conn.execute("SELECT name, count(*) FROM logs GROUP BY name"))
    assert "loss" not in run_rows and "count" not in run_rows and run_rows["tag"] == 500
    # Some values as rows and some packed (the first chunk of "loss" turned back into rows): the
    # reader merges both in seq order.
    from flordb_build.packedlogs import CHUNKS_SQL, expand_chunk

    (run_id,) = store.conn.execute("SELECT run_id FROM runs").fetchone()
    first = store.conn.execute(CHUNKS_SQL, (run_id, "loss")).fetchone()
    with write_transaction(store.conn):
        store.conn.executemany(
            "INSERT INTO logs (run_id, seq, ctx_id, name, value, kind, source) VALUES (?, ?, ?, 'loss', ?, ?, 'record')",
            [(run_id, *row) for row in expand_chunk(first)],
        )
        store.conn.execute(
            "UPDATE log_columns SET format = 'rows', ctx_ids = NULL, vals = NULL, seq_step = NULL, seqs = NULL "
            "WHERE run_id = ? AND name = 'loss' AND first_seq = ?",
            (run_id, first[0]),
        )
    store.close()
    assert flor.dataframe("loss")["loss"].tolist() == expected["loss"]


def test_an_open_store_holds_the_store_lock_shared_until_closed(project: Project) -> None:
    from flordb_build.store import StoreLock

    config = load_config()
    first, second = Store.open(config), Store.open(config)  # shared: any number of connections at once
    assert StoreLock.exclusive(config.db_path, wait=False) is None  # a rebuild is refused meanwhile
    first.close()
    assert StoreLock.exclusive(config.db_path, wait=False) is None
    second.close()
    lock = StoreLock.exclusive(config.db_path, wait=False)
    assert lock is not None
    lock.release()


@pytest.mark.skipif(os.geteuid() != 0, reason="a read-only bind mount needs root")
def test_a_read_only_store_directory_gets_no_lock_and_no_error(project: Project) -> None:
    from flordb_build.store import StoreLock, store_lock_path

    project.write("one.py", "import flordb_build as flor\nflor.log('x', 1)\n")
    project.run("one.py")
    flor_dir = project.root / ".flor"
    lock_path = store_lock_path(load_config().db_path)
    lock_path.unlink()
    subprocess.run(["mount", "--bind", str(flor_dir), str(flor_dir)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(flor_dir)], check=True)
        assert StoreLock.shared(load_config().db_path) is None  # cannot create it: go on without
    finally:
        subprocess.run(["umount", str(flor_dir)], check=True)
    lock_path.touch()
    subprocess.run(["mount", "--bind", str(flor_dir), str(flor_dir)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(flor_dir)], check=True)
        shared = StoreLock.shared(load_config().db_path)  # it exists: a read-only descriptor locks it
        assert shared is not None
        shared.release()
    finally:
        subprocess.run(["umount", str(flor_dir)], check=True)


# -- a store file that is not a store; reading on a full or read-only disk ------------------------

TRAIN = """
import flordb_build as flor
for epoch in flor.loop("epoch", range(2)):
    flor.log("loss", 1.0 / (epoch + 1))
"""
READ_COMMANDS = (("runs",), ("dataframe", "loss"), ("query", "SELECT count(*) AS n FROM runs"), ("pipelines",),
                 ("lineage", "train.py"))


def test_an_empty_or_foreign_store_file_is_refused_naming_it_and_rebuild(project: Project) -> None:
    project.write("train.py", TRAIN)
    project.run("train.py")
    db = project.root / ".flor" / "flor.db"
    for content in (b"", b"not a database, just some text\n"):  # what a full disk or a bad copy leaves
        for suffix in ("", "-wal", "-shm"):
            Path(str(db) + suffix).unlink(missing_ok=True)
        db.write_bytes(content)
        for read in (lambda: flor.dataframe("loss"), lambda: flor.query("SELECT 1"), lambda: Store.open(load_config())):
            with pytest.raises(NotAStoreError) as caught:
                read()
            assert f"'{db}'" in str(caught.value) and "flordb-build rebuild" in str(caught.value)
        proc = project.cli("runs", check=False)
        assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1 and str(db) in proc.stderr
        assert db.read_bytes() == content  # never treated as an empty store, never written
        project.cli("rebuild")
        assert flor.dataframe("loss")["loss"].tolist() == [1.0, 0.5]

    # Refusing empty files is safe only if no run ever sees the store half-created: runs of a fresh
    # project that all create it at once must all record.
    for suffix in ("", "-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    procs = [
        subprocess.Popen([sys.executable, "train.py"], cwd=project.root, env={**os.environ, **GIT_ENV},
                         stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    errors = [proc.communicate(timeout=300)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0, 0], errors
    assert len(flor.query("SELECT run_id FROM runs")) == 4


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs or a read-only bind needs root")


def run_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flordb_build", *args], cwd=cwd, env={**os.environ, **GIT_ENV},
                          capture_output=True, text=True, timeout=300)


def assert_reads_work(cwd: Path, run_ids: list[str]) -> None:
    for args in (*READ_COMMANDS, ("diff", run_ids[0], run_ids[-1])):
        proc = run_cli(cwd, *args)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, (args, proc.stderr)
    runs = run_cli(cwd, "runs", "--format", "csv").stdout
    assert all(run_id in runs for run_id in run_ids)


@needs_root
def test_read_commands_work_on_a_read_only_disk(project: Project, tmp_path: Path) -> None:
    project.write("train.py", TRAIN)
    project.run("train.py")
    run_ids = flor.query("SELECT run_id FROM runs")["run_id"].tolist()
    view = tmp_path / "read-only"
    view.mkdir()
    subprocess.run(["mount", "--bind", str(project.root), str(view)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], check=True)
        assert_reads_work(view, run_ids)
    finally:
        subprocess.run(["umount", str(view)], check=True)


KILLED = """
import os, signal
import flordb_build as flor
flor.log("x", 1)
flor.commit()
flor.log("y", 2)
os.kill(os.getpid(), signal.SIGKILL)  # leaves a run 'running' that the next reader wants to mark
"""
HOLDER = """
import sqlite3, sys
conn = sqlite3.connect(".flor/flor.db")
conn.execute("SELECT count(*) FROM runs").fetchone()
print("open", flush=True)
sys.stdin.read()
"""


@needs_root
def test_read_commands_work_on_a_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], check=True)
    holder: subprocess.Popen[str] | None = None
    try:
        project = Project(disk / "proj")
        project.root.mkdir()
        project.git("init", "-q", "-b", "main")
        project.write("train.py", TRAIN)
        project.write("killed.py", KILLED)
        project.commit_all("initial")
        monkeypatch.chdir(project.root)
        project.run("train.py")
        assert project.run("killed.py", check=False).returncode == -signal.SIGKILL
        conn = sqlite3.connect(project.root / ".flor" / "flor.db")
        run_ids = [row[0] for row in conn.execute("SELECT run_id FROM runs")]
        conn.close()
        # Another process keeps the store open (its -wal and -shm stay), then the disk fills up.
        holder = subprocess.Popen([sys.executable, "-c", HOLDER], cwd=project.root, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        assert holder.stdout is not None and holder.stdout.readline() == "open\n"
        with open(disk / "filler", "wb", buffering=0) as filler:
            with pytest.raises(OSError):
                while True:
                    filler.write(b"\0" * 65536)

        assert_reads_work(project.root, run_ids)  # a reader would mark the killed run: a write
        holder.communicate("")
        holder = None
        assert_reads_work(project.root, run_ids)  # no -shm left, and none can be created
    finally:
        if holder is not None:
            holder.kill()
            holder.communicate()
        monkeypatch.chdir(tmp_path)
        subprocess.run(["umount", str(disk)], check=True)


def test_a_read_in_a_process_that_writes_keeps_its_locks(project: Project) -> None:
    # Closing any descriptor of a file drops every POSIX lock the process holds on it, SQLite's
    # too. A reader that opened flor.db itself (a doit uptodate check calling flor.query while the
    # reporter writes) dropped the writer's shared lock: the next process to close its connection
    # then took itself for the last one and deleted the WAL the writer was still appending to.
    project.write("train.py", TRAIN)
    project.run("train.py")
    db = load_config().db_path
    store = Store.open(load_config())
    count = "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); print(c.execute(sys.argv[2]).fetchone()[0]); c.close()"
    envs = "SELECT count(*) FROM envs WHERE env_id LIKE 'test-%'"
    try:
        with write_transaction(store.conn):
            store.conn.execute("INSERT INTO envs (env_id, env, created) VALUES ('test-1', '{}', 0)")
        flor.query("SELECT count(*) FROM runs")  # reads in the writing process
        flor.dataframe("loss")
        subprocess.run([sys.executable, "-c", count, str(db), envs], check=True, capture_output=True, timeout=60)
        assert Path(str(db) + "-wal").exists(), "another process deleted the WAL this one writes to"
        with write_transaction(store.conn):
            store.conn.execute("INSERT INTO envs (env_id, env, created) VALUES ('test-2', '{}', 0)")
        seen = subprocess.run([sys.executable, "-c", count, str(db), envs], check=True, capture_output=True,
                              text=True, timeout=60)
        assert seen.stdout.strip() == "2"
    finally:
        store.close()


def _column(name: str, typecode: str, seqs: list[int], ctxs: list[int], vals: list[object]):  # type: ignore[no-untyped-def]
    from array import array

    from flordb_build.recorder import LogColumn

    return LogColumn(name, typecode, array("q", seqs), array("q", ctxs), array(typecode, vals))  # type: ignore[arg-type]


def test_packed_columns_store_exactly_the_rows_executemany_stores(project: Project) -> None:
    """The one-statement insert of a column (JSON text into SQLite) keeps every float bit-exact and
    every row as binding it row by row does: NaN, infinities, -0.0, subnormals, breaks in the ctx
    runs, interleaved seqs, int64 bounds."""
    import math
    import random
    import struct

    rng = random.Random(14)
    n = 3000
    bits = [struct.unpack("<d", rng.randbytes(8))[0] for _ in range(n)]
    floats = [x if math.isfinite(x) else 0.25 for x in bits]
    floats[:8] = [-0.0, 0.0, 5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, 1e16, 1.0, 2.0**63]
    floats[2500] = math.nan  # its segment is bound row by row, as SQLite stores NaN (NULL)
    floats[2600] = -math.inf
    ctxs = [10 + i + (i // 700) * 5 for i in range(n)]  # runs of consecutive ctxs with breaks
    columns = [
        _column("loss", "d", list(range(0, 2 * n, 2)), ctxs, floats),  # seqs interleaved with "count"
        _column("count", "q", list(range(1, 2 * n, 2)), ctxs, [rng.randint(-(2**63), 2**63 - 1) for _ in range(n)]),
        _column("scattered", "d", [10**6 + 7 * i for i in range(200)], [rng.randint(1, 50) for _ in range(200)], floats[:200]),
    ]
    store = Store.open(load_config())
    try:
        # replayed values are rows (a recorded packed value lives in its chunk only: below)
        store.write_batch("packed", [], [], columns=columns, source="replay")
        rows_of = [(c.name, s, x, v) for c in columns for s, x, v in zip(c.seqs, c.ctxs, c.vals, strict=True)]
        store.write_batch("bound", [], [(s, x, name, v, 0) for name, s, x, v in rows_of], source="replay")
        sql = "SELECT seq, ctx_id, name, value, typeof(value), kind, source FROM logs WHERE run_id = ? ORDER BY name, seq"
        packed = store.conn.execute(sql, ("packed",)).fetchall()
        bound = store.conn.execute(sql, ("bound",)).fetchall()
        assert len(packed) == len(bound) == 2 * n + 200
        for got, want in zip(packed, bound, strict=True):
            assert got[:3] == want[:3] and got[4:] == want[4:]
            assert struct.pack("<d", got[3]) == struct.pack("<d", want[3]) if got[4] == "real" else got[3] == want[3], (got, want)
        # recorded: the column and the same rows make the same chunks, exact seqs included, and no row
        store.write_batch("packed_r", [], [], columns=columns)
        store.write_batch("bound_r", [], [(s, x, name, v, 0) for name, s, x, v in rows_of])
        chunks = (
            "SELECT name, first_seq, count, format, ctx_ids, vals, seq_step, seqs FROM log_columns WHERE run_id = ? "
            "ORDER BY name"
        )
        packed_chunks = store.conn.execute(chunks, ("packed_r",)).fetchall()
        assert packed_chunks == store.conn.execute(chunks, ("bound_r",)).fetchall()
        assert {c[0]: (c[3], c[6]) for c in packed_chunks} == {"count": ("i8", 2), "loss": ("f8", 2), "scattered": ("f8", 7)}
        assert store.conn.execute("SELECT count(*) FROM logs WHERE run_id IN ('packed_r', 'bound_r')").fetchone() == (0,)
        from flordb_build.packedlogs import recorded_rows

        for column in columns:
            got = recorded_rows(store.conn, "packed_r", column.name)
            want = [(s, x, None if v != v else v, 0) for s, x, v in zip(column.seqs, column.ctxs, column.vals, strict=True)]
            assert [struct.pack("<d", r[2]) if isinstance(r[2], float) else r for r in got] == [
                struct.pack("<d", r[2]) if isinstance(r[2], float) else r for r in want
            ]
    finally:
        store.close()
