"""A replay's backfill is all or nothing per run, and the store always agrees with the git journal.

Real scripts, real replays: a replay that fails, is interrupted or is killed at any step of
finishing a run leaves what every reader sees as it was (earlier replayed values of the same
names included), and after the next replay or ``rebuild`` the store holds exactly what the newest
replay journal on ``flor.shadow`` holds.
"""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

import flordb_build as flor
from flordb_build.errors import ReplayError
from tests.conftest import GIT_ENV, Project

# The recorded version. SLEEP (unset while recording) slows the replay's epochs after the first.
RECORDED = """\
import os
import time
import flordb_build as flor

state = {"w": 0}
with flor.checkpointing(state=state):
    for epoch in flor.loop("epoch", range(4)):
        for step in flor.loop("step", range(3)):
            state["w"] += 1
            time.sleep(0.01)  # epochs slow enough that every one is checkpointed
        flor.log("val", state["w"])
        time.sleep(float(os.environ.get("SLEEP", "0")) * epoch)
flor.log("final", state["w"])
"""
# Today's versions add `x` (in the outer loop) and `y` (after it).
X_LINE = '        flor.log("val", state["w"])\n'


def today(x: str, y: str | None = None) -> str:
    """The recorded script with ``flor.log("x", <x>)`` in the outer loop (and ``y`` after it)."""
    text = RECORDED.replace(X_LINE, X_LINE + f'        flor.log("x", {x})\n')
    return text + (f'flor.log("y", {y})\n' if y else "")


V1 = [6, 12, 18, 24]  # x = w * 2, w = 3, 6, 9, 12 at the end of each epoch


@pytest.fixture
def replayed(project: Project) -> Project:
    """One recorded run, and a successful replay of ``x = w * 2`` (its values V1, its journal)."""
    project.write("pyproject.toml", "[tool.flordb_build]\ncheckpoint_every = 1\n")  # restore points by count, not timing
    project.write("train.py", RECORDED)
    project.commit_all("recorded version")
    project.run("train.py")
    project.write("train.py", today('state["w"] * 2'))
    project.commit_all("today: x")
    project.cli("replay", "x", "--yes", "--cold")
    assert flor.dataframe("x")["x"].tolist() == V1
    return project


def _run_id() -> str:
    return str(flor.query("SELECT run_id FROM runs")["run_id"][0])


