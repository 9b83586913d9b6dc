"""An iteration's end reuses its nested point's copies of the objects nothing changed in between.

A checkpoint of an epoch with a nested loop takes the state twice (CheckpointPoint): where the
nested loop ended and at the epoch's end. When the code between the two (an evaluation) leaves
an object alone, its nested copy stands for the end's: copying, serializing and hashing it again
doubled the cost of every such checkpoint (bench_checkpoints: M 132 ms -> 231 ms). Reuse is only
right where the state is the same *bit for bit*: an in-place change that bumps no version counter
(``p.data.add_``), a zero whose sign flipped, a learning rate halved after the nested loop must each
get a fresh copy. These tests hold both sides.
"""

from __future__ import annotations

import json
import sqlite3
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest

from flordb_build.config import load_config
from flordb_build.objects import ObjectStore
from flordb_build.state import copy_state, deserialize, matches_copy, tree_matches

torch = pytest.importorskip("torch")


# -- the comparison ------------------------------------------------------------------------------


def _trained_net() -> tuple[Any, Any]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    net(torch.randn(16, 4)).pow(2).mean().backward()
    opt.step()
    return net, opt


def test_an_unchanged_module_and_optimizer_match_their_copies() -> None:
    net, opt = _trained_net()
    assert matches_copy(net, copy_state(net))
    assert matches_copy(opt, copy_state(opt))


def test_changes_that_bump_no_version_counter_are_seen() -> None:
    net, opt = _trained_net()
    copy = copy_state(net)
    net[0].weight.data.add_(1e-7)  # the optimizer's own kind of update: no autograd version bump
    assert not matches_copy(net, copy)
    opt_copy = copy_state(opt)
    opt.param_groups[0]["lr"] *= 0.5  # what scheduler.step() does after the nested loop
    assert not matches_copy(opt, opt_copy)


def test_values_equal_in_value_but_not_in_bits_do_not_match() -> None:
    zeros = {"z": torch.zeros(3), "f": 0.0}
    copy = copy_state(zeros)
    zeros["z"].mul_(-1)  # -0.0 == 0.0, but a restore must give back -0.0
    assert bool((zeros["z"] == copy.payload["z"]).all()) and not tree_matches(zeros, copy.payload)
    zeros["z"].mul_(-1)
    assert tree_matches(zeros, copy.payload)
    zeros["f"] = -0.0
    assert not tree_matches(zeros, copy.payload)


def test_nan_matches_only_its_own_bits_and_types_and_order_count() -> None:
    nan = torch.tensor([float("nan"), 1.0])
    assert tree_matches({"t": nan}, {"t": nan.clone()})  # torch.equal says False: NaN != NaN
    other_nan = nan.clone()
    other_nan.view(torch.int32)[0] ^= 1  # another NaN payload
    assert not tree_matches({"t": nan}, {"t": other_nan})
    assert not tree_matches({"t": nan}, {"t": nan.double()})  # dtype
    assert not tree_matches({"t": nan}, {"t": nan[:1].clone()})  # shape
    assert not tree_matches({"a": 1, "b": 2}, {"b": 2, "a": 1})  # key order is a state_dict's
    assert not tree_matches(OrderedDict(a=1), {"a": 1})
    assert not tree_matches({"n": 1}, {"n": True}) and not tree_matches({"n": 1}, {"n": 1.0})
    assert not tree_matches([1, 2], (1, 2)) and tree_matches((1, [2.5, None]), (1, [2.5, None]))


def test_plain_state_is_compared_too() -> None:
    net, _ = _trained_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)  # no tensors in its state: a JSON copy
    copy = copy_state(opt)
    assert copy.format.value == "json" and matches_copy(opt, copy)
    opt.param_groups[0]["lr"] = 0.05
    assert not matches_copy(opt, copy)


def test_arrays_and_pickled_state_are_always_copied_again() -> None:
    np = pytest.importorskip("numpy")
    array = np.arange(4.0)
    assert not matches_copy(array, copy_state(array))  # numpy: compared by nobody, copied again
    assert not matches_copy({"a": array}, copy_state({"a": array}))


# -- end to end: what a run stores -----------------------------------------------------------------

