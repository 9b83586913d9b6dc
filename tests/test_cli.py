"""The flordb-build command line: help, formats, exit codes, one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
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
