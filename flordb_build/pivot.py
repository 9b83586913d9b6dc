"""The reader interface's per-context arrays (LogArrays, LoopArrays) and the frame's column types.

``read_logs``/``read_loops`` answer the StoreReader methods of the same names over the local store
(team/_protocol.py), and the team store builds the same arrays (team/_postgres.py); blockpivot.py
turns either into a frame. ``typed_series`` gives every value column its dtype. Kept apart from
``query.py`` so numpy and pandas load only when a frame is built.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class LogArrays:
    """Log rows of the requested names as parallel arrays (``name`` indexes the requested names)."""

    code: np.ndarray
    ctx: np.ndarray
    name: np.ndarray
    value: np.ndarray
    kind: np.ndarray
    replay: np.ndarray


@dataclass(frozen=True)
class LoopArrays:
    """Loop-context rows as parallel arrays (``name`` indexes ``names``)."""

    names: list[str]
    code: np.ndarray
    ctx: np.ndarray
    parent: np.ndarray
    name: np.ndarray
    iteration: np.ndarray
    value: np.ndarray


def unique(values: np.ndarray) -> np.ndarray:
    """Sorted unique values; a sort beats ``np.unique``'s hashing on these nearly sorted ids."""
    ordered = np.sort(values, kind="stable")
    if ordered.size == 0:
        return ordered
    return ordered[np.append(True, ordered[1:] != ordered[:-1])]


def _concat(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
    return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)


def read_logs(conn: sqlite3.Connection, run_ids: list[str], names: list[str]) -> LogArrays:
    """Every value of ``names`` logged by ``run_ids``, recorded and replayed.

    Plain floats and ints (the bulk) stream from the cursor straight into typed numpy arrays;
    only text, JSON, bools and replayed rows go through Python tuples.
    """
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("code", "ctx", "name", "value", "kind", "replay")}
    count_sql = "SELECT count(*) FROM logs WHERE run_id = ? AND name = ? AND source = 'record'"
    chunks_sql = (
        "SELECT count, format, ctx_ids, vals FROM log_columns WHERE run_id = ? AND name = ? ORDER BY first_seq"
    )
    record_sql = "SELECT ctx_id, value, kind FROM logs WHERE run_id = ? AND name = ? AND source = 'record'"
    replay_sql = "SELECT ctx_id, value, kind FROM logs WHERE run_id = ? AND name = ? AND source = 'replay'"

    def add(code: int, name_code: int, ctx: np.ndarray, values: np.ndarray, kind: Any, replay: bool) -> None:
        n = len(ctx)
        parts["code"].append(np.full(n, code, dtype=np.int64))
        parts["ctx"].append(ctx)
        parts["name"].append(np.full(n, name_code, dtype=np.int64))
        parts["value"].append(values)
        parts["kind"].append(np.broadcast_to(np.asarray(kind, dtype=np.int64), (n,)))
        parts["replay"].append(np.full(n, replay, dtype=bool))

    def add_rows(code: int, name_code: int, rows: list[tuple[Any, ...]], replay: bool) -> None:
        ctx, value, kind = zip(*rows, strict=True)
        values = np.empty(len(rows), dtype=object)
        values[:] = value
        add(code, name_code, np.array(ctx, dtype=np.int64), values, kind, replay)

    for code, run_id in enumerate(run_ids):
        for name_code, name in enumerate(names):
            packed = _read_packed(conn.execute(chunks_sql, (run_id, name)).fetchall())
            # The packed copy is used only when it covers every recorded row; anything else
            # (a store written before it existed, text values) reads the rows themselves.
            if packed is not None and len(packed[0]) == conn.execute(count_sql, (run_id, name)).fetchone()[0]:
                if len(packed[0]):
                    add(code, name_code, packed[0], packed[1].astype(object), 0, False)
            else:
                rows = conn.execute(record_sql, (run_id, name)).fetchall()
                if rows:
                    add_rows(code, name_code, rows, False)
            replayed = conn.execute(replay_sql, (run_id, name)).fetchall()
            if replayed:
                add_rows(code, name_code, replayed, True)
    return LogArrays(
        code=_concat(parts["code"], np.int64),
        ctx=_concat(parts["ctx"], np.int64),
        name=_concat(parts["name"], np.int64),
        value=_concat(parts["value"], object),
        kind=_concat(parts["kind"], np.int64),
        replay=_concat(parts["replay"], bool),
    )


def _read_packed(chunks: list[tuple[Any, ...]]) -> tuple[np.ndarray, np.ndarray] | None:
    """``(ctx ids, values)`` from ``log_columns`` chunks; None unless all are packed alike."""
    if not chunks or len({fmt for _count, fmt, _ctx, _vals in chunks}) != 1 or chunks[0][1] == "rows":
        return None
    dtype = np.float64 if chunks[0][1] == "f8" else np.int64
    ctx = np.concatenate([np.frombuffer(c, dtype=np.int64) for _count, _fmt, c, _vals in chunks])
    values = np.concatenate([np.frombuffer(v, dtype=dtype) for _count, _fmt, _ctx, v in chunks])
    return ctx, values


_BLOCK = np.dtype([("ctx", np.int64), ("parent", np.int64), ("iteration", np.int64), ("count", np.int64)])


