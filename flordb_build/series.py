"""One logged name of one run as a series: the points a chart draws, with where each came from.

``read_series(store, run_id, "loss")`` holds exactly the rows of that run in
``flor.dataframe("loss")``, the same rules applied by one run's arrays instead of the whole
store's pivot (a million-value run reads in a fraction of a second, which a page needs):

- a point is a context where the name was logged and below which it was not logged again;
- its value is the last one logged there, a recorded value winning over a replayed one;
- its dimensions are the iteration index of each enclosing loop, the nearest loop of a name
  winning, outermost loop first.

Unlike the dataframe, each point also says whether its value was replayed (``source =
'replay'``), so charts draw hindsight values apart from recorded ones. tests/test_series.py holds
the two readers to the same rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .store import Store
from .team._protocol import ViewReader, as_view_reader

NOT_LOGGED = object()
_MAX_DEPTH = 10_000  # nesting deeper than any script's loops: a guard against a malformed store


@dataclass(frozen=True)
class Series:
    """The points of one name in one run, ordered by context (the order they were logged in)."""

    run_id: str
    name: str
    dims: tuple[str, ...]  # enclosing loop names, outermost first; () for a run-level value
    index: tuple[np.ndarray, ...]  # per dim: the iteration of each point (-1: not inside that loop)
    values: np.ndarray  # the decoded values: int64/float64/bool when all are such, else objects
    replayed: np.ndarray  # bool per point
    #: The value logged at run level (outside every loop), recorded winning over replayed, as the
    #: run's row of ``flor.dataframe()`` holds it; :data:`NOT_LOGGED` when there is none.
    run_value: object = NOT_LOGGED

    def __len__(self) -> int:
        return len(self.values)

    @property
    def numeric(self) -> bool:
        """True when every value is a number or a bool (what a line chart can draw)."""
        return self.values.dtype.kind in "biuf"

    def y(self) -> np.ndarray:
        """The values as float64 (bools as 0/1, missing as NaN); NaN everywhere for text or JSON."""
        if self.numeric:
            return self.values.astype(np.float64)
        return np.full(len(self.values), np.nan)

    def dim(self, name: str) -> np.ndarray:
        """The iteration index of each point in loop ``name``."""
        return self.index[self.dims.index(name)]


def logged_names(store: Store | ViewReader, run_id: str) -> list[str]:
    """Every name the run logged (recorded or replayed), in name order."""
    return as_view_reader(store).logged_names(run_id)


def is_loop_level(store: Store | ViewReader, run_id: str, name: str) -> bool:
    """True when the run logged ``name`` inside some loop (else it is a run-level value only)."""
    return as_view_reader(store).is_loop_level(run_id, name)


def read_series(store: Store | ViewReader, run_id: str, name: str) -> Series:
    """The points of ``name`` in run ``run_id`` (see the module docstring), from either store."""
    reader = as_view_reader(store)
    ctx, values, replayed = _last_per_context(*reader.series_points(run_id, name))
    blocks = _LoopBlocks(reader.loop_block_rows(run_id))
    at = blocks.find(ctx)
    unknown = (at < 0) & (ctx != 0)
    if unknown.any():  # a context the loops table does not know counts as run level, as in the dataframe
        ctx, values, replayed = _last_per_context(np.where(unknown, 0, ctx), values, replayed)
        at = blocks.find(ctx)
    run_value = values[0] if ctx.size and ctx[0] == 0 else NOT_LOGGED
    if isinstance(run_value, np.generic):
        run_value = run_value.item()
    leaves = _leaf_mask(ctx, at, blocks)
    if not leaves.all():
        ctx, at, values, replayed = ctx[leaves], at[leaves], values[leaves], replayed[leaves]
    dims, index = blocks.dimensions(ctx, at)
    return Series(run_id, name, dims, index, values, replayed, run_value)


def _last_per_context(ctx: np.ndarray, values: np.ndarray, replayed: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if ctx.size and bool(np.all(ctx[1:] > ctx[:-1])):  # one value per context, in order: the common case
        return ctx, values, replayed
    order = np.argsort(ctx, kind="stable")
    ctx = ctx[order]
    last = np.append(ctx[1:] != ctx[:-1], True) if ctx.size else np.zeros(0, dtype=bool)
    return ctx[last], values[order][last], replayed[order][last]


class _LoopBlocks:
    """A run's ``loops`` blocks (consecutive iterations of one loop under one parent).

    Every context of a block shares its parent, so after finding each point's own block, the
    walk up to the run level runs over distinct blocks only: a million steps in a hundred epochs
    cost one binary search each and then a hundred-row walk.
    """

    def __init__(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """:param rows: ``ViewReader.loop_block_rows()``: ctx_id, parent_ctx, iteration, count, name."""
        self.start = np.array([r[0] for r in rows], dtype=np.int64)
        self.parent = np.array([r[1] for r in rows], dtype=np.int64)
        self.iteration = np.array([r[2] for r in rows], dtype=np.int64)
        self.count = np.array([r[3] for r in rows], dtype=np.int64)
        names: dict[str, int] = {}
        self.name_code = np.array([names.setdefault(r[4], len(names)) for r in rows], dtype=np.int64)
        self.names = list(names)

    def find(self, ctx: np.ndarray) -> np.ndarray:
        """The block of each context; -1 for the run level (0) and for unknown contexts."""
        if self.start.size == 0:
            return np.full(len(ctx), -1, dtype=np.int64)
        at = np.searchsorted(self.start, ctx, side="right") - 1
        safe = np.maximum(at, 0)
        inside = (at >= 0) & (ctx > 0) & (ctx < self.start[safe] + self.count[safe])
        return np.where(inside, at, -1)

    def dimensions(self, ctx: np.ndarray, at: np.ndarray) -> tuple[tuple[str, ...], tuple[np.ndarray, ...]]:
        """Loop names (outermost first) and each point's iteration in each, up to the run level."""
        n_names = len(self.names)
        index = np.full((n_names, len(ctx)), -1, dtype=np.int64)
        depth_sum = np.zeros(n_names)
        depth_count = np.zeros(n_names)
        inside = at >= 0
        everywhere = bool(inside.all())
        rows, own = (slice(None), at) if everywhere else (np.nonzero(inside)[0], at[inside])
        codes = self.name_code[own]
        iterations = self.iteration[own] + ctx[rows] - self.start[own]
        counts = np.bincount(codes, minlength=n_names)
        present = np.flatnonzero(counts).tolist()
        for d in present:  # the points' own loops: usually one name
            if everywhere and len(present) == 1:
                index[d] = iterations
            else:
                mine = codes == d
                index[d][np.arange(len(ctx))[rows][mine]] = iterations[mine]
        depth_count += counts
        # Ancestors, per distinct block: `above[:, b]` is block b's ancestry, broadcast to its points.
        blocks, inverse = _runs_of(own)
        weights = np.bincount(inverse, minlength=len(blocks))
        above = np.full((n_names, len(blocks)), -1, dtype=np.int64)
        cols = np.arange(len(blocks))
        cur = self.parent[blocks]
        for depth in range(1, _MAX_DEPTH):
            up = self.find(cur)
            known = up >= 0
            cols, cur, up = cols[known], cur[known], up[known]
            if cols.size == 0:
                break
            up_codes = self.name_code[up]
            unset = (above[up_codes, cols] < 0) & (up_codes != self.name_code[blocks[cols]])
            above[up_codes[unset], cols[unset]] = self.iteration[up[unset]] + cur[unset] - self.start[up[unset]]
            np.add.at(depth_sum, up_codes[unset], -depth * weights[cols[unset]])
            np.add.at(depth_count, up_codes[unset], weights[cols[unset]])
            cur = self.parent[up]
        for d in range(n_names) if len(blocks) else ():
            if (above[d] >= 0).any():  # the nearest loop of a name wins: fill only what is unset
                column = index[d]
                spread = above[d][inverse]
                column[rows] = np.where(column[rows] < 0, spread, column[rows])
        used = [d for d in range(n_names) if depth_count[d] > 0]
        used.sort(key=lambda d: (float(depth_sum[d] / depth_count[d]), d))
        return tuple(self.names[d] for d in used), tuple(index[d] for d in used)


def _runs_of(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(blocks, return_inverse=True)`` for non-decreasing ``blocks`` (sorted contexts
    lie in non-decreasing blocks), in one pass instead of a sort."""
    if blocks.size == 0:
        return blocks, blocks
    starts = np.append(True, blocks[1:] != blocks[:-1])
    return blocks[starts], np.cumsum(starts) - 1


def _leaf_mask(ctx: np.ndarray, at: np.ndarray, blocks: _LoopBlocks) -> np.ndarray:
    """True for contexts (sorted, unique) with no other context of the same name below them."""
    if ctx.size <= 1:
        return np.ones(ctx.size, dtype=bool)
    has_child = np.zeros(ctx.size, dtype=bool)
    frontier = np.unique(blocks.parent[_runs_of(at[at >= 0])[0]])
    for _ in range(_MAX_DEPTH):  # each step goes one loop level up; the run level ends it
        found = np.minimum(np.searchsorted(ctx, frontier), ctx.size - 1)
        has_child[found[ctx[found] == frontier]] = True
        frontier = frontier[frontier != 0]
        up = blocks.find(frontier)
        frontier = np.unique(blocks.parent[up[up >= 0]])
        if frontier.size == 0:
            break
    return ~has_child
