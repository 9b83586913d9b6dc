"""The database is a cache of the snapshot commits: delete it, rebuild it, get the same frames."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pytest

import flordb_build as flor
from flordb_build.config import load_config
from flordb_build.dag import init_project
from flordb_build.journalfile import batch_line_rows
from flordb_build.rebuild import PAUSE_ENV, RebuildStep
from flordb_build.store import Store
from tests.conftest import GIT_ENV, Project
from tests.test_dag import doit, make, ml_project, rows, uncomment_example

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


# -- nothing lost, nothing leaked: build context, killed runs, live runs, a kill mid-swap -------

STORE_TABLES = {
    "runs": "run_id",
    "envs": "env_id",  # not `created`: the journal keeps the environment, not when this store first saw it
    "loops": "run_id, name, ctx_id",
    "logs": "run_id, name, source, seq",
    "log_columns": "run_id, name, first_seq",
    "timings": "run_id, ctx_id, kind",
    "checkpoints": "run_id, ctx_id, name",
    "pipelines": "pipeline_id",
    "tasks": "pipeline_id, task",
    "files": "pipeline_id, task, path, role",
}
#: What the files view reads (filesets.py): a recorded store's content-addressed sets rebuild the same.
FILE_SET_TABLES = {"task_files": "pipeline_id, task", "file_sets": "set_id, path, role"}


def store_rows(project: Project, with_sets: bool = False) -> dict[str, list[tuple[object, ...]]]:
    """Every row of every table (envs without `created`), in key order; the file sets' tables too when asked."""
    conn = sqlite3.connect(project.root / ".flor" / "flor.db")
    try:
        tables = {}
        for table, key in {**STORE_TABLES, **(FILE_SET_TABLES if with_sets else {})}.items():
            columns = "env_id, env" if table == "envs" else "*"
            tables[table] = conn.execute(f"SELECT {columns} FROM {table} ORDER BY {key}").fetchall()  # noqa: S608
        return tables
    finally:
        conn.close()


def remove(project: Project, *paths: str) -> None:
    for relpath in paths:
        path = project.root / relpath
        if path.is_dir():
            shutil.rmtree(path)
        for suffix in ("", "-wal", "-shm"):
            Path(str(path) + suffix).unlink(missing_ok=True)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
@pytest.mark.slow
def test_rebuild_from_git_alone_keeps_doit_and_make_build_context(project: Project) -> None:
    ml_project(project)
    assert doit(project).returncode == 0
    init_project(project.root, make=True)  # the same three steps as Make recipes (its example), run again with -B
    makefile = project.root / "Makefile"
    makefile.write_text(uncomment_example(makefile.read_text()))
    built = make(project, "-B")
    assert built.returncode == 0, built.stderr
    doit_id, make_id = (r[0] for r in rows(project, "SELECT pipeline_id FROM pipelines ORDER BY started"))
    assert rows(project, "SELECT tool FROM pipelines ORDER BY started") == [("doit",), ("make",)]
    commands = [
        ("pipelines",), ("tasks", "--pipeline", doit_id), ("tasks", "--pipeline", make_id),
        ("lineage", "predictions.csv"), ("lineage", "data/clean.csv", "--format", "json"),
    ]
    before = store_rows(project)
    answers = [project.cli(*c).stdout for c in commands]
    assert len(before["tasks"]) == 6 and len(before["files"]) == 20 and len(before["runs"]) == 6
    assert f"task 'infer'  (make pipeline {make_id}" in answers[3]

    remove(project, ".flor/flor.db", ".flor/runs", ".flor/pipelines")  # git alone is left
    out = project.cli("rebuild").stdout
    assert store_rows(project) == before
    assert [project.cli(*c).stdout for c in commands] == answers
    assert "6 runs (0 killed)" in out and "2 pipelines, 6 tasks" in out


def test_rebuild_of_up_to_date_doit_runs_keeps_their_shared_file_sets(project: Project) -> None:
    ml_project(project)
    assert doit(project).returncode == 0
    for path in project.root.rglob("*"):  # settled: hashed just after a write, a file's mtime is not kept
        if path.is_file() and not {".git", ".flor"} & set(path.relative_to(project.root).parts):
            os.utime(path, (1_600_000_000, 1_600_000_000))
    for _ in range(2):  # both find every task up to date; the second's facts are the first's sets
        assert doit(project).returncode == 0
    project.write("data/raw.csv", "a\nb\nc\nd\n")  # prep and what follows run again, with new facts
    assert doit(project).returncode == 0
    before = store_rows(project, with_sets=True)
    ids = [r[0] for r in rows(project, "SELECT pipeline_id FROM pipelines ORDER BY started")]
    sets = {(p, t): s for p, t, s in before["task_files"]}
    assert len(ids) == 4 and len(before["tasks"]) == 12
    assert all(sets[(ids[2], task)] == sets[(ids[1], task)] for task in ("prep", "train", "infer"))
    assert sets[(ids[3], "prep")] != sets[(ids[2], "prep")]
    assert len(before["files"]) > len(before["file_sets"])  # shared, not copied

    remove(project, ".flor/flor.db", ".flor/runs", ".flor/pipelines")  # git alone is left
    project.cli("rebuild")
    assert store_rows(project, with_sets=True) == before


