"""A logged name's values in one run as typed arrays, read from the local store or from pivot.py's
arrays of any store: what :meth:`~flordb_build.team.ViewReader.series_points` returns and series.py
turns into a chart's points.

Its own module, below series.py and the readers (team/_protocol.py, team/_postgres.py), so that
each reader fills series.py's input without importing series.py, which imports the readers.
"""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING

import numpy as np

from .packedlogs import packed_only, recorded_names, recorded_rows
from .values import ValueKind, decode_value

if TYPE_CHECKING:
    from .pivot import LogArrays


def typed_array(values: list[object]) -> np.ndarray:
    """``values`` as int64, float64 (None as NaN) or bool when they all are such, else objects."""
    kinds = set(map(type, values))
    try:
        if kinds == {bool}:
            return np.array(values, dtype=bool)
        if kinds and kinds <= {int}:
            return np.array(values, dtype=np.int64)
        if kinds and kinds <= {int, float, type(None)} and kinds != {type(None)}:
            return np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    except OverflowError:  # an int beyond int64 stays exact as an object
        pass
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def local_logged_names(conn: sqlite3.Connection, run_id: str) -> list[str]:
    """series.logged_names over the local store: one index seek per name of ``logs`` (clustered
    by run and name), not a scan of the run's rows, and the names of its packed chunks."""
    return recorded_names(conn, run_id)


def local_series_points(conn: sqlite3.Connection, run_id: str, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``ViewReader.series_points`` over the local store: replayed values, then recorded ones
    (from ``log_columns``' packed chunks where they hold every recorded value, packedlogs.py)."""
    parts_ctx: list[np.ndarray] = []
    parts_val: list[np.ndarray] = []
    parts_rep: list[np.ndarray] = []
    replay_rows = conn.execute(
        "SELECT ctx_id, value, kind FROM logs WHERE run_id = ? AND name = ? AND source = 'replay' ORDER BY seq",
        (run_id, name),
    ).fetchall()
    if replay_rows:  # first, so that recorded values (later in the arrays) win
        parts_ctx.append(np.array([r[0] for r in replay_rows], dtype=np.int64))
        parts_val.append(_decoded(replay_rows))
        parts_rep.append(np.ones(len(replay_rows), dtype=bool))
    record = _packed_record(conn, run_id, name)
    if record is None:
        rows = [row[1:] for row in recorded_rows(conn, run_id, name)]
        record = (np.array([r[0] for r in rows], dtype=np.int64), _decoded(rows))
    parts_ctx.append(record[0])
    parts_val.append(record[1])
    parts_rep.append(np.zeros(len(record[0]), dtype=bool))
    values = concat_values(parts_val)
    return np.concatenate(parts_ctx), values, np.concatenate(parts_rep)


def points_of_logs(logs: LogArrays) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``ViewReader.series_points`` from pivot.py's arrays of one run and name (recorded first,
    each source as logged, as every reader returns them): replayed first, values decoded and typed."""
    replay = np.asarray(logs.replay, dtype=bool)
    parts_ctx: list[np.ndarray] = [np.empty(0, dtype=np.int64)]
    parts_val: list[np.ndarray] = [np.empty(0, dtype=object)]
    parts_rep: list[np.ndarray] = [np.empty(0, dtype=bool)]
    for replayed, mask in ((True, replay), (False, ~replay)):
        if not mask.any():
            continue
        if logs.value.dtype.kind in "if":  # plain numbers already typed (team/_fetch.py): no Python object each
            decoded = logs.value[mask]
        else:
            kinds, stored = logs.kind[mask].tolist(), logs.value[mask].tolist()
            if all(k == ValueKind.NATIVE for k in kinds):
                decoded = typed_array(stored)
            else:
                decoded = typed_array([decode_value(v, int(k)) for v, k in zip(stored, kinds, strict=True)])
        parts_ctx.append(np.asarray(logs.ctx[mask], dtype=np.int64))
        parts_val.append(decoded)
        parts_rep.append(np.full(len(decoded), replayed, dtype=bool))
    return np.concatenate(parts_ctx), concat_values(parts_val), np.concatenate(parts_rep)


def concat_values(parts: list[np.ndarray]) -> np.ndarray:
    """One array of the parts' values: numeric when every part is (ints and floats give floats)."""
    parts = [p for p in parts if p.size] or parts[:1]
    kinds = {p.dtype.kind for p in parts}
    if len(parts) == 1 or kinds <= {"i"} or kinds <= {"b"} or (kinds <= {"i", "f"}):
        return np.concatenate(parts)
    return np.concatenate([p.astype(object) for p in parts])


def _decoded(rows: list[tuple[int, object, int]]) -> np.ndarray:
    return typed_array([value if kind == ValueKind.NATIVE else decode_value(value, kind) for _c, value, kind in rows])


def _packed_record(conn: sqlite3.Connection, run_id: str, name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Recorded ``(ctx ids, values)`` from ``log_columns`` when its chunks hold every recorded value."""
    chunks = packed_only(conn, run_id, name)
    if chunks is None:
        return None
    dtype = np.float64 if chunks[0][4] == "f8" else np.int64
    ctx = np.concatenate([np.frombuffer(c[5], dtype=np.int64) for c in chunks])
    values = np.concatenate([np.frombuffer(c[6], dtype=dtype) for c in chunks])
    return ctx, values
