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


# -- tables a person can read (issue 15) -------------------------------------------------------

TRAIN_ARGS = """
import flordb_build as flor
lr = flor.arg("lr", 0.1)
epochs = flor.arg("epochs", 2)
for epoch in flor.loop("epoch", range(epochs)):
    flor.log("loss", lr / (epoch + 1))
flor.log("final_acc", 1 - lr)
flor.log("history", list(range(40)))
"""
WAIT = """
import sys
import flordb_build as flor
flor.log("started", 1)
print("ready", flush=True)
sys.stdin.readline()
"""


def test_version(project: Project) -> None:
    assert project.cli("--version").stdout.strip() == "flordb-build 0.1.0"


@pytest.mark.parametrize("command", ["runs", "dataframe", "query", "pipelines", "tasks", "diff"])
def test_every_data_command_has_the_three_formats(project: Project, command: str) -> None:
    assert "{table,csv,json}" in project.cli(command, "--help").stdout


def test_runs_shows_args_and_final_values_and_filters(project: Project) -> None:
    project.write("train.py", TRAIN_ARGS)
    project.run("train.py", "--kwargs", "lr=0.5")
    project.run("train.py", "--kwargs", "lr=0.2", "epochs=3")
    table = project.cli("runs").stdout.splitlines()
    header = table[0].split()
    fixed = ["run_id", "tstamp", "task", "filename", "status", "seconds", "exit_code", "snapshot"]
    assert header == [*fixed, "lr", "epochs", "final_acc", "history"]
    records = json.loads(project.cli("runs", "--format", "json").stdout)
    assert [(r["lr"], r["epochs"], r["final_acc"]) for r in records] == [(0.2, 3, 0.8), (0.5, 2, 0.5)]  # newest first
    assert records[0]["history"] == list(range(40))  # never cut in json
    assert "…" in table[1] and "[0,1,2,3" in table[1]  # cut in the table
    csv = project.cli("runs", "--format", "csv").stdout
    assert '"[0, 1, 2, 3' in csv and "…" not in csv
    picked = json.loads(project.cli("runs", "--where", "lr > 0.3", "--format", "json").stdout)
    assert [r["lr"] for r in picked] == [0.5]
    assert json.loads(project.cli("runs", "--status", "failed", "--format", "json").stdout) == []
    assert project.cli("runs", "--task", "nope").stdout.strip() == "(no runs match)"


def test_integers_stay_integers_and_missing_prints_one_way(project: Project) -> None:
    project.write("train.py", TRAIN_ARGS)
    project.run("train.py")
    project.write("wait.py", WAIT)
    waiting = subprocess.Popen([sys.executable, "wait.py"], cwd=project.root, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    assert waiting.stdout is not None and waiting.stdout.readline().strip() == "ready"
    waiting.kill()  # dies running: no exit code, no seconds
    waiting.wait(timeout=60)
    waiting.stdout.close()
    assert waiting.stdin is not None
    waiting.stdin.close()
    runs = project.cli("runs").stdout.splitlines()
    killed = next(line for line in runs if "wait.py" in line)
    assert " killed " in killed and " -  " in killed
    ok = next(line for line in runs if "train.py" in line)
    assert " 0 " in ok and " 0.0 " not in ok  # the exit code column stays integer with a NULL in it
    records = json.loads(project.cli("query", "SELECT exit_code FROM runs ORDER BY tstamp", "--format", "json").stdout)
    assert records == [{"exit_code": 0}, {"exit_code": None}]
    out = project.cli("query", "SELECT filename, exit_code, seconds, NULL AS absent FROM runs ORDER BY tstamp").stdout
    assert out.splitlines()[2].split() == ["wait.py", "-", "-", "-"]  # NA, NaN and None print alike
    assert out.splitlines()[1].split()[:2] == ["train.py", "0"]  # flor.query keeps the column integer
    import flordb_build as flor

    assert str(flor.query("SELECT exit_code FROM runs")["exit_code"].dtype) == "Int64"
    frame = project.cli("dataframe", "loss", "started").stdout
    for spelling in ("NaN", "None", "<NA>", "NaT", "nan"):
        assert spelling not in frame and spelling not in out


def test_dataframe_limit_and_columns(project: Project) -> None:
    project.write("train.py", TRAIN_ARGS)
    project.run("train.py", "--kwargs", "epochs=5")
    lines = project.cli("dataframe", "loss", "--limit", "2", "--columns", "epoch,loss").stdout.splitlines()
    assert lines[0].split() == ["epoch", "loss"] and len(lines) == 3
    proc = project.cli("dataframe", "loss", "--columns", "epoch,nope", check=False)
    assert proc.returncode == 1 and "No column 'nope'" in proc.stderr and "epoch" in proc.stderr
