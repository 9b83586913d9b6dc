"""The numpy half of ``flor.dataframe``: read loop contexts and log rows, pivot them into columns.

Kept apart from ``query.py`` so numpy and pandas load only when a frame is built. Reading is
shaped by the storage layout: ``logs`` is clustered by (run, name) and ``loops`` by
(run, loop name), so each read below is a contiguous range scan, and loop levels that hold no
requested value (the 200k step contexts when only ``val_acc`` per epoch is asked for) are
never read at all. Everything after the reads is numpy over integer positions.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from .errors import QueryError
from .runtable import RUN_COLUMNS, RunTable
from .values import ValueKind, decode_value

_CTX_SHIFT = 32  # (run code << 32) | ctx_id is one int64 key per context


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


class KeyPositions:
    """Position of each int64 key in an array of distinct keys: one sort, then binary searches.

    Cheaper than a hash index here: the keys arrive nearly sorted, so the sort is quick.
    """

    def __init__(self, keys: np.ndarray) -> None:
        self._order = np.argsort(keys, kind="stable")
        self._sorted = keys[self._order]

    def find(self, wanted: np.ndarray) -> np.ndarray:
        """Positions of ``wanted`` in the original keys; -1 where a key is absent."""
        if self._sorted.size == 0:
            return np.full(len(wanted), -1, dtype=np.int64)
        at = np.minimum(np.searchsorted(self._sorted, wanted), self._sorted.size - 1)
        return np.where(self._sorted[at] == wanted, self._order[at], -1)


class ContextPivot:
    """Turns loop contexts and log rows into dataframe columns (numpy over positions).

    Positions ``0..N-1`` are loop contexts; ``N + r`` is the root (run level) of run ``r``.
    """

    def __init__(self, runs: RunTable, names: list[str], loops: LoopArrays, logs: LogArrays) -> None:
        self.runs = runs
        self.names = names
        self.loops = loops
        self.logs = logs
        self.n_loops = n = len(loops.ctx)
        n_runs = len(runs)
        positions = KeyPositions((loops.code << _CTX_SHIFT) | loops.ctx)
        parent_pos = positions.find((loops.code << _CTX_SHIFT) | loops.parent)
        parent_pos = np.where((loops.parent == 0) | (parent_pos < 0), n + loops.code, parent_pos)
        self.parent = np.concatenate([parent_pos, np.full(n_runs, -1, dtype=np.int64)])
        self.pos_code = np.concatenate([loops.code, np.arange(n_runs, dtype=np.int64)])
        self._has_values = np.bincount(loops.name[loops.value != None], minlength=len(loops.names)) > 0  # noqa: E711
        log_pos = positions.find((logs.code << _CTX_SHIFT) | logs.ctx)
        self.log_pos = np.where((logs.ctx == 0) | (log_pos < 0), n + logs.code, log_pos)

    def columns(self) -> dict[str, Any]:
        """Frame columns (numpy arrays) in order: run columns, loop dimensions, names."""
        if self.log_pos.size == 0:
            return {c: np.empty(0, dtype=object) for c in [*RUN_COLUMNS, *self.names]}
        leaves = self._leaves()
        leaves = leaves[np.lexsort((leaves, self.pos_code[leaves]))]  # by run (tstamp order), then context
        codes = self.pos_code[leaves]
        out: dict[str, Any] = {}
        for column in RUN_COLUMNS:
            per_run = np.empty(len(self.runs), dtype=object)
            per_run[:] = self.runs.columns[column]
            out[column] = per_run[codes]
        dimensions = self._dimension_columns(leaves)
        self._refuse_names_that_are_dimensions(dimensions)
        out.update(dimensions)
        out.update(self._value_columns(leaves))
        return out

    def _refuse_names_that_are_dimensions(self, dimensions: dict[str, Any]) -> None:
        """A requested value named like a loop dimension of other runs (script A loops over
        ``epoch``, script B logs ``epoch``) would overwrite that column: refuse, naming both."""
        for name in self.names:
            if name not in dimensions:
                continue
            loop_name = name[: -len("_value")] if name not in self.loops.names else name
            d = self.loops.names.index(loop_name)
            filenames = self.runs.columns["filename"]
            looping = sorted({str(filenames[c]) for c in unique(self.loops.code[self.loops.name == d]).tolist()})
            logging = sorted({str(filenames[c]) for c in unique(self.logs.code[self.logs.name == self.names.index(name)]).tolist()})
            raise QueryError(
                f"'{name}' is a loop dimension in runs of {', '.join(looping)} (flor.loop) and a logged value in "
                f"runs of {', '.join(logging)} (flor.log), so one frame cannot show both. Ask for them apart, e.g. "
                f"flor.dataframe('{name}', where=\"filename = '{logging[0]}'\"), or rename one of them."
            )

    def _leaves(self) -> np.ndarray:
        """Positions holding a requested value with no such position below them."""
        involved = unique(self.log_pos)
        has_involved_child = np.zeros(len(self.parent), dtype=bool)
        frontier = self.parent[involved]
        while True:
            frontier = unique(frontier[frontier >= 0])
            frontier = frontier[~has_involved_child[frontier]]
            if frontier.size == 0:
                break
            has_involved_child[frontier] = True
            frontier = self.parent[frontier]
        return involved[~has_involved_child[involved]]

    def _ancestry(self, leaves: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each level going up: (row indexes, loop positions) of the leaves' loop ancestors."""
        levels: list[tuple[np.ndarray, np.ndarray]] = []
        rows = np.arange(len(leaves))
        cur = leaves
        while True:
            is_loop = (cur >= 0) & (cur < self.n_loops)
            rows, cur = rows[is_loop], cur[is_loop]
            if rows.size == 0:
                return levels
            levels.append((rows, cur))
            cur = self.parent[cur]

    def _dimension_columns(self, leaves: np.ndarray) -> dict[str, Any]:
        n_dims = len(self.loops.names)
        if n_dims == 0:
            return {}
        iters = np.full((n_dims, len(leaves)), -1, dtype=np.int64)
        # Loop values (document names) only for the loops that have any: most have none.
        values = {d: np.full(len(leaves), None, dtype=object) for d in np.nonzero(self._has_values)[0].tolist()}
        depth_sum = np.zeros(n_dims)
        depth_count = np.zeros(n_dims)
        # Walk up from each leaf; the nearest context of a loop name wins.
        for depth_up, (rows, cur) in enumerate(self._ancestry(leaves)):
            dims = self.loops.name[cur]
            unset = iters[dims, rows] < 0
            dims, rows, cur = dims[unset], rows[unset], cur[unset]
            iters[dims, rows] = self.loops.iteration[cur]
            for d, column in values.items():
                mine = dims == d
                column[rows[mine]] = self.loops.value[cur[mine]]
            counts = np.bincount(dims, minlength=n_dims)
            depth_sum -= depth_up * counts
            depth_count += counts
        # Outermost loops first: a loop seen further up from the leaves sorts earlier.
        mean_depth = depth_sum / np.maximum(depth_count, 1)
        order = sorted(range(n_dims), key=lambda d: (float(mean_depth[d]), d))
        out: dict[str, Any] = {}
        for d in order:
            name = self.loops.names[d]
            out[name] = iters[d]
            if d in values and (values[d] != None).any():  # noqa: E711 - elementwise
                out[name + "_value"] = values[d]
        return out

    def _value_columns(self, leaves: np.ndarray) -> dict[str, Any]:
        logs = self.logs
        size = len(self.parent)
        out: dict[str, Any] = {}
        for code, name in enumerate(self.names):
            # Replayed rows first, recorded rows last: the last row per position wins, so a
            # value both recorded and replayed shows what was recorded.
            rows = np.nonzero(logs.name == code)[0]
            if rows.size == 0:  # an unknown name: an all-null column
                out[name] = np.full(len(leaves), None, dtype=object)
                continue
            rows = rows[np.argsort(~logs.replay[rows], kind="stable")]
            order = np.argsort(self.log_pos[rows], kind="stable")  # logs are nearly sorted already
            sorted_pos = self.log_pos[rows][order]
            is_last = np.append(sorted_pos[1:] != sorted_pos[:-1], True)
            last_first = sorted_pos[is_last]
            chosen = rows[order[is_last]]  # the last row logged at each position
            has = np.zeros(size, dtype=bool)
            vals = np.full(size, None, dtype=object)
            has[last_first] = True
            vals[last_first] = logs.value[chosen]
            kinds = logs.kind[chosen]
            encoded = kinds != ValueKind.NATIVE
            for pos, kind in zip(last_first[encoded].tolist(), kinds[encoded].tolist(), strict=True):
                vals[pos] = decode_value(vals[pos], kind)
            # Each leaf takes the value at itself or its nearest ancestor that has one.
            result = np.full(len(leaves), None, dtype=object)
            rows_left = np.arange(len(leaves))
            cur = leaves
            while rows_left.size:
                hit = has[cur]
                result[rows_left[hit]] = vals[cur[hit]]
                rows_left, cur = rows_left[~hit], self.parent[cur[~hit]]
                alive = cur >= 0
                rows_left, cur = rows_left[alive], cur[alive]
            out[name] = result
        return out


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
