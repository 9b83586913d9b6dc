"""The JSON-lines journals of runs and replays: their format, and appending whole lines only.

This module is the one place that knows the format; recording.py writes run journals through it,
hindsight/_backfill.py writes replay journals, ``rebuild`` and replay read both back.

A run journal (``.flor/runs/<run_id>.jsonl``, committed in the run's snapshot) is one JSON object
per line::

    {"run": {<the runs row as inserted: run_id, projid, tstamp, ...>}}          first
    {"env": {"env_id": ..., "env": <JSON text>}}                                  when recorded
    {"loops": [[ctx_id, parent_ctx, name, iteration, count, value], ...],        one per batch,
     "logs": [[seq, ctx_id, name, value, kind], ...],                             in write order
     "cols": [[name, typecode, seqs, ctx_ids, values], ...],                      (optional)
     "timings": [[ctx_id, kind, seconds], ...], "checkpoints": [[...], ...]}     (both optional)
    {"end": {"status": ..., "exit_code": ..., "error": ..., "ended": ..., ...}}  last (none: killed)

``cols`` (since issue 14) holds plain floats (typecode ``"d"``) and int64 ints (``"q"``) packed,
one column per name: ``values`` is base64 of little-endian float64/int64; ``seqs`` and ``ctx_ids``
are each either an int (the first of consecutive ints: the common case, a value per step) or
base64 of little-endian int64. A column stands for the rows ``[seqs[i], ctx_ids[i], name,
values[i], 0]``; a name is never in both ``logs`` and ``cols`` of one line. Journals without
``cols`` (older runs) read as before. 11 bytes a float instead of ~49, and no Python object per
value to encode.

A replay journal (``.flor/replays/<run_id>.jsonl`` on the shadow branch, hindsight/_journal.py)
holds a run's replayed state::

    {"replay": {"run_id": ..., "names": [...], "tstamp": ..., "divergent": {name: why}}}
    {"loops": [[ctx_id, parent_ctx, name, iteration, count, value], ...]}
    {"logs": [[seq, ctx_id, name, value, kind], ...]}

(``divergent`` only where names were written with ``--accept-divergent``; older journals lack it.)

Appending a run journal:

The journal is what ``flordb-build rebuild`` recreates the store from, and rebuild reads a
committed journal strictly: one torn line would make it unreadable. A write can stop half-way
(a full disk takes the first part of a line and refuses the rest), and forked children of the
recording process append batches to the same file (recording.py), so each append:

* takes an exclusive ``flock`` on the file (parent and children never interleave, and nobody
  appends while a failed append is being cut back),
* writes the whole line, and on any error truncates the file back to where the line began.

An append either leaves one complete line or leaves the file as it was, and raises ``OSError``.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import sys
import time
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .progression import is_consecutive

#: The batch kinds of a run journal's batch lines, in the order a batch entry lists them.
BATCH_KINDS = ("loops", "logs", "timings", "checkpoints")


def run_entry(row: dict[str, Any]) -> dict[str, Any]:
    """The first line of a run journal: the run's row as inserted."""
    return {"run": row}


def env_entry(env_id: str, env: str) -> dict[str, Any]:
    """The run's environment (environment.py's id and JSON text), so a rebuilt store has ``envs``."""
    return {"env": {"env_id": env_id, "env": env}}


def end_entry(end: dict[str, Any]) -> dict[str, Any]:
    """The last line of a finished run's journal: the columns its end set (a killed run has none)."""
    return {"end": end}


