"""hindsight/_ray.py without a cluster: Ray stays out of every import, and its absence reads as directions.

The real cluster scenarios are in tests/test_ray_cluster.py (marker ``ray``).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from flordb_build.errors import ReplayError
from flordb_build.hindsight._ray import resolve_import_path


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_no_import_of_the_package_or_the_backend_imports_ray() -> None:
    out = _run(
        "import sys, flordb_build, flordb_build.cli, flordb_build.replay_options, flordb_build.hindsight._ray\n"
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_ray_executor_without_ray_says_how_to_install_it() -> None:
    # sys.modules['ray'] = None makes `import ray` fail as on a machine without it.
    out = _run(
        "import sys; sys.modules['ray'] = None\n"
        "from flordb_build.hindsight._ray import RayExecutor\n"
        "try:\n    RayExecutor(slots=1)\nexcept Exception as exc:\n    print(type(exc).__name__, exc)"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ReplayError '--executor ray' needs Ray, which is not installed.")
    assert "pip install 'flordb_build[ray]'" in out.stdout and "--executor local" in out.stdout


def test_a_job_function_path_that_does_not_resolve_names_it() -> None:
    assert resolve_import_path("os.path:join") is __import__("os").path.join
    with pytest.raises(ReplayError, match="Could not load the replay job function 'os.path:nope'"):
        resolve_import_path("os.path:nope")
    with pytest.raises(ReplayError, match="'no_such_module_xyz:run'"):
        resolve_import_path("no_such_module_xyz:run")


def test_a_ray_job_sees_only_the_gpus_it_asked_ray_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """The env a job's child gets on a Ray worker: ``_with_assigned_gpus`` (the real function the
    remote task applies); the 4-node cluster scenario checks the same with real replays."""
    from flordb_build.hindsight._executors import JobPayload
    from flordb_build.hindsight._ray import _with_assigned_gpus

    # What the driver put in the payload (its own or the recorded value), and what Ray set on the worker.
    driver_env = {"CUDA_VISIBLE_DEVICES": "0,1,2,3", "PATH": "/bin"}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    cpu_job = _with_assigned_gpus(JobPayload(key="a", snapshot_sha="s", snapshot_tar=b"", gpus=0.0, env=driver_env))
    gpu_job = _with_assigned_gpus(JobPayload(key="b", snapshot_sha="s", snapshot_tar=b"", gpus=1.0, env=driver_env))
    # No GPU asked for: none visible (a --device auto replay then runs on the CPU), not the driver's four.
    assert cpu_job.env == {"CUDA_VISIBLE_DEVICES": "", "PATH": "/bin"}
    assert gpu_job.env == {"CUDA_VISIBLE_DEVICES": "2", "PATH": "/bin"}