def expand_blocks(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ctx, parent, iteration)`` of every context in loop blocks (see store.coalesce_loops)."""
    counts = blocks["count"]
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    offset = np.arange(int(counts.sum()), dtype=np.int64) - starts
    return (
        np.repeat(blocks["ctx"], counts) + offset,
        np.repeat(blocks["parent"], counts),
        np.repeat(blocks["iteration"], counts) + offset,
    )


def read_loops(conn: sqlite3.Connection, run_ids: list[str], logs: LogArrays) -> LoopArrays:
    """The loop contexts that hold a requested value, and their ancestors.

    Per run, loop levels are read smallest first, and reading stops once every context the
    logs reference, and each of their ancestors, has been read.
    """
    names: dict[str, int] = {}
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("code", "ctx", "parent", "name", "iteration", "value")}
    levels_sql = "SELECT name, sum(count) FROM loops WHERE run_id = ? GROUP BY name ORDER BY sum(count), name"
    blocks_sql = "SELECT ctx_id, parent_ctx, iteration, count FROM loops WHERE run_id = ? AND name = ?"
    values_sql = "SELECT ctx_id, value FROM loops WHERE run_id = ? AND name = ? AND value IS NOT NULL"
    for code, run_id in enumerate(run_ids):
        wanted = unique(logs.ctx[logs.code == code])
        wanted = wanted[wanted != 0]
        read_ctx: list[np.ndarray] = []
        read_parent: list[np.ndarray] = []
        for level, _count in conn.execute(levels_sql, (run_id,)).fetchall() if wanted.size else ():
            blocks = np.fromiter(conn.execute(blocks_sql, (run_id, level)), dtype=_BLOCK)
            ctx, parent, iteration = expand_blocks(blocks)
            order = np.argsort(ctx, kind="stable")
            ctx, parent, iteration = ctx[order], parent[order], iteration[order]
            values = np.full(len(ctx), None, dtype=object)
            with_value = conn.execute(values_sql, (run_id, level)).fetchall()
            if with_value:
                value_ctx, value = zip(*with_value, strict=True)
                values[np.searchsorted(ctx, np.array(value_ctx, dtype=np.int64))] = value
            parts["code"].append(np.full(len(ctx), code, dtype=np.int64))
            parts["ctx"].append(ctx)
            parts["parent"].append(parent)
            parts["name"].append(np.full(len(ctx), names.setdefault(level, len(names)), dtype=np.int64))
            parts["iteration"].append(iteration)
            parts["value"].append(values)
            read_ctx.append(ctx)
            read_parent.append(parent)
            if _closure_complete(wanted, np.concatenate(read_ctx), np.concatenate(read_parent)):
                break
    return LoopArrays(
        names=list(names),
        code=_concat(parts["code"], np.int64),
        ctx=_concat(parts["ctx"], np.int64),
        parent=_concat(parts["parent"], np.int64),
        name=_concat(parts["name"], np.int64),
        iteration=_concat(parts["iteration"], np.int64),
        value=_concat(parts["value"], object),
    )


def _closure_complete(wanted: np.ndarray, ctx: np.ndarray, parent: np.ndarray) -> bool:
    """True when every wanted context, and each of its ancestors, is among the ``ctx`` read."""
    order = np.argsort(ctx)
    ctx, parent = ctx[order], parent[order]
    frontier = wanted
    while frontier.size:
        if ctx.size == 0:
            return False
        where = np.minimum(np.searchsorted(ctx, frontier), ctx.size - 1)
        if not (ctx[where] == frontier).all():
            return False
        frontier = unique(parent[where])
        frontier = frontier[frontier != 0]
    return True


def typed_series(name: str, values: Any) -> pd.Series:
    """A column whose dtype follows its values: int64, float64, bool, else object.

    Ints or bools with gaps become pandas' nullable Int64/boolean rather than floats/objects.
    """
    if isinstance(values, pd.Series):  # typed already (blockpivot.py)
        return values
    array = values if isinstance(values, np.ndarray) else _object_array(values)
    if array.dtype.kind == "i":  # loop dimensions: -1 marks "not inside this loop"
        missing = array < 0
        if missing.any():
            return pd.Series(pd.arrays.IntegerArray(np.where(missing, 0, array), missing), name=name)
        return pd.Series(array, name=name, copy=False)
    inferred = pd.api.types.infer_dtype(array, skipna=True)
    if inferred not in ("integer", "floating", "mixed-integer-float", "boolean"):
        return pd.Series(array, dtype=object, name=name)
    missing = pd.isna(array)
    if inferred == "integer" and not _fits_int64(array[~missing]):
        return pd.Series(array, dtype=object, name=name)  # ints beyond int64 (values.py BIGINT) stay exact
    if inferred == "integer":
        if missing.any():
            filled = np.where(missing, 0, array).astype(np.int64)
            return pd.Series(pd.arrays.IntegerArray(filled, missing), name=name)
        return pd.Series(array.astype(np.int64), name=name, copy=False)
    if inferred in ("floating", "mixed-integer-float"):
        return pd.Series(np.where(missing, np.nan, array).astype(np.float64), name=name, copy=False)
    if inferred == "boolean":
        if missing.any():
            return pd.Series(pd.array(array.tolist(), dtype="boolean"), name=name)
        return pd.Series(array.astype(bool), name=name)
    return pd.Series(array, dtype=object, name=name)


def _fits_int64(values: np.ndarray) -> bool:
    """True when every int fits int64 (numpy's own ints always do)."""
    return all(-(2**63) <= v < 2**63 for v in values if type(v) is int)


def _object_array(values: list[Any]) -> np.ndarray:
    """A 1-d object array of ``values``, even when they are lists (np.asarray would nest them)."""
    array = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        array[i] = value
    return array
