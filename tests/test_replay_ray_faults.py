"""Faults of real replays on a real 4-node Ray cluster (issue 16.4): Ctrl-C, a killed driver, a
replay child killed with -9, a node lost mid-replay.

Six recorded runs of a real script in a real git repository are replayed with ``flordb-build
replay x --executor ray --address <cluster>``, as a user would. The cluster runs in a
loopback-only network and PID namespace (``unshare``, as in tests/test_ray_cluster.py), so a
/proc scan sees every node's processes. One subprocess (tests/ray_replay_scenario.py) starts the
cluster once and runs every phase on it; each test asserts on its phase of the JSON report.

The script's suffix waits at a gate (a file the scenario creates) for the seeds a phase names, and
starts a process of its own that waits there too: the replays are running, and stay running, until
the scenario has done what it wanted to them. No wait here is a fixed sleep.

The replays start warm, the default (each job's child forked from its Ray worker's warm server),
but in one Ctrl-C phase, sigint_cold, which replays with ``--cold``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import GIT_ENV, Project
from tests.test_ray_cluster import _namespace_refusal

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
SCENARIO_TIMEOUT_SECONDS = 600
RUNS = 6
# The final w of a run is 3 * seed + 1, so today's x is 10 * (3 * seed + 1).
SCRIPT = """\
import os
import subprocess
import sys
import time
import flordb_build as flor

WAIT = "import os, sys, time\\nend = time.monotonic() + 600\\nwhile not os.path.exists(sys.argv[1]) and time.monotonic() < end:\\n    time.sleep(0.05)\\n"

seed = flor.arg("seed", 0)
state = {"w": seed}
with flor.checkpointing(state=state):
    for epoch in flor.loop("epoch", range(2)):
        state["w"] += seed + epoch
        flor.log("w", state["w"])
if str(seed) in os.environ.get("FLOR_TEST_GATED", "").split(","):
    gate = os.environ["FLOR_TEST_GATE"]
    # A process of the script's own (a data loader, a server): it must end with the replay.
    subprocess.Popen([sys.executable, "-c", WAIT, gate, "flordb-fault-grandchild"])
    end = time.monotonic() + 600
    while not os.path.exists(gate) and time.monotonic() < end:
        time.sleep(0.05)
