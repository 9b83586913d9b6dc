"""Issue 16: every run's jobs in one queue, and a worker that needs no filesystem shared with the driver.

Real recorded runs in a real git repository, replayed by real subprocesses.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import shutil
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
from flordb_build.config import load_config
from flordb_build.hindsight import ReplayDriver, jobs_of, prepare_replay, run_job, run_replay
from flordb_build.hindsight._journal import newest_journal_commit
from tests.conftest import GIT_ENV, Project

RUNS = 8
# The final w of a run is 3 * seed + 1; the suffix (after the main loop) may sleep and note its pid.
SCRIPT = """\
import os
import time
import flordb_build as flor

seed = flor.arg("seed", 0)
state = {"w": seed}
with flor.checkpointing(state=state):
    for epoch in flor.loop("epoch", range(2)):
        state["w"] += seed + epoch
        flor.log("w", state["w"])
if os.environ.get("PIDS"):
    with open(os.path.join(os.environ["PIDS"], str(os.getpid())), "w") as fh:
        fh.write("started")
time.sleep(float(os.environ.get("SLEEP", "0")))
%s
flor.log("done", 1)
"""
TODAY = 'flor.log("x", state["w"] * 10)'
TODAY_FAILING_SEED_3 = 'flor.log("x", state["w"] * 10 // (1 if seed != 3 else 0))'


@pytest.fixture
def recorded(project: Project) -> Project:
    """Eight recorded runs of train.py (seed 0..7), every epoch checkpointed; today's x not yet added."""
    project.write("pyproject.toml", "[tool.flordb_build]\ncheckpoint_every = 1\n")
    project.write("train.py", SCRIPT % "")
    project.commit_all("train")
    for seed in range(RUNS):
        project.run("train.py", "--kwargs", f"seed={seed}")
    return project


def _today(project: Project, statement: str) -> None:
    project.write("train.py", SCRIPT % statement)
    project.commit_all("today: x")


def _x_by_seed() -> dict[int, Any]:
    frame = flor.dataframe("seed", "x")
    return {int(seed): int(x) for seed, x in zip(frame["seed"], frame["x"], strict=True) if not pd.isna(x)}


def _journalled(project: Project) -> set[str]:
    config = load_config(project.root)
    conn = sqlite3.connect(config.db_path)
    try:
        run_ids = [r for (r,) in conn.execute("SELECT run_id FROM runs")]
    finally:
        conn.close()
    return {run_id for run_id in run_ids if newest_journal_commit(config, run_id) is not None}


def test_eight_runs_share_two_slots_and_a_failing_run_is_withheld_while_the_others_finish(recorded: Project) -> None:
    project = recorded
    _today(project, TODAY_FAILING_SEED_3)
    plan = prepare_replay(["x"], workers=2)
    assert len(plan.runs) == RUNS and plan.workers == 2
    assert plan.estimate < sum(run.estimate for run in plan.runs)  # a schedule over 2 slots, not a sum
    report = run_replay(plan)
    by_run = {o.run_id: o for o in report.outcomes}
    seeds = {run.run_id: int(run.args["seed"]) for run in plan.runs}
    failed = [run_id for run_id, seed in seeds.items() if seed == 3]
    assert [o.run_id for o in report.outcomes if not o.ok] == failed
    assert by_run[failed[0]].withheld is not None and "ZeroDivisionError" in by_run[failed[0]].errors[0]
    assert _x_by_seed() == {seed: (3 * seed + 1) * 10 for seed in range(RUNS) if seed != 3}
    assert _journalled(project) == set(seeds) - set(failed)

    _today(project, TODAY)
    report = flor.replay("x", workers=2, quiet=True)
    assert report.ok and len(report.outcomes) == RUNS
    assert _x_by_seed() == {seed: (3 * seed + 1) * 10 for seed in range(RUNS)}
    assert _journalled(project) == set(seeds)  # every run journalled on flor.shadow


def _wait_for(condition: Callable[[], bool], seconds: float = 120.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for every purpose here; /proc says so.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_ctrl_c_kills_every_running_job_and_starts_no_queued_one(recorded: Project, tmp_path: Path) -> None:
    project = recorded
    _today(project, TODAY)
    pids = tmp_path / "pids"
    pids.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "flordb_build", "replay", "x", "--yes", "--workers", "2", "--cold"],
        cwd=project.root, env={**os.environ, **GIT_ENV, "PIDS": str(pids), "SLEEP": "600"},
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # A shell starts background jobs with SIGINT ignored; give the command a terminal's disposition.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert _wait_for(lambda: len(list(pids.iterdir())) >= 2 or proc.poll() is not None), "no job started"
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    started = [int(p.name) for p in pids.iterdir()]
    assert proc.returncode == 130 and "interrupted" in err, err
    assert len(started) == 2  # the two slots' jobs; the six queued ones never started
    assert _wait_for(lambda: not any(_alive(pid) for pid in started), 5.0), [p for p in started if _alive(p)]
    assert _x_by_seed() == {}  # nothing of an interrupted replay is written


def test_a_worker_replays_from_its_payload_alone_with_the_project_moved_away(
    recorded: Project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = recorded
    _today(project, TODAY)
    config = load_config(project.root)
    plan = prepare_replay(["x"], workers=1, config=config, warm=False)
    run = plan.runs[-1]
    (job,) = jobs_of(run, plan.device)
    driver = ReplayDriver(config, warm=False)
    try:
        payload = driver.payload(job)
    finally:
        driver.close()
    # The checkpoint objects go where the payload says (a worker's copy); the project itself goes away.
    objects = tmp_path / "worker-objects"
    shutil.copytree(config.db_path.parent / "objects", objects)
    # Picklable, as a backend that ships it to another machine needs (Ray pickles its task arguments).
    payload = pickle.loads(pickle.dumps(dataclasses.replace(payload, objects_dir=str(objects))))
    moved = project.root.with_name("proj-moved-away")
    project.root.rename(moved)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    seen: list[tuple[int, int]] = []

    reply = run_job(payload, lambda done, total: seen.append((done, total)))
    assert not project.root.exists()
    assert reply.ok, reply.error
    assert reply.outcome is not None and reply.outcome["counters"]["restores"] >= 1  # from the worker's objects
    names = {row[2]: row for row in reply.logs}
    seed = int(run.args["seed"])
    assert set(names) == {"x"} and names["x"][3] == (3 * seed + 1) * 10  # (seq, ctx, name, value, kind)
    assert seen and seen[-1] == (2, 2)
