"""The Ray backend (hindsight/_ray.py) on a real 4-node Ray cluster on this machine.

The cluster runs in a loopback-only network and PID namespace (``unshare``; Ray otherwise binds
the machine's external address, and the PID namespace lets a /proc scan see every node's
processes). One subprocess (tests/ray_scenario.py) starts the cluster once and runs every
scenario on it; each test here asserts on that scenario's part of its JSON report. Token
authentication is on, with a token made for the run; nothing is written under the user's HOME.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
SCENARIO_TIMEOUT_SECONDS = 600


def _namespace_refusal() -> str | None:
    """Why a loopback-only namespace cannot be made here, or None when it can."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs unshare (util-linux) and ip (iproute2) for a loopback-only network namespace"
    probe = subprocess.run(
        ["unshare", "--net", "--pid", "--fork", "--mount-proc", "bash", "-c", "ip link set lo up"],
        capture_output=True, text=True, timeout=60,
    )
    if probe.returncode != 0:
        return f"unshare --net --pid is not permitted here (run as root): {probe.stderr.strip()[-200:]}"
    return None


@pytest.fixture(scope="module")
def cluster_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run every scenario on one 4-node cluster in a namespace; their JSON report."""
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'flordb_build[ray]'")
    refusal = _namespace_refusal()
    if refusal:
        pytest.skip(refusal)
    home = tmp_path_factory.mktemp("ray-home")
    out = home / "report.json"
    # Ray's sessions (logs, sockets) of the local-Ray scenario go here, not /tmp/ray; short: socket paths.
    ray_tmp = tempfile.mkdtemp(prefix="frt-", dir="/tmp")
    env = {
        **os.environ, "HOME": str(home), "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_TMPDIR": ray_tmp,
    }
    command = f"ip link set lo up && exec {sys.executable} -m tests.ray_scenario cluster {out}"
    try:
        done = subprocess.run(
            ["unshare", "--net", "--pid", "--fork", "--mount-proc", "bash", "-c", command],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=SCENARIO_TIMEOUT_SECONDS,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    if done.returncode != 0 or not out.exists():
        pytest.fail(f"the Ray scenarios failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    report: dict[str, Any] = json.loads(out.read_text())
    return report


def test_cluster_is_four_nodes_with_token_auth(cluster_report: dict[str, Any]) -> None:
    nodes = cluster_report["nodes"]
    assert len({nodes["head"], nodes["cpu"], *nodes["gpu"]}) == 4
    assert cluster_report["auth_mode"] == "token"
    refused = cluster_report["no_token"]  # a driver without the token cannot use the cluster
    assert refused["connected"] is False and refused["exit"] != 0, refused


def test_sixteen_jobs_reply_ok_and_each_snapshot_is_shipped_once(cluster_report: dict[str, Any]) -> None:
    part = cluster_report["sixteen"]
    replies = part["replies"]
    assert sorted(reply["key"] for reply in replies) == sorted(f"run{index}/0" for index in range(16))
    assert all(reply["ok"] and reply["exit_code"] == 0 for reply in replies)
    assert part["blob_puts"] == {"sha-a": 1, "sha-b": 1}
    # Every job got its own snapshot's bytes back from the ObjectRef, whole.
    expected = cluster_report["tar_sha256"]
    for reply in replies:
        index = int(reply["key"][3:].split("/")[0])
        assert reply["tar_sha256"] == expected["sha-a" if index % 2 == 0 else "sha-b"]
    # Spread over the nodes, and the progress of running jobs reached the driver.
    assert len({reply["node_id"] for reply in replies}) == 4
    # worker_setup ran once in each worker process, and every job of that process got its result.
    assert all(reply["worker"]["setups"] == 1 and reply["worker"]["pid"] == reply["attempt_pid"] for reply in replies)
    assert len({reply["attempt_pid"] for reply in replies}) < len(replies)  # workers ran several jobs each
    assert part["progress_seen"] and all(0 < done <= total == 4 for done, total in part["progress_seen"].values())


def test_gpu_jobs_land_on_gpu_nodes_and_see_their_device(cluster_report: dict[str, Any]) -> None:
    replies = {reply["key"]: reply for reply in cluster_report["gpu"]["replies"]}
    gpu_nodes = set(cluster_report["nodes"]["gpu"])
    for key in ("gpu0", "gpu1", "gpu2", "gpu3"):
        assert replies[key]["ok"]
        assert replies[key]["node_id"] in gpu_nodes
        assert replies[key]["cuda_visible_devices"] == "0"
    for key in ("gpu4", "gpu5"):
        assert replies[key]["ok"]
        assert replies[key]["cuda_visible_devices"] in ("<unset>", "")


def test_a_job_whose_child_is_killed_replies_not_ok_with_minus_nine(cluster_report: dict[str, Any]) -> None:
    replies = {reply["key"]: reply for reply in cluster_report["sigkill"]["replies"]}
    assert replies["killed"]["ok"] is False and replies["killed"]["exit_code"] == -9
    assert replies["fine"]["ok"] is True


def test_jobs_of_a_lost_node_are_retried_elsewhere(cluster_report: dict[str, Any]) -> None:
    part = cluster_report["node_loss"]
    # Every node ran one when node 3 was killed, so one job died with it mid-run ...
    assert part["running_at_kill"] >= 4
    replies = part["replies"]
    assert sorted(reply["key"] for reply in replies) == sorted(f"loss{index}" for index in range(8))
    # ... and still replied ok, from another node: none of the replies comes from the dead one.
    assert all(reply["ok"] for reply in replies)
    assert part["victim_node_id"] not in {reply["node_id"] for reply in replies}
    assert part["children_left"] == 0


def test_cancel_kills_every_job_child_within_five_seconds(cluster_report: dict[str, Any]) -> None:
    part = cluster_report["cancel"]
    assert part["running_before"] >= 6  # 3 jobs, each a child and a grandchild
    replies = part["replies"]
    assert len(replies) == 6
    assert all(reply["ok"] is False and reply["exit_code"] == -9 for reply in replies)
    assert part["left_after_5s"] == 0 and part["gone_s"] is not None and part["gone_s"] <= 5.0


@pytest.mark.parametrize("scenario", ["sigint", "driver_killed"])
def test_driver_interrupted_or_killed_leaves_no_job_child(cluster_report: dict[str, Any], scenario: str) -> None:
    part = cluster_report[scenario]
    assert part["gone_within_5s"] is True and part["left_after_5s"] == 0
    if scenario == "sigint":
        assert part["driver_exit"] == 130
        replies = json.loads(part["driver_output"][0])
        assert len(replies) == 3 and not any(reply["ok"] for reply in replies)
    else:
        assert part["driver_exit"] == -9


def test_without_an_address_a_local_ray_is_started_and_stopped(cluster_report: dict[str, Any]) -> None:
    part = cluster_report["local"]
    assert [reply["ok"] for reply in part["replies"]] == [True, True]
    assert part["slots"] == 2 and part["address"].startswith("127.0.0.1:")
    assert part["initialized_after_close"] is False and part["raylets_gone_s"] is not None
