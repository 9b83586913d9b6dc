"""Nothing lost, nothing leaked (issue 10): odd values, failed writes, full and read-only disks,
forked workers, stop signals. Real scripts in subprocesses, real git, real SQLite, real mounts.

Tests that wait for a script to reach a point wait on a line it prints (or on a file), never on
a fixed sleep.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import flordb_build as flor
from flordb_build.errors import FlorBuildWarning
from tests.conftest import GIT_ENV, Project

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs or a read-only bind needs root")


def rows(project: Project, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(project.root / ".flor" / "flor.db")
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def _hangup_as_in_a_terminal() -> None:
    # A suite run under nohup hands its ignored SIGHUP down to every child, and a run rightly keeps
    # a signal its parent ignored (nohup's promise): a SIGHUP test's script would run on forever.
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def start(project: Project, script: str, *args: str, new_session: bool = False) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, script, *args],
        cwd=project.root,
        env={**os.environ, **GIT_ENV},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=new_session,
        preexec_fn=_hangup_as_in_a_terminal,
    )


def wait_for_line(proc: subprocess.Popen[str], expected: str, hang_seconds: float = 300.0) -> None:
    """Read the script's output until it prints ``expected``. A script that hangs instead is killed
    after ``hang_seconds`` (far more than any of these needs on a loaded machine), so the test fails
    with its output rather than holding up the suite forever."""
    assert proc.stdout is not None
    watchdog = threading.Timer(hang_seconds, proc.kill)
    watchdog.start()
    try:
        for line in proc.stdout:
            if line.strip() == expected:
                return
    finally:
        watchdog.cancel()
    raise AssertionError(
        f"the script ended (or hung and was killed after {hang_seconds:.0f} s) before printing {expected!r}: "
        f"{proc.communicate()}"
    )


# -- values SQLite cannot hold -------------------------------------------------------------------

ODD_VALUES = """
import numpy as np
import flordb_build as flor

class Unprintable:
    def __str__(self):
        raise RuntimeError("no str")
    __repr__ = __str__

circular = [1]
circular.append(circular)
seed = flor.arg("seed", 0)
for i in flor.loop("i", range(3)):
    flor.log("big", 2**64 + i)
    flor.log("negative", -(2**70))
    flor.log("u64", np.uint64(2**64 - 1))
    flor.log("entropy", np.random.SeedSequence(2**100 + i).entropy)
    flor.log("surrogate", "a\\udc80b")
    flor.log("tuple_keys", {(1, 2): i})
    flor.log("circular", circular)
    flor.log("unprintable", Unprintable())
    flor.log("loss", 1.0 / (i + 1))
print("done", seed)
"""


def test_values_sqlite_cannot_hold_never_fail_and_never_poison_the_run(project: Project) -> None:
    project.write("odd.py", ODD_VALUES)
    proc = project.run("odd.py", "--kwargs", "seed=18446744073709551616")
    assert proc.stdout.split() == ["done", "18446744073709551616"]
    assert "Traceback" not in proc.stderr
    for name in ("tuple_keys", "circular", "unprintable"):  # one warning per name, not per value
        assert proc.stderr.count(f"FlorBuildWarning: flor.log('{name}')") == 1, proc.stderr
    assert proc.stderr.count("FlorBuildWarning") == 3, proc.stderr
    assert rows(project, "SELECT status FROM runs") == [("ok",)]

    frame = flor.dataframe("seed", "big", "negative", "u64", "entropy", "surrogate", "tuple_keys", "unprintable", "loss")
    assert len(frame) == 3
    assert frame["seed"].tolist() == [2**64] * 3
    assert frame["big"].tolist() == [2**64, 2**64 + 1, 2**64 + 2]  # exact, and still ints
    assert frame["negative"].tolist() == [-(2**70)] * 3
    assert frame["u64"].tolist() == [2**64 - 1] * 3
    assert frame["entropy"].tolist() == [2**100, 2**100 + 1, 2**100 + 2]
    assert frame["surrogate"].tolist() == ["a\udc80b"] * 3  # the very same str
    assert frame["tuple_keys"].tolist() == ["{(1, 2): 0}", "{(1, 2): 1}", "{(1, 2): 2}"]
    assert frame["unprintable"].iloc[0].startswith("<unprintable ")
    assert frame["loss"].tolist() == [1.0, 0.5, 1.0 / 3]  # the rows after the odd ones are all there
    project.cli("rebuild")  # the journal holds them as exactly
    assert flor.dataframe("big")["big"].tolist() == [2**64, 2**64 + 1, 2**64 + 2]


# -- writes that fail for a while ----------------------------------------------------------------

PAUSED_TRAIN = """
import os, sys, time
import flordb_build as flor
from flordb_build import runtime

