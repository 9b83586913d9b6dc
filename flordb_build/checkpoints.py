"""Adaptive periodic checkpointing in the background, and restoring checkpoints (model registry).

``flor.checkpointing(model=net, optimizer=opt)`` scopes the objects to checkpoint. At the end of
each iteration of the outermost ``flor.loop`` the run asks its :class:`Checkpointer` whether to
checkpoint, by the Joint Invariant of the dissertation (eq. 4.4, section 4.3)::

    M / C  <  n / (k + 1) * min(1 / (1 + c), eps)

    M   seconds to materialize the objects (copy + serialize + hash + write), measured
    C   seconds of one outer iteration (the mean so far)
    n   outer iterations so far, k checkpoints so far (k + 1: the one being decided)
    c   restore seconds per materialize second: 1.38 until restores were measured
    eps the overhead tolerance, [tool.flordb_build] checkpoint_epsilon (default 0.0667)

The last iteration is always checkpointed (replay of a suffix needs the final state).

    training thread                         materializer thread (one per checkpointing block)
    end of outer iteration
      -> invariant says yes
      -> copy_state(obj) for each object  --queue-->  serialize -> sha256 -> .flor/objects
      -> next iteration                                -> run.queue_checkpoint_rows(...)
                                                          (the flusher writes them to SQLite,
                                                           only after the object file exists)
                                                       -> uploader thread (with ``objects = URL``):
                                                          the remote store, unless it has it;
                                                          leaving the block waits for it

Thread, not fork (the dissertation forks). bench/bench_checkpoints.py --variants
plain,thread,fork measured, checkpointing ~32 MB of MLP + Adam state every ~1.6 s epoch on a
2-core machine (medians of 3): fork +20 % process CPU time and +23 % wall time over no
checkpointing, a thread within the noise (-9 % CPU, +9 % wall). Fork's copy-on-write is what
costs: after each fork, every page that training writes (parameters, gradients, optimizer state,
activations) faults and is copied, on the training thread, while the child serializes. Here the
consistent copy is taken explicitly instead (one memcpy of the state), and the rest is
torch.save's memcpy, sha256 and file writes, which release the GIL, so a thread overlaps with
training as well as a child would, keeps M and the object addresses in process without a pipe,
and avoids forking a process that runs torch's OpenMP pool and our flusher thread (a deadlock
risk in the child).
"""

from __future__ import annotations

import math
import sqlite3
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import DEFAULT_CHECKPOINT_EPSILON, Config, load_config
from .errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointNotFoundError,
    FlorBuildWarning,
    ObjectStoreError,
)
from .store import Store, connect, write_transaction

if TYPE_CHECKING:
    # objects.py (hashlib) and state.py (pickle) load on first use: `import flordb_build` stays cheap.
    import queue

    from .objects import ObjectStore, StoredObject
    from .remote_objects import ObjectUploader
    from .runtime import ActiveRun
    from .state import StateCopy
    from .training_state import RawRng

DEFAULT_EPSILON = DEFAULT_CHECKPOINT_EPSILON
DEFAULT_RESTORE_FACTOR = 1.38
# Before the first checkpoint has been measured, M is estimated from the bytes of tensors and
# arrays at this rate (copy + torch.save + sha256 + write, on a laptop-class CPU).
INITIAL_BYTES_PER_SECOND = 250e6
#: Checkpoints queued or being written beyond which a boundary skips its checkpoint.
MAX_PENDING = 2


class CheckpointPoint:
    """Where in an outer iteration a checkpoint's state was taken (the ``point`` column).

    ``END``: at the iteration's end, every checkpoint has these objects: what ``load_checkpoint``
    restores from a dataframe row, and what a replay restores to skip whole iterations.
    ``NESTED``: also, for an iteration with a nested ``flor.loop``, the state where the first one ran
    to its end (the dissertation's SkipBlock), its objects named ``nested:<name>``. A validation
    replay skips the nested loop, restores these there, and runs the rest of the body once on the
    state the record had: ``train(); scheduler.step()`` must not step twice (issue 12.1). Iterations
    without a nested loop, or left with ``break``, and stores from before schema 5 have none (those
    iterations never validate; a replay runs them in full).
    """

    NESTED = "nested"
    END = "end"
    #: Name prefix of the objects of a NESTED point (the table's key is run, ctx, name).
    PREFIX = "nested:"


