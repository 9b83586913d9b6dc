"""Issue 12.9: a hindsight statement that draws from a global random generator.

Such a statement changes every later draw of a fresh run of the old version (the next epoch's
noise, shuffles, dropout), so a replay that restores the record's checkpoints after it logs the
record's world, not the fresh run's. The replay compares its generators with the record's at
iteration ends and withholds the run's values once a restore (or another segment) would build on
a state the fresh run never had; where nothing is restored after the draw, the values are a fresh
run's and are written. Real recorded runs, real replays, values compared with a fresh run of the
recorded version with the statement placed by hand.
"""

from __future__ import annotations

import sqlite3

import pytest

import flordb_build as flor
from flordb_build.errors import ReplayError
from tests.conftest import Project

torch = pytest.importorskip("torch")

OLD = """\
import time

import torch

import flordb_build as flor

torch.manual_seed(0)
state = {"w": torch.zeros(3)}
with flor.checkpointing(state=state):
    for epoch in flor.loop("epoch", range(4)):
        for step in flor.loop("step", range(3)):
            state["w"] += 0.1 * torch.randn(3)
        time.sleep(0.05)  # an epoch long enough that keeping the generators costs under 0.5% of it
        flor.log("w0", float(state["w"][0]))
flor.log("final", float(state["w"].sum()))
"""
ANCHOR = '        flor.log("w0", float(state["w"][0]))\n'
#: Draws from torch's global generator: every later epoch of a fresh run gets other noise.
DRAWS = '        flor.log("probe", float(torch.rand(1)))\n'
#: Draws from a generator of its own: the script's draws stay as they were.
OWN_GENERATOR = '        flor.log("probe", float(torch.rand(1, generator=torch.Generator().manual_seed(epoch))))\n'
#: Draws in the first epoch only.
FIRST_EPOCH = '        flor.log("probe", float(torch.rand(1)) if epoch == 0 else 0.0)\n'
#: Draws in the last epoch only: nothing is restored after it.
LAST_EPOCH = '        flor.log("probe", float(torch.rand(1)) if epoch == 3 else 0.0)\n'


def _record(project: Project, statement: str, every: int = 1) -> None:
    project.write("pyproject.toml", f"[tool.flordb_build]\ncheckpoint_every = {every}\n")
    project.write("train.py", OLD)
    project.commit_all("recorded version")
    project.run("train.py")
    project.write("train.py", OLD.replace(ANCHOR, ANCHOR + statement))
    project.commit_all("today")


def _fresh_probe(project: Project, statement: str) -> list[float]:
    """The values of a fresh run of the recorded version with ``statement`` placed by hand."""
    project.write("fresh.py", OLD.replace(ANCHOR, ANCHOR + statement))
    project.run("fresh.py")
    frame = flor.dataframe("probe")
    return frame[frame["filename"] == "fresh.py"]["probe"].tolist()


def _replayed_probe() -> list[float]:
    frame = flor.dataframe("probe")
    return frame[frame["filename"] == "train.py"]["probe"].dropna().tolist()


def _checkpoint_names(project: Project) -> set[tuple[int, str]]:
    conn = sqlite3.connect(project.root / ".flor" / "flor.db")
    try:
        return set(conn.execute("SELECT iteration, name FROM checkpoints WHERE name LIKE '%flor.rng%'"))
    finally:
        conn.close()


def test_a_validation_statement_that_draws_is_withheld_with_the_generator_and_epoch(project: Project) -> None:
    _record(project, DRAWS)
    recorded_w0 = flor.dataframe("w0")["w0"].tolist()

    out = project.cli("replay", "probe", "--yes", check=False)
    assert out.returncode == 1, out.stdout + out.stderr
    withheld = next(line for line in out.stdout.splitlines() if line.startswith("withheld: run "))
    assert "the replayed statements draw random numbers: torch's CPU generator differs from the record's at the " \
           "end of epoch 0" in withheld, withheld
    assert "--accept-divergent" in withheld and "torch.Generator" in withheld
    assert "nondeterminism" not in out.stdout  # the script is deterministic: its statement draws
    assert out.stdout.rstrip().splitlines()[-1].startswith("nothing replayed: "), out.stdout
    assert _replayed_probe() == [] and flor.dataframe("w0")["w0"].tolist() == recorded_w0

    # Why: from epoch 1 on, the values a replay from the record's checkpoints computes are not a
    # fresh run's. Accepted, they are written, marked divergent, and they are the record's world.
    report = flor.replay("probe", quiet=True, accept_divergent=True)
    assert [(o.divergent, o.stored) for o in report.outcomes] == [(True, 4)]
    marks = flor.query("SELECT name, why FROM replay_divergent").values.tolist()
    assert [name for name, _why in marks] == ["probe"] and marks[0][1].startswith("the replayed statements draw")
    accepted, fresh = _replayed_probe(), _fresh_probe(project, DRAWS)
    assert len(fresh) == 4 and accepted[0] == fresh[0] and accepted[1:] != fresh[1:]


