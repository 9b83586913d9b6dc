"""A recorded run: ``Run`` and its write path, and the runs of processes that cannot record.

A run (runtime.Session starts it at the first recording call; it ends at ``commit()`` or at
exit) is a ``recorder.ColumnRecorder`` with a store, a journal and a snapshot. ``log()`` only
appends to in-memory buffers (floats and ints packed per name, other values as tuples); queued
rows move to SQLite (and to the run's journal) at least every ``flush_seconds``. Inside a running
loop the recording thread writes them itself, at the first iteration (or inner-loop end, or
outermost-iteration end) after ``flush_seconds`` passed: a tight loop holds the GIL, and a flusher
thread writing beside it fell behind by the whole run. Outside loops (and at the end of an
outermost loop) the flusher thread writes them:

    log()/loop() --append--> deques --flusher, one transaction per batch--> flor.db
                                                                      \\--> .flor/runs/<id>.jsonl

Each batch is one transaction written in queue order, so a process killed at any instant
leaves a prefix of what it logged, with no holes. A batch goes to the journal first (journalfile.py:
whole lines only), then to SQLite, so a kill between the two leaves it where ``rebuild`` finds it.

A write that fails (a full disk, a store locked past its busy timeout) keeps that very batch
pending, exactly as it was taken, and retries it with backoff; rows logged meanwhile wait in the
queues behind it. ``log()`` never fails for a value or a write. At the end, a run whose rows could
not all be stored is marked: status ``incomplete`` (``runs.error`` says how many rows and why;
a run that failed or was interrupted keeps that status, with the same note in ``error``).

Signals (runtime.Session handles them): SIGTERM and SIGHUP (how SLURM, Kubernetes and ``docker
stop`` end jobs) end a run like Ctrl-C does: the run is flushed, marked ``interrupted`` and
snapshotted, then the process dies of the signal. Forked children (multiprocessing pools, DataLoader workers) never touch the parent's
SQLite connection; values they log go into the parent's run (:class:`ForkedRun`).
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import sqlite3
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from .args import read_params, resolve_arg
from .cmdline import ARGV_AFTER_KWARGS, given_params_file
from .config import Config
from .errors import FlorBuildError, SnapshotError
from .import_timer import ImportTimer
from .journalfile import JournalFile, batch_entry, end_entry, env_entry, run_entry
from .recorder import (
    LOOP_CONTEXT,
    RETRY_FIRST_SECONDS,
    RETRY_MAX_SECONDS,
    ROOT_CTX,
    ColumnRecorder,
    Flusher,
    LogColumn,
    warn,
)
from .redaction import redact_argv, redact_mapping, redact_value
from .store import (
    CHILD_CTX_BASE,
    CHILD_CTX_BLOCK,
    CHILD_SEQ_SHIFT,
    RunLock,
    Store,
    allocate_child_block,
    coalesce_loops,
    now_tstamp,
)
from .values import simple_loop_value, storable_loop_value
from .written_files import WrittenFiles, stop_tracking, track_written_files

if TYPE_CHECKING:
    from .snapshot import CodeState

T = TypeVar("T")

_CTX = LOOP_CONTEXT

#: ``runs.status`` of a run whose rows could not all be stored (``runs.error`` says how many, and why).
STATUS_INCOMPLETE = "incomplete"
#: ``runs.status`` of a run ended by Ctrl-C, SIGTERM or SIGHUP (``exit_code`` 128 + the signal).
STATUS_INTERRUPTED = "interrupted"
#: How long the end of a run keeps retrying writes the store refuses for now (a full disk, a
#: lock held past the busy timeout) before it marks the run incomplete.
CLOSE_RETRY_SECONDS = 30.0
#: Failed attempts after which a batch SQLite refuses for a reason that is not "cannot write now"
#: (a bug, not a full disk) is left to the journal alone, so that later batches get through.
_MAX_REFUSALS = 3
#: errno values of a write that may succeed later (the disk fills and frees, NFS hiccups).
_TRANSIENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EAGAIN, errno.EINTR})
#: Iterables whose iteration runs no Python code (exact types: a subclass may define __iter__).
_CODELESS_ITERABLES = frozenset({range, list, tuple, dict, set, frozenset, str, bytes})
#: Runs inherited by forked children: kept referenced (and never closed) in the child, see
#: Run.abandon_in_child.
_INHERITED: list[Any] = []


def is_transient(exc: BaseException) -> bool:
    """True when a failed write may succeed if retried: a full disk, a busy or locked store, I/O."""
    if isinstance(exc, sqlite3.OperationalError):
        name = getattr(exc, "sqlite_errorname", None) or ""
        if name:
            return name.startswith(("SQLITE_FULL", "SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_IOERR"))
        return "locked" in str(exc) or "full" in str(exc)
    if isinstance(exc, OSError):
        return exc.errno in _TRANSIENT_ERRNOS
    return False


@dataclass
class Batch:
    """Rows taken from the queues for one write: kept exactly as taken until written."""

    loops: list[tuple[Any, ...]]
    logs: list[tuple[Any, ...]]
    timings: list[tuple[Any, ...]]
    checkpoints: list[tuple[Any, ...]]
    #: Plain floats and ints, packed per name (recorder.ColumnRecorder); no name is also in ``logs``.
    columns: list[LogColumn] = field(default_factory=list)
    journaled: bool = False
    stored: bool = False
    refusals: int = 0

    @property
    def rows(self) -> int:
        values = sum(len(column) for column in self.columns)
        return len(self.loops) + len(self.logs) + len(self.timings) + len(self.checkpoints) + values

    def journal_entry(self) -> bytes:
        return batch_entry(self.loops, self.logs, self.timings, self.checkpoints, self.columns)


class LoopObserver(Protocol):
    """What the outermost ``flor.loop`` of a run tells at its boundaries (checkpoints.py's
    Checkpointer registers as one on ``run.checkpointer``)."""

    objects: dict[str, Any]

    def begin_loop(self, loop_name: str) -> None:
        """The outermost loop is about to take its first element."""

    def end_nested(self, ctx_id: int, loop_name: str, index: int, seconds: float) -> None:
        """The first nested loop of outermost iteration ``index`` ran to its end, ``seconds`` into it."""

    def end_iteration(self, ctx_id: int, loop_name: str, index: int, seconds: float) -> None:
        """An outermost iteration ended (its rows are queued)."""

    def end_loop(self, ctx_id: int, loop_name: str, index: int, seconds: float) -> None:
        """The outermost loop ended after iteration ``index``."""

    def close(self, *, raise_errors: bool = True) -> None:
        """The run ends inside the observer's scope: finish what it writes."""


