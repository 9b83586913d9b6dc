"""The recording API of a process: ``log``, ``arg``, ``loop``, ``iteration`` and ``commit``.

A process has one :class:`Session` (:data:`SESSION`). Its run starts lazily at the first
recording call and ends at ``commit()`` or at exit: a recorded ``recording.Run`` (a forked
child's ``ForkedRun``; an ``UnrecordedRun`` where the store cannot be written), or the run a
higher layer installs through :meth:`Session.use_run_starter` (replay mode). The layers, bottom
up: recorder.py (queues, the hot path), recording.py (a run's store, journal and snapshot), this
module (the process: start, signals, exit, fork).
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from .args import kwargs_never_read
from .cmdline import KWARGS, MALFORMED_KWARGS
from .errors import ArgError, FlorBuildError, FlorBuildWarning, StoreError
from .interrupts import StopSignals, die_of, signal_name, signals_deferred

# The recording machinery (config, store, journal) loads at the first recording call, not at
# `import flordb_build` (issue 14): a script pays for it once it records, and then only once.
if TYPE_CHECKING:
    from .config import Config
    from .recording import LoopObserver, Run

T = TypeVar("T")

class NoChangeContextWarning(FlorBuildWarning):
    """The project is not inside a git repository, so runs get no snapshot commit."""


class ActiveRun(Protocol):
    """The process's current run as the module functions and :class:`Session` use it: a recorded
    :class:`Run`, or a run that another layer starts through :meth:`Session.use_run_starter`
    (replay mode, hindsight/_mode.py)."""

    run_id: str
    config: Config
    filename: str
    args: dict[str, Any]
    args_asked: set[str]
    failure: tuple[str, int] | None
    interrupted: bool
    checkpointer: LoopObserver | None

    def log(self, name: str, value: T) -> T: ...
    def arg(self, name: str, default: Any = None) -> Any: ...
    def loop(self, name: str, iterable: Iterable[T]) -> Iterator[T]: ...
    def iteration(self, name: str, index: int | None = None, value: Any = None) -> Any: ...
    def queue_checkpoint_rows(self, rows: Iterable[tuple[Any, ...]]) -> None: ...
    def written_files(self) -> list[str]: ...
    def flush(self) -> None: ...
    def close(self, status: str = "ok", exit_code: int = 0, error: str | None = None) -> None: ...
    def abandon_in_child(self) -> None: ...


#: Starts the process's run in place of a recorded one (replay mode): called with the --kwargs.
RunStarter = Callable[[dict[str, str]], ActiveRun]


class Session:
    """The process's recording state: the ``--kwargs`` taken at import and the current run."""

    def __init__(self, kwargs: dict[str, str], malformed: list[str] | None = None) -> None:
        self.kwargs = kwargs
        self.malformed_kwargs = malformed or []
        self.run: ActiveRun | None = None  # set through _set_run only (it keeps `floats` in step)
        #: ``(float columns, LOOP_CONTEXT.get, recorder)`` of the current run when it is a
        #: ``recorder.ColumnRecorder`` (recorded runs): :func:`log`'s path for a float of a known
        #: name, one Python frame instead of two. None while no such run is current.
        self.floats: tuple[dict[str, tuple[Any, ...]], Callable[[], int], Any] | None = None
        #: Starts the process's run in place of a recorded one (use_run_starter); None: record.
        self._run_starter: RunStarter | None = None
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

    def _set_run(self, run: ActiveRun | None) -> None:
        """Make ``run`` the current run (None: none), and :attr:`floats` its float columns."""
        self.floats = None  # first: a log() racing this never reaches the columns of a run no longer current
        self.run = run
        if run is not None:
            from .recorder import LOOP_CONTEXT, ColumnRecorder

            if isinstance(run, ColumnRecorder):
                self.floats = (run.float_columns, LOOP_CONTEXT.get, run)

    def use_run_starter(self, starter: RunStarter) -> None:
        """Let ``starter`` make this process's run instead of a recorded :class:`Run`.

        The seam replay mode uses: ``python -m flordb_build.hindsight.child script.py`` installs
        its starter before the script runs (hindsight/child.py), so the script's ``flor`` calls
        replay the recorded run. An ordinary process never calls this, and recording never looks
        at replay.
        """
        with self._start_lock:
            if self.run is not None:
                raise FlorBuildError("the run starter must be installed before the process's run starts")
            self._run_starter = starter

    def start(self) -> ActiveRun:
        """Open a run now (called by the first recording call)."""
        with self._start_lock:
            if self.run is not None:
                return self.run
            if self._run_starter is not None:
                started = self._run_starter(self.kwargs)
                self._install_hooks()
                self._set_run(started)
                return started
            from .recording import process_age

            # Before the snapshot capture, which the recorded startup must not count.
            startup = process_age()
            forked = os.getpid() != self._pid
            run: Run
            if forked and self._forked_from is not None:
                run = self._start_forked(self._forked_from)
            else:
                run = self._start_new(startup, forked)
            self._install_hooks()
            self._stop_signals.install()
            self._register_exit_of_forked_child(forked)
            self._set_run(run)
            return run

    def _start_new(self, startup: float, forked: bool) -> Run:
        """A new run; on a store that cannot be written, an :class:`UnrecordedRun` (one warning)."""
        import sqlite3

        from .config import load_config
        from .recorder import ROOT_CTX, warn
        from .recording import Run, script_filename
        from .store import Store

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
            from .snapshot import capture_code

            code = capture_code(config.root)
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
        first = not self._process_prefix_taken and not forked
        if first:
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
        if first:
            # The prefix's imports after this first flor call, which a warm replay may skip (import_timer.py).
            from .import_timer import ImportTimer

            run.import_timer = ImportTimer()
            run.import_timer.install()
        self._recorded = True
        return run

    def _unrecorded(self, config: Config, exc: BaseException) -> Run:
        from .recorder import warn
        from .recording import UnrecordedRun, script_filename

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
        from .recording import ForkedRun

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
        run = self.run
        self._set_run(None)
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
            from .recorder import warn

            warn(f"could not close the run: {exc}", stacklevel=None)
        self._warn_unread_kwargs()
        if self._exit_signal is not None and os.getpid() == self._pid:
            die_of(self._exit_signal)  # after the close: the parent sees the signal's status

    def _warn_unread_kwargs(self) -> None:
        """One warning naming the ``--kwargs`` no run of this process read (a typo, a stale flag)."""
        if not self._recorded or self._failed or os.getpid() != self._pid:
            return  # a failed run may have ended before it read its args
        unread = kwargs_never_read(self.kwargs, self._args_read)
        if unread:
            from .recorder import warn

            warn(unread, stacklevel=None)

    def _forget_in_child(self) -> None:
        # A forked child (a DataLoader worker, a multiprocessing pool) must never use its
        # parent's SQLite connection; if it logs, it records into the parent's run through its
        # own connection (ForkedRun), without a snapshot.
        inherited = self.run
        self._set_run(None)
        self._start_lock = threading.Lock()
        self._forked_from = None
        if inherited is None:
            pass
        elif isinstance(inherited, _recorded_runs()[1]):
            self._set_run(inherited)  # nothing to protect: the child goes on unrecorded too
        else:
            inherited.abandon_in_child()
            if isinstance(inherited, _recorded_runs()[0]):  # not a replay run: that writes through its driver
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
            if issubclass(exc_type, ArgError):  # the script's command line is wrong: one line says how
                print(f"flordb_build: {exc}", file=sys.stderr)
                return
            previous_hook(exc_type, exc, tb)

        sys.excepthook = excepthook
        os.register_at_fork(after_in_child=self._forget_in_child)


