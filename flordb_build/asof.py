"""What a replayed script reads: the store as its recorded run saw it, not as it is today.

A training script that reads the store (human labels from ``flor.dataframe``, the best
checkpoint of an earlier run) read what existed when it ran. Replayed today, the same call would
see runs recorded since (the next round's labels) and values that replays added later, so it
would compute something the run never computed. In replay mode (``FLOR_REPLAY`` set), every
read connection of :mod:`flordb_build.query` gets TEMP views named like the tables, which SQLite
resolves before the real ones::

    runs, loops, logs, log_columns, timings, checkpoints   runs that ended before the replayed run
                                                           started (its own rows excluded); logs
                                                           as recorded (no replayed values)
    tasks, files                                           tasks that ended before it started
    pipelines                                              pipelines started before it started
    envs                                                   all (content-addressed)

The views are plain SQL over the real tables (no user text in them); the set of visible runs
sits in a TEMP table filled with bound parameters.
"""

from __future__ import annotations

import json
import os
import sqlite3

from .replaying import REPLAY_ENV

#: Constant SQL, written out: the visible runs and the start time are rows of the TEMP tables
#: ``as_of_runs`` and ``as_of`` (filled with bound parameters), never text in these statements.
_AS_OF_VIEWS = (
    "CREATE TEMP VIEW runs AS SELECT * FROM main.runs WHERE run_id IN (SELECT run_id FROM temp.as_of_runs)",
    # `logs` reads through `as_of_logs`, so that a view reshaping `logs` (compat.py's FlorDB column
    # names) can replace `logs` and still read only these rows.
    "CREATE TEMP VIEW as_of_logs AS SELECT * FROM main.logs WHERE run_id IN (SELECT run_id FROM temp.as_of_runs) "
    "AND source = 'record'",
    "CREATE TEMP VIEW logs AS SELECT * FROM temp.as_of_logs",
    "CREATE TEMP VIEW loops AS SELECT * FROM main.loops WHERE run_id IN (SELECT run_id FROM temp.as_of_runs)",
    "CREATE TEMP VIEW log_columns AS SELECT * FROM main.log_columns "
    "WHERE run_id IN (SELECT run_id FROM temp.as_of_runs)",
    "CREATE TEMP VIEW timings AS SELECT * FROM main.timings WHERE run_id IN (SELECT run_id FROM temp.as_of_runs)",
    "CREATE TEMP VIEW checkpoints AS SELECT * FROM main.checkpoints "
    "WHERE run_id IN (SELECT run_id FROM temp.as_of_runs)",
    "CREATE TEMP VIEW tasks AS SELECT * FROM main.tasks "
    "WHERE ended IS NOT NULL AND ended <= (SELECT started FROM temp.as_of)",
    "CREATE TEMP VIEW files AS SELECT * FROM main.files "
    "WHERE (pipeline_id, task) IN (SELECT pipeline_id, task FROM temp.tasks)",
    "CREATE TEMP VIEW pipelines AS SELECT * FROM main.pipelines WHERE started <= (SELECT started FROM temp.as_of)",
)


def replayed_run_id() -> str | None:
    """The run this process replays (None outside replay mode)."""
    text = os.environ.get(REPLAY_ENV)
    if not text:
        return None
    try:
        run_id = json.loads(text).get("run_id")
    except (ValueError, AttributeError):
        return None
    return run_id if isinstance(run_id, str) else None


def apply_as_of(conn: sqlite3.Connection, run_id: str) -> bool:
    """Shadow the tables of ``conn`` with views of the store as of ``run_id``'s start; False if unknown."""
    row = conn.execute("SELECT started FROM main.runs WHERE run_id = ?", (run_id,)).fetchone()
    if row is None or row[0] is None:
        return False
    started = float(row[0])
    conn.execute("CREATE TEMP TABLE as_of (started REAL)")
    conn.execute("INSERT INTO temp.as_of VALUES (?)", (started,))
    conn.execute("CREATE TEMP TABLE as_of_runs (run_id TEXT PRIMARY KEY)")
    conn.execute(
        "INSERT INTO temp.as_of_runs SELECT run_id FROM main.runs "
        "WHERE ended IS NOT NULL AND ended <= ? AND run_id != ?",
        (started, run_id),
    )
    for statement in _AS_OF_VIEWS:
        conn.execute(statement)
    return True


def as_of_replay(conn: sqlite3.Connection) -> None:
    """In replay mode, make ``conn`` read the store as the replayed run saw it (see the module docstring)."""
    run_id = replayed_run_id()
    if run_id is not None:
        apply_as_of(conn, run_id)
