"""Scheduling efficiency of the Ray backend on a 4-node local cluster vs the same jobs one after another.

Issue 16's scale-out rows: ``--jobs`` (64) sleep-bound jobs of ``--seconds`` (1 s) each, shaped
like replay jobs (a child process per job that reports progress: tests/ray_jobs.py), run

- sequentially, in this process (the peer: what one slot does);
- as Ray tasks through :class:`~flordb_build.hindsight._ray.RayExecutor` on a 4-node
  ``ray.cluster_utils.Cluster`` (1 CPU each, 80 MB object stores, no dashboard, token auth),
  ``--repeats`` times on one cluster (median).

Targets: speedup >= 3.4x (85 % of the ideal 4x), per-job overhead <= 0.15 s (slots x wall -
sum of job seconds, over jobs), cluster start <= 15 s. The cluster runs in a loopback-only network
and PID namespace (``unshare``, root), as the tests do; this script re-runs itself inside one.

``--replays``: instead of the stand-in jobs, real hindsight replays on the same cluster: bench_scale's
``sleep`` project (``--jobs`` recorded runs whose suffix sleeps ``--seconds``), one ``run_replay`` of
all runs with ``--executor ray --address`` the cluster (each Ray worker's node-local warm server, as the
CLI builds it) against one ``run_replay`` with 1 local slot (sequential, warm). Per-job overhead is
``(1-slot wall - jobs x seconds) / jobs``, as bench_scale computes it.

Run: ``.venv/bin/python bench/bench_ray.py [--jobs 64] [--seconds 1.0] [--repeats 3] [--replays]``
(when ``uptime``'s load is over 1.5 the figures are loaded ones: say so).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO_ROOT, median, print_table, remove_tree, spread  # noqa: E402

SLOTS = 4


def measure_inside(jobs: int, seconds: float, repeats: int, replays: bool) -> dict[str, Any]:
    """In the namespace: the sequential run, then the cluster's start and ``repeats`` runs on it."""
    sys.path.insert(0, str(REPO_ROOT))
    import ray
    from ray.cluster_utils import Cluster

    from flordb_build.hindsight._ray import RayExecutor
    from tests.ray_jobs import SleepPayload, failure_reply, run_sleep_job
    from tests.ray_scenario import node_args

    if replays:
        return _measure_replays(jobs, seconds, repeats, Cluster, node_args)

    def payloads(tag: str) -> list[SleepPayload]:
        return [SleepPayload(key=f"{tag}{index}", snapshot_sha="s", snapshot_tar=b"x" * 1024, seconds=seconds)
                for index in range(jobs)]

    began = time.monotonic()
    for payload in payloads("seq"):
        reply = run_sleep_job(payload, lambda done, total: None)
        if not reply.ok:
            raise RuntimeError(f"sequential job {payload.key} failed: {reply.error}")
    sequential = time.monotonic() - began

    temp_dir = tempfile.mkdtemp(prefix="frb-", dir="/tmp")
    cluster, head_s, start = _start_cluster(Cluster, node_args, temp_dir)
    try:
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        walls = []
        for repeat in range(repeats):
            executor = RayExecutor(job_function=run_sleep_job, failure_reply=failure_reply)
            began = time.monotonic()
            for payload in payloads(f"r{repeat}-"):
                executor.submit(payload)
            failed = [reply.key for reply in executor.completed() if not reply.ok]
            walls.append(time.monotonic() - began)
            executor.close()
            if failed:
                raise RuntimeError(f"cluster jobs failed: {failed}")
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
    return {"sequential_s": sequential, "cluster_start_s": start, "head_start_s": head_s, "cluster_walls_s": walls}


def _start_cluster(cluster_class: Any, node_args: Any, temp_dir: str) -> tuple[Any, float, float]:
    """A 4-node cluster: (cluster, head seconds, total seconds). ``wait=False``: the worker nodes
    start side by side; ``wait_for_nodes`` waits for all of them."""
    began = time.monotonic()
    cluster = cluster_class(initialize_head=True, head_node_args=node_args(temp_dir))
    head_s = time.monotonic() - began
    for _ in range(SLOTS - 1):
        cluster.add_node(wait=False, **node_args(temp_dir))
    cluster.wait_for_nodes()
    return cluster, head_s, time.monotonic() - began