# -- settings -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointSettings:
    """``[tool.flordb_build]`` keys for checkpoints: overhead tolerance and retention budgets."""

    epsilon: float = DEFAULT_EPSILON
    budget_per_run: int | None = None
    budget_per_project: int | None = None
    #: Checkpoint every Nth outer iteration regardless of timing (None: the adaptive rule).
    every: int | None = None


def load_settings(config: Config) -> CheckpointSettings:
    """The checkpoint keys of ``[tool.flordb_build]`` (parsed and validated by config.py)."""
    return CheckpointSettings(
        epsilon=config.checkpoint_epsilon,
        budget_per_run=config.checkpoint_budget_per_run,
        budget_per_project=config.checkpoint_budget_per_project,
        every=config.checkpoint_every,
    )


# -- the decision ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class JointInvariant:
    """The checkpointing decision rule, eq. 4.4."""

    epsilon: float = DEFAULT_EPSILON
    restore_factor: float = DEFAULT_RESTORE_FACTOR

    @property
    def threshold(self) -> float:
        """``min(1 / (1 + c), eps)``."""
        return min(1.0 / (1.0 + self.restore_factor), self.epsilon)

    def admits(self, n: int, k: int, compute_seconds: float, materialize_seconds: float) -> bool:
        """Whether a checkpoint now keeps ``M/C < n/(k+1) * threshold``.

        :param n: outer iterations so far, this one included.
        :param k: checkpoints taken so far.
        :param compute_seconds: total seconds of those ``n`` iterations (``C`` is their mean).
        :param materialize_seconds: the expected ``M`` of this checkpoint.
        """
        if n <= 0:
            return False
        if compute_seconds <= 0:
            return materialize_seconds <= 0
        mean_compute = compute_seconds / n
        return materialize_seconds / mean_compute < n / (k + 1) * self.threshold


def refine_restore_factor(config: Config, filename: str) -> float:
    """``c`` measured from this script's past restores (restore / materialize seconds), else 1.38."""
    if not config.db_path.exists():
        return DEFAULT_RESTORE_FACTOR
    try:
        conn = connect(config.db_path)
        try:
            restored, materialized = conn.execute(
                "SELECT SUM(t.seconds), SUM(m.seconds) FROM timings AS t "
                "JOIN (SELECT run_id, ctx_id, SUM(materialize_seconds) AS seconds FROM checkpoints "
                "      GROUP BY run_id, ctx_id) AS m ON m.run_id = t.run_id AND m.ctx_id = t.ctx_id "
                "JOIN runs AS r ON r.run_id = t.run_id "
                "WHERE t.kind = 'restore' AND r.filename = ?",
                (filename,),
            ).fetchone()
        finally:
            conn.close()
    except sqlite3.Error:
        return DEFAULT_RESTORE_FACTOR  # a store without the tables yet has no measurements
    if not restored or not materialized or materialized <= 0:
        return DEFAULT_RESTORE_FACTOR
    return min(max(float(restored) / float(materialized), 0.01), 100.0)


# -- recording ----------------------------------------------------------------------------------


@dataclass
class _Job:
    ctx_id: int
    loop_name: str
    iteration: int
    block_seconds: float
    items: list[tuple[str, StateCopy, float]]  # (name, copy, seconds the copy took)
    point: str = CheckpointPoint.END


