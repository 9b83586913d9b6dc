"""A replay child starts through its own entry point (hindsight/_child.py), cold and warm alike.

``import flordb_build`` in an ordinary script never looks at replay: the replay spec in the
environment (FLOR_REPLAY) does nothing to a script started as ``python script.py``; only a process
started as ``python -m flordb_build.hindsight._child script.py`` replays. Inside it, the script
runs as ``python script.py`` would run it: as ``__main__``, with its own argv and its directory
first on ``sys.path``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import flordb_build as flor
from flordb_build.replaying import REPLAY_ENV

# Writes where it ran from and as what, once per process, then logs as a training script would.
SCRIPT = """\
import json, os, sys
import flordb_build as flor

where = {"name": __name__, "argv0": sys.argv[0], "path0": sys.path[0], "file": __file__}
with open(os.environ["WHERE"], "a") as fh:
    fh.write(json.dumps(where) + "\\n")
state = {"w": 0}
with flor.checkpointing(state=state):
    for epoch in flor.loop("epoch", range(3)):
        state["w"] += epoch + 1
        flor.log("w", state["w"])
"""


def test_a_replay_spec_in_the_environment_does_not_make_an_ordinary_script_replay(project: Any) -> None:
    """Before the entry point, any process with FLOR_REPLAY set replayed (and a bad spec crashed it)."""
    project.write("train.py", "import flordb_build as flor\nflor.log('x', 1)\n")
    proc = project.run("train.py", env={REPLAY_ENV: '{"not": "a replay spec"}'}, check=False)
    assert proc.returncode == 0, proc.stderr
    assert flor.dataframe("x")["x"].tolist() == [1]  # recorded as a new run, not replayed into one


def test_the_child_entry_point_refuses_to_run_without_a_replay_spec(project: Any) -> None:
    project.write("train.py", "print('ran')\n")
    proc = subprocess.run(
        [sys.executable, "-m", "flordb_build.hindsight._child", "train.py"],
        cwd=project.root, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0 and "ran" not in proc.stdout
    assert REPLAY_ENV in proc.stderr and "flordb-build replay" in proc.stderr


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
def test_a_replayed_script_runs_as_python_script_py_would(
    project: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, warm: bool
) -> None:
    where = tmp_path / "where.jsonl"
    monkeypatch.setenv("WHERE", str(where))
    project.write("sub/train.py", SCRIPT)
    project.commit_all("train")
    project.run("sub/train.py")
    recorded = [json.loads(line) for line in where.read_text().splitlines()]
    project.write("sub/train.py", SCRIPT.replace('flor.log("w", state["w"])',
                                                 'flor.log("w", state["w"])\n        flor.log("w3", state["w"] * 3)'))
    project.commit_all("today")
    where.unlink()

    report = flor.replay("w3", quiet=True, warm=warm)

    assert [o.ok for o in report.outcomes] == [True], report
    assert [o.warm for o in report.outcomes] == [warm]
    assert flor.dataframe("w3")["w3"].tolist() == [3, 9, 18]
    replayed = [json.loads(line) for line in where.read_text().splitlines()]
    assert len(replayed) == 1
    child, original = replayed[0], recorded[0]
    assert child["name"] == "__main__"
    assert Path(child["argv0"]).name == "train.py" and Path(child["file"]).name == "train.py"
    # The script's own directory (in the exported snapshot) comes first, as for `python sub/train.py`.
    assert Path(child["path0"]) == Path(child["file"]).resolve().parent
    assert Path(original["path0"]) == Path(original["file"]).resolve().parent
