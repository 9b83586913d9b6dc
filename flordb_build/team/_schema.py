"""The team store's tables in PostgreSQL: the local store's, with values in typed columns.

Locally a value sits in one untyped SQLite column beside its :class:`~flordb_build.values.ValueKind`.
PostgreSQL columns have one type each, so a value goes to the column of its kind::

    NATIVE int -> value_int (bigint)      NATIVE float -> value_float (double precision)
    NATIVE str -> value_text (text)       BOOL -> value_bool      BIGINT -> value_bigint (numeric)
    JSON -> value_json (text: Python's JSON may hold NaN and lone surrogates, which json/jsonb refuse)

A string holding NUL (which PostgreSQL text cannot) travels as JSON, which reads back to the same
string. ``team_units`` is what makes a push idempotent (team/_push.py): one row per pushed unit.
"""

from __future__ import annotations

import json
from typing import Any

from ..store import TABLES
from ..values import ValueKind

SCHEMA_VERSION = 1
VALUE_COLUMNS = ("value_int", "value_float", "value_text", "value_bool", "value_bigint", "value_json")
LOOP_VALUE_COLUMNS = ("value_int", "value_float", "value_text", "value_bool")
_PG_TYPES = {str: "text", int: "bigint", float: "double precision"}
#: Tables copied as they are locally (same columns, typed); ``loops`` and ``logs`` split their value.
PLAIN_TABLES = ("runs", "pipelines", "tasks", "files", "envs", "checkpoints", "timings")
#: A fixed key for pg_advisory_xact_lock: two first pushes creating the tables at once take turns.
_SCHEMA_LOCK = 0x466C6F72  # "Flor"


def plain_ddl(name: str) -> str:
    """``CREATE TABLE`` for a table of :data:`PLAIN_TABLES`; identifiers come from store.TABLES only."""
    spec = TABLES[name]
    columns = ", ".join(f'"{c}" {_PG_TYPES[t]}' for c, t in spec["columns"].items())
    pk = spec["pk"] if isinstance(spec["pk"], tuple) else (spec["pk"],)
    keys = ", ".join(f'"{k}"' for k in pk)
    return f'CREATE TABLE IF NOT EXISTS "{name}" ({columns}, PRIMARY KEY ({keys}))'


DDL: tuple[str, ...] = (
    *(plain_ddl(name) for name in PLAIN_TABLES),
    "CREATE TABLE IF NOT EXISTS loops (run_id text, ctx_id bigint, parent_ctx bigint, name text, iteration bigint, "
    "count bigint, value_int bigint, value_float double precision, value_text text, value_bool boolean, "
    "PRIMARY KEY (run_id, name, ctx_id))",
    # No key on logs: team_units already lets each run's rows in once (team/_push.py), and a btree
    # over a million rows a run would double the cost of pushing them. A run's rows arrive in one
    # COPY, so they sit in consecutive pages, and a BRIN index (a few kB) finds them.
    "CREATE TABLE IF NOT EXISTS logs (run_id text, name text, source text, seq bigint, ctx_id bigint, "
    "kind smallint, value_int bigint, value_float double precision, value_text text, value_bool boolean, "
    "value_bigint numeric, value_json text)",
    "CREATE INDEX IF NOT EXISTS logs_run ON logs USING brin (run_id) WITH (pages_per_range = 16)",
    # A columnar copy of a run's recorded plain floats or ints per name (native-endian int64 seqs and
    # ctx ids, float64/int64 values), written with its rows in the run's transaction: one run's
    # frame reads a few rows here instead of aggregating a million (team/_fetch.py). ``logs`` stays
    # the truth for SQL; a name without a row here is read from ``logs``.
    "CREATE TABLE IF NOT EXISTS log_chunks (run_id text, name text, format text NOT NULL, count bigint NOT NULL, "
    "seqs bytea NOT NULL, ctx_ids bytea NOT NULL, vals bytea NOT NULL, PRIMARY KEY (run_id, name))",
    "CREATE TABLE IF NOT EXISTS replay_divergent (run_id text, name text, why text, PRIMARY KEY (run_id, name))",
    # unit_id: a run id or a pipeline id; kind: 'run', 'replay' or 'pipeline'.
    "CREATE TABLE IF NOT EXISTS team_units (unit_id text, kind text, content_hash text NOT NULL, "
    "pushed_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (unit_id, kind))",
    "CREATE INDEX IF NOT EXISTS runs_tstamp ON runs (tstamp)",
    "CREATE TABLE IF NOT EXISTS team_schema (version integer NOT NULL)",
)


_COMPRESSED_CHUNK_COLUMNS = (
    "SELECT count(*) FROM pg_attribute WHERE attrelid = 'log_chunks'::regclass "
    "AND attname IN ('seqs', 'ctx_ids', 'vals') AND attstorage <> 'e'"
)