TRAIN = """
import json
import sys
import torch
import flordb_build as flor
import flordb_build.state as state

serialized = []  # what the background writer serialized: a second copy of unchanged state is waste
_serialize = state.serialize
def counting_serialize(copy):
    serialized.append(copy.format.value)
    return _serialize(copy)
state.serialize = counting_serialize

change = sys.argv[1]
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)  # momentum buffers: torch format
extra = {"z": torch.zeros(3)}
x, y = torch.randn(32, 4), torch.randn(32, 1)
with flor.checkpointing(model=net, optimizer=opt, extra=extra):
    for epoch in flor.loop("epoch", range(3)):
        for step in flor.loop("step", range(4)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(net(x), y).backward()
            opt.step()
        with torch.no_grad():  # the evaluation: changes nothing unless asked to
            flor.log("val", torch.nn.functional.mse_loss(net(x), y).item())
            if change == "weights":
                net[0].bias.data.add_(1.0)
            elif change == "sign":
                extra["z"].mul_(-1)
            elif change == "lr":
                opt.param_groups[0]["lr"] *= 0.5
            elif change == "grads":
                net[0].bias.grad.mul_(2.0)
with open("serialized.json", "w") as fh:
    json.dump(serialized, fh)
"""


def _rows(root: Path) -> dict[tuple[int, str], str]:
    with sqlite3.connect(root / ".flor" / "flor.db") as conn:
        rows = conn.execute("SELECT iteration, name, sha256 FROM checkpoints").fetchall()
    return {(iteration, name): sha for iteration, name, sha in rows}


def _load(sha: str) -> Any:
    return deserialize(ObjectStore.for_config(load_config()).get(sha), "torch")


def _record(project: Any, change: str) -> tuple[dict[tuple[int, str], str], list[str]]:
    project.write("pyproject.toml", "[tool.flordb_build]\ncheckpoint_every = 1\n")
    project.write("train.py", TRAIN)
    project.run("train.py", change)
    return _rows(project.root), json.loads((project.root / "serialized.json").read_text())


TORCH_OBJECTS = ("model", "optimizer", "extra", "model.grad")


def test_an_evaluation_that_changes_nothing_stores_each_copy_once(project: Any) -> None:
    rows, serialized = _record(project, "none")
    for epoch in range(3):
        for name in TORCH_OBJECTS:
            assert rows[(epoch, name)] == rows[(epoch, "nested:" + name)], (epoch, name)
    # one serialization of each torch object per epoch (the nested point's), not two
    assert serialized.count("torch") == 3 * len(TORCH_OBJECTS), serialized


@pytest.mark.parametrize(
    ("change", "changed"),
    [("weights", "model"), ("sign", "extra"), ("lr", "optimizer"), ("grads", "model.grad")],
)
def test_what_the_evaluation_changed_gets_a_copy_of_its_own(project: Any, change: str, changed: str) -> None:
    rows, serialized = _record(project, change)
    for epoch in range(3):
        for name in TORCH_OBJECTS:
            same = rows[(epoch, name)] == rows[(epoch, "nested:" + name)]
            assert same == (name != changed), (epoch, name)
    assert serialized.count("torch") == 3 * (len(TORCH_OBJECTS) + 1), serialized
    nested, end = _load(rows[(2, "nested:" + changed)]), _load(rows[(2, changed)])
    if change == "weights":
        assert torch.equal(end["0.bias"], nested["0.bias"] + 1.0)
    elif change == "sign":
        assert not torch.signbit(nested["z"]).any() and torch.signbit(end["z"]).all()
    elif change == "lr":
        assert end["param_groups"][0]["lr"] == nested["param_groups"][0]["lr"] * 0.5
    else:
        assert torch.equal(end["0.bias"], nested["0.bias"] * 2.0)


def test_a_shared_copy_counts_at_what_it_cost_when_replay_estimates_a_restore(project: Any) -> None:
    # A restore of an epoch's end reads and decodes its whole state, reused copies included: the
    # planner's M for that end (restore = 1.38 M before any restore is measured) must not be the
    # few ms of the end's comparisons.
    from flordb_build.hindsight._select import load_recorded_runs

    _record(project, "none")
    with sqlite3.connect(project.root / ".flor" / "flor.db") as conn:
        run_id, nested = conn.execute(
            "SELECT run_id, SUM(materialize_seconds) FROM checkpoints WHERE iteration = 1 AND name LIKE 'nested:%' "
            "AND name NOT LIKE 'nested:flor.%'"
        ).fetchone()
        end = conn.execute(
            "SELECT SUM(materialize_seconds) FROM checkpoints WHERE iteration = 1 AND name IN (?, ?, ?, ?)",
            TORCH_OBJECTS,
        ).fetchone()[0]
    (recorded,) = load_recorded_runs(load_config(), [run_id])
    (planned_m,) = [m for _ctx, _loop, iteration, m in recorded.checkpoints if iteration == 1]
    assert end < nested  # the end's own rows: comparisons, not copies
    assert planned_m >= nested