n = int(sys.argv[1])
for phase in flor.loop("phase", range(2)):
    for step in flor.loop("step", range(n)):
        flor.log("loss", phase * n + step)
    if phase == 0:
        runtime.SESSION.run.flush()
        print("first half stored", flush=True)
        sys.stdin.readline()  # the test makes the store refuse writes now
# the loop boundary handed the second half to the flusher: wait until a write of it failed
while runtime.SESSION.run.write_failures == 0:
    time.sleep(0.01)
print("a write failed", flush=True)
sys.stdin.readline()  # the test lets the store take writes again
flor.log("final", 1)
print("end", flush=True)
"""


def test_a_store_locked_past_the_busy_timeout_loses_nothing(project: Project) -> None:
    project.write("pyproject.toml", "[tool.flordb_build]\nbusy_timeout_seconds = 0.1\n")
    project.write("train.py", PAUSED_TRAIN)
    proc = start(project, "train.py", "2000")
    wait_for_line(proc, "first half stored")
    holder = sqlite3.connect(project.root / ".flor" / "flor.db", isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # another writer holds the lock far past the busy timeout
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        wait_for_line(proc, "a write failed")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    out, err = proc.communicate("go\n", timeout=300)
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert rows(project, "SELECT status FROM runs") == [("ok",)]
    assert flor.dataframe("loss")["loss"].tolist() == list(range(4000))
    assert flor.dataframe("final")["final"].tolist() == [1]


@pytest.fixture
def small_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Project, Path]]:
    """A project on an 8 MB tmpfs of its own, and the mount point."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], check=True)
    try:
        project = Project(disk / "proj")
        project.root.mkdir()
        project.git("init", "-q", "-b", "main")
        project.write("README.md", "# test\n")
        project.commit_all("initial")
        monkeypatch.chdir(project.root)
        yield project, disk
    finally:
        monkeypatch.chdir(tmp_path)
        subprocess.run(["umount", str(disk)], check=True)


def fill(path: Path) -> None:
    with open(path, "wb", buffering=0) as filler:
        try:
            while True:
                filler.write(b"\0" * 65536)
        except OSError:
            pass
        try:
            while True:
                filler.write(b"\0" * 512)
        except OSError:
            pass


@needs_root
def test_a_disk_full_for_a_while_loses_nothing(small_disk: tuple[Project, Path]) -> None:
    project, disk = small_disk
    project.write("train.py", PAUSED_TRAIN)
    proc = start(project, "train.py", "200")
    wait_for_line(proc, "first half stored")
    fill(disk / "filler")
    assert proc.stdin is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()
    wait_for_line(proc, "a write failed")
    (disk / "filler").unlink()
    out, err = proc.communicate("go\n", timeout=300)
    assert proc.returncode == 0 and "Traceback" not in err and "FlorBuildWarning" not in err, err
    assert rows(project, "SELECT status FROM runs") == [("ok",)]
    assert flor.dataframe("loss")["loss"].tolist() == list(range(400))
    journal = next((project.root / ".flor" / "runs").glob("*.jsonl"))
    assert all(line.endswith("}") for line in journal.read_text().splitlines())  # whole lines only
    project.cli("rebuild")  # and the journal holds every row too
    assert flor.dataframe("loss")["loss"].tolist() == list(range(400))


FULL_TO_THE_END = """
import sys
import flordb_build as flor
from flordb_build import recording, runtime
recording.CLOSE_RETRY_SECONDS = 0.5
flor.log("first", 1)
runtime.SESSION.run.flush()
print("stored", flush=True)
sys.stdin.readline()  # the disk is full from now on
for step in flor.loop("step", range(100)):
    flor.log("loss", step)
print("training finished", flush=True)
"""


@needs_root
def test_a_disk_full_to_the_end_lets_the_training_finish_with_one_warning(small_disk: tuple[Project, Path]) -> None:
    project, disk = small_disk
    project.write("train.py", FULL_TO_THE_END)
    proc = start(project, "train.py")
    wait_for_line(proc, "stored")
    fill(disk / "filler")
    out, err = proc.communicate("go\n", timeout=300)
    assert proc.returncode == 0 and "training finished" in out
    assert "Traceback" not in err and err.count("FlorBuildWarning") == 1, err
    assert "not fully recorded" in err and "row(s) could not be written" in err
    (disk / "filler").unlink()
    # What was stored before stays; the run is not left 'running' for ever, and readers are told.
    ((status, error),) = rows(project, "SELECT status, error FROM runs")
    assert status == "incomplete" and "row(s) could not be written" in str(error)
    assert "incomplete" in project.cli("runs").stdout
    with pytest.warns(FlorBuildWarning, match="not fully recorded"):
        assert flor.dataframe("first")["first"].tolist() == [1]


