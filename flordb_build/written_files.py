"""The project files a recording process opens for writing, seen through Python's audit hooks.

A training loop that saves its best model to a git-ignored ``model.pt`` changes state that no
``flor.checkpointing`` object holds: a replay that skips the loop and runs a suffix that loads the
file finds none (issue 12.6). So each checkpoint stores the current contents of the project files
the run has written beside the objects (training_state.py), and a replay that restores the
checkpoint writes them back into its working tree. Which files, two ways, since neither sees all:

- ``sys.addaudithook``'s ``open`` event: every ``open()``, ``io.open`` and ``os.open`` for writing
  (numpy, pickle, json and most libraries write through them), as it happens;
- the files under the root modified since the run started, found by a scan at each checkpoint:
  ``torch.save(obj, "model.pt")`` opens its file in C++ (PyTorchFileWriter), which raises no audit
  event. The scan skips ``.git``, ``.flor``, virtual environments and ``node_modules``, and gives
  up (with one warning) on a tree of more than :data:`MAX_SCANNED` entries; its cost is part of
  the checkpoint's measured materialize time, so the adaptive rule accounts for it.

An audit hook cannot be removed, so one hook per process consults the tracker of the running
recording and returns at once when there is none or the event is not ``open``. It never raises:
an exception in an audit hook would fail the user's ``open`` call.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

#: Directories under the project root whose files are never the script's state.
_IGNORED_TOP = frozenset({".flor", ".git", "__pycache__"})
#: Directory names the modification scan never enters, at any depth.
_NOT_SCANNED = frozenset(
    {".flor", ".git", "__pycache__", "node_modules", ".venv", "venv", ".tox", ".mypy_cache"}
)
#: Directory entries beyond which the scan stops for the rest of the run (a data directory).
MAX_SCANNED = 20_000
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


class WrittenFiles:
    """Project-relative paths of the files opened for writing while this tracker is current."""

    def __init__(self, root: Path) -> None:
        self.root = str(root.resolve())
        self._prefix = self.root.rstrip(os.sep) + os.sep
        self._paths: dict[str, None] = {}  # insertion-ordered set
        self._lock = threading.Lock()
        self.started_ns = time.time_ns()
        #: Why the modification scan stopped (None while it runs); the caller warns once.
        self.scan_stopped: str | None = None

    def note(self, path: Any) -> None:
        """Remember ``path`` if it names a file under the root (not flordb_build's or git's own)."""
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        elif not isinstance(path, str):
            path = os.fspath(path) if isinstance(path, os.PathLike) else None
        if not path:
            return  # a file descriptor (int), or nothing to go by
        absolute = os.path.abspath(path)
        if not absolute.startswith(self._prefix):
            return
        relative = absolute[len(self._prefix) :]
        if relative.split(os.sep, 1)[0] in _IGNORED_TOP:
            return
        with self._lock:
            self._paths[Path(relative).as_posix()] = None

    def paths(self) -> list[str]:
        """The noted paths, in the order first written."""
        with self._lock:
            return list(self._paths)

    def scan(self) -> list[str]:
        """Note the files under the root modified since the run started; return every noted path."""
        if self.scan_stopped is None:
            found: list[str] = []
            seen = self._walk(self.root, found, 0)
            if seen > MAX_SCANNED:
                self.scan_stopped = (
                    f"the project has more than {MAX_SCANNED} files and directories outside .git, .flor and "
                    "virtual environments, so files the run writes are no longer looked for at checkpoints; "
                    "a replay restores only those written through Python's open()"
                )
            else:
                for path in found:
                    self.note(path)
        return self.paths()

    def _walk(self, directory: str, found: list[str], seen: int) -> int:
        try:
            entries = list(os.scandir(directory))
        except OSError:
            return seen
        for entry in entries:
            seen += 1
            if seen > MAX_SCANNED:
                return seen
            try:
                if entry.is_dir(follow_symlinks=False):
                    if entry.name not in _NOT_SCANNED and not os.path.exists(
                        os.path.join(entry.path, "pyvenv.cfg")
                    ):
                        seen = self._walk(entry.path, found, seen)
                elif entry.is_file(follow_symlinks=False) and entry.stat().st_mtime_ns >= self.started_ns:
                    found.append(entry.path)
            except OSError:
                continue  # removed while we looked
        return seen


_current: WrittenFiles | None = None
_installed = False
_install_lock = threading.Lock()


def track_written_files(root: Path) -> WrittenFiles:
    """Start noting the files written under ``root`` (for the process's one recording run)."""
    global _current, _installed
    tracker = WrittenFiles(root)
    with _install_lock:
        if not _installed:
            sys.addaudithook(_audit)
            _installed = True
        _current = tracker
    return tracker


def stop_tracking(tracker: WrittenFiles) -> None:
    """Stop noting files for ``tracker`` (the run ended)."""
    global _current
    with _install_lock:
        if _current is tracker:
            _current = None


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event != "open":
        return
    tracker = _current
    if tracker is None:
        return
    try:
        path, mode, flags = args
        if mode is None:  # os.open: the flags tell
            writing = isinstance(flags, int) and bool(flags & _WRITE_FLAGS)
        else:
            writing = any(c in mode for c in "wax+")
        if writing:
            tracker.note(path)
    except Exception:  # noqa: S110 - never fail the user's open() for our bookkeeping
        pass
