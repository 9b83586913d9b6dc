"""Reading build context back: the pipelines, the tasks of one pipeline, and its DAG.

Everything here reads over a read-only connection (reader.py): listing what a pipeline did
never writes the store.
"""

from __future__ import annotations

import json
import re
import sqlite3
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config import Config, load_config
from ..errors import QueryError
from ..reader import reading

if TYPE_CHECKING:
    import pandas as pd

    from ..graph import Graph

_PIPELINE_ID = re.compile(r"^[0-9a-zA-Z_-]{1,64}$")
_NO_STORE = "No flordb_build store yet; run 'doit' or 'make' in a project set up with 'flordb-build init'."

PIPELINES_SQL = (
    "SELECT p.pipeline_id, p.tool, datetime(p.started, 'unixepoch', 'localtime') AS started, "
    "round(coalesce(p.ended, p.started) - p.started, 3) AS seconds, p.status, p.exit_code, "
    "count(t.task) AS tasks, "
    "coalesce(sum(t.status = 'executed'), 0) AS executed, coalesce(sum(t.status = 'up-to-date'), 0) AS up_to_date, "
    "coalesce(sum(t.status = 'failed'), 0) AS failed, p.argv "
    "FROM pipelines p LEFT JOIN tasks t ON t.pipeline_id = p.pipeline_id "
    "GROUP BY p.pipeline_id ORDER BY p.started DESC LIMIT ?"
)
TASKS_SQL = (
    "SELECT t.task, t.status, round(t.seconds, 3) AS seconds, t.reason, "
    "substr(t.error, 1, instr(t.error || char(10), char(10)) - 1) AS error, "
    "(SELECT count(*) FROM runs r WHERE r.pipeline_id = t.pipeline_id AND r.task = t.task) AS runs "
    "FROM tasks t WHERE t.pipeline_id = ? ORDER BY t.ended, t.task"
)


@dataclass(frozen=True)
class PipelineView:
    """One recorded invocation: its row, its tasks and its DAG as a graph."""

    pipeline_id: str
    tool: str | None
    argv: list[str]
    status: str | None
    started: float | None
    ended: float | None
    tasks: list[dict[str, Any]]
    graph: Graph


def _frame(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...]) -> pd.DataFrame:
    import pandas as pd

    from ..query import keep_integers

    cursor = conn.execute(sql, params)
    rows = cursor.fetchall()
    frame = pd.DataFrame.from_records(rows, columns=[d[0] for d in cursor.description])
    return keep_integers(frame, rows)


def read_pipelines(conn: sqlite3.Connection, limit: int = 50) -> pd.DataFrame:
    """Recorded pipeline invocations, newest first, with task counts by status."""
    return _frame(conn, PIPELINES_SQL, (limit,))


def read_tasks(conn: sqlite3.Connection, pipeline_id: str) -> pd.DataFrame:
    """The tasks of one pipeline in the order they finished."""
    return _frame(conn, TASKS_SQL, (pipeline_id,))


def list_pipelines(limit: int = 50, config: Config | None = None) -> pd.DataFrame:
    """Recorded pipeline invocations, newest first, with task counts by status."""
    with reading(config or load_config(), missing=_NO_STORE) as store:
        return read_pipelines(store.conn, limit)


def find_pipeline(conn: sqlite3.Connection, pipeline: str | None) -> str:
    """The full id of the pipeline ``pipeline`` (an id or unique prefix); the latest when None.

    :raises QueryError: when there is no such pipeline or the prefix is ambiguous.
    """
    if pipeline is None:
        row = conn.execute("SELECT pipeline_id FROM pipelines ORDER BY started DESC LIMIT 1").fetchone()
        if row is None:
            raise QueryError("No pipeline recorded yet; run 'doit' or 'make' in a project set up with 'flordb-build init'.")
        return str(row[0])
    if not _PIPELINE_ID.match(pipeline):
        raise QueryError(f"'{pipeline}' is not a pipeline id; list them with 'flordb-build pipelines'.")
    rows = conn.execute(
        "SELECT pipeline_id FROM pipelines WHERE substr(pipeline_id, 1, ?) = ? LIMIT 3", (len(pipeline), pipeline)
    ).fetchall()
    if not rows:
        raise QueryError(f"No pipeline '{pipeline}'; list them with 'flordb-build pipelines'.")
    if len(rows) > 1:
        raise QueryError(f"Pipeline id prefix '{pipeline}' is ambiguous; give more characters.")
    return str(rows[0][0])


def list_tasks(pipeline: str | None = None, config: Config | None = None) -> pd.DataFrame:
    """The tasks of one pipeline (the latest by default) in the order they finished."""
    with reading(config or load_config(), missing=_NO_STORE) as store:
        return read_tasks(store.conn, find_pipeline(store.conn, pipeline))


def read_pipeline(conn: sqlite3.Connection, pipeline: str | None) -> PipelineView:
    """One pipeline (an id or prefix; the latest when None) with its tasks and DAG graph."""
    from ..graph import pipeline_graph

    pipeline_id = find_pipeline(conn, pipeline)
    row = conn.execute(
        "SELECT tool, argv, dag, status, started, ended FROM pipelines WHERE pipeline_id = ?", (pipeline_id,)
    ).fetchone()
    cursor = conn.execute(
        "SELECT task, status, seconds, reason, error, started, ended FROM tasks WHERE pipeline_id = ? "
        "ORDER BY ended, task",
        (pipeline_id,),
    )
    names = [d[0] for d in cursor.description]
    tasks = [dict(zip(names, r, strict=True)) for r in cursor.fetchall()]
    dag = _json(row[2], {"tasks": []})
    argv = _json(row[1], [])
    return PipelineView(
        pipeline_id, row[0], argv if isinstance(argv, list) else [str(argv)], row[3], row[4], row[5], tasks,
        pipeline_graph(dag if isinstance(dag, dict) else {"tasks": []}, tasks),
    )


def pipeline_view(pipeline: str | None = None, config: Config | None = None) -> PipelineView:
    """:func:`read_pipeline` over the project's store, opened read-only."""
    with reading(config or load_config(), missing=_NO_STORE) as store:
        return read_pipeline(store.conn, pipeline)


def _json(text: str | None, default: Any) -> Any:
    try:
        return json.loads(text) if text else default
    except ValueError:
        return default
