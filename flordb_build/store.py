"""The SQLite store: schema, connections, batched writes, and detection of runs that died.

One file per project (``Config.db_path``), WAL mode so readers never block the writers of
parallel pipeline tasks, and a busy timeout so several writers queue instead of failing.
The schema is declared once with sqlite-utils; the hot path (a batch of thousands of log
rows) goes through ``executemany`` on the same connection because building one dict per
row, as ``Table.insert_all`` does, costs more than the insert itself.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sqlite3
from array import array
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from itertools import compress, islice, repeat
from math import isfinite
from operator import add, ne
from pathlib import Path
from typing import Any

from .config import Config
from .errors import StoreError
from .filesets import migrate_files_table
from .packedlogs import migrate_chunks
from .progression import arithmetic_step, is_consecutive
from .storefile import cannot_write, check_store_file, connect_read_only, create_store_file, not_a_store

SCHEMA_VERSION = 7
BUSY_TIMEOUT_MS = 60_000
#: ``runs.error`` of a run whose process died without closing it (status ``killed``).
DEAD_RUN_ERROR = "the process died without closing its run"

# Column types: ``bytes`` declares BLOB, which in SQLite means "no affinity": an int stays an
# int, a float a float and a str a str, exactly as logged. (A column declared ANY would get
# NUMERIC affinity and turn the string '5' into the integer 5.)
TABLES: dict[str, dict[str, Any]] = {
    "runs": {
        "columns": {
            "run_id": str,
            "projid": str,
            "tstamp": str,
            "task": str,
            "pipeline_id": str,
            "filename": str,
            "args": str,
            #: JSON list of the script's command-line arguments after its path (``--kwargs`` taken
            #: out, secrets masked), so a replay passes the same flags; NULL where there was no
            #: script (a notebook) or the run predates schema 5.
            "argv": str,
            "git_head": str,
            "git_branch": str,
            "dirty": int,
            "code_tree": str,
            "snapshot": str,
            "env_id": str,
            "status": str,
            "exit_code": int,
            "error": str,
            "started": float,
            "ended": float,
            "seconds": float,
            "pid": int,
            "host": str,
            "journal": str,
        },
        "pk": "run_id",
        "indexes": [(("tstamp",), True), (("task", "filename"), False), (("status",), False)],
    },
    "loops": {
        "columns": {
            "run_id": str,
            "ctx_id": int,
            "parent_ctx": int,
            "name": str,
            "iteration": int,
            "count": int,
            "value": bytes,
        },
        # One row per *block* of iterations: contexts ctx_id .. ctx_id+count-1 are iterations
        # iteration .. iteration+count-1 of one loop under one parent (what an inner loop with
        # nothing nested in it produces). 10,000 steps of an epoch are one row, not 10,000.
        # Read single contexts through loop_contexts(). Clustered by (run, loop name): the
        # dataframe reads one run's levels one name at a time and skips levels it does not need.
        "pk": ("run_id", "name", "ctx_id"),
        "without_rowid": True,
        "indexes": [],
    },
    "logs": {
        # The row-level store of every value that no packed chunk holds: replayed values
        # (source 'replay'), and recorded values of a 'rows' chunk of ``log_columns`` (text, bools,
        # None, JSON, ints beyond int64, a batch mixing types, values logged at run level). A
        # recorded float or int64 of an 'f8'/'i8' chunk is NOT here (schema 7): a deviation from
        # design.md's "a logs row per value" that halves the bytes and the CPU a value costs
        # (bench/README.md, bench_write.py). User SQL still sees one row per value: query
        # connections read ``logs`` through packedlogs.py's TEMP view, which expands the chunks.
        "columns": {
            "run_id": str,
            "seq": int,
            "ctx_id": int,
            "name": str,
            "value": bytes,
            "kind": int,
            "source": str,
        },
        # Clustered by (run, name): reading one name of one run is a contiguous range scan,
        # which is what makes a million-row dataframe cheap. Recorded rows sort before replayed.
        "pk": ("run_id", "name", "source", "seq"),
        # No secondary index on name: SQLite would prefer it for (run, name) reads and pay a
        # random lookup per row instead of one range scan.
        "without_rowid": True,
        "indexes": [],
    },
    "log_columns": {
        # Recorded logs, one row per (flush batch, name). 'f8'/'i8': the batch's values of the name
        # are plain floats / int64 ints, none at run level (ctx 0), and they live ONLY here (no
        # `logs` row): ctx ids and values packed as int64/float64 arrays (read with np.frombuffer,
        # no Python object per value), and their exact seqs, ``first_seq + i * seq_step`` or, when
        # they are not evenly spaced (names interleaved in a batch), the int64 array ``seqs``.
        # 'rows': the values are `logs` rows (ctx_ids, vals, seq_step and seqs are NULL).
        # Run-level values stay rows so that the run-level index (ctx_id = 0) holds them all.
        # packedlogs.py reads both places as one; every reader of recorded values goes through it.
        "columns": {
            "run_id": str,
            "name": str,
            "first_seq": int,
            "count": int,
            "format": str,
            "ctx_ids": bytes,
            "vals": bytes,
            "seq_step": int,
            "seqs": bytes,
        },
        "pk": ("run_id", "name", "first_seq"),
        "without_rowid": True,
        "indexes": [],
    },
    "pipelines": {
        "columns": {
            "pipeline_id": str,
            "tool": str,
            "argv": str,
            "dag": str,
            "started": float,
            "ended": float,
            "status": str,
            "exit_code": int,
            "cwd": str,
        },
        "pk": "pipeline_id",
        "indexes": [],
    },
    "tasks": {
        "columns": {
            "pipeline_id": str,
            "task": str,
            "status": str,
            "reason": str,
            "started": float,
            "ended": float,
            "seconds": float,
            "actions": str,
            "error": str,
        },
        "pk": ("pipeline_id", "task"),
        "indexes": [],
    },
    "files": {
        # A VIEW since schema 6 (filesets.py): task_files JOIN file_sets, read exactly as the table
        # it was; the team store and slices still see these columns and this key.
        "columns": {
            "pipeline_id": str,
            "task": str,
            "path": str,
            "role": str,
            "sha256": str,
            "size": int,
            # the file's mtime when hashed (NULL when "racy"): lets an up-to-date run reuse the
            # hash of an unchanged file instead of reading it again (dag._record.FileHasher)
            "mtime_ns": int,
        },
        "pk": ("pipeline_id", "task", "path", "role"),
        "indexes": [],
        "view": True,
    },
    "task_files": {
        # which file set holds the deps and targets of one task execution (filesets.py)
        "columns": {"pipeline_id": str, "task": str, "set_id": str},
        "pk": ("pipeline_id", "task"),
        "without_rowid": True,
        "indexes": [(("set_id",), False)],
    },
    "file_sets": {
        # the facts of executions, stored once per distinct content (set_id: their sha256)
        "columns": {"set_id": str, "path": str, "role": str, "sha256": str, "size": int, "mtime_ns": int},
        "pk": ("set_id", "path", "role"),
        "without_rowid": True,
        "indexes": [(("sha256",), False), (("path",), False)],
    },
    "envs": {
        "columns": {"env_id": str, "env": str, "created": float},
        "pk": "env_id",
        "indexes": [],
    },
    "checkpoints": {
        "columns": {
            "run_id": str,
            "ctx_id": int,
            "loop_name": str,
            "iteration": int,
            "name": str,
            "sha256": str,
            "bytes": int,
            "materialize_seconds": float,
            "block_seconds": float,
            # how the object's bytes decode (state.StateFormat: torch / numpy / json / pickle)
            "format": str,
            # where in the iteration the state was taken (checkpoints.CheckpointPoint): 'nested',
            # where the iteration's first nested flor.loop ended, or 'end' (NULL: 'end', schema < 5)
            "point": str,
        },
        "pk": ("run_id", "ctx_id", "name"),
        "indexes": [(("sha256",), False)],
    },
    "timings": {
        "columns": {"run_id": str, "ctx_id": int, "kind": str, "seconds": float},
        "pk": ("run_id", "ctx_id", "kind"),
        "indexes": [],
    },
}

LOG_INSERT = "INSERT INTO logs (run_id, seq, ctx_id, name, value, kind, source) VALUES (?, ?, ?, ?, ?, ?, ?)"
LOOP_INSERT = (
    "INSERT OR REPLACE INTO loops (run_id, ctx_id, parent_ctx, name, iteration, count, value) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)


COLUMN_INSERT = (
    "INSERT OR REPLACE INTO log_columns (run_id, name, first_seq, count, format, ctx_ids, vals, seq_step, seqs) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


class ColumnFormat(StrEnum):
    """How a ``log_columns`` chunk packs its values."""

    FLOAT64 = "f8"
    INT64 = "i8"
    ROWS = "rows"  # not packable (text, bools, JSON, None, mixed, run level): read the `logs` rows


def packed_chunk(run_id: str, name: str, fmt: ColumnFormat, seqs: array[int], ctxs: array[int], vals: bytes) -> tuple[Any, ...]:
    """The ``log_columns`` row of a packed (f8/i8) chunk: its exact seqs as a step when they are
    evenly spaced (one int), else as an int64 array."""
    step = arithmetic_step(seqs)
    return (run_id, name, seqs[0], len(seqs), fmt.value, ctxs.tobytes(), vals, step, None if step else seqs.tobytes())


def rows_chunk(run_id: str, name: str, first_seq: int, count: int) -> tuple[Any, ...]:
    """The ``log_columns`` row that says "the values of this batch and name are `logs` rows"."""
    return (run_id, name, first_seq, count, ColumnFormat.ROWS.value, None, None, None, None)


def pack_log_columns(run_id: str, logs: Iterable[Sequence[Any]]) -> tuple[list[tuple[Any, ...]], list[Sequence[Any]]]:
    """``(log_columns rows, the log rows they do not hold)`` for recorded ``(seq, ctx_id, name,
    value, kind)`` log rows, per name: a name's packable rows become an f8/i8 chunk only."""
    by_name: dict[str, list[Sequence[Any]]] = {}
    for row in logs:
        by_name.setdefault(row[2], []).append(row)
    chunks = []
    unpacked: list[Sequence[Any]] = []
    for name, rows in by_name.items():
        seqs, ctxs, _names, values, kinds = zip(*rows, strict=True)
        packed = _pack_values(values) if not any(kinds) and 0 not in ctxs else None
        if packed is None:
            chunks.append(rows_chunk(run_id, name, seqs[0], len(rows)))
            unpacked.extend(rows)
        else:
            chunks.append(packed_chunk(run_id, name, packed[0], array("q", seqs), array("q", ctxs), packed[1]))
    return chunks, unpacked