def _store_rows(project: Project, run_id: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(project.root / ".flor" / "flor.db")
    try:
        rows = conn.execute(
            "SELECT seq, ctx_id, name, value, kind FROM logs WHERE run_id = ? AND source = 'replay'", (run_id,)
        ).fetchall()
    finally:
        conn.close()
    return sorted(rows, key=lambda row: (row[2], row[0]))


def _journal_rows(project: Project, run_id: str) -> list[tuple[Any, ...]]:
    """The replayed values of the newest replay journal of the run on flor.shadow (what rebuild loads)."""
    path = f".flor/replays/{run_id}.jsonl"
    commit = project.git("log", "-1", "--format=%H", "--diff-filter=AM", "flor.shadow", "--", path).strip()
    assert commit, "no replay journal was ever committed"
    rows: list[tuple[Any, ...]] = []
    for line in project.git("show", f"{commit}:{path}").splitlines():
        rows.extend(tuple(row) for row in json.loads(line).get("logs", ()))
    return sorted(rows, key=lambda row: (row[2], row[0]))


def _assert_store_matches_journal(project: Project) -> None:
    run_id = _run_id()
    assert _store_rows(project, run_id) == _journal_rows(project, run_id)


def _staged(project: Project) -> int:
    """Staged replay rows left in the store (no staging table: an older store, none)."""
    conn = sqlite3.connect(project.root / ".flor" / "flor.db")
    try:
        return int(conn.execute("SELECT COUNT(*) FROM replay_staged_logs").fetchone()[0])
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()


def _rebuild_shows(project: Project, frame: pd.DataFrame, *names: str) -> None:
    for suffix in ("", "-wal", "-shm"):
        (project.root / ".flor" / f"flor.db{suffix}").unlink(missing_ok=True)
    project.cli("rebuild")
    pd.testing.assert_frame_equal(flor.dataframe(*names), frame)
    _assert_store_matches_journal(project)


def _wait_for(condition: Callable[[], bool], seconds: float = 120.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def _replay_process(project: Project, *args: str, env: dict[str, str], stderr: Any = subprocess.PIPE) -> Any:
    return subprocess.Popen(
        [sys.executable, "-m", "flordb_build", "replay", *args],
        cwd=project.root, env={**os.environ, **GIT_ENV, **env}, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=stderr, text=True,
        # A shell starts background jobs with SIGINT ignored, and a child inherits that: give the
        # command the disposition a terminal's foreground process has, whoever runs the tests.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


# -- a failing replay ---------------------------------------------------------------------------

FAILURES = {
    # x = w * 3 for epochs 0 and 1 (staged), then the statement fails at epoch 2: it raises, or the
    # replay process is killed.
    "exception": 'state["w"] * 3 + 0 // (2 - epoch)',
    "sigkill": 'state["w"] * 3 if epoch < 2 else os.kill(os.getpid(), 9)',
}


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_a_replay_that_fails_mid_loop_leaves_the_values_as_they_were(replayed: Project, failure: str) -> None:
    project = replayed
    before = flor.dataframe("val", "x")
    project.write("train.py", today(FAILURES[failure]))
    project.commit_all("today: x redefined, and it fails at epoch 2")

    out = project.cli("replay", "x", "--yes", check=False)
    assert out.returncode == 1, out.stdout + out.stderr
    pd.testing.assert_frame_equal(flor.dataframe("val", "x"), before)  # the earlier replay's V1, whole
    assert flor.query("SELECT COUNT(*) AS n FROM logs WHERE name = 'x'")["n"][0] == 4
    assert _staged(project) == 0
    _assert_store_matches_journal(project)

    run_id = _run_id()
    row = [line.split() for line in out.stdout.splitlines() if line.startswith(run_id)][-1]  # the report's
    assert row[1:2] == ["FAILED"] and row[3] == "withheld", out.stdout  # never "0 values"
    assert f"withheld: run {run_id}: none of its replayed values were written" in out.stdout
    assert ("ZeroDivisionError" if failure == "exception" else "exit status -9") in out.stdout
    _rebuild_shows(project, before, "val", "x")


def test_one_failing_segment_of_two_workers_writes_nothing_of_the_run(replayed: Project) -> None:
    project = replayed
    before = flor.dataframe("val", "x")
    # Epoch 3 is in the second segment (where it starts depends on the recorded timings); it fails
    # there, after the first segment succeeded.
    project.write("train.py", today('state["w"] * 3 + 0 // (3 - epoch)'))
    project.commit_all("today: x fails at epoch 3")
    plan = flor.replay("x", workers=2, dry_run=True, quiet=True)
    (segments,) = [run.segments for run in plan.plan.runs]
    assert len(segments) == 2 and segments[1][0] <= 3 < segments[1][1], segments

    with pytest.raises(ReplayError) as failed:
        flor.replay("x", workers=2, quiet=True)
    pd.testing.assert_frame_equal(flor.dataframe("val", "x"), before)
    assert _staged(project) == 0
    _assert_store_matches_journal(project)
    assert "not written: worker 1: the replayed script failed (ZeroDivisionError" in str(failed.value)
    _rebuild_shows(project, before, "val", "x")


# -- Ctrl-C ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_while_a_replay_process_runs_keeps_store_and_journal_as_they_were(replayed: Project) -> None:
    project = replayed
    before = flor.dataframe("val", "x")
    project.write("train.py", today('state["w"] * 3'))
    project.commit_all("today: x redefined")
    # On a terminal the progress line is redrawn per epoch: "1/4" means the replay process has run
    # epoch 0 and sleeps in epoch 1.
    controller, terminal = pty.openpty()
    proc = _replay_process(project, "x", "--yes", "--workers", "1", env={"SLEEP": "600"}, stderr=terminal)
    os.close(terminal)
    seen = b""
    try:
        deadline = time.monotonic() + 120
        while b"1/4 epoch" not in seen and time.monotonic() < deadline and proc.poll() is None:
            ready, _, _ = select.select([controller], [], [], 1.0)
            if ready:
                seen += os.read(controller, 4096)
        assert b"1/4 epoch" in seen, seen.decode(errors="replace")
        proc.send_signal(signal.SIGINT)
        _out, _err = proc.communicate(timeout=60)
        while select.select([controller], [], [], 0.5)[0]:
            try:
                seen += os.read(controller, 4096)
            except OSError:  # the terminal's other side closed
                break
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        os.close(controller)
    assert proc.returncode == 130 and b"interrupted" in seen, seen.decode(errors="replace")

    pd.testing.assert_frame_equal(flor.dataframe("val", "x"), before)
    assert _staged(project) == 0
    _assert_store_matches_journal(project)
    _rebuild_shows(project, before, "val", "x")


# -- SIGKILL of the driver at each step of finishing a run ---------------------------------------

V2 = [9, 18, 27, 36]  # x = w * 3
STEPS = {"staged": V1, "intent": V1, "journaled": V2, "promoted": V2}  # what x is after recovery


def _kill_while_finishing(project: Project, step: str, tmp_path: Path) -> None:
    signal_file = tmp_path / f"paused-{step}"
    proc = _replay_process(
        project, "x", "--yes", "--cold", env={"FLORDB_BUILD_TEST_REPLAY_PAUSE": f"{step}:{signal_file}"}
    )
    try:
        assert _wait_for(lambda: signal_file.exists() or proc.poll() is not None), "the replay never paused"
        assert signal_file.exists(), f"the replay ended without pausing at '{step}': {proc.communicate()}"
        proc.kill()
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == -signal.SIGKILL


def _copy_database(source_path: Path, target_path: Path) -> None:
    """A consistent copy of a SQLite database (the backup API reads through its WAL)."""
    source = sqlite3.connect(source_path)
    target = sqlite3.connect(target_path)
    try:
        source.backup(target)
    finally:
        source.close()
        target.close()


@pytest.mark.slow
@pytest.mark.parametrize("step", list(STEPS))
def test_a_driver_killed_while_finishing_a_run_is_recovered_by_the_next_replay_or_rebuild(
    replayed: Project, step: str, tmp_path: Path
) -> None:
    project = replayed
    project.write("train.py", today('state["w"] * 3', y='state["w"] + 1'))
    project.commit_all("today: x redefined, y added")
    _kill_while_finishing(project, step, tmp_path)
    # Until the run is promoted, readers see the earlier values, whole.
    assert flor.dataframe("x")["x"].tolist() == (V2 if step == "promoted" else V1)
    db = project.root / ".flor" / "flor.db"
    killed = tmp_path / "killed.db"
    _copy_database(db, killed)

    # Recovery by rebuild: the store is the newest journal, and nothing it holds is missing.
    project.cli("rebuild")
    _assert_store_matches_journal(project)
    assert flor.dataframe("x")["x"].tolist() == STEPS[step]

    # Recovery by the next replay (of another name), from the store as the kill left it.
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    _copy_database(killed, db)
    project.cli("replay", "y", "--yes", "--cold")
    _assert_store_matches_journal(project)
    after = flor.dataframe("val", "x", "y")
    assert after["x"].tolist() == STEPS[step] and after["y"].tolist() == [13] * 4
    assert _staged(project) == 0
    assert sorted(p.name for p in (project.root / ".flor" / "locks").glob("replay-*")) == ["replay-finish.lock"]
    _rebuild_shows(project, after, "val", "x", "y")
