"""Rows of build context: one ``pipelines`` row per invocation, ``tasks`` and ``files`` per task.

Both front ends write through :class:`BuildRecorder`: the doit reporter (one recorder for the
whole invocation, in doit's main process) and ``flordb-build exec`` (one short-lived recorder
per Make recipe, all recipes of one ``make`` sharing a pipeline id). Every row it writes to the
store also goes to the pipeline's journal (``_journal.py``), which ``rebuild`` reads back.

File hashes are computed once per content. :class:`FileHasher` looks a file up by
``(path, size, mtime_ns)`` first in memory, then among the file facts already stored, and
reads the file only when neither knows it:

    stat(path) -> (path, size, mtime_ns) -> memo? -> files row with same key? -> sha256(file)

A file modified less than :data:`RACY_SECONDS` before it was hashed is stored without its
``mtime_ns``: a second write in the same timestamp tick would not change the key (git calls
this "racily clean"), so such a hash is never reused.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import stat
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from ..filesets import write_task_facts
from ..redaction import redact_argv, redact_command
from ..store import Store, write_transaction
from ._journal import PIPELINE_COLUMNS, PipelineJournal, commit_message, merge_dag_node

RACY_SECONDS = 2.0


class TaskStatus(StrEnum):
    """What happened to a task in one invocation (the ``tasks.status`` column)."""

    EXECUTED = "executed"
    UP_TO_DATE = "up-to-date"
    FAILED = "failed"
    IGNORED = "ignored"
    INTERRUPTED = "interrupted"  # started, then stopped by a signal (Ctrl-C, SIGTERM, SIGHUP)


class PipelineStatus(StrEnum):
    """How a pipeline invocation ended (the ``pipelines.status`` column)."""

    RUNNING = "running"
    OK = "ok"
    FAILED = "failed"  # a task failed
    ERROR = "error"  # the tool itself failed (doit's exit status 2 or 3)
    INTERRUPTED = "interrupted"  # a signal stopped it


class FileRole(StrEnum):
    """Whether a file went into a task or came out of it (the ``files.role`` column)."""

    DEP = "dep"
    TARGET = "target"


_ROLE_TEXT = {role: role.value for role in FileRole}


def _path_role(fact: tuple[Any, ...]) -> tuple[Any, Any]:
    return fact[0], fact[1]


@dataclass(frozen=True)
class FileFact:
    """One dep or target of a task as found on disk (sha256/size None when it is missing)."""

    path: str
    role: FileRole
    sha256: str | None
    size: int | None
    mtime_ns: int | None


@dataclass(frozen=True)
class TaskRecord:
    """One ``tasks`` row."""

    task: str
    status: TaskStatus
    started: float
    ended: float
    reason: str | None = None
    actions: Sequence[str] = ()
    error: str | None = None


@dataclass
class DagNode:
    """A task as the pipeline's DAG JSON describes it."""

    name: str
    task_dep: list[str] = field(default_factory=list)
    file_dep: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    doc: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "task_dep": self.task_dep,
            "file_dep": self.file_dep,
            "targets": self.targets,
            "actions": [redacted_action(action) for action in self.actions],  # no secret reaches the DAG JSON
            "doc": self.doc,
        }


@functools.lru_cache(maxsize=8192)
def redacted_action(action: str) -> str:
    """:func:`redact_command` of a task's action, remembered: the DAG JSON and the task row both need it."""
    return redact_command(action)


def new_pipeline_id() -> str:
    """A fresh pipeline id (same shape as run ids)."""
    return uuid.uuid4().hex[:16]


def relative_path(path: str | os.PathLike[str], root: Path) -> str:
    """``path`` (relative to the cwd) as a posix path relative to ``root`` when inside it."""
    # os.path string operations, not pathlib: this runs for every dep and target of every task.
    absolute = os.path.abspath(path)
    prefix = os.path.join(str(root), "")
    if absolute.startswith(prefix):
        absolute = absolute[len(prefix) :]
    return absolute.replace(os.sep, "/")


def _unclean(path: str | os.PathLike[str]) -> bool:
    """False when ``path`` is relative and surely normal (``src/a.txt``): then ``cwd/path`` needs no normpath.

    Conservative: a component starting with a dot (``.cache/x``) also counts as unclean.
    """
    text = os.fspath(path)
    return os.sep != "/" or not text or text[0] == "/" or text[-1] == "/" or "//" in text or "/." in "/" + text


@dataclass(frozen=True)
class FileStat:
    """A dep or target stat-ed when its task was checked, whose hash is looked up later in a batch."""

    path: str  # as the task names it (relative to the cwd)
    rel: str
    role: FileRole
    size: int
    mtime_ns: int
    racy: bool


