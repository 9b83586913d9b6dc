"""Recreate ``.flor/flor.db`` from the journals: those the snapshot commits carry and those left on disk.

The database is a cache of these JSON-lines journals, so nothing is lost when it is deleted:

| journal | in git (``flor.shadow``) | on disk |
|---|---|---|
| ``.flor/runs/<run_id>.jsonl``: a ``run`` header, ``env``, ``loops``/``logs``/``timings``/``checkpoints`` batches, an ``end`` footer | in the run's snapshot commit | every run's, also a killed run's (no commit, no footer: status ``killed``) |
| ``.flor/pipelines/<pipeline_id>.jsonl``: ``pipelines``/``tasks``/``files`` rows (dag/_journal.py) | committed when a doit run ends, after each Make recipe | appended as tasks finish |
| ``.flor/replays/<run_id>.jsonl``: replayed values (hindsight/_journal.py) | committed after each replay | - |

A committed run journal wins over the disk copy of the same run; for a pipeline, the newest
commit wins unless the disk copy extends it. The new database is built beside the old one and
swapped in while the store lock (store.StoreLock) is held exclusively, so no live process loses
rows, and in an order where a kill at any instant leaves a usable store, the old or the new::

    lock exclusively ──> build flor.db.rebuild (DELETE journal mode, complete, fsynced)
      ──> fold the old flor.db's WAL into it ──> remove the old -wal/-shm
      ──> os.replace(flor.db.rebuild, flor.db) ──> WAL mode on, unlock
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from . import history, snapshot
from .config import Config
from .dag._journal import (
    PipelineJournal,
    iter_disk_journals,
    journal_pipeline_id,
    journal_store_rows,
    load_pipeline_journal,
    pipelines_dir_in_tree,
    select_journals,
)
from .errors import FlorBuildError, RebuildError
from .hindsight._journal import load_replay_journal, replays_dir_in_tree
from .journalfile import RunJournal, parse_run_journal
from .objects import ObjectStore
from .store import (
    BUSY_TIMEOUT_MS,
    CHECKPOINT_INSERT,
    COLUMN_INSERT,
    DEAD_RUN_ERROR,
    LOOP_INSERT,
    TABLES,
    TIMING_INSERT,
    StoreLock,
    checkpoint_row,
    connect,
    ensure_schema,
    is_run_alive,
    lock_holders,
    pack_log_columns,
    validated_columns,
    write_transaction,
)

#: Test-only: a directory. At each :class:`RebuildStep` a rebuild creates ``<dir>/<step>`` and waits
#: until the file is removed, so tests can kill it (or let it go on) at exact points of the swap.
PAUSE_ENV = "FLORDB_BUILD_REBUILD_PAUSE"


class RebuildStep(StrEnum):
    """The points of a rebuild where :data:`PAUSE_ENV` pauses it."""

    LOCKED = "locked"  # the store lock is held exclusively; nothing built yet
    BUILDING = "building"  # the new file is half built (the first journal is in)
    BUILT = "built"  # the new file is complete and on disk
    WAL_FOLDED = "wal-folded"  # the old file holds everything its WAL held
    SIDECARS_REMOVED = "sidecars-removed"  # the old -wal/-shm are gone
    REPLACED = "replaced"  # the new file is flor.db


@dataclass(frozen=True)
class RebuildResult:
    """What a rebuild recovered."""

    runs: int
    loops: int
    logs: int
    db_path: Path
    killed: int = 0  # runs only a journal on disk knew: killed before their snapshot commit
    pipelines: int = 0
    tasks: int = 0
    notes: tuple[str, ...] = field(default_factory=tuple)


def rebuild_store(config: Config, wait: bool = False) -> RebuildResult:
    """Rebuild the store at ``config.db_path`` from the run, pipeline and replay journals.

    :param wait: wait for the processes that have the store open to close it, instead of refusing.
    :raises RebuildError: when there is nothing to rebuild from, when the store is in use (and
        ``wait`` is false), or when a committed journal cannot be read.
    """
    has_shadow = config.in_git and snapshot.resolve(config.root, snapshot.SHADOW_REF) is not None
    if not has_shadow and not any(_disk_run_journals(config)) and not any(iter_disk_journals(config)):
        if not config.in_git:
            raise RebuildError(
                f"'{config.root}' is not a git repository and '{config.flor_dir}' holds no run or pipeline "
                "journal, so there is nothing to rebuild from."
            )
        raise RebuildError(f"No '{snapshot.SHADOW_BRANCH}' branch in '{config.root}': no run was ever snapshotted.")
    config.db_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        lock = StoreLock.exclusive(config.db_path, wait=wait)
    except FlorBuildError as exc:
        raise RebuildError(str(exc)) from exc
    if lock is None:
        raise RebuildError(store_in_use_message(config))
    try:
        _pause(RebuildStep.LOCKED)
        tmp_path = config.db_path.with_name(config.db_path.name + ".rebuild")
        _remove_files(tmp_path, ("", "-journal", "-wal", "-shm"))
        notes = _journal_unjournaled_pipelines(config, has_shadow)
        try:
            result = _build(config, tmp_path, has_shadow, notes)
        except BaseException:
            _remove_files(tmp_path, ("", "-journal"))
            raise
        _pause(RebuildStep.BUILT)
        _swap(config.db_path, tmp_path)
        _pause(RebuildStep.REPLACED)
        conn = connect(config.db_path)  # back to WAL mode
        try:
            ensure_schema(conn)
        finally:
            conn.close()
    finally:
        lock.release()
    return result


def store_in_use_message(config: Config) -> str:
    """Why a rebuild cannot start now: the live runs (run id, script, pid) and other processes with the store open."""
    runs = _live_runs(config)
    run_pids = {pid for _, _, pid in runs}
    others = [(pid, name) for pid, name in lock_holders(config.db_path) if pid not in run_pids]
    parts = []
    if runs:
        parts.append("live runs " + ", ".join(f"'{run_id}' ({script}, pid {pid})" for run_id, script, pid in runs))
    if others:
        parts.append("open in " + ", ".join(f"pid {pid} ({name})" for pid, name in others))
    return (
        f"The store '{config.db_path}' is in use ({'; '.join(parts) or 'another process has it open'}); a rebuild "
        "now would make their rows vanish. Let them finish (or stop them), or run 'flordb-build rebuild --wait' "
        "to rebuild as soon as they have closed the store."
    )


def _live_runs(config: Config) -> list[tuple[str, str, int]]:
    """``(run_id, script, pid)`` of the runs still ``running`` whose process holds its run lock."""
    if not config.db_path.exists():
        return []
    try:
        conn = sqlite3.connect(f"file:{config.db_path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            rows = conn.execute("SELECT run_id, filename, pid FROM runs WHERE status = 'running' ORDER BY tstamp").fetchall()
        finally:
            conn.close()
    except sqlite3.Error:
        return []  # a damaged store: the lock holders still get named
    locks = config.flor_dir / "locks"
    return [(run_id, filename or "?", pid or 0) for run_id, filename, pid in rows if is_run_alive(locks, run_id)]


def _build(config: Config, tmp_path: Path, has_shadow: bool, notes: list[str]) -> RebuildResult:
    """Write the complete new database at ``tmp_path`` (DELETE journal mode, fsynced)."""
    conn = sqlite3.connect(tmp_path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = DELETE")
        conn.execute("PRAGMA synchronous = OFF")  # a kill discards this file; it is fsynced once, complete
        ensure_schema(conn)
        objects = ObjectStore.for_config(config)
        runs = loops = logs = killed = 0
        committed: set[str] = set()
        for commit, journal in _committed_run_journals(config, has_shadow):
            loops, logs = loops + journal.loop_contexts, logs + len(journal.logs)
            insert_run_journal(conn, journal, commit, objects)
            committed.add(journal.run_id)
            runs += 1
            if runs == 1:
                _pause(RebuildStep.BUILDING)
        for path, journal in _uncommitted_run_journals(config, committed, notes):
            insert_run_journal(conn, journal, None, objects)
            loops, logs, runs = loops + journal.loop_contexts, logs + len(journal.logs), runs + 1
            killed += not journal.end
            if journal.skipped_lines:
                notes.append(f"skipped {journal.skipped_lines} unreadable line(s) at the end of '{path}'")
        pipelines = tasks = 0
        for text in _pipeline_journals(config, has_shadow):
            loaded = load_pipeline_journal(conn, text)
            pipelines, tasks = pipelines + 1, tasks + loaded.tasks
            if loaded.skipped_lines:
                notes.append(f"skipped {loaded.skipped_lines} unreadable line(s) of pipeline '{loaded.pipeline_id}'")
        if has_shadow:
            # Replayed values come after every run is back; a newer replay journal replaces an older one.
            for _commit, text in history.iter_snapshot_journals(config.root, replays_dir_in_tree(config)):
                logs += load_replay_journal(conn, text)
    except (ValueError, KeyError, TypeError) as exc:
        raise RebuildError(f"A journal on '{snapshot.SHADOW_BRANCH}' is unreadable: {exc}.") from exc
    finally:
        conn.close()
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return RebuildResult(runs, loops, logs, config.db_path, killed, pipelines, tasks, tuple(notes))


def _swap(db_path: Path, tmp_path: Path) -> None:
    """Put the complete file at ``tmp_path`` in place of ``db_path`` (the store lock held exclusively)."""
    if db_path.exists():
        try:
            # Fold the WAL into the old file first: from here on the old file alone is the old store,
            # so removing its -wal loses nothing if a kill stops us before the replace.
            old = sqlite3.connect(db_path, timeout=BUSY_TIMEOUT_MS / 1000)
            try:
                old.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                old.close()
        except sqlite3.Error:
            pass  # a damaged old store has nothing to fold in; the new file replaces it
    _pause(RebuildStep.WAL_FOLDED)
    # Before the replace: an old WAL beside the new file would be replayed into it.
    _remove_files(db_path, ("-wal", "-shm"))
    _pause(RebuildStep.SIDECARS_REMOVED)
    os.replace(tmp_path, db_path)
    fd = os.open(db_path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself is durable
    finally:
        os.close(fd)


# -- sources -------------------------------------------------------------------------------


def _disk_run_journals(config: Config) -> Iterator[Path]:
    if config.runs_dir.is_dir():
        yield from sorted(config.runs_dir.glob("*.jsonl"))


def _committed_run_journals(config: Config, has_shadow: bool) -> Iterator[tuple[str, RunJournal]]:
    if not has_shadow:
        return
    journal_dir = config.runs_dir.relative_to(config.root).as_posix()
    for commit, text in history.iter_snapshot_journals(config.root, journal_dir):
        try:
            yield commit, parse_run_journal(text, tolerant=False)
        except ValueError as exc:
            raise RebuildError(f"The run journal in commit {commit[:12]} is unreadable: {exc}.") from exc


def _uncommitted_run_journals(config: Config, committed: set[str], notes: list[str]) -> Iterator[tuple[Path, RunJournal]]:
    """Journals on disk of runs no commit holds (killed before their snapshot, or recorded outside git)."""
    for path in _disk_run_journals(config):
        if path.stem in committed:
            continue  # the committed copy wins
        try:
            journal = parse_run_journal(path.read_text(encoding="utf-8", errors="replace"), tolerant=True)
        except (OSError, ValueError) as exc:
            notes.append(f"skipped the run journal '{path}': {exc}")
            continue
        if journal.run_id not in committed:
            yield path, journal


def _pipeline_journals(config: Config, has_shadow: bool) -> list[str]:
    """Per pipeline, the journal to load (dag/_journal.py: select_journals)."""
    committed: dict[str, str] = {}
    if has_shadow:
        for _commit, text in history.iter_snapshot_journals(config.root, pipelines_dir_in_tree(config)):
            pipeline_id = journal_pipeline_id(text)
            if pipeline_id is not None:
                committed[pipeline_id] = text  # oldest first: the newest stays
    return list(select_journals(committed, dict(iter_disk_journals(config))).values())


def _journal_unjournaled_pipelines(config: Config, has_shadow: bool) -> list[str]:
    """Journal (and commit) the pipelines an existing store holds that no journal has.

    Stores recorded before build context had journals would otherwise lose it in the rebuild.
    """
    if not config.db_path.exists():
        return []
    try:
        conn = sqlite3.connect(f"file:{config.db_path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            stored = [r[0] for r in conn.execute("SELECT pipeline_id FROM pipelines ORDER BY started")]
            journaled = set(dict(iter_disk_journals(config)))
            if has_shadow:
                for _commit, text in history.iter_snapshot_journals(config.root, pipelines_dir_in_tree(config)):
                    journaled.add(journal_pipeline_id(text) or "")
            missing = [p for p in stored if p not in journaled]
            for pipeline_id in missing:
                journal = PipelineJournal(config, pipeline_id)
                journal_store_rows(conn, journal)
                journal.commit(f"flor pipeline {pipeline_id}: journaled by rebuild\n\nFlor-Pipeline: {pipeline_id}\n")
        finally:
            conn.close()
    except (sqlite3.Error, FlorBuildError, OSError) as exc:
        return [f"could not read the build context of the old store: {exc}"]
    return [f"journaled {len(missing)} pipeline(s) the old store held without a journal"] if missing else []


# -- run journals --------------------------------------------------------------------------


def insert_run_journal(conn: sqlite3.Connection, journal: RunJournal, commit: str | None, objects: ObjectStore | None) -> None:
    """Insert one run: its row (``killed`` without an ``end``), environment, loops, logs, timings and the
    checkpoints whose objects are still in ``objects`` (``flordb-build gc`` may have evicted others)."""
    run = journal.run
    row = {**run, **journal.end, "snapshot": commit}
    if not journal.end:
        row["status"], row["error"] = "killed", DEAD_RUN_ERROR
    row = {k: v for k, v in row.items() if k in TABLES["runs"]["columns"]}
    columns = validated_columns("runs", row)
    run_id = row["run_id"]
    with write_transaction(conn):
        if journal.env is not None:
            conn.execute(
                "INSERT OR IGNORE INTO envs (env_id, env, created) VALUES (?, ?, ?)",
                (journal.env["env_id"], journal.env["env"], run.get("started") or 0.0),
            )
        conn.execute(
            "INSERT OR REPLACE INTO runs (" + ", ".join(columns) + ") VALUES ("  # noqa: S608 - validated
            + ", ".join("?" for _ in columns) + ")",
            [row[c] for c in columns],
        )
        conn.executemany(LOOP_INSERT, [(run_id, *entry) for entry in journal.loops])
        for batch in journal.log_batches:  # chunked per written batch, as the recording stored them
            chunks, rows = pack_log_columns(run_id, batch)  # a packed value gets no `logs` row
            conn.executemany(COLUMN_INSERT, chunks)
            conn.executemany(
                "INSERT OR IGNORE INTO logs (run_id, seq, ctx_id, name, value, kind, source) "
                "VALUES (?, ?, ?, ?, ?, ?, 'record')",
                [(run_id, *entry) for entry in rows],
            )
        conn.executemany(TIMING_INSERT, [(run_id, *entry) for entry in journal.timings])
        conn.executemany(
            CHECKPOINT_INSERT,
            [checkpoint_row(run_id, entry) for entry in journal.checkpoints if objects is None or objects.contains(entry[4])],
        )


# -- helpers -------------------------------------------------------------------------------


def _pause(step: RebuildStep) -> None:
    """The test hook of :data:`PAUSE_ENV`: announce ``step`` and wait until the announcement is taken away."""
    directory = os.environ.get(PAUSE_ENV)
    if not directory:
        return
    import time

    marker = Path(directory) / step.value
    marker.write_text(str(os.getpid()))
    while marker.exists():
        time.sleep(0.005)


def _remove_files(path: Path, suffixes: tuple[str, ...]) -> None:
    for suffix in suffixes:
        Path(str(path) + suffix).unlink(missing_ok=True)


__all__ = [
    "PAUSE_ENV",
    "RebuildResult",
    "RebuildStep",
    "RunJournal",
    "insert_run_journal",
    "parse_run_journal",
    "rebuild_store",
    "store_in_use_message",
]
