"""Replay journals: what a replay stored, committed to the shadow branch so ``rebuild`` keeps it.

A recorded run's journal travels in its snapshot commit; replayed values arrive later. After a
run's replay, its whole replayed state (every ``source = 'replay'`` value of the run, and the loop
contexts they need) is committed to ``flor.shadow`` as ``.flor/replays/<run_id>.jsonl`` in a
commit of its own::

    {"replay": {"run_id": ..., "names": [...], "tstamp": ...}}
    {"loops": [[ctx_id, parent_ctx, name, iteration, count, value], ...]}
    {"logs": [[seq, ctx_id, name, value, kind], ...]}

``rebuild`` loads the journals oldest first, each replacing the run's replayed values, so the
newest one (the state after the latest replay) is what a rebuilt store holds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from ..config import Config
from ..store import LOOP_INSERT, Store, write_transaction

REPLAYS_DIR = "replays"  # under .flor/ in the commit's tree
TRAILER = "Flor-Replay"


def replays_dir_in_tree(config: Config) -> str:
    """``.flor/replays`` as a path inside the shadow commits' trees."""
    return (config.flor_dir / REPLAYS_DIR).relative_to(config.root).as_posix()


def replay_journal(store: Store, run_id: str, names: Sequence[str]) -> str | None:
    """The journal text of ``run_id``'s replayed state (None when it holds no replayed value)."""
    conn = store.conn
    logs = conn.execute(
        "SELECT seq, ctx_id, name, value, kind FROM logs WHERE run_id = ? AND source = 'replay' ORDER BY seq",
        (run_id,),
    ).fetchall()
    if not logs:
        return None
    loops = conn.execute(
        "SELECT ctx_id, parent_ctx, name, iteration, count, value FROM loops WHERE run_id = ? ORDER BY ctx_id",
        (run_id,),
    ).fetchall()
    header = {"run_id": run_id, "names": list(names), "tstamp": time.time()}
    lines = [{"replay": header}, {"loops": [list(row) for row in loops]}, {"logs": [list(row) for row in logs]}]
    return "".join(json.dumps(line) + "\n" for line in lines)


def commit_replay_journal(config: Config, run_id: str, names: Sequence[str]) -> str | None:
    """Commit the run's replayed state to the shadow branch; the commit (None: nothing to commit, or no git)."""
    from ..snapshot import commit_file

    if not config.in_git:
        return None
    store = Store.open(config)
    try:
        text = replay_journal(store, run_id, names)
    finally:
        store.close()
    if text is None:
        return None
    message = f"flor replay {run_id}: {', '.join(names)}\n\n{TRAILER}: {run_id}\n"
    return commit_file(config.root, text.encode(), f"{replays_dir_in_tree(config)}/{run_id}.jsonl", message)


def load_replay_journal(conn: Any, text: str) -> int:
    """Replace a run's replayed values with a journal's; how many values it held (0: its run is unknown)."""
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
    run_id = header["run_id"]
    if conn.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone() is None:
        return 0  # its run's snapshot is gone: nothing to attach the values to
    with write_transaction(conn):
        conn.execute("DELETE FROM logs WHERE run_id = ? AND source = 'replay'", (run_id,))
        conn.executemany(LOOP_INSERT, [(run_id, *row) for row in loops])
        conn.executemany(
            "INSERT OR REPLACE INTO logs (run_id, seq, ctx_id, name, value, kind, source) "
            "VALUES (?, ?, ?, ?, ?, ?, 'replay')",
            [(run_id, *row) for row in logs],
        )
    return len(logs)
