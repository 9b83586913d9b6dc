"""End-to-end hindsight logging: record old versions, add statements today, replay, query.

Every replay here runs the recorded versions in real subprocesses from their snapshot commits,
restoring real checkpoints from the project's object store.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import flordb_build as flor
from flordb_build.errors import ExpressionError, ReplayError

# One script, three recorded versions that update `w` differently. The step body appends to
# MARKER, so a replay that runs any nested-loop body leaves a trace.
SCRIPT = """\
import os
import time
import flordb_build as flor

state = {{"w": 0}}
scale = flor.arg("scale", 1)
with flor.checkpointing(state=state):
    for epoch in flor.loop("epoch", range(3)):
        for step in flor.loop("step", range(4)):
            {update}
            time.sleep(0.02)
            with open(os.environ["MARKER"], "a") as fh:
                fh.write("x")
        flor.log("val", state["w"])
flor.log("final", state["w"])
"""
UPDATES = ('state["w"] += 1 * scale', 'state["w"] += 2 * scale', 'state["w"] += step * scale')

TODAY = """\
import os
import time
import flordb_build as flor

state = {"w": 0}
scale = flor.arg("scale", 1)
with flor.checkpointing(state=state):
    for epoch in flor.loop("epoch", range(3)):
        for step in flor.loop("step", range(4)):
            state["w"] += 3 * step * scale  # today's update differs from every recorded one
            time.sleep(0.02)
            with open(os.environ["MARKER"], "a") as fh:
                fh.write("x")
            flor.log("sq", state["w"] * 10 + step)
        flor.log("w2", state["w"] * 2)
        flor.log("val", state["w"])
flor.log("final", state["w"])
flor.log("fin2", state["w"] + 1)
"""


@pytest.fixture
def recorded(project: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Three recorded versions of train.py (scale=2 for the last), then today's version written."""
    marker = tmp_path / "marker"
    monkeypatch.setenv("MARKER", str(marker))
    # Every epoch checkpointed, both points: the adaptive rule decides by measured time, and on a
    # loaded machine it left an epoch without its nested point, which then ran its loop in full.
    project.write("pyproject.toml", "[tool.flordb_build]\ncheckpoint_every = 1\n")
    for i, update in enumerate(UPDATES):
        project.write("train.py", SCRIPT.format(update=update))
        project.commit_all(f"version {i}")
        project.run("train.py", *(["--kwargs", "scale=2"] if i == 2 else []))
    project.write("train.py", TODAY)
    project.commit_all("today")
    project.marker = marker
    return project


def _marks(project: Any) -> int:
    return len(project.marker.read_text()) if project.marker.exists() else 0


def test_validation_and_suffix_replay_fill_old_runs_without_running_nested_loops(recorded: Any) -> None:
    project = recorded
    assert _marks(project) == 36  # 3 runs x 12 step bodies while recording
    status_before = project.git("status", "--porcelain")
    today_before = (project.root / "train.py").read_text()
    head_before = project.git("rev-parse", "HEAD")

    plan = project.cli("replay", "w2", "fin2", "--dry-run").stdout
    table, _, placements = plan.partition("\nplaced:")
    assert table.count("validation") == 3 and "total estimate" in table
    # the dry run shows, per run and version, each statement's line in that version and its anchor
    placed = [line for line in plan.splitlines() if line.startswith("placed:")]
    assert len(placed) == 6, plan
    w2 = [line for line in placed if "'w2'" in line]
    assert len(w2) == 3 and all(
        "at train.py:14 (validation), flor.loop 'epoch', after `flor.loop 'step'`; before `flor.log(\"val\"" in line
        for line in w2
    ), w2
    assert all("at train.py:17 (suffix), module level, after `flor.log(\"final\", state[\"w\"])`" in line
               for line in placed if "'fin2'" in line), placed
    diff = project.cli("replay", "fin2", "--dry-run", "--diff").stdout
    assert diff.count("(recorded)") == 3 and diff.count('\n+flor.log("fin2", state["w"] + 1)') == 3, diff
    assert _marks(project) == 36

    done = project.cli("replay", "w2", "fin2", "--yes")
    assert "estimated" in done.stdout and "actual" in done.stdout and "FAILED" not in done.stdout
    assert _marks(project) == 36, "a nested loop body ran during a validation replay"

    df = flor.dataframe("val", "w2", "final", "fin2")
    assert len(df) == 9
    assert (df["w2"] == 2 * df["val"]).all()
    assert (df["fin2"] == df["final"] + 1).all()
    # Each run replayed its own version's code: finals 12 (+1), 24 (+2) and 2*(0+1+2+3)*3 = 36 (+step*2).
    assert sorted(df.groupby("run_id")["final"].first().tolist()) == [12, 24, 36]
    conn = sqlite3.connect(project.root / ".flor" / "flor.db")
    sources = dict(conn.execute("SELECT name, COUNT(*) FROM logs WHERE source = 'replay' GROUP BY name").fetchall())
    assert sources == {"w2": 9, "fin2": 3}
    run_rows = conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
    conn.close()
    assert run_rows == 3  # replay adds no runs
    assert project.git("status", "--porcelain") == status_before
    assert (project.root / "train.py").read_text() == today_before
    assert project.git("rev-parse", "HEAD") == head_before

    # Replaying again replaces the earlier replayed values instead of adding to them.
    project.cli("replay", "w2", "--yes")
    conn = sqlite3.connect(project.root / ".flor" / "flor.db")
    assert conn.execute("SELECT COUNT(*) FROM logs WHERE source = 'replay' AND name = 'w2'").fetchone()[0] == 9
    conn.close()


