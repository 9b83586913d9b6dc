"""Adaptive checkpointing, timings, the model registry (load_checkpoint) and retention, end to end.

Training scripts run as real subprocesses in a temporary git repository; the test process then
restores their checkpoints into fresh objects. torch tests skip when torch is not installed.
"""

from __future__ import annotations

import runpy
import sqlite3
from pathlib import Path
from typing import Any

import pytest

import flordb_build as flor
from flordb_build.checkpoints import (
    DEFAULT_RESTORE_FACTOR,
    Checkpointer,
    CheckpointSettings,
    JointInvariant,
    checkpointed_iterations,
    load_settings,
    refine_restore_factor,
    restore_objects,
)
from flordb_build.config import load_config, parse_size
from flordb_build.errors import CheckpointCorruptError, CheckpointError, CheckpointNotFoundError, ConfigError
from flordb_build.objects import ObjectStore
from flordb_build.retention import evenly_spaced
from flordb_build.state import check_checkpointable

MODEL_DEF = """
import torch

def make_data():
    g = torch.Generator().manual_seed(1)
    w = torch.arange(8.0).unsqueeze(1)
    x, xv = torch.randn(64, 8, generator=g), torch.randn(32, 8, generator=g)
    return x, x @ w, xv, xv @ w

def make_training():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return net, opt, sched

def val_loss(net, xv, yv):
    with torch.no_grad():
        return torch.nn.functional.mse_loss(net(xv), yv).item()
"""

TRAIN = """
import os
import signal
import time
import flordb_build as flor
from model_def import make_data, make_training, val_loss
import torch

epochs = flor.arg("epochs", 6)
pause = flor.arg("pause", 0.5)
kill_at = flor.arg("kill_at", -1)
x, y, xv, yv = make_data()
net, opt, sched = make_training()
with flor.checkpointing(model=net, optimizer=opt, scheduler=sched):
    for epoch in flor.loop("epoch", range(epochs)):
        for step in flor.loop("step", range(4)):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(net(x[step * 16:(step + 1) * 16]), y[step * 16:(step + 1) * 16])
            loss.backward()
            opt.step()
        sched.step()
        time.sleep(pause)
        flor.log("val_loss", val_loss(net, xv, yv))
        if epoch == kill_at:
            time.sleep(1.5)  # let the flusher and the materializer finish what they have
            os.kill(os.getpid(), signal.SIGKILL)
"""


def _db(root: Path) -> sqlite3.Connection:
    return sqlite3.connect(root / ".flor" / "flor.db")


def _checkpoints(root: Path) -> list[tuple[Any, ...]]:
    with _db(root) as conn:
        return conn.execute(
            "SELECT run_id, iteration, name, sha256, bytes, format FROM checkpoints ORDER BY run_id, ctx_id, name"
        ).fetchall()


def _timings(root: Path, run_id: str) -> dict[tuple[int, str], float]:
    with _db(root) as conn:
        rows = conn.execute("SELECT ctx_id, kind, seconds FROM timings WHERE run_id = ?", (run_id,)).fetchall()
    return {(ctx, kind): seconds for ctx, kind, seconds in rows}


# -- pure parts -----------------------------------------------------------------------------------


def test_joint_invariant_follows_eq_4_4() -> None:
    rule = JointInvariant(epsilon=0.0667, restore_factor=1.38)
    assert rule.threshold == pytest.approx(0.0667)  # min(1/2.38, 0.0667)
    # 1 s iterations, 10 ms to materialize: every iteration fits (k = n - 1 before each).
    assert all(rule.admits(n, n - 1, n * 1.0, 0.01) for n in range(1, 50))
    # 1 ms iterations, 250 ms to materialize: the first passes only after ~3,750 iterations.
    assert not rule.admits(30, 0, 30 * 0.001, 0.25)
    assert rule.admits(4000, 0, 4000 * 0.001, 0.25)
    # a large c makes the replay-latency term the binding one: min(1/(1+c), eps)
    assert JointInvariant(epsilon=0.5, restore_factor=3.0).threshold == pytest.approx(0.25)
    assert not rule.admits(0, 0, 0.0, 0.0)


