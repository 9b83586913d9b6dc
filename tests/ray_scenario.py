"""Scenarios of the Ray backend on a real 4-node cluster, run by tests/test_ray_cluster.py.

Run inside a loopback-only network and PID namespace (the test starts it under ``unshare``), so
Ray binds 127.0.0.1 only and a /proc scan sees every process of every node:

    python -m tests.ray_scenario cluster OUT.json    all scenarios on one cluster -> JSON
    python -m tests.ray_scenario driver ADDRESS KEY  a driver that a scenario interrupts

One cluster serves every scenario (it is the slow part): head and node 3 are CPU-only, nodes 1
and 2 declare one GPU each (no GPU is needed: Ray trusts the declaration and sets
``CUDA_VISIBLE_DEVICES``). Every wait here waits on a condition, with a deadline.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from flordb_build.hindsight._ray import RayExecutor
from tests.ray_jobs import SleepPayload, SleepReply, failure_reply, run_sleep_job

NODE_OBJECT_STORE_BYTES = 80 * 2**20
MARKER = "flordb-ray-test-job"


def node_args(temp_dir: str, num_gpus: int = 0) -> dict[str, Any]:
    """One node: 1 CPU, no dashboard, a small object store, on 127.0.0.1."""
    return {"num_cpus": 1, "num_gpus": num_gpus, "object_store_memory": NODE_OBJECT_STORE_BYTES,
            "include_dashboard": False, "node_ip_address": "127.0.0.1", "temp_dir": temp_dir}


def marked_processes(marker: str) -> list[int]:
    """Pids of processes whose argv has ``marker`` as one of its words (the jobs' children)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in argv and state != "Z":
            pids.append(int(entry))
    return pids


def processes_named(name: str) -> list[int]:
    """Pids of live processes whose command name is ``name`` (``raylet``, ``gcs_server``)."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and Path(f"/proc/{entry}/comm").read_text().strip() == name:
                pids.append(int(entry))
        except OSError:
            continue
    return pids


def wait_until(condition: Callable[[], bool], timeout: float, poll: float = 0.05) -> float | None:
    """Seconds until ``condition()`` held, or None when ``timeout`` passed first."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if condition():
            return time.monotonic() - start
        time.sleep(poll)
    return None


def executor() -> RayExecutor:
    return RayExecutor(job_function=run_sleep_job, failure_reply=failure_reply)


def scenario_sixteen(tars: dict[str, bytes]) -> dict[str, Any]:
    """16 jobs of two snapshots over 4 nodes: all ok, each tar put once, progress seen, setup once per worker."""
    ex = RayExecutor(job_function=run_sleep_job, failure_reply=failure_reply,
                     worker_setup="tests.ray_jobs:setup_worker")
    shas = sorted(tars)
    for index in range(16):
        sha = shas[index % 2]
        ex.submit(SleepPayload(key=f"run{index}/0", snapshot_sha=sha, snapshot_tar=tars[sha], seconds=1.0))
    seen: dict[str, tuple[int, int]] = {}

    def progressed() -> bool:
        seen.update(ex.progress())
        return len(seen) >= 2

    progress_after = wait_until(progressed, 60)
    replies = [asdict(reply) for reply in ex.completed()]
    notes = ex.close()
    return {"replies": replies, "blob_puts": ex.blob_puts, "progress_seen": {k: list(v) for k, v in seen.items()},
            "progress_after_s": progress_after, "notes": list(notes)}


def scenario_gpu(tar: bytes) -> dict[str, Any]:
    """4 GPU jobs and 2 CPU jobs: where each ran and the CUDA_VISIBLE_DEVICES it saw."""
    ex = executor()
    for index in range(6):
        ex.submit(SleepPayload(key=f"gpu{index}", snapshot_sha="g", snapshot_tar=tar, seconds=0.5,
                               gpus=1.0 if index < 4 else 0.0))
    replies = [asdict(reply) for reply in ex.completed()]
    ex.close()
    return {"replies": replies}


def scenario_sigkill(tar: bytes) -> dict[str, Any]:
    """A job whose child SIGKILLs itself at its second iteration, beside a job that succeeds."""
    ex = executor()
    ex.submit(SleepPayload(key="killed", snapshot_sha="k", snapshot_tar=tar, seconds=1.0, kill_at=1, nest=True))
    ex.submit(SleepPayload(key="fine", snapshot_sha="k", snapshot_tar=tar, seconds=0.5))
    replies = [asdict(reply) for reply in ex.completed()]
    ex.close()
    return {"replies": replies}


def scenario_node_loss(cluster: Any, victim: Any, tar: bytes) -> dict[str, Any]:
    """8 jobs of 4 s; once every node runs one, node 3 is killed: its job is retried elsewhere."""
    ex = executor()
    marker = MARKER + "-nodeloss"
    for index in range(8):
        ex.submit(SleepPayload(key=f"loss{index}", snapshot_sha="n", snapshot_tar=tar, seconds=4.0, steps=8,
                               marker=marker))
    busy_after = wait_until(lambda: len(marked_processes(marker)) >= 4, 60)
    running_at_kill = len(marked_processes(marker))
    cluster.remove_node(victim, allow_graceful=False)
    replies = [asdict(reply) for reply in ex.completed()]
    ex.close()
    return {"replies": replies, "victim_node_id": victim.node_id, "busy_after_s": busy_after,
            "running_at_kill": running_at_kill, "children_left": len(marked_processes(marker))}


def scenario_cancel(tar: bytes) -> dict[str, Any]:
    """6 jobs of 120 s on 3 nodes; cancel() once 3 run: replies and when the children are gone."""
    ex = executor()
    marker = MARKER + "-cancel"
    for index in range(6):
        ex.submit(SleepPayload(key=f"cancel{index}", snapshot_sha="c", snapshot_tar=tar, seconds=120.0,
                               steps=120, marker=marker, nest=True))
    # 3 nodes left, each running one job: its child and that child's child.
    running_after = wait_until(lambda: len(marked_processes(marker)) >= 6, 60)
    running = len(marked_processes(marker))
    cancelled_at = time.monotonic()
    ex.cancel()
    replies = [asdict(reply) for reply in ex.completed()]
    gone_after = wait_until(lambda: not marked_processes(marker), 5.0 - (time.monotonic() - cancelled_at))
    ex.close()
    return {"replies": replies, "running_before": running, "running_after_s": running_after,
            "gone_s": None if gone_after is None else time.monotonic() - cancelled_at,
            "left_after_5s": len(marked_processes(marker))}


def scenario_driver_signal(address: str, signum: int, name: str) -> dict[str, Any]:
    """A separate driver runs 3 jobs of 120 s; it gets ``signum`` once they run: children gone 5 s later?"""
    marker = f"{MARKER}-{name}"
    driver = subprocess.Popen([sys.executable, "-m", "tests.ray_scenario", "driver", address, marker],
                              stdout=subprocess.PIPE, text=True)
    running_after = wait_until(lambda: len(marked_processes(marker)) >= 6, 90)
    signalled_at = time.monotonic()
    driver.send_signal(signum)
    output, _ = driver.communicate(timeout=60)
    gone_after = wait_until(lambda: not marked_processes(marker), max(0.0, 5.0 - (time.monotonic() - signalled_at)))
    left = len(marked_processes(marker))
    # Past the 5 s: how long they do live (for the report), bounded.
    lived = wait_until(lambda: not marked_processes(marker), 30)
    return {"driver_exit": driver.returncode, "driver_output": output.strip().splitlines()[-1:],
            "running_after_s": running_after, "gone_within_5s": gone_after is not None, "left_after_5s": left,
            "gone_s": time.monotonic() - signalled_at if lived is not None else None}


def scenario_no_token(address: str) -> dict[str, Any]:
    """A driver without the cluster's token (none in its environment, none under its HOME) is refused."""
    home = tempfile.mkdtemp(prefix="frt-home-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    code = f"import ray; ray.init(address={address!r}); print('connected', ray.cluster_resources())"
    try:
        done = subprocess.run([sys.executable, "-c", code], env={**env, "HOME": home}, capture_output=True, text=True,
                              timeout=120)
    except subprocess.TimeoutExpired:
        return {"exit": None, "connected": False, "tail": "timed out"}
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return {"exit": done.returncode, "connected": "connected" in done.stdout, "tail": done.stderr[-600:]}


def run_driver(address: str, marker: str) -> int:
    """The interrupted driver: like the CLI, it cancels on KeyboardInterrupt and reports the replies."""
    # A background job's children start with SIGINT ignored (tests/conftest.py): hear Ctrl-C.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    ex = RayExecutor(address=address, job_function=run_sleep_job, failure_reply=failure_reply)
    for index in range(3):
        ex.submit(SleepPayload(key=f"drv{index}", snapshot_sha="d", snapshot_tar=b"tar", seconds=120.0, steps=120,
                               marker=marker, nest=True))
    replies: list[SleepReply] = []
    try:
        replies.extend(ex.completed())
    except KeyboardInterrupt:
        ex.cancel()
        replies.extend(ex.completed())
        ex.close()
        print(json.dumps([asdict(reply) for reply in replies]), flush=True)
        return 130
    ex.close()
    print(json.dumps([asdict(reply) for reply in replies]), flush=True)
    return 0


def run_local() -> int:
    """RayExecutor without an address: it starts a local Ray on 127.0.0.1 and stops it at close."""
    import ray

    ex = RayExecutor(slots=2, job_function=run_sleep_job, failure_reply=failure_reply)
    address = ray.get_runtime_context().gcs_address
    for index in range(2):
        ex.submit(SleepPayload(key=f"local{index}", snapshot_sha="l", snapshot_tar=b"local", seconds=0.5))
    replies = [asdict(reply) for reply in ex.completed()]
    slots = ex.slots
    ex.close()
    print(json.dumps({"replies": replies, "slots": slots, "address": address,
                      "initialized_after_close": ray.is_initialized()}), flush=True)
    return 0


def scenario_local() -> dict[str, Any]:
    """The local Ray of a separate driver: its jobs run, and close() leaves no raylet behind."""
    done = subprocess.run([sys.executable, "-m", "tests.ray_scenario", "local"], capture_output=True, text=True,
                          timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"the local-Ray driver failed (exit {done.returncode}): {done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["raylets_gone_s"] = wait_until(lambda: not processes_named("raylet"), 30)
    return result


def run_cluster(out: Path) -> int:
    """Start the 4-node cluster, run every scenario on it, write their results to ``out``."""
    import ray
    from ray.cluster_utils import Cluster

    temp_dir = tempfile.mkdtemp(prefix="frt-", dir="/tmp")  # short: Ray's socket paths have a limit
    result: dict[str, Any] = {"local": scenario_local()}  # first: no other raylet runs yet
    started = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args=node_args(temp_dir))
    try:
        # wait=False: the worker nodes start side by side (about 5 s less under load).
        gpu_nodes = [cluster.add_node(wait=False, **node_args(temp_dir, num_gpus=1)) for _ in range(2)]
        victim = cluster.add_node(wait=False, **node_args(temp_dir))
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        result["cluster_start_s"] = time.monotonic() - started
        result["nodes"] = {"head": cluster.head_node.node_id, "gpu": [node.node_id for node in gpu_nodes],
                           "cpu": victim.node_id}
        result["auth_mode"] = os.environ.get("RAY_AUTH_MODE")
        tars = {"sha-a": os.urandom(256 * 1024), "sha-b": os.urandom(128 * 1024)}
        result["tar_sha256"] = {sha: __import__("hashlib").sha256(tar).hexdigest() for sha, tar in tars.items()}
        timed: dict[str, float] = {}
        for name, run in (
            ("no_token", lambda: scenario_no_token(cluster.address)),
            ("sixteen", lambda: scenario_sixteen(tars)),
            ("gpu", lambda: scenario_gpu(b"gpu")),
            ("sigkill", lambda: scenario_sigkill(b"kill")),
            ("node_loss", lambda: scenario_node_loss(cluster, victim, b"loss")),
            ("cancel", lambda: scenario_cancel(b"cancel")),
            ("sigint", lambda: scenario_driver_signal(cluster.address, signal.SIGINT, "sigint")),
            ("driver_killed", lambda: scenario_driver_signal(cluster.address, signal.SIGKILL, "killed")),
        ):
            began = time.monotonic()
            result[name] = run()
            timed[name] = time.monotonic() - began
        result["seconds"] = timed
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "driver":
        sys.exit(run_driver(sys.argv[2], sys.argv[3]))
    if sys.argv[1] == "local":
        sys.exit(run_local())
    sys.exit(run_cluster(Path(sys.argv[2])))
