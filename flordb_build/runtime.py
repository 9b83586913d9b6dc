"""The run being recorded: ``log``, ``arg``, ``loop``, ``iteration`` and ``commit``.

A process has one :class:`Session`. Its run starts lazily at the first recording call and ends
at ``commit()`` or at exit. ``log()`` only appends a tuple to an in-memory queue; a flusher
thread moves queued rows to SQLite (and to the run's journal) at least every
``flush_seconds`` and at the end of each outermost loop iteration:

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

Signals: SIGTERM and SIGHUP (how SLURM, Kubernetes and ``docker stop`` end jobs) end a run like
Ctrl-C does: the run is flushed, marked ``interrupted`` and snapshotted, then the process dies of
the signal. Forked children (multiprocessing pools, DataLoader workers) never touch the parent's
SQLite connection; values they log go into the parent's run (:class:`ForkedRun`).
"""

from __future__ import annotations

import atexit
import errno
import itertools
import json
import os
import signal
import sqlite3
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from .args import cast_arg, consume_kwargs, consume_params, kwargs_never_read, param_value, read_params
from .config import Config, load_config
from .errors import ArgError, FlorBuildError, FlorBuildWarning, LogNameError, SnapshotError, StoreError
from .interrupts import StopSignals, die_of, signal_name, signals_deferred
from .journalfile import JournalFile
from .redaction import redact_mapping, redact_value
from .replaying import REPLAY_ENV
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
from .values import (
    INT64_MAX,
    INT64_MIN,
    ValueKind,
    encode_value_noting,
    simple_loop_value,
    storable_loop_value,
)

if TYPE_CHECKING:
    from . import snapshot
    from .checkpoints import Checkpointer

T = TypeVar("T")

ROOT_CTX = 0
#: Dimension columns of every dataframe; a logged name may not reuse them.
RESERVED_NAMES = frozenset({"projid", "run_id", "tstamp", "task", "filename"})
_NATIVE = int(ValueKind.NATIVE)

# The loop context of the code running now. A ContextVar (not a plain attribute) so that
# threads of a web app each have their own `flor.iteration`.
_CTX: ContextVar[int] = ContextVar("flordb_build_ctx", default=ROOT_CTX)

#: ``runs.status`` of a run whose rows could not all be stored (``runs.error`` says how many, and why).
STATUS_INCOMPLETE = "incomplete"
#: ``runs.status`` of a run ended by Ctrl-C, SIGTERM or SIGHUP (``exit_code`` 128 + the signal).
STATUS_INTERRUPTED = "interrupted"
#: How long the end of a run keeps retrying writes the store refuses for now (a full disk, a
#: lock held past the busy timeout) before it marks the run incomplete.
CLOSE_RETRY_SECONDS = 30.0
_RETRY_FIRST_SECONDS = 0.05
_RETRY_MAX_SECONDS = 2.0
#: Failed attempts after which a batch SQLite refuses for a reason that is not "cannot write now"
#: (a bug, not a full disk) is left to the journal alone, so that later batches get through.
_MAX_REFUSALS = 3
#: errno values of a write that may succeed later (the disk fills and frees, NFS hiccups).
_TRANSIENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EAGAIN, errno.EINTR})
#: Runs inherited by forked children: kept referenced (and never closed) in the child, see
#: Run.abandon_in_child.
_INHERITED: list[Any] = []


class NoChangeContextWarning(UserWarning):
    """The project is not inside a git repository, so runs get no snapshot commit."""


def warn(message: str, stacklevel: int | None = 2) -> None:
    """One FlorBuildWarning; never raises, even where warnings are turned into errors (``log()``
    must not fail because of a value, and the end of a run must finish).

    ``stacklevel=None`` (the end of a run, where no line of the script is to blame) names no
    source line, so the warning is one line on stderr.
    """
    try:
        if stacklevel is None:
            warnings.warn_explicit(message, FlorBuildWarning, "flordb_build", 0, module="flordb_build")
        else:
            warnings.warn(message, FlorBuildWarning, stacklevel=stacklevel + 1)
    except Warning:
        pass


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
    journaled: bool = False
    stored: bool = False
    refusals: int = 0

    @property
    def rows(self) -> int:
        return len(self.loops) + len(self.logs) + len(self.timings) + len(self.checkpoints)

    def journal_entry(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"loops": self.loops, "logs": self.logs}
        if self.timings:
            entry["timings"] = self.timings
        if self.checkpoints:
            entry["checkpoints"] = self.checkpoints
        return entry