def batch_entry(
    loops: Sequence[Sequence[Any]], logs: Sequence[Sequence[Any]],
    timings: Sequence[Sequence[Any]] = (), checkpoints: Sequence[Sequence[Any]] = (),
    columns: Sequence[Any] = (),
) -> bytes:
    """The journal line of one written batch, as ASCII JSON text without its newline
    (``timings``/``checkpoints``/``cols`` only when there are any).

    The text is exactly ``json.dumps`` of ``{"loops", "logs", "cols", "timings", "checkpoints"}``;
    ``cols``' base64 strings are spliced in as bytes rather than passed through the encoder, which
    would scan and copy each of them (~11 bytes a value) twice more for nothing: base64 needs no
    escapes.

    :param columns: ``recorder.LogColumn`` values (name, typecode, seqs, ctxs, vals arrays).
    """
    rest: dict[str, Any] = {}
    if timings:
        rest["timings"] = timings
    if checkpoints:
        rest["checkpoints"] = checkpoints
    if not columns:
        return _dumps({"loops": loops, "logs": logs, **rest}).encode("ascii")
    parts = [_dumps({"loops": loops, "logs": logs})[:-1].encode("ascii"), b', "cols": [']
    for i, column in enumerate(columns):
        if column.typecode not in ("d", "q"):
            raise ValueError(f"a journal column of '{column.name}' has typecode {column.typecode!r}")
        parts += (
            b", [" if i else b"[", _dumps(column.name).encode("ascii"), b', "', column.typecode.encode("ascii"),
            b'", ', _ints_json(column.seqs), b", ", _ints_json(column.ctxs),
            b', "', _encode_array_bytes(column.vals), b'"]',
        )
    parts.append(b"]")
    if rest:
        parts += (b", ", _dumps(rest)[1:-1].encode("ascii"))
    parts.append(b"}")
    return b"".join(parts)


def _dumps(value: Any) -> str:
    # ensure_ascii (the default) keeps the line pure ASCII: lone surrogates become escapes.
    # Entries are rows of scalars, never cyclic: skipping the cycle check saves ~13% of the encoding.
    return json.dumps(value, check_circular=False)


def _ints_json(values: array[int]) -> bytes:
    """Consecutive ints as the first of them (JSON text of an int); anything else packed (a base64 string)."""
    if values and is_consecutive(values):
        return str(values[0]).encode("ascii")
    return b'"' + _encode_array_bytes(values) + b'"'


_LITTLE = sys.byteorder == "little"


def _encode_array_bytes(values: array[Any]) -> bytes:
    if not _LITTLE:
        values = array(values.typecode, values)
        values.byteswap()
    return base64.b64encode(values)


def _decode_array(typecode: str, text: str) -> array[Any]:
    values = array(typecode)
    values.frombytes(base64.b64decode(text, validate=True))
    if not _LITTLE:
        values.byteswap()
    return values


def _decode_ints(encoded: Any, n: int) -> array[int]:
    if isinstance(encoded, int):
        return array("q", range(encoded, encoded + n))
    return _decode_array("q", encoded)


def column_rows(entry: Sequence[Any]) -> list[list[Any]]:
    """The log rows ``[seq, ctx_id, name, value, 0]`` one ``cols`` item of a batch line stands for.

    :raises ValueError: when the item is malformed (lengths that differ, an unknown typecode).
    """
    name, typecode, seqs, ctxs, vals = entry
    if typecode not in ("d", "q") or not isinstance(name, str):
        raise ValueError(f"a journal column has typecode {typecode!r} and name {name!r}")
    values = _decode_array(typecode, vals)
    n = len(values)
    seq_ids, ctx_ids = _decode_ints(seqs, n), _decode_ints(ctxs, n)
    if len(seq_ids) != n or len(ctx_ids) != n:
        raise ValueError(f"a journal column of '{name}' has {len(seq_ids)} seqs, {len(ctx_ids)} ctx ids, {n} values")
    return [[seq, ctx, name, value, 0] for seq, ctx, value in zip(seq_ids, ctx_ids, values.tolist(), strict=True)]


@dataclass(frozen=True)
class RunJournal:
    """One run journal, parsed."""

    run: dict[str, Any]
    env: dict[str, Any] | None
    end: dict[str, Any]
    loops: list[list[Any]]
    logs: list[list[Any]]
    timings: list[list[Any]]
    checkpoints: list[list[Any]]
    skipped_lines: int = 0
    #: ``logs`` as the batches the run wrote them in: the store packs each batch's values into its
    #: own ``log_columns`` chunks, so a rebuild packs them the same way.
    log_batches: tuple[list[list[Any]], ...] = ()

    @property
    def run_id(self) -> str:
        return str(self.run["run_id"])

    @property
    def loop_contexts(self) -> int:
        """Loop iterations the journal holds (a ``loops`` row is a block of ``count`` iterations)."""
        return sum(int(block[4]) for block in self.loops)


def batch_line_rows(entry: Mapping[str, Any]) -> list[list[Any]]:
    """Every log row ``[seq, ctx_id, name, value, kind]`` of one batch line: its ``logs`` and its ``cols``.

    :raises ValueError: when a column is malformed.
    """
    return [*entry.get("logs", ()), *(row for column in entry.get("cols", ()) for row in column_rows(column))]


