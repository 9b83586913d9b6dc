"""How the store keeps the ``files`` facts of task executions: content-addressed file sets.

An up-to-date doit run of 2,000 tasks used to copy 4,000 ``files`` rows that its previous run
had stored already (four b-trees per row), which was most of what recording it cost (issue 14).
Since schema 6 the facts of one execution (its deps and targets with their hashes) are a
*file set*, stored once, named by the sha256 of its content, and shared by every execution
with the same facts::

    task_files (pipeline_id, task, set_id)                         one row per execution with facts
    file_sets  (set_id, path, role, sha256, size, mtime_ns)        one row per file of a set
    files      VIEW: task_files JOIN file_sets                     what every reader reads, as before

So ``files`` reads exactly as the table of schema 5 did (same columns, one row per execution
and file), and every reader (lineage, the UI, team push, slices, user SQL) is unchanged. An
up-to-date execution whose facts are those of an earlier one writes one ``task_files`` row.

Writers give whole rows either way: :func:`write_file_rows` groups them per execution and
stores content-addressed sets (the recorder and ``rebuild``, so a rebuilt store has the same
sets); a plain ``INSERT INTO files`` (a slice's copy, any other writer) goes through
:data:`INSERT_TRIGGER_DDL` into a set of the execution's own, so no row is ever refused or lost.

This module knows nothing of the rest of the store (store.py imports it).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

#: The columns of the ``files`` view, as the ``files`` table of schema 5 had them.
FILE_COLUMNS = ("pipeline_id", "task", "path", "role", "sha256", "size", "mtime_ns")
#: The columns of a ``file_sets`` row after its set id.
_FACT_COLUMNS = ("path", "role", "sha256", "size", "mtime_ns")

VIEW_DDL = (
    "CREATE VIEW IF NOT EXISTS files (pipeline_id, task, path, role, sha256, size, mtime_ns) AS "
    "SELECT tf.pipeline_id, tf.task, s.path, s.role, s.sha256, s.size, s.mtime_ns "
    "FROM task_files tf JOIN file_sets s ON s.set_id = tf.set_id"
)

#: A row inserted into the view lands in the execution's own set, ``own:<pipeline_id>/<task>``
#: (content-addressed ids are 64 hex digits, so the two kinds never collide). An execution that shares a set
#: gets a copy of it first, so the row is added to its facts and not to the others' (the
#: statements' conflict policy is the outer INSERT's when it has one: OR REPLACE replaces).
INSERT_TRIGGER_DDL = (
    "CREATE TRIGGER IF NOT EXISTS files_insert INSTEAD OF INSERT ON files BEGIN "
    "INSERT OR IGNORE INTO file_sets (set_id, path, role, sha256, size, mtime_ns) "
    "SELECT 'own:' || NEW.pipeline_id || '/' || NEW.task, s.path, s.role, s.sha256, s.size, s.mtime_ns "
    "FROM task_files tf JOIN file_sets s ON s.set_id = tf.set_id "
    "WHERE tf.pipeline_id = NEW.pipeline_id AND tf.task = NEW.task "
    "AND tf.set_id <> 'own:' || NEW.pipeline_id || '/' || NEW.task; "
    "UPDATE task_files SET set_id = 'own:' || NEW.pipeline_id || '/' || NEW.task "
    "WHERE pipeline_id = NEW.pipeline_id AND task = NEW.task; "
    "INSERT OR IGNORE INTO task_files (pipeline_id, task, set_id) "
    "VALUES (NEW.pipeline_id, NEW.task, 'own:' || NEW.pipeline_id || '/' || NEW.task); "
    "INSERT INTO file_sets (set_id, path, role, sha256, size, mtime_ns) "
    "VALUES ('own:' || NEW.pipeline_id || '/' || NEW.task, NEW.path, NEW.role, NEW.sha256, NEW.size, NEW.mtime_ns); "
    "END"
)

#: The ids of the sets the trigger makes (never shared: a row added to one changes that execution only).
OWN_SET_PREFIX = "own:"
_SET_INSERT = "INSERT OR REPLACE INTO file_sets (set_id, path, role, sha256, size, mtime_ns) VALUES (?, ?, ?, ?, ?, ?)"
_TASK_FILES_UPSERT = "INSERT OR REPLACE INTO task_files (pipeline_id, task, set_id) VALUES (?, ?, ?)"


#: One encoder for every set id (``json.dumps`` with options builds a new one per call).
_ENCODE = json.JSONEncoder(separators=(",", ":"), check_circular=False).encode


def set_id(facts: Sequence[Sequence[Any]]) -> str:
    """The content address of a file set: sha256 of its ``(path, role, sha256, size, mtime_ns)`` rows in order."""
    return hashlib.sha256(_ENCODE(facts).encode()).hexdigest()


def write_file_rows(conn: sqlite3.Connection, rows: Iterable[Sequence[Any]]) -> None:
    """Store ``files`` rows (:data:`FILE_COLUMNS`) as the executions' content-addressed sets.

    Same result as ``INSERT OR REPLACE`` of each row into the ``files`` table of schema 5: a row
    replaces the one with the same ``(pipeline_id, task, path, role)``, and an execution's rows
    stored before (an earlier batch) stay beside the new ones. Runs inside the caller's transaction.
    """
    groups: dict[tuple[str, str], list[tuple[Any, ...]]] = {}
    for row in rows:
        groups.setdefault((row[0], row[1]), []).append(tuple(row[2:]))
    write_task_facts(conn, groups)


def write_task_facts(
    conn: sqlite3.Connection,
    groups: Mapping[tuple[str, str], Sequence[tuple[Any, ...]]],
    same_as: Mapping[tuple[str, str], str] | None = None,
) -> None:
    """:func:`write_file_rows` of rows grouped by execution: ``(pipeline_id, task) -> [(path, role, sha256, size, mtime_ns)]``.

    The roles must be plain ``str`` (a set's id is the hash of its rows as JSON spells them).
    ``same_as`` names, for some executions, a stored set that holds exactly their rows (the
    caller compared them: an up-to-date task and its previous execution); it is linked as it is.
    """
    same_as = same_as or {}
    if not groups:
        return
    keys = _ENCODE([list(key) for key in groups])
    known = conn.execute(
        "SELECT tf.pipeline_id, tf.task, s.path, s.role, s.sha256, s.size, s.mtime_ns "
        "FROM json_each(?) k JOIN task_files tf ON tf.pipeline_id = json_extract(k.value, '$[0]') "
        "AND tf.task = json_extract(k.value, '$[1]') JOIN file_sets s ON s.set_id = tf.set_id",
        (keys,),
    ).fetchall()
    earlier: dict[tuple[str, str], dict[tuple[Any, Any], tuple[Any, ...]]] = {}
    for row in known:
        earlier.setdefault((row[0], row[1]), {})[(row[2], row[3])] = tuple(row[2:])
    sets: dict[str, list[tuple[Any, ...]]] = {}
    links = []
    shared = set()
    for key, facts in groups.items():
        if not facts:
            continue  # an execution without deps or targets has no set (no rows, as in the table)
        if key in same_as and key not in earlier and not same_as[key].startswith(OWN_SET_PREFIX):
            links.append((key[0], key[1], same_as[key]))
            shared.add(same_as[key])
            continue
        if key in earlier:  # rows stored by an earlier batch stay, unless a new row has their key
            merged = earlier[key]
            merged.update(((fact[0], fact[1]), tuple(fact)) for fact in facts)
            ordered = sorted(merged.values())
        elif len(facts) > 1:
            # A later row with the same (path, role) replaces an earlier one, as INSERT OR REPLACE did.
            ordered = sorted({(fact[0], fact[1]): tuple(fact) for fact in facts}.values())
        else:
            ordered = [tuple(fact) for fact in facts]
        sid = set_id(ordered)
        sets[sid] = ordered
        links.append((key[0], key[1], sid))
    sets = {sid: facts for sid, facts in sets.items() if sid not in shared}
    stored = {
        sid
        for (sid,) in conn.execute(
            "SELECT DISTINCT set_id FROM file_sets WHERE set_id IN (SELECT value FROM json_each(?))",
            (_ENCODE(list(sets)),),
        )
    } if sets else set()
    conn.executemany(_SET_INSERT, [(sid, *fact) for sid, facts in sets.items() if sid not in stored for fact in facts])
    conn.executemany(_TASK_FILES_UPSERT, links)


def migrate_files_table(conn: sqlite3.Connection) -> None:
    """Turn a ``files`` table (schema <= 5) into file sets and the ``files`` view; inside the caller's transaction.

    Expects ``file_sets`` and ``task_files`` to exist; a store already migrated is left as it is.
    """
    kind = conn.execute("SELECT type FROM sqlite_master WHERE name = 'files'").fetchone()
    if kind is not None and kind[0] == "table":
        conn.execute("ALTER TABLE files RENAME TO files_v5")
        columns = {row[1] for row in conn.execute("PRAGMA table_info(files_v5)")}
        # Identifiers from FILE_COLUMNS only; a column an old store lacks reads NULL.
        select = ", ".join(c if c in columns else "NULL" for c in FILE_COLUMNS)
        write_file_rows(conn, conn.execute("SELECT " + select + " FROM files_v5").fetchall())  # noqa: S608
        conn.execute("DROP TABLE files_v5")
    conn.execute(VIEW_DDL)
    conn.execute(INSERT_TRIGGER_DDL)

