"""Replay journals: a run's replayed state, committed to the shadow branch so ``rebuild`` keeps it.

A recorded run's journal travels in its snapshot commit; replayed values arrive later. When a
run's replay is finished (``_backfill.py``), the state it leads to (every ``source = 'replay'``
value the run will hold, and the loop contexts they need) is committed to ``flor.shadow`` as
``.flor/replays/<run_id>.jsonl`` in a commit of its own, *before* the store shows it (the format:
journalfile.py, which also writes and parses it).

``rebuild`` loads the journals oldest first, each replacing the run's replayed values, so the
newest one is what a rebuilt store holds. The store remembers which journal commit its replayed
values of a run correspond to (table ``replay_journals``), so a replay can tell a run whose
newest journal the store does not show yet and load it.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from ..config import Config
from ..journalfile import parse_replay_journal
from ..store import LOOP_INSERT, write_transaction

REPLAYS_DIR = "replays"  # under .flor/ in the commit's tree
TRAILER = "Flor-Replay"
_JOURNALS_DDL = (
    "CREATE TABLE IF NOT EXISTS replay_journals (run_id TEXT PRIMARY KEY, journal_commit TEXT, loaded REAL)"
)
#: Replayed names of a run written with --accept-divergent although values both the record and the
#: replay logged differ; ``why`` names the first difference. The journal header carries the same
#: marks (``divergent``), so a rebuilt store keeps them.
_DIVERGENT_DDL = (
    "CREATE TABLE IF NOT EXISTS replay_divergent (run_id TEXT, name TEXT, why TEXT, PRIMARY KEY (run_id, name))"
)


def replays_dir_in_tree(config: Config) -> str:
    """``.flor/replays`` as a path inside the shadow commits' trees."""
    return (config.flor_dir / REPLAYS_DIR).relative_to(config.root).as_posix()


def commit_replay_journal(config: Config, run_id: str, text: str, names: Sequence[str]) -> str:
    """Commit a run's replay journal to the shadow branch; the commit.

    :raises SnapshotError: git refused.
    """
    from ..snapshot import commit_file

    message = f"flor replay {run_id}: {', '.join(names)}\n\n{TRAILER}: {run_id}\n"
    return commit_file(config.root, text.encode(), f"{replays_dir_in_tree(config)}/{run_id}.jsonl", message)


def newest_journal_commit(config: Config, run_id: str) -> str | None:
    """The newest shadow commit that holds ``run_id``'s replay journal: what ``rebuild`` loads (None: none).

    Each replay commit adds its run's file (``--diff-filter=AM``: a commit that lacks the file,
    like every run snapshot after it, is not a journal of the run).

    :raises SnapshotError: git refused.
    """
    from ..snapshot import SHADOW_REF, resolve, run_git

    if not config.in_git or resolve(config.root, SHADOW_REF) is None:
        return None
    path = f"{replays_dir_in_tree(config)}/{run_id}.jsonl"
    return run_git(config.root, "log", "-1", "--format=%H", "--diff-filter=AM", SHADOW_REF, "--", path) or None


def read_replay_journal(config: Config, commit: str, run_id: str) -> str:
    """The text of ``run_id``'s replay journal in ``commit``.

    :raises SnapshotError: the commit does not hold it.
    """
    from ..snapshot import run_git

    return run_git(config.root, "cat-file", "blob", f"{commit}:{replays_dir_in_tree(config)}/{run_id}.jsonl")


def ensure_journal_table(conn: sqlite3.Connection) -> None:
    """Create ``replay_journals`` and ``replay_divergent`` where missing (a replay session does, when it opens)."""
    with write_transaction(conn):
        conn.execute(_JOURNALS_DDL)
        conn.execute(_DIVERGENT_DDL)


def divergent_marks(conn: sqlite3.Connection, run_id: str) -> dict[str, str]:
    """The run's replayed names marked divergent: name -> why (none on a store without the table)."""
    try:
        rows = conn.execute("SELECT name, why FROM replay_divergent WHERE run_id = ?", (run_id,)).fetchall()
    except sqlite3.OperationalError:  # a store no replay session has opened yet
        return {}
    return {str(name): str(why) for name, why in rows}


def replace_divergent_marks(
    conn: sqlite3.Connection, run_id: str, names: Sequence[str] | None, marks: dict[str, str]
) -> None:
    """Inside the caller's transaction: the marks of ``names`` (None: every name) become ``marks``."""
    conn.execute(_DIVERGENT_DDL)
    if names is None:
        conn.execute("DELETE FROM replay_divergent WHERE run_id = ?", (run_id,))
    else:
        conn.executemany("DELETE FROM replay_divergent WHERE run_id = ? AND name = ?", [(run_id, n) for n in names])
    conn.executemany(
        "INSERT OR REPLACE INTO replay_divergent (run_id, name, why) VALUES (?, ?, ?)",
        [(run_id, name, why) for name, why in marks.items()],
    )


def recorded_journal_commit(conn: sqlite3.Connection, run_id: str) -> str | None:
    """The journal commit the store's replayed values of ``run_id`` correspond to (None: not known)."""
    row = conn.execute("SELECT journal_commit FROM replay_journals WHERE run_id = ?", (run_id,)).fetchone()
    return str(row[0]) if row else None


def record_journal_commit(conn: sqlite3.Connection, run_id: str, commit: str) -> None:
    """Note (inside the caller's transaction) that the store now shows the journal of ``commit``."""
    conn.execute(
        "INSERT OR REPLACE INTO replay_journals (run_id, journal_commit, loaded) VALUES (?, ?, ?)",
        (run_id, commit, time.time()),
    )


def load_replay_journal(conn: Any, text: str, *, commit: str | None = None) -> int:
    """Replace a run's replayed values with a journal's; how many values it held (0: its run is unknown).

    :param commit: the journal's commit, remembered as what the store now shows of the run.
    """
    journal = parse_replay_journal(text)
    run_id, loops, logs = journal.run_id, journal.loops, journal.logs
    if conn.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone() is None:
        return 0  # its run's snapshot is gone: nothing to attach the values to
    with write_transaction(conn):
        conn.execute("DELETE FROM logs WHERE run_id = ? AND source = 'replay'", (run_id,))
        conn.executemany(LOOP_INSERT, [(run_id, *row) for row in loops])
        conn.executemany(
            "INSERT OR REPLACE INTO logs (run_id, seq, ctx_id, name, value, kind, source) "
            "VALUES (?, ?, ?, ?, ?, ?, 'replay')",
            [(run_id, *row) for row in logs],
        )
        replace_divergent_marks(conn, run_id, None, journal.divergent)
        if commit is not None:
            record_journal_commit(conn, run_id, commit)
    return len(logs)
