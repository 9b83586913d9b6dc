"""Opening the store for reading only: what the UI, ``plot``, ``dag``, ``runs`` and ``diff`` use.

:meth:`Store.open` migrates the schema and marks dead runs ``killed``: both are writes, and a
viewer must never write (it may run beside a training job, or over a copy of someone's store).
A read-only connection is opened with SQLite's ``mode=ro`` URI (``immutable=1`` on a disk that
takes no writes at all, see storefile.py) and ``PRAGMA query_only``, so a stray write fails
instead of landing. A run whose process died still reads ``running`` in such a
store; :func:`shown_status` tells it apart by its lock file, as :meth:`Store.mark_dead_runs` would,
without writing.
"""

from __future__ import annotations

import socket
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

from .config import Config, load_config
from .errors import NotAStoreError, StoreError
from .store import BUSY_TIMEOUT_MS, Store, StoreLock, is_run_alive
from .storefile import REBUILD_HINT, check_store_file, connect_read_only, not_a_store

#: Shown for a run still marked ``running`` whose process is gone (no one holds its lock).
DEAD_STATUS = "killed"


def open_read_only(config: Config | None = None) -> Store | None:
    """The project's store opened read-only; None when nothing was recorded yet.

    The same refusals and fallbacks as :meth:`Store.open_existing` (storefile.py): an empty or
    foreign file raises :class:`NotAStoreError`, a read-only disk is read through ``mode=ro`` or
    ``immutable=1``, and the shared store lock is held so that a rebuild's swap waits for us.

    :raises NotAStoreError: when the file is empty, not SQLite, or SQLite without a ``runs`` table.
    """
    config = config or load_config()
    path = config.db_path
    if not path.exists():
        return None
    check_store_file(path)
    lock = StoreLock.shared(path)
    try:
        conn = connect_read_only(path, BUSY_TIMEOUT_MS / 1000)
        conn.execute("PRAGMA query_only = ON")
        has_runs = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'runs'").fetchone()
    except sqlite3.Error as exc:
        if lock is not None:
            lock.release()
        raise not_a_store(path, exc) or StoreError(f"Could not open the store '{path}' for reading: {exc}.") from exc
    if has_runs is None:
        conn.close()
        if lock is not None:
            lock.release()
        raise NotAStoreError(
            f"'{path}' is an SQLite database without flordb_build's tables, so it is not a store. Nothing "
            f"was read or written; {REBUILD_HINT}."
        )
    return Store(config, conn, lock)


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
