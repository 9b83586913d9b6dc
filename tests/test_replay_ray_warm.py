"""Warm starts on the Ray backend (issue 16): each Ray worker's node-local warm pool.

A real recorded project is replayed through ``make_executor(config, 2, None, "ray")`` in a
loopback-only network and PID namespace (tests/ray_warm_scenario.py); the scenario's JSON says
how every run started and which warm servers lived before and after ``ray.shutdown()``.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import GIT_ENV, Project
from tests.test_ray_cluster import REPO, SCENARIO_TIMEOUT_SECONDS, _namespace_refusal
from tests.test_replay_scale import RUNS, SCRIPT, TODAY, _journalled, _x_by_seed

pytestmark = pytest.mark.ray


@pytest.fixture
def ray_warm_report(project: Project) -> dict[str, Any]:
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'flordb_build[ray]'")
    refusal = _namespace_refusal()
    if refusal:
        pytest.skip(refusal)
    project.write("pyproject.toml", "[tool.flordb_build]\ncheckpoint_every = 1\n")
    project.write("train.py", SCRIPT % "")
    project.commit_all("train")
    for seed in range(RUNS):
        project.run("train.py", "--kwargs", f"seed={seed}")
    project.write("train.py", SCRIPT % TODAY)
    project.commit_all("today: x")

    home = tempfile.mkdtemp(prefix="frh-")
    runtime = tempfile.mkdtemp(prefix="frw-", dir="/tmp")  # the warm servers' sockets: node-local, short
    ray_tmp = tempfile.mkdtemp(prefix="frt-", dir="/tmp")  # short: Ray's socket paths live under it
    out = Path(home) / "report.json"
    env = {
        **os.environ, **GIT_ENV, "HOME": home, "RAY_TMPDIR": ray_tmp, "RAY_USAGE_STATS_ENABLED": "0",
        "XDG_RUNTIME_DIR": runtime, "PYTHONPATH": str(REPO),
    }
    command = f"ip link set lo up && exec {shlex.join([sys.executable, '-m', 'tests.ray_warm_scenario', str(out)])}"
    try:
        done = subprocess.run(
            ["unshare", "--net", "--pid", "--fork", "--mount-proc", "bash", "-c", command],
            cwd=project.root, env=env, capture_output=True, text=True, timeout=SCENARIO_TIMEOUT_SECONDS,
        )
        report: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    finally:
        for path in (ray_tmp, runtime, home):
            shutil.rmtree(path, ignore_errors=True)
    assert done.returncode == 0 and report, done.stdout[-3000:] + done.stderr[-6000:]
    return report


def test_ray_jobs_fork_from_the_workers_warm_servers_which_end_with_the_ray_session(
    project: Project, ray_warm_report: dict[str, Any]
) -> None:
    report = ray_warm_report
    outcomes = report["outcomes"]
    assert len(outcomes) == RUNS and all(o["ok"] for o in outcomes), outcomes
    # Every job forked from its worker's warm server (the first job of a worker waits for it to
    # start); a job that started cold would say so in its notes.
    assert all(o["warm"] for o in outcomes), outcomes
    assert not [note for o in outcomes for note in o["notes"] if "started cold" in note], outcomes
    # x = 10 * the final w = 10 * (3 * seed + 1): each run's own --kwargs seed read in the warm child.
    assert _x_by_seed() == {seed: 10 * (3 * seed + 1) for seed in range(RUNS)}
    assert len(_journalled(project)) == RUNS
    # The servers are the workers' (node-local, under the node's own directory), not the project's.
    assert report["servers_before_close"], "no warm replay server ran during the Ray replay"
    assert report["sockets"] and all(s.startswith("ray/") for s in report["sockets"]), report["sockets"]
    # After ray.shutdown() the workers are gone, and so are their servers (not left for keep-warm).
    assert report["servers_gone_s"] is not None, f"warm servers outlived the Ray session: {report['servers_left']}"
