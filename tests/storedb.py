"""A test's own SQLite connection to a project's store that sees what user SQL sees.

Since schema 7 a recorded float or int64 lives only in its packed ``log_columns`` chunk; the
``logs`` *table* holds the other values. ``flor.query`` and ``flordb-build query`` read a TEMP
view ``logs`` of both (``compat.add_flordb_views``); a bare ``sqlite3.connect`` would see the table
alone and a count of recorded values would come out short (or vacuously zero).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path


def connect_store(db: Path, *, read_only: bool = False, timeout: float = 5.0) -> sqlite3.Connection:
    """``db`` opened with every logged value in ``logs`` (read-only: SQLite's ``mode=ro``)."""
    from flordb_build.compat import add_flordb_views

    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=timeout) if read_only else sqlite3.connect(
        db, timeout=timeout
    )
    add_flordb_views(conn)
    return conn
