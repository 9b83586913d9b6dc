"""Value types of replay: what a run recorded, the plan, the per-process spec, and the results.

Everything here is a frozen dataclass or an enum over plain data, so the planner stays pure and
the spec crosses the process boundary as JSON (environment variable :data:`REPLAY_ENV`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from ..replay_options import DEFAULT_REL_TOL as DEFAULT_REL_TOL  # one value for every front end
from ..replaying import REPLAY_ENV as REPLAY_ENV  # the variable that puts a script in replay mode

if TYPE_CHECKING:  # the rewrite package imports libcst; a replaying script never needs it
    from ..rewrite import NotPlaced, Placed, Position

#: Set in a warm-started replay process: the descriptor its progress lines go to (see _warm.py).
PROGRESS_FD_ENV = "FLOR_REPLAY_PROGRESS_FD"

#: Seconds a replay process costs outside its own lifetime before one was measured: a fork from a
#: warm server (with the job's snapshot and store slice written out: bench_scale's per-job
#: overhead, 0.18 s on the idle 2-core dev machine); or a fresh interpreter's spawn and teardown
#: (its start-up is in the recorded prefix).
DEFAULT_OVERHEAD = {True: 0.15, False: 0.15}
#: Seconds to commit a run's replay journal (hindsight/_journal.py) before one was measured.
DEFAULT_JOURNAL = 0.05
#: Seconds a new warm server costs its first job beyond the recorded start-up (interpreter and the
#: script's imports, which the server preloads) before one was measured: the server's own start and
#: its first fork. bench/bench_estimate.py learned 0.5 s beyond a 3.0 s recorded start-up on the
#: 2-core dev machine (2026-12-03, load 6).
DEFAULT_SERVER = 0.5
#: Driver seconds to prepare one run's jobs (the snapshot's archive, the store slice) before measured.
DEFAULT_PREPARE = 0.03
DEVICES = ("auto", "cpu", "cuda")


class StepKind(Enum):
    """What a replay does with one iteration of the main loop."""

    SKIP = "skip"  # not executed at all: its effects are covered by a later restore
    RESTORE = "restore"  # not executed; its checkpoint is restored (a pseudoresume point)
    SILENT = "silent"  # executed in full to rebuild state, its logs dropped (another worker owns them)
    FULL = "full"  # executed in full, nested loops included, logs kept
    VALIDATE = "validate"  # executed with nested loops skipped; state restored where they end


@dataclass(frozen=True)
class Step:
    """One main-loop iteration of a replay schedule."""

    kind: StepKind


@dataclass(frozen=True)
class Schedule:
    """A replay process's plan for the main loop: one step per recorded iteration."""

    steps: tuple[Step, ...]
    stop_after: bool  # exit once the main loop's steps are done (a range segment that is not last)
    writes_prefix: bool  # logs before the main loop are this process's to keep
    writes_suffix: bool  # logs after the main loop are this process's to keep


@dataclass(frozen=True)
class RecordedRun:
    """What the store and the snapshot hold about one selected run: the planner's input."""

    run_id: str
    task: str | None
    filename: str
    snapshot: str | None
    old_source: str | None  # the script in the snapshot; None when it cannot be read
    status: str = "ok"
    args: Mapping[str, Any] = field(default_factory=dict)
    #: The script's recorded arguments after its path (``runs.argv``); None when not recorded.
    argv: tuple[str, ...] | None = None
    seconds: float | None = None  # the recorded run's wall time
    #: ``(ctx_id, name, iteration)`` of the outermost loops' iterations, in ctx order.
    outer_loops: tuple[tuple[int, str, int], ...] = ()
    #: ``(ctx_id, kind, seconds)`` rows of ``timings``.
    timings: tuple[tuple[int, str, float], ...] = ()
    #: ``(ctx_id, loop_name, iteration, materialize_seconds)``, one per checkpointed iteration.
    checkpoints: tuple[tuple[int, str, int, float], ...] = ()
    #: ctx ids of the checkpoints that also hold the state where the iteration's first nested loop
    #: ended (checkpoints.CheckpointPoint.NESTED); every checkpoint holds the iteration's end.
    nested_checkpoints: frozenset[int] = frozenset()
    unavailable: str | None = None  # why the snapshot cannot be used (then old_source is None)
    #: path -> the snapshot's text of the project's other modules that log a requested name today
    old_modules: Mapping[str, str] = field(default_factory=dict)
    #: ``flor.checkpointing`` keywords whose every checkpoint held no state (``{}``; empty_state.py)
    stateless: tuple[str, ...] = ()


