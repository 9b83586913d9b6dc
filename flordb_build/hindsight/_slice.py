"""The slice of the store a replay job takes with it: a small SQLite file, so that a worker needs no
filesystem shared with the driver (issue 16).

A replay child reads the store for two things, and writes it for one:

    reads   its own run's rows: the loop contexts its iterations map to, the checkpoints and
            generator states it restores, the record's timings          (_mode.py)
            what the script itself reads (flor.dataframe, flor.query, flor.latest,
            flor.load_checkpoint): the store as of the run's start       (asof.py)
    writes  its replayed values, into the staging tables                 (_staging.py)

:func:`build_slice` copies exactly that out of the project's store into a fresh store file: the
replayed run's rows (logs as recorded only), and, where the script may read the store, the rows
asof.py would show it (runs that ended before the run started; tasks, files, pipelines of that
time; every env). The child runs against the slice as its store, with asof.py's views on top as
before, so a script reads what it read when recorded. The worker reads the staged rows back out
of the slice (:func:`read_staged`) and returns them; only the driver writes the project's store.
"""

from __future__ import annotations

import functools
import re
import sqlite3
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..config import Config, config_of_root
from ..expression import quote_identifier
from ..store import TABLES, Store
from ._staging import ensure_staging, staged_logs, staged_loops

#: Names of what a script calls to read the store (``flor.<name>`` or ``from flordb_build import
#: <name>``), or the store's own file. A snapshot whose Python files mention none of them cannot
#: read the store, so its jobs take only their own run's rows.
_READS = re.compile(rb"\b(dataframe|query|latest|load_checkpoint|FLORDB_BUILD_DB|flor\.db|sqlite3)\b")
#: Tables keyed by run: only the replayed run's rows, and those of the runs the script may see.
_BY_RUN = ("runs", "loops", "logs", "log_columns", "timings", "checkpoints")


def reads_store(sources: Iterable[bytes]) -> bool:
    """True when any of ``sources`` (Python files' bytes) may read the store (see :data:`_READS`)."""
    return any(_READS.search(text) for text in sources)


def build_slice(config: Config, run_id: str, *, as_of: bool) -> bytes:
    """The bytes of a store file holding what a replay job of ``run_id`` reads (module docstring).

    :param as_of: also copy the rows asof.py shows the script (it may read the store).
    """
    with tempfile.TemporaryDirectory(prefix="flor-slice-") as tmp:
        path = Path(tmp) / "flor.db"
        path.write_bytes(_empty_store())
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            conn.execute("ATTACH DATABASE ? AS project", (str(config.db_path),))  # read only: SELECTs alone
            try:
                _copy(conn, run_id, as_of)
            finally:
                conn.execute("DETACH DATABASE project")
        finally:
            conn.close()
        return path.read_bytes()


@functools.lru_cache(maxsize=1)
def _empty_store() -> bytes:
    """A fresh store of today's schema with the staging tables (built once: it costs ~70 ms).

    The rows come in by column name, so a project store whose migrations ordered columns
    differently copies the same.
    """
    with tempfile.TemporaryDirectory(prefix="flor-slice-") as tmp:
        path = Path(tmp) / "flor.db"
        store = Store.open(config_of_root(Path(tmp), False, db_path=path, projid="slice"))
        try:
            ensure_staging(store.conn)
        finally:
            store.close()
        return path.read_bytes()


def _copy(conn: sqlite3.Connection, run_id: str, as_of: bool) -> None:
    row = conn.execute("SELECT started FROM project.runs WHERE run_id = ?", (run_id,)).fetchone()
    started = float(row[0]) if row is not None and row[0] is not None else None
    visible = [run_id]
    if as_of and started is not None:  # asof.py's rule: runs that ended before this one started
        visible += [r for (r,) in conn.execute(
            "SELECT run_id FROM project.runs WHERE ended IS NOT NULL AND ended <= ? AND run_id != ?", (started, run_id)
        )]
    conn.execute("BEGIN")
    try:
        conn.execute("CREATE TEMP TABLE slice_runs (run_id TEXT PRIMARY KEY)")
        conn.executemany("INSERT INTO temp.slice_runs VALUES (?)", [(r,) for r in visible])
        for table in _BY_RUN:
            _copy_table(conn, table, "recorded_logs" if table == "logs" else "visible_runs", ())
        if as_of and started is not None:
            _copy_table(conn, "tasks", "ended_before", (started,))
            _copy_table(conn, "files", "of_copied_tasks", ())
            _copy_table(conn, "pipelines", "started_before", (started,))
        _copy_table(conn, "envs", "all" if as_of else "of_copied_runs", ())
        conn.execute("DROP TABLE temp.slice_runs")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


#: The row filters of the copies, constant SQL (values are bound): a filter is named, never passed in.
_FILTERS = {
    "visible_runs": "run_id IN (SELECT run_id FROM temp.slice_runs)",
    "recorded_logs": "run_id IN (SELECT run_id FROM temp.slice_runs) AND source = 'record'",  # never replayed values
    "ended_before": "ended IS NOT NULL AND ended <= ?",
    "of_copied_tasks": "(pipeline_id, task) IN (SELECT pipeline_id, task FROM main.tasks)",
    "started_before": "started <= ?",
    "of_copied_runs": "env_id IN (SELECT env_id FROM main.runs)",
    "all": "1",
}


def _copy_table(conn: sqlite3.Connection, table: str, row_filter: str, params: Sequence[Any]) -> None:
    """Copy the ``project.<table>`` rows that the named ``row_filter`` (:data:`_FILTERS`) keeps into the slice."""
    if table not in TABLES:
        raise ValueError(f"'{table}' is not a table of the store")
    where = _FILTERS[row_filter]
    mine = [r[1] for r in conn.execute(f"PRAGMA main.table_info({quote_identifier(table)})")]
    theirs = {r[1] for r in conn.execute(f"PRAGMA project.table_info({quote_identifier(table)})")}
    columns = ", ".join(quote_identifier(c) for c in mine if c in theirs)
    if not columns:
        return
    name = quote_identifier(table)
    # Identifiers validated (a table of store.TABLES) and quoted; ``where`` is one of this module's constants.
    statement = f"INSERT OR REPLACE INTO main.{name} ({columns}) SELECT {columns} FROM project.{name} WHERE {where}"  # noqa: S608
    conn.execute(statement, params)


def read_staged(path: Path, session: str, run_id: str) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """``(loops, logs)`` the job's child staged in the slice at ``path`` (``_staging.py``'s row forms)."""
    conn = sqlite3.connect(path)
    try:
        return [tuple(r) for r in staged_loops(conn, session, run_id)], [tuple(r) for r in staged_logs(conn, session, run_id)]
    finally:
        conn.close()