TRAIN = """
import flordb_build as flor
for epoch in flor.loop("epoch", range(3)):
    flor.log("loss", 1.0 / (epoch + 1))
print("training finished", flush=True)
"""


@needs_root
def test_a_read_only_flor_lets_the_training_finish_with_one_warning(project: Project) -> None:
    project.write("train.py", TRAIN)
    project.run("train.py")  # a store exists; now its folder becomes read-only
    flor_dir = project.root / ".flor"
    subprocess.run(["mount", "--bind", str(flor_dir), str(flor_dir)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(flor_dir)], check=True)
        proc = project.run("train.py", check=False)
    finally:
        subprocess.run(["umount", str(flor_dir)], check=True)
    assert proc.returncode == 0 and "training finished" in proc.stdout
    assert "Traceback" not in proc.stderr and proc.stderr.count("FlorBuildWarning") == 1, proc.stderr
    assert "nothing of this run is recorded" in proc.stderr and "flor.db" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert rows(project, "SELECT count(*) FROM runs") == [(1,)]


# -- the journal line comes first ----------------------------------------------------------------

KILLED_IN_WRITE = """
import os, signal
import flordb_build as flor
from flordb_build import runtime
from flordb_build.store import Store

write_batch = Store.write_batch

def write_or_die(self, run_id, loops, logs, *args, **kwargs):
    columns = kwargs.get("columns", ())
    if any(row[2] == "loss" and row[3] == 1 for row in logs) or any(
        c.name == "loss" and 1 in c.vals for c in columns
    ):  # killed between journal line and transaction
        os.kill(os.getpid(), signal.SIGKILL)
    return write_batch(self, run_id, loops, logs, *args, **kwargs)

Store.write_batch = write_or_die
for epoch in flor.loop("epoch", range(2)):
    flor.log("loss", epoch)
    runtime.SESSION.run.flush()
"""


def test_a_kill_between_journal_and_store_loses_no_batch_on_rebuild(project: Project) -> None:
    project.write("killed.py", KILLED_IN_WRITE)
    assert project.run("killed.py", check=False).returncode == -signal.SIGKILL
    assert flor.dataframe("loss")["loss"].tolist() == [0]
    project.cli("rebuild")
    assert flor.dataframe("loss")["loss"].tolist() == [0, 1]


# -- lock files of killed runs -------------------------------------------------------------------

WAITING = """
import sys
import flordb_build as flor
flor.log("x", 1)
print("running", flush=True)
sys.stdin.readline()
"""


def test_lock_files_of_killed_runs_are_cleaned_and_live_ones_kept(project: Project) -> None:
    project.write("killed.py", "import os, signal\nimport flordb_build as flor\nflor.log('x', 1)\n"
                  "os.kill(os.getpid(), signal.SIGKILL)\n")
    project.write("waiting.py", WAITING)
    project.write("train.py", TRAIN)
    for _ in range(3):
        assert project.run("killed.py", check=False).returncode == -signal.SIGKILL
    locks = project.root / ".flor" / "locks"
    assert len(list(locks.glob("*.lock"))) == 1  # each run's open cleaned the killed one before it
    live = start(project, "waiting.py")
    try:
        wait_for_line(live, "running")
        project.run("train.py")
        assert len(list(locks.glob("*.lock"))) == 1  # the live run's only
    finally:
        out, err = live.communicate("\n", timeout=300)
    assert live.returncode == 0, err
    assert sorted(s for (s,) in rows(project, "SELECT status FROM runs")) == ["killed"] * 3 + ["ok"] * 2
    assert list(locks.glob("*.lock")) == []


# -- stop signals --------------------------------------------------------------------------------

LONG_TRAIN = """
import sys, time
import flordb_build as flor
for epoch in flor.loop("epoch", range(10**9)):
    flor.log("loss", epoch)
    if epoch == 99:
        from flordb_build import runtime
        runtime.SESSION.run.flush()
        print("ready", flush=True)
    if epoch >= 99:
        time.sleep(0.001)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_flush_mark_snapshot_and_exit_by_the_signal(project: Project, sig: int) -> None:
    project.write("train.py", LONG_TRAIN)
    proc = start(project, "train.py")
    wait_for_line(proc, "ready")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == -sig, err
    assert "Traceback" not in err, err
    ((status, exit_code, error, snapshot),) = rows(project, "SELECT status, exit_code, error, snapshot FROM runs")
    assert (status, exit_code) == ("interrupted", 128 + sig) and signal.Signals(sig).name in str(error)
    assert snapshot and project.git("rev-parse", "flor.shadow").strip() == snapshot
    losses = flor.dataframe("loss")["loss"].tolist()
    assert losses[:100] == list(range(100)) and losses == list(range(len(losses)))  # a prefix, no holes


USER_HANDLER = """
import signal, sys
import flordb_build as flor

