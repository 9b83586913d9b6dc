"""Fewer git processes and a hash cache for untracked files, and snapshots exactly as before.

The reference tree of every test is git's own: a copy of the user's index, ``git add --all``,
``git write-tree``. The cache may only save work; it must never make a snapshot miss a change.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from flordb_build import snapshot, untracked
from flordb_build.untracked import UNTRACKED_CACHE_NAME, UntrackedFile, UntrackedHashCache
from tests.conftest import Project


def reference_tree(project: Project) -> str:
    """The tree git makes of the work tree: the user's index copied, ``add --all``, ``write-tree``."""
    with tempfile.TemporaryDirectory() as tmp:
        index = Path(tmp) / "index"
        shutil.copyfile(project.root / ".git" / "index", index)
        env = {**os.environ, "GIT_INDEX_FILE": str(index)}
        for args in (["add", "--all", "--", "."], ["write-tree"]):
            out = subprocess.run(
                ["git", *args], cwd=project.root, env=env, capture_output=True, text=True, check=True
            )
        return out.stdout.strip()


def git_commands(trace: Path) -> list[list[str]]:
    """The argv (after ``git`` and its ``-c`` options) of every git process a GIT_TRACE2_EVENT file saw."""
    commands = []
    for line in trace.read_text().splitlines():
        event = json.loads(line)
        if event.get("event") == "start":
            argv = event["argv"][1:]
            while argv and argv[0] == "-c":
                argv = argv[2:]
            commands.append(argv)
    trace.unlink()
    return commands


def given_by_blob_id(commands: list[list[str]]) -> set[str]:
    """Paths an ``update-index`` got as ``--cacheinfo mode,oid,path``: put in without git reading them."""
    return {
        argv[i + 1].split(",", 2)[2]
        for argv in commands
        if "update-index" in argv
        for i, arg in enumerate(argv)
        if arg == "--cacheinfo"
    }


def wait_for_fs_clock_past(path: Path, probe_dir: Path) -> None:
    """Wait (on the file system's own clock, not a fixed sleep) until a new file's mtime is past ``path``'s ctime."""
    target = os.lstat(path).st_ctime_ns
    probe = probe_dir / "clock-probe"
    while True:
        probe.write_bytes(b"")
        if os.stat(probe).st_mtime_ns > target:
            probe.unlink()
            return


@pytest.fixture
def data_project(project: Project, tmp_path: Path) -> Project:
    """A project with tracked code, staged and unstaged edits, and untracked files of every shape."""
    project.write(".gitignore", "*.ckpt\n.flor/\n")
    project.write("train.py", "print('train')\n")
    project.write("lib/util.py", "A = 1\n")
    project.write("gone.py", "x = 1\n")
    project.commit_all("code")
    project.write("lib/util.py", "A = 2\n")
    project.git("add", "lib/util.py")  # staged
    project.write("train.py", "print('edited')\n")  # unstaged
    (project.root / "gone.py").unlink()  # a tracked deletion
    project.write("notes.txt", "untracked\n")
    project.write("with space [1].py", "x = 2\n")
    project.write("naïve/data.csv", "a,b\n1,2\n")
    tool = project.write("tool.sh", "#!/bin/sh\necho hi\n")
    tool.chmod(0o755)
    (project.root / "link-to-notes").symlink_to("notes.txt")
    project.write("model.ckpt", "ignored\n")
    return project


