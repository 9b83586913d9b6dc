"""Appending to a run's journal (``.flor/runs/<run_id>.jsonl``) so that it only ever holds whole lines.

The journal is what ``flordb-build rebuild`` recreates the store from, and rebuild reads a
committed journal strictly: one torn line would make it unreadable. A write can stop half-way
(a full disk takes the first part of a line and refuses the rest), and forked children of the
recording process append batches to the same file (runtime.py), so each append:

* takes an exclusive ``flock`` on the file (parent and children never interleave, and nobody
  appends while a failed append is being cut back),
* writes the whole line, and on any error truncates the file back to where the line began.

An append either leaves one complete line or leaves the file as it was, and raises ``OSError``.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any


class JournalFile:
    """One process's append handle on a run journal."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def open(cls, path: Path) -> JournalFile:
        """Open ``path`` for appending, creating it (and its folder) when missing.

        :raises OSError: when the folder or file cannot be created or opened for writing.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        return cls(path, os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))

    def append(self, entry: dict[str, Any]) -> None:
        """Append ``entry`` as one JSON line, whole or not at all.

        :raises OSError: when the line could not be written (the file is then as it was).
        """
        if self._fd is None:
            raise OSError(f"the journal '{self.path}' is closed")
        # ensure_ascii (the default) keeps the line pure ASCII: lone surrogates become escapes.
        # Entries are rows of scalars, never cyclic: skipping the cycle check saves ~13% of the
        # encoding, the flusher's largest cost after SQLite itself.
        data = (json.dumps(entry, check_circular=False) + "\n").encode("ascii")
        fd = self._fd
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            start = os.fstat(fd).st_size
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
            except OSError:
                try:
                    os.ftruncate(fd, start)
                except OSError:
                    pass  # nothing more can be done; the next append starts after a torn line
                raise
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Close the handle (idempotent)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
