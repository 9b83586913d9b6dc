"""Issue 16.4 on one machine: a replay driver killed with SIGKILL leaves no replay child running.

The local executor's jobs are threads of the driver, and each job's child is a process of its own
(in a session of its own): killed with SIGKILL, the driver runs no clean-up, so only the child
itself can notice (``_child.end_with_parent``). Real recorded runs, a real ``flordb-build replay``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import GIT_ENV, Project
from tests.test_replay_scale import TODAY, _alive, _today, _wait_for, _x_by_seed, recorded  # noqa: F401


@pytest.mark.slow
def test_a_driver_killed_with_sigkill_leaves_no_replay_child(recorded: Project, tmp_path: Path) -> None:  # noqa: F811
    project = recorded
    _today(project, TODAY)
    pids = tmp_path / "pids"
    pids.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "flordb_build", "replay", "x", "--yes", "--workers", "2", "--cold"],
        cwd=project.root, env={**os.environ, **GIT_ENV, "PIDS": str(pids), "SLEEP": "600"},
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert _wait_for(lambda: len(list(pids.iterdir())) >= 2 or proc.poll() is not None), "no job started"
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        started = [int(p.name) for p in pids.iterdir()]
        assert proc.returncode == -9
        # The children (each would sleep 600 s) end themselves once their driver is gone.
        assert _wait_for(lambda: not any(_alive(pid) for pid in started), 5.0), [p for p in started if _alive(p)]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        for name in os.listdir(pids):
            if _alive(int(name)):
                os.kill(int(name), signal.SIGKILL)
    assert _x_by_seed() == {}  # nothing of a killed replay is written
