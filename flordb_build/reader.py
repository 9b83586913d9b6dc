"""Opening the store for reading only: what ``flor.dataframe``, ``flor.query`` and every read command use.

:meth:`Store.open` migrates the schema and marks dead runs ``killed``: both are writes, and a
reader must never write (it may run beside a training job, or over a copy of someone's store).
A read-only connection is opened with SQLite's ``mode=ro`` URI (``immutable=1`` on a disk that
takes no writes at all, see storefile.py) and ``PRAGMA query_only``, so a stray write fails
instead of landing, and the file is never checkpointed by a reader.

- A run whose process died still reads ``running`` in such a store; :func:`shown_status` tells
  it apart by its lock file, as :meth:`Store.mark_dead_runs` would, without writing. SQL over the
  store (``flor.query``) sees the same: :func:`show_dead_runs_killed` shadows ``runs`` with a TEMP
  view in which a dead run reads ``status = 'killed'`` and the error a writer would record.
- A store whose schema is older than this flordb_build's is refused with a direction
  (``flordb-build migrate``, or any recording run, brings it up to date): a reader cannot add the
  tables it lacks, and reading a partial schema would answer with missing rows, not an error.
"""

from __future__ import annotations

import socket
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .config import Config, load_config
from .errors import NotAStoreError, StoreError
from .store import BUSY_TIMEOUT_MS, DEAD_RUN_ERROR, SCHEMA_VERSION, TABLES, Store, StoreLock, is_run_alive
from .storefile import REBUILD_HINT, check_store_file, connect_read_only, not_a_store

#: Shown for a run still marked ``running`` whose process is gone (no one holds its lock).
DEAD_STATUS = "killed"


def open_read_only(config: Config | None = None, *, prepare: Callable[[Store], None] | None = None) -> Store | None:
    """The project's store opened read-only; None when nothing was recorded yet.

    The same refusals and fallbacks as :meth:`Store.open_existing` (storefile.py): an empty or
    foreign file raises :class:`NotAStoreError`, a read-only disk is read through ``mode=ro`` or
    ``immutable=1``, and the shared store lock is held so that a rebuild's swap waits for us.

    :param prepare: called with the store before its connection turns query-only, to create the
        TEMP views a reader reads through (asof.py, compat.py, :func:`show_dead_runs_killed`).
    :raises NotAStoreError: when the file is empty, not SQLite, or SQLite without a ``runs`` table.
    :raises StoreError: when its schema is older than this version's (see the module docstring).
    """
    config = config or load_config()
    path = config.db_path
    if not path.exists():
        return None
    check_store_file(path)
    lock = StoreLock.shared(path)
    try:
        conn = connect_read_only(path, BUSY_TIMEOUT_MS / 1000)
        has_runs = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'runs'").fetchone()
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    except sqlite3.Error as exc:
        if lock is not None:
            lock.release()
        raise not_a_store(path, exc) or StoreError(f"Could not open the store '{path}' for reading: {exc}.") from exc
    store = Store(config, conn, lock)
    if has_runs is None:
        store.close()
        raise NotAStoreError(
            f"'{path}' is an SQLite database without flordb_build's tables, so it is not a store. Nothing "
            f"was read or written; {REBUILD_HINT}."
        )
    if version < SCHEMA_VERSION:
        store.close()
        raise StoreError(
            f"The store '{path}' has schema version {version}, older than this flordb_build's {SCHEMA_VERSION}, "
            "and reading never changes it. Run 'flordb-build migrate' (or any recording run) to bring it up "
            "to date, then read again."
        )
    try:
        if prepare is not None:
            prepare(store)
        conn.execute("PRAGMA query_only = ON")
    except BaseException:
        store.close()
        raise
    return store


def show_dead_runs_killed(store: Store) -> None:
    """Shadow ``runs`` on the read-only ``store`` so that dead runs read as a writer would mark them.

    A run of this host still ``running`` whose process is gone (:func:`shown_status`) reads
    ``status = 'killed'`` and ``error`` = :data:`~flordb_build.store.DEAD_RUN_ERROR`. The view is a
    TEMP one (the file is not touched) and exists only while such a run does; a ``runs`` view
    already there (asof.py's, during a replay, which shows ended runs only) is left alone.
    """
    conn = store.conn
    if conn.execute("SELECT 1 FROM temp.sqlite_master WHERE name = 'runs'").fetchone():
        return
    candidates = conn.execute(
        "SELECT run_id FROM main.runs WHERE status = 'running' AND host = ?", (socket.gethostname(),)
    ).fetchall()
    dead = [(run_id, DEAD_RUN_ERROR) for (run_id,) in candidates if not is_run_alive(store.locks_dir, run_id)]
    if not dead:
        return
    # The values sit in a TEMP table filled with bound parameters; the view's text is constant.
    conn.execute("CREATE TEMP TABLE dead_runs (run_id TEXT PRIMARY KEY, error TEXT)")
    conn.executemany("INSERT INTO temp.dead_runs VALUES (?, ?)", dead)
    shown = {
        "status": "CASE WHEN run_id IN (SELECT run_id FROM temp.dead_runs) THEN 'killed' ELSE status END AS status",
        "error": "COALESCE((SELECT d.error FROM temp.dead_runs AS d WHERE d.run_id = r.run_id), error) AS error",
    }
    columns = ", ".join(shown.get(c, c) for c in TABLES["runs"]["columns"])  # identifiers from TABLES only
    conn.execute("CREATE TEMP VIEW runs AS SELECT " + columns + " FROM main.runs AS r")  # noqa: S608 - see above


@contextmanager
def reading(config: Config | None = None, *, missing: str | None = None) -> Iterator[Store]:
    """``with reading() as store:`` a read-only store, closed afterwards.

    :param missing: the message of the :class:`StoreError` raised when there is no store yet.
    """
    config = config or load_config()
    store = open_read_only(config)
    if store is None:
        raise StoreError(missing or f"No flordb_build store at '{config.db_path}' yet; record a run first.")
    try:
        yield store
    finally:
        store.close()


def store_version(config: Config) -> tuple[int, ...]:
    """Changes whenever a writer commits (the database or its WAL file changed): a cache key."""
    parts: list[int] = []
    for path in (config.db_path, config.db_path.with_name(config.db_path.name + "-wal")):
        try:
            st = path.stat()
        except FileNotFoundError:
            parts.extend((0, 0))
            continue
        parts.extend((st.st_mtime_ns, st.st_size))
    return tuple(parts)


def shown_status(store: Store, run_id: str, status: str | None, host: str | None) -> str | None:
    """``status``, except ``killed`` for a run of this host still ``running`` whose process is gone."""
    if status != "running" or host != socket.gethostname():
        return status
    return status if is_run_alive(store.locks_dir, run_id) else DEAD_STATUS
