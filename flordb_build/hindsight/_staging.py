"""Staged replay values: what replay processes write before their run's backfill is decided.

Replay processes never write into ``logs``: every reader (``flor.dataframe``, ``flor.query``,
the run-level frame, as-of views) reads ``logs``, and a run's new values must appear all at
once, only when every process of its replay succeeded. So a replay process writes its rows into
the staging tables below, marked with its session, and the driver (``_backfill.py``) promotes a
run's staged rows into ``logs``/``loops`` in one transaction once the run is finished::

    replay_staged_logs    (session, run_id, seq, ctx_id, name, value, kind)
    replay_staged_loops   (session, run_id, ctx_id, parent_ctx, name, iteration, count, value)
    replay_finishing      (run_id, session, started)   a finish in progress: its journal commit
                                                        may or may not be on the shadow branch

No reader looks at these tables. Staged rows of a session that died are discarded by the next
session (``_backfill.py`` recovers a finish that was in progress first).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from ..store import LOOP_INSERT, write_transaction

#: Constant DDL. ``value`` is BLOB (no affinity) like ``logs.value``: values keep their types.
_DDL = (
    "CREATE TABLE IF NOT EXISTS replay_staged_logs (session TEXT, run_id TEXT, seq INTEGER, ctx_id INTEGER, "
    "name TEXT, value BLOB, kind INTEGER, PRIMARY KEY (session, run_id, name, seq)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS replay_staged_loops (session TEXT, run_id TEXT, ctx_id INTEGER, "
    "parent_ctx INTEGER, name TEXT, iteration INTEGER, count INTEGER, value BLOB, "
    "PRIMARY KEY (session, run_id, name, ctx_id)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS replay_finishing (run_id TEXT, session TEXT, started REAL, "
    "PRIMARY KEY (run_id, session)) WITHOUT ROWID",
)
#: Written out per table (constant SQL, no identifiers spliced in).
_SESSIONS = (
    "SELECT session FROM replay_staged_logs UNION SELECT session FROM replay_staged_loops "
    "UNION SELECT session FROM replay_finishing"
)
_DELETE_SESSION = (
    "DELETE FROM replay_staged_logs WHERE session = ?",
    "DELETE FROM replay_staged_loops WHERE session = ?",
    "DELETE FROM replay_finishing WHERE session = ?",
)
_DELETE_RUN = (
    "DELETE FROM replay_staged_logs WHERE session = ? AND run_id = ?",
    "DELETE FROM replay_staged_loops WHERE session = ? AND run_id = ?",
    "DELETE FROM replay_finishing WHERE session = ? AND run_id = ?",
)
_STAGE_LOG = (
    "INSERT OR REPLACE INTO replay_staged_logs (session, run_id, seq, ctx_id, name, value, kind) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_STAGE_LOOP = (
    "INSERT OR REPLACE INTO replay_staged_loops (session, run_id, ctx_id, parent_ctx, name, iteration, count, value) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)


def ensure_staging(conn: sqlite3.Connection) -> None:
    """Create the staging tables where they are missing (the driver does, before any replay process starts)."""
    with write_transaction(conn):
        for statement in _DDL:
            conn.execute(statement)


def stage_batch(
    conn: sqlite3.Connection,
    session: str,
    run_id: str,
    loops: Sequence[tuple[Any, ...]],
    logs: Sequence[tuple[Any, ...]],
) -> None:
    """Stage one flush of a replay process: loop blocks ``(ctx, parent, name, iteration, count, value)``
    and log rows ``(seq, ctx, name, value, kind)``, in one transaction."""
    if not loops and not logs:
        return
    with write_transaction(conn):
        conn.executemany(_STAGE_LOOP, [(session, run_id, *row) for row in loops])
        conn.executemany(_STAGE_LOG, [(session, run_id, *row) for row in logs])


def staged_logs(conn: sqlite3.Connection, session: str, run_id: str) -> list[tuple[Any, ...]]:
    """The session's staged ``(seq, ctx_id, name, value, kind)`` rows of a run."""
    return conn.execute(
        "SELECT seq, ctx_id, name, value, kind FROM replay_staged_logs WHERE session = ? AND run_id = ?",
        (session, run_id),
    ).fetchall()


def staged_loops(conn: sqlite3.Connection, session: str, run_id: str) -> list[tuple[Any, ...]]:
    """The session's staged ``(ctx_id, parent_ctx, name, iteration, count, value)`` blocks of a run."""
    return conn.execute(
        "SELECT ctx_id, parent_ctx, name, iteration, count, value FROM replay_staged_loops "
        "WHERE session = ? AND run_id = ?",
        (session, run_id),
    ).fetchall()


