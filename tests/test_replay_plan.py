"""The pure planner: schedules, estimates and skips on tiny inputs; run_replay with an injected executor."""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import pytest

from flordb_build.errors import ReplayError
from flordb_build.hindsight import (
    JobResult,
    Mismatch,
    RecordedRun,
    ReplayJob,
    StartCosts,
    Step,
    StepKind,
    balance_segments,
    compare_values,
    format_plan,
    plan_replay,
    run_replay,
    schedule_scan,
    split_segments,
    values_match,
)
from flordb_build.hindsight._model import DEFAULT_JOURNAL, DEFAULT_OVERHEAD, DEFAULT_PREPARE, DEFAULT_SERVER
from flordb_build.rewrite import Position

OLD = """\
import flordb_build as flor

state = {"w": 0}
with flor.checkpointing(state=state):
    for epoch in flor.loop("epoch", range(4)):
        for step in flor.loop("step", range(2)):
            state["w"] += 1
        flor.log("val", state["w"])
flor.log("final", state["w"])
"""
TODAY = """\
import flordb_build as flor

flor.log("setup", 1)
state = {"w": 0}
with flor.checkpointing(state=state):
    for epoch in flor.loop("epoch", range(4)):
        for step in flor.loop("step", range(2)):
            state["w"] += 1
            flor.log("inner", step)
        flor.log("w2", state["w"] * 2)
        flor.log("val", state["w"])
flor.log("final", state["w"])
flor.log("fin2", state["w"] + 1)
"""
S, R, X, F, V = StepKind.SKIP, StepKind.RESTORE, StepKind.SILENT, StepKind.FULL, StepKind.VALIDATE


def recorded(run_id: str = "r1", checkpointed: tuple[int, ...] = (0, 1, 2, 3), **changes: Any) -> RecordedRun:
    """A run of OLD: prefix 1s, epochs of 3s with 2s nested, suffix 0.5s, restores measured at 0.1s;
    its checkpoints also hold where the epochs' nested loops ended (CheckpointPoint.NESTED)."""
    ctxs = [1, 4, 7, 10]
    timings = [(0, "prefix", 1.0), (0, "suffix", 0.5)]
    for ctx in ctxs:
        timings += [(ctx, "iteration", 3.0), (ctx, "inner", 2.0)]
    timings.append((ctxs[-1], "restore", 0.1))
    fields: dict[str, Any] = dict(
        run_id=run_id, task="train", filename="train.py", snapshot="abcdef0123456789", old_source=OLD,
        args={"lr": 0.1}, seconds=14.0,
        outer_loops=tuple((ctx, "epoch", i) for i, ctx in enumerate(ctxs)),
        timings=tuple(timings),
        checkpoints=tuple((ctxs[i], "epoch", i, 0.05) for i in checkpointed),
        nested_checkpoints=frozenset(ctxs[i] for i in checkpointed),
    )
    fields.update(changes)
    return RecordedRun(**fields)


def kinds(steps: tuple[Step, ...]) -> list[StepKind]:
    return [s.kind for s in steps]


def test_split_segments_covers_every_iteration_once() -> None:
    assert split_segments(8, 2) == ((0, 4), (4, 8))
    assert split_segments(5, 3) == ((0, 2), (2, 3), (3, 5))
    assert split_segments(2, 4) == ((0, 1), (1, 2))
    assert split_segments(0, 2) == ((0, 0),)


