"""The flordb-build command line: help, formats, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Project

TRAIN = """
import flordb_build as flor
for epoch in flor.loop("epoch", range(2)):
    flor.log("loss", 1.0 / (epoch + 1))
"""


@pytest.mark.parametrize("command", ["runs", "dataframe", "query", "rebuild"])
def test_every_command_has_help(project: Project, command: str) -> None:
    proc = project.cli(command, "--help")
    assert proc.stdout.startswith("usage: flordb-build " + command)
    assert len(proc.stdout.splitlines()) > 3


def test_console_script_and_module_agree(project: Project) -> None:
    script = shutil.which("flordb-build", path=str(Path(sys.executable).parent))
    assert script is not None
    proc = subprocess.run([script, "--help"], capture_output=True, text=True, check=True)
    assert "runs" in proc.stdout and "dataframe" in proc.stdout and "rebuild" in proc.stdout


def test_dataframe_formats(project: Project) -> None:
    project.write("train.py", TRAIN)
    project.run("train.py")
    table = project.cli("dataframe", "loss").stdout
    assert "epoch" in table.splitlines()[0] and len(table.splitlines()) == 3
    csv = project.cli("dataframe", "loss", "--format", "csv").stdout.splitlines()
    assert csv[0] == "projid,run_id,tstamp,task,filename,epoch,loss" and len(csv) == 3
    records = json.loads(project.cli("dataframe", "loss", "--format", "json", "--where", "epoch = 1").stdout)
    assert [(r["epoch"], r["loss"]) for r in records] == [(1, 0.5)]
    latest = project.cli("dataframe", "loss", "--latest", "--format", "csv").stdout.splitlines()
    assert len(latest) == 3


def test_runs_and_query(project: Project) -> None:
    project.write("train.py", TRAIN)
    project.run("train.py")
    runs = project.cli("runs").stdout
    assert "train.py" in runs and " ok " in runs
    out = project.cli("query", "SELECT count(*) AS n FROM logs WHERE name = ?", "--param", "loss", "--format", "json")
    assert json.loads(out.stdout) == [{"n": 2}]


def test_errors_are_one_line_with_exit_code_1(project: Project) -> None:
    project.write("train.py", TRAIN)
    project.run("train.py")
    for args in (("query", "DELETE FROM logs"), ("dataframe", "loss", "--where", "1; DROP TABLE runs")):
        proc = project.cli(*args, check=False)
        assert proc.returncode == 1
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("flordb-build: error:")


def test_usage_errors_exit_2(project: Project) -> None:
    assert project.cli("no-such-command", check=False).returncode == 2
    assert project.cli("dataframe", "--format", "xml", check=False).returncode == 2
    assert project.cli(check=False).returncode == 2


RUNAWAY = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"


def wait_for(condition: Callable[[], bool], timeout: float = 120.0) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (``/proc/<pid>/stat`` fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def has_open(pid: int, path: Path) -> bool:
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd) == str(path):
                return True
        except FileNotFoundError:
            continue
    return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to see the query running")
def test_ctrl_c_stops_a_runaway_query_with_exit_130_and_one_line(project: Project) -> None:
    project.write("train.py", TRAIN)
    project.run("train.py")
    db = project.root / ".flor" / "flor.db"
    proc = subprocess.Popen(
        [sys.executable, "-m", "flordb_build", "query", RUNAWAY, "--timeout", "0"],
        cwd=project.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_for(lambda: has_open(proc.pid, db))  # the store is open: the query is about to run
        started = cpu_seconds(proc.pid)
        wait_for(lambda: cpu_seconds(proc.pid) - started >= 0.5)  # and it has been running for a while
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130
    assert err.strip().splitlines() == ["flordb-build: interrupted"]


def test_query_and_where_timeouts_are_one_line_errors(project: Project) -> None:
    project.write("train.py", TRAIN)
    project.run("train.py")
    proc = project.cli("query", RUNAWAY, "--timeout", "0.2", check=False)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert "stopped after its timeout of 0.2 s" in proc.stderr
    heavy = "length(replace(printf('%.*c', 20000000 + epoch, 'x'), 'x', 'y')) > epoch"
    proc = project.cli("dataframe", "loss", "--where", heavy, "--timeout", "0.001", check=False)
    assert proc.returncode == 1 and "stopped after its timeout of 0.001 s" in proc.stderr
    assert project.cli("query", "SELECT 1", "--timeout", "soon", check=False).returncode == 2


def test_blobs_print_as_hex_in_every_format(project: Project) -> None:
    project.write("train.py", TRAIN)
    project.run("train.py")
    sql = "SELECT x'ff00fe' AS b, 'text' AS t"
    assert json.loads(project.cli("query", sql, "--format", "json").stdout) == [{"b": "FF00FE", "t": "text"}]
    assert project.cli("query", sql, "--format", "csv").stdout.splitlines() == ["b,t", "FF00FE,text"]
    assert "FF00FE" in project.cli("query", sql).stdout