def test_settings_sizes_and_errors(tmp_path: Path) -> None:
    assert parse_size("500MB", "k") == 500_000_000
    assert parse_size("2 GiB", "k") == 2 * 2**30
    assert parse_size(1024, "k") == 1024
    assert parse_size(None, "k") is None
    for bad in ("lots", -5, "5 parsecs", True):
        with pytest.raises(ConfigError, match="positive size"):
            parse_size(bad, "checkpoint_budget_per_run")
    (tmp_path / "pyproject.toml").write_text("[tool.flordb_build]\ncheckpoint_epsilon = 2\n")
    with pytest.raises(ConfigError, match="checkpoint_epsilon"):
        load_settings(load_config(tmp_path))
    (tmp_path / "pyproject.toml").write_text(
        "[tool.flordb_build]\ncheckpoint_epsilon = 0.1\ncheckpoint_budget_per_project = '1GB'\n"
    )
    settings = load_settings(load_config(tmp_path))
    assert settings.epsilon == 0.1 and settings.budget_per_project == 10**9 and settings.budget_per_run is None


def test_immutable_objects_are_refused_with_a_direction() -> None:
    with pytest.raises(CheckpointError, match="immutable; checkpoint a dict"):
        check_checkpointable("best_acc", 0.9)
    check_checkpointable("history", [0.9])


def test_checkpointing_misuse_reads_like_directions(project: Any) -> None:
    project.write(
        "misuse.py",
        """
        import flordb_build as flor

        def attempt(label, **objects):
            try:
                with flor.checkpointing(**objects):
                    pass
            except flor.FlorBuildError as exc:
                print(label, "->", exc)

        attempt("empty")
        attempt("immutable", best=0.5)
        with flor.checkpointing(state={"a": 1}):
            attempt("nested", other={})
        """,
    )
    out = project.run("misuse.py").stdout
    assert "empty -> flor.checkpointing needs the objects to checkpoint, e.g. flor.checkpointing(model=net" in out
    assert "immutable -> flor.checkpointing cannot restore 'best' (float) in place" in out
    assert "nested -> flor.checkpointing is already active in this run; pass all objects to one" in out


# -- without torch: numpy, plain values, pickled objects, and timings --------------------------------

PLAIN = """
import time
import numpy as np
import flordb_build as flor

class Tracker:
    def __init__(self):
        self.best = None
        self.seen = []

weights = np.zeros(5)
stats = {"lr": 0.1, "history": []}
tracker = Tracker()
with flor.checkpointing(weights=weights, stats=stats, tracker=tracker):
    for epoch in flor.loop("epoch", range(4)):
        for batch in flor.loop("batch", range(3)):
            weights += 1
            time.sleep(0.01)
        stats["history"].append(epoch)
        stats["lr"] /= 2
        tracker.best = float(weights.sum())
        tracker.seen.append(epoch)
        time.sleep(0.2)
        flor.log("total", float(weights.sum()))
time.sleep(0.1)
"""


class Tracker:
    """Like the script's class, which cloudpickle stores by value with its instances."""

    def __init__(self) -> None:
        self.best: float | None = None
        self.seen: list[int] = []


def test_numpy_plain_and_pickled_objects_restore_in_place_without_torch(project: Any) -> None:
    project.write("plain.py", PLAIN)
    project.run("plain.py")
    rows = _checkpoints(project.root)
    run_id = rows[0][0]
    assert {0, 3} <= {r[1] for r in rows}  # tiny state: the first passes the invariant; the last always
    # the objects, and the random generators' states a replay restores (training_state.py), at the
    # epochs' ends and where their nested loop ended (CheckpointPoint)
    formats = {"weights": "numpy", "stats": "json", "tracker": "pickle", "flor.rng": "json"}
    # and with the first checkpoint, where the main loop started; with a nested point after an epoch
    # that took none, that epoch's end (issue 12.9: what a replay compares its generators with)
    earlier = {"nested:flor.rng_start": "json", "nested:flor.rng_before": "json"}
    stored = {r[2]: r[5] for r in rows}
    assert stored.items() - earlier.items() == {**formats, **{"nested:" + name: f for name, f in formats.items()}}.items()
    assert "nested:flor.rng_start" in stored

    weights = __import__("numpy").full(5, -1.0)
    stats: dict[str, Any] = {"lr": 9.0, "history": ["junk"], "extra": 1}
    restored = flor.load_checkpoint({"run_id": run_id, "epoch": 3}, weights=weights, stats=stats)
    assert restored["weights"] is weights and weights.tolist() == [12.0] * 5
    assert stats == {"lr": 0.1 / 16, "history": [0, 1, 2, 3]}

    tracker = Tracker()
    with pytest.raises(CheckpointError, match="weights_only=False"):
        flor.load_checkpoint({"run_id": run_id, "epoch": 0}, tracker=tracker)
    assert tracker.seen == []  # refused before anything was restored
    flor.load_checkpoint({"run_id": run_id, "epoch": 0}, weights_only=False, tracker=tracker)
    assert tracker.seen == [0] and tracker.best == 15.0

    # timings: prefix, one row per outer iteration, nested-loop time, suffix, and the restores
    timings = _timings(project.root, run_id)
    with _db(project.root) as conn:
        outer = [c for (c,) in conn.execute(
            "SELECT ctx_id FROM loops WHERE run_id = ? AND parent_ctx = 0 ORDER BY iteration", (run_id,)
        )]
    assert len(outer) == 4
    for ctx in outer:
        assert timings[(ctx, "iteration")] >= 0.2 + 0.03
        assert 0.03 <= timings[(ctx, "inner")] < timings[(ctx, "iteration")]
    assert timings[(0, "prefix")] >= 0 and timings[(0, "suffix")] >= 0.1
    assert (outer[3], "restore") in timings and (outer[0], "restore") in timings


