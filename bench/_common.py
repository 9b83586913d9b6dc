"""Helpers shared by the benchmarks: the peer's venv, throwaway git repos, timed runs, the table.

Benchmarks compare flordb_build against a peer measured in the same run on the same machine,
report medians of repeats, and print one table of figures, ratios and targets.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent

#: The peer: the reference implementation, pinned, in a venv of its own so that its
#: dependencies (IPython, matplotlib, ...) never mix with ours.
FLORDB_VERSION = "4.0.1"
DEFAULT_FLORDB_VENV = BENCH_DIR / ".venv-flordb"
FLORDB_VENV_ENV_VAR = "FLORDB_BENCH_VENV"

GIT_ENV = {
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_AUTHOR_NAME": "Bench User",
    "GIT_AUTHOR_EMAIL": "bench@example.com",
    "GIT_COMMITTER_NAME": "Bench User",
    "GIT_COMMITTER_EMAIL": "bench@example.com",
}

# Variables that would redirect either tool's store or tag its runs; a benchmark must not
# inherit them from the shell it was started in.
_SCRUBBED_ENV = ("FLORDB_BUILD_DB", "FLOR_TASK", "FLOR_PIPELINE_ID", "PYTHONPATH", "VIRTUAL_ENV")


class BenchError(RuntimeError):
    """A benchmark could not set up or run a measurement."""


def bench_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment every measured subprocess gets: ours, scrubbed, plus git identity."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
    env.update(GIT_ENV)
    env.update(extra or {})
    return env


def venv_python(venv: Path) -> Path:
    """The interpreter of a venv."""
    return venv / "bin" / "python"


def installed_version(python: Path, dist: str) -> str | None:
    """The version of distribution ``dist`` installed for ``python``, or None."""
    if not python.exists():
        return None
    code = f"import importlib.metadata as m\ntry: print(m.version({dist!r}))\nexcept m.PackageNotFoundError: pass"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=bench_env())
    return out.stdout.strip() or None


def ensure_flordb_venv(venv: Path) -> Path:
    """Create ``venv`` with FlorDB pinned to FLORDB_VERSION unless it already has it; return its python."""
    python = venv_python(venv)
    if installed_version(python, "flordb") == FLORDB_VERSION:
        return python
    print(
        f"bench: installing flordb=={FLORDB_VERSION} into '{venv}' (one time, about a minute) ...", flush=True
    )
    if not python.exists():
        # The base interpreter, not a venv's, so that the peer's venv does not chain onto ours.
        base = getattr(sys, "_base_executable", sys.executable)
        _check_call([base, "-m", "venv", str(venv)], "create the FlorDB venv")
    _check_call(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            f"flordb=={FLORDB_VERSION}",
        ],
        f"install flordb=={FLORDB_VERSION}",
    )
    if installed_version(python, "flordb") != FLORDB_VERSION:
        raise BenchError(f"'{venv}' still lacks flordb=={FLORDB_VERSION}; delete the folder and run again.")
    return python


def _check_call(cmd: Sequence[str], what: str) -> None:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, env=bench_env())
    if proc.returncode != 0:
        raise BenchError(f"Could not {what} (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def make_git_repo(path: Path, files: Mapping[str, str] | None = None) -> Path:
    """A git repository on branch main whose one commit holds ``files`` (relative path -> text)."""
    path.mkdir(parents=True)
    for relpath, text in (files or {}).items():
        (path / relpath).write_text(text, encoding="utf-8")
    for args in (
        ["init", "-q", "-b", "main"],
        ["add", "-A"],
        ["commit", "-q", "--allow-empty", "-m", "initial"],
    ):
        _check_call(["git", "-C", str(path), *args], f"run git {args[0]} in '{path}'")
    return path


def run_timed(cmd: Sequence[str], cwd: Path, log_path: Path, env: Mapping[str, str] | None = None) -> float:
    """Run ``cmd`` in ``cwd`` with its output in ``log_path``; return wall seconds, raise if it failed."""
    with open(log_path, "wb") as log:
        start = time.perf_counter()
        proc = subprocess.run(list(cmd), cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
        seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log_path.read_bytes()[-3000:].decode("utf-8", "replace")
        raise BenchError(f"'{' '.join(cmd)}' exited {proc.returncode} in '{cwd}':\n{tail}")
    return seconds


def median(values: Sequence[float]) -> float:
    """The median of a non-empty sequence."""
    return statistics.median(values)


def spread(values: Sequence[float], scale: float = 1.0, digits: int = 2) -> str:
    """'min-max' of ``values`` times ``scale``, for the table's spread column."""
    return f"{min(values) * scale:.{digits}f}-{max(values) * scale:.{digits}f}"


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Print a plain-text table with aligned columns."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    print("  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True)))
    print(line)
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))


def peer_tree(rev: str, destination: Path) -> Path:
    """``flordb_build`` at ``rev`` (the peer a benchmark measures today's code against), extracted into ``destination`` (a directory for PYTHONPATH)."""
    archive = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "archive", rev, "flordb_build"], capture_output=True, check=True
    )
    destination.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(destination)], input=archive.stdout, check=True)
    return destination


def remove_tree(path: Path) -> None:
    """Delete a temporary tree, tolerating files that vanish on the way."""
    shutil.rmtree(path, ignore_errors=True)
