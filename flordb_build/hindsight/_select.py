"""Reading what a replay plan needs: the selected runs, their snapshots and timings, today's scripts."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..checkpoints import CheckpointPoint
from ..config import Config, load_config
from ..empty_state import EMPTY_JSON_BYTES
from ..errors import ReplayError, SnapshotError, WarmStartError
from ..snapshot import run_git, run_git_bytes
from ..store import Store, loop_contexts
from ._model import DEVICES, RecordedRun, ReplayPlan, StartCosts


def select_run_ids(config: Config, where: str | None, task: str | None) -> list[str]:
    """Run ids matching ``where`` (over the run-level dataframe) and ``task``, oldest first.

    :raises ReplayError: nothing matches.
    """
    from ..query import dataframe

    frame = dataframe(where=where, config=config)
    ids = [str(r) for r in frame["run_id"].tolist()] if len(frame) else []
    if task is not None:
        tasks = frame["task"].tolist() if len(frame) else []
        ids = [run_id for run_id, t in zip(ids, tasks, strict=True) if t == task]
    if not ids:
        what = " and ".join(x for x in (f"where '{where}'" if where else "", f"task '{task}'" if task else "") if x)
        raise ReplayError(
            f"No recorded run matches {what or 'the selection'}; list runs with 'flordb-build runs' and adjust it."
        )
    return ids


def load_recorded_runs(config: Config, run_ids: Sequence[str]) -> list[RecordedRun]:
    """Each run's row, outermost loop contexts, timings, checkpoints and snapshot source."""
    store = Store.open_existing(config)
    if store is None:
        raise ReplayError(f"No store at '{config.db_path}': record a run before replaying.")
    try:
        conn = store.conn
        runs = []
        for run_id in run_ids:
            row = conn.execute(
                "SELECT run_id, task, filename, snapshot, status, args, seconds, argv FROM runs WHERE run_id = ?",
                (run_id,),
            ).fetchone()
            if row is None:
                continue
            rid, task, filename, snapshot, status, args_text, seconds, argv_text = row
            outer = [(c, n, i) for c, parent, n, i, _v in loop_contexts(conn, rid) if parent == 0]
            timings = conn.execute("SELECT ctx_id, kind, seconds FROM timings WHERE run_id = ?", (rid,)).fetchall()
            # M of each checkpoint's end, what restoring it is estimated from: an object the end shares
            # with its nested point (the same copy, stored once: checkpoints.Materializer) counts at
            # what the nested point paid for it, not at the few ms the end's comparison took.
            checkpoints = conn.execute(
                "SELECT e.ctx_id, e.loop_name, e.iteration, "
                "SUM(MAX(e.materialize_seconds, COALESCE(n.materialize_seconds, 0))) FROM checkpoints AS e "
                "LEFT JOIN checkpoints AS n ON n.run_id = e.run_id AND n.ctx_id = e.ctx_id "
                "AND n.name = ? || e.name AND n.sha256 = e.sha256 "
                "WHERE e.run_id = ? AND (e.point IS NULL OR e.point = ?) "
                "GROUP BY e.ctx_id, e.loop_name, e.iteration ORDER BY e.ctx_id",
                (CheckpointPoint.PREFIX, rid, CheckpointPoint.END),
            ).fetchall()
            nested = conn.execute(
                "SELECT DISTINCT ctx_id FROM checkpoints WHERE run_id = ? AND point = ?", (rid, CheckpointPoint.NESTED)
            ).fetchall()
            stateless = conn.execute(  # issue 12.7: checkpoints of objects that hold nothing (empty_state.py)
                "SELECT name FROM checkpoints WHERE run_id = ? AND name NOT LIKE ? GROUP BY name "
                "HAVING MIN(format = 'json' AND bytes <= ?) = 1",
                (rid, CheckpointPoint.PREFIX + "%", EMPTY_JSON_BYTES),
            ).fetchall()
            source, unavailable = _snapshot_source(config.root, snapshot, filename)
            runs.append(
                RecordedRun(
                    run_id=rid, task=task, filename=filename, snapshot=snapshot, old_source=source,
                    status=status or "unknown", args=_args(args_text), argv=_argv(argv_text), seconds=seconds,
                    outer_loops=tuple((int(c), str(n), int(i)) for c, n, i in outer),
                    timings=tuple((int(c), str(k), float(s)) for c, k, s in timings),
                    checkpoints=tuple((int(c), str(n), int(i), float(m or 0.0)) for c, n, i, m in checkpoints),
                    nested_checkpoints=frozenset(int(c) for (c,) in nested),
                    unavailable=unavailable, stateless=tuple(str(n) for (n,) in stateless),
                )
            )
        return runs
    finally:
        store.close()


