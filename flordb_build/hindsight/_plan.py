"""Planning a replay: which runs, which scan, what each process does, and how long it takes. Pure.

For each selected run the new statements are propagated into its recorded version; the deepest
position among those placed is the run's scan. A scan becomes a :class:`Schedule`: one step per
recorded iteration of the main loop. With checkpoints at ``*`` (the state at the END of that
iteration, and where its first nested loop ended: checkpoints.CheckpointPoint) and ``n = 8``::

    iteration        0   1*  2   3   4*  5   6   7*
    suffix           .   .   .   .   .   .   .   R        R restore (the end), then run the tail
    validation       F   V   F   F   V   F   F   V        V nested loops skipped, the nested point
                                                            restored where they end, the rest of the
                                                            body run once; F run in full (no
                                                            checkpoint to restore)
    validation [4,8) .   R   S   S   V   F   F   V        with workers: segments like a range scan
    range [5, 8)     .   .   .   .   R   F   F   F        pseudoresume from 4*, then the segment
    range [0, 5)     F   F   F   F   F   stop             stop after the segment (another worker
                                                            has the rest); the planner starts
                                                            segments after checkpoints
                                                            (balance_segments), a segment starting
                                                            elsewhere rebuilds the state with S
    (. skip: never executed; a later restore covers it. S rebuilds state, logs dropped.)

A checkpoint without a nested point (an iteration without a nested loop; stores before schema 5)
never validates: restoring the iteration's end where its nested loop ends would run the rest of
the body on state it already changed (issue 12.1), so those iterations run in full (F).

An estimate is the sum of the recorded seconds of the parts a schedule executes: the prefix,
each executed iteration (minus its nested loops for V), each restore, and the tail; plus what
starting the process costs outside those timings, and minus the imports of the prefix when the
process forks from a warm server (:class:`StartCosts`, learned from earlier replays). The run
whose job starts its script's warm server also waits for that start (``RunPlan.server_start``:
before any replay measured it, the run's recorded start-up, which the server pays again), and
every run costs the driver its preparation (``RunPlan.prepare``); ``ReplayPlan.estimate`` lays
the jobs out over the slots with both.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterable, Mapping, Sequence

from ..errors import ReplayError, RewriteError
from ..redaction import MASK
from ..rewrite import Position, analyze_script, module_name, propagate, propagate_project
from ._carried import Skipping, describe_carried, describe_stateless, find_carried
from ._model import RecordedRun, ReplayPlan, RunPlan, Schedule, SkippedRun, StartCosts, Step, StepKind

#: Restore seconds per materialize second before a run's restores were measured (dissertation 4.3).
DEFAULT_RESTORE_FACTOR = 1.38


def split_segments(n: int, workers: int) -> tuple[tuple[int, int], ...]:
    """``n`` iterations as at most ``workers`` contiguous ``[start, stop)`` segments of near-equal size."""
    if n <= 0:
        return ((0, 0),)
    parts = max(1, min(workers, n))
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return tuple((bounds[i], bounds[i + 1]) for i in range(parts))


def balance_segments(
    seconds: Sequence[float], workers: int, checkpointed: Iterable[int], restore: float = 0.0, tail: float = 0.0,
) -> tuple[tuple[int, int], ...]:
    """At most ``workers`` contiguous ``[start, stop)`` segments of the iterations whose scan takes
    ``seconds`` each, every segment but the first starting right after a checkpoint, with the
    longest segment as short as it can be.

    A segment that starts elsewhere first rebuilds the state from the checkpoint before it, running
    again, silently, iterations the segment before it runs too: with checkpoints at 4, 5, 10, 16
    and 19 of 20 epochs, an even split at 10 has its second worker restore 5 and run 6-19 (14
    epochs, a 1.4x speed-up at best); starting the second segment at 11 gives 11 and 9 (1.8x).
    Each later segment also pays ``restore``, and the last one the ``tail`` after the loop.

    The least longest segment is found by bisection over a greedy cover: from a start, a segment
    reaches as far as the bound allows and ends where a checkpoint lets the next one start. A later
    start never reaches less far (it has fewer iterations to run and the same restore), so the
    greedy cover uses the fewest segments a bound allows.
    """
    n = len(seconds)
    starts = sorted({c + 1 for c in checkpointed if 0 <= c < n - 1})
    if n == 0 or workers <= 1 or not starts:
        return ((0, n),)
    total = [0.0]
    for s in seconds:
        total.append(total[-1] + max(s, 0.0))

    def cost(start: int, stop: int) -> float:
        return (restore if start else 0.0) + total[stop] - total[start] + (tail if stop == n else 0.0)

    def cover(bound: float) -> list[int] | None:
        # the greedy cover's segment starts, or None when more than ``workers`` segments are needed
        chosen, start, candidates = [0], 0, [*starts, n]
        while True:
            reach = start
            for stop in candidates:  # sorted: the furthest end within the bound
                if stop <= start:
                    continue
                if cost(start, stop) > bound:
                    break
                reach = stop
            if reach == n:
                return chosen
            if reach == start or len(chosen) == workers:
                return None
            chosen.append(reach)
            start = reach

    low, high = 0.0, cost(0, n)
    for _ in range(60):
        if high - low <= 1e-6 * max(high, 1e-9):
            break
        middle = (low + high) / 2
        if cover(middle) is None:
            low = middle
        else:
            high = middle
    chosen = cover(high) or [0]
    bounds = [*chosen, n]
    return tuple((bounds[i], bounds[i + 1]) for i in range(len(chosen)))


def _exact_state_after(last: int, checkpointed: frozenset[int]) -> list[Step]:
    """Steps for iterations ``0..last`` that leave the state exactly as the record had it after ``last``."""
    anchor = max((c for c in checkpointed if c <= last), default=-1)
    steps = [Step(StepKind.SKIP) for _ in range(anchor)]
    if anchor >= 0:
        steps.append(Step(StepKind.RESTORE))
    steps.extend(Step(StepKind.SILENT) for _ in range(anchor + 1, last + 1))
    return steps


def schedule_scan(
    depth: Position,
    n: int,
    checkpointed: Iterable[int],
    segment: tuple[int, int] | None = None,
    nested: Iterable[int] = (),
) -> Schedule:
    """The main-loop steps of one replay process (see the module docstring).

    ``nested``: the checkpointed iterations that also hold the state where their first nested loop
    ended (checkpoints.CheckpointPoint.NESTED). Only those validate (see the module docstring).
    """
    ckpt = frozenset(i for i in checkpointed if 0 <= i < n)
    at_nested = frozenset(i for i in nested if i in ckpt)
    if depth is Position.PREFIX:
        return Schedule(steps=(), stop_after=True, writes_prefix=True, writes_suffix=False)
    if depth is Position.SUFFIX:
        steps = _exact_state_after(n - 1, ckpt)
        return Schedule(tuple(steps), stop_after=False, writes_prefix=True, writes_suffix=True)
    start, stop = segment if segment is not None else (0, n)
    if depth is Position.VALIDATION:
        scan = [Step(StepKind.VALIDATE) if i in at_nested else Step(StepKind.FULL) for i in range(start, stop)]
    else:
        scan = [Step(StepKind.FULL) for _ in range(start, stop)]
    steps = _exact_state_after(start - 1, ckpt) + scan
    return Schedule(tuple(steps), stop_after=stop < n, writes_prefix=start == 0, writes_suffix=stop >= n)


class RunCosts:
    """A run's recorded timings, arranged for estimating schedules."""

    def __init__(self, run: RecordedRun, main_ctxs: Sequence[int]) -> None:
        by_ctx: dict[tuple[int, str], float] = {(ctx, kind): seconds for ctx, kind, seconds in run.timings}
        self.known = (0, "prefix") in by_ctx
        self.total = run.seconds or 0.0
        self.prefix = by_ctx.get((0, "prefix"), 0.0)
        self.startup = by_ctx.get((0, "startup"), 0.0)  # interpreter + imports before the first flor call
        self.imports = by_ctx.get((0, "imports"), 0.0)  # the prefix's imports after it (import_timer.py)
        self.suffix = by_ctx.get((0, "suffix"), 0.0) + by_ctx.get((0, "between"), 0.0)
        self.iteration = [by_ctx.get((ctx, "iteration"), 0.0) for ctx in main_ctxs]
        self.inner = [by_ctx.get((ctx, "inner"), 0.0) for ctx in main_ctxs]
        restores = [s for (_ctx, kind), s in by_ctx.items() if kind == "restore"]
        materialized = [m for *_rest, m in run.checkpoints]
        if restores:
            self.restore = sum(restores) / len(restores)
        elif materialized:
            self.restore = DEFAULT_RESTORE_FACTOR * sum(materialized) / len(materialized)
        else:
            self.restore = 0.0

    def scan_seconds(self, depth: Position, nested: Iterable[int]) -> list[float]:
        """What a scan at ``depth`` spends in each main-loop iteration (for :func:`balance_segments`):
        a validated one its body without the nested loops, plus a restore; every other one in full.
        Without timings (a store from before them), every iteration counts the same."""
        if not self.known:
            return [1.0] * len(self.iteration)
        validated = frozenset(nested) if depth is Position.VALIDATION else frozenset()
        return [
            max(seconds - self.inner[i], 0.0) + self.restore if i in validated else seconds
            for i, seconds in enumerate(self.iteration)
        ]

    def estimate(self, schedule: Schedule) -> float:
        """Seconds a process following ``schedule`` should take."""
        if not self.known:
            return self.total  # recorded before timings existed: the whole run is the bound
        seconds = self.prefix
        for i, step in enumerate(schedule.steps):
            if step.kind is StepKind.RESTORE:
                seconds += self.restore
            elif step.kind in (StepKind.FULL, StepKind.SILENT):
                seconds += self.iteration[i]
            elif step.kind is StepKind.VALIDATE:
                seconds += max(self.iteration[i] - self.inner[i], 0.0) + self.restore
        if not schedule.stop_after:
            seconds += self.suffix
        return seconds


