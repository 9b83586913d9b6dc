"""Issue 12 causes 2-5: what a replay must restore beyond the checkpointed objects' weights.

Each test records a small script in the style of a public training example, adds a hindsight
statement today, replays it, and compares the replayed values with a fresh run of the recorded
version with the statement placed by hand (the patched source the plan made, run as a script).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

import flordb_build as flor
from flordb_build.errors import CheckpointError
from flordb_build.store import SCHEMA_VERSION

torch = pytest.importorskip("torch")


def _fresh_values(project: Any, report: Any, name: str, *args: str) -> list[list[Any]]:
    """Run each planned run's patched source as a new script and return its values of ``name``."""
    values = []
    for i, run in enumerate(report.plan.runs):
        script = f"fresh_{i}.py"
        project.write(script, run.source)
        project.run(script, *args)
        frame = flor.dataframe(name)
        values.append(frame[frame["filename"] == script][name].tolist())
    return values


def _replayed_values(report: Any, name: str) -> list[list[Any]]:
    frame = flor.dataframe(name)
    return [frame[frame["run_id"] == run.run_id][name].tolist() for run in report.plan.runs]


def _record(project: Any, old: str, today: str, *args: str) -> None:
    project.write("pyproject.toml", "[tool.flordb_build]\ncheckpoint_every = 1\n")  # restore points by count, not timing
    project.write("train.py", old)
    project.commit_all("recorded version")
    project.run("train.py", *args)
    project.write("train.py", today)
    project.commit_all("today")


# -- 12.2: random number generators -------------------------------------------------------------

RNG_OLD = """\
import random

import numpy as np
import torch

import flordb_build as flor

random.seed(0)
np.random.seed(0)
torch.manual_seed(0)
state = {"w": torch.zeros(3)}
with flor.checkpointing(state=state):
    for epoch in flor.loop("epoch", range(4)):
        for step in flor.loop("step", range(3)):
            noise = torch.randn(3) + float(np.random.rand()) + random.random()
            state["w"] += 0.1 * noise
        flor.log("w0", float(state["w"][0]))
flor.log("final", float(state["w"].sum()))
"""


def test_a_suffix_that_draws_random_numbers_draws_what_a_fresh_run_draws(project: Any) -> None:
    today = RNG_OLD + 'flor.log("draw", float(torch.rand(1)) + float(np.random.rand()) + random.random())\n'
    _record(project, RNG_OLD, today)
    report = flor.replay("draw", quiet=True)
    assert report.ok and [r.depth.value for r in report.plan.runs] == ["suffix"]
    assert _replayed_values(report, "draw") == _fresh_values(project, report, "draw")


def test_range_segments_from_a_checkpoint_draw_the_recorded_noise(project: Any) -> None:
    today = RNG_OLD.replace(
        '            state["w"] += 0.1 * noise\n',
        '            state["w"] += 0.1 * noise\n            flor.log("noise", float(noise.sum()))\n',
    )
    _record(project, RNG_OLD, today)
    report = flor.replay("noise", workers=2, quiet=True)
    assert report.ok and [r.depth.value for r in report.plan.runs] == ["range"]
    assert [len(r.segments) for r in report.plan.runs] == [2]
    replayed = _replayed_values(report, "noise")
    assert len(replayed[0]) == 12
    assert replayed == _fresh_values(project, report, "noise")


# -- 12.3: gradients ------------------------------------------------------------------------------

GRAD_OLD = """\
import torch

import flordb_build as flor

torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
x, y = torch.randn(16, 4), torch.randn(16, 1)
with flor.checkpointing(model=model, optimizer=optimizer):
    for epoch in flor.loop("epoch", range(4)):
        for step in flor.loop("step", range(3)):
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            optimizer.step()
        flor.log("loss", float(torch.nn.functional.mse_loss(model(x), y)))
"""