KILLED = """
import os, time
import flordb_build as flor
for epoch in flor.loop("epoch", range(3)):
    flor.log("loss", 1.0 / (epoch + 1))
open("ready", "w").close()
while True:
    time.sleep(1)  # killed by the test
"""


def test_rebuild_keeps_killed_runs_checkpoints_and_timings(project: Project) -> None:
    project.write("train.py", REPLAYABLE)
    project.write("killed.py", KILLED)
    project.commit_all("scripts")
    project.run("train.py")
    proc = subprocess.Popen([sys.executable, "killed.py"], cwd=project.root, env={**os.environ, **GIT_ENV})
    try:
        wait_until(lambda: (project.root / "ready").exists() and journaled_logs(project, "killed.py") == 3, proc)
    finally:
        proc.kill()
        proc.wait()
    project.cli("migrate")  # a writing open marks the dead run killed (readers only show it killed)
    before = store_rows(project)
    assert sorted(r[0] for r in flor.query("SELECT status FROM runs").itertuples(index=False)) == ["killed", "ok"]
    assert before["checkpoints"] and before["timings"]

    remove(project, ".flor/flor.db")
    out = project.cli("rebuild").stdout
    assert store_rows(project) == before
    assert "2 runs (1 killed)" in out
    assert flor.dataframe("loss")["loss"].tolist() == [1.0, 0.5, 1.0 / 3]


def journaled_logs(project: Project, script: str) -> int:
    """How many values the on-disk journal of ``script``'s run holds."""
    count = 0
    for path in (project.root / ".flor" / "runs").glob("*.jsonl"):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
        if lines and lines[0].get("run", {}).get("filename") == script:
            count += sum(len(batch_line_rows(line)) for line in lines if "loops" in line)
    return count


def wait_until(condition: Callable[[], bool], proc: subprocess.Popen[str] | None = None) -> None:
    """Wait (generously) for ``condition``; fail at once when ``proc`` ends first."""
    deadline = time.monotonic() + 120
    while not condition():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"{proc.args} exited {proc.returncode} first:\n{out}\n{err}")
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def start(project: Project, *argv: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        list(argv), cwd=project.root, env={**os.environ, **GIT_ENV, **(env or {})},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    """Wait for ``proc`` and collect its output (closing its pipes)."""
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def lock_waiters(project: Project) -> int:
    """Processes waiting in /proc/locks for the store lock (a blocked open, a waiting rebuild)."""
    st = (project.root / ".flor" / "flor.db.lock").stat()
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    return sum(1 for line in Path("/proc/locks").read_text().splitlines() if "->" in line and device in line)


LIVE = """
import os, time
import flordb_build as flor
flor.log("x", 1)
open("ready", "w").close()
while not os.path.exists("go"):
    time.sleep(0.02)
flor.log("y", 2)
"""


def test_rebuild_refuses_while_a_run_is_live_and_waits_with_wait(
    project: Project, reaped: list[subprocess.Popen[str]]
) -> None:
    project.write("live.py", LIVE)
    project.commit_all("live")
    (project.root / "go").touch()
    project.run("live.py")  # an earlier run: there is a shadow branch to rebuild from
    (project.root / "ready").unlink()
    (project.root / "go").unlink()
    run = start(project, sys.executable, "live.py")
    reaped.append(run)
    wait_until((project.root / "ready").exists, run)
    (run_id,) = rows(project, "SELECT run_id FROM runs WHERE status = 'running'")[0]
    refused = project.cli("rebuild", check=False)
    assert refused.returncode == 1
    assert f"'{run_id}' (live.py, pid {run.pid})" in refused.stderr and "--wait" in refused.stderr
    assert rows(project, "SELECT status FROM runs WHERE run_id = ?", (run_id,)) == [("running",)]

    waiting = start(project, sys.executable, "-m", "flordb_build", "rebuild", "--wait")
    reaped.append(waiting)
    wait_until(lambda: lock_waiters(project) == 1, waiting)  # blocked on the live run's lock
    (project.root / "go").touch()
    assert finish(run)[0] == 0
    code, out, err = finish(waiting)
    assert code == 0, err
    assert "2 runs (0 killed)" in out
    frame = flor.dataframe("x", "y")
    assert frame[frame["run_id"] == run_id][["x", "y"]].values.tolist() == [[1, 2]]


SMALL = """
import flordb_build as flor
flor.log("z", 3)
"""


def pause_rebuild(project: Project, pause: Path) -> subprocess.Popen[str]:
    pause.mkdir(exist_ok=True)
    return start(project, sys.executable, "-m", "flordb_build", "rebuild", env={PAUSE_ENV: str(pause)})


def run_to(proc: subprocess.Popen[str], pause: Path, step: RebuildStep) -> None:
    """Let a paused rebuild go on (taking each earlier step's marker away) until it pauses at ``step``."""
    steps = list(RebuildStep)

    def paused_at_step() -> bool:
        for earlier in steps[: steps.index(step)]:
            (pause / earlier.value).unlink(missing_ok=True)
        return (pause / step.value).exists()

    wait_until(paused_at_step, proc)


@pytest.fixture
def reaped() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test starts; whatever is still running at its end is killed (a paused rebuild)."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_an_open_during_rebuild_waits_and_then_sees_the_new_store(
    project: Project, tmp_path: Path, reaped: list[subprocess.Popen[str]]
) -> None:
    project.write("small.py", SMALL)
    project.commit_all("small")
    project.run("small.py")
    pause = tmp_path / "pause"
    rebuild = pause_rebuild(project, pause)
    reaped.append(rebuild)
    run_to(rebuild, pause, RebuildStep.BUILT)  # the lock is held; the new file is not in place yet
    run = start(project, sys.executable, "small.py")
    reaped.append(run)
    wait_until(lambda: lock_waiters(project) == 1, run)  # its first flor.log waits for the rebuild
    run_to(rebuild, pause, RebuildStep.REPLACED)
    (pause / RebuildStep.REPLACED.value).unlink()
    assert finish(rebuild)[0] == 0
    assert finish(run)[0] == 0
    assert flor.dataframe("z")["z"].tolist() == [3, 3]  # the run wrote into the new store