def test_every_run_gets_timings_even_without_checkpointing(project: Any) -> None:
    project.write(
        "noloop.py",
        "import time\nimport flordb_build as flor\nflor.log('x', 1)\ntime.sleep(0.2)\n",
    )
    project.write(
        "loops.py",
        """
        import time
        import flordb_build as flor
        time.sleep(0.1)
        for e in flor.loop("epoch", range(3)):
            for s in flor.loop("step", range(2)):
                time.sleep(0.02)
            flor.log("e", e)
        for t in flor.loop("test", range(2)):
            pass
        time.sleep(0.1)
        """,
    )
    project.run("noloop.py")
    project.run("loops.py")
    with _db(project.root) as conn:
        runs = dict(conn.execute("SELECT filename, run_id FROM runs").fetchall())
        assert conn.execute("SELECT COUNT(*) FROM checkpoints").fetchone()[0] == 0
    plain = _timings(project.root, runs["noloop.py"])
    assert set(plain) == {(0, "prefix"), (0, "startup")} and plain[(0, "prefix")] >= 0.2
    # Start-up is the interpreter and imports before the first flor call: the prefix holds it and,
    # after it, the 0.2 s sleep (a relation, not a wall-clock bound: the machine may be busy).
    assert 0 < plain[(0, "startup")] <= plain[(0, "prefix")] - 0.2
    looped = _timings(project.root, runs["loops.py"])
    assert sum(1 for _, kind in looped if kind == "iteration") == 5  # 3 epochs + 2 test iterations
    assert sum(1 for _, kind in looped if kind == "inner") == 3
    assert looped[(0, "prefix")] >= 0.1 and looped[(0, "suffix")] >= 0.1
    assert (0, "between") in looped
    # The sleep before the first flor call is start-up; the prefix holds it too.
    assert 0.1 <= looped[(0, "startup")] <= looped[(0, "prefix")]


def test_the_prefix_records_the_imports_after_the_first_flor_call(project: Any) -> None:
    # Issue 16: a script that imports lazily inside its prefix (torch.optim.SGD imports
    # torch._dynamo) has those imports in its recorded prefix after `startup`; a warm replay whose
    # server learned them skips them, so the record times them (kind `imports`, import_timer.py).
    project.write("slowmod.py", "import time\ntime.sleep(0.2)\nVALUE = 1\n")
    project.write(
        "lazy.py",
        """
        import builtins
        import time
        import flordb_build as flor
        original = builtins.__import__
        flor.arg("seed", 0)
        import slowmod
        time.sleep(0.1)
        for e in flor.loop("epoch", range(2)):
            import json  # a loaded module: a look-up, never timed
            flor.log("restored", builtins.__import__ is original)  # the loop runs without the timer
        """,
    )
    project.write("eager.py", "import time\nimport flordb_build as flor\nflor.log('x', 1)\ntime.sleep(0.1)\n")
    project.run("lazy.py")
    project.run("eager.py")
    with _db(project.root) as conn:
        runs = dict(conn.execute("SELECT filename, run_id FROM runs").fetchall())
        restored = [v for (v,) in conn.execute("SELECT value FROM logs WHERE name = 'restored'")]
    lazy = _timings(project.root, runs["lazy.py"])
    # The import of slowmod (its 0.2 s sleep) is in the prefix after start-up; the 0.1 s sleep is not an import.
    assert 0 < lazy[(0, "imports")] <= lazy[(0, "prefix")] - lazy[(0, "startup")] - 0.1
    assert lazy[(0, "imports")] >= 0.2
    assert restored and all(str(v).lower() in ("1", "true") for v in restored), restored
    # Nothing imported after the first flor call: no `imports` row (older records lack it too).
    assert (0, "imports") not in _timings(project.root, runs["eager.py"])