class Materializer:
    """A background thread that serializes state copies and writes them to the object store."""

    def __init__(self, run: ActiveRun, objects: ObjectStore) -> None:
        import queue

        self.run = run
        self.objects = objects
        self.measured: list[float] = []  # M of each finished checkpoint, seconds
        # M of each end that followed its iteration's nested point: mostly reused copies, so
        # far cheaper than a checkpoint of its own (Checkpointer.expected_followup_seconds)
        self.measured_followups: list[float] = []
        # The last nested point's copies and where they were stored: the end that follows reuses
        # the copies of unchanged objects (state.matches_copy), and they are not stored twice.
        self._nested_stored: dict[int, tuple[StateCopy, StoredObject]] = {}
        self._nested_ctx = -1
        self.error: BaseException | None = None
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._pending = 0
        self._lock = threading.Condition()
        self._thread = threading.Thread(target=self._work, name="flordb_build-checkpoints", daemon=True)
        self._thread.start()
        # Uploads to a remote object store run on their own thread: the checkpoint's row is queued
        # once the local file exists, and a slow network never holds up the next checkpoint.
        self._uploader: ObjectUploader | None = None
        if objects.remote is not None:
            from .remote_objects import ObjectUploader

            self._uploader = ObjectUploader(objects.upload)
            self._remote_url = objects.remote.url

    @property
    def pending(self) -> int:
        """Checkpoints queued or being written."""
        return self._pending

    def wait_for_room(self, limit: int) -> None:
        """Block until fewer than ``limit`` checkpoints are queued or being written."""
        with self._lock:
            self._lock.wait_for(lambda: self._pending < limit or not self._thread.is_alive())

    def submit(self, job: _Job) -> None:
        """Queue a checkpoint for writing."""
        with self._lock:
            self._pending += 1
        self._queue.put(job)

    def close(self) -> None:
        """Wait until every queued checkpoint is written (and uploaded), then stop the threads."""
        self._queue.put(None)
        self._thread.join()
        if self._uploader is not None:
            failures = self._uploader.close()
            if failures:
                sha256, exc = failures[0]
                warnings.warn(
                    f"{len(failures)} checkpoint object(s) were not uploaded to '{self._remote_url}' "
                    f"(first: '{sha256}': {exc}); they are safe in the local cache: run "
                    "'flordb-build push-objects' to upload them.",
                    FlorBuildWarning, stacklevel=2,
                )

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                if self.error is None:
                    self._write(job)
            except BaseException as exc:  # surfaced on the training thread at the next boundary
                self.error = exc
            finally:
                with self._lock:
                    self._pending -= 1
                    self._lock.notify_all()

    def _write(self, job: _Job) -> None:
        from .state import serialize

        rows: list[tuple[Any, ...]] = []
        total = 0.0
        followup = job.point == CheckpointPoint.END and job.ctx_id == self._nested_ctx
        reused = self._nested_stored if followup else {}
        stored_now: dict[int, tuple[StateCopy, StoredObject]] = {}
        for name, copy, copy_seconds in job.items:
            # M = the copy's wall time on the training thread + this thread's CPU time. CPU time,
            # not wall time: waiting for the GIL or the disk here does not slow training down,
            # and on a busy machine wall time here mostly measures the training thread.
            started = time.thread_time()
            earlier = reused.get(id(copy))
            if earlier is not None and earlier[0] is copy:  # the nested point's copy, stored already
                stored = earlier[1]
            else:
                try:
                    stored = self.objects.put(serialize(copy), upload=False)
                except ObjectStoreError as exc:
                    raise CheckpointError(
                        f"Could not write the checkpoint of '{name}' at {job.loop_name} {job.iteration}: {exc}"
                    ) from exc
                if self._uploader is not None:
                    self._uploader.submit(stored.sha256)
            stored_now[id(copy)] = (copy, stored)
            seconds = copy_seconds + time.thread_time() - started
            total += seconds
            rows.append(
                (job.ctx_id, job.loop_name, job.iteration, name, stored.sha256, stored.bytes, seconds,
                 job.block_seconds, copy.format.value, job.point)
            )
        self.run.queue_checkpoint_rows(rows)
        # Only a nested point's copies may be reused, and only by its own end: holding any longer
        # would keep a copy of the whole state in memory between checkpoints.
        self._nested_stored = stored_now if job.point == CheckpointPoint.NESTED else {}
        self._nested_ctx = job.ctx_id if job.point == CheckpointPoint.NESTED else -1
        (self.measured_followups if followup else self.measured).append(total)


