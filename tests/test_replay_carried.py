"""Issue 12, cause 7: loop-carried state that no checkpoint holds is refused before a replay runs.

Unit tests of the analysis (hindsight/_carried.py) on small sources, the planner's refusal, an
end-to-end replay of a recorded script whose carried counter would give wrong values, and the
record-time warning for a checkpointed object that holds no state.
"""

from __future__ import annotations

import contextlib
import sqlite3
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest

from flordb_build.errors import FlorBuildWarning
from flordb_build.hindsight._carried import Skipping, describe_carried, find_carried
from flordb_build.hindsight._model import RecordedRun, Schedule, Step, StepKind
from flordb_build.hindsight._plan import plan_replay
from tests.storedb import connect_store

#: A range or validation segment that starts mid-loop: iterations skipped, later ones and the tail run.
MID_LOOP = Skipping(iterations=True, nested=False, later_iterations=True, later_nested=True, suffix=True)
#: A suffix replay: every iteration skipped, the last checkpoint restored, then the tail.
SUFFIX = Skipping(iterations=True, nested=False, later_iterations=False, later_nested=False, suffix=True)
#: A validation replay with one worker: nested loops skipped in every iteration.
VALIDATION = Skipping(iterations=False, nested=True, later_iterations=True, later_nested=False, suffix=True)


def carried(source: str, skipping: Skipping, stateless: tuple[str, ...] = ()) -> set[str]:
    return {c.name for c in find_carried(textwrap.dedent(source), "epoch", skipping, stateless)}


def test_a_counter_carried_across_epochs_is_found_for_a_segment_that_starts_mid_loop() -> None:
    source = """\
        import flordb_build as flor
        best = 0.0
        with flor.checkpointing(model=model):
            for epoch in flor.loop("epoch", range(5)):
                acc = evaluate(model)
                best = max(best, acc)
                flor.log("new", best)
        """
    assert carried(source, MID_LOOP) == {"best"}
    found = find_carried(textwrap.dedent(source), "epoch", MID_LOOP)
    assert describe_carried(found).startswith("the epoch loop changes `best`, which no checkpoint holds")


def test_a_history_appended_in_the_loop_and_read_in_the_suffix_is_found_for_a_suffix_replay() -> None:
    source = """\
        import flordb_build as flor
        history = []
        with flor.checkpointing(model=model):
            for epoch in flor.loop("epoch", range(5)):
                history.append(train(model))
        flor.log("new", sum(history) / len(history))
        """
    assert carried(source, SUFFIX) == {"history"}


def test_a_name_rebuilt_every_iteration_before_it_is_read_is_not_refused() -> None:
    source = """\
        import flordb_build as flor
        with flor.checkpointing(model=model):
            for epoch in flor.loop("epoch", range(5)):
                total = 0.0
                for step in flor.loop("step", range(3)):
                    total += model.step(step)
                flor.log("new", total)
        """
    assert carried(source, MID_LOOP) == set()


def test_checkpointed_names_and_what_they_hold_are_not_refused() -> None:
    source = """\
        import flordb_build as flor
        state = {"best": 0.0}
        with flor.checkpointing(model=model, optimizer=optimizer, state=state):
            for epoch in flor.loop("epoch", range(5)):
                for step in flor.loop("step", range(3)):
                    optimizer.zero_grad()
                    model.fc.weight.grad = None
                    optimizer.step()
                state["best"] = max(state["best"], evaluate(model))
                flor.log("new", state["best"])
        flor.log("final", model.fc.weight.sum())
        """
    assert carried(source, MID_LOOP) == set()
    assert carried(source, SUFFIX) == set()
    # the same script with the dict left out of the checkpoint: now it is carried state
    assert carried(source.replace(", state=state", ""), MID_LOOP) == {"state"}


def test_layers_in_a_plain_list_are_state_when_the_checkpoint_held_nothing() -> None:
    # hidden is carried by the loop; the checkpoint of `model` held no state (an empty state_dict),
    # so what the loop does to the layers through `model` is no longer held either
    source = """\
        import flordb_build as flor
        hidden = None
        with flor.checkpointing(model=net):
            for epoch in flor.loop("epoch", range(5)):
                hidden = net.layers[0].train_step(hidden)
                net.layers[1].train_step(hidden)
                flor.log("new", net.layers[1].bias.mean())
        """
    assert carried(source, MID_LOOP) == {"hidden"}
    assert carried(source, MID_LOOP, stateless=("model",)) == {"hidden", "net.layers"}


