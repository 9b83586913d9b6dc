"""The reader interface every read path (dataframe, runs table, query, UI) works over, and its SQLite side.

``flor.dataframe`` is a pivot (blockpivot.py) over four reads: the runs, the values of some names,
the loop blocks those values need, and a run's run-level values. A store that answers these
reads gives the same frame, whatever holds the rows: :class:`SQLiteReader` reads today's local
store, team/_postgres.py the team store. :class:`ViewReader` adds what the UI's pages read
(one run's row, its names, a name's points, its checkpoints, environment and task), so every
page shows the same over either store (``flordb-build ui --team``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ..runtable import RunTable, read_run_rows

if TYPE_CHECKING:
    import numpy as np

    from ..blockpivot import ValuePart
    from ..store import Store

#: ``loop_block_rows()`` columns, in order, sorted by ctx_id: the blocks of a run's loops.
LOOP_BLOCK_COLUMNS = ("ctx_id", "parent_ctx", "iteration", "count", "name")
#: The build-context tables :meth:`ViewReader.build_context` holds (pipelines, lineage pages).
BUILD_CONTEXT_TABLES = ("pipelines", "tasks", "files", "runs")

#: ``run_facts()`` columns, in order: what the runs table adds to a run's dataframe row.
RUN_FACT_COLUMNS = ("run_id", "status", "seconds", "exit_code", "args", "snapshot", "pipeline_id", "started")


class StoreReader(Protocol):
    """The reads a dataframe, the runs table and the UI need; implemented by each store."""

    def run_rows(self) -> RunTable:
        """Every run's projid, run_id, tstamp, task and filename, ordered by tstamp."""
        ...

    def value_parts(self, run_ids: list[str], names: list[str]) -> Iterator[list[list[ValuePart]]]:
        """Per run, per name: the values ``run_ids`` logged of ``names``, replayed before recorded
        (blockpivot.FrameSource: typed numpy parts, no Python object per plain number)."""
        ...

    def loop_blocks(self, run_id: str) -> list[tuple[Any, ...]]:
        """The run's loop blocks as ``(name, ctx_id, parent_ctx, iteration, count, value)``."""
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


