"""Recreate ``.flor/flor.db`` from the run journals that the snapshot commits carry.

The database is a cache of the shadow branch: each snapshot commit holds its run's journal
(``.flor/runs/<run_id>.jsonl``: a ``run`` header, its ``env``, ``loops``/``logs`` batches, an
``end`` footer), and each replay commits the run's replayed values (``.flor/replays/``,
hindsight/_journal.py). Replaying those lines into a fresh database gives back every recorded
run, its environment and what replays added. The new
database is built beside the old one and swapped in only when complete.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import snapshot
from .config import Config
from .errors import RebuildError
from .hindsight._journal import load_replay_journal, replays_dir_in_tree
from .objects import ObjectStore
from .store import (
    CHECKPOINT_INSERT,
    COLUMN_INSERT,
    LOOP_INSERT,
    TABLES,
    TIMING_INSERT,
    Store,
    connect,
    ensure_schema,
    pack_log_columns,
    validated_columns,
    write_transaction,
)


@dataclass(frozen=True)
class RebuildResult:
    """What a rebuild recovered."""

    runs: int
    loops: int
    logs: int
    db_path: Path


def rebuild_store(config: Config) -> RebuildResult:
    """Rebuild the store at ``config.db_path`` from the snapshot commits on ``flor.shadow``.

    :raises RebuildError: outside a git repository, or when a journal cannot be read.
    """
    if not config.in_git:
        raise RebuildError(f"'{config.root}' is not a git repository, so there are no snapshots to rebuild from.")
    if snapshot.resolve(config.root, snapshot.SHADOW_REF) is None:
        raise RebuildError(f"No '{snapshot.SHADOW_BRANCH}' branch in '{config.root}': no run was ever snapshotted.")
    journal_dir = config.runs_dir.relative_to(config.root).as_posix()
    tmp_path = config.db_path.with_name(config.db_path.name + ".rebuild")
    _remove_database(tmp_path)
    config.db_path.parent.mkdir(parents=True, exist_ok=True)
    conn = connect(tmp_path)
    totals = [0, 0, 0]
    try:
        ensure_schema(conn)
        for commit, text in snapshot.iter_snapshot_journals(config.root, journal_dir):
            counts = load_journal(conn, text, commit, objects=ObjectStore.for_config(config))
            totals = [a + b for a, b in zip(totals, counts, strict=True)]
        # Replayed values come after every run is back; a newer replay journal replaces an older one.
        for _commit, text in snapshot.iter_snapshot_journals(config.root, replays_dir_in_tree(config)):
            totals[2] += load_replay_journal(conn, text)
    except (ValueError, KeyError) as exc:
        conn.close()
        _remove_database(tmp_path)
        raise RebuildError(f"A run journal on '{snapshot.SHADOW_BRANCH}' is unreadable: {exc}.") from exc
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("PRAGMA journal_mode = DELETE")  # fold the WAL into the file before the swap
    conn.close()
    _remove_database(config.db_path)
    os.replace(tmp_path, config.db_path)
    Store.open(config).close()  # back to WAL mode, and dead runs marked
    return RebuildResult(runs=totals[0], loops=totals[1], logs=totals[2], db_path=config.db_path)


def load_journal(conn: Any, text: str, commit: str, objects: ObjectStore | None = None) -> tuple[int, int, int]:
    """Insert one run's journal; return how many (runs, loops, logs) rows it held.

    Its timings come back too, and its checkpoints whose objects are still in ``objects``
    (``flordb-build gc`` may have evicted the others since).
    """
    run: dict[str, Any] | None = None
    env: dict[str, Any] | None = None
    end: dict[str, Any] = {}
    loops: list[list[Any]] = []
    logs: list[list[Any]] = []
    timings: list[list[Any]] = []
    checkpoints: list[list[Any]] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        entry = json.loads(line)
        if "run" in entry:
            run = entry["run"]
        elif "env" in entry:
            env = entry["env"]
        elif "end" in entry:
            end = entry["end"]
        else:
            loops.extend(entry.get("loops", ()))
            logs.extend(entry.get("logs", ()))
            timings.extend(entry.get("timings", ()))
            checkpoints.extend(entry.get("checkpoints", ()))
    if run is None:
        raise ValueError(f"the journal in commit {commit[:12]} has no run header")
    row = {**run, **end, "snapshot": commit}
    if not end:
        row["status"] = "killed"
    row = {k: v for k, v in row.items() if k in TABLES["runs"]["columns"]}
    columns = validated_columns("runs", row)
    run_id = row["run_id"]
    with write_transaction(conn):
        if env is not None:
            conn.execute(
                "INSERT OR IGNORE INTO envs (env_id, env, created) VALUES (?, ?, ?)",
                (env["env_id"], env["env"], run.get("started") or 0.0),
            )
        conn.execute(
            "INSERT OR REPLACE INTO runs (" + ", ".join(columns) + ") VALUES ("  # noqa: S608 - validated
            + ", ".join("?" for _ in columns) + ")",
            [row[c] for c in columns],
        )
        conn.executemany(
            LOOP_INSERT,
            [(run_id, *entry) for entry in loops],
        )
        conn.executemany(
            "INSERT OR IGNORE INTO logs (run_id, seq, ctx_id, name, value, kind, source) "
            "VALUES (?, ?, ?, ?, ?, ?, 'record')",
            [(run_id, *entry) for entry in logs],
        )
        conn.executemany(COLUMN_INSERT, pack_log_columns(run_id, logs))
        conn.executemany(TIMING_INSERT, [(run_id, *entry) for entry in timings])
        conn.executemany(
            CHECKPOINT_INSERT,
            [(run_id, *entry) for entry in checkpoints if objects is None or objects.contains(entry[4])],
        )
    return 1, sum(int(block[4]) for block in loops), len(logs)


def _remove_database(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
