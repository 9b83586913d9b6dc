"""A store made by real runs for the UI, plot and graph tests.

``build_ui_project`` records, in a temporary git repository:

- two direct runs of ``train.py`` (lr 0.1, then lr 0.3 with a changed line) and one run through a
  doit pipeline (lr 0.5):
  ``loss`` per (epoch, step), ``val_acc`` per epoch, run-level ``final_acc``, a text value, a
  wide JSON list, checkpoints of the training state;
- a hindsight replay of today's ``val_loss`` (inside the epoch loop) into all three runs;
- two doit invocations of prep -> train -> report -> audit: the first executes every task, the
  second finds prep and train up to date, re-executes report and fails audit.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

from tests.conftest import GIT_ENV, Project

PY = sys.executable

TRAIN = """\
import time
import flordb_build as flor

lr = flor.arg("lr", 0.1)
epochs = flor.arg("epochs", 3)
state = {"w": 1.0}
with flor.checkpointing(state=state):
    for epoch in flor.loop("epoch", range(epochs)):
        for step in flor.loop("step", range(5)):
            state["w"] *= 1 - lr
            flor.log("loss", state["w"] + step / 100)
        time.sleep(0.05)  # epochs slow enough that every one is checkpointed
        flor.log("val_acc", round(1 - state["w"], 6))
flor.log("final_acc", round(1 - state["w"], 6))
flor.log("note", "lr " + str(lr))
flor.log("history", list(range(40)))
open("model.txt", "w").write(str(state["w"]))
"""
TRAIN_V2 = TRAIN.replace("flor.log(\"note\", \"lr \" + str(lr))", "flor.log(\"note\", \"v2, lr \" + str(lr))")
# Today's version: one more statement in the epoch loop, for hindsight logging.
TODAY = TRAIN_V2.replace(
    '        flor.log("val_acc", round(1 - state["w"], 6))\n',
    '        flor.log("val_acc", round(1 - state["w"], 6))\n        flor.log("val_loss", round(state["w"] * 2, 6))\n',
)

DODO = f"""
PY = {PY!r}

def task_prep():
    return {{"file_dep": ["raw.txt", "prep.py"], "targets": ["clean.txt"], "actions": [PY + " prep.py"]}}

def task_train():
    return {{"file_dep": ["clean.txt", "train.py"], "targets": ["model.txt"],
             "actions": [PY + " train.py --kwargs lr=0.5"]}}

def task_report():
    return {{"file_dep": ["model.txt", "report.py"], "targets": ["report.txt"], "actions": [PY + " report.py"]}}

def task_audit():
    return {{"file_dep": ["report.txt", "audit.py"], "actions": [PY + " audit.py"]}}
"""
PREP = "open('clean.txt', 'w').write(open('raw.txt').read().upper())\n"
REPORT = "open('report.txt', 'w').write('model ' + open('model.txt').read())\n"
AUDIT = "import os, sys\nsys.exit(1 if os.path.exists('fail.flag') else 0)\n"


@dataclass(frozen=True)
class UiProject:
    """The project and what it recorded."""

    project: Project
    direct_runs: tuple[str, str]  # lr 0.1, lr 0.3
    pipeline_run: str  # lr 0.5, task train
    pipelines: tuple[str, str]  # first (all executed), second (up-to-date, executed, failed)


def doit(project: Project) -> subprocess.CompletedProcess[str]:
    """Plain ``doit`` in the project, as a user runs it."""
    return subprocess.run(
        [PY, "-m", "doit"], cwd=project.root, env={**os.environ, **GIT_ENV}, capture_output=True, text=True, timeout=300
    )


def record_pipelines(project: Project, *, direct_runs: bool = True) -> list[str]:
    """Write the project, record the direct runs (when asked) and the two doit invocations.

    :returns: the pipeline ids, oldest first.
    """
    import flordb_build as flor

    project.write("train.py", TRAIN)
    project.write("dodo.py", DODO)
    project.write("prep.py", PREP)
    project.write("report.py", REPORT)
    project.write("audit.py", AUDIT)
    project.write("raw.txt", "a b c\n")
    project.write(".gitignore", ".doit.db*\n__pycache__/\nclean.txt\nmodel.txt\nreport.txt\nfail.flag\n")
    project.cli("init")
    project.commit_all("pipeline")
    if direct_runs:
        project.run("train.py", "--kwargs", "lr=0.1")
        project.write("train.py", TRAIN_V2)  # the second run ran other code: compare shows the change
        project.commit_all("train v2")
        project.run("train.py", "--kwargs", "lr=0.3")
    first = doit(project)
    assert first.returncode == 0, first.stdout + first.stderr
    project.write("report.py", REPORT.replace("'model '", "'model: '"))
    project.write("fail.flag", "")
    project.commit_all("report v2")
    second = doit(project)
    assert second.returncode != 0, "audit should fail in the second pipeline"
    return list(flor.query("SELECT pipeline_id FROM pipelines ORDER BY started")["pipeline_id"])


def build_ui_project(project: Project) -> UiProject:
    """Record the runs, the replay and the pipelines described in the module docstring."""
    import flordb_build as flor

    pipelines = record_pipelines(project)
    project.write("train.py", TODAY)
    project.commit_all("today: val_loss")
    replay = project.cli("replay", "val_loss", "--yes")
    assert "FAILED" not in replay.stdout, replay.stdout
    runs = flor.query("SELECT run_id, task FROM runs ORDER BY tstamp")
    direct = runs[runs["task"].isna()]["run_id"].tolist()
    piped = runs[runs["task"] == "train"]["run_id"].tolist()
    assert len(direct) == 2 and len(piped) == 1 and len(pipelines) == 2
    return UiProject(project, (direct[0], direct[1]), piped[0], (pipelines[0], pipelines[1]))
