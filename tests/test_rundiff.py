"""``flordb-build diff`` shows what the runs logged (metrics, last and best of loop values) beside
args, packages and code, and one interpreter spelled two ways is no difference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import flordb_build as flor
from flordb_build.rundiff import diff_runs
from tests.conftest import GIT_ENV, Project

TRAIN = """
import flordb_build as flor
lr = flor.arg("lr", 0.1)
labels = flor.arg("labels", 0)
for epoch in flor.loop("epoch", range(3)):
    for step in flor.loop("step", range(2)):
        flor.log("loss", 1 / (1 + epoch * lr + step))
    flor.log("val_acc", round(0.5 + epoch * lr, 3))
flor.log("best_val_acc", round(0.5 + 2 * lr, 3))
flor.log("n_human_labels", labels)
"""


def test_diff_shows_values_and_loop_summaries_marking_changes(project: Project) -> None:
    project.write("train.py", TRAIN)
    project.commit_all("train")
    project.run("train.py", "--kwargs", "lr=0.1", "labels=0")
    project.run("train.py", "--kwargs", "lr=0.2", "labels=100")
    a, b = flor.query("SELECT run_id FROM runs ORDER BY tstamp")["run_id"]
    diff = diff_runs(a, b)
    assert diff.args == {"labels": (0, 100), "lr": (0.1, 0.2)}
    assert diff.values == {"best_val_acc": (0.7, 0.9), "n_human_labels": (0, 100)}
    assert diff.a.values == {"best_val_acc": 0.7, "n_human_labels": 0} and diff.b.loops["val_acc"].last == 0.9
    loss_a, loss_b = diff.loops["loss"]
    assert loss_a is not None and loss_b is not None
    assert (loss_a.points, loss_a.best_is_min, loss_a.best) == (6, True, min(1 / (1 + e * 0.1 + s) for e in range(3) for s in range(2)))
    assert diff.loops["val_acc"][1] is not None and diff.loops["val_acc"][1].best_is_min is False
    out = project.cli("diff", a, b).stdout
    assert "  * best_val_acc: 0.7 -> 0.9" in out
    assert "  * val_acc: last 0.7, best (max) 0.7 (3 points) -> last 0.9, best (max) 0.9 (3 points)" in out
    assert "  * loss: last " in out and "best (min)" in out
    assert "  * labels: 0 -> 100" in out
    assert "code: same" in out and "packages: same" in out
    rows = json.loads(project.cli("diff", a, b, "--format", "json").stdout)
    changed = {(r["section"], r["name"]) for r in rows if r["changed"]}
    assert {("values", "best_val_acc"), ("args", "lr"), ("loops", "val_acc.last")} <= changed
    assert ("loops", "loss.points") not in changed


def test_python_and_python3_of_one_environment_are_the_same_interpreter(project: Project) -> None:
    bin_dir = Path(sys.executable).parent
    spellings = [bin_dir / n for n in ("python", "python3")]
    assert all(p.exists() for p in spellings), f"this test needs both python and python3 in {bin_dir}"
    project.write("train.py", TRAIN)
    project.commit_all("train")
    for interpreter in spellings:
        subprocess.run([str(interpreter), "train.py"], cwd=project.root, env={**os.environ, **GIT_ENV},
                       capture_output=True, text=True, check=True, timeout=300)
    a, b = flor.query("SELECT run_id FROM runs ORDER BY tstamp")["run_id"].tolist()
    executables = [diff_runs(a, b).a.env, diff_runs(a, b).b.env]
    assert [Path(e["python"]["executable"]).name for e in executables if e] == ["python", "python3"]
    diff = diff_runs(a, b)
    assert diff.environment == {} and diff.identical
    assert "environment: same" in project.cli("diff", a, b).stdout
