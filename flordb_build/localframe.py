"""The local store's answers to the frame reads (blockpivot.py's :class:`~flordb_build.blockpivot.FrameSource`).

Per run and requested name, the values come as a few typed parts: the replayed rows, then the
recorded ones, from ``log_columns``' packed chunks (``np.frombuffer``, no Python object per value)
when those hold every recorded value, else from ``logs``' rows and the chunks (packedlogs.py). A run's loops are its ``loops`` rows:
blocks of consecutive iterations (store.coalesce_loops), a few dozen however long the run.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from .packedlogs import packed_only, recorded_rows

if TYPE_CHECKING:
    from .blockpivot import ValuePart

_ALL_CHUNKS_SQL = (
    "SELECT run_id, first_seq, count, seq_step, seqs, format, ctx_ids, vals FROM log_columns "
    "WHERE name = ? AND format IN ('f8', 'i8')"
)
_HAS_ROW_SQL = "SELECT 1 FROM logs WHERE run_id = ? AND name = ? AND source = 'record' LIMIT 1"
_REPLAY_SQL = "SELECT ctx_id, value, kind FROM logs WHERE run_id = ? AND name = ? AND source = 'replay'"
_BLOCKS_SQL = "SELECT name, ctx_id, parent_ctx, iteration, count, value FROM loops WHERE run_id = ?"


def local_value_parts(
    conn: sqlite3.Connection, run_ids: list[str], names: list[str]
) -> Iterator[list[list[ValuePart]]]:
    """Per run of ``run_ids``, per name of ``names``: its value parts, replayed before recorded."""
    chunks = [_chunks_by_run(conn, run_ids, name) for name in names]
    for run_id in run_ids:
        per_name: list[list[ValuePart]] = []
        for name, by_run in zip(names, chunks, strict=True):
            parts: list[ValuePart] = []
            replayed = conn.execute(_REPLAY_SQL, (run_id, name)).fetchall()
            if replayed:
                parts.append(part_of_rows(replayed))
            packed = _read_packed(conn, run_id, name, by_run)
            if packed is not None:
                parts.append((packed[0], packed[1], None))
            else:  # some values are `logs` rows (packedlogs.py): rows and chunks in seq order
                rows = [row[1:] for row in recorded_rows(conn, run_id, name)]
                if rows:
                    parts.append(part_of_rows(rows))
            per_name.append(parts)
        yield per_name


def local_loop_blocks(conn: sqlite3.Connection, run_id: str) -> list[tuple[Any, ...]]:
    """The run's loop blocks as ``(name, ctx_id, parent_ctx, iteration, count, value)``."""
    return conn.execute(_BLOCKS_SQL, (run_id,)).fetchall()


def part_of_rows(rows: list[tuple[Any, ...]]) -> ValuePart:
    """A value part of ``(ctx_id, value, kind)`` rows: the values as Python objects, as stored."""
    ctx, value, kind = zip(*rows, strict=True)
    array = np.empty(len(rows), dtype=object)
    array[:] = value
    return np.array(ctx, dtype=np.int64), array, np.array(kind, dtype=np.int64)


def _chunks_by_run(
    conn: sqlite3.Connection, run_ids: list[str], name: str
) -> dict[str, list[tuple[Any, ...]]] | None:
    """``run_id -> [packedlogs.CHUNKS_SQL rows]`` of ``name``'s packed chunks in one scan, when the frame
    reads most runs (one scan of ``log_columns`` beats a seek per run); None: seek per run."""
    total = conn.execute("SELECT count(*) FROM runs").fetchone()[0]
    if 2 * len(run_ids) < total:
        return None
    by_run: dict[str, list[tuple[Any, ...]]] = {}
    for run_id, *chunk in conn.execute(_ALL_CHUNKS_SQL, (name,)):
        by_run.setdefault(run_id, []).append(tuple(chunk))
    for chunks in by_run.values():
        chunks.sort(key=lambda c: c[0])
    return by_run


def _read_packed(
    conn: sqlite3.Connection, run_id: str, name: str, by_run: dict[str, list[tuple[Any, ...]]] | None = None
) -> tuple[np.ndarray, np.ndarray] | None:
    """Recorded ``(ctx ids, values)`` from ``log_columns`` when its packed chunks hold every
    recorded value of the name (no `logs` row of it: one index seek tells), all of one format."""
    if by_run is None:
        chunks = packed_only(conn, run_id, name)
    else:
        chunks = by_run.get(run_id)
        if chunks and conn.execute(_HAS_ROW_SQL, (run_id, name)).fetchone() is not None:
            chunks = None
    if not chunks or len({c[4] for c in chunks}) != 1:
        return None
    dtype = np.float64 if chunks[0][4] == "f8" else np.int64
    if len(chunks) == 1:
        return np.frombuffer(chunks[0][5], dtype=np.int64), np.frombuffer(chunks[0][6], dtype=dtype)
    return (
        np.concatenate([np.frombuffer(c[5], dtype=np.int64) for c in chunks]),
        np.concatenate([np.frombuffer(c[6], dtype=dtype) for c in chunks]),
    )