def test_schedules_follow_the_docstring_diagram() -> None:
    ckpt = (1, 4, 7)
    suffix = schedule_scan(Position.SUFFIX, 8, ckpt, nested=ckpt)
    assert kinds(suffix.steps) == [S] * 7 + [R] and not suffix.stop_after
    validation = schedule_scan(Position.VALIDATION, 8, ckpt, nested=ckpt)
    assert kinds(validation.steps) == [F, V, F, F, V, F, F, V]
    late = schedule_scan(Position.RANGE, 8, ckpt, (5, 8), nested=ckpt)
    assert kinds(late.steps) == [S, S, S, S, R, F, F, F]
    assert not late.writes_prefix and late.writes_suffix and not late.stop_after
    early = schedule_scan(Position.RANGE, 8, ckpt, (0, 5))
    assert kinds(early.steps) == [F] * 5 and early.stop_after and early.writes_prefix and not early.writes_suffix
    # No checkpoint before the segment: rebuild the state from the start, keeping nothing.
    assert kinds(schedule_scan(Position.RANGE, 8, (7,), (3, 5)).steps) == [X, X, X, F, F]
    # A validation scan split across workers: the late segment pseudoresumes to the exact state
    # after iteration 3 (restore 1, rebuild 2 and 3), the early one stops without a final restore.
    late_validation = schedule_scan(Position.VALIDATION, 8, ckpt, (4, 8), nested=ckpt)
    assert kinds(late_validation.steps) == [S, R, X, X, V, F, F, V]
    assert not late_validation.writes_prefix and late_validation.writes_suffix and not late_validation.stop_after
    early_validation = schedule_scan(Position.VALIDATION, 8, ckpt, (0, 5), nested=ckpt)
    assert kinds(early_validation.steps) == [F, V, F, F, V] and early_validation.stop_after
    prefix = schedule_scan(Position.PREFIX, 8, ckpt)
    assert prefix.steps == () and prefix.stop_after and prefix.writes_prefix


def test_checkpoints_without_a_nested_point_never_validate() -> None:
    # Issue 12.1: restoring the state of an iteration's end where its nested loop ends would run
    # the rest of the body (a scheduler step) a second time, so such iterations run in full.
    ckpt = (1, 4, 7)
    assert kinds(schedule_scan(Position.SUFFIX, 8, ckpt).steps) == [S] * 7 + [R]
    assert kinds(schedule_scan(Position.VALIDATION, 8, ckpt).steps) == [F] * 8
    assert kinds(schedule_scan(Position.RANGE, 8, ckpt, (5, 8)).steps) == [S, S, S, S, R, F, F, F]
    mixed = schedule_scan(Position.VALIDATION, 8, ckpt, nested=(4,))
    assert kinds(mixed.steps) == [F, F, F, F, V, F, F, F]
    old = recorded(nested_checkpoints=frozenset())  # a store from before checkpoint points
    plan = plan_replay([old], {"train.py": TODAY}, ["w2"]).runs[0]
    assert plan.nested == () and plan.estimate == pytest.approx(1.0 + 4 * 3.0 + 0.5)


def test_plan_picks_depth_per_run_and_estimates_from_timings() -> None:
    today = {"train.py": TODAY}
    suffix = plan_replay([recorded()], today, ["fin2"]).runs[0]
    assert suffix.depth is Position.SUFFIX
    assert suffix.estimate == pytest.approx(1.0 + 0.1 + 0.5)  # prefix + one restore + suffix
    validation = plan_replay([recorded()], today, ["w2", "fin2"]).runs[0]
    assert validation.depth is Position.VALIDATION and validation.names == ("w2", "fin2")
    # prefix + 4 x (3 - 2 nested + restore) + suffix
    assert validation.estimate == pytest.approx(1.0 + 4 * 1.1 + 0.5)
    prefix = plan_replay([recorded()], today, ["setup"]).runs[0]
    assert prefix.depth is Position.PREFIX and prefix.estimate == pytest.approx(1.0)
    ranged = plan_replay([recorded()], today, ["inner"], workers=2).runs[0]
    assert ranged.depth is Position.RANGE and ranged.segments == ((0, 2), (2, 4))
    # segment 0: prefix + 2 epochs; segment 1: prefix + restore epoch 1 + 2 epochs + suffix
    assert ranged.segment_estimates == pytest.approx((7.0, 7.6))
    assert ranged.estimate == pytest.approx(7.6)
    assert ranged.version == "abcdef01"


