"""Build context journals: a pipeline's rows as JSON lines, on disk as tasks finish, on ``flor.shadow`` when done.

The store is a cache of the shadow branch, so build context travels the way run journals do.
One file per pipeline invocation, ``.flor/pipelines/<pipeline_id>.jsonl``::

    {"pipeline": {"pipeline_id": ..., "tool": ..., "argv": ..., "dag": ..., "status": ..., ...}}
    {"pipeline_id": ..., "dag_node": {"name": ..., "file_dep": [...], "targets": [...], ...}}
    {"pipeline_id": ..., "tasks": [[task, status, reason, started, ended, seconds, actions, error], ...],
                         "files": [[task, path, role, sha256, size, mtime_ns], ...]}

Lines are upserts applied in order: each ``pipeline`` line sets the columns it holds (a line
without ``dag`` keeps the DAG so far), a ``dag_node`` line replaces that task of the DAG (Make
learns its DAG one recipe at a time), and a ``tasks``/``files`` row replaces an earlier one
with the same key. Each append is one
``write(2)`` on an ``O_APPEND`` descriptor, so the recipes of a ``make -j`` never interleave
inside a line, and a process killed at any instant leaves whole lines (at worst a torn last
one, which :func:`load_pipeline_journal` skips).

When it is committed (:meth:`PipelineJournal.commit`, a tree holding only the file):

    doit  once, when the invocation ends (also when it fails or is interrupted)
    make  after every recipe (make has no end event), under an ``flock`` on the file, so that
          commits land in the order of the content they hold and the newest one is the fullest

``rebuild`` takes the newest committed journal of each pipeline, unless the copy on disk
extends it (a pipeline killed before its commit: :func:`select_journals`).
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config
from ..filesets import write_file_rows
from ..store import TABLES, write_transaction

PIPELINES_DIR = "pipelines"  # under .flor/, on disk and in the commits' trees
TRAILER = "Flor-Pipeline"
TASK_COLUMNS = ("task", "status", "reason", "started", "ended", "seconds", "actions", "error")
FILE_COLUMNS = ("task", "path", "role", "sha256", "size", "mtime_ns")
PIPELINE_COLUMNS = tuple(TABLES["pipelines"]["columns"])

_TASK_UPSERT = (
    "INSERT OR REPLACE INTO tasks (pipeline_id, task, status, reason, started, ended, seconds, actions, error) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_PIPELINE_UPSERT = (  # the column names come from store.TABLES, not from any input
    "INSERT OR REPLACE INTO pipelines (" + ", ".join(PIPELINE_COLUMNS) + ") VALUES ("  # noqa: S608
    + ", ".join("?" for _ in PIPELINE_COLUMNS) + ")"
)


def pipelines_dir(config: Config) -> Path:
    """``<root>/.flor/pipelines``: the journals of every recorded pipeline."""
    return config.flor_dir / PIPELINES_DIR


def pipelines_dir_in_tree(config: Config) -> str:
    """``.flor/pipelines`` as a path inside the shadow commits' trees."""
    return pipelines_dir(config).relative_to(config.root).as_posix()


