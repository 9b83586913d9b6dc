"""``flordb-build push``: copy finished, immutable units of the local store into the team store.

A unit is what one transaction pushes, keyed in ``team_units`` by ``(unit_id, kind)``:

- ``run``: a finished run (status not ``running``): its ``runs`` row, recorded log rows (``COPY``),
  loop contexts, checkpoints, timings and environment. Immutable: once its key is in, it is never
  pushed again.
- ``replay``: the run's replayed values (``source = 'replay'``) and divergence marks. A replay
  replaces them locally, so the unit carries a content hash; a different hash replaces the team
  store's copy, an equal one pushes nothing.
- ``pipeline``: a finished pipeline invocation with its tasks and files.

Each unit's transaction takes its key first (``INSERT ... ON CONFLICT DO NOTHING``). A second
pusher of the same unit (the same clone twice, or two machines at once) waits on that row until
the first commits, then finds it taken and copies nothing; a pusher killed mid-way never commits,
so the server drops everything it copied, and the next push copies the unit whole::

    pusher A: BEGIN, take key(run r) ....... COPY logs ....... COMMIT
    pusher B: BEGIN, take key(run r) -- waits ----------------------> taken: ROLLBACK, skip
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..config import Config
from ..errors import TeamStoreError
from ..packedlogs import chunk_seqs, packed_only, recorded_count, recorded_names, recorded_rows
from ..reader import open_read_only, show_dead_runs_killed
from ..store import TABLES, validated_columns
from ._binary import HEADER, TRAILER, Column, encode_arrays, encode_block, encode_columns, encode_row
from ._connect import connect_team, first_line, resolve_remote
from ._schema import LOOP_VALUE_COLUMNS, VALUE_COLUMNS, ensure_team_schema, loop_value_columns

if TYPE_CHECKING:
    import numpy as np

_CHUNK = 50_000
#: ``progress(event, kind, unit_id, values)``: "copying" before a unit's rows go, "pushed" after its commit.
Progress = Callable[[str, str, str, int], None]


@dataclass(frozen=True)
class PushResult:
    """What one push did."""

    remote: str
    runs: tuple[str, ...] = ()  # runs pushed now
    replays: tuple[str, ...] = ()  # runs whose replayed values were pushed now
    pipelines: tuple[str, ...] = ()
    values: int = 0  # log rows copied
    already: int = 0  # units the team store held already
    unfinished: tuple[str, ...] = field(default=())  # runs still running: left for a later push


def push_store(
    config: Config, remote_name: str | None = None, *, progress: Progress | None = None
) -> PushResult:
    """Push every finished unit of the local store that the team store lacks.

    :raises TeamStoreError: no remote, the server is unreachable, or it refused a write.
    """
    remote = resolve_remote(config, remote_name)
    # The team store first, even with nothing to push: a wrong url or option shows at once.
    with connect_team(remote) as pg:
        import psycopg

        try:
            ensure_team_schema(pg)
            local = open_read_only(config, prepare=show_dead_runs_killed)
            if local is None:
                return PushResult(remote.name)
            try:
                return _Pusher(local.conn, pg, progress or (lambda *_: None)).push_all(remote.name)
            finally:
                local.close()
        except psycopg.Error as exc:
            raise TeamStoreError(f"Push to the team store '{remote.name}' failed: {first_line(exc)}") from exc


class _Pusher:
    def __init__(self, local: sqlite3.Connection, pg: Any, progress: Progress) -> None:
        self.local = local
        self.pg = pg
        self.progress = progress

    def push_all(self, remote: str) -> PushResult:
        runs, replays, pipelines, unfinished = [], [], [], []
        values = already = 0
        for run_id, status in self.local.execute(
            "SELECT run_id, status FROM runs ORDER BY tstamp"
        ).fetchall():
            if status == "running":  # a live run: its rows are still arriving
                unfinished.append(run_id)
                continue
            copied = self.push_run(run_id)
            if copied is None:
                already += 1
            else:
                runs.append(run_id)
                values += copied
            replayed = self.push_replay(run_id)
            if replayed is not None:
                replays.append(run_id)
                values += replayed
        finished = self.local.execute(
            "SELECT pipeline_id FROM pipelines WHERE status != 'running' ORDER BY started"
        )
        for (pipeline_id,) in finished.fetchall():
            if self.push_pipeline(pipeline_id):
                pipelines.append(pipeline_id)
            else:
                already += 1
        return PushResult(
            remote, tuple(runs), tuple(replays), tuple(pipelines), values, already, tuple(unfinished)
        )

    # -- units ----------------------------------------------------------------------------------

    def _take(self, unit_id: str, kind: str, content_hash: str) -> bool:
        """Take the unit's key in the open transaction; False when it is there already."""
        row = self.pg.execute(
            "INSERT INTO team_units (unit_id, kind, content_hash) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING RETURNING 1",
            (unit_id, kind, content_hash),
        ).fetchone()
        return row is not None

    def push_run(self, run_id: str) -> int | None:
        """Push a finished run's recorded unit; the values copied, None when it was there already."""
        with self.pg.transaction():
            if not self._take(run_id, "run", ""):
                return None
            (run,) = self._read("runs", "run_id", run_id)
            self._copy_plain("runs", [run])
            env_id = run[list(TABLES["runs"]["columns"]).index("env_id")]
            if env_id:
                self._insert_shared("envs", self._read("envs", "env_id", env_id))
            self._copy_loops(run_id, upsert=False)
            count = recorded_count(self.local, run_id)  # rows and packed values (packedlogs.py)
            self.progress("copying", "run", run_id, count)
            self._copy_logs(run_id, "record")
            self._copy_plain("checkpoints", self._read("checkpoints", "run_id", run_id))
            self._copy_timings(run_id)
            self.pg.execute(
                "UPDATE team_units SET content_hash = %s WHERE unit_id = %s AND kind = 'run'",
                (_run_hash(run, count), run_id),
            )
        self.progress("pushed", "run", run_id, count)
        return int(count)

    def push_replay(self, run_id: str) -> int | None:
        """Push the run's replayed values when they differ from the team store's; how many, else None."""
        replayed = self.local.execute(
            "SELECT seq, ctx_id, name, value, kind FROM logs WHERE run_id = ? AND source = 'replay' ORDER BY name, seq",
            (run_id,),
        ).fetchall()
        divergent = _divergent_rows(self.local, run_id)
        if not replayed and not divergent:
            return None
        content_hash = hashlib.sha256(repr((replayed, divergent)).encode()).hexdigest()
        with self.pg.transaction():
            changed = self.pg.execute(
                "INSERT INTO team_units (unit_id, kind, content_hash) VALUES (%s, 'replay', %s) "
                "ON CONFLICT (unit_id, kind) DO UPDATE SET content_hash = EXCLUDED.content_hash, pushed_at = now() "
                "WHERE team_units.content_hash <> EXCLUDED.content_hash RETURNING 1",
                (run_id, content_hash),
            ).fetchone()
            if changed is None:
                return None
            self.progress("copying", "replay", run_id, len(replayed))
            self.pg.execute("DELETE FROM logs WHERE run_id = %s AND source = 'replay'", (run_id,))
            self.pg.execute("DELETE FROM replay_divergent WHERE run_id = %s", (run_id,))
            self._copy_loops(run_id, upsert=True)  # a replay may add loop contexts the record lacks
            self._write_logs(run_id, "replay", [replayed])
            with self.pg.cursor() as cur:
                cur.executemany(
                    "INSERT INTO replay_divergent (run_id, name, why) VALUES (%s, %s, %s)", divergent
                )
        self.progress("pushed", "replay", run_id, len(replayed))
        return len(replayed)

    def push_pipeline(self, pipeline_id: str) -> bool:
        """Push a finished pipeline with its tasks and files; False when it was there already."""
        with self.pg.transaction():
            if not self._take(pipeline_id, "pipeline", ""):
                return False
            digest = hashlib.sha256()
            for table in ("pipelines", "tasks", "files"):
                rows = self._read(table, "pipeline_id", pipeline_id)
                digest.update(repr(rows).encode())
                self._copy_plain(table, rows)
            self.pg.execute(
                "UPDATE team_units SET content_hash = %s WHERE unit_id = %s AND kind = 'pipeline'",
                (digest.hexdigest(), pipeline_id),
            )
        self.progress("pushed", "pipeline", pipeline_id, 0)
        return True

    # -- rows -----------------------------------------------------------------------------------

    def _read(self, table: str, key: str, value: Any) -> list[Any]:
        """``table``'s local rows whose column ``key`` equals ``value``, every declared column."""
        columns = _declared_columns(table)
        validated_columns(table, [key])
        # Identifiers from store.TABLES only (checked above); the value is bound.
        sql = "SELECT " + ", ".join(columns) + " FROM " + table + " WHERE " + key + " = ?"  # noqa: S608 - validated
        return list(self.local.execute(sql, (value,)).fetchall())

    def _copy_plain(self, table: str, rows: Sequence[Any]) -> None:
        """``COPY`` rows of a table the unit's key makes new to the team store (a run's, a pipeline's)."""
        if not rows:
            return
        statement = _composed("COPY {table} ({columns}) FROM STDIN", table, _declared_columns(table))
        with self.pg.cursor() as cur, cur.copy(statement) as copy:
            for row in rows:
                copy.write_row(row)

    def _insert_shared(self, table: str, rows: Sequence[Any]) -> None:
        """Insert rows that other units may have pushed already (an environment): those stay as they are."""
        columns = _declared_columns(table)
        statement = _composed(
            "INSERT INTO {table} ({columns}) VALUES ({placeholders}) ON CONFLICT DO NOTHING", table, columns
        )
        with self.pg.cursor() as cur:
            cur.executemany(statement, rows)

    def _copy_timings(self, run_id: str) -> None:
        """A run's timings (one row per outer iteration: as many as its steps) as binary blocks per kind."""
        rows = self.local.execute(
            "SELECT ctx_id, kind, seconds FROM timings WHERE run_id = ? ORDER BY kind, ctx_id", (run_id,)
        ).fetchall()
        if not rows:
            return
        with (
            self.pg.cursor() as cur,
            cur.copy("COPY timings (run_id, ctx_id, kind, seconds) FROM STDIN (FORMAT BINARY)") as copy,
        ):
            copy.write(HEADER)
            for kind, block in _runs_of(rows, 1):
                # seconds is REAL locally, so a float or NULL; NULLs go in a block of their own.
                for with_seconds in (True, False):
                    part = [r for r in block if (r[2] is not None) == with_seconds]
                    if not part:
                        continue
                    seconds: Column = (
                        ("float8", [float(r[2]) for r in part]) if with_seconds else ("null", None)
                    )
                    columns = [("text", run_id), ("int8", [r[0] for r in part]), ("text", kind), seconds]
                    encoded = encode_columns(columns, len(part))
                    if encoded is None:
                        raise TeamStoreError(
                            f"Run '{run_id}' has a timing that is not a number: {part[0]!r}."
                        )
                    copy.write(encoded)
            copy.write(TRAILER)

    def _copy_loops(self, run_id: str, *, upsert: bool) -> None:
        cursor = self.local.execute(
            "SELECT ctx_id, parent_ctx, name, iteration, count, value FROM loops WHERE run_id = ?", (run_id,)
        )
        rows = [(run_id, c, p, n, i, k, *loop_value_columns(v)) for c, p, n, i, k, v in cursor]
        if not rows:
            return
        columns = ["run_id", "ctx_id", "parent_ctx", "name", "iteration", "count", *LOOP_VALUE_COLUMNS]
        if upsert:
            statement = _composed(
                "INSERT INTO {table} ({columns}) VALUES ({placeholders}) ON CONFLICT DO NOTHING", "loops", columns
            )
            with self.pg.cursor() as cur:
                cur.executemany(statement, rows)
            return
        with self.pg.cursor() as cur, cur.copy(_composed("COPY {table} ({columns}) FROM STDIN", "loops", columns)) as copy:
            for row in rows:
                copy.write_row(row)

    def _copy_logs(self, run_id: str, source: str) -> None:
        """A run's log rows of ``source``, one name at a time: from log_columns' packed chunks where
        they hold the name's every value (no Python object per value), else rows and chunks as rows."""
        statement = _composed(
            "COPY {table} ({columns}) FROM STDIN (FORMAT BINARY)", "logs", ["run_id", "name", "source", "seq",
                                                                           "ctx_id", "kind", *VALUE_COLUMNS]
        )
        rows_sql = "SELECT seq, ctx_id, name, value, kind FROM logs WHERE run_id = ? AND name = ? AND source = ? ORDER BY seq"
        columnar: list[tuple[str, str, np.ndarray, np.ndarray, np.ndarray]] = []
        with self.pg.cursor() as cur, cur.copy(statement) as copy:
            copy.write(HEADER)
            for name in self._names(run_id, source):
                packed = self._packed(run_id, name) if source == "record" else None
                if packed is not None and self._write_arrays(copy, run_id, name, source, *packed):
                    columnar.append((run_id, name, *packed))
                    continue
                if source == "record":  # some of its values are rows: rows and chunks in seq order
                    rows = [(seq, ctx, name, value, kind) for seq, ctx, value, kind in recorded_rows(self.local, run_id, name)]
                    for start in range(0, len(rows), _CHUNK):
                        self._write_chunk(copy, run_id, source, rows[start : start + _CHUNK])
                    continue
                for chunk in _chunks(self.local.execute(rows_sql, (run_id, name, source))):
                    self._write_chunk(copy, run_id, source, chunk)
            copy.write(TRAILER)
        if columnar:
            with self.pg.cursor() as cur, cur.copy(
                "COPY log_chunks (run_id, name, format, count, seqs, ctx_ids, vals) FROM STDIN (FORMAT BINARY)"
            ) as copy:
                copy.set_types(["text", "text", "text", "int8", "bytea", "bytea", "bytea"])
                for run, name, seqs, ctxs, values in columnar:
                    fmt = "f8" if values.dtype.kind == "f" else "i8"
                    copy.write_row((run, name, fmt, len(values), _native(seqs), _native(ctxs), _native(values)))

    def _names(self, run_id: str, source: str) -> list[str]:
        """The names with values of ``source`` in the run: rows' names (one index seek each, logs is
        keyed by run, name) and, for recorded ones, the names of packed chunks."""
        return recorded_names(self.local, run_id, source)

    def _packed(self, run_id: str, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """``(seqs, ctx ids, values)`` of a name's recorded values from log_columns, when its packed
        chunks hold every one of them, all floats or all ints (packedlogs.packed_only)."""
        import numpy as np

        chunks = packed_only(self.local, run_id, name)
        if chunks is None:
            return None
        dtype = np.float64 if chunks[0][4] == "f8" else np.int64
        seqs = np.concatenate([np.frombuffer(chunk_seqs(*c[:4]), dtype=np.int64) for c in chunks])
        ctxs = np.concatenate([np.frombuffer(c[5], dtype=np.int64) for c in chunks])
        values = np.concatenate([np.frombuffer(c[6], dtype=dtype) for c in chunks])
        if not len(seqs) == len(ctxs) == len(values):
            return None
        return seqs, ctxs, values

    def _write_arrays(
        self, copy: Any, run_id: str, name: str, source: str, seqs: np.ndarray, ctxs: np.ndarray, values: np.ndarray
    ) -> bool:
        """Packed rows as binary blocks of :data:`_CHUNK` rows, so the server takes in one while the
        next is encoded; False (nothing written) when the values are not float64 or int64."""
        if values.dtype.kind not in "if":
            return False
        for start in range(0, len(values), _CHUNK * 2):
            part = slice(start, start + _CHUNK * 2)
            block = encode_arrays(run_id, name, source, seqs[part], ctxs[part], values[part])
            if block is None:  # only a dtype refusal, which the check above rules out
                raise TeamStoreError(f"Could not encode the values of '{name}' in run '{run_id}' for COPY.")
            copy.write(block)
        return True

    def _write_chunk(self, copy: Any, run_id: str, source: str, chunk: Sequence[Any]) -> None:
        """``(seq, ctx_id, name, value, kind)`` rows in binary: a name's rows that are all floats or
        all ints as one numpy block (team/_binary.py), others one by one."""
        for name, rows in _runs_of(chunk, 2):
            seqs, ctxs, _names, values, kinds = zip(*rows, strict=True)
            block = encode_block(run_id, name, source, seqs, ctxs, values) if not any(kinds) else None
            if block is not None:
                copy.write(block)
                continue
            for seq, ctx_id, _name, value, kind in rows:
                copy.write(encode_row(run_id, name, source, seq, ctx_id, value, kind))

    def _write_logs(self, run_id: str, source: str, chunks: Iterable[Sequence[Any]]) -> None:
        """``COPY`` chunks of ``(seq, ctx_id, name, value, kind)`` log rows into ``logs`` (binary format,
        team/_binary.py): rows of one name in a row, all floats or all ints, go as one numpy block."""
        columns = ["run_id", "name", "source", "seq", "ctx_id", "kind", *VALUE_COLUMNS]
        statement = _composed("COPY {table} ({columns}) FROM STDIN (FORMAT BINARY)", "logs", columns)
        with self.pg.cursor() as cur, cur.copy(statement) as copy:
            copy.write(HEADER)
            for chunk in chunks:
                self._write_chunk(copy, run_id, source, chunk)
            copy.write(TRAILER)


def _native(array: np.ndarray) -> bytes:
    """An int64/float64 array's bytes, little-endian (what team/_fetch.py reads back)."""
    return array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def _runs_of(rows: Sequence[Any], field: int) -> Iterator[tuple[Any, Sequence[Any]]]:
    """Consecutive rows that share the value at ``field`` (a name, a kind), with that value."""
    start = 0
    for end in range(1, len(rows) + 1):
        if end == len(rows) or rows[end][field] != rows[start][field]:
            yield rows[start][field], rows[start:end]
            start = end


def _run_hash(run: Sequence[Any], values: int) -> str:
    """A recorded run's content hash: its row, its value count and its journal's bytes (which hold
    every value it logged), without hashing a million rows one by one."""
    from pathlib import Path

    digest = hashlib.sha256(repr((tuple(run), values)).encode())
    journal = run[list(TABLES["runs"]["columns"]).index("journal")]
    try:
        digest.update(Path(journal).read_bytes() if journal else b"")
    except OSError:  # the journal moved or went with a cleanup: the row and the count still say much
        pass
    return digest.hexdigest()


def _chunks(cursor: sqlite3.Cursor) -> Iterator[list[Any]]:
    """A cursor's rows in lists of :data:`_CHUNK`."""
    while chunk := cursor.fetchmany(_CHUNK):
        yield chunk


def _divergent_rows(conn: sqlite3.Connection, run_id: str) -> list[tuple[str, str, str]]:
    try:
        rows = conn.execute(
            "SELECT name, why FROM replay_divergent WHERE run_id = ? ORDER BY name", (run_id,)
        )
        return [(run_id, name, why) for name, why in rows.fetchall()]
    except sqlite3.OperationalError:  # no replay has opened this store
        return []


def _declared_columns(table: str) -> list[str]:
    """Every column store.TABLES declares for ``table`` (a table it does not declare is an error)."""
    if table not in TABLES:
        raise TeamStoreError(f"'{table}' is not a table of the store.")
    return list(TABLES[table]["columns"])


def _composed(template: str, table: str, columns: Sequence[str]) -> Any:
    """``template`` with ``{table}``, ``{columns}`` and ``{placeholders}`` filled in as quoted
    PostgreSQL identifiers and ``%s`` parameters (psycopg.sql: no identifier is ever spliced as text)."""
    from psycopg import sql

    return sql.SQL(template).format(
        table=sql.Identifier(table),
        columns=sql.SQL(", ").join(sql.Identifier(c) for c in columns),
        placeholders=sql.SQL(", ").join(sql.Placeholder() * len(columns)),
    )