def test_gradients_of_the_previous_epoch_are_restored(project: Any) -> None:
    # FlorDB's README example: the gradient norm at the top of the epoch loop, i.e. of the
    # previous epoch's last step (None before the first one).
    top = '    for epoch in flor.loop("epoch", range(4)):\n'
    today = GRAD_OLD.replace(
        top,
        top
        + '        flor.log("grad_norm", sum(float(p.grad.norm()) for p in model.parameters() if p.grad is not None))\n',
    )
    _record(project, GRAD_OLD, today)
    report = flor.replay("grad_norm", quiet=True)
    assert report.ok and [r.depth.value for r in report.plan.runs] == ["validation"]
    replayed = _replayed_values(report, "grad_norm")
    assert replayed[0][0] == 0.0 and all(v > 0 for v in replayed[0][1:])
    assert replayed == _fresh_values(project, report, "grad_norm")


def test_loading_a_checkpoint_from_a_row_leaves_generators_and_gradients_alone(project: Any) -> None:
    _record(project, GRAD_OLD, GRAD_OLD + "# today\n")
    model = torch.nn.Linear(4, 1)
    torch.manual_seed(123)
    before = torch.get_rng_state().clone()
    flor.load_checkpoint(flor.dataframe("loss").iloc[-1], model=model)
    assert torch.equal(torch.get_rng_state(), before)
    assert all(p.grad is None for p in model.parameters())
    # and with no objects the loaded states are the user's objects only
    assert sorted(flor.load_checkpoint(flor.dataframe("loss").iloc[-1])) == ["model", "optimizer"]


# -- 12.4: checkpoints that are not torch state ------------------------------------------------------

SGD_OLD = """\
import numpy as np
from sklearn.linear_model import SGDRegressor

import flordb_build as flor

rng = np.random.RandomState(0)
X = rng.rand(64, 3)
y = X @ np.array([1.0, -2.0, 0.5]) + 0.1
reg = SGDRegressor(random_state=0, learning_rate="constant", eta0=0.05)
with flor.checkpointing(reg=reg):
    for epoch in flor.loop("epoch", range(4)):
        for batch in flor.loop("batch", range(4)):
            rows = slice(16 * batch, 16 * batch + 16)
            reg.partial_fit(X[rows], y[rows])
        flor.log("score", float(reg.score(X, y)))
"""


def test_a_scikit_learn_estimator_checkpoint_is_restored_by_replay(project: Any) -> None:
    pytest.importorskip("sklearn")
    today = SGD_OLD + 'flor.log("coef0", float(reg.coef_[0]))\n'
    _record(project, SGD_OLD, today)
    report = flor.replay("coef0", quiet=True)
    assert report.ok, report
    assert [o.stored for o in report.outcomes] == [1]
    assert _replayed_values(report, "coef0") == _fresh_values(project, report, "coef0")
    # The user-facing load keeps refusing pickles unless asked.
    with pytest.raises(CheckpointError, match="weights_only"):
        flor.load_checkpoint(flor.dataframe("score").iloc[-1])


# -- 12.5: command-line flags ----------------------------------------------------------------------

ARGV_OLD = """\
import argparse

import flordb_build as flor

parser = argparse.ArgumentParser()
parser.add_argument("--gamma", type=float, default=0.7)
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--api-token", default="")
args = parser.parse_args()
lr = flor.arg("lr", 1.0)
state = {"lr": lr}
with flor.checkpointing(state=state):
    for epoch in flor.loop("epoch", range(args.epochs)):
        for step in flor.loop("step", range(2)):
            pass
        state["lr"] *= args.gamma
        flor.log("lr", state["lr"])
"""