class Checkpointer:
    """The objects of one ``flor.checkpointing`` block and its checkpointing decisions."""

    def __init__(self, run: ActiveRun, objects: Mapping[str, Any], settings: CheckpointSettings) -> None:
        from .empty_state import warn_empty_state
        from .state import check_checkpointable

        for name, obj in objects.items():
            check_checkpointable(name, obj)
            warn_empty_state(name, obj)  # issue 12.7: a checkpoint that holds nothing cannot be restored
        self.run = run
        self.objects = dict(objects)
        self.settings = settings
        self.invariant = JointInvariant(settings.epsilon, refine_restore_factor(run.config, run.filename))
        self.iterations = 0  # n
        self.checkpoints = 0  # k
        self.compute_seconds = 0.0
        self._last_ctx = -1
        self._end_due = -1  # the iteration whose nested point was taken: its end is taken too
        self._nested_ctx = -1  # the iteration whose nested point was reached (taken or not)
        # The generators at the end of an iteration that took no checkpoint, kept until the next
        # iteration's nested point: a checkpoint there holds them too (training_state.RNG_BEFORE_NAME).
        self._rng_before: RawRng | None = None
        self._rng_seconds = 0.0  # what taking them last cost
        self._rng_start: RawRng | None = None  # where the main loop started, for the first checkpoint
        self._estimated_bytes: int | None = None
        self._materializer: Materializer | None = None
        # The copies of the nested point taken in iteration ``_nested_copies_ctx``, for its end
        self._nested_copies: dict[str, StateCopy] = {}
        self._nested_copies_ctx = -1

    def begin_loop(self, loop_name: str) -> None:
        """The outermost loop starts: the generators as they are now go with the first checkpoint."""
        from .training_state import raw_rng_state

        self._rng_start = raw_rng_state()

    def end_nested(self, ctx_id: int, loop_name: str, index: int, seconds: float) -> None:
        """Called when the first nested ``flor.loop`` of outer iteration ``index`` has run to its end
        (``seconds`` into the iteration): a checkpoint decided here takes the state twice, here and
        at the iteration's end (CheckpointPoint)."""
        self._raise_background_error()
        # The iteration is not over: count it at the mean length of the finished ones (the rest of
        # its body, an evaluation say, is still to come), or at what it took so far if it is the first.
        self._nested_ctx = ctx_id
        n = self.iterations + 1
        mean = self.compute_seconds / self.iterations if self.iterations else 0.0
        if self._decide(n, self.compute_seconds + max(seconds, mean), with_nested=True):
            self.checkpoint(ctx_id, loop_name, index, seconds, CheckpointPoint.NESTED, rng_before=self._rng_before)
            self._end_due = ctx_id
        self._rng_before = None

    def end_iteration(self, ctx_id: int, loop_name: str, index: int, seconds: float) -> None:
        """Called by the outermost ``flor.loop`` after each iteration: checkpoint as decided at the
        iteration's nested point, else if the invariant holds now, the iteration counted in full (an
        iteration declined at its nested point, counted there at the mean length, may still be a
        restore point, without validating)."""
        self._raise_background_error()
        self.iterations += 1
        self.compute_seconds += seconds
        self._rng_before = None  # an iteration without a nested loop did not use its predecessor's
        if ctx_id == self._end_due:  # the nested point was taken: its iteration's end must be too
            if self._materializer is not None:
                self._materializer.wait_for_room(MAX_PENDING)
            self.checkpoint(ctx_id, loop_name, index, seconds)
        elif self._decide(self.iterations, self.compute_seconds, with_nested=ctx_id == self._nested_ctx):
            # An iteration with a nested loop pays for the nested point too, although this end takes one
            # copy: else single copies, cheaper, would spend the budget as soon as it allows one, and no
            # later nested point (the one a validation replay restores) would ever be admitted.
            self.checkpoint(ctx_id, loop_name, index, seconds)
        else:
            self._keep_rng_before()

    def _keep_rng_before(self) -> None:
        """Keep the generators' states at the end of an iteration that took no checkpoint, for the
        next iteration's nested point; only where that costs under 0.5% of an iteration (the states
        are copied, not encoded: ~0.1 ms). Without them a validation replay runs the next iteration
        in full instead of checking the state it arrives with (hindsight/_generators.py)."""
        from .training_state import raw_rng_state

        if self._rng_seconds * 200 > self.compute_seconds / max(self.iterations, 1):
            return
        started = time.perf_counter()
        self._rng_before = raw_rng_state()
        self._rng_seconds = time.perf_counter() - started

    def _decide(self, n: int, compute: float, with_nested: bool) -> bool:
        """The Joint Invariant's decision with ``n`` iterations of ``compute`` seconds so far, for a
        checkpoint at an iteration's end, ``with_nested``: and at its nested point too."""
        every = self.settings.every
        if every is not None:
            # Fixed restore points, asked for in [tool.flordb_build]: wait for the writer rather than skip.
            if n % every == 0:
                if self._materializer is not None:
                    self._materializer.wait_for_room(MAX_PENDING)
                return True
            return False
        # Two checkpoints still queued a whole iteration later means M was underestimated (or
        # the disk stalls): skip rather than hold a third copy of the state in memory.
        busy = self._materializer is not None and self._materializer.pending >= MAX_PENDING
        expected = self.expected_materialize_seconds()
        if with_nested:
            expected += self.expected_followup_seconds()
        return not busy and self.invariant.admits(n, self.checkpoints, compute, expected)

    def end_loop(self, ctx_id: int, loop_name: str, index: int, seconds: float) -> None:
        """Called when the outermost loop is exhausted: the last iteration is always checkpointed."""
        if ctx_id != self._last_ctx:
            self.checkpoint(ctx_id, loop_name, index, seconds)

    def expected_materialize_seconds(self) -> float:
        """``M`` for the next checkpoint: the mean measured so far, else estimated from tensor bytes."""
        measured = self._materializer.measured if self._materializer is not None else []
        if len(measured) > 1:
            measured = measured[1:]  # the first checkpoint also paid one-time costs (lazy imports)
        if measured:
            return sum(measured) / len(measured)
        if self._estimated_bytes is None:
            from .state import estimate_nbytes

            self._estimated_bytes = sum(estimate_nbytes(obj) for obj in self.objects.values())
        return self._estimated_bytes / INITIAL_BYTES_PER_SECOND

    def expected_followup_seconds(self) -> float:
        """``M`` of an iteration's end after its nested point: the mean measured so far, else a full
        checkpoint's (before any is measured, the nested point may have changed everything)."""
        measured = self._materializer.measured_followups if self._materializer is not None else []
        if measured:
            return sum(measured) / len(measured)
        return self.expected_materialize_seconds()

    def checkpoint(
        self, ctx_id: int, loop_name: str, index: int, seconds: float, point: str = CheckpointPoint.END,
        *, rng_before: RawRng | None = None,
    ) -> None:
        """Copy every object's state now and queue it for writing in the background (with
        ``rng_before``: the generators at the previous iteration's end, training_state.capture)."""
        from .objects import ObjectStore
        from .state import copy_state, matches_copy
        from .training_state import RNG_BEFORE_NAME, RNG_START_NAME, capture

        # At the end of an iteration whose nested point was taken, an object the rest of the
        # iteration left alone (an evaluation, say) keeps the nested point's copy: no new copy,
        # and the materializer stores it once (the same object in both checkpoints).
        reusable = self._nested_copies if point == CheckpointPoint.END and ctx_id == self._nested_copies_ctx else {}
        items: list[tuple[str, StateCopy, float]] = []
        for name, obj in self.objects.items():
            started = time.perf_counter()
            nested_copy = reusable.get(name)
            try:
                copy = nested_copy if nested_copy is not None and matches_copy(obj, nested_copy) else copy_state(obj)
            except CheckpointError as exc:
                raise CheckpointError(f"Could not checkpoint '{name}' at {loop_name} {index}: {exc}") from exc
            items.append((name, copy, time.perf_counter() - started))
        started = time.perf_counter()
        # RNG states, gradients and the files the run wrote: a replay restores them too
        earlier = {RNG_BEFORE_NAME: rng_before} if rng_before is not None else {}
        if self._rng_start is not None:
            earlier[RNG_START_NAME], self._rng_start = self._rng_start, None
        extra = capture(self.objects, self.run.written_files(), self.run.config.root, earlier, reusable)
        seconds_each = (time.perf_counter() - started) / len(extra)
        items.extend((name, copy, seconds_each) for name, copy in extra)
        self._nested_copies, self._nested_copies_ctx = {}, -1
        if point == CheckpointPoint.NESTED:
            self._nested_copies = {name: copy for name, copy, _ in items}
            self._nested_copies_ctx = ctx_id
            items = [(CheckpointPoint.PREFIX + name, copy, took) for name, copy, took in items]
        if self._materializer is None:
            self._materializer = Materializer(self.run, ObjectStore.for_config(self.run.config))
        self._materializer.submit(_Job(ctx_id, loop_name, index, seconds, items, point))
        if point == CheckpointPoint.END:  # k counts checkpoints, each with its end
            self.checkpoints += 1
            self._last_ctx = ctx_id

    def close(self, *, raise_errors: bool = True) -> None:
        """Wait for pending writes; raise a write error unless another error is already on its way."""
        if self._materializer is not None:
            self._materializer.close()
        if raise_errors:
            self._raise_background_error()

    def _raise_background_error(self) -> None:
        error = self._materializer.error if self._materializer is not None else None
        if error is None:
            return
        self._materializer.error = None  # type: ignore[union-attr]
        if isinstance(error, CheckpointError):
            raise error
        raise CheckpointError(f"Writing a checkpoint in the background failed: {error!r}.") from error


