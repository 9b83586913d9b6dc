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
from array import array
from collections import deque
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
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
        self._loops: deque[Any] = deque()  # tuples; recording.Run also queues open blocks (lists)
        self.seq_counter = itertools.count(seq_start)
        self._ctx_ids = itertools.count(ctx_start)
        self._value_names: set[str] = set()
        self._loop_names: set[str] = set()
        self._unstorable_names: set[str] = set()

    def restart_ids(self, *, seq_start: int, ctx_start: int) -> None:
        """Hand out seqs and context ids from new starting points (a forked child's own block)."""
        self.seq_counter = itertools.count(seq_start)
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
            self._logs.append((next(self.seq_counter), LOOP_CONTEXT.get(), name, value, _NATIVE))
        else:
            stored, value_kind, note = encode_value_noting(value)
            if note is not None and name not in self._unstorable_names:
                self._unstorable_names.add(name)
                warn(f"flor.log('{name}'): {note}; later such values of '{name}' are stored alike.", stacklevel=3)
            self._logs.append((next(self.seq_counter), LOOP_CONTEXT.get(), name, stored, int(value_kind)))
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


@dataclass(frozen=True)
class LogColumn:
    """Values of one name taken from a :class:`ColumnRecorder`: ``seqs``, ``ctxs`` and ``vals``
    are parallel (row ``i`` is the log row ``(seqs[i], ctxs[i], name, vals[i], NATIVE)``)."""

    name: str
    #: ``'d'`` (plain floats) or ``'q'`` (ints of int64 range): the array typecode of ``vals``.
    typecode: str
    seqs: array[int]
    ctxs: array[int]
    vals: array[Any]

    def __len__(self) -> int:
        return len(self.seqs)

    def rows(self) -> list[tuple[Any, ...]]:
        """The column as ``(seq, ctx, name, value, kind)`` log rows."""
        name = self.name
        return [(seq, ctx, name, value, _NATIVE) for seq, ctx, value in zip(self.seqs, self.ctxs, self.vals, strict=True)]


#: The array typecode a name's values are packed in, by the type of its first value.
_COLUMN_TYPECODES: dict[type, str] = {float: "d", int: "q"}


