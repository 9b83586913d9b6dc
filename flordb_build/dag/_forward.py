"""Pass the signals that stop a command on to it: ``flordb-build exec`` stands between make and a recipe.

Without this, ``kill -TERM`` (or ``timeout``) ends ``exec`` and leaves its command running,
orphaned, with its task never recorded. With it, ``exec`` stays up, the command gets the
signal, and ``exec`` records how it ended and exits with its status.

SIGTERM and SIGHUP are always passed on. SIGINT is different: a Ctrl-C at a terminal (or a
supervisor's ``kill -INT -PGID``) signals the whole process group, which the command shares
with ``exec``, so it already has it; passing it on would deliver it twice, and a Python
script's cleanup would see a second KeyboardInterrupt. So SIGINT is passed on only when the
command is in another process group, or when it is the second SIGINT (the first one was sent
to ``exec`` alone, or did not stop the command): ``uv run`` settled on the same rule.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from types import FrameType, TracebackType

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class SignalForwarder:
    """While active (a context manager), catches :data:`FORWARDED` signals and sends them to the command."""

    def __init__(self) -> None:
        self.received: list[signal.Signals] = []  # while the command ran (or before it started)
        self._proc: subprocess.Popen[bytes] | None = None
        self._done = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> SignalForwarder:
        # Handlers can only be set from the main thread; elsewhere (a library caller's worker
        # thread) the process's own handling stays as it is.
        if threading.current_thread() is threading.main_thread():
            for signum in FORWARDED:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)  # type: ignore[arg-type]  # what signal.signal returned

    def attach(self, proc: subprocess.Popen[bytes]) -> None:
        """The command started: send it what arrived while it was being started."""
        self._proc = proc
        for signum in self.received:
            proc.send_signal(signum)

    def detach(self) -> None:
        """The command ended: later signals are ignored, so exec finishes recording and exits with its status."""
        self._done = True
        self._proc = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._done:
            return  # the command is gone; recording finishes and exec exits with its status
        sig = signal.Signals(signum)
        self.received.append(sig)
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        if sig is signal.SIGINT and self.received.count(sig) == 1 and shares_process_group(proc.pid):
            return  # a Ctrl-C: the command got it with the rest of the group
        proc.send_signal(sig)


def shares_process_group(pid: int) -> bool:
    """True when process ``pid`` is in this process's group (a group signal reached it too)."""
    try:
        return os.getpgid(pid) == os.getpgrp()
    except ProcessLookupError:
        return False


def describe_signals(signals: list[signal.Signals]) -> str:
    """``SIGTERM`` or ``SIGINT, SIGTERM``: the distinct names, in the order they came."""
    return ", ".join(dict.fromkeys(sig.name for sig in signals))
