"""The in-memory side of recording: loop contexts, value queues, name checks, the flusher thread.

This is the bottom of the recording stack. ``recording.Run`` (a recorded run) is a
:class:`Recorder` that also owns a store, a journal and a snapshot; replay mode
(``hindsight/_mode.py``) composes a :class:`Recorder` and a :class:`Flusher` for the values it
replays, and stages them instead. Nothing here touches a file or a database.

Loop contexts: every ``flor.loop`` iteration gets a context id; :data:`LOOP_CONTEXT` holds the
one of the code running now. It is a ``ContextVar`` (not a plain attribute) so that the threads
of a web app each have their own ``flor.iteration``.
"""

from __future__ import annotations

import itertools
import threading
import warnings
from collections import deque
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, TypeVar

from .errors import FlorBuildWarning, LogNameError
from .values import INT64_MAX, INT64_MIN, ValueKind, encode_value_noting

T = TypeVar("T")

ROOT_CTX = 0
#: Dimension columns of every dataframe; a logged name may not reuse them.
RESERVED_NAMES = frozenset({"projid", "run_id", "tstamp", "task", "filename"})
_NATIVE = int(ValueKind.NATIVE)

#: The loop context of the code running now (:data:`ROOT_CTX` outside every loop).
LOOP_CONTEXT: ContextVar[int] = ContextVar("flordb_build_ctx", default=ROOT_CTX)


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


