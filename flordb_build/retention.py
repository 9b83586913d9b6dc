"""Checkpoint retention: size budgets per run and per project, and ``flordb-build gc``.

Budgets come from ``[tool.flordb_build]``: ``checkpoint_budget_per_run`` and
``checkpoint_budget_per_project`` (bytes, or strings like ``'2GiB'``). Sizes count each object
once however many checkpoints share it. Eviction follows the dissertation (section 5.6): a run
keeps its final checkpoint (replay of suffixes and prefixes restores it) and checkpoints spread
evenly over its iterations (balanced partitions for parallel replay, no stragglers)::

    checkpoints at   0 1 2 3 4 5 6 7 8 9     keep 3 -> targets 2.33, 5.67, 9
    kept             . . x . . . x . . x     (nearest checkpoint to each target)

A run over its budget keeps the most checkpoints that fit; over the project budget, the run
keeping the most checkpoints (the oldest among equals) gives one up at a time. A final
checkpoint is never evicted, even when alone it exceeds a budget (the result says so).

Rows are deleted before object files, so a crash in between leaves unreferenced files, which
the next gc collects; an object referenced by any table with a ``sha256`` column is never deleted.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .config import Config
from .objects import ObjectStore
from .store import TABLES, Store, is_run_alive, write_transaction

#: While any run is recording, objects touched this recently are kept: its checkpoint rows may
#: still be queued in its flusher, or it may just have reused an object an eviction frees.
GRACE_SECONDS = 600.0


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint of a run: an outer-loop iteration and the objects it references."""

    run_id: str
    ctx_id: int
    loop_name: str
    iteration: int
    shas: frozenset[str]


@dataclass(frozen=True)
class GcResult:
    """What a garbage collection evicted and freed (or would, with ``dry_run``)."""

    dry_run: bool
    evicted: tuple[Checkpoint, ...] = ()
    deleted_objects: int = 0
    freed_bytes: int = 0
    notes: tuple[str, ...] = field(default_factory=tuple)


def evenly_spaced(iterations: Sequence[int], keep: int) -> list[int]:
    """Positions in ``iterations`` (ascending) of ``keep`` checkpoints spread evenly, the last included."""
    n = len(iterations)
    if keep >= n:
        return list(range(n))
    if keep <= 0:
        return []
    span = iterations[-1] + 1  # iterations are 0-based: partition [0, last] into `keep` pieces
    chosen: set[int] = {n - 1}
    for j in range(1, keep):
        target = span * j / keep - 1
        free = [p for p in range(n) if p not in chosen]
        chosen.add(min(free, key=lambda p: (abs(iterations[p] - target), p)))
    return sorted(chosen)


def size_of(checkpoints: Iterable[Checkpoint], sizes: dict[str, int]) -> int:
    """Bytes of the distinct objects the checkpoints reference."""
    shas: set[str] = set()
    for checkpoint in checkpoints:
        shas |= checkpoint.shas
    return sum(sizes.get(sha, 0) for sha in shas)


def _keep_set(checkpoints: Sequence[Checkpoint], keep: int) -> list[Checkpoint]:
    iterations = [c.iteration for c in checkpoints]
    if any(b <= a for a, b in zip(iterations, iterations[1:], strict=False)):
        iterations = list(range(len(checkpoints)))  # several loops: space by position instead
    return [checkpoints[p] for p in evenly_spaced(iterations, keep)]


def plan_retention(
    runs: dict[str, list[Checkpoint]],
    sizes: dict[str, int],
    run_budget: int | None,
    project_budget: int | None,
    evictable: set[str],
) -> tuple[dict[str, list[Checkpoint]], list[str]]:
    """Choose the checkpoints to keep per run (pure). Returns (kept per run, notes).

    :param runs: each run's checkpoints in ctx order, runs oldest first.
    :param evictable: runs whose checkpoints may be evicted (finished runs, or the caller's own).
    """
    notes: list[str] = []
    keep_count = {run_id: len(cps) for run_id, cps in runs.items()}
    if run_budget is not None:
        for run_id, cps in runs.items():
            if run_id not in evictable:
                continue
            while keep_count[run_id] > 1 and size_of(_keep_set(cps, keep_count[run_id]), sizes) > run_budget:
                keep_count[run_id] -= 1
            if size_of(_keep_set(cps, 1), sizes) > run_budget:
                notes.append(f"run '{run_id}': its final checkpoint alone exceeds checkpoint_budget_per_run; kept it")
    kept = {run_id: _keep_set(cps, keep_count[run_id]) for run_id, cps in runs.items()}
    if project_budget is not None:
        order = list(runs)  # oldest first: among equals, the oldest run gives up a checkpoint
        while size_of((c for cps in kept.values() for c in cps), sizes) > project_budget:
            candidates = [r for r in order if r in evictable and keep_count[r] > 1]
            if not candidates:
                notes.append("the project's final checkpoints alone exceed checkpoint_budget_per_project; kept them")
                break
            victim = max(candidates, key=lambda r: (keep_count[r], -order.index(r)))
            keep_count[victim] -= 1
            kept[victim] = _keep_set(runs[victim], keep_count[victim])
    return kept, notes


