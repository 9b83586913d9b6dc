"""A real, sleep-bound job function for the Ray backend's tests, shaped like a replay job.

Like ``run_job`` it is a pure function of its payload that runs the work in a child process and
reports the child's progress; the child carries a marker in its argv so a test can find it (or
prove it gone) by scanning /proc.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# The child: print CUDA_VISIBLE_DEVICES, then one line per iteration; optionally SIGKILL itself.
# With "nest" it runs itself once more as its own child (a replay child's own subprocess, a warm
# server's fork): both carry the marker, and both must die with the job.
CHILD = """
import os, signal, subprocess, sys, time
steps, seconds, kill_at = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
if sys.argv[5] == "nest":
    code = subprocess.call([sys.executable, "-c", os.environ["FLORDB_RAY_TEST_CHILD"], *sys.argv[1:5], "leaf"])
    if code < 0:
        os.kill(os.getpid(), -code)  # die as the leaf died
    sys.exit(code)
print("cuda=" + os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"), flush=True)
for step in range(steps):
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(seconds / steps)
    print(step + 1, flush=True)
"""


@dataclass(frozen=True)
class SleepPayload:
    """A job: sleep ``seconds`` in ``steps`` iterations in a child process marked ``marker``."""

    key: str
    snapshot_sha: str
    snapshot_tar: bytes
    gpus: float = 0.0
    seconds: float = 1.0
    steps: int = 4
    marker: str = "flordb-ray-test-job"
    kill_at: int = -1  # the iteration at which the child SIGKILLs itself (-1: never)
    nest: bool = False  # the child runs the work in a child of its own


@dataclass(frozen=True)
class SleepReply:
    """What a job saw: the reply fields of JobReply plus where it ran and what it was given."""

    key: str
    ok: bool
    exit_code: int | None
    error: str | None
    node_id: str = ""
    cuda_visible_devices: str = ""
    tar_sha256: str = ""
    attempt_pid: int = 0
    worker: dict[str, Any] | None = None  # what setup_worker gave this job's worker process


def failure_reply(key: str, exit_code: int | None, error: str) -> SleepReply:
    """The reply of a job that produced none (the RayExecutor's ``failure_reply``)."""
    return SleepReply(key=key, ok=False, exit_code=exit_code, error=error)


#: How often setup_worker ran in this process (each Ray worker process: once).
_SETUPS = [0]


def setup_worker() -> dict[str, Any]:
    """The RayExecutor's ``worker_setup``: what a job function gets from its worker process."""
    _SETUPS[0] += 1
    return {"worker": {"pid": os.getpid(), "setups": _SETUPS[0]}}


def run_sleep_job(
    payload: SleepPayload, progress: Callable[[int, int], None], worker: dict[str, Any] | None = None
) -> SleepReply:
    """Run the payload's child, relay its progress, reply with its exit status (never raises)."""
    import ray

    argv = [sys.executable, "-c", CHILD, str(payload.steps), str(payload.seconds), str(payload.kill_at),
            payload.marker, "nest" if payload.nest else "leaf"]
    env = {**os.environ, "FLORDB_RAY_TEST_CHILD": CHILD}
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)
    assert child.stdout is not None
    cuda = ""
    for line in child.stdout:
        if line.startswith("cuda="):
            cuda = line.strip()[len("cuda="):]
        else:
            progress(int(line), payload.steps)
    code = child.wait()
    return SleepReply(
        key=payload.key, ok=code == 0, exit_code=code,
        error=None if code == 0 else f"child exited {code}",
        node_id=ray.get_runtime_context().get_node_id() if ray.is_initialized() else "",
        cuda_visible_devices=cuda,
        tar_sha256=hashlib.sha256(payload.snapshot_tar).hexdigest(), attempt_pid=os.getpid(), worker=worker,
    )