class ColumnRecorder(Recorder):
    """A :class:`Recorder` that keeps plain floats and int64 ints per name, packed when taken.

    ``log()`` stages a name's values in three plain lists (seq, ctx, value: ``list.append`` is a
    third of ``array.append``'s cost, and the hot path pays for nothing else); :meth:`take_columns`
    packs what it takes into ``array`` buffers (24 bytes a value instead of a tuple, a float and an
    int object, ~150 bytes), which the flush hands on as they are (journal, ``log_columns``) instead
    of regrouping tuples. Staged values live until the next take, at most ``flush_seconds`` of the
    loop. A name's column takes the type of its first value; values of another type (a bool, text,
    an int beyond int64) go to the row queue as before, so nothing changes for them.

    The three lists are appended value first and seq last; :meth:`take_columns` takes
    ``len(seqs)`` items of each, so a flusher thread that takes while ``log()`` runs never splits a
    row (each list call is atomic under the GIL, appends only ever go to the end).
    """

    def __init__(self, *, seq_start: int = 0, ctx_start: int = ROOT_CTX + 1) -> None:
        super().__init__(seq_start=seq_start, ctx_start=ctx_start)
        #: name -> (vals.append, ctxs.append, seqs.append, typecode, seqs, ctxs, vals) of float
        #: columns and of int columns: a float's path tests nothing but its type. runtime.log
        #: appends to a float column itself (Session.floats): keep the two paths alike.
        self.float_columns: dict[str, tuple[Any, ...]] = {}
        self._int_columns: dict[str, tuple[Any, ...]] = {}

    def log(self, name: str, value: T) -> T:
        """Queue ``value`` under ``name`` in the current loop context; return ``value``."""
        if type(value) is float:
            column = self.float_columns.get(name)
        elif type(value) is int and INT64_MIN <= value <= INT64_MAX:  # type: ignore[operator]
            column = self._int_columns.get(name)
        else:
            column = None
        if column is None:
            return self._log_first(name, value)
        column[0](value)
        column[1](LOOP_CONTEXT.get())
        column[2](next(self.seq_counter))
        return value

    def _log_first(self, name: str, value: T) -> T:
        """A name's first value, or a value its column does not take (another type, an int beyond int64)."""
        if name not in self._value_names:
            self.admit_value_name(name)
        kind = type(value)
        typecode = _COLUMN_TYPECODES.get(kind)
        if (
            typecode is None
            or name in self.float_columns
            or name in self._int_columns
            or (kind is int and not INT64_MIN <= value <= INT64_MAX)  # type: ignore[operator]
        ):
            return Recorder.log(self, name, value)
        seqs: list[int] = []
        ctxs: list[int] = []
        vals: list[Any] = []
        columns = self.float_columns if kind is float else self._int_columns
        columns[name] = (vals.append, ctxs.append, seqs.append, typecode, seqs, ctxs, vals)
        return self.log(name, value)

    def _all_columns(self) -> list[tuple[str, tuple[Any, ...]]]:
        return [*self.float_columns.items(), *self._int_columns.items()]

    def queued_values(self) -> int:
        """Values queued and not yet taken (rows and columns)."""
        return len(self._logs) + sum(len(column[4]) for _name, column in self._all_columns())

    def take_columns(self) -> list[LogColumn]:
        """Drain the columns: one :class:`LogColumn` per name with values queued, packed."""
        taken = []
        for name, (_va, _ca, _sa, typecode, seqs, ctxs, vals) in self._all_columns():
            n = len(seqs)  # appended last: the other two hold at least as many
            if not n:
                continue
            part_seqs = array("q", seqs[:n])
            del seqs[:n]
            part_ctxs = array("q", ctxs[:n])
            del ctxs[:n]
            part_vals = array(typecode, vals[:n])
            del vals[:n]
            taken.append(LogColumn(name, typecode, part_seqs, part_ctxs, part_vals))
        return taken


#: A write that fails is retried after this pause, doubled after each failure up to the maximum.
RETRY_FIRST_SECONDS = 0.05
RETRY_MAX_SECONDS = 2.0


class Flusher:
    """A daemon thread that calls ``flush`` every ``interval`` seconds and whenever woken.

    With ``handoff``, the thread ticks every half interval; an unwoken tick first asks the
    recording thread to flush (a tight loop holds the GIL: a thread writing thousands of rows
    beside it gets a turn every switch interval and falls behind); only when the next tick finds
    the request untaken (no loop is running) does this thread flush, so rows still reach the
    store at least every ``interval``.

    A ``flush`` that raises is retried with backoff (:data:`RETRY_FIRST_SECONDS` doubling up to
    :data:`RETRY_MAX_SECONDS`); ``on_error`` hears of each failure. Waking it (a loop boundary)
    does not hurry a retry.
    """

    def __init__(
        self,
        flush: Callable[[], None],
        interval: float,
        on_error: Callable[[BaseException], None],
        handoff: Callable[[], bool] | None = None,
    ) -> None:
        self._flush = flush
        self._interval = interval
        self._on_error = on_error
        #: Called when an interval passes unwoken: True when the recording thread will flush
        #: (it was asked to, at its next loop iteration), so that this thread skips the flush.
        self._handoff = handoff
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
            elif self._handoff is None:
                self.wake.wait(self._interval)
            elif not self.wake.wait(self._interval / 2) and self._handoff():
                continue  # the recording thread flushes at its next loop iteration
            self.wake.clear()
            try:
                self._flush()
            except Exception as exc:  # noqa: BLE001 - the owner keeps the rows; retry after a pause
                self._on_error(exc)
                delay = min(delay * 2, RETRY_MAX_SECONDS) if delay else RETRY_FIRST_SECONDS
            else:
                delay = 0.0