@dataclass(frozen=True)
class StartCosts:
    """What starting a replay process costs beyond the recorded timings (``_costs.py`` learns them)."""

    warm: bool = False  # warm starts are on
    live: frozenset[str] = frozenset()  # scripts whose warm server is already up
    saving: Mapping[str, float] = field(default_factory=dict)  # script -> prefix seconds a warm start skips
    #: script -> the prefix seconds of a fully warm replay process, as measured: unlike ``saving`` it
    #: does not carry the noise of the one recorded run it was measured against to every other run.
    warm_prefix: Mapping[str, float] = field(default_factory=dict)
    overhead: Mapping[tuple[str, bool], float] = field(default_factory=dict)  # (script, warm) -> seconds
    journal: Mapping[str, float] = field(default_factory=dict)  # script -> seconds to commit a replay journal
    server: Mapping[str, float] = field(default_factory=dict)  # script -> seconds a new warm server cost its first job
    prepare: Mapping[str, float] = field(default_factory=dict)  # script -> driver seconds to prepare a run's jobs

    def bookkeeping(self, script: str) -> float:
        """Seconds a replayed run of ``script`` spends after its processes: committing its journal."""
        return self.journal.get(script, DEFAULT_JOURNAL)

    def server_start(self, script: str, startup: float) -> float:
        """Seconds the job that starts ``script``'s warm server waits before its process forks.

        As a replay measured it; before any did, the recorded ``startup`` (interpreter and the
        script's imports: the server pays them again, preloading the same modules) plus
        :data:`DEFAULT_SERVER`.
        """
        learned = self.server.get(script)
        return learned if learned is not None else startup + DEFAULT_SERVER

    def preparing(self, script: str) -> float:
        """Driver seconds to prepare one run's jobs of ``script`` before they can start."""
        return self.prepare.get(script, DEFAULT_PREPARE)

    def learns_imports(self, script: str) -> bool:
        """Whether no fully warm replay process of ``script`` was measured yet: a new server lacks
        what the script imports after its first flor call, its first children import it, and the
        server then imports it too before its next fork (the learned preloads, ``_warm.py``)."""
        return script not in self.warm_prefix

    def seconds(self, script: str, warm: bool, prefix: float, startup: float = 0.0, imports: float = 0.0) -> float:
        """Seconds to add to the recorded timings' estimate for one process of ``script``.

        Every start costs its overhead outside the process; a warm start skips the imports of the
        recorded prefix (never more than the prefix): its prefix takes what a fully warm replay
        process's prefix measured (``warm_prefix``); before one did, the recorded prefix less the
        measured ``saving``, or less the recorded ``startup`` (interpreter and imports before the
        run's first flor call) and the ``imports`` the record timed after it, when its server has
        them preloaded (0: the process imports them itself, as the first children of a new server do).
        """
        overhead = self.overhead.get((script, warm), DEFAULT_OVERHEAD[warm])
        if not warm:
            return overhead
        measured = self.warm_prefix.get(script)
        if measured is not None:
            return overhead - max(prefix - measured, 0.0)
        return overhead - min(self.saving.get(script, startup + imports), prefix)


@dataclass(frozen=True)
class SkippedRun:
    """A selected run the plan leaves out, and why."""

    run_id: str
    task: str | None
    script: str
    reason: str
    unaffected: bool = False  # today's script does not log the names: nothing to replay, not a problem


