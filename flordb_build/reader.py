"""Opening the store for reading only: what the UI, ``plot``, ``dag``, ``runs`` and ``diff`` use.

:meth:`Store.open` migrates the schema and marks dead runs ``killed``: both are writes, and a
viewer must never write (it may run beside a training job, or over a copy of someone's store).
A read-only connection is opened with SQLite's ``mode=ro`` URI and ``PRAGMA query_only``, so a
stray write fails instead of landing. A run whose process died still reads ``running`` in such a
store; :func:`shown_status` tells it apart by its lock file, as :meth:`Store.mark_dead_runs` would,
without writing.
"""

from __future__ import annotations

import socket
import sqlite3
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .config import Config, load_config
from .errors import StoreError
from .store import BUSY_TIMEOUT_MS, Store, is_run_alive

#: Shown for a run still marked ``running`` whose process is gone (no one holds its lock).
DEAD_STATUS = "killed"


def connect_read_only(path: Path) -> sqlite3.Connection:
    """A connection to the SQLite file ``path`` that cannot write it."""
    uri = "file:" + urllib.parse.quote(str(path.resolve())) + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
        conn.execute("PRAGMA query_only = ON")
    except sqlite3.Error as exc:
        raise StoreError(f"Could not open the store '{path}' for reading: {exc}.") from exc
    return conn


def open_read_only(config: Config | None = None) -> Store | None:
    """The project's store opened read-only; None when nothing was recorded yet."""
    config = config or load_config()
    if not config.db_path.exists():
        return None
    return Store(config, connect_read_only(config.db_path))


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