def test_a_run_is_replayed_with_the_flags_it_was_recorded_with(project: Any) -> None:
    today = ARGV_OLD + 'flor.log("final_lr", state["lr"] + len(args.api_token))\n'
    _record(project, ARGV_OLD, today, "--gamma", "0.5", "--epochs", "3", "--kwargs", "lr=2.0")
    conn = sqlite3.connect(project.root / ".flor" / "flor.db")
    (argv,) = conn.execute("SELECT argv FROM runs").fetchone()
    conn.close()
    assert json.loads(argv) == ["--gamma", "0.5", "--epochs", "3"]  # --kwargs live in runs.args
    report = flor.replay("final_lr", quiet=True)
    assert report.ok
    assert _replayed_values(report, "final_lr") == [[2.0 * 0.5**3]]
    assert _fresh_values(
        project, report, "final_lr", "--gamma", "0.5", "--epochs", "3", "--kwargs", "lr=2.0"
    ) == [[2.0 * 0.5**3]]


def test_a_run_whose_flags_held_a_secret_is_refused_and_the_secret_is_not_stored(project: Any) -> None:
    today = ARGV_OLD + 'flor.log("final_lr", state["lr"])\n'
    _record(project, ARGV_OLD, today, "--api-token", "s3cr3t-value", "--gamma", "0.5")
    db = project.root / ".flor" / "flor.db"
    assert b"s3cr3t-value" not in db.read_bytes()
    conn = sqlite3.connect(db)
    (argv,) = conn.execute("SELECT argv FROM runs").fetchone()
    conn.close()
    assert json.loads(argv) == ["--api-token", "***", "--gamma", "0.5"]
    report = flor.replay("final_lr", quiet=True)
    assert not report.plan.runs
    (skipped,) = report.plan.skipped
    assert "secret masked" in skipped.reason and "--api-token ***" in skipped.reason
    assert flor.dataframe("final_lr").empty or "final_lr" not in flor.dataframe("final_lr")


def test_a_store_from_before_argv_is_migrated_and_its_runs_replay_without_flags(project: Any) -> None:
    _record(project, ARGV_OLD, ARGV_OLD + 'flor.log("final_lr", state["lr"])\n')
    db: Path = project.root / ".flor" / "flor.db"
    conn = sqlite3.connect(db)
    conn.execute("ALTER TABLE runs DROP COLUMN argv")  # the schema-4 table
    conn.execute("PRAGMA user_version = 4")
    conn.commit()
    conn.close()
    assert f"schema version {SCHEMA_VERSION}" in project.cli("migrate").stdout
    conn = sqlite3.connect(db)
    columns = [row[1] for row in conn.execute("PRAGMA table_info(runs)")]
    (argv,) = conn.execute("SELECT argv FROM runs").fetchone()
    conn.close()
    assert "argv" in columns and argv is None
    report = flor.replay("final_lr", quiet=True)
    assert report.ok and _replayed_values(report, "final_lr") == [[0.7**2]]


# -- 12.1: the rest of the epoch body after the nested loop runs once ----------------------------

SCHEDULER_OLD = """\
import torch

import flordb_build as flor


def train(model, optimizer, x, y):
    for step in flor.loop("step", range(3)):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
x, y = torch.randn(16, 4), torch.randn(16, 1)
with flor.checkpointing(model=model, optimizer=optimizer, scheduler=scheduler):
    for epoch in flor.loop("epoch", range(4)):
        train(model, optimizer, x, y)
        scheduler.step()
        flor.log("loss", float(torch.nn.functional.mse_loss(model(x), y)))
"""


def test_state_changed_after_the_nested_loop_is_applied_once_in_validation(project: Any) -> None:
    today = SCHEDULER_OLD.replace(
        "        scheduler.step()\n", '        scheduler.step()\n        flor.log("lr", scheduler.get_last_lr()[0])\n'
    )
    project.write("pyproject.toml", "[tool.flordb_build]\ncheckpoint_every = 1\n")  # every epoch validates
    _record(project, SCHEDULER_OLD, today)
    conn = sqlite3.connect(project.root / ".flor" / "flor.db")
    points = set(conn.execute("SELECT DISTINCT iteration, point FROM checkpoints"))
    conn.close()
    # every epoch's state where train()'s loop ended, and at the epoch's end
    assert points == {(i, p) for i in range(4) for p in ("nested", "end")}
    report = flor.replay("lr", quiet=True)
    assert report.ok and [r.depth.value for r in report.plan.runs] == ["validation"]
    assert report.plan.runs[0].nested == (0, 1, 2, 3)
    assert report.outcomes[0].mismatches == ()
    assert _replayed_values(report, "lr") == [[0.5, 0.25, 0.125, 0.0625]]
    assert _fresh_values(project, report, "lr") == [[0.5, 0.25, 0.125, 0.0625]]