#: Every relation :data:`DDL` creates, by the name it gives it.
_RELATIONS = (
    *PLAIN_TABLES, "loops", "logs", "logs_run", "log_chunks", "replay_divergent", "team_units", "runs_tstamp",
    "team_schema",
)
_ALL_RELATIONS_SQL = "SELECT bool_and(to_regclass(r) IS NOT NULL) FROM unnest(%s::text[]) AS r"


def ensure_team_schema(conn: Any) -> None:
    """Create the team tables where missing (one transaction, serialised between pushers).

    A store that has them all is left alone without a lock: ``CREATE INDEX IF NOT EXISTS`` takes a
    SHARE lock on its table even when the index is there, so a pusher that ran the DDL while another
    was inside a run's transaction (rows into ``runs``, then ``logs``) held ``logs`` and waited for
    ``runs`` as the other held ``runs`` and waited for ``logs``: PostgreSQL's "deadlock detected".
    """
    while True:
        with conn.transaction():
            if _schema_complete(conn):  # catalog reads only: no lock on any team table
                return
            if conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (_SCHEMA_LOCK,)).fetchone()[0]:
                _create_schema(conn)
                return
        # Another pusher is creating them. Wait for its commit, then look again in a new transaction:
        # this one's view of the catalogs may predate that commit (a wait on an advisory lock does not
        # refresh it), and running the DDL again is what takes the locks.
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))


def _create_schema(conn: Any) -> None:
    """Run :data:`DDL` in the open transaction, which holds the schema lock."""
    for statement in DDL:
        conn.execute(statement)
    # log_chunks' arrays are stored out of line uncompressed: packed numbers barely compress,
    # and pglz would cost each push and read more than the bytes save. Altered once, when new
    # (the ALTER locks the table; a push must not wait on readers for nothing).
    if conn.execute(_COMPRESSED_CHUNK_COLUMNS).fetchone()[0]:
        conn.execute(
            "ALTER TABLE log_chunks ALTER COLUMN seqs SET STORAGE EXTERNAL, "
            "ALTER COLUMN ctx_ids SET STORAGE EXTERNAL, ALTER COLUMN vals SET STORAGE EXTERNAL"
        )
    if conn.execute("SELECT count(*) FROM team_schema").fetchone()[0] == 0:
        conn.execute("INSERT INTO team_schema (version) VALUES (%s)", (SCHEMA_VERSION,))


def _schema_complete(conn: Any) -> bool:
    """True when every relation of :data:`DDL` exists as it leaves it, and team_schema has its row."""
    if not conn.execute(_ALL_RELATIONS_SQL, (list(_RELATIONS),)).fetchone()[0]:
        return False
    if conn.execute(_COMPRESSED_CHUNK_COLUMNS).fetchone()[0]:
        return False
    return bool(conn.execute("SELECT count(*) FROM team_schema").fetchone()[0])


def typed_value(value: Any, kind: int) -> tuple[int, tuple[Any, ...]]:
    """``(kind, VALUE_COLUMNS values)`` of a locally stored ``(value, kind)``."""
    if kind == ValueKind.BOOL:
        return kind, (None, None, None, None if value is None else bool(value), None, None)
    if kind == ValueKind.BIGINT:
        return kind, (None, None, None, None, value, None)
    if kind == ValueKind.JSON:
        return kind, (None, None, None, None, None, value)
    if type(value) is int:
        return kind, (value, None, None, None, None, None)
    if type(value) is float:
        return kind, (None, value, None, None, None, None)
    if type(value) is str:
        if "\x00" in value:
            return ValueKind.JSON, (None, None, None, None, None, json.dumps(value))
        return kind, (None, None, value, None, None, None)
    if isinstance(value, bytes):  # never written by flor.log; kept readable rather than refused
        return ValueKind.NATIVE, (None, None, value.hex(), None, None, None)
    return kind, (None, None, None, None, None, None)


def loop_value_columns(value: Any) -> tuple[Any, ...]:
    """:data:`LOOP_VALUE_COLUMNS` values of a local ``loops.value`` (an int, float, str, bool or None)."""
    if type(value) is bool:
        return (None, None, None, value)
    if type(value) is int:
        return (value, None, None, None)
    if type(value) is float:
        return (None, value, None, None)
    if value is None:
        return (None, None, None, None)
    return (None, None, str(value).replace("\x00", "\\x00"), None)


def read_value(kind: int, columns: tuple[Any, ...]) -> Any:
    """The local store's stored value back from :data:`VALUE_COLUMNS` (the inverse of :func:`typed_value`)."""
    for column in columns:
        if column is not None:
            return column
    return None