class Run:
    """One recorded run: from its first recording call to ``commit()`` or process exit."""

    def __init__(
        self,
        config: Config,
        store: Store,
        run_id: str,
        kwargs: dict[str, str],
        code: snapshot.CodeState | None,
        filename: str,
        task: str | None,
    ) -> None:
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
        self._logs: deque[tuple[Any, ...]] = deque()
        self._loops: deque[tuple[Any, ...]] = deque()
        self._seq = itertools.count()
        self._ctx_ids = itertools.count(ROOT_CTX + 1)
        self._value_names: set[str] = set()
        self._loop_names: set[str] = set()
        self._driven_indexes: dict[tuple[int, str], itertools.count[int]] = {}
        self._flush_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
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
        self._unstorable_names: set[str] = set()
        self._journal_path = config.runs_dir / f"{run_id}.jsonl"
        self._journal: JournalFile | None = None
        self._lock: RunLock | None = None
        # Outermost loops time their iterations (timings rows at the root context); a forked
        # child's loops do not, as the parent's root timings are the parent's.
        self._times_loops = True
        self._thread = threading.Thread(target=self._flush_periodically, name="flordb_build-flusher", daemon=True)
        # Timings and checkpoints (checkpoints.py). Timing rows are queued at outermost-loop
        # boundaries only, checkpoint rows by the materializer thread once their objects exist;
        # the flusher writes both in the same transactions as the loops and logs, so a killed
        # process leaves whole iterations. Timing kinds (``timings.kind``), in seconds:
        #   prefix     run start -> first outermost loop (the whole run when it has none); the
        #              process's first run starts at the process start
        #   startup    (that first run only) process start -> the run's first flor call: the
        #              interpreter and the imports before it, which a warm replay start skips
        #   iteration  one outermost iteration          inner  its nested loops' wall time
        #   between    gaps between outermost loops      suffix last outermost loop -> close
        #   restore    restoring that iteration's checkpoint (written by checkpoints.py)
        self.checkpointer: Checkpointer | None = None
        self._t0 = time.perf_counter()
        self._timings: deque[tuple[int, str, float]] = deque()
        self._checkpoint_rows: deque[tuple[Any, ...]] = deque()
        self._outer_started = False
        self._outer_ctx = -1  # ctx of the running outermost iteration; -1 between them
        self._inner_seconds = 0.0  # nested-loop seconds inside the running outermost iteration
        self._outer_end: float | None = None  # perf_counter when the last outermost loop ended
        self._between_seconds = 0.0

    # -- recording ----------------------------------------------------------------------------

    def log(self, name: str, value: T) -> T:
        """Queue ``value`` under ``name`` in the current loop context; return ``value``."""
        if name not in self._value_names:
            self._admit_value_name(name)
        kind = type(value)
        # Stored as is: floats, ASCII text, ints SQLite holds. Anything else is encoded (values.py).
        if (
            kind is float
            or (kind is str and value.isascii())  # type: ignore[attr-defined]
            or (kind is int and INT64_MIN <= value <= INT64_MAX)  # type: ignore[operator]
        ):
            self._logs.append((next(self._seq), _CTX.get(), name, value, _NATIVE))
        else:
            stored, value_kind, note = encode_value_noting(value)
            if note is not None and name not in self._unstorable_names:
                self._unstorable_names.add(name)
                warn(f"flor.log('{name}'): {note}; later such values of '{name}' are stored alike.", stacklevel=3)
            self._logs.append((next(self._seq), _CTX.get(), name, stored, int(value_kind)))
        return value

    def arg(self, name: str, default: Any = None) -> Any:
        """``--kwargs name=...``, else the params file's value, cast to ``default``'s type; else ``default``.

        The order is args.py's (its module docstring).
        """
        self.args_asked.add(name)
        if name in self.args:
            return self.args[name]
        params = self._params() if name not in self.kwargs else {}
        if name in self.kwargs:
            try:
                value = cast_arg(name, self.kwargs[name], default)
            except ArgError as exc:
                _refuse_arg(self, exc)
        elif name in params:
            try:
                value = param_value(name, params[name], default)
            except ArgError as exc:
                _refuse_arg(self, exc)
        elif default is not None:
            value = default
        else:
            _refuse_arg(self, ArgError(f"arg '{name}' has no default and no value; pass one with: --kwargs {name}=VALUE"))
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
            path = PARAMS_FILE or (str(self.config.root / self.config.params) if self.config.params else None)
            try:
                self._param_values = read_params(Path(path)) if path else {}
            except ArgError as exc:
                _refuse_arg(self, exc)
        return self._param_values

    def loop(self, name: str, iterable: Iterable[T]) -> Iterator[T]:
        """Yield from ``iterable`` lazily, each element inside a new ``name`` loop context."""
        self._admit_loop_name(name)
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
        try:
            for index, element in enumerate(iterable):
                ctx = next_ctx()
                # range(n) yields its own index: skip the call for the commonest case.
                value = None if type(element) is int and element == index else simple_loop_value(element, index)
                queue_loop((ctx, parent, name, index, value))
                _CTX.set(ctx)
                yield element
                _CTX.set(parent)
        finally:
            _CTX.set(parent)
            if timed:
                self._inner_seconds += time.perf_counter() - started
            self._wake.set()

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
        elif self._outer_end is not None:
            self._between_seconds += started - self._outer_end
        ctx, index, seconds = -1, -1, 0.0
        try:
            for index, element in enumerate(iterable):
                ctx = next_ctx()
                queue_loop((ctx, ROOT_CTX, name, index, simple_loop_value(element, index)))
                self._outer_ctx, self._inner_seconds = ctx, 0.0
                _CTX.set(ctx)
                began = perf()
                yield element
                seconds = perf() - began
                _CTX.set(ROOT_CTX)
                self._outer_ctx = -1
                queue_timing((ctx, "iteration", seconds))
                if self._inner_seconds:
                    queue_timing((ctx, "inner", self._inner_seconds))
                if self.checkpointer is not None:
                    self.checkpointer.end_iteration(ctx, name, index, seconds)
                self._wake.set()  # loop boundary: hand the iteration's rows to the flusher
            if self.checkpointer is not None and ctx >= 0:
                self.checkpointer.end_loop(ctx, name, index, seconds)
        finally:
            _CTX.set(ROOT_CTX)
            self._outer_ctx = -1
            self._outer_end = perf()
            self._wake.set()

    def queue_checkpoint_rows(self, rows: Iterable[tuple[Any, ...]]) -> None:
        """Queue ``checkpoints`` rows whose objects are written; the flusher stores them."""
        self._checkpoint_rows.extend(rows)
        self._wake.set()

    @contextmanager
    def iteration(self, name: str, index: int | None = None, value: Any = None) -> Iterator[int]:
        """One iteration of a loop the caller drives (one web request, one document)."""
        self._admit_loop_name(name)
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

    def _admit_value_name(self, name: str) -> None:
        check_name(name, "flor.log")
        if name in self._loop_names or (name.endswith("_value") and name[: -len("_value")] in self._loop_names):
            raise LogNameError(
                f"flor.log name '{name}' collides with the loop dimension of the same name; "
                "rename the logged value."
            )
        self._value_names.add(name)

    def _admit_loop_name(self, name: str) -> None:
        if name in self._loop_names:
            return
        check_name(name, "flor.loop")
        if name in self._value_names:
            raise LogNameError(
                f"flor.loop name '{name}' is already a logged value in this run; rename the loop or the value."
            )
        self._loop_names.add(name)

    # -- lifecycle ----------------------------------------------------------------------------

    def begin(self) -> None:
        """Take the run's lock, insert its row, open its journal and start the flusher."""
        self._lock = RunLock.acquire(self.config.flor_dir / "locks", self.run_id)
        row = {
            "run_id": self.run_id,
            "projid": self.config.projid,
            "tstamp": now_tstamp(),
            "task": self.task,
            "pipeline_id": os.environ.get("FLOR_PIPELINE_ID") or None,
            "filename": self.filename,
            "args": "{}",
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
        self._journal.append({"run": row})
        if env:  # the snapshot keeps the environment too, so a rebuilt store can restore `envs`
            self._journal.append({"env": {"env_id": env[0], "env": env[1]}})
        self._thread.start()

    def _record_environment(self) -> tuple[str, str] | None:
        """``(env_id, JSON)`` of this process's environment (environment.py); None if it cannot be stored."""
        from .environment import record_environment

        try:
            return record_environment(self.store)
        except (FlorBuildError, OSError, sqlite3.Error) as exc:
            print(f"flordb_build: run {self.run_id} recorded without its environment: {exc}", file=sys.stderr)
            return None

    def _flush_periodically(self) -> None:
        delay = 0.0  # while writes fail: the backoff before the next try
        while not self._stop.is_set():
            if delay:
                self._stop.wait(delay)  # loop boundaries do not hurry a retry
            else:
                self._wake.wait(self.config.flush_seconds)
            self._wake.clear()
            try:
                self.flush()
            except Exception as exc:  # noqa: BLE001 - the batch stays pending; retry after a pause
                self._note_write_failure(exc)
                delay = min(delay * 2, _RETRY_MAX_SECONDS) if delay else _RETRY_FIRST_SECONDS
            else:
                delay = 0.0

    def _note_write_failure(self, exc: BaseException) -> None:
        self.write_failures += 1
        self._last_write_error = exc

    def flush(self) -> None:
        """Write what is queued: first any batch an earlier write left, exactly as it was taken,
        then everything queued since as one batch (one journal line, then one transaction).

        :raises sqlite3.Error, OSError: when a write fails; the batch stays pending, nothing is lost.
        """
        with self._flush_lock:
            if self._pending is not None:
                self._write_pending()
            self._pending = self._take_batch()
            if self._pending is not None:
                self._write_pending()

    def _take_batch(self) -> Batch | None:
        # Count the logs first: every context they reference was queued before them, so
        # draining the loop queue afterwards never writes a log whose context is missing.
        n_logs = len(self._logs)
        n_timings = len(self._timings)
        n_checkpoints = len(self._checkpoint_rows)
        loops = coalesce_loops([self._loops.popleft() for _ in range(len(self._loops))])
        logs = [self._logs.popleft() for _ in range(n_logs)]
        timings = [self._timings.popleft() for _ in range(n_timings)]
        checkpoints = [self._checkpoint_rows.popleft() for _ in range(n_checkpoints)]
        if not loops and not logs and not timings and not checkpoints:
            return None
        return Batch(loops, logs, timings, checkpoints)

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
                    self.run_id, batch.loops, batch.logs, timings=batch.timings, checkpoints=batch.checkpoints
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
        delay = _RETRY_FIRST_SECONDS
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
                    delay = min(delay * 2, _RETRY_MAX_SECONDS)
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
        if self.failure is not None:
            status, (error, exit_code) = ("interrupted" if self.interrupted else "failed"), self.failure
        if self.checkpointer is not None:  # commit() inside flor.checkpointing: finish its writes
            checkpointer, self.checkpointer = self.checkpointer, None
            try:
                checkpointer.close()
            except FlorBuildError as exc:
                print(f"flordb_build: run {self.run_id}: {exc}", file=sys.stderr)
        self._queue_closing_timings()
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()
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
                self._journal.append({"end": end})
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

    def _queue_closing_timings(self) -> None:
        now = time.perf_counter()
        if not self._outer_started:
            self._timings.append((ROOT_CTX, "prefix", now - self._t0))
        elif self._outer_end is not None:
            self._timings.append((ROOT_CTX, "suffix", now - self._outer_end))
        if self._between_seconds:
            self._timings.append((ROOT_CTX, "between", self._between_seconds))

    def _commit_snapshot(self) -> None:
        assert self.code is not None
        from . import snapshot  # git plumbing loads only when a run ends

        message = snapshot.snapshot_message(self.run_id, self.filename, self.task, self.args)
        in_tree = self._journal_path.relative_to(self.config.root).as_posix()
        try:
            commit = snapshot.commit_snapshot(
                self.config.root, self.code.code_tree, self._journal_path, in_tree, message
            )
        except SnapshotError as exc:
            print(f"flordb_build: run {self.run_id} recorded without a snapshot commit: {exc}", file=sys.stderr)
            return
        try:
            self.store.update_run(self.run_id, snapshot=commit)
        except sqlite3.Error as exc:
            print(
                f"flordb_build: run {self.run_id}: its snapshot commit {commit[:12]} could not be written to the "
                f"store ({exc}); 'flordb-build rebuild' recovers it.",
                file=sys.stderr,
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
        self._thread.start()

    def flush(self) -> None:
        """Drop what was queued."""
        with self._flush_lock:
            self._take_batch()

    def close(self, status: str = "ok", exit_code: int = 0, error: str | None = None) -> None:
        """Stop the flusher; there is nothing to mark or commit."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()

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
        run._value_names = set(parent._value_names)
        run._loop_names = set(parent._loop_names)
        run._times_loops = False
        return run

    def begin(self) -> None:
        """Take a child block, open the journal, start the flusher."""
        block = allocate_child_block(self.config.flor_dir / "locks", self.run_id)
        self._ctx_ids = itertools.count(CHILD_CTX_BASE + block * CHILD_CTX_BLOCK)
        self._seq = itertools.count((block + 1) << CHILD_SEQ_SHIFT)
        self._journal = JournalFile.open(self._journal_path)
        self._thread.start()

    def close(self, status: str = "ok", exit_code: int = 0, error: str | None = None) -> None:
        """Flush what the child logged (the parent's run is the parent's to end)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()
        self._flush_before_end()
        note = self._unrecorded_note()
        if note is not None:
            warn(f"forked process {os.getpid()} of run {self.run_id}: {note}.", stacklevel=None)
        if self._journal is not None:
            self._journal.close()
        self.store.close()

    def _queue_closing_timings(self) -> None:
        """The run's timings are the parent's."""



def _refuse_arg(run: Run, error: ArgError) -> NoReturn:
    """A script exits with one line; a notebook gets the ArgError (exiting would kill its kernel)."""
    from .notebook import in_notebook

    if in_notebook():
        raise error
    run.failure = (str(error), 1)  # the status SystemExit with a message exits with
    raise SystemExit(f"flordb_build: {error}") from None


def gethostname() -> str:
    import socket

    return socket.gethostname()


def check_name(name: object, caller: str) -> None:
    """Refuse names that are not text or that collide with the dimension columns."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise LogNameError(f"{caller} needs a non-empty string name, got {name!r}.")
    if name in RESERVED_NAMES:
        raise LogNameError(
            f"{caller} name '{name}' collides with the dimension column '{name}' of every dataframe; "
            "pick another name."
        )


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


class Session:
    """The process's recording state: the ``--kwargs`` taken at import and the current run."""

    def __init__(self, kwargs: dict[str, str], malformed: list[str] | None = None) -> None:
        self.kwargs = kwargs
        self.malformed_kwargs = malformed or []
        self.run: Run | None = None
        self._hooks_installed = False
        self._warned_no_git = False
        self._start_lock = threading.Lock()
        self._process_prefix_taken = False
        self._pid = os.getpid()  # a different pid at start(): this process is a forked child
        self._forked_from: Run | None = None  # in a forked child: the parent's run at the fork
        self._args_read: set[str] = set()  # --kwargs names some run of this process read
        self._recorded = False  # a run of this process recorded (not replay): check --kwargs at exit
        self._failed = False  # a run of this process failed or was interrupted
        self._exit_signal: int | None = None  # the stop signal the process dies of after closing
        self._in_exit = False
        self._stop_signals = StopSignals(self.interrupt)

    def start(self) -> Run:
        """Open a run now (called by the first recording call)."""
        with self._start_lock:
            if self.run is not None:
                return self.run
            # Before the snapshot capture: a replay captures nothing, so its prefix must not count it.
            startup = process_age()
            if os.environ.get(REPLAY_ENV):
                # `flordb-build replay` started this process on a recorded version: replay mode
                # (flordb_build/hindsight/_mode.py) writes into the original run instead of a new one.
                from .hindsight._mode import start_replay_run

                replay_run = start_replay_run(self.kwargs)
                self._install_hooks()
                self.run = replay_run
                return replay_run
            forked = os.getpid() != self._pid
            if forked and self._forked_from is not None:
                run: Run = self._start_forked(self._forked_from)
            else:
                run = self._start_new(startup, forked)
            self._install_hooks()
            self._stop_signals.install()
            self._register_exit_of_forked_child(forked)
            self.run = run
            return run

    def _start_new(self, startup: float, forked: bool) -> Run:
        """A new run; on a store that cannot be written, an :class:`UnrecordedRun` (one warning)."""
        config = load_config()
        if self.malformed_kwargs and not forked:
            malformed, self.malformed_kwargs = self.malformed_kwargs, []  # said once per process
            for token in malformed:
                warn(
                    f"--kwargs '{token}' lacks '=': it was not taken as an arg (left to the script's own "
                    f"arguments); write it as --kwargs {token}=VALUE.",
                    stacklevel=None,
                )
        try:
            store = Store.open(config)
        except (StoreError, OSError) as exc:
            return self._unrecorded(config, exc)
        code = None
        if config.in_git and not forked:  # a forked child never pays for (or makes) a snapshot
            from . import snapshot

            code = snapshot.capture_code(config.root)
        elif not config.in_git and not self._warned_no_git:
            self._warned_no_git = True
            warnings.warn(
                f"'{config.root}' is not inside a git repository: recording without change context "
                "(no snapshot commits). Run 'git init' to get them.",
                NoChangeContextWarning,
                stacklevel=5,
            )
        run = Run(
            config,
            store,
            run_id=os.urandom(8).hex(),
            kwargs=self.kwargs,
            code=code,
            filename=script_filename(config.root),
            task=os.environ.get("FLOR_TASK") or None,
        )
        if not self._process_prefix_taken and not forked:
            # The process's first run times its prefix from the process start: interpreter
            # start-up and imports are part of what replaying that prefix costs (the snapshot
            # capture between the first flor call and now is not).
            self._process_prefix_taken = True
            run._t0 -= startup
            run._timings.append((ROOT_CTX, "startup", startup))
        try:
            run.begin()
        except (StoreError, OSError, sqlite3.Error) as exc:
            if run._lock is not None:
                run._lock.release()
            store.close()
            return self._unrecorded(config, exc)
        self._recorded = True
        return run

    def _unrecorded(self, config: Config, exc: BaseException) -> Run:
        warn(
            f"nothing of this run is recorded: the store '{config.db_path}' cannot be written ({exc}). The "
            f"script goes on; free space on the disk (or make '{config.flor_dir}' writable) to record.",
            stacklevel=None,
        )
        run = UnrecordedRun(
            config, None, "", self.kwargs, None, script_filename(config.root), None  # type: ignore[arg-type]
        )
        run.begin()
        return run

    def _start_forked(self, parent: Run) -> Run:
        """This forked child's share of the parent's run; unrecorded (one warning) if it cannot have one."""
        try:
            run = ForkedRun.of_parent(parent)
        except (StoreError, OSError) as exc:
            return self._unrecorded(parent.config, exc)
        try:
            run.begin()
        except (StoreError, OSError) as exc:
            run.store.close()
            return self._unrecorded(parent.config, exc)
        return run

    def _register_exit_of_forked_child(self, forked: bool) -> None:
        """multiprocessing children leave by ``os._exit`` (no atexit): close the run from its
        finalizers instead, which every worker runs as it ends (also when terminated: SIGTERM
        unwinds it through SignalExit)."""
        if not forked or "multiprocessing.util" not in sys.modules:
            return
        from multiprocessing import util

        util.Finalize(None, self._at_exit, exitpriority=100)

    def commit(self) -> None:
        """End the current run (if any); the next recording call starts a new one."""
        run, self.run = self.run, None
        if run is None:
            return
        self._args_read.update(run.args_asked)
        self._failed = self._failed or run.failure is not None
        with signals_deferred() as arrived:  # a second Ctrl-C must not cut the flush or the snapshot short
            try:
                run.close()
            finally:
                self._stop_signals.restore()
        for signum in arrived:
            if signum != signal.SIGINT:
                self._exit_signal = self._exit_signal or signum
            elif not self._in_exit:
                raise KeyboardInterrupt
        if self._exit_signal is not None and not self._in_exit:
            die_of(self._exit_signal)

    def interrupt(self, signum: int) -> None:
        """A stop signal arrived (interrupts.StopSignals): the run ends 'interrupted', the process dies of it."""
        self._exit_signal = signum
        run = self.run
        if run is not None and run.failure is None:
            run.failure = (f"interrupted by {signal_name(signum)}", 128 + signum)
            run.interrupted = True

    def record_failure(self, exc_type: type[BaseException], exc: BaseException) -> None:
        if self.run is not None and self.run.failure is None:
            interrupted = issubclass(exc_type, KeyboardInterrupt)
            self.run.failure = (f"{exc_type.__name__}: {exc}", 130 if interrupted else 1)
            self.run.interrupted = interrupted

    def _at_exit(self) -> None:
        self._in_exit = True
        try:
            self.commit()
        except FlorBuildError as exc:
            print(f"flordb_build: could not close the run: {exc}", file=sys.stderr)
        self._warn_unread_kwargs()
        if self._exit_signal is not None and os.getpid() == self._pid:
            die_of(self._exit_signal)  # after the close: the parent sees the signal's status

    def _warn_unread_kwargs(self) -> None:
        """One warning naming the ``--kwargs`` no run of this process read (a typo, a stale flag)."""
        if not self._recorded or self._failed or os.getpid() != self._pid:
            return  # a failed run may have ended before it read its args
        unread = kwargs_never_read(self.kwargs, self._args_read)
        if unread:
            warn(unread, stacklevel=None)

    def _forget_in_child(self) -> None:
        # A forked child (a DataLoader worker, a multiprocessing pool) must never use its
        # parent's SQLite connection; if it logs, it records into the parent's run through its
        # own connection (ForkedRun), without a snapshot.
        inherited, self.run = self.run, None
        self._start_lock = threading.Lock()
        self._forked_from = None
        if isinstance(inherited, UnrecordedRun):
            self.run = inherited  # nothing to protect: the child goes on unrecorded too
        elif inherited is not None:
            inherited.abandon_in_child()
            if type(inherited) in (Run, ForkedRun):  # not a replay: that writes through its driver
                self._forked_from = inherited
        # A child that does not record dies of SIGTERM as it did before it had our handler.
        self._stop_signals.restore()

    def _install_hooks(self) -> None:
        if self._hooks_installed:
            return
        self._hooks_installed = True
        atexit.register(self._at_exit)
        previous_hook = sys.excepthook

        def excepthook(
            exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
        ) -> None:
            self.record_failure(exc_type, exc)
            previous_hook(exc_type, exc, tb)

        sys.excepthook = excepthook
        os.register_at_fork(after_in_child=self._forget_in_child)


#: ``sys.argv`` before and after the import took the ``--kwargs`` tokens out. The flordb-build
#: CLI reads the tokens back: ``flordb-build exec -- python train.py --kwargs lr=0.1`` must hand
#: them to the command it runs.
_ARGV: list[str] = sys.argv if isinstance(getattr(sys, "argv", None), list) else []  # embedded: none
ARGV_BEFORE_KWARGS: list[str] = list(_ARGV)
_MALFORMED: list[str] = []  # `--kwargs lr 0.5`: tokens that lack '=' (warned about when a run starts)
SESSION = Session(consume_kwargs(_ARGV, _MALFORMED), _MALFORMED)  # edits sys.argv in place
_GIVEN_PARAMS = consume_params(_ARGV)  # --params FILE, also taken out of sys.argv
#: The params file of the command line, as an absolute path (the script may chdir later).
PARAMS_FILE: str | None = os.path.abspath(_GIVEN_PARAMS) if _GIVEN_PARAMS else None
ARGV_AFTER_KWARGS: list[str] = list(_ARGV)


def _current() -> Run:
    return SESSION.run or SESSION.start()


def log(name: str, value: T) -> T:
    """Record ``value`` under ``name`` in the current loop context and return it unchanged."""
    run = SESSION.run
    if run is None:
        run = SESSION.start()
    return run.log(name, value)


def arg(name: str, default: T | None = None) -> T:
    """A hyperparameter: ``--kwargs name=value`` cast to the default's type, else the default."""
    value: T = _current().arg(name, default)
    return value


def loop(name: str, iterable: Iterable[T]) -> Iterator[T]:
    """A named, nestable, lazy loop dimension over ``iterable`` (0-based iteration index)."""
    return _current().loop(name, iterable)


def iteration(name: str, index: int | None = None, value: Any = None, *, idx: int | None = None) -> Any:
    """Context manager for one iteration of a loop the caller drives; yields the index.

    :param idx: FlorDB's name for ``index`` (``flor.iteration("document", idx=None, value=...)``).
    """
    if idx is not None:
        if index is not None:
            from .errors import IterationArgumentError

            raise IterationArgumentError(
                f"flor.iteration('{name}') got both index={index!r} and idx={idx!r}; pass one of them."
            )
        index = idx
    return _current().iteration(name, index, value)


def commit() -> None:
    """End the current run (flush, snapshot); the next recording call starts a new run."""
    SESSION.commit()


def current_run_id() -> str | None:
    """The id of the run being recorded by this process, if one has started."""
    return SESSION.run.run_id if SESSION.run else None
