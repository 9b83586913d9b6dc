"""A file's commit on ``flor.shadow`` in two git processes, as safe as the four they replace.

``commit_path`` (a doit/make pipeline's journal) and ``commit_file`` (a replay journal) write the
blob (``hash-object -w``), then the tree and commit and move the branch in one ``git fast-import``. What must still hold: the
tree holds only that file (not the parent snapshot's code), concurrent writers lose no commit,
a live lock is named and left alone, a stale one is removed, and the user's git state is untouched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flordb_build import snapshot
from flordb_build.errors import SnapshotError
from tests.conftest import Project
from tests.test_snapshot import git_state

JOURNAL = ".flor/pipelines/p1.jsonl"

WRITER = """
import sys
from pathlib import Path
from flordb_build import snapshot
worker, count = int(sys.argv[1]), int(sys.argv[2])
path = f".flor/pipelines/w{worker}.jsonl"
Path(path).parent.mkdir(parents=True, exist_ok=True)
for i in range(count):
    Path(path).write_text(f"{worker} {i}\\n")
    snapshot.commit_path(Path.cwd(), path, f"w{worker} {i}\\n")
"""


def write_journal(project: Project, text: str = '{"pipeline": {}}\n') -> Path:
    journal = project.root / JOURNAL
    journal.parent.mkdir(parents=True, exist_ok=True)
    journal.write_text(text)
    return journal


def top_level_git_commands(trace: Path) -> list[str]:
    """The subcommand of every git process that flordb_build started (not git's own children)."""
    names = []
    for line in trace.read_text().splitlines():
        event = json.loads(line)
        if event.get("event") == "start" and "/" not in event["sid"]:
            argv = event["argv"][1:]
            while argv and argv[0] == "-c":
                argv = argv[2:]
            names.append(argv[0])
    return names


def test_a_journal_commit_is_two_git_processes_and_its_tree_holds_only_the_journal(
    project: Project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project.write("train.py", "print('x')\n")
    project.commit_all("code")
    code = snapshot.capture_code(project.root)
    run_journal = tmp_path / "run.jsonl"
    run_journal.write_text('{"run": {}}\n')
    # The tip is a run's snapshot: the code tree plus its journal. The pipeline's commit must not inherit it.
    run_commit = snapshot.commit_snapshot(project.root, code.code_tree, run_journal, ".flor/r.jsonl", "run\n")
    write_journal(project, '{"pipeline": {"pipeline_id": "p1"}}\n')
    before = git_state(project)
    trace = tmp_path / "trace.json"
    monkeypatch.setenv("GIT_TRACE2_EVENT", str(trace))

    commit = snapshot.commit_path(project.root, JOURNAL, "flor pipeline p1\n\nFlor-Pipeline: p1\n")

    assert top_level_git_commands(trace) == ["hash-object", "fast-import"]
    monkeypatch.delenv("GIT_TRACE2_EVENT")
    assert project.git("rev-parse", "flor.shadow").strip() == commit
    assert project.git("rev-parse", f"{commit}^").strip() == run_commit
    assert project.git("ls-tree", "-r", "--name-only", commit).split() == [JOURNAL]
    assert project.git("show", f"{commit}:{JOURNAL}") == '{"pipeline": {"pipeline_id": "p1"}}\n'
    assert project.git("log", "-1", "--format=%an <%ae>%n%cn <%ce>%n%B", commit) == (
        "flordb_build <flordb_build@localhost>\nflordb_build <flordb_build@localhost>\n"
        "flor pipeline p1\n\nFlor-Pipeline: p1\n\n"
    )
    assert git_state(project) == before  # HEAD, branch, index, status, stash, work tree
    assert project.git("fsck", "--no-progress", "--strict").strip() == ""
    # A replay journal goes the same way, from bytes.
    second = snapshot.commit_file(project.root, b"replay\n", ".flor/replay.jsonl", "replay\n")
    assert project.git("rev-parse", f"{second}^").strip() == commit
    assert project.git("ls-tree", "-r", "--name-only", second).split() == [".flor/replay.jsonl"]


def test_the_first_commit_of_the_branch_has_no_parent(project: Project) -> None:
    write_journal(project)
    commit = snapshot.commit_path(project.root, JOURNAL, "one\n")
    assert project.git("rev-list", "--parents", "-1", commit).split() == [commit]


def test_concurrent_journal_commits_all_land_on_the_shadow_branch(project: Project) -> None:
    project.write("writer.py", WRITER)
    workers, count = 4, 15
    procs = [
        subprocess.Popen(
            [sys.executable, "writer.py", str(w), str(count)], cwd=project.root, stderr=subprocess.PIPE, text=True
        )
        for w in range(workers)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
    shas = project.git("rev-list", "flor.shadow").split()
    assert len(shas) == workers * count  # one chain: no commit was lost to a concurrent writer
    seen = set()
    for sha in shas:
        (path,) = project.git("ls-tree", "-r", "--name-only", sha).split()
        subject = project.git("log", "-1", "--format=%s", sha).strip()
        worker, i = subject[1:].split()
        assert path == f".flor/pipelines/w{worker}.jsonl"
        assert project.git("show", f"{sha}:{path}") == f"{worker} {i}\n"
        seen.add((int(worker), int(i)))
    assert seen == {(w, i) for w in range(workers) for i in range(count)}


def test_a_stale_shadow_lock_is_removed_and_the_journal_commits(project: Project) -> None:
    write_journal(project)
    first = snapshot.commit_path(project.root, JOURNAL, "one\n")
    lock = project.root / ".git" / "refs" / "heads" / "flor.shadow.lock"
    lock.write_text(first)  # what a git killed between lock and rename leaves
    os.utime(lock, (time.time() - 3600, time.time() - 3600))
    with pytest.warns(Warning, match="stale git lock"):
        second = snapshot.commit_path(project.root, JOURNAL, "two\n")
    assert not lock.exists()
    assert project.git("rev-parse", "flor.shadow").strip() == second
    assert project.git("rev-parse", f"{second}^").strip() == first


def test_a_lock_a_live_git_holds_is_named_and_left_alone(project: Project) -> None:
    write_journal(project)
    first = snapshot.commit_path(project.root, JOURNAL, "one\n")
    holder = subprocess.Popen(
        ["git", "update-ref", "--stdin"], cwd=project.root, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdin is not None and holder.stdout is not None
    holder.stdin.write(f"start\nupdate {snapshot.SHADOW_REF} {first}\nprepare\n")
    holder.stdin.flush()
    assert holder.stdout.readline() == "start: ok\n" and holder.stdout.readline() == "prepare: ok\n"
    lock = project.root / ".git" / "refs" / "heads" / "flor.shadow.lock"
    os.utime(lock, (time.time() - 3600, time.time() - 3600))  # old, but its owner is alive
    inode = lock.stat().st_ino
    try:
        with pytest.raises(SnapshotError) as caught:
            snapshot.commit_path(project.root, JOURNAL, "two\n")
        assert f"'{lock}'" in str(caught.value) and str(holder.pid) in str(caught.value)
        assert lock.stat().st_ino == inode  # never removed
    finally:
        holder.stdin.write("abort\n")
        holder.stdin.close()
        assert holder.stdout.read() == "abort: ok\n"
        holder.stdout.close()
        assert holder.wait(timeout=60) == 0
    assert project.git("rev-parse", "flor.shadow").strip() == first
    second = snapshot.commit_path(project.root, JOURNAL, "two\n")
    assert project.git("rev-parse", f"{second}^").strip() == first


def test_other_failures_fail_at_once(project: Project) -> None:
    write_journal(project)
    # A directory where the ref's lock would go: not a lock, not a race; retrying cannot help.
    (project.root / ".git" / "refs" / "heads" / "flor.shadow").mkdir(parents=True)
    (project.root / ".git" / "refs" / "heads" / "flor.shadow" / "x").write_text("")
    with pytest.raises(SnapshotError, match="failed in"):
        snapshot.commit_path(project.root, JOURNAL, "m\n")