def test_segments_start_after_checkpoints_with_the_longest_as_short_as_it_can_be() -> None:
    # bench_replay's recording: checkpoints at 4, 5, 10, 16 and 19 of 20 one-second epochs. An even
    # split at 10 made the second worker restore 5 and run 6-19 again (14 epochs: 1.4x at best).
    ckpts = (4, 5, 10, 16, 19)
    assert balance_segments([1.0] * 20, 2, ckpts, restore=0.1) == ((0, 11), (11, 20))
    assert balance_segments([1.0] * 20, 3, ckpts, restore=0.1) == ((0, 6), (6, 11), (11, 20))
    # a long tail after the loop weighs on the last segment; uneven epochs move the split
    assert balance_segments([1.0] * 20, 2, ckpts, restore=0.1, tail=10.0) == ((0, 17), (17, 20))
    assert balance_segments([3.0] * 10 + [1.0] * 10, 2, ckpts) == ((0, 6), (6, 20))
    # no checkpoint to start from (or only the last), one worker, nothing to split: one segment
    assert balance_segments([1.0] * 20, 2, ()) == ((0, 20),)
    assert balance_segments([1.0] * 20, 2, (19,)) == ((0, 20),)
    assert balance_segments([1.0] * 20, 1, ckpts) == ((0, 20),)
    assert balance_segments([], 2, ckpts) == ((0, 0),)
    # more workers than checkpoints: as many segments as there are places to start one
    assert balance_segments([1.0] * 20, 8, (9,)) == ((0, 10), (10, 20))
    # a checkpoint every iteration: as even as the iterations allow
    assert balance_segments([1.0] * 9, 3, range(9)) == ((0, 3), (3, 6), (6, 9))


def test_a_range_plan_splits_where_a_segment_starts_from_a_checkpoint() -> None:
    run = recorded(checkpointed=(0, 2, 3))  # no checkpoint at 1: an even split (0, 2), (2, 4) would
    ranged = plan_replay([run], {"train.py": TODAY}, ["inner"], workers=2).runs[0]  # rebuild epoch 1
    assert ranged.segments == ((0, 3), (3, 4))
    # segment 0: prefix + 3 epochs; segment 1: prefix + restore epoch 2 + 1 epoch + suffix
    assert ranged.segment_estimates == pytest.approx((10.0, 4.6))


def test_a_skipped_checkpoint_is_recomputed_and_costed() -> None:
    plan = plan_replay([recorded(checkpointed=(0, 3))], {"train.py": TODAY}, ["w2"]).runs[0]
    assert plan.checkpointed == (0, 3)
    # epochs 1 and 2 run in full (3s each); 0 and 3 validate (3 - 2 nested + one restore)
    assert plan.estimate == pytest.approx(1.0 + 1.1 + 3.0 + 3.0 + 1.1 + 0.5)


def test_restore_cost_falls_back_to_materialize_times_1_38() -> None:
    run = recorded(timings=tuple(t for t in recorded().timings if t[1] != "restore"))
    plan = plan_replay([run], {"train.py": TODAY}, ["fin2"]).runs[0]
    assert plan.estimate == pytest.approx(1.0 + 1.38 * 0.05 + 0.5)


def test_runs_that_cannot_be_replayed_are_skipped_with_reasons() -> None:
    runs = [
        recorded("gone", old_source=None, unavailable="snapshot 'abc' no longer exists in the repository"),
        recorded("other", filename="infer.py"),
        recorded("failed", status="failed"),
        recorded("has_it", old_source=TODAY),
        recorded("fine"),
    ]
    plan = plan_replay(runs, {"train.py": TODAY, "infer.py": "import flordb_build as flor\n"}, ["w2"])
    assert [r.run_id for r in plan.runs] == ["fine"]
    reasons = {s.run_id: s.reason for s in plan.skipped}
    assert "no longer exists" in reasons["gone"]
    assert reasons["other"].startswith("today's 'infer.py' logs none of")
    assert "'failed'" in reasons["failed"]
    assert "logs it already" in reasons["has_it"]
    text = format_plan(plan)
    assert "fine" in text and "skip: run gone" in text and "1 selected run(s) not affected" in text