def _pack_values(values: Sequence[Any]) -> tuple[ColumnFormat, bytes] | None:
    """Plain floats as float64, plain ints as int64; None for anything else."""
    types = set(map(type, values))
    try:
        if types == {float}:
            return ColumnFormat.FLOAT64, array("d", values).tobytes()
        if types == {int}:
            return ColumnFormat.INT64, array("q", values).tobytes()
    except OverflowError:  # an int beyond int64: keep it exact in the rows
        return None
    return None


#: Log rows of one column segment: ``seq = ? + key * ?``, ``ctx_id = ? + key``, the values from a JSON
#: array. One statement per segment, so SQLite's C code inserts the whole segment in one step: the
#: GIL is released once per segment, not once per row (executemany), which is what lets a tight
#: loop's thread and the writer share the interpreter. (``%.16e`` round-trips, and SQLite parses it back exactly: tests/test_store.py checks random bit patterns,
#: -0.0 and subnormals.)
COLUMN_ROWS_INSERT = (
    "INSERT INTO logs (run_id, seq, ctx_id, name, value, kind, source) "
    "SELECT ?, ? + key * ?, ? + key, ?, value, 0, ? FROM json_each(?)"
)
#: Columns shorter than this go through executemany (a statement per segment costs more there).
_JSON_SEGMENT_MIN = 64
#: The most values one statement carries: its text (~20 bytes a value) and the float objects made
#: while formatting stay a few MB however large the batch is.
_JSON_SEGMENT_MAX = 65_536


