"""The numpy half of ``flor.dataframe``: loop-context rows + log rows -> frame columns.

Kept apart from ``query.py`` so numpy and pandas load only when a frame is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .values import ValueKind, decode_value

if TYPE_CHECKING:
    from .query import RunTable

RUN_COLUMNS = ("projid", "run_id", "tstamp", "task", "filename")
_CTX_SHIFT = 32


class ContextPivot:
    """Turns loop-context rows and log rows into dataframe columns (numpy over positions).

    Positions ``0..N-1`` are loop contexts; ``N + r`` is the root (run level) of run ``r``.
    """

    def __init__(
        self,
        runs: RunTable,
        names: list[str],
        loop_rows: list[tuple[Any, ...]],
        log_rows: list[tuple[Any, ...]],
    ) -> None:
        self.runs = runs
        self.names = names
        run_code = {run_id: i for i, run_id in enumerate(runs.run_ids)}
        self.n_loops = n = len(loop_rows)
        n_runs = len(runs)
        # Loop contexts.
        l_code = np.fromiter((run_code.get(r[0], -1) for r in loop_rows), dtype=np.int64, count=n)
        l_ctx = np.fromiter((r[1] for r in loop_rows), dtype=np.int64, count=n)
        l_parent = np.fromiter((r[2] for r in loop_rows), dtype=np.int64, count=n)
        self.loop_names = list(dict.fromkeys(r[3] for r in loop_rows))
        name_code = {name: i for i, name in enumerate(self.loop_names)}
        self.l_name = np.fromiter((name_code[r[3]] for r in loop_rows), dtype=np.int64, count=n)
        self.l_iter = np.fromiter((r[4] for r in loop_rows), dtype=np.int64, count=n)
        self.l_value = np.array([r[5] for r in loop_rows], dtype=object)
        index = _position_index(l_code, l_ctx)
        parent_pos = index.get_indexer(pd.Index((l_code << _CTX_SHIFT) | l_parent))
        roots = n + np.maximum(l_code, 0)
        parent_pos = np.where((l_parent == 0) | (parent_pos < 0), roots, parent_pos)
        self.parent = np.concatenate([parent_pos, np.full(n_runs, -1, dtype=np.int64)])
        self.pos_code = np.concatenate([l_code, np.arange(n_runs, dtype=np.int64)])
        # Log rows as parallel arrays.
        m = len(log_rows)
        g_code = np.fromiter((run_code.get(r[0], -1) for r in log_rows), dtype=np.int64, count=m)
        g_ctx = np.fromiter((r[1] for r in log_rows), dtype=np.int64, count=m)
        g_pos = index.get_indexer(pd.Index((g_code << _CTX_SHIFT) | g_ctx))
        self.g_pos = np.where((g_ctx == 0) | (g_pos < 0), n + g_code, g_pos)
        wanted = {name: i for i, name in enumerate(names)}
        self.g_name = np.fromiter((wanted[r[2]] for r in log_rows), dtype=np.int64, count=m)
        self.g_value = np.empty(m, dtype=object)
        self.g_value[:] = [r[3] for r in log_rows]
        self.g_kind = np.fromiter((r[4] for r in log_rows), dtype=np.int64, count=m)
        self.g_replay = np.fromiter((r[5] for r in log_rows), dtype=bool, count=m)
        valid = g_code >= 0  # rows of runs outside the selection (when runs were filtered)
        if not valid.all():
            for attr in ("g_pos", "g_name", "g_value", "g_kind", "g_replay"):
                setattr(self, attr, getattr(self, attr)[valid])

    def columns(self) -> dict[str, list[Any]]:
        if self.g_pos.size == 0:
            return {c: [] for c in [*RUN_COLUMNS, *self.names]}
        leaves = self._leaves()
        order = np.lexsort((leaves, self.pos_code[leaves]))
        leaves = leaves[order]
        out: dict[str, list[Any]] = {}
        codes = self.pos_code[leaves]
        for column in RUN_COLUMNS:
            values = self.runs.columns[column]
            out[column] = [values[c] for c in codes]
        out.update(self._dimension_columns(leaves))
        out.update(self._value_columns(leaves))
        return out

    def _leaves(self) -> np.ndarray:
        """Positions holding a requested value with no such position below them."""
        involved = np.unique(self.g_pos)
        has_involved_child = np.zeros(len(self.parent), dtype=bool)
        frontier = self.parent[involved]
        while True:
            frontier = np.unique(frontier[frontier >= 0])
            frontier = frontier[~has_involved_child[frontier]]
            if frontier.size == 0:
                break
            has_involved_child[frontier] = True
            frontier = self.parent[frontier]
        return involved[~has_involved_child[involved]]

    def _ancestry(self, leaves: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each level going up: (row indexes, loop positions) of leaves' loop ancestors."""
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

    def _dimension_columns(self, leaves: np.ndarray) -> dict[str, list[Any]]:
        n_dims = len(self.loop_names)
        if n_dims == 0:
            return {}
        iters = np.full((n_dims, len(leaves)), -1, dtype=np.int64)
        values = np.full((n_dims, len(leaves)), None, dtype=object)
        depth_sum = np.zeros(n_dims)
        depth_count = np.zeros(n_dims)
        # Walk up: the nearest ancestor of a name wins (rows already set keep their value).
        for rows, cur in self._ancestry(leaves):
            dims = self.l_name[cur]
            unset = iters[dims, rows] < 0
            iters[dims[unset], rows[unset]] = self.l_iter[cur[unset]]
            values[dims[unset], rows[unset]] = self.l_value[cur[unset]]
        # Order loop dimensions outermost first: by the mean depth at which they occur.
        depth = self._depths()
        for d in range(n_dims):
            mask = self.l_name == d
            depth_sum[d] = depth[: self.n_loops][mask].sum()
            depth_count[d] = max(mask.sum(), 1)
        order = sorted(range(n_dims), key=lambda d: (depth_sum[d] / depth_count[d], d))
        out: dict[str, list[Any]] = {}
        for d in order:
            name = self.loop_names[d]
            column = iters[d]
            out[name] = [int(i) if i >= 0 else None for i in column.tolist()]
            if any(v is not None for v in values[d]):
                out[name + "_value"] = values[d].tolist()
        return out

    def _depths(self) -> np.ndarray:
        depth = np.zeros(len(self.parent), dtype=np.int64)
        cur = self.parent.copy()
        alive = np.arange(len(self.parent))
        while True:
            keep = (cur[alive] >= 0) & (cur[alive] < self.n_loops)
            alive = alive[keep]
            if alive.size == 0:
                return depth
            depth[alive] += 1
            cur[alive] = self.parent[cur[alive]]

    def _value_columns(self, leaves: np.ndarray) -> dict[str, list[Any]]:
        size = len(self.parent)
        out: dict[str, list[Any]] = {}
        for code, name in enumerate(self.names):
            # Replayed rows first, recorded rows last: the last row per position wins, so a
            # value both recorded and replayed shows what was recorded.
            rows = np.nonzero(self.g_name == code)[0]
            rows = rows[np.argsort(~self.g_replay[rows], kind="stable")]
            last_first, first = np.unique(self.g_pos[rows][::-1], return_index=True)
            chosen = rows[::-1][first]  # the last row logged at each position
            has = np.zeros(size, dtype=bool)
            vals = np.full(size, None, dtype=object)
            has[last_first] = True
            vals[last_first] = self.g_value[chosen]
            kinds = self.g_kind[chosen]
            encoded = kinds != ValueKind.NATIVE
            for pos, kind in zip(last_first[encoded].tolist(), kinds[encoded].tolist(), strict=True):
                vals[pos] = decode_value(vals[pos], kind)
            result = np.full(len(leaves), None, dtype=object)
            rows_left = np.arange(len(leaves))
            cur = leaves
            while rows_left.size:
                hit = has[cur]
                result[rows_left[hit]] = vals[cur[hit]]
                rows_left, cur = rows_left[~hit], self.parent[cur[~hit]]
                alive = cur >= 0
                rows_left, cur = rows_left[alive], cur[alive]
            out[name] = result.tolist()
        return out


def _position_index(codes: np.ndarray, ctxs: np.ndarray) -> pd.Index:
    return pd.Index((codes << _CTX_SHIFT) | ctxs)


def typed_series(name: str, values: list[Any]) -> pd.Series:
    """A column whose dtype follows the values: int64/float64/bool/str, nullable where needed."""
    present = [v for v in values if v is not None]
    kinds = {type(v) for v in present}
    if not present:
        return pd.Series(values, dtype=object, name=name)
    if kinds == {bool}:
        return pd.Series(values, dtype="boolean" if len(present) < len(values) else bool, name=name)
    if kinds == {int}:
        return pd.Series(values, dtype="Int64" if len(present) < len(values) else np.int64, name=name)
    if kinds <= {int, float}:
        return pd.Series([np.nan if v is None else v for v in values], dtype=np.float64, name=name)
    return pd.Series(values, dtype=object, name=name)
