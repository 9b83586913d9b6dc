"""Lineage of a file's exact content at its path, traced by (path, sha256) through the recorded DAG.

``files`` rows name every dep and target of every recorded task with its sha256. A content is
identified by its path *and* its hash: two files with identical bytes (a model and a copy of
it, an empty marker and an empty log) are different things, so a task that wrote the bytes
elsewhere is not this file's producer, only a note. For a file on disk::

                 upstream (producer + its inputs, recursively)
    prep.py ─┐
    raw.csv ─┴─> [prep] ─> clean.csv ─┐
                           train.py ──┴─> [train] ─> model.pkl ─> [infer] ─> predictions.csv
                                                    downstream (consumers + their outputs)

The producer of a content is the most recent *executed* task that listed that path with that
hash as a target (an up-to-date skip re-records the same hash without making it; it is the
fallback when the making predates recording). Consumers are executed tasks that listed that
path with that hash as a dep. A content already expanded in the same direction is shown once
and then marked ``repeated``.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from typing import Any

from .config import Config, load_config
from .errors import LineageError
from .store import Store


@dataclass(frozen=True)
class RunRef:
    """A recorded run of a script that a task started."""

    run_id: str
    filename: str | None
    status: str | None
    tstamp: str | None


@dataclass(frozen=True)
class TaskRef:
    """One task of one pipeline invocation."""

    pipeline_id: str
    task: str
    status: str | None
    started: float | None
    tool: str | None
    runs: tuple[RunRef, ...]


@dataclass(frozen=True)
class Producer:
    """The task that made a content, and the contents it read."""

    task: TaskRef
    inputs: tuple[LineageNode, ...]


@dataclass(frozen=True)
class Consumer:
    """A task that read a content, and the contents it made."""

    task: TaskRef
    outputs: tuple[LineageNode, ...]


@dataclass(frozen=True)
class LineageNode:
    """A file content (path as recorded) with its producer and/or consumers."""

    path: str
    sha256: str | None
    size: int | None
    producer: Producer | None = None
    consumers: tuple[Consumer, ...] = ()
    repeated: bool = False
    note: str | None = None


class LineageTracer:
    """Walks ``files``/``tasks``/``runs`` of one store; ``max_depth`` bounds each direction."""

    def __init__(self, store: Store | sqlite3.Connection, max_depth: int = 50) -> None:
        """:param store: the local store, or a connection holding its build-context tables (the team store's copy)."""
        self.conn = store if isinstance(store, sqlite3.Connection) else store.conn
        self.max_depth = max_depth
        self._seen_up: set[tuple[str, str]] = set()
        self._seen_down: set[tuple[str, str]] = set()

    def trace(self, path: str, sha256: str, size: int | None) -> LineageNode:
        """The full lineage of a content: producer chain upstream and consumer chain downstream."""
        up = self.upstream(path, sha256, size, 0)
        down = self.downstream(path, sha256, size, 0)
        note = up.note
        if up.producer is None and not down.consumers:
            note = "; ".join(n for n in (self._unrecorded_note(path, sha256), up.note) if n)
        return LineageNode(path, sha256, size, up.producer, down.consumers, note=note)

    # -- upstream ------------------------------------------------------------------------

    def upstream(self, path: str, sha256: str | None, size: int | None, depth: int) -> LineageNode:
        """``path`` with the task that produced its content and, recursively, that task's inputs."""
        if sha256 is None:
            return LineageNode(path, None, size, note="missing when recorded")
        if (path, sha256) in self._seen_up:
            return LineageNode(path, sha256, size, repeated=True)
        self._seen_up.add((path, sha256))
        task = self._producer(path, sha256)
        if task is None:
            return LineageNode(path, sha256, size, note=self._same_content_note(path, sha256))
        inputs: tuple[LineageNode, ...] = ()
        if depth < self.max_depth:
            rows = self.conn.execute(
                "SELECT path, sha256, size FROM files WHERE pipeline_id = ? AND task = ? AND role = 'dep' ORDER BY path",
                (task.pipeline_id, task.task),
            ).fetchall()
            inputs = tuple(self.upstream(p, s, z, depth + 1) for p, s, z in rows)
        return LineageNode(path, sha256, size, producer=Producer(task, inputs))

    def _producer(self, path: str, sha256: str) -> TaskRef | None:
        # An executed task wrote this content at this path; failing that, the newest task that found it there.
        row = None
        for executed in (1, 0):
            row = self.conn.execute(
                "SELECT f.pipeline_id, f.task, t.status, t.started, p.tool FROM files f "
                "JOIN tasks t ON t.pipeline_id = f.pipeline_id AND t.task = f.task "
                "LEFT JOIN pipelines p ON p.pipeline_id = f.pipeline_id "
                "WHERE f.path = ? AND f.sha256 = ? AND f.role = 'target' AND (t.status = 'executed') = ? "
                "ORDER BY t.started DESC LIMIT 1",
                (path, sha256, executed),
            ).fetchone()
            if row is not None:
                return self._task_ref(*row)
        return None

    def _same_content_note(self, path: str, sha256: str) -> str | None:
        """A note naming where else a task wrote these exact bytes (not this path's producer)."""
        row = self.conn.execute(
            "SELECT f.path, f.task, f.pipeline_id FROM files f "
            "JOIN tasks t ON t.pipeline_id = f.pipeline_id AND t.task = f.task "
            "WHERE f.sha256 = ? AND f.role = 'target' AND f.path != ? AND t.status = 'executed' "
            "ORDER BY t.started DESC LIMIT 1",
            (sha256, path),
        ).fetchone()
        if row is None:
            return None
        other, task, pipeline_id = row
        return f"the same bytes were written to '{other}' by task '{task}' (pipeline {pipeline_id}): a different file"

    # -- downstream ----------------------------------------------------------------------

    def downstream(self, path: str, sha256: str | None, size: int | None, depth: int) -> LineageNode:
        """``path`` with the tasks that consumed its content and, recursively, what they made."""
        if sha256 is None:
            return LineageNode(path, None, size, note="missing when recorded")
        if (path, sha256) in self._seen_down:
            return LineageNode(path, sha256, size, repeated=True)
        self._seen_down.add((path, sha256))
        rows = self.conn.execute(
            "SELECT DISTINCT f.pipeline_id, f.task, t.status, t.started, p.tool FROM files f "
            "JOIN tasks t ON t.pipeline_id = f.pipeline_id AND t.task = f.task "
            "LEFT JOIN pipelines p ON p.pipeline_id = f.pipeline_id "
            "WHERE f.path = ? AND f.sha256 = ? AND f.role = 'dep' AND t.status = 'executed' ORDER BY t.started",
            (path, sha256),
        ).fetchall()
        consumers = []
        for row in rows:
            task = self._task_ref(*row)
            outputs: tuple[LineageNode, ...] = ()
            if depth < self.max_depth:
                targets = self.conn.execute(
                    "SELECT path, sha256, size FROM files WHERE pipeline_id = ? AND task = ? AND role = 'target' "
                    "ORDER BY path",
                    (task.pipeline_id, task.task),
                ).fetchall()
                outputs = tuple(self.downstream(p, s, z, depth + 1) for p, s, z in targets)
            consumers.append(Consumer(task, outputs))
        return LineageNode(path, sha256, size, consumers=tuple(consumers))

    # -- helpers -------------------------------------------------------------------------

    def _task_ref(self, pipeline_id: str, task: str, status: str | None, started: float | None, tool: str | None) -> TaskRef:
        runs = self.conn.execute(
            "SELECT run_id, filename, status, tstamp FROM runs WHERE pipeline_id = ? AND task = ? ORDER BY tstamp",
            (pipeline_id, task),
        ).fetchall()
        return TaskRef(pipeline_id, task, status, started, tool, tuple(RunRef(*r) for r in runs))

    def _unrecorded_note(self, path: str, sha256: str) -> str:
        row = self.conn.execute(
            "SELECT f.task, f.role, f.sha256 FROM files f "
            "JOIN tasks t ON t.pipeline_id = f.pipeline_id AND t.task = f.task "
            "WHERE f.path = ? ORDER BY t.started DESC LIMIT 1",
            (path,),
        ).fetchone()
        if row is None:
            return "no recorded task read or wrote this content at this path"
        task, role, recorded = row
        return (
            f"this content was never recorded at this path; task '{task}' last recorded '{path}' (as {role}) with sha256 "
            f"{(recorded or '?')[:12]}: the file changed since"
        )


def trace_lineage(path: str | os.PathLike[str], config: Config | None = None, max_depth: int = 50) -> LineageNode:
    """Lineage of the file at ``path`` as it is now (by its sha256).

    :raises LineageError: when the file does not exist or nothing was ever recorded.
    """
    from .dag._record import relative_path, sha256_file

    if not os.path.isfile(path):
        raise LineageError(f"No file '{os.fspath(path)}'; give the path of a file a pipeline read or wrote.")
    from .reader import open_read_only

    config = config or load_config()
    store = open_read_only(config)  # tracing only reads: never migrate or mark runs
    if store is None:
        raise LineageError(f"No flordb_build store at '{config.db_path}' yet; run a recorded pipeline first.")
    try:
        rel = relative_path(path, config.root)
        return LineageTracer(store, max_depth).trace(rel, sha256_file(path), os.path.getsize(path))
    finally:
        store.close()


def render_lineage(node: LineageNode) -> str:
    """The lineage tree as indented text (what ``flordb-build lineage`` prints)."""
    lines = [f"{node.path}  sha256 {_short(node.sha256)}{_size(node.size)}"]
    if node.note:
        lines.append(f"  ({node.note})")
    if node.producer is not None:
        lines.append("  produced by:")
        _render_producer(node.producer, lines, "    ")
    elif node.consumers or not node.note:  # else the note says why nothing is known
        lines.append("  produced by: no recorded task (a source file, or made before recording)")
    if node.consumers:
        lines.append("  consumed by:")
        for consumer in node.consumers:
            _render_consumer(consumer, lines, "    ")
    elif node.producer is not None or not node.note:
        lines.append("  consumed by: no recorded task yet")
    return "\n".join(lines)


def _render_producer(producer: Producer, lines: list[str], indent: str) -> None:
    lines.append(indent + _task_line(producer.task))
    _render_runs(producer.task, lines, indent + "  ")
    if producer.inputs:
        lines.append(indent + "  inputs:")
        for child in producer.inputs:
            lines.append(indent + "    " + _file_line(child))
            if child.producer is not None:
                _render_producer(child.producer, lines, indent + "      ")


def _render_consumer(consumer: Consumer, lines: list[str], indent: str) -> None:
    lines.append(indent + _task_line(consumer.task))
    _render_runs(consumer.task, lines, indent + "  ")
    if consumer.outputs:
        lines.append(indent + "  outputs:")
        for child in consumer.outputs:
            lines.append(indent + "    " + _file_line(child))
            for grand in child.consumers:
                _render_consumer(grand, lines, indent + "      ")


def _render_runs(task: TaskRef, lines: list[str], indent: str) -> None:
    for run in task.runs:
        lines.append(f"{indent}run {run.run_id}  {run.filename or '?'}  {run.status or '?'}  {run.tstamp or ''}")


def _task_line(task: TaskRef) -> str:
    from datetime import datetime

    when = datetime.fromtimestamp(task.started).isoformat(timespec="seconds") if task.started else "?"
    return f"task '{task.task}'  ({task.tool or '?'} pipeline {task.pipeline_id}, {task.status}, {when})"


def _file_line(node: LineageNode) -> str:
    suffix = "  (shown above)" if node.repeated else ""
    if node.note:
        suffix += f"  ({node.note})"
    return f"{node.path}  sha256 {_short(node.sha256)}{_size(node.size)}{suffix}"


def _short(sha: str | None) -> str:
    return sha[:12] if sha else "-"


def _size(size: int | None) -> str:
    return f"  {size} bytes" if size is not None else ""


def lineage_to_json(node: LineageNode) -> dict[str, Any]:
    """The lineage tree as plain dicts (``flordb-build lineage --format json``)."""
    from dataclasses import asdict

    return asdict(node)


__all__ = [
    "Consumer",
    "LineageNode",
    "LineageTracer",
    "Producer",
    "RunRef",
    "TaskRef",
    "lineage_to_json",
    "render_lineage",
    "trace_lineage",
]