@contextmanager
def checkpointing(**objects: Any) -> Iterator[None]:
    """Checkpoint ``objects`` adaptively at the end of iterations of the outermost ``flor.loop``.

    Torch modules, optimizers and LR schedulers are saved as their ``state_dict``; tensors, numpy
    arrays and dicts/lists of them as themselves; anything else picklable with cloudpickle. On
    exit, waits until every checkpoint is written.
    """
    from .runtime import current_run

    if not objects:
        raise CheckpointError("flor.checkpointing needs the objects to checkpoint, e.g. flor.checkpointing(model=net, optimizer=opt).")
    run = current_run()
    if run.checkpointer is not None:
        raise CheckpointError(
            "flor.checkpointing is already active in this run; pass all objects to one "
            f"flor.checkpointing(...) (already checkpointing {sorted(run.checkpointer.objects)})."
        )
    checkpointer = Checkpointer(run, objects, load_settings(run.config))
    run.checkpointer = checkpointer
    try:
        yield
    except BaseException:
        run.checkpointer = None
        checkpointer.close(raise_errors=False)
        raise
    run.checkpointer = None
    checkpointer.close()
    if checkpointer.settings.budget_per_run is not None and checkpointer.checkpoints:
        from .retention import collect_garbage

        run.flush()  # the rows of the checkpoints just written must be visible to retention
        collect_garbage(run.config, run_ids=[run.run_id], include_live=True, project_budget=False)


