"""Reading back: dataframe shape and filters, injection attempts, read-only SQL."""

from __future__ import annotations

import sqlite3

import pytest

import flordb_build as flor
from flordb_build.errors import ExpressionError, QueryError
from flordb_build.expression import parse_where
from tests.conftest import Project

TRAIN = """
import flordb_build as flor
lr = flor.arg("lr", 0.1)
for epoch in flor.loop("epoch", range(3)):
    for step in flor.loop("step", range(2)):
        flor.log("loss", lr / (1 + epoch * 2 + step))
    flor.log("val_acc", 0.5 + epoch / 10)
flor.log("weird name; DROP TABLE runs", 1)
flor.log('quote"name', 2)
"""


@pytest.fixture
def recorded(project: Project) -> Project:
    project.write("train.py", TRAIN)
    project.run("train.py")
    project.run("train.py", "--kwargs", "lr=0.2", env={"FLOR_TASK": "train"})
    return project


def counts(project: Project) -> tuple[int, int, int]:
    conn = sqlite3.connect(project.root / ".flor" / "flor.db")
    try:
        runs, logs, loops = conn.execute(
            "SELECT (SELECT count(*) FROM runs), (SELECT count(*) FROM logs), (SELECT count(*) FROM loops)"
        ).fetchone()
        return runs, logs, loops
    finally:
        conn.close()


def test_where_filters_on_dimensions_and_values(recorded: Project) -> None:
    frame = flor.dataframe("loss", "val_acc", where="epoch >= 1 AND step = 1 AND val_acc > 0.55")
    assert frame["epoch"].tolist() == [1, 2, 1, 2] and set(frame["step"]) == {1}
    by_task = flor.dataframe("val_acc", where="task = 'train'")
    assert len(by_task) == 3 and set(by_task["task"]) == {"train"}
    by_time = flor.dataframe("val_acc", where="tstamp >= '2000-01-01' AND tstamp < '9999'")
    assert len(by_time) == 6
    assert flor.dataframe("val_acc", where="tstamp < '2000-01-01'").empty


def test_unknown_names_give_null_columns(recorded: Project) -> None:
    frame = flor.dataframe("val_acc", "never_logged")
    assert len(frame) == 6 and frame["never_logged"].isna().all()
    empty = flor.dataframe("nothing", "neither")
    assert empty.empty and list(empty.columns)[-2:] == ["nothing", "neither"]


def test_names_with_sql_in_them_are_just_names(recorded: Project) -> None:
    before = counts(recorded)
    frame = flor.dataframe("weird name; DROP TABLE runs", 'quote"name')
    assert frame["weird name; DROP TABLE runs"].tolist() == [1, 1]
    assert frame['quote"name'].tolist() == [2, 2]
    evil = flor.dataframe("x') OR 1=1 --", "loss' UNION SELECT * FROM runs --")
    assert evil.empty
    filtered = flor.dataframe('quote"name', where='"quote""name" = 2')
    assert len(filtered) == 2
    assert counts(recorded) == before


@pytest.mark.parametrize(
    "where",
    [
        "1=1; DROP TABLE runs",
        "epoch = 1 -- comment",
        "epoch = 1 /* c */",
        "1) UNION SELECT run_id FROM runs WHERE (1",
        "(SELECT count(*) FROM runs) > 0",
        "epoch = ?",
        "name = 'unterminated",
        "",
        "epoch IN (1, 2",
        "load_extension('x')",
    ],
)
def test_where_injection_attempts_are_refused_and_change_nothing(recorded: Project, where: str) -> None:
    before = counts(recorded)
    with pytest.raises(ExpressionError):
        flor.dataframe("loss", where=where)
    assert counts(recorded) == before


def test_where_must_name_frame_columns(recorded: Project) -> None:
    with pytest.raises(ExpressionError, match="no such column"):
        flor.dataframe("loss", where="status = 'ok'")  # a runs column that is not in the frame


def test_parse_where_reports_identifiers() -> None:
    expression = parse_where("epoch > 1 AND \"val acc\" < 0.5 AND task LIKE 'tr%'")
    assert {"epoch", "val acc", "task"} <= expression.identifiers


def test_run_level_frame_has_one_row_per_run(recorded: Project) -> None:
    frame = flor.dataframe()
    assert len(frame) == 2
    assert list(frame.columns)[:5] == ["projid", "run_id", "tstamp", "task", "filename"]
    assert frame["lr"].tolist() == [0.1, 0.2]


def test_query_reads_with_bound_parameters(recorded: Project) -> None:
    frame = flor.query("SELECT name, count(*) AS n FROM logs WHERE name = ? GROUP BY name", ("loss",))
    assert frame.to_dict("records") == [{"name": "loss", "n": 12}]