def _measure_replays(jobs: int, seconds: float, repeats: int, cluster_class: Any, node_args: Any) -> dict[str, Any]:
    """Real replays of bench_scale's sleep project: 1 local slot vs the 4-node cluster, interleaved."""
    import bench_scale
    import ray

    from flordb_build.config import load_config
    from flordb_build.hindsight import prepare_replay, run_replay
    from flordb_build.hindsight._execute import make_executor
    from flordb_build.hindsight._warm import project_servers

    base = Path(tempfile.mkdtemp(prefix="bench-ray-replays-", dir="/tmp"))
    temp_dir = tempfile.mkdtemp(prefix="frb-", dir="/tmp")
    cluster = None
    try:
        print(f"recording {jobs} runs", file=sys.stderr, flush=True)
        root = bench_scale._project(base, "sleep", jobs)
        os.chdir(root)
        config = load_config(root)
        cluster, head_s, start = _start_cluster(cluster_class, node_args, temp_dir)
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)

        def replay(kind: str, slots: int) -> float:
            print(f"replaying {jobs} runs: {kind}, {slots} slot(s)", file=sys.stderr, flush=True)
            plan = prepare_replay(["x"], workers=slots, config=config)
            backend = make_executor(config, slots, None, kind, cluster.address if kind == "ray" else None)
            began = time.monotonic()
            try:
                report = run_replay(plan, backend, config=config)
            finally:
                backend.close()
            wall = time.monotonic() - began
            if not report.ok or len(report.outcomes) != len(plan.runs):
                raise RuntimeError(f"{kind} replay with {slots} slot(s) failed: {report.first_error}")
            return wall

        os.environ["FLORDB_BUILD_REPLAY_KEEP_WARM"] = "300"  # one server per node across the sessions
        os.environ["BENCH_SLEEP"] = "0"
        replay("local", 1)  # starts the local warm server; the cluster's first replay starts the nodes' ones
        replay("ray", SLOTS)
        os.environ["BENCH_SLEEP"] = str(seconds)
        sequential, walls = [], []
        for _ in range(repeats):
            sequential.append(replay("local", 1))
            walls.append(replay("ray", SLOTS))
        for server in project_servers(config):
            server.stop()
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        remove_tree(base)
    return {"sequential_s": median(sequential), "sequential_walls_s": sequential, "cluster_start_s": start,
            "head_start_s": head_s, "cluster_walls_s": walls}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--replays", action="store_true",
                        help="real run_replay of recorded runs (bench_scale's sleep project), not stand-in jobs")
    parser.add_argument("--inside", type=Path, help=argparse.SUPPRESS)  # the namespaced run writes here
    args = parser.parse_args()
    if args.inside:
        args.inside.write_text(json.dumps(measure_inside(args.jobs, args.seconds, args.repeats, args.replays)))
        return 0

    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as home:
        out = Path(home) / "figures.json"
        # Ray writes its address file into $RAY_TMPDIR/ray (default /tmp/ray) and does not create it.
        (Path(home) / "ray").mkdir()
        env = {**os.environ, "HOME": home, "PYTHONPATH": str(REPO_ROOT), "RAY_USAGE_STATS_ENABLED": "0",
               "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_TMPDIR": home}
        inner = (f"ip link set lo up && exec {sys.executable} {Path(__file__).resolve()} --jobs {args.jobs} "
                 f"--seconds {args.seconds} --repeats {args.repeats} --inside {out}{' --replays' if args.replays else ''}")
        subprocess.run(["unshare", "--net", "--pid", "--fork", "--mount-proc", "bash", "-c", inner],
                       env=env, check=True)
        figures = json.loads(out.read_text())
    walls = figures["cluster_walls_s"]
    wall = median(walls)
    speedup = figures["sequential_s"] / wall
    if args.replays:  # as bench_scale: what one slot adds to each replay job beyond its sleep
        overhead = (figures["sequential_s"] - args.jobs * args.seconds) / args.jobs
    else:
        overhead = (SLOTS * wall - args.jobs * args.seconds) / args.jobs
    what = "recorded runs replayed" if args.replays else "jobs"
    print(f"{args.jobs} {what} of {args.seconds:g} s, {SLOTS}-node cluster, {args.repeats} repeats; "
          f"load average at start {load:.2f}{' (loaded: figures are upper bounds)' if load > 1.5 else ''}")
    print_table(
        ("what", "figure", "spread", "target"),
        [
            ("sequential (1 slot)", f"{figures['sequential_s']:.2f} s", "", ""),
            ("4-node Ray cluster", f"{wall:.2f} s", f"{spread(walls)} s", ""),
            ("speedup", f"{speedup:.2f}x", "", ">= 3.4x " + ("PASS" if speedup >= 3.4 else "MISS")),
            ("per-job overhead", f"{overhead:.3f} s", "", "<= 0.15 s " + ("PASS" if overhead <= 0.15 else "MISS")),
            ("cluster start", f"{figures['cluster_start_s']:.2f} s", f"head {figures['head_start_s']:.2f} s",
             "<= 15 s " + ("PASS" if figures["cluster_start_s"] <= 15 else "MISS")),
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