def test_a_suffix_sees_the_last_epoch_finished_once(project: Any) -> None:
    today = SCHEDULER_OLD + 'flor.log("final_lr", scheduler.get_last_lr()[0])\n'
    _record(project, SCHEDULER_OLD, today)
    report = flor.replay("final_lr", quiet=True)
    assert report.ok and [r.depth.value for r in report.plan.runs] == ["suffix"]
    assert _replayed_values(report, "final_lr") == [[0.0625]] == _fresh_values(project, report, "final_lr")


# -- 12.6: a file the skipped loop wrote ------------------------------------------------------------

BEST_FILE_OLD = """\
import torch

import flordb_build as flor

torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
x, y = torch.randn(32, 4), torch.randn(32, 1)
xv, yv = torch.randn(16, 4), torch.randn(16, 1)
tracker = {"best": float("inf")}
with flor.checkpointing(model=model, optimizer=optimizer, tracker=tracker):
    for epoch in flor.loop("epoch", range(5)):
        for step in flor.loop("step", range(3)):
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
        with torch.no_grad():
            val = float(torch.nn.functional.mse_loss(model(xv), yv))
        if val < tracker["best"]:
            tracker["best"] = val
            torch.save(model.state_dict(), "best_model.pt")
        flor.log("val", val)
best = torch.nn.Linear(4, 1)
best.load_state_dict(torch.load("best_model.pt", weights_only=True))
"""


def test_a_suffix_that_reads_a_file_the_loop_wrote_finds_it_as_recorded(project: Any) -> None:
    project.write(".gitignore", "*.pt\n")  # the model file is no part of any snapshot
    today = BEST_FILE_OLD + 'flor.log("best_bias", float(best.bias[0]))\n'
    _record(project, BEST_FILE_OLD, today)
    conn = sqlite3.connect(project.root / ".flor" / "flor.db")
    files = {name for (name,) in conn.execute("SELECT DISTINCT name FROM checkpoints WHERE name LIKE 'flor.file:%'")}
    conn.close()
    assert files == {"flor.file:best_model.pt"}
    (project.root / "best_model.pt").unlink()  # the work tree's copy must not be what the replay reads
    report = flor.replay("best_bias", quiet=True)
    assert report.ok and [r.depth.value for r in report.plan.runs] == ["suffix"], report
    replayed = _replayed_values(report, "best_bias")
    assert replayed == _fresh_values(project, report, "best_bias") and len(replayed[0]) == 1


def test_a_restored_file_is_never_written_through_a_link_out_of_the_replay_directory(tmp_path: Path) -> None:
    from flordb_build.training_state import FILE_PREFIX, restore

    outside = tmp_path / "users_data"
    outside.mkdir()
    (outside / "out.bin").write_bytes(b"the user's own")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "data").symlink_to(outside)  # what replay_links = ["data"] puts in a replay's tree
    with pytest.raises(CheckpointError, match="leads outside it"):
        restore({}, {FILE_PREFIX + "data/out.bin": b"recorded"}, tree)
    assert (outside / "out.bin").read_bytes() == b"the user's own"
    with pytest.raises(CheckpointError, match="outside the project"):
        restore({}, {FILE_PREFIX + "../escape.bin": b"recorded"}, tree)
    restore({}, {FILE_PREFIX + "models/best.pt": b"recorded"}, tree)
    assert (tree / "models" / "best.pt").read_bytes() == b"recorded"