# -- torch --------------------------------------------------------------------------------------------


def _torch_project(project: Any) -> dict[str, Any]:
    pytest.importorskip("torch")
    project.write("model_def.py", MODEL_DEF)
    project.write("train.py", TRAIN)
    return runpy.run_path(str(project.root / "model_def.py"))


def test_slow_epochs_checkpoint_every_epoch_and_epoch_3_reproduces_val_loss(project: Any) -> None:
    model_def = _torch_project(project)
    project.run("train.py")
    frame = flor.dataframe("val_loss")
    assert list(frame["epoch"]) == [0, 1, 2, 3, 4, 5]
    run_id = frame["run_id"].iloc[0]
    assert checkpointed_iterations(run_id) == [0, 1, 2, 3, 4, 5]

    net, opt, sched = model_def["make_training"]()
    _, _, xv, yv = model_def["make_data"]()
    row = frame[frame["epoch"] == 3].iloc[0]
    assert model_def["val_loss"](net, xv, yv) != row["val_loss"]
    flor.load_checkpoint(row, model=net, optimizer=opt, scheduler=sched, map_location="cpu")
    assert model_def["val_loss"](net, xv, yv) == row["val_loss"]  # exactly, not approximately
    assert sched.last_epoch == 4 and len(opt.state_dict()["state"]) == 4

    with pytest.raises(CheckpointNotFoundError, match=r"no checkpoint at epoch 9; it has checkpoints at epoch 0, 1, 2, 3, 4, 5"):
        flor.load_checkpoint({"run_id": run_id, "epoch": 9}, model=net)
    with pytest.raises(CheckpointError, match="no object named 'ema'"):
        flor.load_checkpoint(row, ema=net)
    # a run-level row (no loop column) points at the final checkpoint
    final = restore_objects(run_id, None, {"model": net})
    assert final.iteration == 5 and model_def["val_loss"](net, xv, yv) == frame["val_loss"].iloc[-1]
    # restores were timed, and they refine c for the next recording of this script
    assert refine_restore_factor(load_config(), "train.py") != DEFAULT_RESTORE_FACTOR


def test_64mb_state_with_instant_epochs_checkpoints_rarely_but_always_the_final(project: Any) -> None:
    torch = pytest.importorskip("torch")
    project.write(
        "big.py",
        """
        import torch
        import flordb_build as flor
        big = torch.zeros(16 * 1024 * 1024)  # 64 MB of float32
        step = torch.zeros(1)
        with flor.checkpointing(big=big, step=step):
            for epoch in flor.loop("epoch", range(30)):
                big[epoch] = epoch + 1
                step += 1
                flor.log("step", step.item())
        """,
    )
    project.run("big.py")
    rows = _checkpoints(project.root)
    iterations = sorted({r[1] for r in rows})
    assert 29 in iterations
    assert len(iterations) <= 3, iterations
    big, step = torch.empty(16 * 1024 * 1024), torch.zeros(1)
    flor.load_checkpoint({"run_id": rows[0][0], "epoch": 29}, big=big, step=step)
    assert step.item() == 30 and big[:30].tolist() == [float(i + 1) for i in range(30)]