class FileHasher:
    """sha256 of deps and targets, reading each content once (see the module docstring).

    :meth:`facts` answers at once; :meth:`observe` + :meth:`resolve` split the same work for
    the many tasks of an up-to-date run: each task's files are stat-ed when doit checks it, and
    every hash the memo lacks is looked up in the store by one query for all of them.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.root = store.config.root
        self._root_prefix = os.path.join(str(self.root), "")
        self._memo: dict[tuple[str, int, int], str] = {}
        self._lock = threading.Lock()

    def remember_pipeline(self, pipeline_id: str) -> dict[str, tuple[str, list[tuple[Any, ...]]]]:
        """Memo the hashes of ``pipeline_id``'s files; its executions' sets, ``task -> (set id, facts)``.

        One query, before the tasks are checked: an up-to-date run then finds every unchanged file
        in memory (the same ``(path, size, mtime_ns)`` key the store lookup of :meth:`resolve` trusts).
        """
        rows = self.store.conn.execute(
            "SELECT tf.task, tf.set_id, s.path, s.role, s.sha256, s.size, s.mtime_ns "
            "FROM task_files tf JOIN file_sets s ON s.set_id = tf.set_id WHERE tf.pipeline_id = ?",
            (pipeline_id,),
        ).fetchall()
        sets: dict[str, tuple[str, list[tuple[Any, ...]]]] = {}
        memo = {}
        for task, sid, path, role, sha, size, mtime_ns in rows:
            sets.setdefault(task, (sid, []))[1].append((path, role, sha, size, mtime_ns))
            if sha is not None and mtime_ns is not None:
                memo[(path, size, mtime_ns)] = sha
        with self._lock:
            self._memo.update(memo)
        return sets

    def fact(self, path: str, role: FileRole) -> FileFact:
        """Stat and (if needed) hash ``path``; a missing or non-regular file gets no hash."""
        observed = self.observe([path], []) if role is FileRole.DEP else self.observe([], [path])
        return self.resolve([observed])[0][0]

    def facts(self, deps: Iterable[str], targets: Iterable[str]) -> list[FileFact]:
        """Facts of a task's deps then targets."""
        return self.resolve([self.observe(deps, targets)])[0]

    def observe(
        self, deps: Iterable[str], targets: Iterable[str], stats: Mapping[str, os.stat_result] | None = None
    ) -> list[FileFact | FileStat]:
        """Stat a task's deps then targets now; a file the memo knows is a finished :class:`FileFact`.

        ``stats``: files stat-ed already when the task was checked (the doit reporter stats every
        target then, for the missing ones): recorded as they were then, not stat-ed again.
        """
        now = time.time()
        prefix = self._root_prefix
        cwd = os.getcwd()  # once per task, not once per file (os.path.abspath asks for it every time)
        cwd_prefix = os.path.join(cwd, "")
        memo = self._memo  # read without the lock: a dict lookup is atomic, and entries are only ever added
        observed: list[FileFact | FileStat] = []
        for role, paths in ((FileRole.DEP, deps), (FileRole.TARGET, targets)):
            for path in paths:
                absolute = os.path.normpath(os.path.join(cwd, path)) if _unclean(path) else cwd_prefix + os.fspath(path)
                rel = (absolute[len(prefix) :] if absolute.startswith(prefix) else absolute).replace(os.sep, "/")
                st = stats.get(path) if stats else None
                if st is None:
                    try:
                        st = os.stat(path)
                    except OSError:
                        observed.append(FileFact(rel, role, None, None, None))
                        continue
                if not stat.S_ISREG(st.st_mode):
                    observed.append(FileFact(rel, role, None, None, None))
                    continue
                racy = now - st.st_mtime_ns / 1e9 < RACY_SECONDS
                sha = memo.get((rel, st.st_size, st.st_mtime_ns))
                if sha is None:
                    observed.append(FileStat(os.fspath(path), rel, role, st.st_size, st.st_mtime_ns, racy))
                else:
                    observed.append(FileFact(rel, role, sha, st.st_size, None if racy else st.st_mtime_ns))
        return observed

    def resolve(self, observed: Sequence[Sequence[FileFact | FileStat]]) -> list[list[FileFact]]:
        """The facts of :meth:`observe`'s results: stored hashes by one query, the rest read from disk."""
        unknown = [item for items in observed for item in items if isinstance(item, FileStat)]
        stored = self._stored_hashes(unknown)
        resolved: dict[int, FileFact] = {}
        for item, sha in zip(unknown, stored, strict=True):
            resolved[id(item)] = self._finish(item, sha)
        return [[resolved[id(i)] if isinstance(i, FileStat) else i for i in items] for items in observed]

    def _stored_hashes(self, unknown: Sequence[FileStat]) -> list[str | None]:
        """For each file, the sha256 of a ``files`` row with its ``(path, size, mtime_ns)``; one query for all."""
        if not unknown:
            return []
        keys = json.dumps([[u.rel, u.size, u.mtime_ns] for u in unknown])
        rows = self.store.conn.execute(
            "SELECT (SELECT f.sha256 FROM file_sets f WHERE f.path = json_extract(k.value, '$[0]') "
            "AND f.size = json_extract(k.value, '$[1]') AND f.mtime_ns = json_extract(k.value, '$[2]') "
            "AND f.sha256 IS NOT NULL LIMIT 1) FROM json_each(?) AS k ORDER BY k.key",
            (keys,),
        ).fetchall()
        return [row[0] for row in rows]

    def _finish(self, item: FileStat, sha: str | None) -> FileFact:
        """The fact of a file stat-ed earlier: the stored hash, else its content hashed now."""
        key = (item.rel, item.size, item.mtime_ns)
        mtime_ns: int | None = None if item.racy else item.mtime_ns
        if sha is None:
            try:
                sha = sha256_file(item.path)
                after = os.stat(item.path)
            except OSError:
                return FileFact(item.rel, item.role, None, None, None)
            if (after.st_size, after.st_mtime_ns) != (item.size, item.mtime_ns):
                # Changed since its task was checked: the hash is of what is there now, never reused.
                return FileFact(item.rel, item.role, sha, after.st_size, None)
        with self._lock:
            self._memo[key] = sha
        return FileFact(item.rel, item.role, sha, item.size, mtime_ns)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The sha256 hex digest of a file's content."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