%s
flor.log("done", 1)
"""
TODAY = """flor.log("x", state["w"] * 10)
flor.log("gpu", os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"))
flor.log("visible", os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"))"""
#: What the report says once when --device auto jobs ran on a cluster whose nodes declare GPUs.
AUTO_NOTE = "ask for --device cuda to use them"


def expected_x(seed: int) -> int:
    return 10 * (3 * seed + 1)


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Record the runs, then run every phase on one 4-node cluster in a namespace; the JSON report."""
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'flordb_build[ray]'")
    refusal = _namespace_refusal()
    if refusal:
        pytest.skip(refusal)
    base = tmp_path_factory.mktemp("ray-faults")
    project = Project(base / "proj")
    project.root.mkdir()
    project.git("init", "-q", "-b", "main")
    # Warm starts are on (the default): every phase but sigint_cold forks its jobs' children from
    # the Ray workers' warm servers.
    project.write("pyproject.toml", "[tool.flordb_build]\ncheckpoint_every = 1\n")
    project.write("train.py", SCRIPT % "")
    project.commit_all("train")
    env = {"FLORDB_BUILD_REPLAY_KEEP_WARM": "0"}
    for seed in range(RUNS):
        project.run("train.py", "--kwargs", f"seed={seed}", env=env)
    project.write("train.py", SCRIPT % TODAY)
    project.commit_all("today: x")
    conn = sqlite3.connect(project.root / ".flor" / "flor.db")
    try:
        seeds = {run_id: int(json.loads(args)["seed"]) for run_id, args in conn.execute("SELECT run_id, args FROM runs")}
    finally:
        conn.close()
    assert sorted(seeds.values()) == list(range(RUNS))
    runs_file, out = base / "runs.json", base / "report.json"
    runs_file.write_text(json.dumps(seeds))

    home = base / "home"
    home.mkdir()
    ray_tmp = tempfile.mkdtemp(prefix="frf-", dir="/tmp")  # short: Ray's socket paths have a limit
    (Path(ray_tmp) / "ray").mkdir()  # where Ray notes the current cluster's address
    scenario_env = {
        **{k: v for k, v in os.environ.items() if k not in ("FLORDB_BUILD_DB", "FLOR_TASK", "FLOR_PIPELINE_ID")},
        **GIT_ENV, **env, "HOME": str(home), "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_TMPDIR": ray_tmp,
    }
    command = (f"ip link set lo up && exec {sys.executable} -m tests.ray_replay_scenario "
               f"{project.root} {runs_file} {out}")
    try:
        done = subprocess.run(
            ["unshare", "--net", "--pid", "--fork", "--mount-proc", "bash", "-c", command],
            cwd=REPO, env=scenario_env, capture_output=True, text=True, timeout=SCENARIO_TIMEOUT_SECONDS,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    if done.returncode != 0 or not out.exists():
        pytest.fail(f"the replay fault scenario failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n"
                    f"{done.stderr[-6000:]}")
    report: dict[str, Any] = json.loads(out.read_text())
    return report


def _phase(faults: dict[str, Any], name: str) -> dict[str, Any]:
    part: dict[str, Any] = faults[name]
    assert "error" not in part, json.dumps(part, indent=1)[-4000:]
    return part


def _stored(part: dict[str, Any]) -> dict[int, list[Any]]:
    """seed -> its x values in the store after the phase (-1: staged rows left over)."""
    return {int(seed): values for seed, values in part["stored_after"].items()}


@pytest.mark.parametrize("scenario", ["sigint", "sigint_cold", "sigkill"])
def test_a_driver_interrupted_or_killed_leaves_no_replay_process_on_any_node(
    faults: dict[str, Any], scenario: str
) -> None:
    part = _phase(faults, scenario)
    # Four replays were running on the four nodes: each a replay child and a process it started;
    # forked from the workers' warm servers but with --cold.
    assert len(part["children_at_signal"]) == 4, part
    assert part["warm_at_signal"] == (0 if scenario == "sigint_cold" else 4), part
    assert part["before"] >= 8 and part["before_grandchildren"] >= 4, part
    assert part["gone_s"] is not None and part["left_after_5s"] == {}, part
    assert part["driver_exit"] == (-9 if scenario == "sigkill" else 130), part["stderr"]
    # The warm servers end with the Ray workers that owned them, which end with their driver.
    assert part["servers_gone_s"] is not None, part["servers_left"]


@pytest.mark.parametrize("scenario", ["sigint", "sigint_cold"])
def test_runs_a_ctrl_c_cut_short_are_not_backfilled_and_the_finished_ones_are(
    faults: dict[str, Any], scenario: str
) -> None:
    stored = _stored(_phase(faults, scenario))
    # Seeds 0 and 1 finished before the Ctrl-C: their x, once; the interrupted ones: nothing.
    assert {seed: values for seed, values in stored.items() if seed >= 0} == {0: [expected_x(0)], 1: [expected_x(1)]}


def test_a_killed_driver_changes_nothing_in_the_store(faults: dict[str, Any]) -> None:
    stored = _stored(_phase(faults, "sigkill"))
    # Every run was cut short (seeds 0 and 1 again too): the store still shows what it showed.
    assert {seed: values for seed, values in stored.items() if seed >= 0} == {0: [expected_x(0)], 1: [expected_x(1)]}


def test_a_replay_child_killed_with_minus_nine_fails_its_run_and_only_its_run(faults: dict[str, Any]) -> None:
    part = _phase(faults, "minus_nine")
    run_of_3 = next(run_id for run_id, seed in faults["seeds"].items() if seed == 3)
    assert part["victim_warm"], part  # a warm server's fork: its server reported the -9
    assert part["driver_exit"] == 1, part["stdout"] + part["stderr"]
    assert f"error: run {run_of_3}:" in part["stdout"] and "-9" in part["stdout"], part["stdout"]
    assert f"withheld: run {run_of_3}:" in part["stdout"], part["stdout"]
    stored = _stored(part)
    assert {seed: values for seed, values in stored.items() if seed >= 0} == {
        seed: [expected_x(seed)] for seed in range(RUNS) if seed != 3
    }
    # The process the killed child had started did not outlive its job.
    assert part["grandchildren_gone_s"] is not None, part


def test_a_node_lost_mid_replay_has_its_runs_retried_and_the_replay_completes(faults: dict[str, Any]) -> None:
    part = _phase(faults, "node_loss")
    assert part["seeds_on_victim"] and part["children_at_removal"] >= 4, part
    assert part["warm_at_removal"] >= 4, part
    assert part["victim_children_gone_s"] is not None, part
    assert part["driver_exit"] == 0, part["stdout"] + part["stderr"]
    stored = _stored(part)
    # Every run's x is the fresh run's, stored once (the first attempt on the lost node stored nothing),
    # and the runs the faults above cut short are complete now.
    assert {seed: values for seed, values in stored.items() if seed >= 0} == {
        seed: [expected_x(seed)] for seed in range(RUNS)
    }
    assert stored[-1] == [0]  # no staged row of any session is left behind
    assert part["left_after"] == 0


def test_jobs_of_a_cuda_replay_run_on_the_nodes_that_declare_a_gpu(faults: dict[str, Any]) -> None:
    part = _phase(faults, "gpu")
    assert part["driver_exit"] == 0, part["stdout"] + part["stderr"]
    # Each job was given its node's one GPU (Ray sets CUDA_VISIBLE_DEVICES only where a job asked
    # for a GPU and the node has one): the value the replayed script saw, written once per run.
    assert {seed: values for seed, values in _stored(part).items() if seed >= 0} == {
        seed: ["0"] for seed in range(RUNS)
    }
    assert AUTO_NOTE not in part["stdout"], part["stdout"]


def test_a_device_auto_job_on_a_node_that_declares_a_gpu_sees_none_and_the_report_says_why(
    faults: dict[str, Any],
) -> None:
    part = _phase(faults, "gpu_auto")
    assert part["driver_exit"] == 0, part["stdout"] + part["stderr"]
    # Both nodes that declare a GPU ran --device auto jobs at once: none reserved a GPU there, so
    # none may use one (it kept the driver's unset value before: "<unset>").
    assert len(part["seeds_on_gpu_nodes"]) == 2, part
    assert {seed: values for seed, values in _stored(part).items() if seed >= 0} == {3: [""], 4: [""], 5: [""]}
    assert part["stdout"].count(AUTO_NOTE) == 1, part["stdout"]