def handler(signum, frame):
    print("user handler", flush=True)
    sys.exit(0)

signal.signal(signal.SIGTERM, handler)
flor.log("x", 1)
print("ready", flush=True)
signal.pause()
"""


def test_a_signal_handler_of_the_user_is_kept(project: Project) -> None:
    project.write("train.py", USER_HANDLER)
    proc = start(project, "train.py")
    wait_for_line(proc, "ready")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and out.strip() == "user handler", err
    assert rows(project, "SELECT status FROM runs") == [("ok",)]


DOUBLE_CTRL_C = """
import os, time
import flordb_build as flor
from flordb_build import snapshot

commit_snapshot = snapshot.commit_snapshot

def slow_commit(*args, **kwargs):
    print("closing", flush=True)
    while not os.path.exists("go"):  # the test presses Ctrl-C again meanwhile
        time.sleep(0.01)
    return commit_snapshot(*args, **kwargs)

snapshot.commit_snapshot = slow_commit
for epoch in flor.loop("epoch", range(10**9)):
    flor.log("loss", epoch)
    if epoch == 10:
        print("ready", flush=True)
    time.sleep(0.001)
"""


def test_a_second_ctrl_c_while_the_run_closes_loses_neither_snapshot_nor_prints_a_traceback(
    project: Project,
) -> None:
    project.write("train.py", DOUBLE_CTRL_C)
    proc = start(project, "train.py", new_session=True)  # its own process group, as a terminal's job
    wait_for_line(proc, "ready")
    os.killpg(proc.pid, signal.SIGINT)
    wait_for_line(proc, "closing")
    os.killpg(proc.pid, signal.SIGINT)
    (project.root / "go").write_text("")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode in (-signal.SIGINT, 130), err
    assert "atexit" not in err and err.count("Traceback") == 1 and "KeyboardInterrupt" in err, err
    ((status, exit_code, snapshot),) = rows(project, "SELECT status, exit_code, snapshot FROM runs")
    assert (status, exit_code) == ("interrupted", 130) and snapshot


# -- forked children -----------------------------------------------------------------------------

POOL = """
import multiprocessing as mp
import sys
import flordb_build as flor

def work(i):
    with flor.iteration("item", i):
        flor.log("square", i * i)
    return i

if __name__ == "__main__":
    mp.set_start_method("fork")
    flor.arg("workers", 4)
    if sys.argv[1] == "with":  # the pool's __exit__ terminates the workers (SIGTERM)
        with mp.Pool(4) as pool:
            done = pool.map(work, range(192), chunksize=4)
    else:  # close and join: the workers leave by os._exit after their last task
        pool = mp.Pool(4)
        done = pool.map(work, range(192), chunksize=4)
        pool.close()
        pool.join()
    flor.log("done", len(done))
"""


@pytest.mark.parametrize("ending", ["with", "join"])
def test_values_logged_in_pool_workers_are_kept_in_the_parents_run(project: Project, ending: str) -> None:
    project.write("pool.py", POOL)
    proc = project.run("pool.py", ending)
    assert "Traceback" not in proc.stderr, proc.stderr
    ((run_id, status),) = rows(project, "SELECT run_id, status FROM runs")
    assert status == "ok"
    frame = flor.dataframe("square")
    assert len(frame) == 192 and set(frame["run_id"]) == {run_id}
    assert sorted(frame["square"].tolist()) == sorted(i * i for i in range(192))
    assert sorted(frame["item"].tolist()) == list(range(192))
    assert flor.dataframe("done")["done"].tolist() == [192]
    assert project.git("rev-list", "--count", "flor.shadow").strip() == "1"  # no worker made a snapshot
    project.cli("rebuild")  # the journal (in the snapshot) holds the workers' rows too
    assert len(flor.dataframe("square")) == 192


LOADER = """
import gc
import multiprocessing as mp
import flordb_build as flor

def load(epoch):
    gc.collect()  # a worker that drops what it inherited must not touch the parent's connection

if __name__ == "__main__":
    mp.set_start_method("fork")
    for epoch in flor.loop("epoch", range(20)):
        for step in flor.loop("step", range(50)):
            flor.log("loss", epoch * 50 + step)
        workers = [mp.Process(target=load, args=(epoch,)) for _ in range(2)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
            assert worker.exitcode == 0
"""


def test_forked_workers_that_do_not_log_leave_the_parents_store_alone(project: Project) -> None:
    project.write("loader.py", LOADER)
    proc = project.run("loader.py")
    assert "locked" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert rows(project, "SELECT status FROM runs") == [("ok",)]
    assert flor.dataframe("loss")["loss"].tolist() == list(range(1000))