def test_a_range_split_in_two_segments_is_withheld_when_the_statement_draws(project: Project) -> None:
    _record(project, DRAWS)
    with pytest.raises(ReplayError, match=r"nothing replayed: .*draw random numbers: torch's CPU generator"):
        flor.replay("probe", workers=2, quiet=True)
    assert _replayed_probe() == []


@pytest.mark.parametrize("workers", [1, 2])
def test_a_statement_with_its_own_generator_replays_equal_to_a_fresh_run(project: Project, workers: int) -> None:
    _record(project, OWN_GENERATOR)
    report = flor.replay("probe", workers=workers, quiet=True)
    assert report.ok and [(o.withheld, o.divergent, o.stored) for o in report.outcomes] == [(None, False, 4)]
    assert not report.mismatches
    assert _replayed_probe() == _fresh_probe(project, OWN_GENERATOR)


def test_draws_after_which_nothing_is_restored_are_a_fresh_runs_and_are_written(project: Project) -> None:
    _record(project, LAST_EPOCH)
    report = flor.replay("probe", quiet=True)
    assert report.ok and [(o.withheld, o.stored) for o in report.outcomes] == [(None, 4)]
    assert _replayed_probe() == _fresh_probe(project, LAST_EPOCH)


def test_without_a_checkpoint_at_the_previous_epoch_the_nested_point_holds_its_generators(project: Project) -> None:
    # checkpoint_every = 2: epochs 1 and 3 are checkpointed (and validate), 0 and 2 run in full.
    _record(project, OWN_GENERATOR, every=2)
    names = _checkpoint_names(project)
    assert {(1, "nested:flor.rng_start"), (1, "nested:flor.rng_before"), (1, "flor.rng"), (3, "flor.rng")} <= names
    # Epoch 2's are kept only where that cost under 0.5% of an epoch (so nearly always here); without
    # them epoch 3 runs in full rather than restore what nothing could check.
    checkable = (3, "nested:flor.rng_before") in names
    report = flor.replay("probe", quiet=True)
    counters = report.outcomes[0].counters
    assert report.ok and counters["iterations_validated"] == (2 if checkable else 1)
    assert counters.get("validations_run_in_full", 0) == (0 if checkable else 1)
    assert _replayed_probe() == _fresh_probe(project, OWN_GENERATOR)


def test_a_draw_in_an_epoch_without_checkpoint_is_caught_at_the_next_nested_point(project: Project) -> None:
    # Epoch 0 runs in full (no checkpoint), and only it draws: the generators the record kept where
    # the loop started and at epoch 0's end (with epoch 1's nested point) show it.
    _record(project, FIRST_EPOCH, every=2)
    with pytest.raises(ReplayError, match=r"draw random numbers: torch's CPU generator differs from the record's at "
                                          r"the end of epoch 0"):
        flor.replay("probe", quiet=True)
    assert _replayed_probe() == []


def test_where_nothing_recorded_the_generators_a_validated_epoch_runs_in_full(project: Project) -> None:
    # A store from before the record kept them at the loop's start: the first epoch cannot be
    # checked, so it runs on its own state instead of restoring the record's.
    _record(project, OWN_GENERATOR)
    conn = sqlite3.connect(project.root / ".flor" / "flor.db")
    conn.execute("DELETE FROM checkpoints WHERE name LIKE '%flor.rng_start' OR name LIKE '%flor.rng_before'")
    conn.commit()
    conn.close()
    report = flor.replay("probe", quiet=True)
    counters = report.outcomes[0].counters
    assert report.ok and counters["validations_run_in_full"] == 1 and counters["iterations_validated"] == 3
    assert _replayed_probe() == _fresh_probe(project, OWN_GENERATOR)


def test_a_statement_before_the_loop_that_draws_is_caught_where_the_loop_starts(project: Project) -> None:
    _record(project, OWN_GENERATOR)
    source = project.root.joinpath("train.py").read_text()
    seeded = 'state = {"w": torch.zeros(3)}\n'
    project.write("train.py", source.replace(seeded, seeded + 'flor.log("start_draw", float(torch.rand(1)))\n'))
    project.commit_all("today, with a draw before the loop")
    with pytest.raises(ReplayError, match=r"torch's CPU generator differs from the record's before the main loop"):
        flor.replay("start_draw", "probe", quiet=True)
    assert _replayed_probe() == [] and flor.dataframe("start_draw").dropna().empty
