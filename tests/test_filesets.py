"""Schema 6: task executions share content-addressed file sets, and ``files`` reads as the table did."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from flordb_build.config import load_config
from flordb_build.dag import BuildRecorder, FileRole, TaskRecord, TaskStatus
from flordb_build.dag._record import FileFact
from flordb_build.dag._report import read_pipeline, read_pipelines, read_tasks
from flordb_build.filesets import FILE_COLUMNS, write_file_rows
from flordb_build.lineage import LineageTracer, lineage_to_json
from flordb_build.store import SCHEMA_VERSION, Store
from tests.conftest import Project

DEP, TARGET = FileRole.DEP, FileRole.TARGET
#: The schema-5 ``files`` table, as store.py created it before file sets.
V5_FILES_DDL = (
    "CREATE TABLE files (pipeline_id TEXT, task TEXT, path TEXT, role TEXT, sha256 TEXT, size INTEGER, "
    "mtime_ns INTEGER, PRIMARY KEY (pipeline_id, task, path, role))",
    "CREATE INDEX idx_files_sha256 ON files (sha256)",
    "CREATE INDEX idx_files_path ON files (path)",
)


def fact(path: str, role: FileRole, content: str, mtime_ns: int | None = 7) -> FileFact:
    return FileFact(path, role, f"{content:0>64}"[-64:], len(content), mtime_ns)


#: raw -[prep]-> clean -[train]-> model -[infer]-> pred, in three invocations:
#: p1 runs everything, p2 finds everything up to date, p3 runs after raw.csv changed (infer's
#: output happens to be the same, and report never ran before).
RAW1, RAW2 = fact("raw.csv", DEP, "a1"), fact("raw.csv", DEP, "a2")
CLEAN1, CLEAN2 = fact("clean.csv", TARGET, "b1"), fact("clean.csv", TARGET, "b2")
PIPELINES: dict[str, list[tuple[str, TaskStatus, list[FileFact]]]] = {
    "p1": [
        ("prep", TaskStatus.EXECUTED, [RAW1, CLEAN1]),
        ("train", TaskStatus.EXECUTED, [fact("clean.csv", DEP, "b1"), fact("model.bin", TARGET, "c1", None)]),
        ("infer", TaskStatus.EXECUTED, [fact("model.bin", DEP, "c1"), fact("pred.csv", TARGET, "d1")]),
    ],
    "p2": [
        ("prep", TaskStatus.UP_TO_DATE, [RAW1, CLEAN1]),
        ("train", TaskStatus.UP_TO_DATE, [fact("clean.csv", DEP, "b1"), fact("model.bin", TARGET, "c1", None)]),
        ("infer", TaskStatus.UP_TO_DATE, [fact("model.bin", DEP, "c1"), fact("pred.csv", TARGET, "d1")]),
    ],
    "p3": [
        ("prep", TaskStatus.EXECUTED, [RAW2, CLEAN2]),
        ("train", TaskStatus.EXECUTED, [fact("clean.csv", DEP, "b2"), fact("model.bin", TARGET, "c2")]),
        ("infer", TaskStatus.EXECUTED, [fact("model.bin", DEP, "c2"), fact("pred.csv", TARGET, "d1")]),
        ("report", TaskStatus.FAILED, [fact("pred.csv", DEP, "d1")]),
    ],
}


def expected_rows() -> list[tuple[Any, ...]]:
    """The ``files`` rows of :data:`PIPELINES` as the schema-5 table held them: one per execution and file."""
    return sorted(
        (pid, task, f.path, f.role.value, f.sha256, f.size, f.mtime_ns)
        for pid, tasks in PIPELINES.items()
        for task, _, facts in tasks
        for f in facts
    )


def record(project: Project) -> Store:
    store = Store.open(load_config())
    for n, (pid, tasks) in enumerate(PIPELINES.items()):
        recorder = BuildRecorder(store, pid)
        recorder.start_pipeline("doit", ["doit"], {"tasks": [{"name": t} for t, _, _ in tasks]}, started=10.0 * n)
        for i, (task, status, facts) in enumerate(tasks):
            began = 10.0 * n + i
            if status is TaskStatus.UP_TO_DATE:
                recorder.queue_task(TaskRecord(task, status, began, began + 0.5), facts)
            else:
                recorder.record_task(TaskRecord(task, status, began, began + 0.5, "why", ["cmd"]), facts)
        recorder.finish_pipeline("ok", 0)
    return store


def files_rows(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
    return sorted(conn.execute("SELECT " + ", ".join(FILE_COLUMNS) + " FROM files").fetchall())  # noqa: S608


def readers_output(conn: sqlite3.Connection) -> dict[str, Any]:
    """What the build-context readers show of a store: pipeline/task frames, DAG views and lineage both ways."""
    tracer = LineageTracer(conn)
    out: dict[str, Any] = {"pipelines": read_pipelines(conn).drop(columns=["started"]).to_dict("records")}
    for pid in PIPELINES:
        out[f"tasks {pid}"] = read_tasks(conn, pid).to_dict("records")
        view = read_pipeline(conn, pid)
        out[f"view {pid}"] = (view.tasks, repr(view.graph))
    for path, content in (("pred.csv", "d1"), ("model.bin", "c1"), ("clean.csv", "b2"), ("raw.csv", "a1")):
        sha = f"{content:0>64}"
        out[f"lineage {path}"] = lineage_to_json(tracer.trace(path, sha, len(content)))
    return json.loads(json.dumps(out, default=str))


def schema5_copy(store: Store, path: Path) -> sqlite3.Connection:
    """The same store as schema 5 would hold it: tables copied, ``files`` a table of its rows."""
    conn = sqlite3.connect(path)
    for ddl in V5_FILES_DDL:
        conn.execute(ddl)
    conn.execute("ATTACH DATABASE ? AS new", (str(store.config.db_path),))
    for table in ("pipelines", "tasks", "runs"):
        conn.execute(f"CREATE TABLE {table} AS SELECT * FROM new.{table}")  # noqa: S608 - constant names
    conn.execute("INSERT INTO files SELECT * FROM new.files")
    conn.commit()
    conn.execute("DETACH DATABASE new")
    return conn


def test_an_up_to_date_execution_shares_the_file_set_of_the_one_it_repeats(project: Project) -> None:
    store = record(project)
    conn = store.conn
    sets = dict(conn.execute("SELECT pipeline_id || ' ' || task, set_id FROM task_files"))
    for task in ("prep", "train", "infer"):
        assert sets[f"p2 {task}"] == sets[f"p1 {task}"]  # the same facts: one set, no copies
    assert sets["p3 prep"] != sets["p1 prep"] and sets["p3 train"] != sets["p1 train"]
    # 10 executions, 19 rows as schema 5 held them; p2's 6 are p1's, stored once.
    assert len(expected_rows()) == 19
    (n_set_rows,) = conn.execute("SELECT count(*) FROM file_sets").fetchone()
    assert n_set_rows == 19 - 6
    assert files_rows(conn) == expected_rows()
    store.close()


def test_build_frames_and_lineage_read_the_same_as_from_the_schema_5_table(project: Project, tmp_path: Path) -> None:
    store = record(project)
    old = schema5_copy(store, tmp_path / "v5.db")
    assert files_rows(old) == expected_rows()
    assert readers_output(store.conn) == readers_output(old)
    old.close()
    store.close()


def test_a_schema_5_store_migrates_to_file_sets_and_reads_the_same(project: Project, tmp_path: Path) -> None:
    store = record(project)
    before = readers_output(store.conn)
    config = store.config
    store.close()
    conn = sqlite3.connect(config.db_path)  # make it the store schema 5 left: a files table, no sets
    rows = files_rows(conn)
    conn.executescript(
        "DROP TRIGGER files_insert; DROP VIEW files; DELETE FROM task_files; DELETE FROM file_sets; "  # noqa: S608
        + "; ".join(V5_FILES_DDL) + "; PRAGMA user_version = 5;"
    )
    conn.executemany("INSERT INTO files VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    conn.commit()
    conn.close()

    migrated = Store.open(config)
    kind = migrated.conn.execute("SELECT type FROM sqlite_master WHERE name = 'files'").fetchone()
    assert kind == ("view",)
    assert migrated.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert files_rows(migrated.conn) == expected_rows()
    assert readers_output(migrated.conn) == before
    # and the facts are shared as a recording would have shared them
    (n_set_rows,) = migrated.conn.execute("SELECT count(*) FROM file_sets").fetchone()
    assert n_set_rows == 19 - 6
    migrated.close()


def test_a_row_inserted_into_the_view_changes_only_its_own_execution(project: Project) -> None:
    store = record(project)
    conn = store.conn
    # p2's prep shares p1's set: a row added to p2's facts (a slice's copy does such inserts)
    # must not appear in p1's, and replacing a row must replace, as it did in the table.
    conn.execute(
        "INSERT OR REPLACE INTO files VALUES ('p2', 'prep', 'extra.txt', 'dep', ?, 3, NULL)", ("e" * 64,)
    )
    conn.execute(
        "INSERT OR REPLACE INTO files VALUES ('p2', 'prep', 'raw.csv', 'dep', ?, 9, 1)", ("f" * 64,)
    )
    new_task = ("p9", "fresh", "x.txt", "target", "0" * 64, 1, 2)
    conn.execute("INSERT INTO files VALUES (?, ?, ?, ?, ?, ?, ?)", new_task)
    expected = [r for r in expected_rows() if r[:2] != ("p2", "prep")]
    expected += [
        ("p2", "prep", "clean.csv", "target", CLEAN1.sha256, CLEAN1.size, CLEAN1.mtime_ns),
        ("p2", "prep", "extra.txt", "dep", "e" * 64, 3, None),
        ("p2", "prep", "raw.csv", "dep", "f" * 64, 9, 1),
        new_task,
    ]
    assert files_rows(conn) == sorted(expected)
    with pytest.raises(sqlite3.IntegrityError):  # the table's key still holds: no duplicate row
        conn.execute("INSERT INTO files VALUES (?, ?, ?, ?, ?, ?, ?)", new_task)
    store.close()


def test_rows_written_in_two_batches_keep_both_as_the_table_did(project: Project) -> None:
    store = record(project)
    conn = store.conn
    write_file_rows(conn, [("p1", "infer", "extra.bin", "dep", "1" * 64, 1, None)])
    write_file_rows(conn, [("p1", "infer", "pred.csv", "target", "2" * 64, 2, None)])  # replaces that row only
    expected = [r for r in expected_rows() if r[:2] != ("p1", "infer") or r[2] == "model.bin"]
    expected += [("p1", "infer", "extra.bin", "dep", "1" * 64, 1, None), ("p1", "infer", "pred.csv", "target", "2" * 64, 2, None)]
    assert files_rows(conn) == sorted(expected)
    # p2's infer had the same facts as p1's, and keeps them
    p2 = [r for r in files_rows(conn) if r[:2] == ("p2", "infer")]
    assert p2 == [r for r in expected_rows() if r[:2] == ("p2", "infer")]
    store.close()


def test_a_set_made_by_the_trigger_is_never_shared_by_a_later_execution(project: Project) -> None:
    store = Store.open(load_config())
    conn = store.conn
    row = ("p1", "prep", "raw.csv", "dep", RAW1.sha256, RAW1.size, RAW1.mtime_ns)
    conn.execute("INSERT INTO files VALUES (?, ?, ?, ?, ?, ?, ?)", row)  # p1's facts: an own set
    (own,) = conn.execute("SELECT set_id FROM task_files WHERE pipeline_id = 'p1'").fetchone()
    assert own == "own:p1/prep"
    recorder = BuildRecorder(store, "p2")
    recorder.start_pipeline("doit", ["doit"], {"tasks": []}, started=1.0)
    conn.execute("UPDATE pipelines SET tool = 'doit', cwd = ?, started = 0 WHERE pipeline_id = 'p2'", (str(project.root),))
    conn.execute("INSERT INTO pipelines (pipeline_id, tool, cwd, started) VALUES ('p1', 'doit', ?, 0.5)", (str(project.root),))
    recorder.remember_previous("doit")
    recorder.queue_task(TaskRecord("prep", TaskStatus.UP_TO_DATE, 2.0, 2.0), [RAW1])
    recorder.flush()
    conn.execute("INSERT INTO files VALUES ('p1', 'prep', 'late.txt', 'dep', NULL, NULL, NULL)")  # p1's own, changed
    assert files_rows(conn) == sorted([row, ("p1", "prep", "late.txt", "dep", None, None, None), ("p2", *row[1:])])
    store.close()


def test_a_replay_slice_copies_the_files_rows_through_the_view(project: Project, tmp_path: Path) -> None:
    from flordb_build.hindsight._slice import build_slice

    store = record(project)
    store.conn.execute(
        "INSERT INTO runs (run_id, projid, tstamp, status, started, ended) VALUES ('r1', 'p', 't', 'ok', 100.0, 101.0)"
    )
    store.conn.execute("UPDATE tasks SET ended = 50.0")  # every task ended before the run started
    expected = files_rows(store.conn)
    config = store.config
    store.close()
    sliced = tmp_path / "slice.db"
    sliced.write_bytes(build_slice(config, "r1", as_of=True))
    conn = sqlite3.connect(sliced)
    assert files_rows(conn) == expected == expected_rows()
    conn.close()