def main_loop_contexts(outer_loops: Sequence[tuple[int, str, int]], main_loop: str | None) -> list[int]:
    """The ctx ids of the main loop's iterations: the first run of an outermost loop of that name."""
    ctxs: list[int] = []
    for ctx, name, iteration in sorted(outer_loops):
        if name != main_loop:
            if ctxs:
                break  # another outermost loop after the main one
            continue
        if iteration == 0 and ctxs:
            break  # the same loop run a second time
        ctxs.append(ctx)
    return ctxs


def plan_replay(
    runs: Sequence[RecordedRun],
    today: Mapping[str, str | None],
    names: Sequence[str],
    *,
    workers: int = 1,
    device: str = "auto",
    start: StartCosts | None = None,
    modules: Mapping[str, str] | None = None,
) -> ReplayPlan:
    """Plan replaying ``names`` in ``runs``; ``today`` maps each script path to today's source (None: gone).

    :param start: start-up costs learned from earlier replays, and whether processes start warm
        (the first run of a script starts its server unless one is up; later ones fork from it).
        None: estimate the recorded timings alone.
    :param modules: path -> today's source of the project's other modules that log some of ``names``;
        the ones a script imports get their statements propagated into each run's snapshot of that
        module (``run.old_modules``).

    :raises ReplayError: no names, bad workers, or a name that no selected script logs today.
    """
    wanted = tuple(dict.fromkeys(names))
    if not wanted:
        raise ReplayError("Name the values to replay, e.g. flordb-build replay val_acc.")
    if workers < 1:
        raise ReplayError(f"--workers must be at least 1, got '{workers}'.")
    logged_today: dict[str, frozenset[str]] = {}
    for filename, source in today.items():
        if source is None:
            continue
        try:
            logged_today[filename] = analyze_script(source).names
        except RewriteError:
            logged_today[filename] = frozenset()
    helpers = dict(modules or {})
    logged_helpers: dict[str, frozenset[str]] = {}
    for path, source in helpers.items():
        try:
            logged_helpers[path] = analyze_script(source).names
        except RewriteError:
            logged_helpers[path] = frozenset()
    in_helpers = frozenset().union(*logged_helpers.values()) if logged_helpers else frozenset()
    everywhere = frozenset().union(*logged_today.values(), in_helpers) if logged_today else in_helpers
    unknown = [n for n in wanted if n not in everywhere]
    if unknown:
        scripts = ", ".join(f"'{f}'" for f in sorted(today)) or "none"
        raise ReplayError(
            f"Today's version of the selected scripts ({scripts}) does not log {', '.join(repr(n) for n in unknown)}; "
            "add the flor.log statement to today's script first, or check the spelling."
        )
    planned: list[RunPlan] = []
    skipped: list[SkippedRun] = []
    warm_starts = start is not None and start.warm
    served = set(start.live) if start is not None and warm_starts else set()  # scripts with a server up
    imports_of: dict[str, frozenset[str]] = {}
    for run in runs:
        # only the modules that the script imports and that log a wanted name: another entry script
        # logging the same name, or an unrelated module that does not parse, stays out
        if run.filename not in imports_of:
            imports_of[run.filename] = _imported_modules(today.get(run.filename))
        imported = imports_of[run.filename]
        mine = {
            p: s for p, s in helpers.items()
            if p != run.filename and logged_helpers[p] & set(wanted) and module_name(p) in imported
        }
        outcome = _plan_run(
            run, today.get(run.filename),
            logged_today.get(run.filename, frozenset()).union(*(logged_helpers[p] for p in mine)),
            wanted, workers, start, warm=warm_starts, starts_server=warm_starts and run.filename not in served,
            helpers=mine,
        )
        if isinstance(outcome, RunPlan):
            planned.append(outcome)
            if warm_starts:
                served.add(run.filename)  # the run's first job starts the server; later runs fork from it
        else:
            skipped.append(outcome)
    return ReplayPlan(names=wanted, runs=tuple(planned), skipped=tuple(skipped), workers=workers, device=device)