@dataclass(frozen=True)
class RunPlan:
    """How one run is replayed: its patched script, scan depth, schedule per worker and estimate."""

    run_id: str
    task: str | None
    script: str
    snapshot: str
    depth: Position
    estimate: float  # seconds, wall time: the slowest segment, plus the run's bookkeeping
    names: tuple[str, ...]  # the names placed in this version: the values this replay stores
    placed: tuple[Placed, ...]
    not_placed: tuple[NotPlaced, ...]
    source: str  # the old version with the new statements
    args: Mapping[str, Any]
    main_loop: str | None
    iterations: int  # recorded iterations of the main loop
    checkpointed: tuple[int, ...]  # main-loop iterations with a checkpoint
    segments: tuple[tuple[int, int], ...]  # [start, stop) of main-loop iterations per worker
    segment_estimates: tuple[float, ...]
    warm: bool = False  # expected to fork from a warm server (one already up, or one its first job starts)
    recorded_prefix: float = 0.0  # the record's prefix seconds (interpreter start to the main loop)
    old_source: str = ""  # the script as recorded, before propagation (for --diff)
    modules: Mapping[str, str] = field(default_factory=dict)  # path -> propagated text of other modules
    old_modules: Mapping[str, str] = field(default_factory=dict)  # path -> their recorded text (for --diff)
    argv: tuple[str, ...] = ()  # the script's recorded arguments, passed again (before the --kwargs)
    nested: tuple[int, ...] = ()  # the checkpointed iterations that also hold their nested point
    #: Seconds its first job waits for the warm server it starts (0: a server is up, or an earlier
    #: run of the script starts it); the script's other jobs cannot fork before it is up either.
    server_start: float = 0.0
    prepare: float = 0.0  # driver seconds to prepare its jobs (archive, store slice) before they start
    #: Seconds the server its first job starts then spends importing what the run's jobs imported
    #: after the script's first flor call (the record's ``imports``), once that job has ended and
    #: reported them (0: nothing to learn, or no server start).
    server_learn: float = 0.0
    #: The record's ``imports`` that this run's warm job estimates leave out, as if the server had
    #: learned them; a job that begins before the script's first job of this replay ended pays them.
    imports_skipped: float = 0.0

    @property
    def version(self) -> str:
        """The snapshot commit, short."""
        return self.snapshot[:8]


@dataclass(frozen=True)
class ReplayPlan:
    """Every selected run: replayed (``runs``) or left out with a reason (``skipped``)."""

    names: tuple[str, ...]
    runs: tuple[RunPlan, ...]
    skipped: tuple[SkippedRun, ...]
    workers: int = 1
    device: str = "auto"

    @property
    def estimate(self) -> float:
        """Estimated seconds of the whole replay: the makespan of its jobs over ``workers`` slots.

        The jobs queue in plan order and each starts on the first slot that frees up (as
        ``run_replay`` submits them), once the driver has prepared its run (runs are prepared one
        after the other, in plan order) and, for a warm job, once its script's warm server is up:
        the run that starts the server holds every warm job of that script until then. Where the new
        server still has to learn what the script imports after its first flor call, the server
        imports it at the first fork after the script's first job ended and reported it
        (``server_learn``, paid by that job); a warm job that began before then imports it itself
        (``imports_skipped`` added back), as ``_warm_server.py`` does: a fork request carries the
        modules learned so far and the server imports them before it forks. A run's
        bookkeeping (its journal commit) follows its slowest job. With one slot and nothing to
        start or prepare this is the sum of the runs' estimates.
        """
        free = [0.0] * max(1, self.workers)  # when each slot is free next
        ready: dict[str, float] = {}  # script -> when its warm server is up
        learned: dict[str, float] = {}  # script -> when its new server can learn its later imports
        to_learn: dict[str, float] = {}  # script -> seconds the server's first fork after that imports
        prepared = 0.0  # when the driver has prepared the runs so far
        end = 0.0
        for run in self.runs:
            prepared += run.prepare
            ends = []
            for worker, seconds in enumerate(run.segment_estimates or (run.estimate,)):
                slot = min(range(len(free)), key=free.__getitem__)
                begin = max(free[slot], prepared, ready.get(run.script, 0.0) if run.warm else 0.0)
                if worker == 0 and run.server_start > 0:
                    ready[run.script] = begin + run.server_start
                    seconds += run.server_start
                if run.script in learned:
                    if begin < learned[run.script]:
                        seconds += run.imports_skipped  # forked before the server learned them
                    else:
                        seconds += to_learn.pop(run.script, 0.0)  # the server imports them at this fork
                free[slot] = begin + seconds
                ends.append(free[slot])
            if run.server_learn > 0 and run.script not in learned:
                learned[run.script] = min(ends)
                to_learn[run.script] = run.server_learn
            slowest = max(run.segment_estimates, default=run.estimate - run.server_start)
            bookkeeping = max(0.0, run.estimate - run.server_start - slowest)
            end = max(end, max(ends) + bookkeeping)
        return end

    def why_no_runs(self) -> str:
        """Why the plan replays no run: what its skipped runs say (for ``nothing replayed: ...``)."""
        names = ", ".join(f"'{name}'" for name in self.names)
        if not self.skipped:
            return "no recorded run was selected"
        if all(skipped.unaffected for skipped in self.skipped):
            return f"no selected run's script logs {names} today ({len(self.skipped)} run(s) selected)"
        first = next(skipped for skipped in self.skipped if not skipped.unaffected)
        return f"every selected run was skipped ({len(self.skipped)}); first: run {first.run_id}: {first.reason}"