def consecutive_runs(values: array[int], max_runs: int) -> list[tuple[int, int]] | None:
    """``(start, end)`` index ranges of ``values`` whose items go up by one, in order; None when
    there are more than ``max_runs`` of them.

    One compare of the whole array with ``range(first, ...)`` when it is a single run (the usual
    batch of a loop's steps); else the breaks come from map/compress, iterated in C.
    """
    n = len(values)
    if not n:
        return []
    if is_consecutive(values):
        return [(0, n)]
    following = map(add, islice(values, 0, n - 1), repeat(1))
    breaks = list(islice(compress(range(1, n), map(ne, islice(values, 1, None), following)), max_runs))
    if len(breaks) >= max_runs:
        return None
    edges = [0, *breaks, n]
    return list(zip(edges[:-1], edges[1:], strict=True))


def insert_column_rows(conn: sqlite3.Connection, run_id: str, column: Any, source: str) -> None:
    """Insert the ``logs`` rows of one ``recorder.LogColumn``: runs of consecutive ctx ids (with
    seqs in an arithmetic progression) as one statement each, anything else with executemany."""
    seqs, ctxs, vals = column.seqs, column.ctxs, column.vals
    step = arithmetic_step(seqs) if len(seqs) >= _JSON_SEGMENT_MIN else None
    runs = consecutive_runs(ctxs, max(len(seqs) // _JSON_SEGMENT_MIN, 1)) if step is not None else None
    if step is None or runs is None:
        _insert_rows_of(conn, run_id, column, source, 0, len(seqs))
        return
    for run_start, run_end in runs:
        if run_end - run_start < _JSON_SEGMENT_MIN:
            _insert_rows_of(conn, run_id, column, source, run_start, run_end)
            continue
        for start in range(run_start, run_end, _JSON_SEGMENT_MAX):  # bounded text, a few MB each
            end = min(start + _JSON_SEGMENT_MAX, run_end)
            text = _json_array(vals[start:end])
            if text is None:  # NaN or infinity: JSON has no spelling for them; bind them as SQLite does
                _insert_rows_of(conn, run_id, column, source, start, end)
                continue
            conn.execute(
                COLUMN_ROWS_INSERT, (run_id, seqs[start], step, ctxs[start], column.name, source, text)
            )


def _json_array(values: array[Any]) -> str | None:
    """``values`` as a JSON array SQLite reads back exactly; None when one is NaN or infinite.

    Floats go as ``%.16e``: 17 significant digits always round-trip, the exponent makes SQLite
    read a REAL even for 1.0 (``%.17g`` writes ``1``, an INTEGER), and formatting them costs a
    fifth less than the shortest repr json.dumps writes. Ints go as they are.
    """
    if values.typecode != "d":
        return json.dumps(values.tolist())
    if not all(map(isfinite, values)):
        return None
    return "[" + (_FLOAT_FORMAT * len(values))[:-1] % tuple(values) + "]"


_FLOAT_FORMAT = "%.16e,"


def _insert_rows_of(conn: sqlite3.Connection, run_id: str, column: Any, source: str, start: int, end: int) -> None:
    conn.executemany(
        LOG_INSERT,
        zip(
            repeat(run_id), column.seqs[start:end], column.ctxs[start:end], repeat(column.name),
            column.vals[start:end], repeat(0), repeat(source),
        ),
    )


def column_packable(column: Any) -> bool:
    """True when a ``recorder.LogColumn`` is stored as one packed chunk alone (no run-level value:
    those stay `logs` rows, so that the run-level index holds every run-level value)."""
    ctxs = column.ctxs
    # The usual column (one value per step of a loop) has consecutive ctx ids: then one range
    # test answers, after a byte compare at a third of the cost of ``in``, which makes an int per value.
    if ctxs and ctxs[0] > 0 and is_consecutive(ctxs):
        return True
    return 0 not in ctxs


def column_chunk(run_id: str, column: Any, packable: bool | None = None) -> tuple[Any, ...]:
    """The ``log_columns`` row of one ``recorder.LogColumn`` (what :func:`pack_log_columns` makes of its rows);
    ``packable``: :func:`column_packable` of it, when the caller asked already."""
    if not (column_packable(column) if packable is None else packable):
        return rows_chunk(run_id, column.name, column.seqs[0], len(column.seqs))
    fmt = ColumnFormat.FLOAT64 if column.typecode == "d" else ColumnFormat.INT64
    return packed_chunk(run_id, column.name, fmt, column.seqs, column.ctxs, column.vals.tobytes())


def coalesce_loops(entries: Iterable[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Merge per-iteration ``(ctx, parent, name, iteration, value)`` entries into blocks.

    Returns ``(ctx, parent, name, iteration, count, value)``: consecutive iterations of one loop
    under one parent with consecutive context ids and no value become one block.
    """
    blocks: list[list[Any]] = []
    last: list[Any] | None = None
    for ctx, parent, name, iteration, value in entries:
        if (
            last is not None
            and value is None
            and last[5] is None
            and ctx == last[0] + last[4]
            and iteration == last[3] + last[4]
            and parent == last[1]
            and name == last[2]
        ):
            last[4] += 1
        else:
            last = [ctx, parent, name, iteration, 1, value]
            blocks.append(last)
    return [tuple(block) for block in blocks]


def loop_contexts(conn: sqlite3.Connection, run_id: str) -> list[tuple[int, int, str, int, Any]]:
    """Every loop context of a run as ``(ctx_id, parent_ctx, name, iteration, value)``, by ctx_id."""
    rows = conn.execute(
        "SELECT ctx_id, parent_ctx, name, iteration, count, value FROM loops WHERE run_id = ?", (run_id,)
    ).fetchall()
    contexts = [
        (ctx + k, parent, name, iteration + k, value)
        for ctx, parent, name, iteration, count, value in rows
        for k in range(count)
    ]
    contexts.sort()
    return contexts
TIMING_INSERT = "INSERT OR REPLACE INTO timings (run_id, ctx_id, kind, seconds) VALUES (?, ?, ?, ?)"
CHECKPOINT_INSERT = (
    "INSERT OR REPLACE INTO checkpoints (run_id, ctx_id, loop_name, iteration, name, sha256, bytes, "
    "materialize_seconds, block_seconds, format, point) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
#: Fields of a checkpoint row after ``run_id`` before schema 5 (no ``point``: taken at the iteration's end).
_CHECKPOINT_FIELDS_V4 = 9


def checkpoint_row(run_id: str, entry: Sequence[Any]) -> tuple[Any, ...]:
    """A ``checkpoints`` row for :data:`CHECKPOINT_INSERT` from a journal entry of any schema."""
    if len(entry) == _CHECKPOINT_FIELDS_V4:
        return (run_id, *entry, "end")
    return (run_id, *entry)


def busy_timeout_seconds(config: Config) -> float:
    """How long a writer waits for another's lock (``busy_timeout_seconds`` in ``[tool.flordb_build]``,
    parsed in config.py). A recording run retries past it and loses nothing."""
    return config.busy_timeout_seconds


def connect(path: Path, timeout_seconds: float = BUSY_TIMEOUT_MS / 1000) -> sqlite3.Connection:
    """Open ``path`` in autocommit mode with WAL and a busy timeout; transactions are explicit."""
    conn = sqlite3.connect(path, timeout=timeout_seconds, isolation_level=None, check_same_thread=False)
    if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
        conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn


@contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``: take the write lock up front so a batch never deadlocks
    half-way against another writer, and roll back on any error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


#: A partial index of the run-level rows (``ctx_id = 0``: args, final metrics), covering what
#: ``flor.dataframe()`` reads, so one row per run costs a scan of these few rows and not of every
#: value each run logged. It adds no columns and no rows to any table; a store made before it gets
#: it from its next writer (:func:`ensure_schema`), and readers fall back to the table without it.
RUN_LEVEL_INDEX = "logs_run_level"
_RUN_LEVEL_INDEX_DDL = (
    "CREATE INDEX IF NOT EXISTS " + RUN_LEVEL_INDEX + " ON logs (run_id, name, source, seq, value, kind, ctx_id) "
    "WHERE ctx_id = 0"
)


#: Every run's run-level rows, in the table's order (run, name, source, seq), from the index alone
#: (no run-level value is ever packed: :func:`column_packable`, :func:`pack_log_columns`).
RUN_LEVEL_ROWS_SQL = (
    "SELECT run_id, name, value, kind, source FROM main.logs INDEXED BY logs_run_level WHERE ctx_id = 0"
)


def has_run_level_index(conn: sqlite3.Connection) -> bool:
    """True when the store of ``conn`` has :data:`RUN_LEVEL_INDEX`."""
    row = conn.execute("SELECT 1 FROM main.sqlite_master WHERE type = 'index' AND name = ?", (RUN_LEVEL_INDEX,))
    return row.fetchone() is not None


def ensure_schema(conn: sqlite3.Connection) -> None:
    """Create every table and index that is missing; only the read indexes are checked when
    ``user_version`` is current."""
    if conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
        if not has_run_level_index(conn):
            with write_transaction(conn):
                conn.execute(_RUN_LEVEL_INDEX_DDL)
        return
    import sqlite_utils  # lazily: it imports pandas, which a recording process never needs

    db = sqlite_utils.Database(conn)
    with write_transaction(conn):
        for name, spec in TABLES.items():
            if spec.get("view"):
                continue  # made below, from the tables it reads
            table = db.table(name)
            if spec.get("without_rowid"):
                conn.execute(without_rowid_ddl(name, spec))
            else:
                table.create(spec["columns"], pk=spec["pk"], if_not_exists=True)
            _add_missing_columns(conn, name, spec)
            for columns, unique in spec["indexes"]:
                table.create_index(list(columns), unique=unique, if_not_exists=True)
        migrate_files_table(conn)  # schema 6: the files table of older stores becomes file sets
        migrate_chunks(conn)  # schema 7: a packed value lives in its chunk only
        conn.execute(_RUN_LEVEL_INDEX_DDL)
        conn.execute("PRAGMA user_version = " + str(int(SCHEMA_VERSION)))


_SQL_TYPES = {str: "TEXT", int: "INTEGER", float: "FLOAT", bytes: "BLOB"}


def _add_missing_columns(conn: sqlite3.Connection, name: str, spec: dict[str, Any]) -> None:
    """Columns a newer schema declares that an older store's table lacks (added NULL for old rows)."""
    # ``name`` and the columns are TABLES' own identifiers, never user input.
    present = {row[1] for row in conn.execute("PRAGMA table_info(" + name + ")")}
    for column, kind in spec["columns"].items():
        if column not in present:
            conn.execute("ALTER TABLE " + name + " ADD COLUMN " + column + " " + _SQL_TYPES[kind])


def _build_store(path: Path) -> None:
    """A new store at ``path`` with every table, closed (storefile.create_store_file links it in)."""
    conn = connect(path)
    try:
        ensure_schema(conn)
    finally:
        conn.close()


def without_rowid_ddl(name: str, spec: dict[str, Any]) -> str:
    """``CREATE TABLE ... WITHOUT ROWID`` for a declared table (sqlite-utils cannot say that).

    Only identifiers from :data:`TABLES` reach the text.
    """
    sql_types = {str: "TEXT", int: "INTEGER", float: "REAL", bytes: "BLOB"}
    columns = ", ".join(f'"{c}" {sql_types[t]}' for c, t in spec["columns"].items())
    pk = ", ".join(f'"{c}"' for c in spec["pk"])
    return f'CREATE TABLE IF NOT EXISTS "{name}" ({columns}, PRIMARY KEY ({pk})) WITHOUT ROWID'


@dataclass(frozen=True)
class RunLock:
    """An exclusive ``flock`` a live run holds on ``.flor/locks/<run_id>.lock``.

    The kernel drops the lock when the process dies, however it dies, so "can I take the lock?"
    tells a crashed run from a live one without trusting pids (which get reused).
    """

    path: Path
    fd: int

    @classmethod
    def acquire(cls, locks_dir: Path, run_id: str) -> RunLock:
        """Take the run's lock file; retried when :func:`clean_stale_locks` unlinked the file we locked.

        :raises OSError: when the folder or the file cannot be created.
        """
        locks_dir.mkdir(parents=True, exist_ok=True)
        path = locks_dir / f"{run_id}.lock"
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.path.samestat(os.fstat(fd), os.stat(path)):
                    return cls(path, fd)
            except FileNotFoundError:
                pass
            os.close(fd)  # a cleaner took the file away between our open and our lock: lock the new one

    def release(self) -> None:
        """Remove the lock file and drop the lock (a file that cannot be removed is cleaned later)."""
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass  # a read-only disk: the next open's clean_stale_locks removes it
        os.close(self.fd)


def clean_stale_locks(locks_dir: Path) -> int:
    """Remove the lock files (and child block counters) of runs whose process is gone; the number removed.

    A killed process leaves its ``<run_id>.lock`` behind. A file nobody holds is taken, unlinked
    while held, and released; a live run that opened it just before keeps retrying until it
    holds a file that is still in place (:meth:`RunLock.acquire`), so live runs never lose theirs.
    """
    removed = 0
    try:
        entries = list(os.scandir(locks_dir))
    except OSError:
        return 0
    for entry in entries:
        if entry.name.endswith(".lock"):
            try:
                fd = os.open(entry.path, os.O_RDWR)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                os.unlink(entry.path)
                removed += 1
            except OSError:
                pass
            finally:
                os.close(fd)
        elif entry.name.endswith(CHILD_BLOCKS_SUFFIX):
            run_id = entry.name[: -len(CHILD_BLOCKS_SUFFIX)]
            if not is_run_alive(locks_dir, run_id):
                try:
                    os.unlink(entry.path)
                    removed += 1
                except OSError:
                    pass
    return removed


#: Loop contexts of forked children: ``[2**31, 2**32)`` in blocks of ``2**20``, one block per child
#: that records (the parent counts from 1 up; the dataframe keys a context by 32 bits, pivot.py).
CHILD_CTX_BASE = 2**31
CHILD_CTX_BLOCK = 2**20
CHILD_BLOCKS = (2**32 - CHILD_CTX_BASE) // CHILD_CTX_BLOCK
#: Log seqs of child block ``k`` start at ``(k + 1) << CHILD_SEQ_SHIFT``; the parent's stay below.
CHILD_SEQ_SHIFT = 40
CHILD_BLOCKS_SUFFIX = ".children"


def allocate_child_block(locks_dir: Path, run_id: str) -> int:
    """The next unused child block of ``run_id``: a counter in ``.flor/locks/<run_id>.children``,
    read and bumped under ``flock`` so that every process of the run (children of children too)
    gets its own block.

    :raises StoreError: when the run's children used every block, or the counter cannot be kept.
    """
    path = locks_dir / f"{run_id}{CHILD_BLOCKS_SUFFIX}"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StoreError(f"Could not keep the child counter '{path}': {exc}.") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        raw = os.pread(fd, 32, 0).strip()
        block = int(raw) if raw.isdigit() else 0
        if block >= CHILD_BLOCKS:
            raise StoreError(
                f"Run '{run_id}' already has {CHILD_BLOCKS} forked children that record; this one records nothing."
            )
        os.pwrite(fd, f"{block + 1:>31}\n".encode(), 0)
        return block
    except OSError as exc:
        raise StoreError(f"Could not keep the child counter '{path}': {exc}.") from exc
    finally:
        os.close(fd)


def is_run_alive(locks_dir: Path, run_id: str) -> bool:
    """True when some process still holds the run's lock file."""
    path = locks_dir / f"{run_id}.lock"
    try:
        fd = os.open(path, os.O_RDONLY)  # flock needs no write access: this works on a read-only disk too
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def store_lock_path(db_path: Path) -> Path:
    """The lock file beside the database (``flor.db.lock``) that every connection holds shared."""
    return db_path.with_name(db_path.name + ".lock")


@dataclass(frozen=True)
class StoreLock:
    """An ``flock`` on the store's lock file: shared by every open :class:`Store`, exclusive for ``rebuild``.

    ``rebuild`` swaps a new database file in and removes the old ``-wal``/``-shm`` files, which a
    connection still open on the old file would need (a reader too). So every connection holds
    the lock shared for its lifetime, ``rebuild`` takes it exclusively, and an open that comes
    while a rebuild holds it waits and then sees the new file. The kernel drops the lock with
    the process, however it dies; forked children share their parent's lock until they exit.
    """

    path: Path
    fd: int

    @classmethod
    def shared(cls, db_path: Path) -> StoreLock | None:
        """Take the lock shared, waiting while a rebuild holds it; None where the file cannot be
        opened (a read-only ``.flor``: then there is no rebuild to wait for either)."""
        path = store_lock_path(db_path)
        fd = _open_lock_file(path, create=True)
        if fd is None:
            return None
        fcntl.flock(fd, fcntl.LOCK_SH)
        return cls(path, fd)

    @classmethod
    def exclusive(cls, db_path: Path, wait: bool) -> StoreLock | None:
        """Take the lock exclusively; None when another process holds it and ``wait`` is false.

        :raises StoreError: when the lock file cannot be created.
        """
        path = store_lock_path(db_path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(f"Could not create the store lock '{path}': {exc}.") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return cls(path, fd)

    def release(self) -> None:
        """Drop the lock (the file stays: unlinking it would let two processes lock different files)."""
        os.close(self.fd)


def _open_lock_file(path: Path, create: bool) -> int | None:
    flags = os.O_RDWR | os.O_CREAT if create else os.O_RDONLY
    try:
        return os.open(path, flags, 0o644)
    except FileNotFoundError:
        return None
    except OSError:  # read-only directory or file: a shared lock works on a read-only descriptor
        return _open_lock_file(path, create=False) if create else None


def lock_holders(db_path: Path) -> list[tuple[int, str]]:
    """``(pid, process name)`` of the other processes holding the store lock (Linux ``/proc/locks``).

    Best effort: empty where ``/proc`` cannot tell (another OS, a pid namespace that hides them).
    """
    try:
        st = os.stat(store_lock_path(db_path))
        table = Path("/proc/locks").read_text()
    except OSError:
        return []
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    holders: dict[int, str] = {}
    for line in table.splitlines():
        fields = line.split()
        # "1: FLOCK  ADVISORY  READ 1234 00:2c:5678 0 EOF"; waiters have "->" after the number
        if "->" in fields or len(fields) < 6 or fields[1] != "FLOCK" or fields[5] != device:
            continue
        pid = int(fields[4])
        if pid != os.getpid() and pid > 0:
            holders[pid] = process_name(pid)
    return sorted(holders.items())


def process_name(pid: int) -> str:
    """The command name of a process (``/proc/<pid>/comm``), '?' when it is gone or hidden."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() or "?"
    except OSError:
        return "?"


class Store:
    """A connection to one project's store, with the writes a recording process needs."""

    def __init__(self, config: Config, conn: sqlite3.Connection, lock: StoreLock | None = None) -> None:
        self.config = config
        self.conn = conn
        self.lock = lock

    @classmethod
    def open(cls, config: Config) -> Store:
        """Open (creating if needed) the store, migrate it and mark runs whose process died.

        Holds the store lock shared until :meth:`close`; waits while a ``rebuild`` swaps the file.

        :raises NotAStoreError: when the file is empty or not SQLite (storefile.py), never overwritten.
        """
        lock = None
        try:
            config.db_path.parent.mkdir(parents=True, exist_ok=True)
            ignore_flor_dir(config)
            lock = StoreLock.shared(config.db_path)
            check_store_file(config.db_path)
            if not config.db_path.exists():
                create_store_file(config.db_path, _build_store)
            conn = connect(config.db_path, busy_timeout_seconds(config))
            ensure_schema(conn)
        except sqlite3.Error as exc:
            if lock is not None:
                lock.release()
            raise not_a_store(config.db_path, exc) or StoreError(
                f"Could not open the store '{config.db_path}': {exc}."
            ) from exc
        except (OSError, StoreError) as exc:
            if lock is not None:
                lock.release()
            if isinstance(exc, StoreError):
                raise
            raise StoreError(f"Could not open the store '{config.db_path}': {exc}.") from exc
        store = cls(config, conn, lock)
        store.mark_dead_runs()
        clean_stale_locks(store.locks_dir)
        return store

    @classmethod
    def open_existing(cls, config: Config) -> Store | None:
        """Open the store for a command that may write (gc, replay); None when no run was ever recorded.

        Migrates and marks dead runs where the disk allows; on a full or read-only disk it goes on
        reading without them. Pure readers use reader.py's ``open_read_only``, which never writes.

        :raises NotAStoreError: when the file is empty or not SQLite (storefile.py).
        """
        path = config.db_path
        if not path.exists():
            return None
        check_store_file(path)
        # Readers hold the store lock too: a rebuild's swap removes the -wal/-shm they read through.
        lock = StoreLock.shared(path)
        try:
            try:
                conn = connect(path)  # read-write, so that this reader can mark runs that died
            except sqlite3.OperationalError as exc:
                if not cannot_write(exc):
                    raise
                conn = connect_read_only(path, BUSY_TIMEOUT_MS / 1000)
        except sqlite3.Error as exc:
            if lock is not None:
                lock.release()
            raise not_a_store(path, exc) or StoreError(f"Could not open the store '{path}': {exc}.") from exc
        store = cls(config, conn, lock)
        store._prepare_to_read()
        return store

    def _prepare_to_read(self) -> None:
        """Migrate and mark dead runs where the disk allows; reading goes on where it does not."""
        try:
            ensure_schema(self.conn)
            self.mark_dead_runs()
        except sqlite3.OperationalError as exc:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            current = self.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
            if not cannot_write(exc) or not current:
                self.close()
                raise StoreError(
                    f"Could not prepare the store '{self.config.db_path}' for reading: {exc}. Free space on "
                    "its disk (or make it writable) and retry."
                ) from exc

    @property
    def locks_dir(self) -> Path:
        return self.config.flor_dir / "locks"

    def close(self) -> None:
        """Close the connection, then drop the store lock."""
        try:
            self.conn.close()
        finally:
            if self.lock is not None:
                self.lock.release()
                self.lock = None

    # -- runs ---------------------------------------------------------------------------------

    def insert_run(self, row: dict[str, Any]) -> str:
        """Insert a run row; bump ``tstamp`` by a microsecond until it is unique. Returns it."""
        columns = list(row)
        sql = "INSERT INTO runs ({}) VALUES ({})".format(  # noqa: S608 - identifiers from TABLES
            ", ".join(validated_columns("runs", columns)), ", ".join("?" for _ in columns)
        )
        tstamp = row["tstamp"]
        for _ in range(10_000):
            try:
                with write_transaction(self.conn):
                    self.conn.execute(sql, [tstamp if c == "tstamp" else row[c] for c in columns])
                return str(tstamp)
            except sqlite3.IntegrityError as exc:
                if "tstamp" not in str(exc):
                    raise StoreError(f"Could not record run '{row['run_id']}': {exc}.") from exc
                tstamp = bump_tstamp(tstamp)
        raise StoreError(f"Could not find a unique tstamp for run '{row['run_id']}'.")

    def update_run(self, run_id: str, **values: Any) -> None:
        """Set columns of one run row."""
        assignments = ", ".join(c + " = ?" for c in validated_columns("runs", values))
        sql = "UPDATE runs SET " + assignments + " WHERE run_id = ?"  # noqa: S608 - validated identifiers
        with write_transaction(self.conn):
            self.conn.execute(sql, [*values.values(), run_id])

    def mark_dead_runs(self) -> list[str]:
        """Mark ``killed`` every run on this host still ``running`` whose process is gone."""
        host = socket.gethostname()
        candidates = self.conn.execute(
            "SELECT run_id FROM runs WHERE status = 'running' AND host = ?", (host,)
        ).fetchall()
        dead = [run_id for (run_id,) in candidates if not is_run_alive(self.locks_dir, run_id)]
        if dead:
            with write_transaction(self.conn):
                self.conn.executemany(
                    "UPDATE runs SET status = 'killed', error = ? WHERE run_id = ? AND status = 'running'",
                    [(DEAD_RUN_ERROR, run_id) for run_id in dead],
                )
        return dead

    # -- batched application context ----------------------------------------------------------

    def write_batch(
        self,
        run_id: str,
        loops: Sequence[tuple[Any, ...]],
        logs: Sequence[tuple[Any, ...]],
        source: str = "record",
        *,
        timings: Sequence[tuple[Any, ...]] = (),
        checkpoints: Sequence[tuple[Any, ...]] = (),
        columns: Sequence[Any] = (),
    ) -> None:
        """Write loop contexts then log rows of one run in a single transaction.

        :param loops: ``(ctx_id, parent_ctx, name, iteration, count, value)`` blocks
            (see :func:`coalesce_loops`).
        :param logs: ``(seq, ctx_id, name, value, kind)`` tuples.
        :param timings: ``(ctx_id, kind, seconds)`` tuples (checkpoints.py documents the kinds).
        :param checkpoints: ``(ctx_id, loop_name, iteration, name, sha256, bytes,
            materialize_seconds, block_seconds, format, point)`` tuples, queued only once the object exists.
        :param columns: ``recorder.LogColumn`` values, packed; a name is never in both ``logs`` and
            ``columns`` of one batch, so each (batch, name) gets one ``log_columns`` chunk. A recorded
            value of an f8/i8 chunk is stored in the chunk only (TABLES' ``log_columns``).
        """
        if not loops and not logs and not timings and not checkpoints and not columns:
            return
        with write_transaction(self.conn):
            if loops:
                self.conn.executemany(LOOP_INSERT, [(run_id, *row) for row in loops])
            rows: Sequence[Sequence[Any]] = logs
            if rows and source == "record":
                chunks, rows = pack_log_columns(run_id, rows)  # packed values get no `logs` row
                self.conn.executemany(COLUMN_INSERT, chunks)
            if rows:
                self.conn.executemany(LOG_INSERT, [(run_id, *row, source) for row in rows])
            packable = [source == "record" and column_packable(column) for column in columns]
            for column, packed in zip(columns, packable, strict=True):
                if not packed:
                    insert_column_rows(self.conn, run_id, column, source)
            if columns and source == "record":
                chunks = [column_chunk(run_id, c, packed) for c, packed in zip(columns, packable, strict=True)]
                self.conn.executemany(COLUMN_INSERT, chunks)
            if timings:
                self.conn.executemany(TIMING_INSERT, [(run_id, *row) for row in timings])
            if checkpoints:
                self.conn.executemany(CHECKPOINT_INSERT, [checkpoint_row(run_id, row) for row in checkpoints])


def validated_columns(table: str, columns: Iterable[str]) -> list[str]:
    """Return ``columns`` after checking each is declared for ``table`` (safe to put in SQL)."""
    declared = TABLES[table]["columns"]
    columns = list(columns)
    unknown = [c for c in columns if c not in declared]
    if unknown:
        raise StoreError(f"Unknown column(s) {unknown} for table '{table}'.")
    return columns


def bump_tstamp(tstamp: str) -> str:
    """The ISO timestamp one microsecond later (tstamps are unique per store)."""
    from datetime import datetime, timedelta

    return (datetime.fromisoformat(tstamp) + timedelta(microseconds=1)).isoformat(timespec="microseconds")


def ignore_flor_dir(config: Config) -> None:
    """Make ``.flor/`` invisible to git with a ``.gitignore`` of ``*`` inside it.

    The file ignores itself too, so ``git status`` of the user's repository does not change;
    the user's own ``.gitignore`` is never edited.
    """
    config.flor_dir.mkdir(parents=True, exist_ok=True)
    gitignore = config.flor_dir / ".gitignore"
    if not gitignore.exists():
        gitignore.write_text("# flordb_build's private state; snapshot commits add run journals explicitly\n*\n")


def now_tstamp() -> str:
    """Local wall-clock time as ISO 8601 with microseconds (sorts as text, compares to dates)."""
    from datetime import datetime

    return datetime.now().isoformat(timespec="microseconds")