class BuildRecorder:
    """Writes the rows of one pipeline invocation; safe to call from several threads."""

    def __init__(self, store: Store, pipeline_id: str) -> None:
        self.store = store
        self.pipeline_id = pipeline_id
        self.hasher = FileHasher(store)
        self.journal = PipelineJournal(store.config, pipeline_id)
        self._lock = threading.Lock()
        self._pending: list[tuple[TaskRecord, Sequence[FileFact | FileStat]]] = []
        #: task -> (set id, facts) of the previous invocation (:meth:`remember_previous`)
        self._previous: dict[str, tuple[str, list[tuple[Any, ...]]]] = {}

    def start_pipeline(
        self, tool: str, argv: Sequence[str], dag: Mapping[str, Any], started: float | None = None
    ) -> None:
        """Insert the ``pipelines`` row (status ``running``); a no-op when it exists already."""
        with self._lock, self.journal.locked():
            with write_transaction(self.store.conn):
                inserted = self.store.conn.execute(
                    "INSERT OR IGNORE INTO pipelines (pipeline_id, tool, argv, dag, started, status, cwd) "
                    "VALUES (?, ?, ?, ?, ?, 'running', ?)",
                    (
                        self.pipeline_id,
                        tool,
                        json.dumps(redact_argv(argv)),
                        json.dumps(dag),
                        time.time() if started is None else started,
                        os.getcwd(),
                    ),
                ).rowcount
            # A later recipe of the same make journals the row without its DAG: the DAG grows
            # one node at a time (add_dag_node), and rewriting all of it per recipe would not scale.
            self.journal.append_pipeline(self.pipeline_row(), with_dag=bool(inserted))

    def remember_previous(self, tool: str) -> None:
        """Load the facts of the newest earlier invocation of ``tool`` from this directory.

        Its file hashes go to the memo, and a task whose facts turn out the same shares its set
        without hashing it again: what makes an up-to-date doit run cheap to record (issue 14).
        """
        row = self.store.conn.execute(
            "SELECT pipeline_id FROM pipelines WHERE tool = ? AND cwd = ? AND pipeline_id <> ? "
            "ORDER BY started DESC LIMIT 1",
            (tool, os.getcwd(), self.pipeline_id),
        ).fetchone()
        if row is not None:
            previous = self.hasher.remember_pipeline(row[0])
            with self._lock:
                self._previous = previous

    def add_dag_node(self, node: DagNode) -> None:
        """Add (or replace) one task of the pipeline's DAG JSON (Make learns its DAG one recipe at a time)."""
        # Under the journal's lock: the store and the journal see the nodes of a make -j in one order.
        with self._lock, self.journal.locked():
            with write_transaction(self.store.conn):
                row = self.store.conn.execute(
                    "SELECT dag FROM pipelines WHERE pipeline_id = ?", (self.pipeline_id,)
                ).fetchone()
                self.store.conn.execute(
                    "UPDATE pipelines SET dag = ? WHERE pipeline_id = ?",
                    (merge_dag_node(row[0] if row else None, node.to_json()), self.pipeline_id),
                )
            self.journal.append_dag_node(node.to_json())

    def pipeline_row(self) -> dict[str, Any]:
        """The pipeline's ``pipelines`` row as the store holds it now."""
        row = self.store.conn.execute(
            "SELECT " + ", ".join(PIPELINE_COLUMNS) + " FROM pipelines WHERE pipeline_id = ?",  # noqa: S608
            (self.pipeline_id,),
        ).fetchone()
        return dict(zip(PIPELINE_COLUMNS, row, strict=True)) if row else {"pipeline_id": self.pipeline_id}

    def queue_task(self, record: TaskRecord, files: Sequence[FileFact | FileStat]) -> None:
        """Keep a task's rows for the next :meth:`flush` (cheap rows of skipped tasks).

        ``files`` may be :meth:`FileHasher.observe`'s results: their hashes are looked up at
        the flush, for all queued tasks together.
        """
        with self._lock:
            self._pending.append((record, files))

    def record_task(self, record: TaskRecord, files: list[FileFact]) -> None:
        """Write a task's rows now, together with anything queued."""
        self.queue_task(record, files)
        self.flush()

    def flush(self) -> None:
        """Write every queued task row and its file rows in one transaction."""
        with self._lock:
            queued, self._pending = self._pending, []
            if not queued:
                return
            facts = self.hasher.resolve([files for _, files in queued])
            pending = [(record, files) for (record, _), files in zip(queued, facts, strict=True)]
            task_rows = [
                (
                    self.pipeline_id,
                    r.task,
                    r.status.value,
                    r.reason,
                    r.started,
                    r.ended,
                    r.ended - r.started,
                    json.dumps([redacted_action(action) for action in r.actions]),
                    redact_command(r.error) if r.error else r.error,  # it may quote the command line
                )
                for r, _ in pending
            ]
            # Plain str roles (an enum's .value costs more than the rest of the row).
            by_task: dict[tuple[str, str], list[tuple[Any, ...]]] = {}
            for r, files in pending:  # a task queued twice keeps both batches' rows, the later winning
                by_task.setdefault((self.pipeline_id, r.task), []).extend(
                    [(f.path, _ROLE_TEXT[f.role], f.sha256, f.size, f.mtime_ns) for f in files]
                )
            same_as = {}  # executions whose facts are exactly those of the task's previous set
            for key, rows in by_task.items():
                previous = self._previous.get(key[1])
                if previous is not None and sorted(rows, key=_path_role) == sorted(previous[1], key=_path_role):
                    same_as[key] = previous[0]
            with write_transaction(self.store.conn):
                self.store.conn.executemany(
                    "INSERT OR REPLACE INTO tasks (pipeline_id, task, status, reason, started, ended, seconds, "
                    "actions, error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    task_rows,
                )
                # An execution with the facts of an earlier one (an up-to-date task) shares its file set.
                write_task_facts(self.store.conn, by_task, same_as)
            # One append per batch, after the store has it: a pipeline killed before its commit
            # leaves these lines for rebuild (an up-to-date doit run writes one line in all).
            self.journal.append_tasks(
                [list(r[1:]) for r in task_rows],
                [[task, *fact] for (_, task), facts in by_task.items() for fact in facts],
            )

    def finish_pipeline(self, status: str, exit_code: int | None) -> None:
        """Flush and set the pipeline's end time, status and exit code (then :meth:`commit_journal`)."""
        self.flush()
        with self._lock, write_transaction(self.store.conn):
            self.store.conn.execute(
                "UPDATE pipelines SET ended = ?, status = ?, exit_code = ? WHERE pipeline_id = ?",
                (time.time(), status, exit_code, self.pipeline_id),
            )

    def commit_journal(self) -> str | None:
        """Journal the pipeline's row as it is now and commit the journal to ``flor.shadow``.

        Returns the commit (None outside git). Under the journal's lock, so that the commits of
        the recipes of one make land in the order of what they hold: the newest is the fullest.

        :raises SnapshotError: when git refuses (the journal stays on disk for ``rebuild``).
        """
        self.flush()
        with self._lock, self.journal.locked():
            row = self.pipeline_row()
            self.journal.append_pipeline(row, with_dag=False)
            (n_tasks,) = self.store.conn.execute(
                "SELECT count(*) FROM tasks WHERE pipeline_id = ?", (self.pipeline_id,)
            ).fetchone()
            return self.journal.commit(commit_message(self.pipeline_id, row.get("tool"), row.get("status"), n_tasks))

    def close(self) -> None:
        """Flush what is queued and close the store connection."""
        try:
            self.flush()
        finally:
            self.store.close()


def pipeline_status(exit_code: int) -> PipelineStatus:
    """The ``pipelines.status`` for doit's exit code: ``ok``, ``failed``, ``error`` or ``interrupted``."""
    if exit_code == 0:
        return PipelineStatus.OK
    if exit_code == 1:
        return PipelineStatus.FAILED
    return PipelineStatus.INTERRUPTED if exit_code == INTERRUPTED_EXIT else PipelineStatus.ERROR


#: The exit status of a process stopped by Ctrl-C, as a shell reports it (128 + SIGINT).
INTERRUPTED_EXIT = 130
