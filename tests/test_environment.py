"""The environment of runs: what is recorded, what never is, deduplication and the probe cache."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import sys
from pathlib import Path

import pytest

from flordb_build.environment import (
    cache_key,
    cached_machine_facts,
    describe_environment,
    env_id_of,
    gpu_info,
    installed_packages,
    select_env_vars,
)
from flordb_build.redaction import is_secret_name
from tests.conftest import Project


def test_select_env_vars_keeps_allow_list_and_flor_and_drops_secrets() -> None:
    environ = {
        "OMP_NUM_THREADS": "4",
        "CUDA_VISIBLE_DEVICES": "0,1",
        "FLOR_MODE": "fast",
        "FLOR_TASK": "train",  # per-run: stored in runs.task instead
        "FLOR_PIPELINE_ID": "abc",
        "FLOR_API_KEY": "k",
        "MY_API_TOKEN": "t",
        "AWS_SECRET_ACCESS_KEY": "s",
        "DB_PASSWORD": "p",
        "GOOGLE_APPLICATION_CREDENTIALS": "/c.json",
        "HOME": "/home/me",  # not on the allow-list: full dumps are never stored
        "MY_SETTING": "1",
    }
    assert select_env_vars(environ) == {"CUDA_VISIBLE_DEVICES": "0,1", "FLOR_MODE": "fast", "OMP_NUM_THREADS": "4"}
    assert select_env_vars(environ, ["MY_SETTING", "DB_PASSWORD"]) == {
        "CUDA_VISIBLE_DEVICES": "0,1",
        "FLOR_MODE": "fast",
        "MY_SETTING": "1",
        "OMP_NUM_THREADS": "4",
    }
    assert all(is_secret_name(n) for n in ("api_key", "x_token", "Secret", "PASSWD", "my_credentials"))
    assert not is_secret_name("OMP_NUM_THREADS")


def test_describe_environment_has_python_packages_platform_and_cpu(tmp_path: Path) -> None:
    env = describe_environment({"OMP_NUM_THREADS": "2", "HOME": "/x"}, cache_path=tmp_path / "cache.json")
    assert env["python"]["version"] == ".".join(map(str, sys.version_info[:3]))
    assert env["python"]["executable"] == sys.executable
    assert env["packages"]["doit"] == "0.37.0"
    assert env["packages"] == installed_packages()
    assert env["cpu"]["count"] == os.cpu_count() and env["cpu"]["model"]
    assert env["platform"]["system"]
    assert env["env_vars"] == {"OMP_NUM_THREADS": "2"}
    # Same environment, same id; one variable more, another id.
    assert env_id_of(env) == env_id_of(describe_environment({"OMP_NUM_THREADS": "2"}, cache_path=tmp_path / "cache.json"))
    other = describe_environment({"OMP_NUM_THREADS": "3"}, cache_path=tmp_path / "cache.json")
    assert env_id_of(other)[0] != env_id_of(env)[0]


def test_machine_facts_come_from_the_cache_while_its_key_matches(tmp_path: Path) -> None:
    cache = tmp_path / "env-cache.json"
    first = cached_machine_facts(cache)
    assert json.loads(cache.read_text())["key"] == cache_key()
    # Plant distinguishable facts under the current key: they are returned without probing.
    cache.write_text(json.dumps({"key": cache_key(), "facts": {"packages": {"planted": "1"}}}))
    assert cached_machine_facts(cache) == {"packages": {"planted": "1"}}
    # A stale key (another interpreter, an installed package) means probing again.
    cache.write_text(json.dumps({"key": "stale", "facts": {"packages": {"planted": "1"}}}))
    assert cached_machine_facts(cache) == first
    cache.write_text("{not json")
    assert cached_machine_facts(cache) == first


def test_gpu_info_parses_nvidia_smi_when_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert gpu_info() is None  # no nvidia-smi: no GPU section
    smi = tmp_path / "nvidia-smi"
    smi.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "--query-gpu=name,driver_version,memory.total" ]; then\n'
        '  echo "NVIDIA H100 80GB HBM3, 550.54.15, 81559 MiB"\n'
        "else\n"
        '  echo "| NVIDIA-SMI 550.54.15    Driver Version: 550.54.15    CUDA Version: 12.4 |"\n'
        "fi\n"
    )
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    info = gpu_info()
    assert info == {
        "devices": [{"name": "NVIDIA H100 80GB HBM3", "driver": "550.54.15", "memory": "81559 MiB"}],
        "count": 1,
        "driver": "550.54.15",
        "cuda": "12.4",
    }


def test_runs_point_at_one_deduplicated_env_row(project: Project) -> None:
    project.write("s.py", "import flordb_build as flor\nflor.log('x', 1)\n")
    project.run("s.py", env={"OMP_NUM_THREADS": "1", "MY_API_TOKEN": "tok-value-123"})
    project.run("s.py", env={"OMP_NUM_THREADS": "1", "FLOR_TASK": "other"})
    project.run("s.py", env={"OMP_NUM_THREADS": "8"})
    conn = sqlite3.connect(project.root / ".flor" / "flor.db")
    try:
        env_ids = [r[0] for r in conn.execute("SELECT env_id FROM runs ORDER BY tstamp")]
        envs = dict(conn.execute("SELECT env_id, env FROM envs").fetchall())
    finally:
        conn.close()
    assert env_ids[0] == env_ids[1] != env_ids[2]  # FLOR_TASK does not split environments
    assert len(envs) == 2
    recorded = json.loads(envs[env_ids[0]])
    assert recorded["env_vars"]["OMP_NUM_THREADS"] == "1"
    assert "tok-value-123" not in envs[env_ids[0]]
    assert recorded["python"]["executable"] == sys.executable
    journal = next((project.root / ".flor" / "runs").glob("*.jsonl")).read_text()
    assert '"env"' in journal  # the snapshot carries the environment too