def test_a_nested_loop_in_a_helper_that_leaves_an_accumulator_for_its_caller_is_found_in_validation() -> None:
    source = """\
        import flordb_build as flor

        def train(model, optimizer):
            train_loss = 0
            for step in flor.loop("step", range(4)):
                optimizer.zero_grad()
                train_loss += model(step)
                optimizer.step()
            flor.log("avg_loss", train_loss / 4)

        with flor.checkpointing(model=model, optimizer=optimizer):
            for epoch in flor.loop("epoch", range(5)):
                train(model, optimizer)
                flor.log("new", model.weight.norm())
        """
    found = find_carried(textwrap.dedent(source), "epoch", VALIDATION)
    assert [(c.name, c.loop) for c in found] == [("train_loss", "step")]
    # without the recorded avg_loss after the loop, nothing reads the accumulator: not refused
    assert carried(source.replace('    flor.log("avg_loss", train_loss / 4)\n', ""), VALIDATION) == set()


def test_a_comprehension_variable_is_not_state_of_the_loop() -> None:
    # bench_replay's range statement: `p` lives in the generator's own scope
    source = """\
        import flordb_build as flor
        with flor.checkpointing(model=model, optimizer=optimizer):
            for epoch in flor.loop("epoch", range(5)):
                for step in flor.loop("step", range(3)):
                    optimizer.step()
                    flor.log("new", float(sum(p.grad.norm() for p in model.parameters())))
        """
    assert carried(source, MID_LOOP) == set()


def test_what_only_printing_reads_and_prefix_or_full_runs_are_never_refused() -> None:
    source = """\
        import flordb_build as flor
        seen = 0
        with flor.checkpointing(model=model):
            for epoch in flor.loop("epoch", range(5)):
                seen += 1
                print("epoch", seen)
                flor.log("new", model.weight.norm())
        """
    assert carried(source, MID_LOOP) == set()
    assert Skipping.of(Schedule((), stop_after=True, writes_prefix=True, writes_suffix=False)) is None
    full = Schedule((Step(StepKind.FULL),) * 3, stop_after=False, writes_prefix=True, writes_suffix=True)
    assert Skipping.of(full) is None


def test_a_loop_after_the_main_loop_runs_in_full_in_validation_and_is_not_taken_for_a_nested_one() -> None:
    source = """\
        import flordb_build as flor
        history = []
        with flor.checkpointing(model=model):
            for epoch in flor.loop("epoch", range(5)):
                for step in flor.loop("step", range(3)):
                    model.step(step)
                flor.log("new", model.weight.norm())
        for batch in flor.loop("test", range(3)):
            history.append(model.score(batch))
        flor.log("test_sum", sum(history))
        """
    assert carried(source, VALIDATION) == set()


def test_a_shuffling_generator_carries_its_rng_into_range_segments_but_not_into_validation_ones() -> None:
    # the nested loop's iterable draws from `rng` when it is iterated: a range segment that starts
    # mid-loop iterates it with the rng of a fresh start; a validation segment never iterates it
    source = """\
        import numpy as np
        import flordb_build as flor
        rng = np.random.RandomState(0)

        def batches(data):
            for i in rng.permutation(len(data)):
                yield data[i]

        with flor.checkpointing(reg=reg):
            for epoch in flor.loop("epoch", range(4)):
                for batch in flor.loop("step", batches(data)):
                    reg.partial_fit(batch)
                flor.log("new", reg.coef_)
        """
    assert carried(source, MID_LOOP) == {"rng"}
    mid_loop_validation = Skipping(
        iterations=True, nested=True, later_iterations=True, later_nested=False, suffix=True
    )
    assert carried(source, mid_loop_validation) == set()


SCRIPT_V1 = """\
import flordb_build as flor

state = {"w": 0}
best = 0
with flor.checkpointing(state=state):
    for epoch in flor.loop("epoch", range(4)):
        for step in flor.loop("step", range(3)):
            state["w"] += step + epoch
        best = max(best, state["w"] % 5)
        flor.log("val", state["w"])
"""
TODAY = SCRIPT_V1 + 'flor.log("best_final", best)\n'


def _recorded_run(source: str, stateless: tuple[str, ...] = ()) -> RecordedRun:
    return RecordedRun(
        run_id="r1",
        task=None,
        filename="train.py",
        snapshot="c" * 40,
        old_source=source,
        outer_loops=tuple((i + 1, "epoch", i) for i in range(4)),
        checkpoints=tuple((i + 1, "epoch", i, 0.01) for i in range(4)),
        nested_checkpoints=frozenset(i + 1 for i in range(4)),  # each epoch also kept its nested point
        stateless=stateless,
    )


def test_the_planner_refuses_a_suffix_replay_that_would_skip_carried_state_and_names_it() -> None:
    plan = plan_replay([_recorded_run(SCRIPT_V1)], {"train.py": TODAY}, ["best_final"])
    assert not plan.runs
    (skipped,) = plan.skipped
    assert "the epoch loop changes `best`, which no checkpoint holds" in skipped.reason
    # held by the checkpoint, the same statement replays
    held_v1 = SCRIPT_V1.replace("state=state", "state=state, best_box=best_box").replace(
        "best = 0", "best_box = {}"
    )
    held_v1 = held_v1.replace('best = max(best, state["w"] % 5)', 'best_box["b"] = state["w"] % 5')
    held_today = held_v1 + 'flor.log("best_final", best_box["b"])\n'
    plan = plan_replay([_recorded_run(held_v1)], {"train.py": held_today}, ["best_final"])
    assert [r.run_id for r in plan.runs] == ["r1"], plan.skipped