def test_corrupted_objects_make_load_checkpoint_fail_naming_the_checkpoint(project: Any) -> None:
    model_def = _torch_project(project)
    project.run("train.py", "--kwargs", "epochs=4", "pause=0.05")
    rows = [r for r in _checkpoints(project.root) if r[1] == 3]
    run_id = rows[0][0]
    store = ObjectStore.for_config(load_config())
    model_sha = next(r[3] for r in rows if r[2] == "model")
    path = store.path_of(model_sha)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))

    net, opt, _ = model_def["make_training"]()
    before = [p.clone() for p in net.parameters()]
    with pytest.raises(CheckpointCorruptError, match=rf"run '{run_id}' at epoch 3.*object 'model'.*corrupted"):
        flor.load_checkpoint({"run_id": run_id, "epoch": 3}, optimizer=opt, model=net)
    assert all((a == b).all() for a, b in zip(before, net.parameters(), strict=True))  # nothing restored
    path.unlink()
    with pytest.raises(CheckpointCorruptError, match=r"object 'model'.*missing"):
        flor.load_checkpoint({"run_id": run_id, "epoch": 3}, model=net)


def test_two_runs_with_identical_state_store_each_object_once(project: Any) -> None:
    _torch_project(project)
    project.run("train.py", "--kwargs", "epochs=2", "pause=0.2")
    project.run("train.py", "--kwargs", "epochs=2", "pause=0.2")
    rows = _checkpoints(project.root)
    by_run: dict[str, set[str]] = {}
    for run_id, _, name, sha, _, _ in rows:
        # Python's own generator is seeded from the OS in each process; which epochs also keep their
        # nested point depends on timing (the adaptive rule decides there)
        if name != "flor.rng" and not name.startswith("nested:"):
            by_run.setdefault(run_id, set()).add(sha)
    assert len(by_run) == 2
    first, second = by_run.values()
    assert first == second and len(first) >= 4
    files = list(ObjectStore.for_config(load_config()).iter_objects())
    assert sorted(f.sha256 for f in files) == sorted({r[3] for r in rows})
    assert {r[3] for r in rows if r[2].startswith("nested:") and "flor.rng" not in r[2]} - first <= {
        r[3] for r in rows if r[2] == "nested:optimizer" or r[2] == "nested:scheduler"
    }  # a nested point differs from the epoch's end only where the scheduler stepped after it

    # the store is a cache of the snapshots: checkpoints and timings come back from the journals
    with _db(project.root) as conn:
        timings = conn.execute("SELECT * FROM timings ORDER BY run_id, ctx_id, kind").fetchall()
    for suffix in ("", "-wal", "-shm"):
        (project.root / ".flor" / f"flor.db{suffix}").unlink(missing_ok=True)
    project.cli("rebuild")
    assert _checkpoints(project.root) == rows
    with _db(project.root) as conn:
        assert conn.execute("SELECT * FROM timings ORDER BY run_id, ctx_id, kind").fetchall() == timings


def test_sigkilled_run_leaves_consistent_checkpoints_and_timings(project: Any) -> None:
    model_def = _torch_project(project)
    proc = project.run("train.py", "--kwargs", "epochs=8", "pause=0.2", "kill_at=3", check=False)
    assert proc.returncode == -9
    rows = _checkpoints(project.root)
    run_id = rows[0][0]
    store = ObjectStore.for_config(load_config())
    for _, _, _, sha, size, _ in rows:
        assert len(store.get(sha)) == size  # every row's object exists and verifies
    # checkpoints with their iteration's end (a kill between an epoch's nested point and its end
    # leaves only the former, which loading from a row never picks)
    iterations = sorted({r[1] for r in rows if not r[2].startswith("nested:")})
    assert iterations and iterations[-1] <= 3
    timed = [k for k in _timings(project.root, run_id) if k[1] == "iteration"]
    assert 1 <= len(timed) <= 4
    net, _, _ = model_def["make_training"]()
    flor.load_checkpoint({"run_id": run_id, "epoch": iterations[-1]}, model=net)
    assert flor.query("SELECT status FROM runs WHERE run_id = ?", (run_id,))["status"].iloc[0] == "killed"


def test_checkpoint_every_fixes_the_restore_points_whatever_the_timing(project: Any) -> None:
    """``checkpoint_every = N``: iterations N-1, 2N-1, ... and the last one, however slow the writer is."""
    _torch_project(project)
    project.write("pyproject.toml", "[tool.flordb_build]\ncheckpoint_every = 2\n")
    project.run("train.py", "--kwargs", "epochs=5", "pause=0")
    assert sorted({r[1] for r in _checkpoints(project.root)}) == [1, 3, 4]


