"""``flor.dataframe``'s pivot over loop *blocks*: numpy whose per-row work is a few vector passes.

A loop block (store.coalesce_loops) is a run of consecutive iterations of one loop under one
parent: 200k steps of an epoch are one block. Every context of a block shares its parent, so all
the walking up the loop tree (which rows are leaves, which loops enclose a row, which ancestor
holds a value that repeats on the rows below it) runs over *distinct blocks*, a few dozen, and the
result is broadcast to the rows with one gather. The rows themselves are only located in their
block (one ``searchsorted`` over nearly sorted keys) and gathered into typed columns; plain floats
and ints stay float64/int64 from ``np.frombuffer`` of the packed copy to the frame.

The rules are those of the per-context pivot this replaced (pivot.py's ContextPivot before issue 14;
tests/test_dataframe_contract.py holds the frames to the ones it gave): a row is a context holding a requested value with none below it; each
name takes the value at that context or its nearest ancestor, the last logged winning, recorded
over replayed; rows go by run (tstamp), then loop level in the order the levels were read (fewest
contexts first), then context; loops are ordered outermost first by their mean depth above rows.

Keys: ``(run code << 32) | ctx_id`` is one int64 per context; ``ctx_id`` 0 is the run level.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pandas as pd

from .errors import QueryError
from .pivot import typed_series
from .runtable import RUN_COLUMNS, RunTable
from .values import ValueKind, decode_value

#: ``(run codes, dimension columns, frame column names) -> kept row positions or None`` (query.py).
RowFilter = Callable[[np.ndarray, dict[str, np.ndarray], list[str]], "np.ndarray | None"]

SHIFT = 32
_LOW = (1 << SHIFT) - 1
_MAX_DEPTH = 10_000  # nesting deeper than any script's loops: a guard against a malformed store


@dataclass(frozen=True)
class ContextBlocks:
    """The loop blocks a frame reads, sorted by ``key``; ``name`` and ``rank`` index per-run loop levels."""

    names: list[str]  # loop names in the order levels were first read (dimension candidates)
    key: np.ndarray  # (code << 32) | first ctx of the block
    count: np.ndarray
    parent: np.ndarray  # the parent ctx (0: the run level)
    iteration: np.ndarray
    name: np.ndarray  # index into names
    rank: np.ndarray  # the position of the block's level in its run's read order
    value: np.ndarray  # object: the loop value of a one-context block, else None

    def find(self, keys: np.ndarray) -> np.ndarray:
        """The block holding each context key; -1 for run-level and unknown contexts."""
        if self.key.size == 0:
            return np.full(len(keys), -1, dtype=np.int64)
        if keys.size > 4 * self.key.size and _is_sorted(keys):
            return self._find_sorted(keys)
        at = np.searchsorted(self.key, keys, side="right") - 1
        safe = np.maximum(at, 0)
        inside = (at >= 0) & ((keys & _LOW) != 0) & (keys < self.key[safe] + self.count[safe])
        return np.where(inside, at, -1)


    def _find_sorted(self, keys: np.ndarray) -> np.ndarray:
        """:meth:`find` for sorted keys: each block's range of keys by two binary searches per
        block, marked with one cumulative sum, instead of a binary search per key."""
        lo = np.searchsorted(keys, self.key)
        hi = np.searchsorted(keys, self.key + self.count)
        label = np.arange(1, self.key.size + 1, dtype=np.int64)
        marks = np.zeros(keys.size + 1, dtype=np.int64)
        np.add.at(marks, lo, label)
        np.add.at(marks, hi, -label)
        return np.cumsum(marks[:-1]) - 1


@dataclass(frozen=True)
class NameRows:
    """The log rows of one requested name over all runs; of rows with one key, the last wins."""

    key: np.ndarray  # (code << 32) | ctx as logged
    values: np.ndarray  # float64 / int64 when every row is a packed plain number, else object
    kind: np.ndarray | None  # ValueKind per row; None when every value is native


# -- the frame's reads, over any store ----------------------------------------------------------

#: ``(ctx ids, values, kinds)`` of some rows of one name in one run: int64 ctx ids; float64 / int64
#: values (a packed copy's plain numbers, ``kinds`` None) or objects as stored, ``kinds`` per row.
ValuePart = tuple[np.ndarray, np.ndarray, np.ndarray | None]


class FrameSource(Protocol):
    """What a store answers for a frame (local: localframe.py; the team store: team/_fetch.py)."""

    def value_parts(self, run_ids: list[str], names: list[str]) -> Iterator[list[list[ValuePart]]]:
        """Per run of ``run_ids`` in order, per name: its value parts, the replayed rows before the
        recorded ones, each part in the order logged (so that of rows at one context the recorded wins)."""
        ...

    def loop_blocks(self, run_id: str) -> list[tuple[Any, ...]]:
        """The run's loop blocks as ``(name, ctx_id, parent_ctx, iteration, count, value)``, any order."""
        ...


