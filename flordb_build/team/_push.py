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
from typing import Any

from ..config import Config
from ..errors import TeamStoreError
from ..reader import open_read_only, show_dead_runs_killed
from ..store import TABLES
from ._connect import connect_team, first_line, resolve_remote
from ._schema import LOOP_VALUE_COLUMNS, VALUE_COLUMNS, ensure_team_schema, loop_value_columns, typed_value

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
    local = open_read_only(config, prepare=show_dead_runs_killed)
    if local is None:
        return PushResult(remote.name)
    try:
        import psycopg

        with connect_team(remote) as pg:
            pusher = _Pusher(local.conn, pg, progress or (lambda *_: None))
            ensure_team_schema(pg)
            return pusher.push_all(remote.name)
    except psycopg.Error as exc:
        raise TeamStoreError(f"Push to the team store '{remote.name}' failed: {first_line(exc)}") from exc
    finally:
        local.close()


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
        digest = hashlib.sha256()
        with self.pg.transaction():
            if not self._take(run_id, "run", ""):
                return None
            self._copy_rows("runs", "run_id = ?", (run_id,), digest)
            env_ids = [
                r[0]
                for r in self.local.execute("SELECT env_id FROM runs WHERE run_id = ?", (run_id,))
                if r[0]
            ]
            for env_id in env_ids:
                self._copy_rows("envs", "env_id = ?", (env_id,), digest)
            self._copy_loops(run_id, digest, upsert=False)
            (count,) = self.local.execute(
                "SELECT count(*) FROM logs WHERE run_id = ? AND source = 'record'", (run_id,)
            ).fetchone()
            self.progress("copying", "run", run_id, count)
            self._copy_logs(run_id, "record", digest)
            self._copy_rows("checkpoints", "run_id = ?", (run_id,), digest)
            self._copy_rows("timings", "run_id = ?", (run_id,), digest)
            self.pg.execute(
                "UPDATE team_units SET content_hash = %s WHERE unit_id = %s AND kind = 'run'",
                (digest.hexdigest(), run_id),
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
            self._copy_loops(run_id, None, upsert=True)  # a replay may add loop contexts the record lacks
            self._write_logs(run_id, "replay", [replayed], None)
            with self.pg.cursor() as cur:
                cur.executemany(
                    "INSERT INTO replay_divergent (run_id, name, why) VALUES (%s, %s, %s)", divergent
                )
        self.progress("pushed", "replay", run_id, len(replayed))
        return len(replayed)

    def push_pipeline(self, pipeline_id: str) -> bool:
        """Push a finished pipeline with its tasks and files; False when it was there already."""
        digest = hashlib.sha256()
        with self.pg.transaction():
            if not self._take(pipeline_id, "pipeline", ""):
                return False
            for table in ("pipelines", "tasks", "files"):
                self._copy_rows(table, "pipeline_id = ?", (pipeline_id,), digest)
            self.pg.execute(
                "UPDATE team_units SET content_hash = %s WHERE unit_id = %s AND kind = 'pipeline'",
                (digest.hexdigest(), pipeline_id),
            )
        self.progress("pushed", "pipeline", pipeline_id, 0)
        return True

    # -- rows -----------------------------------------------------------------------------------

    def _copy_rows(self, table: str, where: str, params: Sequence[Any], digest: Any) -> int:
        """Insert ``table``'s local rows matching ``where`` (a constant filter with ? parameters);
        rows the team store holds already (a shared environment) are kept as they are."""
        columns = list(TABLES[table]["columns"])
        names = ", ".join(columns)  # identifiers from store.TABLES only
        rows = self.local.execute(f"SELECT {names} FROM {table} WHERE {where}", params).fetchall()  # noqa: S608
        if not rows:
            return 0
        digest.update(repr(rows).encode())
        placeholders = ", ".join(["%s"] * len(columns))
        with self.pg.cursor() as cur:
            cur.executemany(
                f"INSERT INTO {table} ({names}) VALUES ({placeholders}) ON CONFLICT DO NOTHING",  # noqa: S608
                rows,
            )
        return len(rows)

    def _copy_loops(self, run_id: str, digest: Any, *, upsert: bool) -> None:
        cursor = self.local.execute(
            "SELECT ctx_id, parent_ctx, name, iteration, count, value FROM loops WHERE run_id = ?", (run_id,)
        )
        rows = [(run_id, c, p, n, i, k, *loop_value_columns(v)) for c, p, n, i, k, v in cursor]
        if not rows:
            return
        if digest is not None:
            digest.update(repr(rows).encode())
        columns = "run_id, ctx_id, parent_ctx, name, iteration, count, " + ", ".join(LOOP_VALUE_COLUMNS)
        if upsert:
            with self.pg.cursor() as cur:
                cur.executemany(
                    f"INSERT INTO loops ({columns}) VALUES ({', '.join(['%s'] * 10)}) ON CONFLICT DO NOTHING",  # noqa: S608
                    rows,
                )
            return
        with self.pg.cursor() as cur, cur.copy(f"COPY loops ({columns}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)

    def _copy_logs(self, run_id: str, source: str, digest: Any) -> None:
        cursor = self.local.execute(
            "SELECT seq, ctx_id, name, value, kind FROM logs WHERE run_id = ? AND source = ?",
            (run_id, source),
        )
        self._write_logs(run_id, source, _chunks(cursor), digest)

    def _write_logs(self, run_id: str, source: str, chunks: Iterable[Sequence[Any]], digest: Any) -> None:
        """``COPY`` chunks of ``(seq, ctx_id, name, value, kind)`` log rows into ``logs``."""
        columns = "run_id, name, source, seq, ctx_id, kind, " + ", ".join(VALUE_COLUMNS)
        with self.pg.cursor() as cur, cur.copy(f"COPY logs ({columns}) FROM STDIN") as copy:
            for chunk in chunks:
                if digest is not None:
                    digest.update(repr(chunk).encode())
                for seq, ctx_id, name, value, kind in chunk:
                    if kind == 0 and type(value) is float:  # the bulk: plain floats
                        copy.write_row(
                            (run_id, name, source, seq, ctx_id, 0, None, value, None, None, None, None)
                        )
                    else:
                        stored_kind, typed = typed_value(value, kind)
                        copy.write_row((run_id, name, source, seq, ctx_id, stored_kind, *typed))


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