def check_name(name: object, caller: str) -> None:
    """Refuse names that are not text or that collide with the dimension columns."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise LogNameError(f"{caller} needs a non-empty string name, got {name!r}.")
    if name in RESERVED_NAMES:
        raise LogNameError(
            f"{caller} name '{name}' collides with the dimension column '{name}' of every dataframe; "
            "pick another name."
        )


class Recorder:
    """Queues of logged values and loop contexts, in the order they happened.

    ``logs`` rows are ``(seq, ctx, name, value, kind)``, ``loops`` rows ``(ctx, parent, name,
    index, value)``. Whoever owns the recorder drains both (:meth:`take`) and writes them.

    :param seq_start: the first ``seq`` of a log row (replay workers and forked children each
        use a range of their own, so that rows of one run never share a seq).
    :param ctx_start: the first context id :meth:`new_ctx` hands out.
    """

    def __init__(self, *, seq_start: int = 0, ctx_start: int = ROOT_CTX + 1) -> None:
        self._logs: deque[tuple[Any, ...]] = deque()
        self._loops: deque[tuple[Any, ...]] = deque()
        self._seq = itertools.count(seq_start)
        self._ctx_ids = itertools.count(ctx_start)
        self._value_names: set[str] = set()
        self._loop_names: set[str] = set()
        self._unstorable_names: set[str] = set()

    def restart_ids(self, *, seq_start: int, ctx_start: int) -> None:
        """Hand out seqs and context ids from new starting points (a forked child's own block)."""
        self._seq = itertools.count(seq_start)
        self._ctx_ids = itertools.count(ctx_start)

    def adopt_names(self, other: Recorder) -> None:
        """Know ``other``'s value and loop names (a forked child goes on with its parent's names)."""
        self._value_names = set(other._value_names)
        self._loop_names = set(other._loop_names)

    # -- the hot path -----------------------------------------------------------------------

    def log(self, name: str, value: T) -> T:
        """Queue ``value`` under ``name`` in the current loop context; return ``value``."""
        if name not in self._value_names:
            self.admit_value_name(name)
        kind = type(value)
        # Stored as is: floats, ASCII text, ints SQLite holds. Anything else is encoded (values.py).
        if (
            kind is float
            or (kind is str and value.isascii())  # type: ignore[attr-defined]
            or (kind is int and INT64_MIN <= value <= INT64_MAX)  # type: ignore[operator]
        ):
            self._logs.append((next(self._seq), LOOP_CONTEXT.get(), name, value, _NATIVE))
        else:
            stored, value_kind, note = encode_value_noting(value)
            if note is not None and name not in self._unstorable_names:
                self._unstorable_names.add(name)
                warn(f"flor.log('{name}'): {note}; later such values of '{name}' are stored alike.", stacklevel=3)
            self._logs.append((next(self._seq), LOOP_CONTEXT.get(), name, stored, int(value_kind)))
        return value

    def new_ctx(self) -> int:
        """A context id no loop row of this recorder has used."""
        return next(self._ctx_ids)

    def queue_loop(self, ctx: int, parent: int, name: str, index: int, value: Any) -> None:
        """Queue the loop row of a new context."""
        self._loops.append((ctx, parent, name, index, value))

    def take(self) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        """Drain the queues: ``(loops, logs)``, every context a taken log refers to among the loops."""
        # Count the logs first: every context they reference was queued before them, so
        # draining the loop queue afterwards never takes a log whose context is left behind.
        n_logs = len(self._logs)
        loops = [self._loops.popleft() for _ in range(len(self._loops))]
        logs = [self._logs.popleft() for _ in range(n_logs)]
        return loops, logs

    def put_back(self, loops: list[tuple[Any, ...]], logs: list[tuple[Any, ...]]) -> None:
        """Return rows :meth:`take` drained to the front of the queues (their write failed)."""
        self._loops.extendleft(reversed(loops))
        self._logs.extendleft(reversed(logs))

    # -- names ------------------------------------------------------------------------------

    def admit_value_name(self, name: str) -> None:
        """Accept ``name`` for ``flor.log``, or raise LogNameError (reserved, or a loop's name)."""
        if name in self._value_names:
            return
        check_name(name, "flor.log")
        if name in self._loop_names or (name.endswith("_value") and name[: -len("_value")] in self._loop_names):
            raise LogNameError(
                f"flor.log name '{name}' collides with the loop dimension of the same name; "
                "rename the logged value."
            )
        self._value_names.add(name)

    def admit_loop_name(self, name: str) -> None:
        """Accept ``name`` for ``flor.loop``/``flor.iteration``, or raise LogNameError."""
        if name in self._loop_names:
            return
        check_name(name, "flor.loop")
        if name in self._value_names:
            raise LogNameError(
                f"flor.loop name '{name}' is already a logged value in this run; rename the loop or the value."
            )
        self._loop_names.add(name)


#: A write that fails is retried after this pause, doubled after each failure up to the maximum.
RETRY_FIRST_SECONDS = 0.05
RETRY_MAX_SECONDS = 2.0


class Flusher:
    """A daemon thread that calls ``flush`` every ``interval`` seconds and whenever woken.

    A ``flush`` that raises is retried with backoff (:data:`RETRY_FIRST_SECONDS` doubling up to
    :data:`RETRY_MAX_SECONDS`); ``on_error`` hears of each failure. Waking it (a loop boundary)
    does not hurry a retry.
    """

    def __init__(
        self, flush: Callable[[], None], interval: float, on_error: Callable[[BaseException], None]
    ) -> None:
        self._flush = flush
        self._interval = interval
        self._on_error = on_error
        #: Set to hand queued rows over now (cheap: loops set it at their boundaries).
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flordb_build-flusher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and wait for it (its last flush may still be under way); idempotent."""
        self._stop.set()
        self.wake.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        delay = 0.0  # while flushes fail: the backoff before the next try
        while not self._stop.is_set():
            if delay:
                self._stop.wait(delay)
            else:
                self.wake.wait(self._interval)
            self.wake.clear()
            try:
                self._flush()
            except Exception as exc:  # noqa: BLE001 - the owner keeps the rows; retry after a pause
                self._on_error(exc)
                delay = min(delay * 2, RETRY_MAX_SECONDS) if delay else RETRY_FIRST_SECONDS
            else:
                delay = 0.0