def test_unknown_names_and_bad_workers_are_errors() -> None:
    with pytest.raises(ReplayError, match="does not log 'typo'"):
        plan_replay([recorded()], {"train.py": TODAY}, ["w2", "typo"])
    with pytest.raises(ReplayError, match="at least 1"):
        plan_replay([recorded()], {"train.py": TODAY}, ["w2"], workers=0)
    with pytest.raises(ReplayError, match="Name the values"):
        plan_replay([recorded()], {"train.py": TODAY}, [])


def test_run_replay_calls_the_executor_once_per_segment_and_reports() -> None:
    plan = plan_replay([recorded("a"), recorded("b")], {"train.py": TODAY}, ["inner"], workers=2)
    calls: list[tuple[str, int, tuple[int, int] | None]] = []
    lock = threading.Lock()
    seen: list[tuple[str, int, int]] = []

    def executor(job: ReplayJob, progress: Any) -> JobResult:
        with lock:
            calls.append((job.run.run_id, job.worker, job.segment))
        progress(len(job.schedule.steps), len(job.schedule.steps))
        mismatch = (Mismatch(job.run.run_id, "val", 2, 1, "epoch 3: recorded 1, replayed 2"),) if job.worker else ()
        return JobResult(job.run.run_id, job.worker, job.run.run_id == "a", 0.5, stored=4,
                         error=None if job.run.run_id == "a" else "boom", mismatches=mismatch)

    report = run_replay(plan, executor, progress=lambda run, done, total: seen.append((run.run_id, done, total)))
    assert sorted(calls) == [("a", 0, (0, 2)), ("a", 1, (2, 4)), ("b", 0, (0, 2)), ("b", 1, (2, 4))]
    assert [o.run_id for o in report.outcomes] == ["a", "b"]
    # Run a succeeded but its worker 1 logged a value the record has otherwise: withheld.
    assert [o.ok for o in report.outcomes] == [False, False] and not report.ok
    assert str(report.outcomes[0].withheld).startswith(
        "the replay cannot guarantee equal values: 'val' differs from the record beyond --rel-tol 1e-06 at "
        "epoch 3: recorded 1, replayed 2 (1 of 2 values differ)"
    )
    assert str(report.nothing_replayed).startswith("nothing replayed: every run's values were left out (1 failed, 1 withheld)")
    assert report.outcomes[0].stored == 8 and report.outcomes[1].errors == ("worker 0: boom", "worker 1: boom")
    assert [(m.run_id, m.differing) for m in report.mismatches] == [("a", 1), ("b", 1)]
    assert ("a", 6, 6) in seen  # segment 0 has 2 steps, segment 1 has 4 (2 to pseudoresume)

    accepted = run_replay(plan, executor, accept_divergent=True)
    assert [(o.ok, o.divergent) for o in accepted.outcomes] == [(True, True), (False, False)]
    assert accepted.nothing_replayed is None and not accepted.ok


def test_values_match_is_exact_for_ints_and_strings_and_tolerant_for_floats() -> None:
    assert values_match(1, 1) and not values_match(1, 2) and not values_match("a", "b")
    assert not values_match(1, True) and not values_match("1", 1)
    assert values_match(1.0, 1.0 + 1e-9) and not values_match(1.0, 1.0 + 1e-3)
    assert values_match(1.0, 1.0 + 1e-3, rel_tol=1e-2)
    assert values_match([1, 2.0], [1, 2.0]) and not values_match({"a": 1}, {"a": 2})
    assert values_match(float("nan"), float("nan"))
    recorded_values = {(1, "val"): [1.0], (2, "val"): [2.0], (1, "tag"): ["x"], (3, "only_recorded"): [0]}
    replayed = {(1, "val"): [1.0], (2, "val"): [2.5], (1, "tag"): ["x"], (4, "only_replayed"): [1]}
    mismatches = compare_values("r", recorded_values, replayed, describe=lambda ctx: f"epoch {ctx - 1}")
    assert mismatches == (Mismatch("r", "val", 2, 1, "epoch 1: recorded 2.0, replayed 2.5"),)