# -- reading and restoring ------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointRecord:
    """One object of one checkpoint, as the ``checkpoints`` table holds it."""

    run_id: str
    ctx_id: int
    loop_name: str
    iteration: int
    name: str
    sha256: str
    bytes: int
    format: str


@dataclass(frozen=True)
class RestoreResult:
    """What :func:`restore_objects` restored, from which checkpoint, and how long it took."""

    run_id: str
    ctx_id: int
    loop_name: str
    iteration: int
    objects: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def _open_store(config: Config, *, read_only: bool = False) -> Store:
    """The project's store; ``read_only`` for lookups that must never change it (reader.py)."""
    if read_only:
        from .reader import open_read_only

        store = open_read_only(config)
    else:
        store = Store.open_existing(config)
    if store is None:
        raise CheckpointNotFoundError(
            f"No store at '{config.db_path}': no run has recorded checkpoints in this project yet."
        )
    return store


def checkpoint_records(store: Store, run_id: str) -> list[CheckpointRecord]:
    """Every checkpointed object of ``run_id``, in iteration order."""
    rows = store.conn.execute(
        "SELECT run_id, ctx_id, loop_name, iteration, name, sha256, bytes, format FROM checkpoints "
        "WHERE run_id = ? ORDER BY ctx_id, name",
        (run_id,),
    ).fetchall()
    return [CheckpointRecord(*row) for row in rows]


def checkpointed_iterations(run_id: str, loop_name: str | None = None, *, config: Config | None = None) -> list[int]:
    """The outer-loop iterations of ``run_id`` that have a checkpoint (of ``loop_name`` if given)."""
    store = _open_store(config or load_config(), read_only=True)
    try:
        records = checkpoint_records(store, run_id)
    finally:
        store.close()
    records = _at_point(records, CheckpointPoint.END)  # a killed run's last nested point has no end
    return sorted({r.iteration for r in records if loop_name is None or r.loop_name == loop_name})


def restore_objects(
    run_id: str,
    iteration: int | None,
    objects: Mapping[str, Any],
    *,
    loop_name: str | None = None,
    map_location: Any = None,
    weights_only: bool = True,
    training_state: bool = False,
    files_root: Path | None = None,
    point: str = CheckpointPoint.END,
    config: Config | None = None,
) -> RestoreResult:
    """Restore ``objects`` in place from ``run_id``'s checkpoint at outer iteration ``iteration``.

    ``iteration=None`` takes the run's final checkpoint. With no objects, returns the loaded
    states without restoring anything. Every object is read and verified before any is restored,
    so a corrupted checkpoint never leaves the live objects half-restored. ``training_state``
    (what a replay asks for) also restores the random generators and the modules' gradients as
    they were at the checkpoint (training_state.py), and with ``files_root`` writes the files
    the run had written back under it; a checkpoint taken before they were recorded restores
    without them. ``point=CheckpointPoint.NESTED`` restores the state where the iteration's first
    nested loop ended (what a validation replay needs) instead of the state at its end.

    :raises CheckpointNotFoundError: the run has no checkpoint at that iteration (the message
        lists the iterations that have one).
    :raises CheckpointCorruptError: an object is missing or its content does not match its hash.
    :raises CheckpointError: an object cannot take the checkpointed state.
    """
    from . import training_state as extras
    from .state import restore_into

    config = config or load_config()
    store = _open_store(config)
    try:
        started = time.perf_counter()
        records = checkpoint_records(store, run_id)
        chosen = _choose_checkpoint(run_id, _at_point(records, point), iteration, loop_name)
        ctx_id, chosen_loop, chosen_iteration = chosen[0].ctx_id, chosen[0].loop_name, chosen[0].iteration
        where = f"run '{run_id}' at {chosen_loop} {chosen_iteration}"
        by_name = {r.name: r for r in chosen}
        user_names = extras.names_of(sorted(by_name))
        unknown = [name for name in objects if name not in user_names]
        if unknown:
            raise CheckpointError(
                f"The checkpoint of {where} has no object named {', '.join(repr(n) for n in unknown)}; "
                f"it holds {', '.join(repr(n) for n in user_names)}."
            )
        wanted = list(objects) if objects else user_names
        if training_state and objects:
            extra = [extras.RNG_NAME, *(extras.grad_name(name) for name in objects)]
            if files_root is not None:
                extra += [name for name in by_name if name.startswith(extras.FILE_PREFIX)]
            wanted += [name for name in extra if name in by_name]
        loaded = {name: _load_object(by_name[name], where, map_location, weights_only, config) for name in wanted}
        if objects:
            restored = {name: restore_into(objects[name], loaded[name], name) for name in objects}
            if training_state:
                try:
                    extras.restore(objects, loaded, files_root)
                except CheckpointError as exc:
                    raise CheckpointError(f"The checkpoint of {where}: {exc}.") from exc
        else:
            restored = loaded
        seconds = time.perf_counter() - started
        _record_restore_time(store, run_id, ctx_id, seconds)
    finally:
        store.close()
    return RestoreResult(run_id, ctx_id, chosen_loop, chosen_iteration, restored, seconds)


