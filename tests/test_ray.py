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
