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


REPLAYABLE = """
import flordb_build as flor
state = {"w": 0}
with flor.checkpointing(state=state):
    for epoch in flor.loop("epoch", range(3)):
        state["w"] += epoch + 1
        flor.log("val", state["w"])
flor.log("final", state["w"])
"""


def _delete_database(project: Project) -> None:
    for suffix in ("", "-wal", "-shm"):
        (project.root / ".flor" / f"flor.db{suffix}").unlink(missing_ok=True)


def test_rebuild_keeps_replayed_values_and_environments(project: Project) -> None:
    project.write("train.py", REPLAYABLE)
    project.commit_all("recorded version")
    project.run("train.py")
    today = REPLAYABLE.replace('flor.log("val", state["w"])', 'flor.log("val", state["w"])\n        flor.log("w2", state["w"] * 2)')
    project.write("train.py", today + 'flor.log("fin2", state["w"] + 1)\n')
    project.commit_all("today")
    head = project.git("rev-parse", "HEAD")
    flor.replay("w2", quiet=True)
    flor.replay("fin2", quiet=True)  # a second replay of the run: its journal holds both names
    assert project.git("rev-parse", "HEAD") == head and project.git("status", "--porcelain") == ""
    before = flor.dataframe("val", "w2", "fin2")
    assert before["w2"].tolist() == [2, 6, 12] and before["fin2"].tolist() == [7, 7, 7]
    envs_before = flor.query("SELECT env_id, env FROM envs ORDER BY env_id")
    assert len(envs_before) == 1

    _delete_database(project)
    project.cli("rebuild")
    pd.testing.assert_frame_equal(flor.dataframe("val", "w2", "fin2"), before)
    pd.testing.assert_frame_equal(flor.query("SELECT env_id, env FROM envs ORDER BY env_id"), envs_before)
    replayed = flor.query("SELECT COUNT(*) AS n FROM logs WHERE source = 'replay'")["n"][0]
    assert replayed == 4  # 3 x w2 + fin2: the newest journal replaced the first, nothing doubled

    # Replaying a name again replaces its values, in the store and after another rebuild.
    project.write("train.py", (today + 'flor.log("fin2", state["w"] + 1)\n').replace("state[\"w\"] * 2", "state[\"w\"] * 3"))
    project.commit_all("today, w2 redefined")
    flor.replay("w2", quiet=True)
    _delete_database(project)
    project.cli("rebuild")
    after = flor.dataframe("val", "w2", "fin2")
    assert after["w2"].tolist() == [3, 9, 18] and after["fin2"].tolist() == [7, 7, 7]
