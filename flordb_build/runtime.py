"""The run being recorded: ``log``, ``arg``, ``loop``, ``iteration`` and ``commit``.

A process has one :class:`Session`. Its run starts lazily at the first recording call and ends
at ``commit()`` or at exit. ``log()`` only appends a tuple to an in-memory queue; a flusher
thread moves queued rows to SQLite (and to the run's journal) at least every
``flush_seconds`` and at the end of each outermost loop iteration:

    log()/loop() --append--> deques --flusher, one transaction per batch--> flor.db
                                                                      \\--> .flor/runs/<id>.jsonl

Each batch is one transaction written in queue order, so a process killed at any instant
leaves a prefix of what it logged, with no holes.
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import sqlite3
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, NoReturn, TypeVar

from .args import cast_arg, consume_kwargs, consume_params, param_value, read_params
from .config import Config, load_config
from .errors import ArgError, FlorBuildError, LogNameError, SnapshotError
from .redaction import redact_mapping, redact_value
from .store import RunLock, Store, coalesce_loops, now_tstamp
from .values import ValueKind, encode_value, simple_loop_value

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
#: Set by ``flordb-build replay`` in the processes it starts (JSON spec: hindsight/_model.py).
REPLAY_ENV = "FLOR_REPLAY"


class NoChangeContextWarning(UserWarning):
    """The project is not inside a git repository, so runs get no snapshot commit."""


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
        self._flush_error: BaseException | None = None
        self._journal_path = config.runs_dir / f"{run_id}.jsonl"
        self._journal: IO[str] | None = None
        self._lock: RunLock | None = None
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
        if kind is float or kind is int or kind is str:
            self._logs.append((next(self._seq), _CTX.get(), name, value, _NATIVE))
        else:
            stored, value_kind = encode_value(value)
            self._logs.append((next(self._seq), _CTX.get(), name, stored, int(value_kind)))
        return value

    def arg(self, name: str, default: Any = None) -> Any:
        """``--kwargs name=...``, else the params file's value, cast to ``default``'s type; else ``default``.

        The order is args.py's (its module docstring).
        """
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
        if parent == ROOT_CTX:
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
        stored = value if value is None or type(value) in (int, float, str, bool) else str(value)
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
        self.config.runs_dir.mkdir(parents=True, exist_ok=True)
        self._journal = open(self._journal_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._journal.write(json.dumps({"run": row}) + "\n")
        if env:  # the snapshot keeps the environment too, so a rebuilt store can restore `envs`
            self._journal.write(json.dumps({"env": {"env_id": env[0], "env": env[1]}}) + "\n")
        self._journal.flush()
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
        while not self._stop.is_set():
            self._wake.wait(self.config.flush_seconds)
            self._wake.clear()
            try:
                self.flush()
            except Exception as exc:  # keep the rows queued; retry on the next tick
                self._flush_error = exc

    def flush(self) -> None:
        """Write everything queued so far as one batch (one transaction, one journal line)."""
        with self._flush_lock:
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
                return
            try:
                self.store.write_batch(self.run_id, loops, logs, timings=timings, checkpoints=checkpoints)
            except BaseException:
                self._loops.extendleft(reversed(loops))
                self._logs.extendleft(reversed(logs))
                self._timings.extendleft(reversed(timings))
                self._checkpoint_rows.extendleft(reversed(checkpoints))
                raise
            if self._journal is not None:
                entry: dict[str, Any] = {"loops": loops, "logs": logs}
                if timings:
                    entry["timings"] = timings
                if checkpoints:
                    entry["checkpoints"] = checkpoints
                self._journal.write(json.dumps(entry) + "\n")
                self._journal.flush()

    def close(self, status: str = "ok", exit_code: int = 0, error: str | None = None) -> None:
        """Flush, mark the run finished, and commit its snapshot. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.failure is not None:
            status, (error, exit_code) = "failed", self.failure
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
        self.flush()
        ended = time.time()
        end = {
            "status": status,
            "exit_code": exit_code,
            "error": error,
            "ended": ended,
            "seconds": ended - self.started,
            "args": json.dumps(redact_mapping(self.args), default=str),
        }
        self.store.update_run(self.run_id, **end)
        if self._journal is not None:
            self._journal.write(json.dumps({"end": end}) + "\n")
            self._journal.close()
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
        self.store.update_run(self.run_id, snapshot=commit)


def _refuse_arg(run: Run, error: ArgError) -> NoReturn:
    """A script exits with one line; a notebook gets the ArgError (exiting would kill its kernel)."""
    from .notebook import in_notebook

    if in_notebook():
        raise error
    run.failure = (str(error), 2)
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

    def __init__(self, kwargs: dict[str, str]) -> None:
        self.kwargs = kwargs
        self.run: Run | None = None
        self._hooks_installed = False
        self._warned_no_git = False
        self._start_lock = threading.Lock()
        self._process_prefix_taken = False

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
            config = load_config()
            store = Store.open(config)
            code = None
            if config.in_git:
                from . import snapshot

                code = snapshot.capture_code(config.root)
            elif not self._warned_no_git:
                self._warned_no_git = True
                warnings.warn(
                    f"'{config.root}' is not inside a git repository: recording without change context "
                    "(no snapshot commits). Run 'git init' to get them.",
                    NoChangeContextWarning,
                    stacklevel=4,
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
            if not self._process_prefix_taken:
                # The process's first run times its prefix from the process start: interpreter
                # start-up and imports are part of what replaying that prefix costs (the snapshot
                # capture between the first flor call and now is not).
                self._process_prefix_taken = True
                run._t0 -= startup
                run._timings.append((ROOT_CTX, "startup", startup))
            run.begin()
            self._install_hooks()
            self.run = run
            return run

    def commit(self) -> None:
        """End the current run (if any); the next recording call starts a new one."""
        run, self.run = self.run, None
        if run is not None:
            run.close()

    def record_failure(self, exc_type: type[BaseException], exc: BaseException) -> None:
        if self.run is not None and self.run.failure is None:
            code = 130 if issubclass(exc_type, KeyboardInterrupt) else 1
            self.run.failure = (f"{exc_type.__name__}: {exc}", code)

    def _at_exit(self) -> None:
        try:
            self.commit()
        except FlorBuildError as exc:
            print(f"flordb_build: could not close the run: {exc}", file=sys.stderr)

    def _forget_in_child(self) -> None:
        # A forked child (a DataLoader worker, a multiprocessing pool) must not write into its
        # parent's run; if it logs, it starts a run of its own.
        self.run = None
        self._start_lock = threading.Lock()

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
SESSION = Session(consume_kwargs(_ARGV))  # edits sys.argv in place
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