class PipelineJournal:
    """The journal file of one pipeline invocation."""

    def __init__(self, config: Config, pipeline_id: str) -> None:
        self.config = config
        self.pipeline_id = pipeline_id
        self.path = pipelines_dir(config) / f"{pipeline_id}.jsonl"

    def append_pipeline(self, row: Mapping[str, Any], with_dag: bool) -> None:
        """Append the pipeline's row as it is now (without its DAG unless ``with_dag``)."""
        columns = [c for c in PIPELINE_COLUMNS if with_dag or c != "dag"]
        self._append({"pipeline": {c: row.get(c) for c in columns}})

    def append_dag_node(self, node: Mapping[str, Any]) -> None:
        """Append one task of the pipeline's DAG (see :func:`merge_dag_node`)."""
        self._append({"pipeline_id": self.pipeline_id, "dag_node": dict(node)})

    def append_tasks(self, tasks: Sequence[Sequence[Any]], files: Sequence[Sequence[Any]]) -> None:
        """Append ``tasks`` rows (:data:`TASK_COLUMNS`) and ``files`` rows (:data:`FILE_COLUMNS`)."""
        if tasks or files:
            self._append({"pipeline_id": self.pipeline_id, "tasks": list(tasks), "files": list(files)})

    def _append(self, entry: Mapping[str, Any]) -> None:
        data = (json.dumps(entry) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(data)
            while view:  # one call in practice; a short write (a full disk) continues where it stopped
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold an exclusive ``flock`` on the journal (recipes of one make append and commit in turn)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def commit(self, message: str) -> str | None:
        """Commit the journal as it is on disk to ``flor.shadow``; the commit (None outside git).

        :raises SnapshotError: when git refuses.
        """
        if not self.config.in_git:
            return None
        from ..snapshot import commit_path  # git plumbing loads only when a pipeline commits

        # The file itself, as it lies in the work tree: git hashes it while adding it.
        in_tree = f"{pipelines_dir_in_tree(self.config)}/{self.pipeline_id}.jsonl"
        return commit_path(self.config.root, in_tree, message)


def merge_dag_node(dag_text: str | None, node: Mapping[str, Any]) -> str:
    """The DAG JSON ``dag_text`` with ``node`` added, or replacing the task of the same name."""
    dag = json.loads(dag_text) if dag_text else {"tasks": []}
    dag["tasks"] = [t for t in dag.get("tasks", []) if t.get("name") != node["name"]] + [dict(node)]
    return json.dumps(dag)


def commit_message(pipeline_id: str, tool: str | None, status: str | None, n_tasks: int) -> str:
    """The message of a build context commit: the pipeline, its tool and status (never its argv)."""
    return f"flor pipeline {pipeline_id}: {tool or '?'} {status or '?'}, {n_tasks} tasks\n\n{TRAILER}: {pipeline_id}\n"


def journal_store_rows(conn: sqlite3.Connection, journal: PipelineJournal) -> None:
    """Write a journal of a pipeline from its rows in a store (stores recorded before journals existed)."""
    pipeline_id = journal.pipeline_id
    cursor = conn.execute(
        "SELECT " + ", ".join(PIPELINE_COLUMNS) + " FROM pipelines WHERE pipeline_id = ?", (pipeline_id,)  # noqa: S608
    )
    row = cursor.fetchone()
    if row is not None:
        journal.append_pipeline(dict(zip(PIPELINE_COLUMNS, row, strict=True)), with_dag=True)
    tasks = conn.execute(
        "SELECT " + ", ".join(TASK_COLUMNS) + " FROM tasks WHERE pipeline_id = ?", (pipeline_id,)  # noqa: S608
    ).fetchall()
    files = conn.execute(
        "SELECT " + ", ".join(FILE_COLUMNS) + " FROM files WHERE pipeline_id = ?", (pipeline_id,)  # noqa: S608
    ).fetchall()
    journal.append_tasks([list(t) for t in tasks], [list(f) for f in files])


# -- reading back (rebuild) ------------------------------------------------------------------


@dataclass(frozen=True)
class PipelineLoad:
    """What one journal put into a store."""

    pipeline_id: str | None
    tasks: int
    skipped_lines: int


def journal_pipeline_id(text: str) -> str | None:
    """The pipeline a journal belongs to (from its first readable line)."""
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            found = entry.get("pipeline_id") or (entry.get("pipeline") or {}).get("pipeline_id")
            if found:
                return str(found)
    return None


def iter_disk_journals(config: Config) -> Iterator[tuple[str, str]]:
    """``(pipeline id, text)`` of every journal in ``.flor/pipelines`` on disk."""
    directory = pipelines_dir(config)
    if not directory.is_dir():
        return
    for path in sorted(directory.glob("*.jsonl")):
        yield path.stem, path.read_text(encoding="utf-8", errors="replace")


def select_journals(committed: Mapping[str, str], on_disk: Mapping[str, str]) -> dict[str, str]:
    """Per pipeline, the journal to load: the newest committed one, or the disk copy when it extends it.

    A journal only ever grows, so a disk copy that starts with the committed text holds everything
    the commit holds plus what a killed pipeline appended after it.
    """
    chosen = dict(committed)
    for pipeline_id, text in on_disk.items():
        base = chosen.get(pipeline_id)
        if base is None or (text.startswith(base) and len(text) > len(base)):
            chosen[pipeline_id] = text
    return chosen


def load_pipeline_journal(conn: sqlite3.Connection, text: str) -> PipelineLoad:
    """Apply one journal's lines to ``conn`` in order; unreadable lines (a torn end) are skipped and counted."""
    pipeline: dict[str, Any] | None = None
    tasks: dict[tuple[Any, ...], tuple[Any, ...]] = {}
    files: dict[tuple[Any, ...], tuple[Any, ...]] = {}
    skipped = 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            if "pipeline" in entry:
                given = {c: v for c, v in entry["pipeline"].items() if c in PIPELINE_COLUMNS}
                pipeline = {**(pipeline or dict.fromkeys(PIPELINE_COLUMNS)), **given}
                continue
            if "dag_node" in entry:
                if pipeline is None:
                    pipeline = dict.fromkeys(PIPELINE_COLUMNS)
                pipeline["dag"] = merge_dag_node(pipeline["dag"], entry["dag_node"])
                continue
            pipeline_id = str(entry["pipeline_id"])
            line_tasks = [_row(pipeline_id, row, TASK_COLUMNS) for row in entry.get("tasks", ())]
            line_files = [_row(pipeline_id, row, FILE_COLUMNS) for row in entry.get("files", ())]
            tasks.update((row[:2], row) for row in line_tasks)
            files.update((row[:5], row) for row in line_files)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError):
            skipped += 1
    with write_transaction(conn):
        if pipeline is not None and pipeline["pipeline_id"]:
            conn.execute(_PIPELINE_UPSERT, [pipeline[c] for c in PIPELINE_COLUMNS])
        conn.executemany(_TASK_UPSERT, list(tasks.values()))
        write_file_rows(conn, list(files.values()))  # the sets the recorder made: the same content, the same ids
    found = (pipeline or {}).get("pipeline_id") or journal_pipeline_id(text)
    return PipelineLoad(found, len(tasks), skipped)


def _row(pipeline_id: str, row: Any, columns: tuple[str, ...]) -> tuple[Any, ...]:
    """``(pipeline_id, *row)`` after checking the row has one value per column (else ValueError)."""
    if not isinstance(row, list) or len(row) != len(columns):
        raise ValueError(f"a journal row must have {len(columns)} values ({', '.join(columns)})")
    return (pipeline_id, *row)