def _recorded_runs() -> tuple[type[Run], type[Run]]:
    """``(Run, UnrecordedRun)``: imported already once a run exists (the hooks that ask come with one)."""
    from .recording import Run, UnrecordedRun

    return Run, UnrecordedRun


SESSION = Session(KWARGS, MALFORMED_KWARGS)


def current_run() -> ActiveRun:
    """The process's run, started now if no recording call has started it yet."""
    return SESSION.run or SESSION.start()



def log(name: str, value: T) -> T:
    """Record ``value`` under ``name`` in the current loop context and return it unchanged."""
    floats = SESSION.floats
    if floats is not None and type(value) is float:
        # recorder.ColumnRecorder.log's float path, inlined: a Python frame is a third of a call.
        column = floats[0].get(name)
        if column is not None:
            column[0](value)
            column[1](floats[1]())
            column[2](next(floats[2].seq_counter))
            return value
    run = SESSION.run
    if run is None:
        run = SESSION.start()
    return run.log(name, value)


def arg(name: str, default: T | None = None) -> T:
    """A hyperparameter: ``--kwargs name=value`` cast to the default's type, else the default."""
    value: T = current_run().arg(name, default)
    return value


def loop(name: str, iterable: Iterable[T]) -> Iterator[T]:
    """A named, nestable, lazy loop dimension over ``iterable`` (0-based iteration index)."""
    return current_run().loop(name, iterable)


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
    return current_run().iteration(name, index, value)


def commit() -> None:
    """End the current run (flush, snapshot); the next recording call starts a new run."""
    SESSION.commit()


def current_run_id() -> str | None:
    """The id of the run being recorded by this process, if one has started."""
    return SESSION.run.run_id if SESSION.run else None