def parse_run_journal(text: str, tolerant: bool) -> RunJournal:
    """Parse a run journal; ``tolerant`` skips unreadable lines (a killed run's torn last line).

    :raises ValueError: on an unreadable line (unless ``tolerant``) or when there is no run header.
    """
    run: dict[str, Any] | None = None
    env: dict[str, Any] | None = None
    end: dict[str, Any] = {}
    batches: dict[str, list[list[Any]]] = {kind: [] for kind in BATCH_KINDS}
    log_batches: list[list[list[Any]]] = []
    skipped = 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict):
                raise ValueError(f"a journal line is not an object: {line[:80]!r}")
        except ValueError:
            if not tolerant:
                raise
            skipped += 1
            continue
        if "run" in entry:
            run = entry["run"]
        elif "env" in entry:
            env = entry["env"]
        elif "end" in entry:
            end = entry["end"]
        else:
            try:
                packed = [row for column in entry.get("cols", ()) for row in column_rows(column)]
            except (ValueError, TypeError) as exc:  # binascii.Error is a ValueError
                if not tolerant:
                    raise ValueError(f"a journal line has an unreadable column: {exc}") from exc
                skipped += 1
                continue
            for kind, rows in batches.items():
                rows.extend(entry.get(kind, ()))
            batches["logs"].extend(packed)
            if entry.get("logs") or packed:
                log_batches.append([*entry.get("logs", ()), *packed])
    if not isinstance(run, dict) or not run.get("run_id"):
        raise ValueError("it has no run header with a run_id")
    return RunJournal(
        run, env, end, batches["loops"], batches["logs"], batches["timings"], batches["checkpoints"], skipped,
        tuple(log_batches),
    )


@dataclass(frozen=True)
class ReplayJournal:
    """One replay journal, parsed: the run's replayed loop contexts and values."""

    run_id: str
    names: list[str]
    loops: list[list[Any]]
    logs: list[list[Any]]
    #: Replayed names written although the replay diverged from the record (--accept-divergent): name -> why.
    divergent: dict[str, str] = field(default_factory=dict)


def replay_journal_text(
    run_id: str,
    names: Sequence[str],
    loops: Sequence[Sequence[Any]],
    logs: Sequence[Sequence[Any]],
    divergent: Mapping[str, str] | None = None,
) -> str:
    """The journal of a run's replayed state: loop blocks and ``(seq, ctx_id, name, value, kind)`` rows,
    and the names of that state marked divergent (the header's ``divergent``, only when there are some)."""
    header: dict[str, Any] = {"run_id": run_id, "names": list(names), "tstamp": time.time()}
    if divergent:
        header["divergent"] = dict(divergent)
    lines = [{"replay": header}, {"loops": [list(row) for row in loops]}, {"logs": [list(row) for row in logs]}]
    return "".join(json.dumps(line) + "\n" for line in lines)


def parse_replay_journal(text: str) -> ReplayJournal:
    """Parse a replay journal (committed whole: strict).

    :raises ValueError: on an unreadable line or when there is no replay header.
    """
    header: dict[str, Any] = {}
    loops: list[list[Any]] = []
    logs: list[list[Any]] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        entry = json.loads(line)
        header = entry.get("replay", header)
        loops.extend(entry.get("loops", ()))
        logs.extend(entry.get("logs", ()))
    if not header.get("run_id"):
        raise ValueError("it has no replay header with a run_id")
    marks = header.get("divergent") or {}
    divergent = {str(k): str(v) for k, v in marks.items()} if isinstance(marks, dict) else {}
    return ReplayJournal(str(header["run_id"]), list(header.get("names", [])), loops, logs, divergent)


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

    def append(self, entry: dict[str, Any] | bytes) -> None:
        """Append ``entry`` (an object, or a :func:`batch_entry` line) as one JSON line, whole or not at all.

        :raises OSError: when the line could not be written (the file is then as it was).
        """
        if self._fd is None:
            raise OSError(f"the journal '{self.path}' is closed")
        data = entry + b"\n" if isinstance(entry, bytes) else (_dumps(entry) + "\n").encode("ascii")
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