class RecordedGenerators:
    """The random generators' states a recorded run had at its main loop's iteration ends, where a
    checkpoint holds them: what a replay that ran an iteration compares its own with (issue 12.9)."""

    def __init__(self, records: list[CheckpointRecord], loop_name: str, config: Config) -> None:
        from .training_state import RNG_BEFORE_NAME, RNG_NAME, RNG_START_NAME

        self._config = config
        self._where: dict[int, CheckpointRecord] = {}
        for point in (CheckpointPoint.NESTED, CheckpointPoint.END):  # where the loop started
            for record in _at_point(records, point):
                if record.loop_name == loop_name and record.name == RNG_START_NAME:
                    self._where.setdefault(-1, record)
        for record in _at_point(records, CheckpointPoint.NESTED):  # the end of the iteration before
            if record.loop_name == loop_name and record.name == RNG_BEFORE_NAME:
                self._where[record.iteration - 1] = record
        for record in _at_point(records, CheckpointPoint.END):  # an iteration's own end comes first
            if record.loop_name == loop_name and record.name == RNG_NAME:
                self._where[record.iteration] = record

    @classmethod
    def of_run(cls, store: Store, run_id: str, loop_name: str, config: Config) -> RecordedGenerators:
        return cls(checkpoint_records(store, run_id), loop_name, config)

    def at_end_of(self, iteration: int) -> dict[str, Any] | None:
        """The states at the end of ``iteration`` (training_state.rng_state's form), None where no
        checkpoint holds them."""
        record = self._where.get(iteration)
        if record is None:
            return None
        where = f"run '{record.run_id}' at {record.loop_name} {record.iteration}"
        state = _load_object(record, where, None, True, self._config)
        return state if isinstance(state, dict) else None


def _at_point(records: list[CheckpointRecord], point: str) -> list[CheckpointRecord]:
    """The objects of the checkpoints taken at ``point``, under their own names."""
    import dataclasses

    prefix = CheckpointPoint.PREFIX
    if point == CheckpointPoint.END:
        return [r for r in records if not r.name.startswith(prefix)]
    return [dataclasses.replace(r, name=r.name.removeprefix(prefix)) for r in records if r.name.startswith(prefix)]


def _choose_checkpoint(
    run_id: str, records: list[CheckpointRecord], iteration: int | None, loop_name: str | None
) -> list[CheckpointRecord]:
    if loop_name is not None:
        records = [r for r in records if r.loop_name == loop_name]
    if not records:
        raise CheckpointNotFoundError(
            f"Run '{run_id}' has no checkpoints{f' of loop {loop_name!r}' if loop_name else ''}; "
            "record them by wrapping its training loop in flor.checkpointing(model=..., optimizer=...)."
        )
    if iteration is None:
        ctx_id = max(r.ctx_id for r in records)
    else:
        matching = [r.ctx_id for r in records if r.iteration == iteration]
        if not matching:
            loops = sorted({r.loop_name for r in records})
            have = ", ".join(str(i) for i in sorted({r.iteration for r in records}))
            raise CheckpointNotFoundError(
                f"Run '{run_id}' has no checkpoint at {'/'.join(loops)} {iteration}; it has checkpoints at "
                f"{'/'.join(loops)} {have}. Load one of those iterations."
            )
        ctx_id = max(matching)  # the same loop name run twice: the latest one
    return [r for r in records if r.ctx_id == ctx_id]