def test_range_replay_with_two_workers_equals_a_fresh_run_of_each_version(recorded: Any) -> None:
    project = recorded
    report = flor.replay("sq", workers=2, quiet=True)
    assert [len(r.segments) for r in report.plan.runs] == [2, 2, 2]
    assert {r.depth.value for r in report.plan.runs} == {"range"}
    assert report.ok and all(o.stored == 12 for o in report.outcomes)
    replayed = flor.dataframe("sq")
    # A fresh execution of each old version with the new statement: run the patched source as is.
    for i, run in enumerate(report.plan.runs):
        project.write(f"fresh_{i}.py", run.source)
        project.run(f"fresh_{i}.py", *(["--kwargs", f"scale={run.args['scale']}"]))
        fresh = flor.dataframe("sq")
        fresh = fresh[fresh["filename"] == f"fresh_{i}.py"]
        mine = replayed[replayed["run_id"] == run.run_id]
        assert fresh[["epoch", "step", "sq"]].values.tolist() == mine[["epoch", "step", "sq"]].values.tolist()
        assert len(mine) == 12


def test_validation_replay_with_two_workers_fills_every_epoch_without_nested_loops(recorded: Any) -> None:
    project = recorded
    report = flor.replay("w2", workers=2, quiet=True)
    assert [len(r.segments) for r in report.plan.runs] == [2, 2, 2]
    assert {r.depth.value for r in report.plan.runs} == {"validation"}
    assert report.ok and report.mismatches == ()
    assert _marks(project) == 36, "a nested loop body ran during a validation replay"
    df = flor.dataframe("val", "w2")
    assert len(df) == 9 and (df["w2"] == 2 * df["val"]).all()


def test_prefix_replay_stops_at_the_main_loop(recorded: Any) -> None:
    project = recorded
    today = (project.root / "train.py").read_text().replace(
        'scale = flor.arg("scale", 1)\n',
        'scale = flor.arg("scale", 1)\nflor.log("doubled", scale * 2)\nflor.log("dev", flor.arg("device", "meta"))\n',
    )
    project.write("train.py", today)
    report = flor.replay("doubled", "dev", device="cpu", quiet=True)
    assert {r.depth.value for r in report.plan.runs} == {"prefix"}
    assert _marks(project) == 36
    df = flor.dataframe("doubled", "dev")
    assert sorted(df["doubled"].tolist()) == [2, 2, 4]  # the recorded scale=2 came back as the arg
    assert df["dev"].tolist() == ["cpu"] * 3  # --device sets the device arg the script declares