class Run(ColumnRecorder):
    """One recorded run: from its first recording call to ``commit()`` or process exit."""

    def __init__(
        self,
        config: Config,
        store: Store,
        run_id: str,
        kwargs: dict[str, str],
        code: CodeState | None,
        filename: str,
        task: str | None,
    ) -> None:
        super().__init__()
        self.config = config
        self.store = store
        self.run_id = run_id
        self.kwargs = kwargs
        self.code = code
        self.filename = filename
        self.task = task
        self.args: dict[str, Any] = {}
        self._param_values: dict[str, Any] | None = None
        self.args_asked: set[str] = set()  # names flor.arg asked for (read or refused)
        self.started = time.time()
        self.failure: tuple[str, int] | None = None
        self._driven_indexes: dict[tuple[int, str], itertools.count[int]] = {}
        self._flush_lock = threading.Lock()
        self._flusher = Flusher(self.flush, config.flush_seconds, self._note_write_failure, self._hand_off)
        #: Set by the flusher thread's tick or an inner loop's end: the next loop iteration flushes.
        self._due = False
        self._flush_seconds = config.flush_seconds
        self._flushed_at = time.monotonic()  # when the last flush (by either thread) began
        self._wake = self._flusher.wake  # set at loop boundaries: hand the rows over now
        self._closed = False
        # Set by Ctrl-C, SIGTERM or SIGHUP (Session.interrupt): the run ends 'interrupted'.
        self.interrupted = False
        # The write path: a batch a failed write left (retried first, exactly as taken), what
        # failed and how often, and the rows that in the end could not be kept.
        self._pending: Batch | None = None
        self.write_failures = 0
        self._last_write_error: BaseException | None = None
        self._rows_not_stored = 0
        self._rows_not_journaled = 0
        self._journal_path = config.runs_dir / f"{run_id}.jsonl"
        self._journal: JournalFile | None = None
        self._lock: RunLock | None = None
        # Outermost loops time their iterations (timings rows at the root context); a forked
        # child's loops do not, as the parent's root timings are the parent's.
        self._times_loops = True
        self.import_timer: ImportTimer | None = None  # set by runtime.py on the process's first run
        # Timings and checkpoints (checkpoints.py). Timing rows are queued at outermost-loop
        # boundaries only, checkpoint rows by the materializer thread once their objects exist;
        # the flusher writes both in the same transactions as the loops and logs, so a killed
        # process leaves whole iterations. Timing kinds (``timings.kind``), in seconds:
        #   prefix     run start -> first outermost loop (the whole run when it has none); the
        #              process's first run starts at the process start
        #   startup    (that first run only) process start -> the run's first flor call: the
        #              interpreter and the imports before it, which a warm replay start skips
        #   imports    (that first run only, when > 0) of the prefix after the first flor call,
        #              the seconds spent in import statements (import_timer.py)
        #   iteration  one outermost iteration          inner  its nested loops' wall time
        #   between    gaps between outermost loops      suffix last outermost loop -> close
        #   restore    restoring that iteration's checkpoint (written by checkpoints.py)
        self.checkpointer: LoopObserver | None = None
        self._written: WrittenFiles | None = None  # files opened for writing (begin())
        self._t0 = time.perf_counter()
        self._timings: deque[tuple[int, str, float]] = deque()
        self._checkpoint_rows: deque[tuple[Any, ...]] = deque()
        self._outer_started = False
        self._outer_ctx = -1  # ctx of the running outermost iteration; -1 between them
        self._inner_seconds = 0.0  # nested-loop seconds inside the running outermost iteration
        self._nested_seen = False  # a nested loop has started in the running outermost iteration
        self._outer_position: tuple[str, int, float] = ("", -1, 0.0)  # its loop name, index, start
        self._outer_end: float | None = None  # perf_counter when the last outermost loop ended
        self._between_seconds = 0.0

    # -- recording ----------------------------------------------------------------------------

    # log() is ColumnRecorder.log: the hot path, unchanged by what a run adds around it.

    def arg(self, name: str, default: Any = None) -> Any:
        """``--kwargs name=...``, else the params file's value, cast to ``default``'s type; else ``default``.

        The order is args.py's (its module docstring).

        :raises ArgError: no value and no default, or a value that does not fit the default's type
            (uncaught, the script ends with that one line: Session's excepthook).
        """
        self.args_asked.add(name)
        if name in self.args:
            return self.args[name]
        value = resolve_arg(name, default, self.kwargs, self._params)
        self.args[name] = value
        token = _CTX.set(ROOT_CTX)  # args describe the whole run, wherever they are read
        try:
            self.log(name, redact_value(name, value))  # the script gets the value; the store a mask
        finally:
            _CTX.reset(token)
        return value

    def _params(self) -> dict[str, Any]:
        """The params file's values (``--params FILE``, else ``[tool.flordb_build] params``), read once."""
        if self._param_values is None:
            self._param_values = load_params(self.config)
        return self._param_values

    def loop(self, name: str, iterable: Iterable[T]) -> Iterator[T]:
        """Yield from ``iterable`` lazily, each element inside a new ``name`` loop context."""
        self.admit_loop_name(name)
        parent = _CTX.get()
        if parent == ROOT_CTX and self._times_loops:
            yield from self._loop_outermost(name, iterable)
            return
        next_ctx = self._ctx_ids.__next__
        queue_loop = self._loops.append
        # A loop directly inside the running outermost iteration adds its wall time to that
        # iteration's "inner" timing: one perf_counter pair per nested loop, none per iteration.
        timed = parent == self._outer_ctx
        started = time.perf_counter() if timed else 0.0
        first_nested = timed and not self._nested_seen
        if timed:
            self._nested_seen = True
        # Consecutive iterations (consecutive ctx ids, no value) extend one open block in the loop
        # queue, [ctx, parent, name, index, count, value, taken, closed], instead of a tuple each:
        # _take_batch writes what a block gained since the last take (see there).
        block: list[Any] | None = None
        extends = -1  # the ctx id that extends the open block (-1: none does, it has a value)
        set_ctx = _CTX.set
        # Advancing a builtin container runs no Python code, so nothing can log between one
        # iteration's end and the next one's start: the parent's context need not be set in
        # between (a ContextVar.set is ~40% of a step). Any other iterable (a generator, a
        # DataLoader) may log while it makes its next element: those logs belong to the parent.
        restores = type(iterable) not in _CODELESS_ITERABLES
        try:
            for index, element in enumerate(iterable):
                ctx = next_ctx()
                # range(n) yields its own index: skip the call for the commonest case.
                value = None if type(element) is int and element == index else simple_loop_value(element, index)
                if ctx == extends and value is None:
                    block[4] += 1  # type: ignore[index]
                    extends += 1
                else:
                    if block is not None:
                        block[7] = True
                    block = [ctx, parent, name, index, 1, value, 0, False]
                    queue_loop(block)
                    extends = ctx + 1 if value is None else -1
                set_ctx(ctx)
                yield element
                if restores:
                    set_ctx(parent)
                if self._due:  # one attribute test per iteration; the flusher thread sets it
                    self._flush_in_loop()
        finally:
            if block is not None:
                block[7] = True
            _CTX.set(parent)
            if timed:
                self._inner_seconds += time.perf_counter() - started
            # An inner loop's end inside a running loop: the enclosing loop's next iteration
            # flushes when flush_seconds have passed (waking the flusher thread instead would
            # start it writing beside the loop, which then holds the GIL: the flusher falls behind).
            if time.monotonic() - self._flushed_at >= self._flush_seconds:
                self._due = True
        # Reached only when the iterable is exhausted: a `break` (or an exception) closes the
        # generator at its `yield` instead, and that iteration's checkpoint waits for its end.
        if first_nested and self.checkpointer is not None:
            outer_name, outer_index, began = self._outer_position
            self.checkpointer.end_nested(parent, outer_name, outer_index, time.perf_counter() - began)

    def _loop_outermost(self, name: str, iterable: Iterable[T]) -> Iterator[T]:
        """The outermost loop: also times each iteration and lets the checkpointer decide."""
        perf = time.perf_counter
        next_ctx = self._ctx_ids.__next__
        queue_loop = self._loops.append
        queue_timing = self._timings.append
        started = perf()
        if not self._outer_started:
            self._outer_started = True
            queue_timing((ROOT_CTX, "prefix", started - self._t0))
            self._queue_prefix_imports()
        elif self._outer_end is not None:
            self._between_seconds += started - self._outer_end
        ctx, index, seconds = -1, -1, 0.0
        if self.checkpointer is not None:
            self.checkpointer.begin_loop(name)
        try:
            for index, element in enumerate(iterable):
                ctx = next_ctx()
                queue_loop((ctx, ROOT_CTX, name, index, simple_loop_value(element, index)))
                self._outer_ctx, self._inner_seconds, self._nested_seen = ctx, 0.0, False
                _CTX.set(ctx)
                began = perf()
                self._outer_position = (name, index, began)
                yield element
                seconds = perf() - began
                _CTX.set(ROOT_CTX)
                self._outer_ctx = -1
                queue_timing((ctx, "iteration", seconds))
                if self._inner_seconds:
                    queue_timing((ctx, "inner", self._inner_seconds))
                if self.checkpointer is not None:
                    self.checkpointer.end_iteration(ctx, name, index, seconds)
                # Loop boundary: write the iterations queued so far, here, once flush_seconds passed.
                if self._due or time.monotonic() - self._flushed_at >= self._flush_seconds:
                    self._flush_in_loop()
            if self.checkpointer is not None and ctx >= 0:
                self.checkpointer.end_loop(ctx, name, index, seconds)
        finally:
            _CTX.set(ROOT_CTX)
            self._outer_ctx = -1
            self._outer_end = perf()
            self._wake.set()

    def written_files(self) -> list[str]:
        """Project-relative paths of the files this run has written so far (written_files.py)."""
        if self._written is None:
            return []
        stopped = self._written.scan_stopped
        paths = self._written.scan()
        if stopped is None and self._written.scan_stopped is not None:
            warn(f"run {self.run_id}: {self._written.scan_stopped}.", stacklevel=None)
        return paths

    def queue_checkpoint_rows(self, rows: Iterable[tuple[Any, ...]]) -> None:
        """Queue ``checkpoints`` rows whose objects are written; the flusher stores them."""
        self._checkpoint_rows.extend(rows)
        self._wake.set()

    @contextmanager
    def iteration(self, name: str, index: int | None = None, value: Any = None) -> Iterator[int]:
        """One iteration of a loop the caller drives (one web request, one document)."""
        self.admit_loop_name(name)
        parent = _CTX.get()
        if index is None:
            counter = self._driven_indexes.setdefault((parent, name), itertools.count())
            index = next(counter)
        ctx = next(self._ctx_ids)
        stored = storable_loop_value(value)
        self._loops.append((ctx, parent, name, index, stored))
        token = _CTX.set(ctx)
        try:
            yield index
        finally:
            _CTX.reset(token)
            self._wake.set()

    # -- lifecycle ----------------------------------------------------------------------------

    def begin(self) -> None:
        """Take the run's lock, insert its row, open its journal and start the flusher."""
        self._lock = RunLock.acquire(self.config.flor_dir / "locks", self.run_id)
        self._written = track_written_files(self.config.root)
        row = {
            "run_id": self.run_id,
            "projid": self.config.projid,
            "tstamp": now_tstamp(),
            "task": self.task,
            "pipeline_id": os.environ.get("FLOR_PIPELINE_ID") or None,
            "filename": self.filename,
            "args": "{}",
            "argv": script_argv(),
            "git_head": self.code.head if self.code else None,
            "git_branch": self.code.branch if self.code else None,
            "dirty": int(self.code.dirty) if self.code else None,
            "code_tree": self.code.code_tree if self.code else None,
            "status": "running",
            "started": self.started,
            "pid": os.getpid(),
            "host": gethostname(),
            "journal": str(self._journal_path),
        }
        env = self._record_environment()
        row["env_id"] = env[0] if env else None
        row["tstamp"] = self.store.insert_run(row)
        keep_reserve(self.config.flor_dir)
        self._journal = JournalFile.open(self._journal_path)
        self._journal.append(run_entry(row))
        if env:  # the snapshot keeps the environment too, so a rebuilt store can restore `envs`
            self._journal.append(env_entry(*env))
        self._flusher.start()

    def _record_environment(self) -> tuple[str, str] | None:
        """``(env_id, JSON)`` of this process's environment (environment.py); None if it cannot be stored."""
        from .environment import record_environment

        try:
            return record_environment(self.store)
        except (FlorBuildError, OSError, sqlite3.Error) as exc:
            warn(f"run {self.run_id} recorded without its environment: {exc}", stacklevel=None)
            return None

    def _note_write_failure(self, exc: BaseException) -> None:
        self.write_failures += 1
        self._last_write_error = exc

    def flush(self) -> None:
        """Write what is queued: first any batch an earlier write left, exactly as it was taken,
        then everything queued since as one batch (one journal line, then one transaction).

        :raises sqlite3.Error, OSError: when a write fails; the batch stays pending, nothing is lost.
        """
        with self._flush_lock:
            self._flushed_at = time.monotonic()
            self._flush_locked()

    def _flush_locked(self) -> None:
        if self._pending is not None:
            self._write_pending()
        self._pending = self._take_batch()
        if self._pending is not None:
            self._write_pending()

    def _hand_off(self) -> bool:
        """The flusher thread's tick: ask the recording thread to flush at its next loop iteration.
        False (flush here) when the last tick's request is still untaken: no loop is running."""
        if self._due:
            self._due = False
            return False
        self._due = True
        return True

    def _flush_in_loop(self) -> None:
        """Flush on the recording thread between two loop iterations (``flush_seconds`` passed).

        A tight loop holds the GIL, so a flusher thread beside it gets a turn only every switch
        interval, and executemany gives the GIL up once per row: it fell behind by the whole run.
        Here the batch is written while the loop waits, a few milliseconds every ``flush_seconds``.
        Never raises for a write: a failed batch stays pending for the flusher thread's retries.
        """
        if not self._flush_lock.acquire(blocking=False):
            return  # the flusher thread is writing right now (and sees the request at its next tick)
        self._due = False
        self._flushed_at = time.monotonic()
        try:
            self._flush_locked()
        except Exception as exc:  # noqa: BLE001 - the batch stays pending; the flusher retries it
            self._note_write_failure(exc)
        finally:
            self._flush_lock.release()

    def _take_batch(self) -> Batch | None:
        # Count the logs first: every context they reference was queued before them, so
        # draining the loop queue afterwards never writes a log whose context is missing.
        n_logs = len(self._logs)
        columns = self.take_columns()
        n_timings = len(self._timings)
        n_checkpoints = len(self._checkpoint_rows)
        loops = self._take_loops()
        logs = [self._logs.popleft() for _ in range(n_logs)]
        timings = [self._timings.popleft() for _ in range(n_timings)]
        checkpoints = [self._checkpoint_rows.popleft() for _ in range(n_checkpoints)]
        if columns and logs:
            # A name with values of two types in one batch: its column joins its rows, so that
            # the batch has one log_columns chunk per name, as rebuild packs it from the journal.
            row_names = {row[2] for row in logs}
            mixed = [column for column in columns if column.name in row_names]
            if mixed:
                columns = [column for column in columns if column.name not in row_names]
                logs = sorted([*logs, *(row for column in mixed for row in column.rows())], key=lambda row: row[0])
        if not loops and not logs and not timings and not checkpoints and not columns:
            return None
        return Batch(loops, logs, timings, checkpoints, columns)

    def _take_loops(self) -> list[tuple[Any, ...]]:
        """Loop blocks ``(ctx, parent, name, iteration, count, value)`` queued since the last take.

        The queue holds ``(ctx, parent, name, iteration, value)`` tuples (outermost loops,
        ``flor.iteration``) and the open blocks of inner loops (lists, see :meth:`loop`). Of a block
        this takes what it gained since the last take; a block still open goes back in the queue.
        Its loop's thread only grows ``count`` and sets ``closed``, this only sets ``taken``: a
        take racing an iteration writes that iteration's context at the next take at the latest,
        and the logs taken before the loops (:meth:`_take_batch`) never reference a context left out.
        """
        queue = self._loops
        singles: list[tuple[Any, ...]] = []
        parts: list[tuple[Any, ...]] = []
        still_open: list[list[Any]] = []
        for entry in [queue.popleft() for _ in range(len(queue))]:
            if type(entry) is not list:
                singles.append(entry)
                continue
            count, taken = entry[4], entry[6]
            if count > taken:
                parts.append((entry[0] + taken, entry[1], entry[2], entry[3] + taken, count - taken, entry[5]))
                entry[6] = count
            if not entry[7]:
                still_open.append(entry)
        queue.extend(still_open)
        return coalesce_loops(singles) + parts if singles else parts

    def _write_pending(self) -> None:
        """Journal the pending batch, then store it; each part is done once, retried until done.

        The journal line comes first, so that a process killed between the two leaves the batch
        where ``rebuild`` finds it. When only the journal fails, the store still takes the batch
        (its journal line follows on a later try).
        """
        batch = self._pending
        assert batch is not None
        journal_error: OSError | None = None
        if not batch.journaled:
            try:
                if self._journal is not None:
                    self._journal.append(batch.journal_entry())
                batch.journaled = True
            except OSError as exc:
                journal_error = exc
        if not batch.stored:
            try:
                self.store.write_batch(
                    self.run_id,
                    batch.loops,
                    batch.logs,
                    timings=batch.timings,
                    checkpoints=batch.checkpoints,
                    columns=batch.columns,
                )
                batch.stored = True
            except sqlite3.OperationalError:
                raise
            except (sqlite3.Error, ValueError, TypeError, OverflowError) as exc:
                batch.refusals += 1
                if batch.refusals < _MAX_REFUSALS:
                    raise
                # SQLite refuses these rows whatever we do: keep them in the journal only, so
                # that the batches behind them are not held up for the rest of the run.
                self._rows_not_stored += batch.rows
                self._last_write_error = exc
                batch.stored = True
        if journal_error is not None:
            raise journal_error
        self._pending = None

    def _flush_before_end(self) -> None:
        """The last flush: retried with backoff while the store refuses writes for now, up to
        :data:`CLOSE_RETRY_SECONDS`; what is still unwritten then is counted, not lost silently."""
        deadline = time.monotonic() + CLOSE_RETRY_SECONDS
        delay = RETRY_FIRST_SECONDS
        while True:
            try:
                self.flush()
                return
            except Exception as exc:  # noqa: BLE001 - counted below; the run must end
                self._note_write_failure(exc)
                transient = is_transient(exc)
                if (transient and time.monotonic() + delay > deadline) or not (
                    transient or isinstance(exc, sqlite3.Error | ValueError | TypeError | OverflowError)
                ):
                    break
                if transient:
                    time.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX_SECONDS)
        with self._flush_lock:  # give up: journal what the journal still takes, count the rest
            batches = [b for b in (self._pending, self._take_batch()) if b is not None]
            self._pending = None
            for batch in batches:
                if not batch.stored:
                    self._rows_not_stored += batch.rows
                if not batch.journaled:
                    try:
                        if self._journal is not None:
                            self._journal.append(batch.journal_entry())
                    except OSError:
                        self._rows_not_journaled += batch.rows

    def _unrecorded_note(self) -> str | None:
        """What the end of the run could not keep, and why; None when everything was kept."""
        if not self._rows_not_stored and not self._rows_not_journaled:
            return None
        why = f"{type(self._last_write_error).__name__}: {self._last_write_error}"
        parts = []
        if self._rows_not_stored:
            parts.append(f"{self._rows_not_stored} row(s) could not be written to the store '{self.config.db_path}'")
        if self._rows_not_journaled:
            parts.append(f"{self._rows_not_journaled} row(s) could not be written to its journal '{self._journal_path}'")
        recoverable = (
            " ('flordb-build rebuild' recovers them from the journal)"
            if self._rows_not_stored and not self._rows_not_journaled
            else ""
        )
        return "; ".join(parts) + f" ({why}){recoverable}"

    def close(self, status: str = "ok", exit_code: int = 0, error: str | None = None) -> None:
        """Flush, mark the run finished, and commit its snapshot. Idempotent; never raises for a
        store or disk that refuses writes (one warning says what was not recorded)."""
        if self._closed:
            return
        self._closed = True
        if self._written is not None:
            stop_tracking(self._written)
        if self.failure is not None:
            status, (error, exit_code) = ("interrupted" if self.interrupted else "failed"), self.failure
        if self.checkpointer is not None:  # commit() inside flor.checkpointing: finish its writes
            checkpointer, self.checkpointer = self.checkpointer, None
            try:
                checkpointer.close()
            except FlorBuildError as exc:
                warn(f"run {self.run_id}: {exc}", stacklevel=None)
        self._queue_closing_timings()
        self._flusher.stop()
        self._flush_before_end()
        note = self._unrecorded_note()
        if note is not None:
            status = STATUS_INCOMPLETE if status == "ok" else status
            error = f"{error}; {note}" if error else note
        ended = time.time()
        end = {
            "status": status,
            "exit_code": exit_code,
            "error": error,
            "ended": ended,
            "seconds": ended - self.started,
            "args": redact_args_json(self.args),
        }
        unmarked = None
        if note is not None:  # most likely a full disk: free the reserve so the mark itself fits
            free_reserve(self.config.flor_dir)
        try:
            self.store.update_run(self.run_id, **end)
        except sqlite3.Error as exc:
            unmarked = f"its end (status '{status}') could not be written to the store ({exc})"
        if self._journal is not None:
            try:
                self._journal.append(end_entry(end))
            except OSError as exc:
                unmarked = unmarked or f"its end could not be written to the journal ({exc})"
            self._journal.close()
        if note is not None or unmarked is not None:
            warn(
                f"run {self.run_id} was not fully recorded: " + "; ".join(p for p in (note, unmarked) if p) + ".",
                stacklevel=None,
            )
        if self.code is not None:
            self._commit_snapshot()
        if self._lock is not None:
            self._lock.release()
        self.store.close()

    def _queue_prefix_imports(self) -> None:
        timer, self.import_timer = self.import_timer, None
        if timer is not None and (seconds := timer.stop()) > 0:
            self._timings.append((ROOT_CTX, "imports", seconds))

    def _queue_closing_timings(self) -> None:
        now = time.perf_counter()
        if not self._outer_started:
            self._timings.append((ROOT_CTX, "prefix", now - self._t0))
            self._queue_prefix_imports()
        elif self._outer_end is not None:
            self._timings.append((ROOT_CTX, "suffix", now - self._outer_end))
        if self._between_seconds:
            self._timings.append((ROOT_CTX, "between", self._between_seconds))

    def _commit_snapshot(self) -> None:
        assert self.code is not None
        from .snapshot import commit_snapshot, snapshot_message  # git plumbing loads only when a run ends

        message = snapshot_message(self.run_id, self.filename, self.task, self.args)
        in_tree = self._journal_path.relative_to(self.config.root).as_posix()
        try:
            commit = commit_snapshot(
                self.config.root, self.code.code_tree, self._journal_path, in_tree, message
            )
        except SnapshotError as exc:
            warn(f"run {self.run_id} recorded without a snapshot commit: {exc}", stacklevel=None)
            return
        try:
            self.store.update_run(self.run_id, snapshot=commit)
        except sqlite3.Error as exc:
            warn(
                f"run {self.run_id}: its snapshot commit {commit[:12]} could not be written to the "
                f"store ({exc}); 'flordb-build rebuild' recovers it.",
                stacklevel=None,
            )

    def abandon_in_child(self) -> None:
        """In a forked child: never touch this (the parent's) run again, nor close its connection.

        SQLite must not use a connection across fork(), closing included (a close may checkpoint
        and delete the WAL the parent appends to). The connection object is kept alive for the
        child's whole life, even through interpreter shutdown, by one extra reference; the plain
        file descriptors (run lock, journal) are the child's own copies and are closed.
        """
        import ctypes

        ctypes.pythonapi.Py_IncRef(ctypes.py_object(self.store.conn))
        _INHERITED.append(self)
        if self._lock is not None:
            os.close(self._lock.fd)  # the parent's flock lives on through its own descriptor
            self._lock = None
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        self._closed = True