def test_start_costs_fork_every_run_from_the_server_and_skip_the_recorded_imports() -> None:
    today = {"train.py": TODAY}
    runs = [recorded("r1"), recorded("r2"), recorded("r3")]
    timings_only = 1.0 + 0.1 + 0.5  # prefix + one restore + suffix
    learned = StartCosts(
        warm=True, saving={"train.py": 0.8}, overhead={("train.py", True): 0.05}, journal={"train.py": 0.07}
    )
    # No server is up: the first run starts it (nothing recorded its start-up: the default), then
    # forks from it like the others. Every run then commits its replay journal.
    plan = plan_replay(runs, today, ["fin2"], start=learned)
    assert [r.warm for r in plan.runs] == [True, True, True]
    assert [r.server_start for r in plan.runs] == pytest.approx([DEFAULT_SERVER, 0.0, 0.0])
    assert [r.estimate for r in plan.runs] == pytest.approx(
        [timings_only - 0.8 + 0.05 + DEFAULT_SERVER + 0.07, timings_only - 0.8 + 0.05 + 0.07,
         timings_only - 0.8 + 0.05 + 0.07]
    )
    assert plan.runs[0].recorded_prefix == pytest.approx(1.0)
    # A server already up: every run forks.
    live = StartCosts(warm=True, live=frozenset({"train.py"}), saving={"train.py": 0.8})
    assert [r.warm for r in plan_replay(runs, today, ["fin2"], start=live).runs] == [True, True, True]
    # Warm starts off: every run is cold, nothing is saved.
    cold = plan_replay(runs, today, ["fin2"], start=StartCosts(warm=False, saving={"train.py": 0.8})).runs
    assert [r.estimate for r in cold] == pytest.approx([timings_only + DEFAULT_OVERHEAD[False] + DEFAULT_JOURNAL] * 3)
    # Before a replay measured the saving, a warm start is expected to skip the recorded start-up.
    unmeasured = StartCosts(warm=True, live=frozenset({"train.py"}))
    started = recorded(timings=(*recorded().timings, (0, "startup", 0.6)))
    assert plan_replay([started], today, ["fin2"], start=unmeasured).runs[0].estimate == pytest.approx(
        timings_only - 0.6 + DEFAULT_OVERHEAD[True] + DEFAULT_JOURNAL
    )
    # A warm start never saves more than the recorded prefix.
    huge = StartCosts(warm=True, live=frozenset({"train.py"}), saving={"train.py": 50.0})
    assert plan_replay(runs[:1], today, ["fin2"], start=huge).runs[0].estimate == pytest.approx(
        timings_only - 1.0 + DEFAULT_OVERHEAD[True] + DEFAULT_JOURNAL
    )


def test_the_plan_estimates_its_jobs_as_a_schedule_over_the_slots() -> None:
    # Issue 16: all runs' jobs share --workers slots, so 8 equal runs on 2 slots take 4 runs' time.
    one_slot = plan_replay([recorded(f"r{i}") for i in range(8)], {"train.py": TODAY}, ["w2"])
    each = one_slot.runs[0].estimate
    assert len(one_slot.runs) == 8 and all(len(run.segments) == 1 for run in one_slot.runs)
    assert one_slot.estimate == pytest.approx(8 * each)
    assert dataclasses.replace(one_slot, workers=2).estimate == pytest.approx(4 * each)
    assert dataclasses.replace(one_slot, workers=3).estimate == pytest.approx(3 * each)  # 3 + 3 + 2 runs
    assert dataclasses.replace(one_slot, workers=16).estimate == pytest.approx(each)