def promoted_state(
    conn: sqlite3.Connection, session: str, run_id: str, names: Sequence[str]
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], bool]:
    """What :func:`promote` would make of the run: its loop blocks and replayed log rows, and
    whether that differs from what it holds now (staged values, or earlier values of ``names``)."""
    kept: list[tuple[Any, ...]] = []
    replaced = False
    for row in conn.execute(
        "SELECT seq, ctx_id, name, value, kind FROM logs WHERE run_id = ? AND source = 'replay'", (run_id,)
    ):
        if row[2] in names:
            replaced = True
        else:
            kept.append(tuple(row))
    staged = staged_logs(conn, session, run_id)
    loops = {(row[2], row[0]): tuple(row) for row in conn.execute(
        "SELECT ctx_id, parent_ctx, name, iteration, count, value FROM loops WHERE run_id = ?", (run_id,)
    )}
    loops.update({(row[2], row[0]): tuple(row) for row in staged_loops(conn, session, run_id)})
    logs = sorted([*kept, *staged], key=lambda row: (row[0], row[2]))
    return sorted(loops.values(), key=lambda row: row[0]), logs, bool(staged) or replaced


def begin_finishing(conn: sqlite3.Connection, session: str, run_id: str) -> None:
    """Note that the session is about to commit the run's journal (see ``_backfill.py``)."""
    with write_transaction(conn):
        conn.execute(
            "INSERT OR REPLACE INTO replay_finishing (run_id, session, started) VALUES (?, ?, ?)",
            (run_id, session, time.time()),
        )


def finishing_runs(conn: sqlite3.Connection, session: str) -> list[str]:
    """Runs whose finish the session began and did not complete."""
    rows = conn.execute("SELECT run_id FROM replay_finishing WHERE session = ? ORDER BY run_id", (session,))
    return [run_id for (run_id,) in rows]


def finishing_sessions(conn: sqlite3.Connection, run_id: str) -> list[str]:
    """Sessions with a finish of ``run_id`` in progress."""
    rows = conn.execute("SELECT session FROM replay_finishing WHERE run_id = ? ORDER BY session", (run_id,))
    return [session for (session,) in rows]


def staging_sessions(conn: sqlite3.Connection) -> set[str]:
    """Every session that has staged rows or a finish in progress."""
    return {session for (session,) in conn.execute(_SESSIONS)}


def promote(
    conn: sqlite3.Connection,
    session: str,
    run_id: str,
    names: Sequence[str],
    journal_commit: str | None,
    divergent: dict[str, str] | None = None,
) -> None:
    """Make the session's staged values of ``run_id`` the run's replayed values of ``names``.

    One transaction: the run's earlier replayed values of ``names`` go, the staged rows come in
    (``source = 'replay'``), the divergence marks of ``names`` become ``divergent`` (name -> why;
    none: unmarked), the journal commit this state corresponds to is recorded, and the staging
    and the finish note of the run are dropped.
    """
    from ._journal import record_journal_commit, replace_divergent_marks

    with write_transaction(conn):
        conn.executemany(
            "DELETE FROM logs WHERE run_id = ? AND name = ? AND source = 'replay'", [(run_id, n) for n in names]
        )
        conn.execute(
            "INSERT OR REPLACE INTO logs (run_id, seq, ctx_id, name, value, kind, source) "
            "SELECT run_id, seq, ctx_id, name, value, kind, 'replay' FROM replay_staged_logs "
            "WHERE session = ? AND run_id = ?",
            (session, run_id),
        )
        conn.executemany(LOOP_INSERT, [(run_id, *row) for row in staged_loops(conn, session, run_id)])
        replace_divergent_marks(conn, run_id, names, divergent or {})
        if journal_commit is not None:
            record_journal_commit(conn, run_id, journal_commit)
        _delete(conn, session, run_id)


def discard(conn: sqlite3.Connection, session: str, run_id: str | None = None) -> None:
    """Drop the session's staged rows and finish notes (of one run, or all of them)."""
    with write_transaction(conn):
        _delete(conn, session, run_id)


def _delete(conn: sqlite3.Connection, session: str, run_id: str | None) -> None:
    if run_id is None:
        for statement in _DELETE_SESSION:
            conn.execute(statement, (session,))
    else:
        for statement in _DELETE_RUN:
            conn.execute(statement, (session, run_id))