def test_the_planner_refuses_every_skipping_depth_when_a_checkpoint_held_no_state() -> None:
    today = SCRIPT_V1.replace('flor.log("val"', 'flor.log("w_now", state["w"])\n        flor.log("val"')
    plan = plan_replay([_recorded_run(SCRIPT_V1, stateless=("state",))], {"train.py": today}, ["w_now"])
    (skipped,) = plan.skipped
    assert "the checkpoint of 'state' held no state" in skipped.reason
    # a prefix statement skips nothing: it replays even then
    prefix = SCRIPT_V1.replace("best = 0\n", 'best = 0\nflor.log("w0", state["w"])\n')
    plan = plan_replay([_recorded_run(SCRIPT_V1, stateless=("state",))], {"train.py": prefix}, ["w0"])
    assert [r.run_id for r in plan.runs] == ["r1"], plan.skipped


def test_a_replay_of_a_recorded_script_with_a_carried_counter_refuses_and_writes_nothing(
    project: Any,
) -> None:
    project.write("pyproject.toml", "[tool.flordb_build]\ncheckpoint_every = 1\n")
    project.write("train.py", SCRIPT_V1)
    project.commit_all("v1")
    project.run("train.py")
    project.write("train.py", TODAY)
    project.commit_all("today")
    out = project.cli("replay", "best_final", "--yes", check=False)
    text = out.stdout + out.stderr
    assert "the epoch loop changes `best`, which no checkpoint holds" in text, text
    with contextlib.closing(connect_store(Path(project.root) / ".flor" / "flor.db")) as conn:
        rows = conn.execute("SELECT COUNT(*) FROM logs WHERE name = 'best_final'").fetchone()[0]
    assert rows == 0


def test_a_module_whose_layers_sit_in_a_plain_list_warns_once_when_checkpointed(project: Any) -> None:
    torch = pytest.importorskip("torch")
    from flordb_build.empty_state import empty_state_reason, warn_empty_state

    class ListNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = [torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)]

    reason = empty_state_reason(ListNet())
    assert reason is not None and "'layers'" in reason and "torch.nn.ModuleList" in reason
    assert empty_state_reason(torch.nn.Linear(2, 2)) is None
    assert empty_state_reason({}) is None  # a dict may fill up during the loop
    project.write(
        "train.py",
        """\
        import torch
        import flordb_build as flor

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.layers = [torch.nn.Linear(2, 2)]

        net = Net()
        with flor.checkpointing(model=net, opt=torch.optim.SGD(net.layers[0].parameters(), lr=0.1)):
            for epoch in flor.loop("epoch", range(2)):
                flor.log("x", epoch)
        """,
    )
    project.commit_all("list net")
    proc = project.run("train.py")
    warned = [line for line in proc.stderr.splitlines() if "FlorBuildWarning" in line]
    assert len(warned) == 1, proc.stderr
    assert "'model' (Net) has an empty state_dict" in warned[0] and "'layers'" in warned[0]
    # the checkpoints of `model` are '{}', which replay planning reads as holding nothing
    from flordb_build.config import load_config
    from flordb_build.hindsight._select import load_recorded_runs

    with sqlite3.connect(Path(project.root) / ".flor" / "flor.db") as conn:
        (run_id,) = conn.execute("SELECT run_id FROM runs").fetchone()
    (recorded,) = load_recorded_runs(load_config(Path(project.root)), [run_id])
    assert recorded.stateless == ("model",)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_empty_state("model", torch.nn.Linear(2, 2))
    assert not [w for w in caught if issubclass(w.category, FlorBuildWarning)]


def test_a_method_of_a_builtin_changes_nothing_but_a_builtin_name_the_script_binds_is_its_state() -> None:
    # `int.from_bytes(...)` in the loop is no change of `int` (it made split validation replays
    # refuse any script drawing noise that way); a script's own `list` variable stays its state.
    source = """\
        import os
        import flordb_build as flor
        state = {"w": 0}
        with flor.checkpointing(state=state):
            for epoch in flor.loop("epoch", range(3)):
                state["w"] += 1
                flor.log("val", state["w"] + int.from_bytes(os.urandom(4), "big") / 2**32)
        flor.log("final", state["w"])
        """
    assert carried(source, MID_LOOP) == set()
    bound = """\
        import flordb_build as flor
        list = []
        with flor.checkpointing(model=model):
            for epoch in flor.loop("epoch", range(5)):
                list.append(train(model))
        flor.log("new", sum(list))
        """
    assert carried(bound, SUFFIX) == {"list"}