@runtime_checkable
class ViewReader(StoreReader, Protocol):
    """:class:`StoreReader` plus the reads of the UI's pages and charts (ui/, series.py, plot.py)."""

    def data_version(self) -> tuple[Any, ...]:
        """Changes whenever a writer (or a push) committed: a cache key for what was read."""
        ...

    def run_ids_starting(self, prefix: str, limit: int) -> list[str]:
        """Up to ``limit`` run ids that start with ``prefix``."""
        ...

    def run_record(self, run_id: str) -> dict[str, Any] | None:
        """The ``runs`` row of ``run_id`` by column name, its status as a reader should show it."""
        ...

    def divergent_marks(self, run_id: str) -> dict[str, str]:
        """The run's replayed names written with --accept-divergent, each with why it diverged."""
        ...

    def logged_names(self, run_id: str) -> list[str]:
        """Every name the run logged (recorded or replayed), in byte order."""
        ...

    def is_loop_level(self, run_id: str, name: str) -> bool:
        """True when the run logged ``name`` inside some loop."""
        ...

    def has_logged(self, run_id: str, name: str) -> bool:
        """True when the run logged ``name`` at all."""
        ...

    def series_points(self, run_id: str, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(ctx ids, decoded values, replayed)`` of every value of ``name``: the replayed ones
        first, then the recorded ones, each in the order logged (series.py keeps the last per context)."""
        ...

    def loop_block_rows(self, run_id: str) -> list[tuple[Any, ...]]:
        """The run's ``loops`` rows as :data:`LOOP_BLOCK_COLUMNS`, by ctx_id."""
        ...

    def checkpoint_rows(self, run_id: str) -> list[dict[str, Any]]:
        """loop_name, iteration, name, bytes, sha256 (12 digits) of each checkpoint, by ctx_id and name."""
        ...

    def environment(self, env_id: str) -> dict[str, Any] | None:
        """The stored environment ``env_id``, or None."""
        ...

    def task_row(self, pipeline_id: str, task: str) -> dict[str, Any] | None:
        """status, seconds, reason of a task and the tool of its pipeline, or None."""
        ...

    def build_context(self) -> sqlite3.Connection:
        """A read-only SQLite connection holding :data:`BUILD_CONTEXT_TABLES` (the local store's
        own; a copy for another store), which the pipelines and lineage readers query."""
        ...


class SQLiteReader:
    """:class:`ViewReader` over an open (read-only) connection to the local store.

    :param store: the :class:`~flordb_build.store.Store` of ``conn``, where run statuses should
        read as a writer would mark them (a dead run ``killed``, by its lock file).
    """

    def __init__(self, conn: sqlite3.Connection, store: Store | None = None) -> None:
        self.conn = conn
        self.store = store

    def run_rows(self) -> RunTable:
        return read_run_rows(self.conn)

    def value_parts(self, run_ids: list[str], names: list[str]) -> Iterator[list[list[ValuePart]]]:
        from ..localframe import local_value_parts

        return local_value_parts(self.conn, run_ids, names)

    def loop_blocks(self, run_id: str) -> list[tuple[Any, ...]]:
        from ..localframe import local_loop_blocks

        return local_loop_blocks(self.conn, run_id)

    def run_level_rows(self, run_id: str) -> list[tuple[Any, ...]]:
        # run-level values are never packed (store.column_packable): the rows hold them all
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

    # -- the UI's reads (ViewReader); their SQL stays with the modules that own the formats --

    def data_version(self) -> tuple[Any, ...]:
        from ..reader import store_version

        return store_version(self.store.config) if self.store is not None else ()

    def run_ids_starting(self, prefix: str, limit: int) -> list[str]:
        sql = "SELECT run_id FROM runs WHERE substr(run_id, 1, ?) = ? LIMIT ?"
        return [str(r[0]) for r in self.conn.execute(sql, (len(prefix), prefix, limit)).fetchall()]

    def run_record(self, run_id: str) -> dict[str, Any] | None:
        from ..reader import shown_status

        cursor = self.conn.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,))
        row = cursor.fetchone()
        if row is None:
            return None
        facts = dict(zip([d[0] for d in cursor.description], row, strict=True))
        if self.store is not None:
            facts["status"] = shown_status(self.store, run_id, facts.get("status"), facts.get("host"))
        return facts

    def divergent_marks(self, run_id: str) -> dict[str, str]:
        try:
            rows = self.conn.execute(
                "SELECT name, why FROM replay_divergent WHERE run_id = ? ORDER BY name", (run_id,)
            ).fetchall()
        except sqlite3.OperationalError:  # no replay has opened this store: no marks
            return {}
        return {str(name): str(why) for name, why in rows}

    def logged_names(self, run_id: str) -> list[str]:
        from ..points import local_logged_names

        return local_logged_names(self.conn, run_id)

    def is_loop_level(self, run_id: str, name: str) -> bool:
        # a packed chunk's values are never at run level (packedlogs.py): one holds loop values
        from ..packedlogs import has_packed

        sql = "SELECT 1 FROM logs WHERE run_id = ? AND name = ? AND ctx_id != 0 LIMIT 1"
        return self.conn.execute(sql, (run_id, name)).fetchone() is not None or has_packed(self.conn, run_id, name)

    def has_logged(self, run_id: str, name: str) -> bool:
        from ..packedlogs import has_packed

        sql = "SELECT 1 FROM logs WHERE run_id = ? AND name = ? LIMIT 1"
        return self.conn.execute(sql, (run_id, name)).fetchone() is not None or has_packed(self.conn, run_id, name)

    def series_points(self, run_id: str, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        from ..points import local_series_points

        return local_series_points(self.conn, run_id, name)

    def loop_block_rows(self, run_id: str) -> list[tuple[Any, ...]]:
        sql = "SELECT ctx_id, parent_ctx, iteration, count, name FROM loops WHERE run_id = ? ORDER BY ctx_id"
        return list(self.conn.execute(sql, (run_id,)).fetchall())

    def checkpoint_rows(self, run_id: str) -> list[dict[str, Any]]:
        cursor = self.conn.execute(
            "SELECT loop_name, iteration, name, bytes, substr(sha256, 1, 12) AS sha256 FROM checkpoints "
            "WHERE run_id = ? ORDER BY ctx_id, name",
            (run_id,),
        )
        return [dict(zip([d[0] for d in cursor.description], r, strict=True)) for r in cursor.fetchall()]

    def environment(self, env_id: str) -> dict[str, Any] | None:
        import json

        row = self.conn.execute("SELECT env FROM envs WHERE env_id = ?", (env_id,)).fetchone()
        return None if row is None else dict(json.loads(row[0]))

    def task_row(self, pipeline_id: str, task: str) -> dict[str, Any] | None:
        cursor = self.conn.execute(
            "SELECT t.status, t.seconds, t.reason, p.tool FROM tasks t LEFT JOIN pipelines p "
            "ON p.pipeline_id = t.pipeline_id WHERE t.pipeline_id = ? AND t.task = ?",
            (pipeline_id, task),
        )
        row = cursor.fetchone()
        return None if row is None else dict(zip([d[0] for d in cursor.description], row, strict=True))

    def build_context(self) -> sqlite3.Connection:
        return self.conn


def as_view_reader(source: Store | ViewReader) -> ViewReader:
    """``source`` itself when it is a reader, else the :class:`SQLiteReader` of the local store."""
    from ..store import Store

    return SQLiteReader(source.conn, source) if isinstance(source, Store) else source


def join_names(rows: Sequence[tuple[Any, Any]]) -> dict[str, str]:
    """``(run_id, name)`` rows as run_id -> names joined by commas, in the rows' order."""
    names: dict[str, list[str]] = {}
    for run_id, name in rows:
        names.setdefault(str(run_id), []).append(str(name))
    return {run_id: ",".join(found) for run_id, found in names.items()}
