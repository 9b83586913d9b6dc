"""A warm server preloads flordb_build; each forked child still takes its own command line.

The server imported flordb_build with the server's argv, so a child that did not take its own
``--kwargs``/``--params`` again would leave them in ``sys.argv`` for the script's argument parser
(a strict ``argparse`` then fails the replay) and read the wrong params file. Real servers, real
forks, real recorded runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import flordb_build as flor
from flordb_build.config import load_config
from flordb_build.hindsight._child import WARM_PRELOAD
from flordb_build.hindsight._warm import project_servers

SCRIPT = """\
import argparse
import sys
import flordb_build as flor

parser = argparse.ArgumentParser()
parser.add_argument("--lr", type=float, default=0.1)
args = parser.parse_args()  # strict: a --kwargs or --params token left in sys.argv fails here
seed = flor.arg("seed", 0)
scale = flor.arg("scale", 1)  # from the --params file
state = {"w": seed}
with flor.checkpointing(state=state):
    for epoch in flor.loop("epoch", range(2)):
        state["w"] += seed * scale + epoch
        flor.log("w", state["w"])
"""
TODAY = 'flor.log("x", f"{state[\'w\']}|{args.lr}|{\' \'.join(sys.argv[1:])}")\n'


@pytest.fixture
def kept_warm(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("FLORDB_BUILD_REPLAY_KEEP_WARM", "60")
    yield
    for server in project_servers(load_config()):
        server.stop()


def test_a_child_of_a_server_with_flordb_build_preloaded_takes_its_own_kwargs_and_params(
    project: Any, kept_warm: Any
) -> None:
    project.write("pyproject.toml", "[tool.flordb_build]\ncheckpoint_every = 1\n")
    project.write("params.json", '{"scale": 2}\n')
    project.write("train.py", SCRIPT)
    project.commit_all("train")
    for seed in (1, 2, 3):
        project.run("train.py", "--lr", f"0.{seed}", "--params", "params.json", "--kwargs", f"seed={seed}")
    project.write("train.py", SCRIPT + TODAY)
    project.commit_all("today: x")

    report = flor.replay("x", quiet=True, workers=1)
    assert report.ok, report.first_error
    assert [o.warm for o in report.outcomes] == [True, True, True]
    (server,) = project_servers(load_config())
    server.release()
    assert set(WARM_PRELOAD) <= set(server.loaded), server.loaded  # the children forked with it imported
    # Final w = seed + (seed * 2 + 0) + (seed * 2 + 1) = 5 * seed + 1 (scale 2 from the params file);
    # the script's parser saw its own --lr and nothing of --kwargs or --params.
    frame = flor.dataframe("seed", "x")
    found = {int(seed): x for seed, x in zip(frame["seed"], frame["x"], strict=True)}
    assert found == {seed: f"{5 * seed + 1}|0.{seed}|--lr 0.{seed}" for seed in (1, 2, 3)}


LIBRARY = """\
import tempfile

# Made at import, so in the server when the server preloads this module: the server's directory.
SCRATCH = tempfile.TemporaryDirectory(prefix="flor-preloaded-")
"""
SCRATCH_SCRIPT = """\
import os
import scratchlib
import flordb_build as flor

state = {"w": flor.arg("seed", 0)}
with flor.checkpointing(state=state):
    for epoch in flor.loop("epoch", range(2)):
        state["w"] += 1
        flor.log("w", state["w"])
"""
SCRATCH_TODAY = 'flor.log("scratch", f"{scratchlib.SCRATCH.name}|{os.path.isdir(scratchlib.SCRATCH.name)}")\n'


def test_a_child_leaves_the_servers_finalizers_to_the_server(
    project: Any, kept_warm: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An installed library (outside the project) that makes a temporary directory at import: a
    # child that ran the server's finalizers at its exit would delete it under the server and siblings.
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "scratchlib.py").write_text(LIBRARY, encoding="utf-8")
    monkeypatch.setenv("PYTHONPATH", str(lib))
    monkeypatch.syspath_prepend(str(lib))  # where the driver looks for what the server may preload
    project.write("pyproject.toml", "[tool.flordb_build]\ncheckpoint_every = 1\n")
    project.write("train.py", SCRATCH_SCRIPT)
    project.commit_all("train")
    for seed in (1, 2, 3):
        project.run("train.py", "--kwargs", f"seed={seed}")
    project.write("train.py", SCRATCH_SCRIPT + SCRATCH_TODAY)
    project.commit_all("today: scratch")

    report = flor.replay("scratch", quiet=True, workers=1)
    assert report.ok, report.first_error
    assert [o.warm for o in report.outcomes] == [True, True, True]
    seen = flor.dataframe("scratch")["scratch"].tolist()
    names = {value.split("|")[0] for value in seen}
    assert len(names) == 1, seen  # one directory: the server's, made when it preloaded scratchlib
    assert [value.split("|")[1] for value in seen] == ["True", "True", "True"], seen
    (server,) = project_servers(load_config())
    server.release()
    assert Path(names.pop()).is_dir(), "a replay child deleted the warm server's temporary directory"
