"""Ending a recorded run when the process is told to stop.

SIGTERM and SIGHUP are how SLURM, Kubernetes and ``docker stop`` end a job. Their default action
kills the process on the spot: the run would stay ``running``, lose its last queued rows and get
no snapshot. While a run records, :class:`StopSignals` handles them the way Python handles
Ctrl-C: the handler raises (:class:`SignalExit`, a quiet ``SystemExit``) in the main thread, the
script unwinds through its ``finally`` blocks, the run is closed at exit (flushed, marked
``interrupted``, snapshotted), and then the process dies of the signal (:func:`die_of`), so its
parent sees the signal's status. Handlers the user installed are left alone.

Closing a run must not be cut short by a second Ctrl-C (or a SIGTERM after the first):
:func:`signals_deferred` holds them while the run closes and reports which came.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

#: The signals a recording process handles itself when the user has no handler for them.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
#: Held while a run closes.
DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class SignalExit(SystemExit):
    """Raised by a stop signal: unwinds the script quietly (no traceback) with status 128 + signum."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


def signal_name(signum: int) -> str:
    """``SIGTERM`` for 15."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def in_main_thread() -> bool:
    """Signal handlers can only be set from the main thread."""
    return threading.current_thread() is threading.main_thread()


class StopSignals:
    """Handlers for SIGTERM and SIGHUP where the user installed none, until :meth:`restore`."""

    def __init__(self, on_signal: Callable[[int], None]) -> None:
        self._on_signal = on_signal
        self._installed: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self._on_signal(signum)
        raise SignalExit(signum)

    def install(self) -> None:
        """Install the handlers (main thread only; a signal the user handles keeps its handler)."""
        if not in_main_thread():
            return
        for sig in STOP_SIGNALS:
            if sig not in self._installed and signal.getsignal(sig) is signal.SIG_DFL:
                signal.signal(sig, self._handle)
                self._installed[sig] = signal.SIG_DFL

    def restore(self) -> None:
        """Put back what was there before (where our handler is still the one installed)."""
        if not in_main_thread():
            return
        for sig, previous in list(self._installed.items()):
            if signal.getsignal(sig) == self._handle:
                signal.signal(sig, previous)  # type: ignore[arg-type]
            del self._installed[sig]


@contextmanager
def signals_deferred() -> Iterator[list[int]]:
    """Hold SIGINT, SIGTERM and SIGHUP for the duration (main thread only); yields the list of
    those that arrived, in order, for the caller to act on afterwards."""
    arrived: list[int] = []
    if not in_main_thread():
        yield arrived
        return

    def hold(signum: int, frame: FrameType | None) -> None:
        arrived.append(signum)

    previous: dict[int, object] = {}
    for sig in DEFERRED_SIGNALS:
        current = signal.getsignal(sig)
        if current is None or current is signal.SIG_IGN:  # set outside Python, or ignored: leave it
            continue
        previous[sig] = current
        signal.signal(sig, hold)
    try:
        yield arrived
    finally:
        for held, handler in previous.items():
            signal.signal(held, handler)  # type: ignore[arg-type]


def die_of(signum: int) -> None:
    """End the process by ``signum`` with its default action, so the parent sees that status."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})
    os.kill(os.getpid(), signum)
    os._exit(128 + signum)  # only if the default action did not end the process