def test_the_first_replay_pays_for_the_warm_server_its_first_job_starts() -> None:
    # Issue 16: a fresh project's first replay starts the script's warm server, which imports what
    # the recorded run imported before its first flor call (timings' startup): the job that starts
    # it waits that long, and so does every other warm job of the script (they fork from it).
    today = {"train.py": TODAY}
    startup = 0.6
    runs = [recorded(f"r{i}", timings=(*recorded().timings, (0, "startup", startup))) for i in range(3)]
    fresh = StartCosts(warm=True)
    plan = plan_replay(runs, today, ["fin2"], workers=2, start=fresh)
    job = 1.0 - startup + 0.1 + 0.5 + DEFAULT_OVERHEAD[True]  # a warm fork: prefix less the imports, restore, suffix
    server = startup + DEFAULT_SERVER
    assert [r.server_start for r in plan.runs] == pytest.approx([server, 0.0, 0.0])
    assert [len(r.segment_estimates) for r in plan.runs] == [1, 1, 1]
    assert [r.segment_estimates[0] for r in plan.runs] == pytest.approx([job] * 3)
    assert [r.prepare for r in plan.runs] == pytest.approx([DEFAULT_PREPARE] * 3)
    # Slot 1: r1 starts the server once prepared, then runs. Slot 2: r2, prepared after r1, waits
    # for the server, runs; then r3 (prepared long before), on the slot that frees first.
    up = DEFAULT_PREPARE + server
    assert plan.estimate == pytest.approx(up + 2 * job + DEFAULT_JOURNAL)
    # What a replay measured of the server's start replaces the recorded start-up.
    learned = dataclasses.replace(fresh, server={"train.py": 2.5}, prepare={"train.py": 0.01})
    again = plan_replay(runs, today, ["fin2"], workers=2, start=learned)
    assert again.runs[0].server_start == pytest.approx(2.5)
    assert again.estimate == pytest.approx(0.01 + 2.5 + 2 * job + DEFAULT_JOURNAL)
    # A server already up: nobody waits; the three jobs share two slots after their preparation.
    live = dataclasses.replace(learned, live=frozenset({"train.py"}))
    up_already = plan_replay(runs, today, ["fin2"], workers=2, start=live)
    assert [r.server_start for r in up_already.runs] == [0.0, 0.0, 0.0]
    assert up_already.estimate == pytest.approx(0.01 + 2 * job + DEFAULT_JOURNAL)
    # Warm starts off: no server, every job a cold start.
    cold = plan_replay(runs, today, ["fin2"], workers=2, start=StartCosts(warm=False))
    assert [r.warm for r in cold.runs] == [False] * 3 and [r.server_start for r in cold.runs] == [0.0] * 3


