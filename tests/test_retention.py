"""Retention planning: evenly spaced checkpoints, the final one always kept, budgets in bytes."""

from __future__ import annotations

from flordb_build.retention import Checkpoint, evenly_spaced, plan_retention, size_of


def _run(run_id: str, iterations: list[int], size_each: int, sizes: dict[str, int]) -> list[Checkpoint]:
    checkpoints = []
    for ctx, it in enumerate(iterations):
        sha = f"{run_id}-{it}"
        sizes[sha] = size_each
        checkpoints.append(Checkpoint(run_id, ctx, "epoch", it, frozenset({sha})))
    return checkpoints


def test_evenly_spaced_always_keeps_the_last_and_spreads_the_rest() -> None:
    its = list(range(30))
    assert evenly_spaced(its, 1) == [29]
    assert evenly_spaced(its, 2) == [14, 29]
    assert evenly_spaced(its, 3) == [9, 19, 29]
    assert evenly_spaced(its, 40) == its
    assert evenly_spaced([0, 1, 2, 10, 20, 29], 2) == [3, 5]  # target 14: iteration 10 is nearest
    assert evenly_spaced([], 3) == []


def test_run_budget_keeps_the_most_checkpoints_that_fit() -> None:
    sizes: dict[str, int] = {}
    runs = {"r1": _run("r1", list(range(10)), 100, sizes)}
    kept, notes = plan_retention(runs, sizes, run_budget=350, project_budget=None, evictable={"r1"})
    assert [c.iteration for c in kept["r1"]] == [2, 6, 9]
    assert notes == []


def test_final_checkpoint_is_kept_even_over_budget() -> None:
    sizes: dict[str, int] = {}
    runs = {"r1": _run("r1", [0, 1, 2], 1000, sizes)}
    kept, notes = plan_retention(runs, sizes, run_budget=10, project_budget=None, evictable={"r1"})
    assert [c.iteration for c in kept["r1"]] == [2]
    assert notes and "final checkpoint alone exceeds" in notes[0]


def test_shared_objects_count_once() -> None:
    shared = frozenset({"shared"})
    sizes = {"shared": 500}
    runs = {"r1": [Checkpoint("r1", i, "epoch", i, shared) for i in range(5)]}
    assert size_of(runs["r1"], sizes) == 500
    kept, _ = plan_retention(runs, sizes, run_budget=500, project_budget=None, evictable={"r1"})
    assert len(kept["r1"]) == 5


def test_project_budget_takes_from_the_run_keeping_most_and_skips_live_runs() -> None:
    sizes: dict[str, int] = {}
    runs = {
        "old": _run("old", list(range(4)), 100, sizes),
        "new": _run("new", list(range(4)), 100, sizes),
        "live": _run("live", list(range(4)), 100, sizes),
    }
    kept, notes = plan_retention(runs, sizes, run_budget=None, project_budget=800, evictable={"old", "new"})
    assert len(kept["live"]) == 4
    assert sum(len(v) for v in kept.values()) == 8
    assert {len(kept["old"]), len(kept["new"])} == {2}
    assert kept["old"][-1].iteration == 3 and kept["new"][-1].iteration == 3
    assert notes == []
