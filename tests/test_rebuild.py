"""The database is a cache of the snapshot commits: delete it, rebuild it, get the same frames."""

from __future__ import annotations

import pandas as pd

import flordb_build as flor
from tests.conftest import Project

TRAIN = """
import flordb_build as flor
lr = flor.arg("lr", 0.1)
for epoch in flor.loop("epoch", range(3)):
    for step in flor.loop("step", range(4)):
        flor.log("loss", lr / (1 + epoch * 4 + step))
    flor.log("val_acc", 0.5 + epoch / 10)
flor.log("done", True)
"""


def test_rebuild_after_deleting_the_database(project: Project) -> None:
    project.write("train.py", TRAIN)
    project.run("train.py")
    project.run("train.py", "--kwargs", "lr=0.2", env={"FLOR_TASK": "train"})
    before = {name: flor.dataframe(*names) for name, names in {"a": ("loss", "val_acc"), "b": ()}.items()}
    runs_before = flor.query("SELECT run_id, tstamp, task, filename, status, args, snapshot FROM runs ORDER BY tstamp")

    for suffix in ("", "-wal", "-shm"):
        (project.root / ".flor" / f"flor.db{suffix}").unlink(missing_ok=True)
    assert flor.dataframe("loss").empty

    out = project.cli("rebuild").stdout
    assert "2 runs" in out and "loop contexts" in out

    for name, names in {"a": ("loss", "val_acc"), "b": ()}.items():
        pd.testing.assert_frame_equal(flor.dataframe(*names), before[name])
    runs_after = flor.query("SELECT run_id, tstamp, task, filename, status, args, snapshot FROM runs ORDER BY tstamp")
    pd.testing.assert_frame_equal(runs_after, runs_before)


def test_rebuild_without_snapshots_is_a_clear_error(project: Project) -> None:
    proc = project.cli("rebuild", check=False)
    assert proc.returncode == 1 and "flor.shadow" in proc.stderr