def collect_garbage(
    config: Config,
    *,
    dry_run: bool = False,
    run_ids: Sequence[str] | None = None,
    include_live: bool = False,
    project_budget: bool = True,
) -> GcResult:
    """Apply the budgets, evict checkpoints and delete objects nothing references.

    :param run_ids: only these runs (and no orphan sweep); None: the whole project.
    :param include_live: let ``run_ids`` be evicted while running (a run enforcing its own budget).
    :param project_budget: also apply ``checkpoint_budget_per_project``.
    """
    store = Store.open_existing(config)
    if store is None:
        return GcResult(dry_run)
    objects = ObjectStore.for_config(config)
    try:
        rows = store.conn.execute(
            "SELECT c.run_id, c.ctx_id, c.loop_name, c.iteration, c.sha256, c.bytes, r.status "
            "FROM checkpoints AS c LEFT JOIN runs AS r ON r.run_id = c.run_id "
            "ORDER BY r.tstamp, c.run_id, c.ctx_id"
        ).fetchall()
        grouped: dict[str, dict[int, tuple[str, int, set[str]]]] = {}
        sizes: dict[str, int] = {}
        live: set[str] = set()
        for run_id, ctx_id, loop_name, iteration, sha, size, status in rows:
            grouped.setdefault(run_id, {}).setdefault(ctx_id, (loop_name, iteration, set()))[2].add(sha)
            sizes[sha] = int(size or 0)
            if status == "running" and is_run_alive(config.flor_dir / "locks", run_id):
                live.add(run_id)
        runs = {
            run_id: [Checkpoint(run_id, ctx, name, it, frozenset(shas)) for ctx, (name, it, shas) in sorted(ctxs.items())]
            for run_id, ctxs in grouped.items()
        }
        scope = set(runs) if run_ids is None else set(run_ids) & set(runs)
        evictable = {r for r in scope if r not in live or (include_live and run_ids is not None)}
        kept, notes = plan_retention(
            runs,
            sizes,
            config.checkpoint_budget_per_run,
            config.checkpoint_budget_per_project if project_budget else None,
            evictable,
        )
        kept_ctx = {(c.run_id, c.ctx_id) for cps in kept.values() for c in cps}
        evicted = [c for cps in runs.values() for c in cps if (c.run_id, c.ctx_id) not in kept_ctx]
        still_referenced = {sha for cps in kept.values() for c in cps for sha in c.shas}
        still_referenced |= _other_references(store)
        candidates = {sha for c in evicted for sha in c.shas}
        if run_ids is None:  # orphans: written by a run killed before its rows were flushed
            candidates |= {info.sha256 for info in objects.iter_objects()}
        others_live = live - (set(run_ids or ()) if include_live else set())
        cutoff = time.time() - GRACE_SECONDS if others_live else float("inf")
        doomed: list[tuple[str, int]] = []
        for sha in sorted(candidates - still_referenced):
            path = objects.path_of(sha)
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            if st.st_mtime < cutoff:
                doomed.append((sha, st.st_size))
        if not dry_run:
            if evicted:
                with write_transaction(store.conn):
                    store.conn.executemany(
                        "DELETE FROM checkpoints WHERE run_id = ? AND ctx_id = ?",
                        [(c.run_id, c.ctx_id) for c in evicted],
                    )
            for sha, _ in doomed:
                objects.delete(sha)
            if run_ids is None:
                objects.sweep_temporary(GRACE_SECONDS)
    finally:
        store.close()
    return GcResult(
        dry_run=dry_run,
        evicted=tuple(evicted),
        deleted_objects=len(doomed),
        freed_bytes=sum(size for _, size in doomed),
        notes=tuple(notes),
    )


def _other_references(store: Store) -> set[str]:
    # Any table with a sha256 column may point into the object store (task outputs, files);
    # table names come from TABLES, never from user input.
    shas: set[str] = set()
    for table, spec in TABLES.items():
        if table == "checkpoints" or "sha256" not in spec["columns"]:
            continue
        try:
            cursor = store.conn.execute(
                "SELECT DISTINCT sha256 FROM " + table + " WHERE sha256 IS NOT NULL"  # noqa: S608 - from TABLES
            )
        except sqlite3.OperationalError:  # a table declared by a newer schema than this store's: nothing references
            continue
        shas.update(sha for (sha,) in cursor)
    return shas


def format_bytes(n: int) -> str:
    """Human-readable size: 1.5 MB."""
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"
