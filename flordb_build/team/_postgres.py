"""Reading the team store: :class:`PostgresReader` (the reader interface over PostgreSQL) and
:func:`query_team` (read-only SQL in PostgreSQL's dialect).

Every read runs in a read-only session (team/_connect.py), so a statement that would write fails
server side. A frame's reads (values as typed parts, loops as blocks: team/_fetch.py) answer blockpivot's
FrameSource as the local store's do, one run at a time, each value from the typed column its kind
uses (team/_schema.py), so the frame is the local one.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import QueryError
from ..pivot import LogArrays
from ..runtable import RUN_COLUMNS, RunTable
from ._connect import first_line
from ._protocol import BUILD_CONTEXT_TABLES, join_names

if TYPE_CHECKING:
    from ..blockpivot import ValuePart


def _value(row: Sequence[Any]) -> Any:
    """The one non-null typed column of a row's value columns (they follow its kind)."""
    for column in row:
        if column is not None:
            return column
    return None


class PostgresReader:
    """:class:`~flordb_build.team.StoreReader` over a read-only connection to the team store."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def run_rows(self) -> RunTable:
        # tstamps are ISO text: byte order ("C") is time order, whatever the database's collation.
        rows = self.conn.execute(
            'SELECT projid, run_id, tstamp, task, filename FROM runs ORDER BY tstamp COLLATE "C", run_id'
        ).fetchall()
        return RunTable({c: [r[i] for r in rows] for i, c in enumerate(RUN_COLUMNS)})

    def read_logs(self, run_ids: list[str], names: list[str]) -> LogArrays:
        """The values of ``names`` as per-row arrays (series_points'): one pass over each run's rows,
        plain numbers as binary arrays (team/_fetch.py)."""
        from ._fetch import fetch_logs

        return fetch_logs(self.conn, run_ids, names)

    def value_parts(self, run_ids: list[str], names: list[str]) -> Iterator[list[list[ValuePart]]]:
        from ._fetch import fetch_value_parts

        return fetch_value_parts(self.conn, run_ids, names)

    def loop_blocks(self, run_id: str) -> list[tuple[Any, ...]]:
        from ._fetch import fetch_loop_blocks

        return fetch_loop_blocks(self.conn, run_id)

    def run_level_rows(self, run_id: str) -> list[tuple[Any, ...]]:
        rows = self.conn.execute(
            "SELECT name, source, kind, value_int, value_float, value_text, value_bool, value_bigint::text, value_json "
            "FROM logs WHERE run_id = %s AND ctx_id = 0",
            (run_id,),
        ).fetchall()
        return [(name, _value(columns), kind, source) for name, source, kind, *columns in rows]

    def incomplete_run_ids(self) -> set[str]:
        return {r for (r,) in self.conn.execute("SELECT run_id FROM runs WHERE status = 'incomplete'")}

    def run_facts(self) -> list[tuple[Any, ...]]:
        sql = "SELECT run_id, status, seconds, exit_code, args, snapshot, pipeline_id, started FROM runs"
        return [tuple(r) for r in self.conn.execute(sql).fetchall()]

    def divergent_names(self) -> dict[str, str]:
        rows = self.conn.execute("SELECT run_id, name FROM replay_divergent ORDER BY run_id, name").fetchall()
        return join_names(rows)

    # -- the UI's reads (ViewReader). Names sort COLLATE "C" (bytes), as SQLite's BINARY does. --

    def data_version(self) -> tuple[Any, ...]:
        # Every push adds team_units rows in the transaction of its data: their count and newest
        # time change exactly when what a reader sees does.
        row = self.conn.execute("SELECT count(*), max(pushed_at) FROM team_units").fetchone()
        return tuple(row) if row is not None else ()

    def run_ids_starting(self, prefix: str, limit: int) -> list[str]:
        sql = "SELECT run_id FROM runs WHERE starts_with(run_id, %s) LIMIT %s"
        return [str(r[0]) for r in self.conn.execute(sql, (prefix, limit)).fetchall()]

    def run_record(self, run_id: str) -> dict[str, Any] | None:
        # Only finished runs are pushed, so the status is the one their writer recorded.
        cursor = self.conn.execute("SELECT * FROM runs WHERE run_id = %s", (run_id,))
        row = cursor.fetchone()
        return None if row is None else dict(zip([d.name for d in cursor.description], row, strict=True))

    def divergent_marks(self, run_id: str) -> dict[str, str]:
        sql = 'SELECT name, why FROM replay_divergent WHERE run_id = %s ORDER BY name COLLATE "C"'
        return {str(name): str(why) for name, why in self.conn.execute(sql, (run_id,)).fetchall()}

    def logged_names(self, run_id: str) -> list[str]:
        sql = 'SELECT DISTINCT name COLLATE "C" AS name FROM logs WHERE run_id = %s ORDER BY 1'
        return [str(r[0]) for r in self.conn.execute(sql, (run_id,)).fetchall()]

    def is_loop_level(self, run_id: str, name: str) -> bool:
        sql = "SELECT 1 FROM logs WHERE run_id = %s AND name = %s AND ctx_id <> 0 LIMIT 1"
        return self.conn.execute(sql, (run_id, name)).fetchone() is not None

    def has_logged(self, run_id: str, name: str) -> bool:
        sql = "SELECT 1 FROM logs WHERE run_id = %s AND name = %s LIMIT 1"
        return self.conn.execute(sql, (run_id, name)).fetchone() is not None

    def series_points(self, run_id: str, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        from ..points import points_of_logs

        return points_of_logs(self.read_logs([run_id], [name]))

    def loop_block_rows(self, run_id: str) -> list[tuple[Any, ...]]:
        sql = "SELECT ctx_id, parent_ctx, iteration, count, name FROM loops WHERE run_id = %s ORDER BY ctx_id"
        return [tuple(r) for r in self.conn.execute(sql, (run_id,)).fetchall()]

    def checkpoint_rows(self, run_id: str) -> list[dict[str, Any]]:
        cursor = self.conn.execute(
            "SELECT loop_name, iteration, name, bytes, substr(sha256, 1, 12) AS sha256 FROM checkpoints "
            'WHERE run_id = %s ORDER BY ctx_id, name COLLATE "C"',
            (run_id,),
        )
        return [dict(zip([d.name for d in cursor.description], r, strict=True)) for r in cursor.fetchall()]

    def environment(self, env_id: str) -> dict[str, Any] | None:
        import json

        row = self.conn.execute("SELECT env FROM envs WHERE env_id = %s", (env_id,)).fetchone()
        return None if row is None else dict(json.loads(row[0]))

    def task_row(self, pipeline_id: str, task: str) -> dict[str, Any] | None:
        cursor = self.conn.execute(
            "SELECT t.status, t.seconds, t.reason, p.tool FROM tasks t LEFT JOIN pipelines p "
            "ON p.pipeline_id = t.pipeline_id WHERE t.pipeline_id = %s AND t.task = %s",
            (pipeline_id, task),
        )
        row = cursor.fetchone()
        return None if row is None else dict(zip([d.name for d in cursor.description], row, strict=True))

    def build_context(self) -> sqlite3.Connection:
        """The team store's pipelines, tasks, files and runs copied into an in-memory SQLite
        database (query-only), so that the pipelines and lineage pages run the local store's own
        readers (dag/_report.py, lineage.py) over them: a few thousand small rows, not the logs."""
        from psycopg import sql

        from ..expression import quote_identifier
        from ..store import TABLES

        affinity = {str: "TEXT", int: "INTEGER", float: "REAL"}
        copy = sqlite3.connect(":memory:", check_same_thread=False)
        for table in BUILD_CONTEXT_TABLES:
            columns = list(TABLES[table]["columns"].items())  # identifiers from TABLES only, quoted
            names = ", ".join(quote_identifier(c) for c, _ in columns)
            definitions = ", ".join(f"{quote_identifier(c)} {affinity[t]}" for c, t in columns)
            copy.execute(f"CREATE TABLE {quote_identifier(table)} ({definitions})")
            select = sql.SQL("SELECT {} FROM {}").format(
                sql.SQL(", ").join(sql.Identifier(c) for c, _ in columns), sql.Identifier(table)
            )
            rows = self.conn.execute(select).fetchall()
            marks = ", ".join("?" * len(columns))
            copy.executemany(f"INSERT INTO {quote_identifier(table)} ({names}) VALUES ({marks})", rows)  # noqa: S608
        copy.commit()
        copy.execute("PRAGMA query_only = ON")
        return copy


def query_team(
    conn: Any, sql: str, params: Sequence[Any] | dict[str, Any], *, timeout: float | None, max_rows: int
) -> tuple[list[str], list[tuple[Any, ...]]]:
    """``(columns, rows)`` of one read-only statement (``%s`` placeholders) over the team store.

    :raises QueryError: PostgreSQL refused it (a write in the read-only transaction, a syntax
        error, more than one statement), it ran past ``timeout``, or returned over ``max_rows`` rows.
    """
    import psycopg

    shown = sql.strip()[:80]
    try:
        with conn.transaction():  # BEGIN READ ONLY: the connection is read_only (team/_connect.py)
            milliseconds = 0 if timeout is None else max(1, int(timeout * 1000))
            conn.execute("SELECT set_config('statement_timeout', %s, true)", (str(milliseconds),))
            # Always the extended protocol (bound parameters, even none): one statement, never a script.
            cursor = conn.execute(sql, params or None, prepare=False)
            rows: list[tuple[Any, ...]] = []
            while chunk := cursor.fetchmany(50_000):
                rows.extend(chunk)
                if len(rows) > max_rows:
                    raise QueryError(
                        f"query returned more than {max_rows:,} rows ('{shown}'); add a LIMIT or aggregate."
                    )
            columns = [d.name for d in cursor.description or ()]
    except psycopg.errors.QueryCanceled as exc:
        raise QueryError(
            f"query stopped after its timeout of {timeout:g} s ('{shown}'); narrow it, or allow more time with "
            "timeout=... (flordb-build query --timeout SECONDS)."
        ) from exc
    except psycopg.errors.ReadOnlySqlTransaction as exc:
        raise QueryError(
            f"query() is read-only: the team store refused '{shown}' ({first_line(exc)})."
        ) from exc
    except psycopg.Error as exc:
        raise QueryError(
            f"query failed on the team store: {first_line(exc)} in '{sql.strip()[:200]}'."
        ) from exc
    return columns, rows