@dataclass(frozen=True)
class ReplayJob:
    """One replay process: a run and the segment (worker) it covers."""

    run: RunPlan
    worker: int
    segment: tuple[int, int] | None  # None: the whole main loop (no split)
    schedule: Schedule
    device: str
    estimate: float


#: The name of the :class:`Mismatch` a replay reports when its random generators left the record's
#: (hindsight/_generators.py): no value of the record differs, its trajectory does.
GENERATORS = "flor.rng"


@dataclass(frozen=True)
class Mismatch:
    """Values that both the record and the replay logged, and that differ."""

    run_id: str
    name: str
    compared: int
    differing: int
    example: str  # the first difference, readable


@dataclass(frozen=True)
class JobResult:
    """What one replay process did."""

    run_id: str
    worker: int
    ok: bool
    seconds: float
    stored: int = 0  # replayed values written to the store
    error: str | None = None
    notes: tuple[str, ...] = ()
    counters: Mapping[str, int] = field(default_factory=dict)
    mismatches: tuple[Mismatch, ...] = ()
    warm: bool = False  # forked from a warm server rather than started fresh
    #: Of ``seconds``, the wait for a warm server another job was starting and for its imports
    #: before the fork: the plan's makespan holds them, the run's own estimate does not.
    waited: float = 0.0


@dataclass(frozen=True)
class RunOutcome:
    """The result of replaying one run (all its workers)."""

    run_id: str
    estimate: float
    seconds: float
    ok: bool
    stored: int
    errors: tuple[str, ...]
    notes: tuple[str, ...]
    mismatches: tuple[Mismatch, ...]
    counters: Mapping[str, int]
    warm: bool = False  # every process of the run was forked from a warm server
    waited: float = 0.0  # of ``seconds``, its slowest job's wait for a server (``JobResult.waited``)
    #: Why none of the run's replayed values were written (None: they were; _backfill.py).
    withheld: str | None = None
    #: Written although the values both the record and the replay logged differ (--accept-divergent):
    #: the store marks the run's names as divergent (table ``replay_divergent``).
    divergent: bool = False


