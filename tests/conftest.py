"""Shared fixtures: a real git repository in a temporary directory, and real script runs.

Scripts run in subprocesses with ``sys.executable`` (the interpreter that has flordb_build
installed), inside the temporary repository, exactly as a user would run them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.pg_server import PgServer, find_pg_bin, running_server

# A shell starts a background job (`.ci/run &`, a job runner) with SIGINT ignored, and every child
# inherits that: the Ctrl-C tests would then send a signal nobody hears, and a test that waits for
# the second Ctrl-C would hang. Give the test process, and so every script it starts (a handled
# signal is reset to the default at exec), Python's usual Ctrl-C.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

GIT_ENV = {
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_AUTHOR_NAME": "Test User",
    "GIT_AUTHOR_EMAIL": "test@example.com",
    "GIT_COMMITTER_NAME": "Test User",
    "GIT_COMMITTER_EMAIL": "test@example.com",
}


@dataclass
class Project:
    """A temporary git repository to run scripts in."""

    root: Path

    def write(self, relpath: str, text: str) -> Path:
        """Write a dedented file under the repository root."""
        path = self.root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
        return path

    def git(self, *args: str) -> str:
        out = subprocess.run(
            ["git", *args], cwd=self.root, env={**os.environ, **GIT_ENV}, capture_output=True, text=True, check=True
        )
        return out.stdout

    def commit_all(self, message: str = "commit") -> None:
        self.git("add", "-A")
        self.git("commit", "-q", "-m", message)

    def run(
        self,
        script: str,
        *args: str,
        env: Mapping[str, str] | None = None,
        check: bool = True,
        timeout: float = 300,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``python script args`` in the repository with the test interpreter."""
        proc = subprocess.run(
            [sys.executable, script, *args],
            cwd=self.root,
            env={**os.environ, **GIT_ENV, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{script} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
        return proc

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``python -m flordb_build args`` in the repository."""
        proc = subprocess.run(
            [sys.executable, "-m", "flordb_build", *args],
            cwd=self.root,
            env={**os.environ, **GIT_ENV},
            stdin=subprocess.DEVNULL,  # `replay` reads its confirmation from stdin, a pipe too: give it none
            capture_output=True,
            text=True,
            timeout=300,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"flordb-build {args} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc


@pytest.fixture(autouse=True)
def no_lingering_warm_servers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replays in tests (and in the scripts they start) stop their warm servers when they end.

    tests/test_warm.py keeps servers up on purpose, and stops them itself.
    """
    monkeypatch.setenv("FLORDB_BUILD_REPLAY_KEEP_WARM", "0")


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Project]:
    """An empty git repository with one commit; the test process's cwd is its root."""
    root = tmp_path / "proj"
    root.mkdir()
    for key, value in GIT_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("FLORDB_BUILD_DB", raising=False)
    monkeypatch.delenv("FLOR_TASK", raising=False)
    monkeypatch.delenv("FLOR_PIPELINE_ID", raising=False)
    proj = Project(root)
    proj.git("init", "-q", "-b", "main")
    proj.write("README.md", "# test project\n")
    proj.commit_all("initial")
    monkeypatch.chdir(root)
    yield proj


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One real PostgreSQL for the session (tests/pg_server.py); skipped only where none is installed."""
    bin_dir = find_pg_bin()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries (initdb) on PATH or under /usr/lib/postgresql/*/bin")
    with running_server(bin_dir) as server:
        yield server
