"""The store's file itself: refusing one that is not a store, creating it whole, reading it on a
disk that cannot be written.

SQLite reads a zero-length file as an empty database, so a ``flor.db`` cut to nothing (a full
disk, a crash while it was being copied) would silently look like a store with no runs, and a
recording run would start a fresh one on top of it. :func:`check_store_file` refuses such a file
instead, naming it and ``flordb-build rebuild`` (and :func:`not_a_store` a file that is not
SQLite). For that to be safe, no process may ever see a store file that is empty because it is
being created: :func:`create_store_file` builds it under a temporary name and links it into
place complete.

Readers open the store read-only (reader.py, through :func:`connect_read_only`): ``mode=ro``, or
``immutable=1`` on a disk where even the ``-shm`` cannot be had, so ``runs``, ``dataframe`` and
``query`` work wherever the file can be read and never change it. Commands that may write (gc,
replay) open it read-write and fall back the same way on a full or read-only disk.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

from .errors import NotAStoreError, StoreError

REBUILD_HINT = (
    "recreate it from the snapshot commits with 'flordb-build rebuild' (or move it away to start an empty store)"
)
#: SQLite errors that mean "this disk will not take a write" rather than "this store is wrong".
_CANNOT_WRITE = ("SQLITE_FULL", "SQLITE_READONLY", "SQLITE_IOERR", "SQLITE_CANTOPEN", "SQLITE_PERM")


def check_store_file(path: Path) -> None:
    """Refuse a store file that exists but is empty (SQLite itself refuses one that is not SQLite:
    :func:`not_a_store` turns its error into the same message).

    Only ``stat``: opening and closing the file here would drop every POSIX lock this process's
    SQLite connections hold on it (closing any descriptor of a file does), and let another
    process write under them: the way SQLite documents to corrupt a database.

    :raises NotAStoreError: naming the file and ``flordb-build rebuild``.
    """
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StoreError(f"Could not read the store '{path}': {exc}.") from exc
    if size == 0:
        raise NotAStoreError(
            f"The store '{path}' is empty (0 bytes), so it holds no runs: a full disk or a crash cut it "
            f"short. Nothing was read or written; {REBUILD_HINT}."
        )


def not_a_store(path: Path, exc: sqlite3.Error) -> NotAStoreError | None:
    """The error for a store file that SQLite says is not a database; None for any other error."""
    if getattr(exc, "sqlite_errorname", None) != "SQLITE_NOTADB":
        return None
    return NotAStoreError(
        f"'{path}' is not an SQLite database, so it is not a flordb_build store. Nothing was read or "
        f"written; {REBUILD_HINT}."
    )


def create_store_file(path: Path, build: Callable[[Path], None]) -> None:
    """Create the store at ``path`` complete, or leave what another process created there.

    ``build(tmp)`` writes the new store at a temporary path and closes it; the file is then
    hard-linked into place (atomic, and it fails if ``path`` exists meanwhile: the other
    process's store is kept).
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.new")
    try:
        build(tmp)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # a parallel run created it first: use that one
        except OSError:
            # A filesystem without hard links: a rename is atomic too, but would replace a store
            # created meanwhile, so only when there still is none.
            if not path.exists():
                os.replace(tmp, path)
    finally:
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(str(tmp) + suffix).unlink(missing_ok=True)


def cannot_write(exc: sqlite3.Error) -> bool:
    """True when ``exc`` says the disk will not take a write (full, read-only, no permission)."""
    name = getattr(exc, "sqlite_errorname", None) or ""
    return name.startswith(_CANNOT_WRITE)


def connect_read_only(path: Path, busy_timeout_s: float) -> sqlite3.Connection:
    """A read-only connection to the store at ``path`` on a disk that cannot be written.

    ``mode=ro`` reads the WAL too, but needs its ``-shm`` file; where even that cannot be had,
    ``immutable=1`` reads the main file alone, which is complete once no ``-wal`` holds pages.

    :raises StoreError: when the store has recent writes in its ``-wal`` that cannot be read here.
    """
    uri = "file:" + quote(str(path))
    conn: sqlite3.Connection | None = None
    try:
        conn = sqlite3.connect(
            uri + "?mode=ro", uri=True, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return conn
    except sqlite3.OperationalError:
        if conn is not None:
            conn.close()
    wal = Path(str(path) + "-wal")
    if wal.exists() and wal.stat().st_size > 0:
        raise StoreError(
            f"The store '{path}' has recent writes in '{wal}' that cannot be read while its disk takes no "
            "writes; free space on it (or make it writable) and retry."
        )
    return sqlite3.connect(uri + "?immutable=1", uri=True, isolation_level=None, check_same_thread=False)