def test_a_new_servers_later_forks_skip_the_imports_its_first_children_made() -> None:
    # Issue 16 (bench_estimate, validation x8 split, first replay 2.4x too long): the record's
    # prefix after `startup` held imports (`imports`: torch.optim imports torch._dynamo). A new
    # server's first children import them, and so does every job forked before the first one
    # ended; the server then imports them (the learned preloads) at its next fork, and the jobs
    # forked after that skip them in their prefix.
    today = {"train.py": TODAY}
    startup, imports = 0.3, 0.5
    timings = (*recorded().timings, (0, "startup", startup), (0, "imports", imports))
    runs = [recorded(f"r{i}", timings=timings) for i in range(3)]
    plan = plan_replay(runs, today, ["fin2"], workers=2, start=StartCosts(warm=True))
    first = 1.0 - startup + 0.1 + 0.5 + DEFAULT_OVERHEAD[True]  # imports its prefix's modules itself
    later = first - imports
    assert [r.segment_estimates[0] for r in plan.runs] == pytest.approx([first, later, later])
    assert [r.server_learn for r in plan.runs] == pytest.approx([imports, 0.0, 0.0])
    assert [r.imports_skipped for r in plan.runs] == pytest.approx([0.0, imports, imports])
    # r1 starts the server and runs. r2 forks once the server is up, before r1 ended: it imports
    # them itself. r3 forks when r1 ended (r1 and r2 end together): the server imports them first.
    up = DEFAULT_PREPARE + startup + DEFAULT_SERVER
    assert plan.estimate == pytest.approx(up + first + (later + imports) + DEFAULT_JOURNAL)
    # Three slots: r2 and r3 both fork before r1 ended, and both import them themselves.
    wide = plan_replay(runs, today, ["fin2"], workers=3, start=StartCosts(warm=True))
    assert wide.estimate == pytest.approx(up + first + DEFAULT_JOURNAL)
    # One slot: r2 forks after r1 ended and pays the server's import; r3 skips them.
    one = plan_replay(runs, today, ["fin2"], workers=1, start=StartCosts(warm=True))
    assert one.estimate == pytest.approx(up + first + (later + imports) + later + DEFAULT_JOURNAL)
    # Without the record's `imports` (an older store), every job pays the whole prefix after start-up.
    old = [recorded(f"r{i}", timings=(*recorded().timings, (0, "startup", startup))) for i in range(3)]
    unknown = plan_replay(old, today, ["fin2"], workers=2, start=StartCosts(warm=True))
    assert [r.segment_estimates[0] for r in unknown.runs] == pytest.approx([first] * 3)
    assert [r.server_learn for r in unknown.runs] == [0.0] * 3
    # Once a fully warm process was measured (warm_prefix), the server has the imports preloaded:
    # nothing is left to learn, and every fork takes the measured prefix.
    measured = StartCosts(warm=True, warm_prefix={"train.py": 0.05})
    again = plan_replay(runs, today, ["fin2"], workers=2, start=measured)
    assert [r.server_learn for r in again.runs] == [0.0] * 3
    assert len({round(r.segment_estimates[0], 9) for r in again.runs}) == 1


def test_a_split_run_that_starts_the_server_holds_its_other_segments_until_it_is_up() -> None:
    startup = 0.6
    run = recorded(timings=(*recorded().timings, (0, "startup", startup)))
    plan = plan_replay([run], {"train.py": TODAY}, ["w2"], workers=2, start=StartCosts(warm=True))
    (planned,) = plan.runs
    assert len(planned.segments) == 2 and planned.server_start == pytest.approx(startup + DEFAULT_SERVER)
    # Both segments fork from the server segment 0 starts: the slower one ends the run.
    assert plan.estimate == pytest.approx(
        DEFAULT_PREPARE + planned.server_start + max(planned.segment_estimates) + DEFAULT_JOURNAL
    )
    assert planned.estimate == pytest.approx(max(planned.segment_estimates) + planned.server_start + DEFAULT_JOURNAL)


def test_a_measured_warm_prefix_replaces_the_recorded_one_whatever_run_it_was_measured_on() -> None:
    # Runs recorded on a busy machine carry their own noise in their prefix; the prefix a warm
    # replay process measured is what every run's warm process takes (issue 16).
    today = {"train.py": TODAY}
    noisy = [recorded("r1"), recorded("r2", timings=((0, "prefix", 3.0), *recorded().timings[1:]))]
    costs = StartCosts(warm=True, live=frozenset({"train.py"}), saving={"train.py": 0.2}, warm_prefix={"train.py": 0.3},
                       overhead={("train.py", True): 0.05})
    plan = plan_replay(noisy, today, ["fin2"], start=costs)
    assert [r.segment_estimates[0] for r in plan.runs] == pytest.approx([0.3 + 0.1 + 0.5 + 0.05] * 2)
    # Never more than the recorded prefix.
    slow = dataclasses.replace(costs, warm_prefix={"train.py": 5.0})
    assert plan_replay(noisy[:1], today, ["fin2"], start=slow).runs[0].segment_estimates[0] == pytest.approx(
        1.0 + 0.1 + 0.5 + 0.05
    )
