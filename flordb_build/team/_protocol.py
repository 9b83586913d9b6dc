"""The reader interface every read path (dataframe, runs table, query) works over, and its SQLite side.

``flor.dataframe`` is a pivot (pivot.py) over four reads: the runs, the log rows of some names,
the loop contexts those rows need, and a run's run-level values. A store that answers these
reads gives the same frame, whatever holds the rows: :class:`SQLiteReader` reads today's local
store, team/_postgres.py the team store.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from ..runtable import RunTable, read_run_rows

if TYPE_CHECKING:
    from ..pivot import LogArrays, LoopArrays
    from ..store import Store

#: ``run_facts()`` columns, in order: what the runs table adds to a run's dataframe row.
RUN_FACT_COLUMNS = ("run_id", "status", "seconds", "exit_code", "args", "snapshot", "pipeline_id", "started")


class StoreReader(Protocol):
    """The reads a dataframe, the runs table and the UI need; implemented by each store."""

    def run_rows(self) -> RunTable:
        """Every run's projid, run_id, tstamp, task and filename, ordered by tstamp."""
        ...

    def read_logs(self, run_ids: list[str], names: list[str]) -> LogArrays:
        """Every value of ``names`` that ``run_ids`` logged, recorded and replayed (pivot.py's arrays)."""
        ...

    def read_loops(self, run_ids: list[str], logs: LogArrays) -> LoopArrays:
        """The loop contexts that hold ``logs``' values, and their ancestors."""
        ...

    def run_level_rows(self, run_id: str) -> list[tuple[Any, ...]]:
        """``(name, stored value, kind, source)`` of every value the run logged outside any loop."""
        ...

    def incomplete_run_ids(self) -> set[str]:
        """Runs whose rows could not all be stored (status ``incomplete``)."""
        ...

    def run_facts(self) -> list[tuple[Any, ...]]:
        """One tuple of :data:`RUN_FACT_COLUMNS` per run, the status as a reader should show it."""
        ...

    def divergent_names(self) -> dict[str, str]:
        """run_id -> its replayed names written with --accept-divergent, comma-separated."""
        ...


class SQLiteReader:
    """:class:`StoreReader` over an open (read-only) connection to the local store.

    :param store: the :class:`~flordb_build.store.Store` of ``conn``, where run statuses should
        read as a writer would mark them (a dead run ``killed``, by its lock file).
    """

    def __init__(self, conn: sqlite3.Connection, store: Store | None = None) -> None:
        self.conn = conn
        self.store = store

    def run_rows(self) -> RunTable:
        return read_run_rows(self.conn)

    def read_logs(self, run_ids: list[str], names: list[str]) -> LogArrays:
        from ..pivot import read_logs

        return read_logs(self.conn, run_ids, names)

    def read_loops(self, run_ids: list[str], logs: LogArrays) -> LoopArrays:
        from ..pivot import read_loops

        return read_loops(self.conn, run_ids, logs)

    def run_level_rows(self, run_id: str) -> list[tuple[Any, ...]]:
        sql = "SELECT name, value, kind, source FROM logs WHERE run_id = ? AND ctx_id = 0"
        return list(self.conn.execute(sql, (run_id,)).fetchall())

    def incomplete_run_ids(self) -> set[str]:
        return {r for (r,) in self.conn.execute("SELECT run_id FROM runs WHERE status = 'incomplete'")}

    def run_facts(self) -> list[tuple[Any, ...]]:
        from ..reader import shown_status

        rows = self.conn.execute(
            "SELECT run_id, status, host, seconds, exit_code, args, snapshot, pipeline_id, started FROM runs"
        ).fetchall()
        store = self.store
        if store is None:
            return [(r[0], r[1], *r[3:]) for r in rows]
        return [(r[0], shown_status(store, r[0], r[1], r[2]), *r[3:]) for r in rows]

    def divergent_names(self) -> dict[str, str]:
        try:
            rows = self.conn.execute(
                "SELECT run_id, name FROM replay_divergent ORDER BY run_id, name"
            ).fetchall()
        except sqlite3.OperationalError:  # no replay has opened this store: no marks
            return {}
        return join_names(rows)


def join_names(rows: Sequence[tuple[Any, Any]]) -> dict[str, str]:
    """``(run_id, name)`` rows as run_id -> names joined by commas, in the rows' order."""
    names: dict[str, list[str]] = {}
    for run_id, name in rows:
        names.setdefault(str(run_id), []).append(str(name))
    return {run_id: ",".join(found) for run_id, found in names.items()}
