"""Executing a replay plan: every run's jobs in one queue, each run settled when its last job ends.

    run_replay(plan)
      ReplayDriver.payload(job) for every job of every run -> executor.submit   (N slots: --workers)
        payload: the snapshot's git archive (read once per commit), the patched sources, argv,
        env, settings, where the checkpoint objects are, the store slice (_slice.py: the run's
        rows and what asof.py shows its script)
      worker: run_job(payload) (_executors.py): tar -> tmp/tree, the child (warm fork or
        python -m _child) replays against the slice and stages its values there; the reply
        carries the staged rows back
      for reply in executor.completed():            (in the order jobs end)
        ReplayDriver.ingest: stage the rows (the driver is the only writer of the store),
          compare what the job logged with what was recorded (nondeterminism check)
        a run's last reply: decide(outcome): finish or withhold it   (_backfill.py: the one decision)
          ReplayDriver.finish_run: journal, then promote the staged values in one transaction; or drop
      -> RunOutcome per run, in plan order: estimated vs actual seconds, mismatches, errors, why withheld
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import json
import math
import os
import queue
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

from ..config import Config, load_config
from ..errors import FlorBuildError, ReplayError, WarmStartError
from ..redaction import contains_mask
from ..values import decode_value
from ._backfill import Backfill, Decision, decide
from ._executors import Executor, JobPayload, JobReply, LocalExecutor, Progress
from ._model import (
    DEFAULT_REL_TOL,
    GENERATORS,
    JobResult,
    Mismatch,
    ReplayJob,
    ReplayPlan,
    ReplayReport,
    ReplaySpec,
    RunOutcome,
    RunPlan,
    format_seconds,
)

if TYPE_CHECKING:
    from ..store import Store

#: Recorded environment variables a replay does not take over (they name this replay's own setup).
_NOT_RESTORED_PREFIXES = ("FLOR_", "VIRTUAL_ENV", "CONDA_")
#: How often the progress of running jobs is polled for the progress line.
_PROGRESS_POLL_SECONDS = 0.2


class ReplayExecutor(Protocol):
    """Runs one replay job in the calling thread; ``progress(done, total)`` reports main-loop
    iterations (a stand-in for the store-backed :class:`ReplayDriver`, e.g. in tests of scheduling).

    It may also have ``cancel()`` (kill what runs) and ``finish_run(run, decision) -> decision``.
    """

    def __call__(self, job: ReplayJob, progress: Progress) -> JobResult: ...


# -- the plan as jobs -----------------------------------------------------------------------------


def jobs_of(run: RunPlan, device: str) -> list[ReplayJob]:
    """One job per segment of ``run`` (one job unless a range or validation scan is split across workers)."""
    from ._plan import schedule_scan

    split = len(run.segments) > 1
    return [
        ReplayJob(
            run=run,
            worker=worker,
            segment=segment if split else None,
            schedule=schedule_scan(run.depth, run.iterations, run.checkpointed, segment if split else None, run.nested),
            device=device,
            estimate=run.segment_estimates[worker],
        )
        for worker, segment in enumerate(run.segments)
    ]


def job_key(job: ReplayJob) -> str:
    """The job's key among a session's jobs (``JobPayload.key``)."""
    return f"{job.run.run_id}/{job.worker}"


def run_replay(
    plan: ReplayPlan,
    executor: Executor | ReplayExecutor | None = None,
    *,
    config: Config | None = None,
    progress: Callable[[RunPlan, int, int], None] | None = None,
    rel_tol: float = DEFAULT_REL_TOL,
    warm: bool | None = None,
    accept_divergent: bool = False,
) -> ReplayReport:
    """Execute ``plan``: the jobs of every run in one queue over ``plan.workers`` slots; each run is
    checked and finished (journalled, backfilled) or withheld as soon as its last job is done.

    :param executor: the backend that runs job payloads (default :class:`LocalExecutor` with
        ``plan.workers`` slots and this machine's warm servers; a given one is not closed here),
        or a :class:`ReplayExecutor` callable that runs a job itself (no store is touched then).
    :param progress: called with (run, iterations done, iterations total) as replays advance.
    :param warm: fork processes from warm servers (None: the project's setting, on by default).
    :param accept_divergent: write a run's values although values both the record and the replay
        logged differ beyond ``rel_tol`` (marked divergent); by default they are withheld.
    """
    decider = functools.partial(decide, rel_tol=rel_tol, accept_divergent=accept_divergent)
    if executor is not None and not hasattr(executor, "submit"):
        calls = _CalledJobs(executor, plan.workers)
        try:
            outcomes = _schedule(plan, calls, progress, decider)
        finally:
            calls.close()
        return ReplayReport(plan=plan, outcomes=tuple(outcomes))
    config = config or load_config()
    driver = ReplayDriver(config, rel_tol=rel_tol, warm=warm)
    notes: tuple[str, ...] = ()
    backend = executor if executor is not None else make_executor(config, plan.workers, warm, *_configured(config))
    try:
        outcomes = _schedule(plan, _SubmittedJobs(driver, backend), progress, decider)  # type: ignore[arg-type]
    finally:
        try:
            if executor is None:
                notes = backend.close()  # type: ignore[union-attr]
        finally:
            driver.close()
    return ReplayReport(plan=plan, outcomes=tuple(outcomes), notes=notes)


def _configured(config: Config) -> tuple[str, str | None]:
    """``replay_executor`` and, for Ray, ``ray_address`` of the project."""
    return config.replay_executor, config.ray_address if config.replay_executor == "ray" else None


def make_executor(config: Config, slots: int, warm: bool | None, kind: str = "local", address: str | None = None) -> Executor:
    """The backend a replay runs on: ``"local"`` (:func:`local_executor`) or ``"ray"`` (Ray tasks on
    the cluster at ``address``, or on a local Ray started for the replay; ``_ray.py``).

    :raises ReplayError: an unknown kind, Ray not installed, or its cluster unreachable.
    """
    if kind == "local":
        return local_executor(config, slots, warm)
    if kind == "ray":
        from ._executors import ray_worker_setup
        from ._ray import RayExecutor
        from ._warm import warm_settings

        enabled, _keep = warm_settings(config)
        # Each Ray worker makes its node-local warm pool once; cold starts when warm starts are off.
        setup = ray_worker_setup if (enabled if warm is None else warm) else None
        return RayExecutor(slots, address, worker_setup=setup)
    raise ReplayError(f"unknown replay executor '{kind}': use 'local' or 'ray'.")


def local_executor(config: Config, slots: int, warm: bool | None) -> LocalExecutor:
    """A :class:`LocalExecutor` with this machine's warm servers (unless warm starts are off)."""
    from ._warm import WarmPool, warm_settings

    enabled, keep_warm = warm_settings(config)
    if not (enabled if warm is None else warm):
        return LocalExecutor(slots)
    try:
        return LocalExecutor(slots, pool=WarmPool(config, keep_warm))
    except WarmStartError as exc:
        return LocalExecutor(slots, notes=(f"started cold: {exc}",))


class _Jobs(Protocol):
    """What :func:`_schedule` drives: jobs started, their results as they end (by key)."""

    def start(self, job: ReplayJob) -> None: ...

    def results(self) -> Iterator[tuple[str, JobResult]]: ...

    def progress(self) -> Mapping[str, tuple[int, int]]: ...

    def cancel(self) -> None: ...

    def finish_run(self, run: RunPlan, decision: Decision) -> Decision: ...


def _schedule(
    plan: ReplayPlan, jobs: _Jobs, progress: Callable[[RunPlan, int, int], None] | None,
    decider: Callable[[RunOutcome], Decision],
) -> list[RunOutcome]:
    """Start every job of every run, then settle each run when its last result is in.

    ::

        start(a/0) start(a/1) start(b/0) ... start(h/0)     one queue, N slots (the backend's)
        result b/0 -> b done: decide, finish_run(b)          while a/0, a/1, c/0 ... still run
        result a/1, result a/0 -> a done: decide, finish_run(a)
    """
    by_key: dict[str, ReplayJob] = {}
    left: dict[str, int] = {}
    results: dict[str, list[JobResult]] = {}
    totals: dict[str, int] = {}
    runs = {run.run_id: run for run in plan.runs}
    settled: dict[str, RunOutcome] = {}
    watcher = _ProgressWatcher(jobs, by_key, runs, totals, progress) if progress is not None else None
    try:
        for run in plan.runs:
            run_jobs = jobs_of(run, plan.device)
            left[run.run_id] = len(run_jobs)
            results[run.run_id] = []
            totals[run.run_id] = sum(len(job.schedule.steps) for job in run_jobs)
            for job in run_jobs:
                by_key[job_key(job)] = job
                jobs.start(job)
        if watcher is not None:
            watcher.start()
        for key, result in jobs.results():
            run = by_key[key].run
            results[run.run_id].append(result)
            left[run.run_id] -= 1
            if left[run.run_id]:
                continue
            if watcher is not None:
                watcher.finished(run)
            settled[run.run_id] = _settle(run, results[run.run_id], jobs, decider)
    except BaseException:
        # Ctrl-C (or a failure of ours): end every job's processes, or the backend's shutdown
        # would wait for whole replays.
        jobs.cancel()
        raise
    finally:
        if watcher is not None:
            watcher.stop()
    return [settled[run.run_id] for run in plan.runs]


def _settle(
    run: RunPlan, results: Sequence[JobResult], jobs: _Jobs, decider: Callable[[RunOutcome], Decision]
) -> RunOutcome:
    """Decide the run from its jobs' results and carry it out (journal and promote, or drop)."""
    started = time.perf_counter()
    ordered = sorted(results, key=lambda r: r.worker)
    # The run's time is its slowest job's (they may have waited for a slot) plus its bookkeeping.
    outcome = _outcome(run, ordered, max((r.seconds for r in ordered), default=0.0))
    decision = jobs.finish_run(run, decider(outcome))
    return dataclasses.replace(
        outcome, ok=outcome.ok and decision.finish, withheld=decision.withheld,
        seconds=outcome.seconds + time.perf_counter() - started, divergent=decision.finish and bool(decision.divergent),
    )


class _ProgressWatcher:
    """Polls the running jobs' progress and draws it per run (many runs may be in flight)."""

    def __init__(
        self, jobs: _Jobs, by_key: Mapping[str, ReplayJob], runs: Mapping[str, RunPlan], totals: Mapping[str, int],
        draw: Callable[[RunPlan, int, int], None],
    ) -> None:
        self.jobs = jobs
        self.by_key = by_key
        self.runs = runs
        self.totals = totals
        self.draw = draw
        self._done: dict[str, dict[str, int]] = {}  # run -> key -> iterations done
        self._drawn: dict[str, int] = {}
        self._finished: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="flor-replay-progress", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(_PROGRESS_POLL_SECONDS):
            self.poll()

    def poll(self) -> None:
        """Draw every run whose progress changed since the last poll."""
        with self._lock:
            for key, (done, _total) in self.jobs.progress().items():
                job = self.by_key.get(key)
                if job is None or job.run.run_id in self._finished:
                    continue
                self._done.setdefault(job.run.run_id, {})[key] = done
            for run_id, done_by_key in self._done.items():
                done = sum(done_by_key.values())
                if run_id not in self._finished and self._drawn.get(run_id) != done:
                    self._drawn[run_id] = done
                    self.draw(self.runs[run_id], done, self.totals[run_id])

    def finished(self, run: RunPlan) -> None:
        """The run's last job ended: draw it complete, and never again."""
        self.poll()
        with self._lock:
            self._finished.add(run.run_id)
            total = self.totals[run.run_id]
            self.draw(run, total, total)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


class _CalledJobs:
    """:class:`_Jobs` over a :class:`ReplayExecutor` callable, ``slots`` jobs at a time in threads."""

    def __init__(self, executor: ReplayExecutor, slots: int) -> None:
        self.executor = executor
        self._pool = ThreadPoolExecutor(max_workers=max(1, slots), thread_name_prefix="flor-replay")
        self._results: queue.Queue[tuple[str, JobResult]] = queue.Queue()
        self._progress: dict[str, tuple[int, int]] = {}
        self._lock = threading.Lock()
        self._started = 0

    def start(self, job: ReplayJob) -> None:
        key = job_key(job)

        def work() -> None:
            def report(done: int, total: int) -> None:
                with self._lock:
                    self._progress[key] = (done, total)

            try:
                result = self.executor(job, report)
            except Exception as exc:  # a job's result is never lost: results() waits for each
                result = JobResult(job.run.run_id, job.worker, False, 0.0, error=f"the replay job raised {exc!r}")
            self._results.put((key, result))

        self._started += 1
        self._pool.submit(work)

    def results(self) -> Iterator[tuple[str, JobResult]]:
        for _ in range(self._started):
            yield self._results.get()

    def progress(self) -> Mapping[str, tuple[int, int]]:
        with self._lock:
            return dict(self._progress)

    def cancel(self) -> None:
        cancel = getattr(self.executor, "cancel", None)
        if cancel is not None:
            cancel()

    def finish_run(self, run: RunPlan, decision: Decision) -> Decision:
        finish = getattr(self.executor, "finish_run", None)
        return finish(run, decision) if finish is not None else decision

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class _SubmittedJobs:
    """:class:`_Jobs` over an :class:`Executor` backend: payloads out, replies in, via the driver."""

    def __init__(self, driver: ReplayDriver, executor: Executor) -> None:
        self.driver = driver
        self.executor = executor
        self._jobs: dict[str, ReplayJob] = {}

    def start(self, job: ReplayJob) -> None:
        payload = self.driver.payload(job)
        self._jobs[payload.key] = job
        self.executor.submit(payload)

    def results(self) -> Iterator[tuple[str, JobResult]]:
        for reply in self.executor.completed():
            yield reply.key, self.driver.ingest(self._jobs[reply.key], reply)

    def progress(self) -> Mapping[str, tuple[int, int]]:
        return self.executor.progress()

    def cancel(self) -> None:
        self.executor.cancel()

    def finish_run(self, run: RunPlan, decision: Decision) -> Decision:
        return self.driver.finish_run(run, decision)


def _outcome(run: RunPlan, results: Sequence[JobResult], seconds: float) -> RunOutcome:
    counters: dict[str, int] = {}
    for result in results:
        for key, value in result.counters.items():
            counters[key] = counters.get(key, 0) + int(value)
    slowest = max(results, key=lambda r: r.seconds, default=None)
    return RunOutcome(
        run_id=run.run_id,
        estimate=run.estimate,
        seconds=seconds,
        waited=slowest.waited if slowest is not None else 0.0,
        ok=all(r.ok for r in results),
        stored=sum(r.stored for r in results),
        errors=tuple(f"worker {r.worker}: {r.error}" if len(results) > 1 else str(r.error) for r in results if r.error),
        notes=tuple(dict.fromkeys(note for r in results for note in r.notes)),
        mismatches=merge_mismatches([m for r in results for m in r.mismatches]),
        counters=counters,
        warm=all(r.warm for r in results),
    )


# -- nondeterminism check -------------------------------------------------------------------------


def values_match(recorded: Any, replayed: Any, rel_tol: float = DEFAULT_REL_TOL) -> bool:
    """Exact for ints, strings and bools; relative tolerance for floats; recursive for lists and dicts.

    A recorded None matches a replayed NaN: SQLite stores a float NaN as NULL, so a NaN the record
    logged reads back as None (and a logged None is stored the same way: neither is kept apart).
    """
    if recorded is None and isinstance(replayed, float) and math.isnan(replayed):
        return True
    if isinstance(recorded, float) or isinstance(replayed, float):
        if isinstance(recorded, bool) or isinstance(replayed, bool):
            return recorded == replayed
        if not isinstance(recorded, int | float) or not isinstance(replayed, int | float):
            return False
        if math.isnan(recorded) and math.isnan(replayed):
            return True
        return math.isclose(recorded, replayed, rel_tol=rel_tol, abs_tol=0.0) or recorded == replayed
    if isinstance(recorded, list) and isinstance(replayed, list):
        return len(recorded) == len(replayed) and all(
            values_match(a, b, rel_tol) for a, b in zip(recorded, replayed, strict=True)
        )
    if isinstance(recorded, dict) and isinstance(replayed, dict):
        return recorded.keys() == replayed.keys() and all(values_match(recorded[k], replayed[k], rel_tol) for k in recorded)
    return type(recorded) is type(replayed) and bool(recorded == replayed)


def compare_values(
    run_id: str,
    recorded: Mapping[tuple[int, str], Sequence[Any]],
    replayed: Mapping[tuple[int, str], Sequence[Any]],
    describe: Callable[[int], str] = str,
    rel_tol: float = DEFAULT_REL_TOL,
) -> tuple[Mismatch, ...]:
    """Per name: how many values logged at the same context (in the same order) differ.

    The names come in the order of their first difference (contexts in the order the run made
    them), so the first mismatch is the earliest point where the replay left the record.
    """
    stats: dict[str, list[Any]] = {}
    for key in sorted(replayed.keys() & recorded.keys()):
        ctx, name = key
        entry = stats.setdefault(name, [0, 0, "", (math.inf, "")])
        for old, new in zip(recorded[key], replayed[key], strict=False):
            entry[0] += 1
            if not values_match(old, new, rel_tol):
                entry[1] += 1
                if not entry[2]:
                    entry[2] = f"{describe(ctx)}: recorded {old!r}, replayed {new!r}"
                    entry[3] = (ctx, name)
    differing = sorted((entry[3], name) for name, entry in stats.items() if entry[1])
    return tuple(Mismatch(run_id, name, *stats[name][:3]) for _first, name in differing)


def merge_mismatches(mismatches: Sequence[Mismatch]) -> tuple[Mismatch, ...]:
    """One mismatch per (run, name) across the workers of a run."""
    merged: dict[tuple[str, str], Mismatch] = {}
    for m in mismatches:
        prev = merged.get((m.run_id, m.name))
        merged[(m.run_id, m.name)] = m if prev is None else Mismatch(
            m.run_id, m.name, prev.compared + m.compared, prev.differing + m.differing, prev.example
        )
    return tuple(merged.values())


# -- the driver: payloads out, replies in ---------------------------------------------------------


class ReplayDriver:
    """The driver's side of a replay session: it builds each job's payload and ingests its reply.

    It is the only writer of the store: a reply's staged rows go into the session's staging
    (``_staging.py``) here, and :meth:`finish_run` journals and promotes a run's, or drops them
    (``_backfill.py``). The snapshot's ``git archive`` is read once per commit and the store slice
    (``_slice.py``) once per run, whatever the number of its jobs.
    """

    def __init__(self, config: Config, *, rel_tol: float = DEFAULT_REL_TOL, warm: bool | None = None) -> None:
        from ._warm import warm_settings

        self.config = config
        self.rel_tol = rel_tol
        enabled, _keep = warm_settings(config)
        self.warm = enabled if warm is None else warm
        self.links = replay_links(config)
        self.import_paths = tuple(str(p) for p in project_import_paths(config.root))
        self._tars: dict[str, bytes] = {}
        self._reads: dict[str, bool] = {}  # snapshot -> its Python files may read the store
        self._slices: dict[str, bytes] = {}
        # What this session measured of its start costs, learned at close() (_costs.py).
        self._warm_overheads: dict[str, list[float]] = {}
        self._prepared: dict[str, dict[str, float]] = {}  # script -> run -> driver seconds preparing its jobs
        self._ingested: dict[str, float] = {}  # run -> driver seconds staging its replies
        self.backfill = Backfill(config)  # it holds the session's lock until close()
        from ..store import Store

        try:
            # One connection for the session's reads and staging writes (an open costs ~15 ms).
            self.store = Store.open(config)
        except BaseException:
            self.backfill.close()
            raise

    def payload(self, job: ReplayJob) -> JobPayload:
        """Everything a worker needs for ``job``, with no path into this project but the objects'."""
        started = time.perf_counter()
        try:
            return self._payload(job)
        finally:
            per_run = self._prepared.setdefault(job.run.script, {})
            per_run[job.run.run_id] = per_run.get(job.run.run_id, 0.0) + time.perf_counter() - started

    def _payload(self, job: ReplayJob) -> JobPayload:
        from ..snapshot import archive_snapshot
        from ._slice import build_slice

        run = job.run
        sources = {run.script: run.source, **run.modules}
        params = self.config.root / self.config.params if self.config.params else None
        if params is not None and params.is_file():  # flor.arg reads today's params file, as before
            sources[self.config.params or ""] = params.read_text(encoding="utf-8")
        if run.snapshot not in self._tars:
            self._tars[run.snapshot] = archive_snapshot(self.config.root, run.snapshot)
            self._reads[run.snapshot] = _snapshot_reads_store(self._tars[run.snapshot])
        reads = self._reads[run.snapshot] or _sources_read_store(sources.values())
        if run.run_id not in self._slices:
            # Before the run's first job: the store shows the run's newest replay journal.
            self.backfill.begin_run(run.run_id)
            self._slices[run.run_id] = build_slice(self.config, run.run_id, as_of=reads)
        spec = ReplaySpec(
            run_id=run.run_id, depth=run.depth.value, names=run.names, main_loop=run.main_loop,
            schedule=job.schedule, device=job.device, db="", root="", projid=self.config.projid,
            filename=run.script, task=run.task, args=dict(run.args), session=self.backfill.session, worker=job.worker,
            settings={"flush_seconds": self.config.flush_seconds, "params": self.config.params,
                      "busy_timeout_seconds": self.config.busy_timeout_seconds},
        )
        from ..objects import OBJECTS_DIR_NAME

        objects_dir = self.config.db_path.parent / OBJECTS_DIR_NAME
        if self.config.objects:
            # .flor/objects caches the remote store: a worker on this machine (it links the folder
            # where it exists) keeps what it restores there, as on a machine that never recorded.
            objects_dir.mkdir(parents=True, exist_ok=True)
        return JobPayload(
            key=job_key(job), snapshot_sha=run.snapshot, snapshot_tar=self._tars[run.snapshot],
            gpus=1.0 if job.device == "cuda" else 0.0, spec=spec, script=run.script, sources=sources,
            # The recorded flags first (the script's own argparse reads them), then the recorded --kwargs.
            argv=(*run.argv, *kwargs_tokens(run.args)),
            env=replay_environment(self.config, run.run_id, run.task, job.device, self.store),
            import_paths=self.import_paths, settings={},
            objects_dir=str(objects_dir), objects_url=self.config.objects,
            store_slice=self._slices[run.run_id], reads_store=reads,
            links=tuple((rel, str(self.config.root / rel)) for rel in self.links),
            warm=self.warm, project_root=str(self.config.root),
        )

    def ingest(self, job: ReplayJob, reply: JobReply) -> JobResult:
        """Stage the reply's rows for its run, compare what it logged with the record; the job's result."""
        started = time.perf_counter()
        try:
            return self._ingest(job, reply)
        finally:
            self._ingested[job.run.run_id] = self._ingested.get(job.run.run_id, 0.0) + time.perf_counter() - started

    def _ingest(self, job: ReplayJob, reply: JobReply) -> JobResult:
        from ._staging import stage_batch

        run = job.run
        outcome = reply.outcome or {}
        notes = tuple(reply.notes)
        # The job that started the server waited for it as its run's estimate says (server_start).
        waited = 0.0 if reply.fresh_server else reply.waited
        if not reply.ok:
            return JobResult(run.run_id, job.worker, False, reply.seconds, error=reply.error, notes=notes, warm=reply.warm,
                             waited=waited)
        try:
            stage_batch(self.store.conn, self.backfill.session, run.run_id, reply.loops, reply.logs)
        except (FlorBuildError, sqlite3.Error) as exc:
            return JobResult(run.run_id, job.worker, False, reply.seconds, notes=notes, warm=reply.warm, waited=waited,
                             error=f"its replayed values could not be staged in '{self.config.db_path}': {exc}")
        self._learn_costs(job, outcome, reply)
        mismatches = self._compare(run, outcome.get("compare", ()))
        if outcome.get("generators"):  # issue 12.9: the record's checkpoints are another trajectory now
            mismatches = (Mismatch(run.run_id, GENERATORS, 1, 1, str(outcome["generators"])), *mismatches)
        counters = dict(outcome.get("counters", {}))
        if reply.warm:
            counters["modules_imported"] = len(reply.modules)  # installed modules the server had not preloaded
        return JobResult(
            run.run_id, job.worker, True, reply.seconds, stored=int(counters.get("stored", 0)), notes=notes,
            counters=counters, mismatches=mismatches, warm=reply.warm, waited=waited,
        )

    def finish_run(self, run: RunPlan, decision: Decision) -> Decision:
        """Journal and promote the run's staged values, or drop them (``_backfill.py``); what was done."""
        from ._costs import record_costs

        started = time.perf_counter()
        self._slices.pop(run.run_id, None)
        try:
            done = self.backfill.settle(run, decision)
        except FlorBuildError as exc:  # the store or git refused before anything of the run was written
            return Decision(withheld=f"its values could not be written: {exc}")
        if done.finish:
            ingested = self._ingested.pop(run.run_id, 0.0)
            record_costs(self.config, run.script, {"journal": ingested + time.perf_counter() - started})
        return done

    def close(self) -> None:
        """End of the session: learn what it measured of its start costs, drop its staging, let go of its lock."""
        try:
            self._learn_session_costs()
        finally:
            try:
                self.store.close()
            finally:
                self.backfill.close()

    def _learn_session_costs(self) -> None:
        from ._costs import record_costs

        for script in {*self._prepared, *self._warm_overheads}:
            figures: dict[str, float] = {}
            prepared = self._prepared.get(script, {})
            if prepared:
                figures["prepare"] = sum(prepared.values()) / len(prepared)
            overheads = sorted(self._warm_overheads.get(script, ()))
            if overheads:
                # The median fork: each job's waits for its server's start and imports are left
                # out (``JobReply.waited``), so the session that started the server counts too.
                figures["overhead_warm"] = overheads[len(overheads) // 2]
            record_costs(self.config, script, figures)

    def _learn_costs(self, job: ReplayJob, outcome: Mapping[str, Any], reply: JobReply) -> None:
        """Feed what this job's start cost into the next plan's estimates (``_costs.py``)."""
        from ._costs import record_costs

        run = job.run
        seconds, warm, fresh_server = reply.seconds, reply.warm, reply.fresh_server
        process = outcome.get("process_seconds")
        prefix = outcome.get("prefix_seconds")
        figures: dict[str, float] = {}
        if fresh_server:
            # The job that started the server: what it took beyond its estimate as a fork is what
            # the next new server will cost (its estimate already holds the fork's own figures).
            figures["server"] = seconds - job.estimate
        elif isinstance(process, int | float) and process > 0:
            if warm:
                # What the job waited for (a server another job was starting, the preloads the
                # server imported first) the plan models apart: only the fork's own cost is overhead.
                self._warm_overheads.setdefault(run.script, []).append(seconds - reply.waited - process)
            else:
                figures["overhead_cold"] = seconds - process
        if warm and not reply.modules and isinstance(prefix, int | float) and run.recorded_prefix > 0:
            # Only a fully warm child (it imported nothing the server lacked) shows the whole saving.
            figures["saving"] = run.recorded_prefix - prefix
            figures["warm_prefix"] = prefix
        record_costs(self.config, run.script, figures)

    def _compare(self, run: RunPlan, replayed_rows: Sequence[Sequence[Any]]) -> tuple[Mismatch, ...]:
        replayed: dict[tuple[int, str], list[Any]] = {}
        for ctx, name, stored, kind in replayed_rows:
            replayed.setdefault((int(ctx), str(name)), []).append(decode_value(stored, int(kind)))
        if not replayed:
            return ()
        recorded, describe = read_recorded(self.config, run.run_id, sorted({name for _c, name in replayed}), self.store)
        return compare_values(run.run_id, recorded, replayed, describe, self.rel_tol)


def _snapshot_reads_store(archive: bytes) -> bool:
    """Whether any Python file of a snapshot's tar may read the store (``_slice.reads_store``)."""
    import io
    import tarfile

    from ._slice import reads_store

    def python_files() -> Iterator[bytes]:
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".py"):
                    handle = tar.extractfile(member)
                    if handle is not None:
                        yield handle.read()

    return reads_store(python_files())


def _sources_read_store(sources: Iterable[str]) -> bool:
    from ._slice import reads_store

    return reads_store(text.encode("utf-8") for text in sources)

def replay_environment(
    config: Config, run_id: str, task: str | None, device: str, store: Store | None = None
) -> dict[str, str]:
    """A replay process's environment, but for its spec: ours, with the run's recorded variables."""
    env = dict(os.environ)
    for name in ("FLOR_PIPELINE_ID", "FLOR_MAKE_PIPELINE_ID"):
        env.pop(name, None)
    for name, value in recorded_env_vars(config, run_id, store).items():
        if name.startswith(_NOT_RESTORED_PREFIXES):
            continue
        if device != "auto" and name in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"):
            continue  # the replay chose its device
        if contains_mask(value):
            continue  # recorded with a password masked: the replaying command's own value stays
        env[name] = value
    if task:
        env["FLOR_TASK"] = task
    # Reads of the store from inside the script (flor.dataframe) see the project's store.
    env["FLORDB_BUILD_DB"] = str(config.db_path)
    return env


def project_import_paths(root: Path) -> list[Path]:
    """``sys.path`` entries inside the project, relative to its root, in order (not the script's own dir).

    They come from ``PYTHONPATH`` or from the ``.pth`` file of an editable install of the project's
    own package: a replay must import that code from the run's snapshot, not from today's tree.
    """
    root = root.resolve()
    found: list[Path] = []
    for entry in sys.path[1:]:  # [0] is this process's own script or working directory
        try:
            relative = Path(entry).resolve().relative_to(root)
        except (ValueError, OSError):
            continue
        if relative not in found:
            found.append(relative)
    return found


def kwargs_tokens(args: Mapping[str, Any]) -> list[str]:
    """``--kwargs name=value ...`` reproducing the recorded args (JSON for non-strings)."""
    if not args:
        return []
    return ["--kwargs", *(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in args.items())]


def replay_links(config: Config) -> tuple[str, ...]:
    """``[tool.flordb_build] replay_links``: project paths linked into replay directories."""
    return config.replay_links


def recorded_env_vars(config: Config, run_id: str, store: Store | None = None) -> dict[str, str]:
    """The environment variables recorded with the run's environment (none if unknown).

    :param store: an open store of the project to read (else one is opened for the call).
    """
    from ..environment import load_environment

    with _opened(config, store) as opened:
        row = opened.conn.execute("SELECT env_id FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        env = load_environment(opened, row[0]) if row and row[0] else None
    variables = (env or {}).get("env_vars") or {}
    return {str(k): str(v) for k, v in variables.items()}


@contextlib.contextmanager
def _opened(config: Config, store: Store | None) -> Iterator[Store]:
    """``store``, or the project's store opened for the block."""
    if store is not None:
        yield store
        return
    from ..store import Store

    opened = Store.open(config)
    try:
        yield opened
    finally:
        opened.close()


def read_recorded(
    config: Config, run_id: str, names: Sequence[str], store: Store | None = None
) -> tuple[dict[tuple[int, str], list[Any]], Callable[[int], str]]:
    """Recorded values of ``names`` by (ctx, name) in log order, and a describer of contexts."""
    from ..packedlogs import recorded_rows
    from ..store import loop_contexts

    with _opened(config, store) as opened:
        recorded: dict[tuple[int, str], list[Any]] = {}
        for name in names:
            # rows and packed chunks (packedlogs.py): a value read from one place only would be a wrong verdict
            for _seq, ctx, value, kind in recorded_rows(opened.conn, run_id, name):
                recorded.setdefault((int(ctx), name), []).append(decode_value(value, kind))
        loops = {
            int(ctx): (int(parent), str(loop), int(iteration))
            for ctx, parent, loop, iteration, _value in loop_contexts(opened.conn, run_id)
        }

    def describe(ctx: int) -> str:
        parts = []
        while ctx in loops:
            parent, loop, iteration = loops[ctx]
            parts.append(f"{loop} {iteration}")
            ctx = parent
        return ", ".join(reversed(parts)) or "run level"

    return recorded, describe


# -- what the user sees ---------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines)


def format_placements(plan: ReplayPlan, diff: bool = False) -> str:
    """Per run, where each statement went in its version (line, depth, anchor); with ``diff``, the
    unified diff of the recorded script against what the replay runs."""
    parts: list[str] = []
    for run in plan.runs:
        for placed in run.placed:
            parts.append(
                f"placed: run {run.run_id} ({run.version}): '{placed.name}' at {placed.path or run.script}:{placed.line} "
                f"({placed.position.value}), {placed.anchor}"
            )
        if diff:
            versions = [(run.script, run.old_source, run.source)]
            versions += [(path, run.old_modules.get(path, ""), text) for path, text in run.modules.items()]
            for path, before, after in versions:
                parts.extend(line.rstrip("\n") for line in difflib.unified_diff(
                    before.splitlines(keepends=True), after.splitlines(keepends=True),
                    fromfile=f"{path} @ {run.version} (recorded)", tofile=f"{path} @ {run.version} (replayed)",
                ))
    return "\n".join(parts)


def format_plan(plan: ReplayPlan) -> str:
    """The plan as a table (run, task, script, version, depth, estimate), notes, and the total."""
    rows = [
        [run.run_id, run.task or "-", run.script, run.version, run.depth.value
         + (f" x{len(run.segments)}" if len(run.segments) > 1 else ""), format_seconds(run.estimate)]
        for run in plan.runs
    ]
    parts = [f"replay {', '.join(plan.names)}: {len(plan.runs)} run(s)"]
    if rows:
        parts.append(_table(["run", "task", "script", "version", "depth", "estimate"], rows))
    for run in plan.runs:
        for missing in run.not_placed:
            parts.append(f"note: run {run.run_id} ({run.version}): '{missing.name}' not placed: {missing.reason}")
    unaffected = [s for s in plan.skipped if s.unaffected]
    for skipped in plan.skipped:
        if skipped not in unaffected:
            parts.append(f"skip: run {skipped.run_id} ({skipped.script}): {skipped.reason}")
    if unaffected:
        parts.append(f"({len(unaffected)} selected run(s) not affected: their script does not log these names today)")
    parts.append(f"total estimate: {format_seconds(plan.estimate)}")
    return "\n".join(parts)


def format_report(report: ReplayReport) -> str:
    """Estimated vs actual seconds per run, then errors, withheld values and nondeterminism warnings.

    ``waited``: of the actual seconds, the wait for a warm server another run's job was starting
    (and for its imports). The plan's total holds that wait, a run's own estimate does not, so the
    error leaves it out: a run forked from a server that took 7 s to start is not "+2500 %".
    """
    rows = [
        [o.run_id, ("divergent" if o.divergent else "ok") if o.ok else "FAILED", "warm" if o.warm else "cold",
         "withheld" if o.withheld is not None else str(o.stored),
         format_seconds(o.estimate), format_seconds(o.seconds), format_seconds(o.waited) if o.waited >= 0.005 else "-",
         f"{(o.seconds - o.waited - o.estimate) / o.estimate:+.0%}" if o.estimate > 0 else "-"]
        for o in report.outcomes
    ]
    headers = ["run", "status", "start", "values", "estimated", "actual", "waited", "error"]
    parts = [_table(headers, rows)] if rows else []
    for outcome in report.outcomes:
        for error in outcome.errors:
            parts.append(f"error: run {outcome.run_id}: {error}")
        if outcome.withheld is not None:
            parts.append(
                f"withheld: run {outcome.run_id}: none of its replayed values were written, so it shows what it "
                f"showed before the replay: {outcome.withheld}"
            )
        if outcome.divergent:
            parts.append(
                f"divergent: run {outcome.run_id}: its replayed values were written as --accept-divergent asks, "
                "marked divergent (table replay_divergent; 'flordb-build runs' shows them)"
            )
        for note in outcome.notes:
            parts.append(f"note: run {outcome.run_id}: {note}")
    for m in report.mismatches:
        if m.name == GENERATORS:  # not nondeterminism: the statements' own draws (withheld or divergent above)
            continue
        parts.append(
            f"warning: nondeterminism in run {m.run_id}: '{m.name}' differs in {m.differing} of {m.compared} "
            f"values recorded and replayed (first at {m.example})"
        )
    parts.extend(f"note: {note}" for note in report.notes)
    if report.nothing_replayed is not None:
        parts.append(report.nothing_replayed)
    return "\n".join(parts)


class ProgressLine:
    """A one-line progress bar per run on a stream (redrawn in place on a terminal)."""

    def __init__(self, stream: IO[str] | None = None, width: int = 24) -> None:
        self._lock = threading.Lock()  # the progress watcher and the driver's thread both draw
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last: dict[str, int] = {}
        self._ended: set[str] = set()
        self._started: dict[str, float] = {}

    def __call__(self, run: RunPlan, done: int, total: int) -> None:
        """Draw ``run``'s progress (on a pipe: only the start and the end); a terminal's line shows
        the run that moved last, and each run's finished line stays."""
        with self._lock:
            self._draw(run, done, total)

    def _draw(self, run: RunPlan, done: int, total: int) -> None:
        now = time.perf_counter()
        started = self._started.setdefault(run.run_id, now)
        finished = total > 0 and done >= total or total == 0 and done > 0
        if run.run_id in self._ended:
            return
        if finished:
            self._ended.add(run.run_id)
        if not self.tty and self._last.get(run.run_id) is not None and not finished:
            return
        if self._last.get(run.run_id) == done and run.run_id in self._last and not finished:
            return
        self._last[run.run_id] = done
        filled = int(self.width * done / total) if total else (self.width if finished else 0)
        bar = "#" * filled + "-" * (self.width - filled)
        line = (f"replay {run.run_id} {run.depth.value:<10} [{bar}] {done}/{total} {run.main_loop or 'steps'}"
                f"  {format_seconds(now - started)} of ~{format_seconds(run.estimate)}")
        if self.tty:
            self.stream.write("\r" + line + ("\n" if finished else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