def read_frame_inputs(source: FrameSource, run_ids: list[str], names: list[str]) -> tuple[ContextBlocks, list[NameRows]]:
    """The loop blocks and the per-name rows of ``dataframe(*names)`` over ``run_ids``.

    Per run and name: replayed rows, then recorded ones, so that the recorded value wins. Per run,
    loop levels are taken fewest contexts first until every context the rows name, and each of its
    ancestors, is held (all levels when some context is unknown), as the per-context pivot read them.
    The same for every store: only the reads come from ``source``.
    """
    parts: list[tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray | None]]] = [([], [], []) for _ in names]
    loop_names: dict[str, int] = {}
    block_parts: list[tuple[int, list[tuple[Any, ...]], dict[str, int]]] = []
    for code, (run_id, per_name) in enumerate(zip(run_ids, source.value_parts(run_ids, names), strict=True)):
        base = np.int64(code << SHIFT)
        run_keys: list[np.ndarray] = []
        for (keys, values, kinds), name_parts in zip(parts, per_name, strict=True):
            for ctx, value, kind in name_parts:
                if ctx.size:
                    keys.append(ctx | base)
                    values.append(value)
                    kinds.append(kind)
                    run_keys.append(keys[-1])
        wanted = run_keys[0] if len(run_keys) == 1 else np.concatenate(run_keys) if run_keys else np.empty(0, dtype=np.int64)
        if wanted.size and not int(wanted.min()) & _LOW:  # run-level rows (ctx 0) are no loop's
            wanted = wanted[(wanted & _LOW) != 0]
        if wanted.size:
            _add_levels(source.loop_blocks(run_id), code, wanted, loop_names, block_parts)
    return _blocks_of(block_parts, loop_names), [_name_rows(*p) for p in parts]


def _add_levels(
    blocks: list[tuple[Any, ...]], code: int, wanted: np.ndarray, loop_names: dict[str, int],
    block_parts: list[tuple[int, list[tuple[Any, ...]], dict[str, int]]],
) -> None:
    """Add the ``blocks`` of the loop levels run ``code`` needs for its ``wanted`` context keys."""
    if not blocks:
        return
    sizes: dict[str, int] = {}
    for b in blocks:
        sizes[b[0]] = sizes.get(b[0], 0) + b[4]
    order = sorted(sizes, key=lambda n: (sizes[n], n))
    ranks = {n: i for i, n in enumerate(order)}
    kept_levels = order[: _levels_needed(code, blocks, ranks, wanted) + 1]
    for level in kept_levels:
        loop_names.setdefault(level, len(loop_names))
    kept = set(kept_levels)
    block_parts.append((code, [b for b in blocks if b[0] in kept], ranks))


def _name_rows(keys: list[np.ndarray], values: list[np.ndarray], kinds: list[np.ndarray | None]) -> NameRows:
    if not keys:
        return NameRows(np.empty(0, dtype=np.int64), np.empty(0, dtype=object), None)
    dtypes = {v.dtype for v in values}
    if len(dtypes) == 1:
        joined = np.concatenate(values)
    else:  # packed floats of one run, ints or rows of another: Python objects, as logged
        joined = np.concatenate([v.astype(object) for v in values])
    kind = None
    if any(k is not None and k.any() for k in kinds):
        kind = np.concatenate([np.zeros(len(v), dtype=np.int64) if k is None else k for v, k in zip(values, kinds, strict=True)])
    return NameRows(np.concatenate(keys), joined, kind)


def _is_sorted(values: np.ndarray) -> bool:
    return values.size < 2 or bool(np.all(values[1:] >= values[:-1]))