#: ``.flor/reserve``: space held back so that a run that ends on a full disk can still write its
#: mark (status ``incomplete``, a few SQLite pages); freed then, made again by a later run.
RESERVE_NAME = "reserve"
RESERVE_BYTES = 256 * 1024


def keep_reserve(flor_dir: Path) -> None:
    """Create the reserve file when it is missing (a stat per run otherwise); best effort."""
    path = flor_dir / RESERVE_NAME
    if path.exists():
        return
    tmp = path.with_name(f".{RESERVE_NAME}.{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(b"\0" * RESERVE_BYTES)
        os.replace(tmp, path)
    except OSError:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def free_reserve(flor_dir: Path) -> None:
    """Give the reserve's space back to the disk."""
    try:
        (flor_dir / RESERVE_NAME).unlink(missing_ok=True)
    except OSError:
        pass


def redact_args_json(args: dict[str, Any]) -> str:
    """``runs.args``: the args read, secrets masked, as JSON (values JSON cannot hold as text)."""
    return json.dumps(redact_mapping(args), default=str)


class UnrecordedRun(Run):
    """A run whose store cannot be opened or written (a read-only or full ``.flor``, a store file
    cut to nothing): the script runs to its end, nothing is recorded, one warning said why."""

    def begin(self) -> None:
        """Start the flusher only: it drops what is queued (nowhere to keep it, and memory must
        not grow for the whole run)."""
        self._flusher.start()

    def flush(self) -> None:
        """Drop what was queued."""
        with self._flush_lock:
            self._take_batch()

    def _flush_locked(self) -> None:
        self._take_batch()

    def close(self, status: str = "ok", exit_code: int = 0, error: str | None = None) -> None:
        """Stop the flusher; there is nothing to mark or commit."""
        if self._closed:
            return
        self._closed = True
        self._flusher.stop()

    def abandon_in_child(self) -> None:
        """Nothing inherited to protect: the child goes on unrecorded too."""


class ForkedRun(Run):
    """The parent's run, as a forked child (a multiprocessing pool worker) records into it.

    Its own SQLite connection and journal handle; loop contexts and log seqs from a block of its
    own (store.allocate_child_block) so nothing collides with the parent or other children; no
    run row, no snapshot, no timings. The parent's contexts at the fork are the child's parents,
    so a worker forked inside an epoch logs inside that epoch.
    """

    @classmethod
    def of_parent(cls, parent: Run) -> ForkedRun:
        """A child's run writing into ``parent`` (the run this process inherited at fork)."""
        run = cls(
            parent.config, Store.open(parent.config), parent.run_id, parent.kwargs, None, parent.filename, parent.task
        )
        run.args = dict(parent.args)  # read once by the parent: the child gets them, no new rows
        run.adopt_names(parent)
        run._times_loops = False
        return run

    def begin(self) -> None:
        """Take a child block, open the journal, start the flusher."""
        block = allocate_child_block(self.config.flor_dir / "locks", self.run_id)
        self.restart_ids(seq_start=(block + 1) << CHILD_SEQ_SHIFT, ctx_start=CHILD_CTX_BASE + block * CHILD_CTX_BLOCK)
        self._journal = JournalFile.open(self._journal_path)
        self._flusher.start()

    def close(self, status: str = "ok", exit_code: int = 0, error: str | None = None) -> None:
        """Flush what the child logged (the parent's run is the parent's to end)."""
        if self._closed:
            return
        self._closed = True
        self._flusher.stop()
        self._flush_before_end()
        note = self._unrecorded_note()
        if note is not None:
            warn(f"forked process {os.getpid()} of run {self.run_id}: {note}.", stacklevel=None)
        if self._journal is not None:
            self._journal.close()
        self.store.close()

    def _queue_closing_timings(self) -> None:
        """The run's timings are the parent's."""



def params_file(config: Config) -> Path | None:
    """The params file flor.arg reads: ``--params FILE``, else ``[tool.flordb_build] params``."""
    given = given_params_file()  # at call time: a warm replay child takes its command line late
    if given:
        return Path(given)
    return config.root / config.params if config.params else None


def load_params(config: Config) -> dict[str, Any]:
    """The values of the params file flor.arg reads (none when there is no such file)."""
    path = params_file(config)
    return read_params(path) if path else {}


def gethostname() -> str:
    import socket

    return socket.gethostname()


def process_age() -> float:
    """Seconds since this process started (Linux ``/proc``); 0.0 where that is unknown."""
    try:
        with open("/proc/self/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime", encoding="ascii") as fh:
            uptime = float(fh.read().split()[0])
        return max(uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"), 0.0)  # field 22: starttime
    except (OSError, ValueError, IndexError):
        return 0.0


def script_argv() -> str | None:
    """The script's arguments after its path, as JSON, for a replay to pass again; None without a script.

    ``--kwargs`` and ``--params`` are already out (cmdline.py; ``runs.args`` has their values), and
    secret values are masked: a replay of a run whose flags held one refuses rather than guess it.
    """
    main = sys.modules.get("__main__")
    if not getattr(main, "__file__", None):
        return None  # a notebook kernel or an interactive interpreter: its argv is not the user's command
    return json.dumps(redact_argv(ARGV_AFTER_KWARGS[1:]))


def script_filename(root: Path) -> str:
    """The running script's (or notebook's) path relative to the project root ('-c' or '<interactive>'
    without one)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if not path and "ipykernel" in sys.modules:  # a notebook: its file, not ipykernel's launcher
        from .notebook import notebook_path

        path = notebook_path()
    if not path:
        return sys.argv[0] if sys.argv and sys.argv[0] else "<interactive>"
    resolved = Path(path).resolve()
    try:
        return resolved.relative_to(root).as_posix()
    except ValueError:
        return str(resolved)