def _imported_modules(source: str | None) -> frozenset[str]:
    """The modules a script imports anywhere (``import a.b`` -> ``a.b``; ``from m import x`` -> ``m``)."""
    if source is None:
        return frozenset()
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return frozenset()
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module is not None:
            found.add(node.module)
    return frozenset(found)


def _plan_run(
    run: RecordedRun,
    today_source: str | None,
    today_names: frozenset[str],
    wanted: tuple[str, ...],
    workers: int,
    start: StartCosts | None,
    warm: bool,
    starts_server: bool = False,
    helpers: Mapping[str, str] | None = None,
) -> RunPlan | SkippedRun:
    def skip(reason: str, unaffected: bool = False) -> SkippedRun:
        return SkippedRun(run.run_id, run.task, run.filename, reason, unaffected)

    requested = [n for n in wanted if n in today_names]
    if today_source is None:
        return skip(f"'{run.filename}' is not in the work tree today, so there is no new code to propagate")
    if not requested:
        return skip(f"today's '{run.filename}' logs none of {', '.join(repr(n) for n in wanted)}", unaffected=True)
    if run.status != "ok":
        return skip(f"the run ended '{run.status}'; only runs that finished are replayed")
    if run.unavailable is not None or run.old_source is None or run.snapshot is None:
        return skip(run.unavailable or "the run has no snapshot commit (recorded outside git)")
    if any(MASK in token for token in run.argv or ()):
        shown = " ".join(run.argv or ())
        return skip(
            f"its command line was recorded with a secret masked ({shown}), and a replay without the value "
            "would not run what was recorded; pass secrets through the environment or a flor.arg default"
        )
    try:
        if helpers:
            project = propagate_project(
                {run.filename: today_source, **helpers}, {run.filename: run.old_source, **run.old_modules}, requested
            )
            entry = project.modules.get(run.filename)
            source = entry.source if entry is not None else run.old_source
            placed = tuple(p for _path, p in project.placed)
            not_placed = tuple(n for _path, n in project.refused)
            already = project.already_logged
            patched = {p: s for p, s in project.sources.items() if p != run.filename}
            depth = project.depth
        else:
            result = propagate(today_source, run.old_source, requested)
            source, placed, not_placed, already = result.source, result.placed, result.not_placed, result.already_logged
            patched, depth = {}, result.depth
    except RewriteError as exc:
        return skip(str(exc))
    if depth is None:
        reasons = [f"'{p.name}': {p.reason}" for p in not_placed]
        reasons += [f"'{name}': its version logs it already" for name in already]
        return skip("; ".join(reasons) or "nothing to place")
    main_loop = analyze_script(source).main_loop
    main_name = main_loop.name if main_loop is not None else None
    main_ctxs = main_loop_contexts(run.outer_loops, main_name)
    ctx_set = frozenset(main_ctxs)
    iteration_of = {ctx: i for i, ctx in enumerate(main_ctxs)}
    checkpointed = tuple(sorted({iteration_of[ctx] for ctx, _loop, _it, _m in run.checkpoints if ctx in ctx_set}))
    nested = tuple(sorted(iteration_of[ctx] for ctx in run.nested_checkpoints if ctx in ctx_set))
    n = len(main_ctxs)
    costs = RunCosts(run, main_ctxs)
    segments: tuple[tuple[int, int], ...] = ((0, n),)
    if depth in (Position.RANGE, Position.VALIDATION):  # scans of the main loop split across workers
        segments = balance_segments(costs.scan_seconds(depth, nested), workers, checkpointed, costs.restore, costs.suffix)
    schedules = [
        schedule_scan(depth, n, checkpointed, segment if len(segments) > 1 else None, nested) for segment in segments
    ]
    refusal = _carried_refusal(run, source, main_name, schedules)
    if refusal is not None:
        return skip(refusal)
    # A new server's first children import what the script imports after its first flor call
    # (the server preloads only the script's top-level imports); the server then imports it too,
    # and its later children skip it.
    learns = start is not None and starts_server and start.learns_imports(run.filename)
    # What start.seconds left out of a warm job of a later run (it assumes the server has learned it).
    skips_imports = (
        start is not None and warm and not starts_server and start.learns_imports(run.filename)
        and run.filename not in start.saving
    )
    start_seconds = (
        start.seconds(run.filename, warm, costs.prefix, costs.startup, 0.0 if starts_server else costs.imports)
        if start is not None else 0.0
    )
    estimates = tuple(costs.estimate(schedule) + start_seconds for schedule in schedules)
    server_start = start.server_start(run.filename, costs.startup) if start is not None and starts_server else 0.0
    return RunPlan(
        run_id=run.run_id,
        task=run.task,
        script=run.filename,
        snapshot=run.snapshot,
        depth=depth,
        estimate=max(estimates) + server_start + (start.bookkeeping(run.filename) if start is not None else 0.0),
        names=tuple(dict.fromkeys(p.name for p in placed)),
        placed=placed,
        not_placed=not_placed,
        source=source,
        args=dict(run.args),
        main_loop=main_name,
        iterations=n,
        checkpointed=checkpointed,
        segments=segments,
        segment_estimates=estimates,
        warm=warm,
        recorded_prefix=costs.prefix,
        old_source=run.old_source,
        modules=patched,
        old_modules={path: run.old_modules[path] for path in patched},
        argv=run.argv or (),
        nested=nested,
        server_start=server_start,
        prepare=start.preparing(run.filename) if start is not None else 0.0,
        server_learn=costs.imports if learns else 0.0,
        imports_skipped=costs.imports if skips_imports else 0.0,
    )


def _carried_refusal(run: RecordedRun, source: str, main_loop: str | None, schedules: Sequence[Schedule]) -> str | None:
    """Why the schedules would give wrong values: state the skipped code changes that no checkpoint restores."""
    skipping: Skipping | None = None
    for schedule in schedules:
        part = Skipping.of(schedule)
        if part is not None:
            skipping = part if skipping is None else skipping.merged(part)
    if skipping is None:
        return None  # a prefix scan or a full re-run: nothing is skipped, nothing has to be restored
    if run.stateless:
        return describe_stateless(run.stateless)
    carried = _find_carried(source, main_loop, skipping, run.stateless)
    return describe_carried(carried) if carried else None


#: Runs of one version share their analysis (a libcst parse with scope metadata per call).
_find_carried = functools.lru_cache(maxsize=64)(find_carried)