def _levels_needed(code: int, blocks: list[tuple[Any, ...]], ranks: dict[str, int], wanted: np.ndarray) -> int:
    """The highest level rank a frame must read for the ``wanted`` contexts of one run."""
    one = _blocks_of([(code, blocks, ranks)], {n: i for i, n in enumerate(ranks)})
    if _is_sorted(wanted):  # the bulk: each block's stretch of keys by two binary searches per block
        held = np.searchsorted(wanted, one.key + one.count) - np.searchsorted(wanted, one.key)
        if int(held.sum()) < wanted.size:
            return len(ranks) - 1  # an unknown context: every level is read, it stays at run level
        needed = np.flatnonzero(held)
    else:
        found = one.find(wanted)
        if (found < 0).any():
            return len(ranks) - 1
        needed = _segment_values(found)
    levels = set(one.rank[needed].tolist())
    frontier = needed
    for _ in range(_MAX_DEPTH):
        parents = one.parent[frontier]
        parents = np.unique(parents[parents != 0])
        if parents.size == 0:
            break
        up = one.find(parents | np.int64(code << SHIFT))
        if (up < 0).any():
            return len(ranks) - 1  # an unknown ancestor
        levels.update(one.rank[up].tolist())
        frontier = np.unique(up)
    return max(levels)


def _blocks_of(parts: list[tuple[int, list[tuple[Any, ...]], dict[str, int]]], loop_names: dict[str, int]) -> ContextBlocks:
    """ContextBlocks from ``(code, loops rows (name, ctx, parent, iteration, count, value), level ranks)``."""
    n = sum(len(b) for _c, b, _r in parts)
    key = np.empty(n, dtype=np.int64)
    count = np.empty(n, dtype=np.int64)
    parent = np.empty(n, dtype=np.int64)
    iteration = np.empty(n, dtype=np.int64)
    name = np.empty(n, dtype=np.int64)
    rank = np.empty(n, dtype=np.int64)
    value = np.empty(n, dtype=object)
    i = 0
    for code, blocks, ranks in parts:
        base = code << SHIFT
        for level, ctx, parent_ctx, it, cnt, val in blocks:
            key[i], count[i], parent[i], iteration[i] = base | ctx, cnt, parent_ctx, it
            name[i], rank[i], value[i] = loop_names[level], ranks[level], val
            i += 1
    order = np.argsort(key, kind="stable")
    return ContextBlocks(
        list(loop_names), key[order], count[order], parent[order], iteration[order], name[order], rank[order],
        value[order],
    )


# -- the pivot -----------------------------------------------------------------------------------