def test_unknown_names_bad_where_and_missing_snapshots_are_reported(recorded: Any) -> None:
    project = recorded
    bad = project.cli("replay", "no_such_name", "--yes", check=False)
    assert bad.returncode == 1
    assert bad.stderr.strip().count("\n") == 0 and "'no_such_name'" in bad.stderr
    where = project.cli("replay", "w2", "--where", "1=1; DROP TABLE runs", "--yes", check=False)
    assert where.returncode == 1 and where.stderr.strip().count("\n") == 0 and "where" in where.stderr
    none = project.cli("replay", "w2", "--where", "tstamp < '2000-01-01'", "--yes", check=False)
    assert none.returncode == 1 and "No recorded run matches" in none.stderr
    piped = project.cli("replay", "w2", check=False)  # stdin is not a terminal and no --yes
    assert piped.returncode == 1 and "--yes" in piped.stderr

    with pytest.raises(ExpressionError):
        flor.replay("w2", where="epoch >", dry_run=True, quiet=True)
    with pytest.raises(ReplayError, match="does not log 'nope'"):
        flor.replay("nope", dry_run=True, quiet=True)

    conn = sqlite3.connect(project.root / ".flor" / "flor.db")
    first = conn.execute("SELECT run_id FROM runs ORDER BY tstamp LIMIT 1").fetchone()[0]
    conn.execute("UPDATE runs SET snapshot = ? WHERE run_id = ?", ("f" * 40, first))
    conn.commit()
    conn.close()
    out = project.cli("replay", "w2", "--yes")
    assert f"skip: run {first}" in out.stdout and "no longer exists" in out.stdout
    df = flor.dataframe("w2")
    assert df[df["run_id"] == first]["w2"].isna().all()
    assert df[df["run_id"] != first]["w2"].notna().sum() == 6


def test_a_nondeterministic_script_is_reported(project: Any) -> None:
    project.write(
        "noisy.py",
        """\
        import os
        import flordb_build as flor

        state = {"w": 0.0}
        with flor.checkpointing(state=state):
            for epoch in flor.loop("epoch", range(2)):
                for step in flor.loop("step", range(2)):
                    state["w"] += 1.0
                # the OS's entropy: unlike a random module, no restored generator state reproduces it
                flor.log("val", state["w"] + int.from_bytes(os.urandom(4), "big") / 2**32)
        """,
    )
    project.commit_all("noisy")
    project.run("noisy.py")
    text = (project.root / "noisy.py").read_text().replace(
        '        flor.log("val"', '        flor.log("half", state["w"] / 2)\n        flor.log("val"'
    )
    project.write("noisy.py", text)
    out = project.cli("replay", "half", "--yes", check=False)
    assert "warning: nondeterminism" in out.stdout and "'val' differs in 2 of 2" in out.stdout
    assert out.returncode == 1 and flor.dataframe("half").empty  # withheld: tests/test_replay_refusals.py
    out = project.cli("replay", "half", "--yes", "--accept-divergent")
    assert "warning: nondeterminism" in out.stdout and "'val' differs in 2 of 2" in out.stdout
    assert flor.dataframe("half")["half"].tolist() == [1.0, 2.0]