@dataclass(frozen=True)
class ReplayReport:
    """Every run's outcome, in plan order."""

    plan: ReplayPlan
    outcomes: tuple[RunOutcome, ...]
    notes: tuple[str, ...] = ()  # about the session as a whole (a warm server kept up)
    #: Why a replay that was asked to run had no run to run (None: it had, or it was a dry run).
    no_runs: str | None = None

    @property
    def ok(self) -> bool:
        """True when every run replayed without error and its values were written (and there was a run)."""
        return self.no_runs is None and all(outcome.ok for outcome in self.outcomes)

    @property
    def nothing_replayed(self) -> str | None:
        """``nothing replayed: <why>`` when not one run's values were written; None when some were.

        Scripts and CI read it as a failure (the command exits non-zero): a replay that wrote
        nothing did not do what it was asked, whatever the reason.
        """
        if self.no_runs is not None:
            return f"nothing replayed: {self.no_runs}"
        if not self.outcomes or any(outcome.ok for outcome in self.outcomes):
            return None
        withheld = sum(1 for o in self.outcomes if not o.errors)
        failed = len(self.outcomes) - withheld
        counts = ", ".join(
            f"{n} {what}" for n, what in ((failed, "failed"), (withheld, "withheld")) if n
        )
        return f"nothing replayed: every run's values were left out ({counts}); first: {self.first_error}"

    @property
    def first_error(self) -> str | None:
        """The first failed run's first error, or why its values were withheld."""
        for outcome in self.outcomes:
            if not outcome.ok:
                return next(iter(outcome.errors), outcome.withheld or "its values were not written")
        return None

    @property
    def mismatches(self) -> tuple[Mismatch, ...]:
        """Nondeterminism found in any run."""
        return tuple(m for outcome in self.outcomes for m in outcome.mismatches)


@dataclass(frozen=True)
class ReplaySpec:
    """What a replay process needs to know; travels as JSON in :data:`REPLAY_ENV`."""

    run_id: str
    depth: str
    names: tuple[str, ...]
    main_loop: str | None
    schedule: Schedule
    device: str
    db: str
    root: str
    projid: str
    filename: str
    task: str | None
    args: Mapping[str, Any]
    session: str  # the replay session whose staging the process writes into (_staging.py)
    worker: int = 0
    result: str | None = None  # where the process writes its result JSON
    progress_fd: int | None = None
    #: ``[tool.flordb_build]`` settings of the driver's project (``Config`` field -> plain value):
    #: the child's Config is built from them, not from a pyproject.toml it may not be able to read.
    #: None: read ``<root>/pyproject.toml``.
    settings: Mapping[str, Any] | None = None

    def to_json(self) -> str:
        """The spec as the JSON text of :data:`REPLAY_ENV`."""
        data = {
            "run_id": self.run_id, "depth": self.depth, "names": list(self.names), "main_loop": self.main_loop,
            "steps": [s.kind.value for s in self.schedule.steps],
            "stop_after": self.schedule.stop_after, "writes_prefix": self.schedule.writes_prefix,
            "writes_suffix": self.schedule.writes_suffix, "device": self.device, "db": self.db,
            "root": self.root, "projid": self.projid, "filename": self.filename, "task": self.task,
            "args": dict(self.args), "session": self.session, "worker": self.worker, "result": self.result,
            "progress_fd": self.progress_fd,
            "settings": dict(self.settings) if self.settings is not None else None,
        }
        return json.dumps(data, default=str)

    @classmethod
    def from_json(cls, text: str) -> ReplaySpec:
        """Read the JSON written by :meth:`to_json`."""
        data = json.loads(text)
        schedule = Schedule(
            steps=tuple(Step(StepKind(kind)) for kind in data["steps"]),
            stop_after=bool(data["stop_after"]),
            writes_prefix=bool(data["writes_prefix"]),
            writes_suffix=bool(data["writes_suffix"]),
        )
        return cls(
            run_id=data["run_id"], depth=data["depth"], names=tuple(data["names"]), main_loop=data["main_loop"],
            schedule=schedule, device=data["device"], db=data["db"], root=data["root"], projid=data["projid"],
            filename=data["filename"], task=data["task"], args=data["args"], session=data["session"],
            worker=int(data["worker"]),
            result=data["result"], progress_fd=data["progress_fd"], settings=data.get("settings"),
        )


def format_seconds(seconds: float) -> str:
    """``0.42s``, ``12.3s``, ``4m05s``."""
    if seconds < 10:
        return f"{seconds:.2f}s"
    if seconds < 120:
        return f"{seconds:.1f}s"
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