def _load_object(
    record: CheckpointRecord, where: str, map_location: Any, weights_only: bool, config: Config
) -> Any:
    from .objects import ObjectStore
    from .state import deserialize

    try:
        data = ObjectStore.for_config(config).get(record.sha256)
    except ObjectStoreError as exc:
        raise CheckpointCorruptError(
            f"The checkpoint of {where} cannot be restored: object '{record.name}' is damaged ({exc}). "
            "Nothing was restored; load another iteration or re-run the training."
        ) from exc
    try:
        return deserialize(data, record.format, map_location=map_location, weights_only=weights_only)
    except CheckpointError as exc:
        raise CheckpointError(f"The checkpoint of {where}: object '{record.name}': {exc}.") from exc
    except Exception as exc:  # the bytes match their hash, so this is a format or trust problem
        raise CheckpointError(
            f"The checkpoint of {where}: object '{record.name}' could not be decoded: {exc}"
        ) from exc


def _record_restore_time(store: Store, run_id: str, ctx_id: int, seconds: float) -> None:
    # Restore times refine c (restore / materialize) for the next recordings of the script and
    # feed replay cost estimates; a read-only store must not make the restore itself fail.
    try:
        with write_transaction(store.conn):
            store.conn.execute(
                "INSERT OR REPLACE INTO timings (run_id, ctx_id, kind, seconds) VALUES (?, ?, 'restore', ?)",
                (run_id, ctx_id, seconds),
            )
    except sqlite3.Error as exc:
        warnings.warn(f"restore time of run '{run_id}' not recorded: {exc}", FlorBuildWarning, stacklevel=3)


def _row_value(row: Any, key: str) -> Any:
    getter = getattr(row, "get", None)
    if getter is None:
        return None
    value = getter(key)
    if value is None or (isinstance(value, float) and math.isnan(value)) or type(value).__name__ in ("NAType", "NaTType"):
        return None
    return value


def load_checkpoint(row: Any, /, *, map_location: Any = None, weights_only: bool = True, **objects: Any) -> dict[str, Any]:
    """Restore ``objects`` in place from the checkpoint a dataframe row points at.

    The row (a ``flor.dataframe`` row: pandas Series, dict or namedtuple) gives the run
    (``run_id``) and the outer-loop iteration (its loop column, e.g. ``epoch``); a row without
    one (a run-level value) points at the run's final checkpoint. ``map_location`` maps devices
    (``'cpu'`` loads a GPU checkpoint on a CPU machine). Returns the restored objects by name;
    with no objects, the loaded states.
    """
    if hasattr(row, "_asdict"):
        row = row._asdict()
    if hasattr(row, "columns") and hasattr(row, "iloc"):
        if len(row) != 1:
            raise CheckpointError(f"load_checkpoint needs one row, got a dataframe of {len(row)} rows; pass df.iloc[i].")
        row = row.iloc[0]
    run_id = _row_value(row, "run_id")
    if not isinstance(run_id, str):
        raise CheckpointError(
            "load_checkpoint needs a row with a 'run_id', such as flor.dataframe('val_loss').iloc[0]; "
            f"got a {type(row).__name__}."
        )
    config = load_config()
    store = _open_store(config, read_only=True)
    try:
        loop_names = sorted({r.loop_name for r in checkpoint_records(store, run_id)})
    finally:
        store.close()
    present = [name for name in loop_names if _row_value(row, name) is not None]
    if len(present) > 1:
        raise CheckpointError(
            f"The row points at several checkpointed loops of run '{run_id}' ({', '.join(present)}); "
            "call flordb_build.checkpoints.restore_objects with loop_name= to pick one."
        )
    iteration: int | None = None
    loop_name: str | None = None
    if present:
        loop_name = present[0]
        value = _row_value(row, loop_name)
        try:
            iteration = int(value)
            if iteration != float(value):
                raise ValueError(value)
        except (TypeError, ValueError):
            raise CheckpointError(f"The row's '{loop_name}' is '{value}', not an iteration index.") from None
    result = restore_objects(
        run_id, iteration, objects, loop_name=loop_name, map_location=map_location,
        weights_only=weights_only, config=config,
    )
    return result.objects