def test_doit_replay_command_after_init(recorded: Any) -> None:
    project = recorded
    project.cli("init", "--doit-config", "pyproject.toml")
    text = (project.root / "pyproject.toml").read_text()
    assert 'replay = "flordb_build.hindsight:ReplayCommand"' in text
    project.commit_all("configure doit")
    out = subprocess.run(
        [sys.executable, "-m", "doit", "replay", "fin2", "--yes", "--cold"], cwd=project.root, capture_output=True,
        text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "suffix" in out.stdout
    starts = [line.split()[2] for line in out.stdout.splitlines() if line.split()[1:2] == ["ok"]]
    assert starts == ["cold"] * 3  # --cold: three fresh interpreters, no warm server
    assert sorted(flor.dataframe("fin2")["fin2"].tolist()) == [13, 25, 37]


ASOF_TRAIN = """\
import flordb_build as flor

labels = len(flor.dataframe("label"))
runs = int(flor.query("SELECT COUNT(*) AS n FROM runs")["n"][0])
state = {"w": 0}
with flor.checkpointing(state=state):
    for epoch in flor.loop("epoch", range(2)):
        state["w"] += labels
        flor.log("val", state["w"])
flor.log("seen", labels)
"""


def test_a_replayed_script_reads_the_store_as_its_run_did(project: Any) -> None:
    # Round 1 trains on one label run, round 2 on two. Replayed today (both label runs recorded),
    # each training must still see only what existed when it started.
    project.write("labels.py", 'import flordb_build as flor\nflor.log("label", 1)\n')
    project.write("train.py", ASOF_TRAIN)
    project.commit_all("pipeline")
    for script in ("labels.py", "train.py", "labels.py", "train.py"):
        project.run(script)
    project.write("train.py", ASOF_TRAIN + 'flor.log("labels_now", labels)\nflor.log("runs_now", runs)\n')
    project.commit_all("today")

    report = flor.replay("labels_now", "runs_now", where="filename = 'train.py'", quiet=True)
    assert report.ok and len(report.outcomes) == 2
    assert report.mismatches == (), "the replay saw labels the recorded run could not have seen"
    df = flor.dataframe("seen", "labels_now", "runs_now")
    assert df["seen"].tolist() == [1, 2] and df["labels_now"].tolist() == [1, 2]
    assert df["runs_now"].tolist() == [1, 3]  # runs that had ended: L1; then L1, T1, L2
    # Outside a replay the store reads as it is.
    assert len(flor.dataframe("label")) == 2 and len(flor.query("SELECT run_id FROM runs")) == 4


HELPER = """\
class Scaler:
    def __init__(self, factor):
        self.factor = factor

    def apply(self, w):
        out = w * self.factor
        return out
"""
HELPER_TODAY = """\
import flordb_build as flor


class Scaler:
    def __init__(self, factor):
        self.factor = factor
        flor.log("factor", factor)

    def apply(self, w):
        out = w * self.factor
        flor.log("scaled", out)
        return out
"""
MAIN = """\
import flordb_build as flor
from helper import Scaler

state = {"w": 0}
scaler = Scaler(3)
with flor.checkpointing(state=state):
    for epoch in flor.loop("epoch", range(2)):
        state["w"] += 1
        flor.log("val", scaler.apply(state["w"]))
"""


def test_statements_in_an_imported_module_are_replayed_where_the_script_calls_them(project: Any) -> None:
    project.write("helper.py", HELPER)
    project.write("main.py", MAIN)
    project.commit_all("recorded")
    project.run("main.py")
    project.write("helper.py", HELPER_TODAY)
    project.commit_all("today")
    plan = project.cli("replay", "scaled", "factor", "--dry-run", "--diff").stdout
    assert "at helper.py:5 (prefix), function 'Scaler.__init__'" in plan, plan
    assert "at helper.py:9 (validation), function 'Scaler.apply'" in plan, plan
    assert '+        flor.log("scaled", out)' in plan and "helper.py @ " in plan
    project.cli("replay", "scaled", "factor", "--yes")
    frame = flor.dataframe("val", "scaled")
    assert frame["scaled"].tolist() == frame["val"].tolist() == [3, 6]
    assert flor.dataframe("factor")["factor"].tolist() == [3]
    assert (project.root / "helper.py").read_text() == HELPER_TODAY  # the work tree is untouched


PLAIN = """\
import sys
import flordb_build as flor

state = {"w": 0}
with flor.checkpointing(state=state):
    for epoch in flor.loop("epoch", range(3)):
        state["w"] += epoch
        flor.log("val", state["w"])
"""


def test_restoring_a_checkpoint_of_a_script_without_torch_does_not_import_torch(project: Any) -> None:
    # Deciding the device for `auto` imported torch in every replay that restored a checkpoint: over a
    # second per process for a script that never uses it (and a GPU context for nothing).
    pytest.importorskip("torch")  # installed: otherwise this test could not tell
    project.write("pyproject.toml", "[tool.flordb_build]\ncheckpoint_every = 1\n")
    project.write("train.py", PLAIN)
    project.commit_all("plain")
    project.run("train.py")
    project.write("train.py", PLAIN + 'flor.log("torch_loaded", "torch" in sys.modules)\n')
    project.commit_all("today")
    done = project.cli("replay", "torch_loaded", "--yes")
    assert "FAILED" not in done.stdout, done.stdout
    frame = flor.dataframe("torch_loaded")
    assert frame["torch_loaded"].tolist() == [False]