def test_capture_and_cached_captures_make_the_tree_git_add_all_makes(
    data_project: Project, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(untracked, "RACY_NS", 0)  # every file counts as settled: the second capture hits
    wait_for_fs_clock_past(data_project.root / "link-to-notes", data_project.root)
    expected = reference_tree(data_project)
    trace = tmp_path / "trace.json"
    monkeypatch.setenv("GIT_TRACE2_EVENT", str(trace))

    first = snapshot.capture_code(data_project.root)
    first_commands = git_commands(trace)
    second = snapshot.capture_code(data_project.root)
    second_commands = git_commands(trace)

    assert first.code_tree == second.code_tree == expected
    assert (
        first.dirty and first.branch == "main" and first.head == data_project.git("rev-parse", "HEAD").strip()
    )
    untracked_files = {"notes.txt", "with space [1].py", "naïve/data.csv", "tool.sh", "link-to-notes"}
    assert given_by_blob_id(first_commands) == set() and given_by_blob_id(second_commands) == untracked_files
    # status, update-index, write-tree; and rev-parse: a staged change could have been undone
    assert [argv[0] for argv in second_commands] == ["status", "update-index", "write-tree", "rev-parse"]


def test_a_settled_big_file_is_hashed_once_and_an_edit_is_still_captured(
    project: Project, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    project.write("pyproject.toml", '[tool.flordb_build]\nsnapshot_include = ["data/"]\n')
    project.commit_all("config")
    data = project.root / "data" / "train.bin"
    data.parent.mkdir()
    data.write_bytes(b"a" * 100_000)
    monkeypatch.setattr(untracked, "RACY_NS", 0)
    wait_for_fs_clock_past(data, project.root)
    trace = tmp_path / "trace.json"
    monkeypatch.setenv("GIT_TRACE2_EVENT", str(trace))
    snapshot.capture_code(project.root)
    assert given_by_blob_id(git_commands(trace)) == set()
    snapshot.capture_code(project.root)
    commands = git_commands(trace)
    assert given_by_blob_id(commands) == {"data/train.bin"}  # unchanged: not read again
    assert [argv[0] for argv in commands] == ["status", "update-index", "write-tree"]
    monkeypatch.delenv("GIT_TRACE2_EVENT")

    # Same size, same mtime restored: only the ctime tells, and it must.
    mtime = os.lstat(data).st_mtime_ns
    data.write_bytes(b"b" * 100_000)
    os.utime(data, ns=(mtime, mtime))
    code = snapshot.capture_code(project.root)
    assert code.code_tree == reference_tree(project)
    assert project.git("cat-file", "-p", f"{code.code_tree}:data/train.bin")[:1] == "b"

    # Replaced by another file of the same size and mtime: another inode and ctime.
    replacement = project.root / "data" / "new.tmp"
    replacement.write_bytes(b"c" * 100_000)
    os.utime(replacement, ns=(mtime, mtime))
    os.replace(replacement, data)
    code = snapshot.capture_code(project.root)
    assert project.git("cat-file", "-p", f"{code.code_tree}:data/train.bin")[:1] == "c"
    assert code.code_tree == reference_tree(project)


def test_a_file_changed_within_the_racy_window_is_not_kept(project: Project) -> None:
    project.write("notes.txt", "one\n")
    mtime = os.lstat(project.root / "notes.txt").st_mtime_ns
    snapshot.capture_code(project.root)  # the real window: the file was written just now
    captured_by = time.time_ns()
    cache_file = project.root / ".flor" / UNTRACKED_CACHE_NAME
    if captured_by - UntrackedFile(b"notes.txt", os.lstat(project.root / "notes.txt")).last_change_ns() <= (
        untracked.RACY_NS
    ):  # always, unless this machine took 2 s between the write and the capture
        assert not cache_file.exists() or "notes.txt" not in json.loads(cache_file.read_text())["entries"]
    (project.root / "notes.txt").write_text("two\n")  # same size
    os.utime(project.root / "notes.txt", ns=(mtime, mtime))
    code = snapshot.capture_code(project.root)
    assert project.git("cat-file", "-p", f"{code.code_tree}:notes.txt") == "two\n"


def test_an_entry_not_older_than_the_cache_file_is_not_trusted(tmp_path: Path) -> None:
    path = tmp_path / "f.txt"
    path.write_text("x\n")
    item = UntrackedFile(b"f.txt", os.lstat(path))
    cache_path = tmp_path / "cache.json"
    cache = UntrackedHashCache.load(cache_path, [[1]])
    cache.keep(item, "100644", "0" * 40)
    cache.save()
    change = item.last_change_ns()
    os.utime(cache_path, ns=(change - 1, change))  # written in the same tick as the file's change
    assert UntrackedHashCache.load(cache_path, [[1]]).lookup(item) is None
    os.utime(cache_path, ns=(change + 1, change + 1))
    assert UntrackedHashCache.load(cache_path, [[1]]).lookup(item) is not None
    assert UntrackedHashCache.load(cache_path, [[2]]).lookup(item) is None  # git config or attributes changed
    moved = UntrackedFile(b"f.txt", os.lstat(tmp_path))  # other stat data: another file
    assert UntrackedHashCache.load(cache_path, [[1]]).lookup(moved) is None


def test_snapshot_commit_tree_is_the_code_tree_plus_the_journal(project: Project) -> None:
    project.write("notes.txt", "untracked\n")
    code = snapshot.capture_code(project.root)
    journal = project.root / ".flor" / "runs" / "r1.jsonl"
    journal.parent.mkdir(parents=True, exist_ok=True)
    journal.write_text('{"run": {}}\n')
    commit = snapshot.commit_snapshot(project.root, code.code_tree, journal, ".flor/runs/r1.jsonl", "m\n")
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "GIT_INDEX_FILE": str(Path(tmp) / "index")}
        blob = subprocess.run(
            ["git", "hash-object", "--", str(journal)],
            cwd=project.root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for args in (
            ["read-tree", code.code_tree],
            ["update-index", "--add", "--cacheinfo", f"100644,{blob},.flor/runs/r1.jsonl"],
        ):
            subprocess.run(["git", *args], cwd=project.root, env=env, check=True)
        expected = subprocess.run(
            ["git", "write-tree"], cwd=project.root, env=env, capture_output=True, text=True, check=True
        ).stdout.strip()
    assert project.git("rev-parse", f"{commit}^{{tree}}").strip() == expected
    assert project.git("rev-parse", "flor.shadow").strip() == commit


def test_commits_chain_onto_a_packed_shadow_tip(project: Project) -> None:
    journal = project.root / ".flor" / "pipelines" / "p1.jsonl"
    journal.parent.mkdir(parents=True)
    journal.write_text('{"pipeline": {}}\n')
    first = snapshot.commit_path(project.root, ".flor/pipelines/p1.jsonl", "one\n")
    project.git("pack-refs", "--all")  # the loose ref file is gone; packed-refs holds the tip
    assert not (project.root / ".git" / "refs" / "heads" / "flor.shadow").exists()
    second = snapshot.commit_path(project.root, ".flor/pipelines/p1.jsonl", "two\n")
    assert project.git("rev-parse", f"{second}^").strip() == first
    assert project.git("show", f"{second}:.flor/pipelines/p1.jsonl") == '{"pipeline": {}}\n'
    # Another tool moved the tip (the ref file is fresh, so the guess is right again).
    project.git("update-ref", "refs/heads/flor.shadow", first)
    third = snapshot.commit_path(project.root, ".flor/pipelines/p1.jsonl", "three\n")
    assert project.git("rev-parse", f"{third}^").strip() == first


def staged_then_undone(project: Project) -> None:
    project.write("README.md", "# staged\n")
    project.git("add", "README.md")
    project.write("README.md", "# test project\n")  # the work tree is HEAD's again


def intent_to_add(project: Project) -> None:
    project.write("new.py", "x = 1\n")
    project.git("add", "-N", "new.py")


def type_change(project: Project) -> None:
    (project.root / "README.md").unlink()
    (project.root / "README.md").symlink_to("lib.py")


def removed_from_index_only(project: Project) -> None:
    project.git("rm", "-q", "--cached", "lib.py")  # still in the work tree, now untracked


def detached_head(project: Project) -> None:
    project.git("checkout", "-q", "--detach")
    project.write("lib.py", "B = 2\n")


def nested_repository(project: Project) -> None:
    nested = project.root / "vendor" / "other"
    nested.mkdir(parents=True)
    subprocess.run(["git", "init", "-q"], cwd=nested, check=True)
    (nested / "x.py").write_text("x = 1\n")


def merge_conflict(project: Project) -> None:
    project.git("checkout", "-q", "-b", "other")
    project.write("lib.py", "B = 'other'\n")
    project.commit_all("other")
    project.git("checkout", "-q", "main")
    project.write("lib.py", "B = 'main'\n")
    project.commit_all("main")
    subprocess.run(["git", "merge", "-q", "other"], cwd=project.root, capture_output=True)  # conflicts


@pytest.mark.parametrize(
    "make_state",
    [
        staged_then_undone,
        intent_to_add,
        type_change,
        removed_from_index_only,
        detached_head,
        nested_repository,
        merge_conflict,
    ],
)
def test_capture_matches_git_in_unusual_index_states(project: Project, make_state) -> None:  # type: ignore[no-untyped-def]
    project.write(".gitignore", ".flor/\n")
    project.write("lib.py", "B = 1\n")
    project.commit_all("lib")
    make_state(project)
    head_tree = project.git("rev-parse", "HEAD^{tree}").strip()
    if make_state is nested_repository:  # a nested repository is no content of this one
        expected = reference_tree_without(project, "vendor/other")
    else:
        expected = reference_tree(project)
    code = snapshot.capture_code(project.root)
    assert code.code_tree == expected
    assert code.dirty == (expected != head_tree)
    symbolic = subprocess.run(
        ["git", "symbolic-ref", "--quiet", "--short", "HEAD"],
        cwd=project.root,
        capture_output=True,
        text=True,
    )
    assert code.branch == (symbolic.stdout.strip() or None)
    assert code.head == project.git("rev-parse", "HEAD").strip()


def reference_tree_without(project: Project, path: str) -> str:
    """:func:`reference_tree` with ``path`` left out."""
    with tempfile.TemporaryDirectory() as tmp:
        index = Path(tmp) / "index"
        shutil.copyfile(project.root / ".git" / "index", index)
        env = {**os.environ, "GIT_INDEX_FILE": str(index)}
        for args in (["add", "--all", "--", ".", f":(exclude){path}"], ["write-tree"]):
            out = subprocess.run(
                ["git", *args], cwd=project.root, env=env, capture_output=True, text=True, check=True
            )
        return out.stdout.strip()