class BlockPivot:
    """Turns loop blocks and per-name log rows into dataframe columns (see the module docstring)."""

    def __init__(self, runs: RunTable, names: list[str], blocks: ContextBlocks, rows: list[NameRows]) -> None:
        self.runs = runs
        self.names = names
        self.blocks = blocks
        self.rows = rows
        self.filtered = False  # True once columns() applied its row_filter
        b = blocks
        parent_key = (b.key >> SHIFT << SHIFT) | b.parent
        #: the block holding each block's parent context; -1 at the run level (or an unknown parent)
        self.up = np.where(b.parent == 0, -1, b.find(parent_key))
        self.parent_key = np.where(self.up < 0, b.key >> SHIFT << SHIFT, parent_key)

    def columns(self, row_filter: RowFilter | None = None) -> dict[str, Any]:
        """Frame columns in order: run columns, loop dimensions, names (arrays or typed Series).

        :param row_filter: given each row's run code, the loop dimension columns and the frame's
            column names, the positions of the rows to keep, or None when it cannot tell from
            those (then :attr:`filtered` stays False and the caller filters the frame).
        """
        chosen = [self._last_per_context(r) for r in self.rows]
        present = [c for c in chosen if c[0].size]
        if not present:
            return {c: np.empty(0, dtype=object) for c in [*RUN_COLUMNS, *self.names]}
        if len(present) == 1:
            involved, block = present[0][0], present[0][3]
        else:
            involved = np.unique(np.concatenate([c[0] for c in present]))
            block = self.blocks.find(involved)
        leaves, leaf_block = self._leaves(involved, block)
        codes = leaves >> SHIFT
        dimensions = self._dimension_columns(leaves, leaf_block)
        self._refuse_names_that_are_dimensions(dimensions)
        order = self._row_order(codes, leaf_block)
        if order is not None:
            leaves, leaf_block, codes = leaves[order], leaf_block[order], codes[order]
            dimensions = {k: _take(v, order) for k, v in dimensions.items()}
        keep = None
        if row_filter is not None:
            # A where= over run and loop columns, evaluated per distinct combination of them.
            keep = row_filter(codes, dimensions, [*RUN_COLUMNS, *dimensions, *self.names])
            self.filtered = keep is not None
        out: dict[str, Any] = self._run_columns(codes if keep is None else codes[keep])
        out.update(dimensions)
        for name, c in zip(self.names, chosen, strict=True):
            if name in dimensions and not c[0].size:
                continue  # a loop name no run logs: the frame's dimension column is what was asked for
            out[name] = self._value_column(name, c[:3], leaves, leaf_block)
        if keep is None:
            return out
        # The other columns are typed over every row first: a column's dtype is the unfiltered frame's.
        return {k: v if k in RUN_COLUMNS else _take(typed_series(k, v), keep) for k, v in out.items()}

    def _last_per_context(self, rows: NameRows) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
        """``(sorted unique keys, their winning values, kinds, blocks)``; unknown contexts count as run level."""
        key = rows.key
        if key.size == 0:
            return key, rows.values, rows.kind, key
        at = self.blocks.find(key)
        unknown = (at < 0) & ((key & _LOW) != 0)
        if unknown.any():
            key = np.where(unknown, key >> SHIFT << SHIFT, key)
        if key.size < 2 or bool(np.all(key[1:] > key[:-1])):  # one value per context, in order: the bulk
            return key, rows.values, rows.kind, at
        order = np.argsort(key, kind="stable")
        key = key[order]
        last = np.append(key[1:] != key[:-1], True)
        chosen = order[last]
        return key[last], rows.values[chosen], None if rows.kind is None else rows.kind[chosen], at[chosen]

    def _leaves(self, involved: np.ndarray, block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Involved keys with no involved context below them, and the block of each (-1: run level)."""
        distinct = _segment_values(block)
        distinct = distinct[distinct >= 0]
        # Every context above an involved one: per distinct block, its chain of parents.
        above: list[np.ndarray] = [np.unique(self.blocks.key[distinct] >> SHIFT << SHIFT)]  # the runs' levels
        frontier = distinct
        for _ in range(_MAX_DEPTH):
            if frontier.size == 0:
                break
            has_parent = self.up[frontier] >= 0
            above.append(self.parent_key[frontier[has_parent]])
            frontier = np.unique(self.up[frontier[has_parent]])
        ancestors = np.unique(np.concatenate(above))
        at = np.minimum(np.searchsorted(involved, ancestors), involved.size - 1)
        hit = at[involved[at] == ancestors]
        if hit.size == 0:
            return involved, block
        keep = np.ones(involved.size, dtype=bool)
        keep[hit] = False
        return involved[keep], block[keep]

    def _row_order(self, codes: np.ndarray, leaf_block: np.ndarray) -> np.ndarray | None:
        """The order of the rows (by run, level rank, context, run level last); None when it is the keys' order."""
        if self.blocks.rank.size == 0:
            return None  # no loops: the rows are the runs' levels, in run order
        # Decided over stretches of rows in one block (a few dozen), sorted over rows only if needed.
        starts = np.flatnonzero(np.append(True, leaf_block[1:] != leaf_block[:-1]))
        segment = leaf_block[starts]
        segment_rank = np.where(segment >= 0, self.blocks.rank[np.maximum(segment, 0)], _MAX_DEPTH)
        if _is_sorted(codes[starts] * (_MAX_DEPTH + 1) + segment_rank):
            return None
        rank = np.where(leaf_block >= 0, self.blocks.rank[np.maximum(leaf_block, 0)], _MAX_DEPTH)
        return np.lexsort((np.arange(len(codes)), rank, codes))

    def _run_columns(self, codes: np.ndarray) -> dict[str, Any]:
        out: dict[str, Any] = {}
        # The rows come by run (codes sorted): each run's slice is filled with its one value.
        bounds = np.searchsorted(codes, np.arange(len(self.runs) + 1)).tolist()
        for column in RUN_COLUMNS:
            per_run = np.empty(len(self.runs), dtype=object)
            per_run[:] = self.runs.columns[column]
            if column == "tstamp":
                out[column] = pd.to_datetime(per_run, format="ISO8601").take(codes)
                continue
            filled = np.empty(len(codes), dtype=object)
            for code, value in enumerate(per_run.tolist()):
                if bounds[code + 1] > bounds[code]:
                    filled[bounds[code] : bounds[code + 1]] = value
            out[column] = filled
        return out

    def _dimension_columns(self, leaves: np.ndarray, leaf_block: np.ndarray) -> dict[str, Any]:
        b = self.blocks
        n_dims = len(b.names)
        if n_dims == 0:
            return {}
        in_loop = leaf_block >= 0
        rows = np.nonzero(in_loop)[0] if not in_loop.all() else None
        own = leaf_block[in_loop] if rows is not None else leaf_block
        own_keys = leaves[in_loop] if rows is not None else leaves
        distinct, lengths = _run_lengths(own)
        weights = lengths.astype(np.float64)
        own_name = b.name[distinct]
        depth_sum = np.zeros(n_dims)
        depth_count = np.bincount(own_name, weights=weights, minlength=n_dims)
        has_values = np.zeros(n_dims, dtype=bool)
        with_value = b.value != None  # noqa: E711 - elementwise
        has_values[np.unique(b.name[with_value])] = True
        # Per distinct block: the nearest ancestor context of each loop name (iteration, value).
        above_iter = np.full((n_dims, len(distinct)), -1, dtype=np.int64)
        above_value = {d: _nones(len(distinct)) for d in np.nonzero(has_values)[0].tolist()}
        cols = np.arange(len(distinct))
        cur_key, cur_up = self.parent_key[distinct], self.up[distinct]
        for depth in range(1, _MAX_DEPTH):
            known = cur_up >= 0
            cols, cur_key, cur_up = cols[known], cur_key[known], cur_up[known]
            if cols.size == 0:
                break
            names = b.name[cur_up]
            unset = (above_iter[names, cols] < 0) & (names != own_name[cols])
            c, u, k, d = cols[unset], cur_up[unset], cur_key[unset], names[unset]
            above_iter[d, c] = b.iteration[u] + (k - b.key[u])
            for dim, column in above_value.items():
                mine = d == dim
                column[c[mine]] = b.value[u[mine]]
            np.add.at(depth_sum, d, -depth * weights[c])
            np.add.at(depth_count, d, weights[c])
            cur_key, cur_up = self.parent_key[cur_up], self.up[cur_up]
        mean_depth = depth_sum / np.maximum(depth_count, 1)
        order = sorted(range(n_dims), key=lambda d: (float(mean_depth[d]), d))
        own_iter = own_keys - np.repeat(b.key[distinct] - b.iteration[distinct], lengths)
        single_name = own_name.size > 0 and bool(np.all(own_name == own_name[0]))
        own_is = np.repeat(own_name, lengths)[: 0 if single_name else None]  # empty where not needed
        out: dict[str, Any] = {}
        for d in order:
            if single_name and own_name[0] == d:
                column = own_iter
            elif single_name or own.size == 0:
                column = np.repeat(above_iter[d], lengths)
            else:
                column = np.where(own_is == d, own_iter, np.repeat(above_iter[d], lengths))
            out[b.names[d]] = _spread(column, rows, len(leaves), -1)
            if d in above_value:
                own_value = b.value[own]
                own_d = np.repeat(own_name == d, lengths)
                values = np.where(own_d, own_value, np.repeat(above_value[d], lengths))
                full = _spread(values, rows, len(leaves), None)
                if (full != None).any():  # noqa: E711 - elementwise
                    out[b.names[d] + "_value"] = full
        return out

    def _refuse_names_that_are_dimensions(self, dimensions: dict[str, Any]) -> None:
        """A requested value named like a loop dimension of other runs (script A loops over
        ``epoch``, script B logs ``epoch``) would overwrite that column: refuse, naming both."""
        for code, name in enumerate(self.names):
            if name not in dimensions or not self.rows[code].key.size:
                continue  # not a dimension, or only one: no run logs it (see columns())
            loop_name = name[: -len("_value")] if name not in self.blocks.names else name
            d = self.blocks.names.index(loop_name)
            filenames = self.runs.columns["filename"]
            loop_runs = np.unique(self.blocks.key[self.blocks.name == d] >> SHIFT).tolist()
            log_runs = np.unique(self.rows[code].key >> SHIFT).tolist()
            looping = sorted({str(filenames[c]) for c in loop_runs})
            logging = sorted({str(filenames[c]) for c in log_runs})
            raise QueryError(
                f"'{name}' is a loop dimension in runs of {', '.join(looping)} (flor.loop) and a logged value in "
                f"runs of {', '.join(logging)} (flor.log), so one frame cannot show both. Ask for them apart, e.g. "
                f"flor.dataframe('{name}', where=\"filename = '{logging[0]}'\"), or rename one of them."
            )

    def _value_column(
        self, name: str, chosen: tuple[np.ndarray, np.ndarray, np.ndarray | None], leaves: np.ndarray,
        leaf_block: np.ndarray,
    ) -> Any:
        keys, values, kinds = chosen
        if keys.size == 0:  # an unknown name: an all-null column
            return _nones(len(leaves))
        if kinds is not None and (kinds != ValueKind.NATIVE).any():
            values = values.astype(object)
            for i in np.nonzero(kinds != ValueKind.NATIVE)[0].tolist():
                values[i] = decode_value(values[i], int(kinds[i]))
        index = np.arange(keys.size) if keys.size == leaves.size and np.array_equal(keys, leaves) else _find(keys, leaves)
        missing = index < 0
        if missing.any():
            # Each leaf without its own value takes its nearest ancestor's: per distinct block.
            rows = np.nonzero(missing & (leaf_block >= 0))[0]
            distinct, inverse = _runs_of(leaf_block[rows])
            found = np.full(len(distinct), -1, dtype=np.int64)
            cols = np.arange(len(distinct))
            cur_key, cur_up = self.parent_key[distinct], self.up[distinct]
            for _ in range(_MAX_DEPTH):
                if cols.size == 0:
                    break
                at = _find(keys, cur_key)
                hit = at >= 0
                found[cols[hit]] = at[hit]
                go_on = ~hit & (cur_key & _LOW != 0)
                cols, cur_up = cols[go_on], cur_up[go_on]
                cur_key = np.where(cur_up >= 0, self.parent_key[np.maximum(cur_up, 0)], cur_key[go_on] >> SHIFT << SHIFT)
                cur_up = np.where(cur_up >= 0, self.up[np.maximum(cur_up, 0)], -1)
            index[rows] = found[inverse]
            missing = index < 0
        return _typed_values(name, values, index, missing)


def _typed_values(name: str, values: np.ndarray, index: np.ndarray, missing: np.ndarray) -> Any:
    """The column ``values[index]`` (None where missing) with the dtype typed_series gives its objects."""
    any_missing = bool(missing.any())
    taken = values[np.where(missing, 0, index)] if any_missing else values[index]
    if values.dtype.kind == "f":
        if any_missing:
            taken[missing] = np.nan
        if not np.isnan(taken).all():  # all-NaN objects infer as "empty": an object column, below
            return pd.Series(taken, name=name, copy=False)
    elif values.dtype.kind == "i":
        if any_missing:
            if missing.all():
                return _nones(len(index))
            return pd.Series(pd.arrays.IntegerArray(np.where(missing, 0, taken), missing), name=name)
        return pd.Series(taken, name=name, copy=False)
    objects = taken.astype(object) if taken.dtype != object else taken
    if any_missing:
        objects[missing] = None
    return typed_series(name, objects)


def _find(keys: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Position of each of ``wanted`` in the sorted ``keys``; -1 where absent."""
    if keys.size == 0:
        return np.full(len(wanted), -1, dtype=np.int64)
    at = np.minimum(np.searchsorted(keys, wanted), keys.size - 1)
    return np.where(keys[at] == wanted, at, -1)


def _runs_of(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(values, return_inverse=True)`` for non-decreasing ``values``, in one pass."""
    if values.size == 0:
        return values, values
    starts = np.append(True, values[1:] != values[:-1])
    return values[starts], np.cumsum(starts) - 1


def _run_lengths(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct values of non-decreasing ``values`` and how many times each repeats."""
    if values.size == 0:
        return values, values
    starts = np.flatnonzero(np.append(True, values[1:] != values[:-1]))
    return values[starts], np.diff(np.append(starts, values.size))


def _nones(n: int) -> np.ndarray:
    """An object array of ``n`` Nones (``np.empty`` fills objects with None, many times faster than ``np.full``)."""
    return np.empty(n, dtype=object)


def _segment_values(values: np.ndarray) -> np.ndarray:
    """The distinct values of ``values``, found over its stretches of equal values (few, here)."""
    if values.size == 0:
        return values
    return np.unique(values[np.append(True, values[1:] != values[:-1])])


def _spread(column: np.ndarray, rows: np.ndarray | None, n: int, fill: Any) -> np.ndarray:
    """``column`` (one entry per in-loop row) placed at ``rows`` of an ``n``-row column of ``fill``."""
    if rows is None:
        return column
    full = _nones(n) if fill is None else np.full(n, fill, dtype=column.dtype)
    full[rows] = column
    return full


def _take(column: Any, order: np.ndarray) -> Any:
    if isinstance(column, pd.Series):
        return pd.Series(column.array.take(order), name=column.name, dtype=column.dtype)
    return column.take(order) if hasattr(column, "take") else column[order]