@pytest.mark.slow
def test_a_rebuild_killed_at_any_step_of_the_swap_leaves_a_usable_store(
    project: Project, tmp_path: Path, reaped: list[subprocess.Popen[str]]
) -> None:
    project.write("train.py", REPLAYABLE)
    project.commit_all("train")
    project.run("train.py")
    project.run("train.py")
    before = store_rows(project)
    for step in RebuildStep:
        pause = tmp_path / step.value
        rebuild = pause_rebuild(project, pause)
        reaped.append(rebuild)
        run_to(rebuild, pause, step)
        rebuild.kill()
        finish(rebuild)
        assert store_rows(project) == before, step  # the old store or the new one, whole
        store = Store.open(load_config())
        try:
            assert store.conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)], step
        finally:
            store.close()
        assert len(flor.dataframe("val")) == 6, step
    assert "2 runs" in project.cli("rebuild").stdout  # and a rebuild after all that completes
    assert store_rows(project) == before


def test_rebuild_keeps_a_doit_pipeline_killed_before_its_commit(project: Project, reaped: list[subprocess.Popen[str]]) -> None:
    project.write(
        "dodo.py",
        f"""
        PY = {sys.executable!r}

        def task_quick():
            return {{"actions": [PY + " -c 'open(\\"quick.txt\\", \\"w\\").write(\\"q\\")'"], "targets": ["quick.txt"]}}

        def task_stuck():
            return {{"actions": [PY + " -c 'import time; time.sleep(600)'"], "task_dep": ["quick"]}}
        """,
    )
    project.commit_all("pipeline")
    init_project(project.root)
    doit_proc = subprocess.Popen(
        [sys.executable, "-m", "doit"], cwd=project.root, env={**os.environ, **GIT_ENV}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    reaped.append(doit_proc)
    journals = project.root / ".flor" / "pipelines"
    wait_until(lambda: any('"quick"' in p.read_text() for p in journals.glob("*.jsonl")), doit_proc)
    os.killpg(doit_proc.pid, signal.SIGKILL)  # doit and its stuck task: no end, no commit
    finish(doit_proc)
    before = store_rows(project)
    assert [r[1] for r in before["tasks"]] == ["quick"] and len(before["pipelines"]) == 1
    assert "flor.shadow" not in project.git("branch", "--list")  # nothing was committed

    remove(project, ".flor/flor.db")
    out = project.cli("rebuild").stdout
    assert store_rows(project) == before
    assert "1 pipelines, 1 tasks" in out


def test_rebuild_journals_build_context_an_older_store_holds_without_a_journal(project: Project) -> None:
    project.write("small.py", SMALL)
    project.commit_all("small")
    project.run("small.py")
    # A pipeline as a store recorded before build context had journals holds it: rows only.
    conn = sqlite3.connect(project.root / ".flor" / "flor.db")
    with conn:
        conn.execute(
            "INSERT INTO pipelines (pipeline_id, tool, argv, dag, started, ended, status, exit_code, cwd) "
            "VALUES ('old1', 'doit', '[\"doit\"]', '{\"tasks\": []}', 1.0, 2.0, 'ok', 0, '/x')"
        )
        conn.execute(
            "INSERT INTO tasks (pipeline_id, task, status, reason, started, ended, seconds, actions, error) "
            "VALUES ('old1', 'prep', 'executed', 'always runs', 1.0, 2.0, 1.0, '[]', NULL)"
        )
        conn.execute(
            "INSERT INTO files (pipeline_id, task, path, role, sha256, size, mtime_ns) "
            "VALUES ('old1', 'prep', 'raw.csv', 'dep', 'ab', 2, NULL)"
        )
    conn.close()
    before = store_rows(project)

    assert "journaled 1 pipeline(s)" in project.cli("rebuild").stdout
    assert store_rows(project) == before
    remove(project, ".flor/flor.db", ".flor/runs", ".flor/pipelines")  # and from git alone, later
    project.cli("rebuild")
    assert store_rows(project) == before


# -- the packed journal columns (issue 14) ---------------------------------------------------------

EVERY_KIND = """
import math
import flordb_build as flor
from flordb_build import runtime
for epoch in flor.loop("epoch", range(3)):
    for step in flor.loop("step", range(200)):
        flor.log("loss", (step * 0.6180339887498949 + epoch) % 1.0)  # a packed float column
        flor.log("count", step - 100)  # a packed int column
        flor.log("mixed", 1.5 if step % 3 else step)  # floats and ints under one name: rows
    flor.log("special", [-0.0, 5e-324, 1.7976931348623157e308, math.inf, -math.inf, math.nan][epoch])
    flor.log("special", [math.nan, 2.0**63, 1e-310][epoch])
    flor.log("huge", 2**70 if epoch == 1 else epoch)  # beyond int64 in the middle of an int column
    flor.log("flag", epoch == 1)
    flor.log("text", f"epoch {epoch}")
    runtime.SESSION.run.flush()
"""


def test_rebuild_reproduces_every_table_from_packed_and_row_journal_lines(project: Project) -> None:
    project.write("kinds.py", EVERY_KIND)
    project.run("kinds.py")
    before = store_rows(project)
    # A value of an f8/i8 chunk lives only there (schema 7): `logs` keeps the 'mixed' rows, the bools,
    # the text and the one int beyond int64; every other value is in a packed chunk with its seqs.
    assert len(before["logs"]) == 3 * 200 + 3 + 3 + 1
    packed = [chunk for chunk in before["log_columns"] if chunk[4] != "rows"]
    assert {chunk[1] for chunk in packed} == {"loss", "count", "special", "huge"}
    assert len(before["logs"]) + sum(chunk[3] for chunk in packed) == 3 * 200 * 3 + 3 * 5
    assert all(chunk[7] is not None or chunk[8] is not None for chunk in packed)  # exact seqs kept
    remove(project, ".flor/flor.db")
    project.cli("rebuild")
    assert store_rows(project) == before  # chunks with their seq_step / seqs, byte for byte
    frame = flor.dataframe("loss", "count", "special", "huge", "flag", "text")
    assert frame["count"].tolist()[:3] == [-100, -99, -98]
    assert frame["huge"].drop_duplicates().tolist() == [0, 2**70, 2]


def test_a_journal_of_row_lines_only_still_rebuilds(project: Project) -> None:
    """Journals written before the packed columns (``logs`` rows only) read back as they did."""
    from flordb_build.journalfile import batch_line_rows, parse_run_journal

    project.write("kinds.py", EVERY_KIND)
    project.run("kinds.py")
    before = store_rows(project)
    (path,) = (project.root / ".flor" / "runs").glob("*.jsonl")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert any("cols" in line for line in lines)
    old = []
    for line in lines:  # the same journal as the code before issue 14 wrote it
        if "loops" in line:
            line = {**line, "logs": sorted(batch_line_rows(line), key=lambda row: row[0])}
            line.pop("cols", None)
        old.append(json.dumps(line))
    old_text = "\n".join(old) + "\n"
    assert json.dumps(parse_run_journal(old_text, tolerant=False).logs) == json.dumps(
        sorted(parse_run_journal(path.read_text(), tolerant=False).logs, key=lambda row: row[0])
    )  # (as JSON text: NaN != NaN)
    path.write_text(old_text)
    remove(project, ".flor/flor.db")
    project.git("update-ref", "-d", "refs/heads/flor.shadow")  # rebuild from the old-format file alone
    project.cli("rebuild")
    assert store_rows(project)["logs"] == before["logs"]
    assert store_rows(project)["log_columns"] == before["log_columns"]