@pytest.mark.parametrize(
    "sql",
    [
        "DELETE FROM logs",
        "DROP TABLE runs",
        "UPDATE runs SET status = 'x'",
        "INSERT INTO runs (run_id) VALUES ('x')",
        "PRAGMA query_only = OFF",
        "ATTACH DATABASE ':memory:' AS other",
        "SELECT 1; DELETE FROM logs",
        "CREATE TABLE t (x)",
    ],
)
def test_query_refuses_writes_with_a_clear_error(recorded: Project, sql: str) -> None:
    before = counts(recorded)
    with pytest.raises(QueryError) as info:
        flor.query(sql)
    assert "read-only" in str(info.value) or "one statement" in str(info.value)
    assert counts(recorded) == before


def test_reading_a_project_without_a_store(project: Project) -> None:
    assert flor.dataframe("loss").empty
    with pytest.raises(QueryError, match="record a run first"):
        flor.query("SELECT 1")
    assert not (project.root / ".flor").exists()


def test_latest_keeps_the_newest_run_per_task_and_filename(recorded: Project) -> None:
    frame = flor.dataframe("val_acc")
    newest = flor.latest(frame)
    # Two (task, filename) groups: (None, train.py) and ("train", train.py): one run each.
    assert len(newest) == 6
    recorded.run("train.py", "--kwargs", "lr=0.3")
    newest = flor.latest(flor.dataframe("lr", "val_acc"))
    assert sorted(newest["lr"].unique().tolist()) == [0.2, 0.3]


# -- guarded SQL: time limits, ordinary functions only, messages that name the action -------------

RUNAWAY = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"


def test_a_runaway_query_stops_at_its_timeout(recorded: Project) -> None:
    with pytest.raises(QueryError, match=r"stopped after its timeout of 0\.2 s .*--timeout"):
        flor.query(RUNAWAY, timeout=0.2)
    with pytest.raises(QueryError, match="timeout must be a positive number"):
        flor.query("SELECT 1", timeout=0)


def test_a_heavy_where_stops_at_its_timeout(recorded: Project) -> None:
    # Each row builds and rewrites a 20 MB string: far more than a millisecond before the first check.
    heavy = "length(replace(printf('%.*c', 20000000 + epoch, 'x'), 'x', 'y')) > epoch"
    with pytest.raises(ExpressionError, match=r"stopped after its timeout of 0\.001 s"):
        flor.dataframe("loss", where=heavy, timeout=0.001)


def test_query_calls_ordinary_functions_only(recorded: Project) -> None:
    for sql, function in [
        ("SELECT fts3_tokenizer('simple')", "fts3_tokenizer"),  # would return a native memory address
        ("SELECT length(randomblob(100000000))", "randomblob"),
        ("SELECT load_extension('x')", "load_extension"),
        ("SELECT zeroblob(10)", "zeroblob"),
    ]:
        with pytest.raises(QueryError, match=f"call the function '{function}\\(\\)'"):
            flor.query(sql)
    # SQLite's ordinary scalar, date, JSON, aggregate and window functions still work.
    frame = flor.query(
        "SELECT json_extract('{\"a\": 1}', '$.a') AS j, datetime(0, 'unixepoch') AS d, round(2.5) AS r, "
        "lower('A') || upper('b') AS s, '{\"b\": 2}' ->> '$.b' AS arrow, count(*) AS n FROM runs"
    )
    assert frame.iloc[0].tolist() == [1, "1970-01-01 00:00:00", 3.0, "aB", 2, 2]
    assert flor.query("SELECT row_number() OVER (ORDER BY tstamp) AS w FROM runs")["w"].tolist() == [1, 2]
    assert len(flor.dataframe("loss", where="abs(epoch - 1) = 0 AND lower(task) IS NULL")) == 2


def test_strings_and_blobs_are_bounded(recorded: Project) -> None:
    with pytest.raises(QueryError, match="too big"):
        flor.query("SELECT length(replace(printf('%.*c', 60000000, 'x'), 'x', 'yy'))")
    with pytest.raises(ExpressionError, match="randomblob"):
        flor.dataframe("loss", where="length(randomblob(1e8)) > 0 AND epoch >= 0")


def test_refusals_name_what_the_statement_tries(recorded: Project) -> None:
    for sql, action in [
        ("delete from runs", "delete rows from 'runs'"),  # was "limit variable number"
        ("INSERT INTO runs (run_id) VALUES ('x')", "insert rows into 'runs'"),  # was "toobig"
        ("UPDATE runs SET status = 'x'", "update 'status' of 'runs'"),
        ("ATTACH DATABASE ':memory:' AS other", "attach the database ':memory:'"),  # was "format"
        ("DROP TABLE runs", "change the database schema"),
        ("PRAGMA query_only = OFF", "run 'PRAGMA query_only'"),
        ("SAVEPOINT sp", "begin the savepoint 'sp'"),  # allowed before, as if it were a recursive CTE
    ]:
        with pytest.raises(QueryError) as info:
            flor.query(sql)
        assert f"the statement tries to {action} " in str(info.value)


def test_a_misspelled_where_column_names_the_closest_one(recorded: Project) -> None:
    with pytest.raises(ExpressionError) as info:
        flor.dataframe("loss", where="epoh >= 1")
    message = str(info.value)
    assert "no such column 'epoh'; did you mean 'epoch'?" in message
    assert "Columns: projid, run_id, tstamp, task, filename, epoch, step, loss." in message