def _argv(text: str | None) -> tuple[str, ...] | None:
    """The recorded command-line arguments; None for a run recorded before they were (schema < 5)."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return tuple(str(token) for token in value) if isinstance(value, list) else None


def _args(text: str | None) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _snapshot_source(root: Path, snapshot: str | None, filename: str) -> tuple[str | None, str | None]:
    """The script as its snapshot holds it, or None and why not."""
    if not snapshot:
        return None, "the run has no snapshot commit (recorded outside git, or killed before it ended)"
    try:
        return run_git(root, "show", f"{snapshot}:{filename}"), None
    except SnapshotError:
        return None, f"snapshot '{snapshot[:12]}' of '{filename}' no longer exists in the repository"


def read_today_sources(config: Config, filenames: Sequence[str]) -> dict[str, str | None]:
    """Today's text of each script in the work tree (read only), None where it is gone."""
    sources: dict[str, str | None] = {}
    for filename in dict.fromkeys(filenames):
        path = config.root / filename
        sources[filename] = path.read_text(encoding="utf-8") if path.is_file() else None
    return sources


def read_project_modules(
    config: Config, runs: Sequence[RecordedRun], names: Sequence[str]
) -> tuple[dict[str, str], list[RecordedRun]]:
    """The project's other tracked modules that log one of ``names`` today, and each run with their
    text in its snapshot (``old_modules``): propagation places statements there too (read only)."""
    scripts = {run.filename for run in runs}
    quoted = [q for n in names for q in (f'"{n}"', f"'{n}'")]
    try:
        tracked = run_git_bytes(config.root, "ls-files", "-z", "--", "*.py").decode(errors="replace").split("\0")
    except SnapshotError:
        return {}, list(runs)
    today: dict[str, str] = {}
    for path in tracked:
        file = config.root / path
        if not path or path in scripts or not file.is_file():
            continue
        text = file.read_text(encoding="utf-8", errors="replace")
        if "log(" in text and any(q in text for q in quoted):
            today[path] = text
    if not today:
        return {}, list(runs)
    shown: dict[tuple[str, str], str | None] = {}
    with_modules = []
    for run in runs:
        old: dict[str, str] = {}
        for path in today:
            if run.snapshot is None:
                break
            key = (run.snapshot, path)
            if key not in shown:
                try:
                    shown[key] = run_git_bytes(config.root, "show", f"{run.snapshot}:{path}").decode("utf-8", "replace")
                except SnapshotError:
                    shown[key] = None  # the module is new since that run
            if shown[key] is not None:
                old[path] = shown[key]  # type: ignore[assignment]
        with_modules.append(dataclasses.replace(run, old_modules=old))
    return today, with_modules


def prepare_replay(
    names: Sequence[str],
    *,
    where: str | None = None,
    task: str | None = None,
    workers: int | None = None,
    device: str = "auto",
    config: Config | None = None,
    warm: bool | None = None,
) -> ReplayPlan:
    """Select runs, read their versions and timings, and plan replaying ``names`` (nothing runs).

    :param workers: slots the replay's jobs run in at once (all runs together), also the most
        segments a range or validation scan is split into; None or 0: the cores this process may use.
    :param warm: whether replay processes will fork from warm servers (None: the project's setting).

    :raises ReplayError: unknown names or device, no matching run.
    :raises ExpressionError: an invalid ``where``.
    """
    from ..replay_options import default_workers
    from ._plan import plan_replay

    if not workers:  # None or 0 (the command line's default)
        workers = default_workers()
    if device not in DEVICES:
        raise ReplayError(f"Unknown device '{device}'; use one of {', '.join(DEVICES)}.")
    config = config or load_config()
    run_ids = select_run_ids(config, where, task)
    runs = load_recorded_runs(config, run_ids)
    today = read_today_sources(config, [run.filename for run in runs])
    modules, runs = read_project_modules(config, runs, names)
    start = start_outlook(config, runs, device, warm)
    return plan_replay(runs, today, names, workers=workers, device=device, start=start, modules=modules)


def start_outlook(config: Config, runs: Sequence[RecordedRun], device: str, warm: bool | None = None) -> StartCosts:
    """Learned start-up costs, and which scripts' first replay forks from a warm server already up."""
    from ._costs import start_costs
    from ._execute import replay_environment
    from ._warm import WarmPool, warm_settings

    enabled, keep_warm = warm_settings(config)
    enabled = enabled if warm is None else warm
    live: set[str] = set()
    if enabled:
        try:
            pool = WarmPool(config, keep_warm)
        except WarmStartError:
            enabled = False
        else:
            for run in {r.filename: r for r in reversed(runs)}.values():  # the first run of each script
                if pool.is_live(replay_environment(config, run.run_id, run.task, device)):
                    live.add(run.filename)
    return start_costs(config, enabled, frozenset(live))
