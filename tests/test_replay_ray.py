"""``flordb-build replay --executor ray``: real recorded runs replayed as Ray tasks (issue 16).

The command runs in a loopback-only network and PID namespace (``unshare``, as in
tests/test_ray_cluster.py): the local Ray it starts binds 127.0.0.1 and cannot reach out, and no
process of it outlives the namespace. HOME and Ray's temporary directory are the test's own.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import GIT_ENV, Project
from tests.test_ray_cluster import _namespace_refusal
from tests.test_replay_scale import RUNS, SCRIPT, TODAY, _journalled, _x_by_seed

pytestmark = pytest.mark.ray


def test_replay_with_the_ray_executor_backfills_every_run(project: Project) -> None:
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
    ray_tmp = tempfile.mkdtemp(prefix="frt-", dir="/tmp")  # short: Ray's socket paths live under it
    env = {**os.environ, **GIT_ENV, "HOME": home, "RAY_TMPDIR": ray_tmp, "RAY_USAGE_STATS_ENABLED": "0"}
    replay = [sys.executable, "-m", "flordb_build", "replay", "x", "--yes", "--executor", "ray", "--workers", "2"]
    command = f"ip link set lo up && exec {shlex.join(replay)}"
    try:
        done = subprocess.run(
            ["unshare", "--net", "--pid", "--fork", "--mount-proc", "bash", "-c", command],
            cwd=project.root, env=env, capture_output=True, text=True, timeout=600,
        )
        # Ray ran the jobs: the local Ray the replay started left its session under RAY_TMPDIR.
        ray_sessions = list(Path(ray_tmp).glob("ray/session_*")) + list(Path(ray_tmp).glob("session_*"))
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert ray_sessions, f"no Ray session under {ray_tmp}: the jobs did not run on Ray"
    # x = 10 * the final w = 10 * (3 * seed + 1): each run's own value, written by the driver.
    assert _x_by_seed() == {seed: 10 * (3 * seed + 1) for seed in range(RUNS)}
    assert len(_journalled(project)) == RUNS