def test_gc_applies_budgets_keeping_final_and_evenly_spaced_checkpoints(project: Any) -> None:
    _torch_project(project)
    # Every epoch checkpointed whatever the timing (the adaptive rule would make the count depend
    # on how fast this machine serializes the model).
    project.write("pyproject.toml", "[tool.flordb_build]\ncheckpoint_every = 1\n")
    project.run("train.py", "--kwargs", "epochs=6", "pause=0.15")
    rows = _checkpoints(project.root)
    run_id = rows[0][0]
    its = sorted({r[1] for r in rows})
    assert its == [0, 1, 2, 3, 4, 5]
    # A budget that holds the two checkpoints gc keeps (2 and 5, evenly spaced) and no third: the
    # bytes of their objects, each counted once (checkpoints may share one, e.g. an unchanged
    # generator state), and 5% to spare (a later run's generator state may take a few bytes more
    # as JSON); a third checkpoint adds its own model and optimizer state, far more than that.
    sizes = {r[3]: r[4] for r in rows}
    budget = int(sum(sizes[sha] for sha in {r[3] for r in rows if r[1] in (2, 5)}) * 1.05)
    store = ObjectStore.for_config(load_config())
    orphan = store.put(b"left by a killed run").sha256
    before = {o.sha256 for o in store.iter_objects()}

    project.write(
        "pyproject.toml",
        f"[tool.flordb_build]\ncheckpoint_every = 1\ncheckpoint_budget_per_run = {budget}\n",
    )
    dry = project.cli("gc", "--dry-run")
    assert "would evict checkpoint of run" in dry.stdout and "would free" in dry.stdout
    assert {o.sha256 for o in store.iter_objects()} == before and len(_checkpoints(project.root)) == len(rows)

    done = project.cli("gc")
    assert checkpointed_iterations(run_id) == [its[p] for p in evenly_spaced(its, 2)]
    assert "freed" in done.stdout and f"({len(its) - 2} checkpoints evicted)" in done.stdout
    after = {o.sha256 for o in store.iter_objects()}
    assert orphan not in after
    assert after == {r[3] for r in _checkpoints(project.root)}  # referenced ones stay, others go
    assert project.cli("gc").stdout.strip().startswith("freed 0 B in 0 objects")

    # the per-run budget also applies when a run leaves flor.checkpointing
    project.run("train.py", "--kwargs", "epochs=6", "pause=0.15")
    newest = flor.query("SELECT run_id FROM runs ORDER BY tstamp DESC LIMIT 1")["run_id"].iloc[0]
    kept = checkpointed_iterations(newest)
    assert kept[-1] == 5 and len(kept) == 2


class _DecisionsOnly(Checkpointer):
    """The adaptive rule alone: a fixed M per copy, and checkpoints noted instead of taken."""

    def __init__(self, materialize_seconds: float) -> None:
        from types import SimpleNamespace

        from flordb_build.config import config_of_root

        run = SimpleNamespace(config=config_of_root(Path("/nonexistent-flordb-project"), False), filename="train.py")
        super().__init__(run, {}, CheckpointSettings())  # type: ignore[arg-type]
        self.materialize_seconds = materialize_seconds
        self.taken: list[tuple[int, str]] = []

    def expected_materialize_seconds(self) -> float:
        return self.materialize_seconds

    def checkpoint(self, ctx_id: int, loop_name: str, index: int, seconds: float, point: str = "end", **_: Any) -> None:
        self.taken.append((index, point))
        if point == "end":
            self.checkpoints += 1
            self._last_ctx = ctx_id


def test_single_copies_at_epoch_ends_do_not_starve_the_nested_points() -> None:
    # 1 s epochs whose nested loop ends at 0.9 s, M = 0.2 s a copy, epsilon 0.0667: one copy fits the
    # invariant every ~3 epochs, two copies (a nested point and its end) every ~6. Taking the single
    # copy whenever it fits spent the budget before a nested point ever fitted: no validation replay
    # could skip a step loop.
    rule = _DecisionsOnly(materialize_seconds=0.2)
    for index in range(30):
        rule.end_nested(index + 1, "epoch", index, 0.9)
        rule.end_iteration(index + 1, "epoch", index, 1.0)
    nested = [i for i, point in rule.taken if point == "nested"]
    ends = [i for i, point in rule.taken if point == "end"]
    assert len(nested) >= 3, rule.taken
    assert ends == nested, rule.taken  # every restore point of these epochs can validate
