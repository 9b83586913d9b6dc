"""Change context: snapshot commits on flor.shadow leave the user's git state byte-for-byte alone."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from flordb_build import history, snapshot
from flordb_build.errors import SnapshotError
from tests.conftest import Project

TRAIN = """
import flordb_build as flor
lr = flor.arg("lr", 0.1)
for epoch in flor.loop("epoch", range(2)):
    flor.log("loss", lr / (epoch + 1))
"""


def git_state(project: Project) -> dict[str, object]:
    """Everything a user could notice: HEAD, branch, index bytes, status, diffs, stash, files."""
    root = project.root
    files = {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".git" not in p.relative_to(root).parts and ".flor" not in p.relative_to(root).parts
    }
    return {
        "head": project.git("rev-parse", "HEAD"),
        "branch": project.git("symbolic-ref", "HEAD"),
        "index": hashlib.sha256((root / ".git" / "index").read_bytes()).hexdigest(),
        "status": project.git("status", "--porcelain=v2", "--untracked-files=all"),
        # .flor/ is flordb_build's own (ignored) directory; everything else that is ignored must stay.
        "ignored": [
            line
            for line in project.git("status", "--porcelain", "--ignored").splitlines()
            if not line.startswith("!! .flor/")
        ],
        "staged": project.git("diff", "--cached"),
        "unstaged": project.git("diff"),
        "stash": project.git("stash", "list"),
        "files": files,
    }


def test_snapshot_leaves_staged_unstaged_untracked_and_ignored_files_alone(project: Project) -> None:
    project.write(".gitignore", "*.ckpt\n")
    project.write("train.py", TRAIN)
    project.write("lib.py", "A = 1\n")
    project.commit_all("add training")
    project.write("stashed.txt", "x\n")
    project.git("add", "stashed.txt")
    project.git("stash")
    project.write("lib.py", "A = 2\n")  # staged change
    project.git("add", "lib.py")
    project.write("lib.py", "A = 3\n")  # then an unstaged change on top
    project.write("train.py", TRAIN + "flor.log('extra', 1)\n")  # unstaged change of the script
    project.write("notes.txt", "untracked\n")  # untracked, not ignored
    project.write("model.ckpt", "ignored weights\n")  # ignored
    # `git status` refreshes the index as a side effect; do it now so the baseline is stable.
    project.git("status")
    before = git_state(project)

    project.run("train.py", "--kwargs", "lr=0.5")

    assert git_state(project) == before
    commit = sqlite3.connect(project.root / ".flor" / "flor.db").execute("SELECT snapshot FROM runs").fetchone()[0]
    assert commit == project.git("rev-parse", "flor.shadow").strip()
    tree = set(project.git("ls-tree", "-r", "--name-only", commit).split())
    assert {"train.py", "lib.py", "notes.txt", ".gitignore", "README.md"} <= tree
    assert "model.ckpt" not in tree and "stashed.txt" not in tree
    assert any(name.startswith(".flor/runs/") and name.endswith(".jsonl") for name in tree)
    # The snapshot holds the work tree as it was run, not HEAD's or the index's version.
    assert project.git("show", f"{commit}:lib.py") == "A = 3\n"
    assert "flor.log('extra', 1)" in project.git("show", f"{commit}:train.py")
    message = project.git("log", "-1", "--format=%B", commit)
    assert "train.py" in message and "lr=0.5" in message and "Flor-Run:" in message


def test_snapshots_chain_on_the_shadow_branch(project: Project) -> None:
    project.write("train.py", TRAIN)
    project.commit_all("add training")
    for lr in ("0.1", "0.2", "0.3"):
        project.run("train.py", "--kwargs", f"lr={lr}")
    log = project.git("log", "--format=%s", "flor.shadow").splitlines()
    assert len(log) == 3 and all(line.startswith("flor run ") for line in log)
    assert project.git("rev-list", "--count", "main").strip() == "2"  # the user's branch did not move
    journals = list(history.iter_snapshot_journals(project.root, ".flor/runs"))
    assert len(journals) == 3 and len({commit for commit, _ in journals}) == 3


def test_dirty_flag_and_head_are_recorded(project: Project) -> None:
    project.write("train.py", TRAIN)
    project.commit_all("add training")
    project.run("train.py")
    project.write("train.py", TRAIN + "# edited\n")
    project.run("train.py")
    conn = sqlite3.connect(project.root / ".flor" / "flor.db")
    rows = conn.execute("SELECT dirty, git_head, git_branch FROM runs ORDER BY tstamp").fetchall()
    conn.close()
    head = project.git("rev-parse", "HEAD").strip()
    assert rows == [(0, head, "main"), (1, head, "main")]


def test_repository_without_commits_still_snapshots(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    project = Project(tmp_path / "fresh")
    project.root.mkdir()
    project.git("init", "-q")
    monkeypatch.chdir(project.root)
    project.write("train.py", TRAIN)
    project.run("train.py")
    assert project.git("ls-tree", "--name-only", "flor.shadow").split()[-1] == "train.py"
    assert project.git("status", "--porcelain") == "?? train.py\n"


# -- hooks, untracked files, stale locks ---------------------------------------------------------

HOOKS = ("post-index-change", "reference-transaction", "pre-commit", "post-commit", "post-checkout", "pre-push")


def test_user_hooks_never_run_for_snapshots(project: Project, tmp_path: Path) -> None:
    marker = tmp_path / "hooks-ran.txt"
    for hook in HOOKS:
        # Each hook notes that it ran, and one edits the work tree as a real hook once did.
        path = project.root / ".git" / "hooks" / hook
        path.write_text(f"#!/bin/sh\necho {hook} >> '{marker}'\necho touched > '{project.root}/hook-output.txt'\n")
        path.chmod(0o755)
    project.write("train.py", TRAIN)
    project.commit_all("add training")
    marker.unlink(missing_ok=True)  # the commit above ran the user's hooks, as it should
    (project.root / "hook-output.txt").unlink(missing_ok=True)
    project.write("notes.txt", "untracked\n")

    project.run("train.py")

    assert not marker.exists(), marker.read_text()
    assert not (project.root / "hook-output.txt").exists()
    assert "notes.txt" in project.git("ls-tree", "--name-only", "flor.shadow")


SECRET_FILES = {
    ".env": "API_KEY=sk-live\n",
    ".env.production": "DB_PASSWORD=x\n",
    ".ssh/id_rsa": "-----BEGIN OPENSSH PRIVATE KEY-----\n",
    "credentials.json": "{}\n",
    "conf/server.pem": "pem\n",
    "conf/secrets.yaml": "token: x\n",
    ".aws/config": "[default]\n",
}


def test_secret_looking_and_large_untracked_files_stay_out_with_one_warning(project: Project) -> None:
    project.write("train.py", TRAIN)
    project.write("deploy.key", "tracked on purpose\n")  # tracked files are the user's repository
    project.write("gone.py", "x = 1\n")
    project.commit_all("add training")
    (project.root / "gone.py").unlink()  # a tracked deletion is part of the code as it ran
    for path, text in SECRET_FILES.items():
        project.write(path, text)
    project.write("notes.txt", "untracked, small, goes in\n")
    project.write("with space [1].py", "x = 2\n")  # names git would quote or read as a pattern
    project.write("naïve.py", "x = 3\n")
    big = project.root / "data" / "big.bin"
    big.parent.mkdir()
    with open(big, "wb") as fh:
        fh.truncate(6 * 1024 * 1024)  # over the default 5 MiB limit (sparse: cheap to make)

    proc = project.run("train.py")

    tree = set(project.git("-c", "core.quotePath=false", "ls-tree", "-r", "--name-only", "flor.shadow").splitlines())
    assert {"train.py", "deploy.key", "notes.txt", "with space [1].py", "naïve.py"} <= tree
    assert not tree & {*SECRET_FILES, "data/big.bin", "gone.py"}
    warnings = [line for line in proc.stderr.splitlines() if "FlorBuildWarning" in line]
    assert len(warnings) == 1
    for path in [*SECRET_FILES, "data/big.bin"]:
        assert f"'{path}'" in warnings[0]
    assert "snapshot_include" in warnings[0] and "6.3 MB" in warnings[0]


def test_snapshot_include_exclude_and_size_limit_are_configurable(project: Project) -> None:
    project.write(
        "pyproject.toml",
        """
        [tool.flordb_build]
        snapshot_include = [".env.example", "data/small.bin"]
        snapshot_exclude = ["scratch/"]
        snapshot_max_file_bytes = 100
        """,
    )
    project.write("train.py", TRAIN)
    project.commit_all("add training")
    project.write(".env.example", "API_KEY=\n")
    project.write("data/small.bin", "x" * 500)  # over the limit, but included by name
    project.write("data/other.bin", "x" * 500)
    project.write("scratch/try.py", "print(1)\n")
    project.write("notes.txt", "ok\n")

    proc = project.run("train.py")

    tree = set(project.git("ls-tree", "-r", "--name-only", "flor.shadow").split())
    assert {".env.example", "data/small.bin", "notes.txt"} <= tree
    assert not tree & {"data/other.bin", "scratch/try.py"}
    assert "'scratch/try.py' (matches the secret-file pattern 'scratch/')" in proc.stderr
    assert "'data/other.bin' (500 bytes, over snapshot_max_file_bytes = 100)" in proc.stderr


def write_journal(project: Project) -> Path:
    journal = project.root / ".flor" / "runs" / "manual.jsonl"
    journal.parent.mkdir(parents=True, exist_ok=True)
    journal.write_text('{"run": {}}\n')
    return journal


def test_a_stale_shadow_lock_is_removed_and_the_run_snapshots(project: Project) -> None:
    project.write("train.py", TRAIN)
    project.commit_all("add training")
    project.run("train.py")  # flor.shadow exists
    lock = project.root / ".git" / "refs" / "heads" / "flor.shadow.lock"
    lock.write_text(project.git("rev-parse", "HEAD"))  # what a git killed between lock and rename leaves
    os.utime(lock, (time.time() - 3600, time.time() - 3600))

    proc = project.run("train.py")

    assert not lock.exists()
    assert f"Removed the stale git lock '{lock}'" in proc.stderr
    conn = sqlite3.connect(project.root / ".flor" / "flor.db")
    snapshots = [row[0] for row in conn.execute("SELECT snapshot FROM runs ORDER BY tstamp")]
    conn.close()
    assert None not in snapshots and snapshots[-1] == project.git("rev-parse", "flor.shadow").strip()


def test_a_lock_a_live_git_holds_is_left_alone_and_named(project: Project) -> None:
    project.write("train.py", TRAIN)
    project.commit_all("add training")
    code = snapshot.capture_code(project.root)
    head = project.git("rev-parse", "HEAD").strip()
    # A live git transaction holds the shadow ref's lock until it is told to commit or abort.
    holder = subprocess.Popen(
        ["git", "update-ref", "--stdin"], cwd=project.root, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdin is not None and holder.stdout is not None
    holder.stdin.write(f"start\nupdate {snapshot.SHADOW_REF} {head}\nprepare\n")
    holder.stdin.flush()
    assert holder.stdout.readline() == "start: ok\n" and holder.stdout.readline() == "prepare: ok\n"
    lock = project.root / ".git" / "refs" / "heads" / "flor.shadow.lock"
    os.utime(lock, (time.time() - 3600, time.time() - 3600))  # old, but its owner is alive
    inode = lock.stat().st_ino
    try:
        with pytest.raises(SnapshotError) as caught:
            snapshot.commit_snapshot(project.root, code.code_tree, write_journal(project), "j.jsonl", "m\n")
        assert f"'{lock}'" in str(caught.value) and str(holder.pid) in str(caught.value)
        assert lock.stat().st_ino == inode  # never removed
    finally:
        holder.stdin.write("abort\n")
        holder.stdin.close()
        assert holder.stdout.read() == "abort: ok\n"  # read to the end: git may not write to a closed pipe
        holder.stdout.close()
        assert holder.wait(timeout=60) == 0
    commit = snapshot.commit_snapshot(project.root, code.code_tree, write_journal(project), "j.jsonl", "m\n")
    assert commit == project.git("rev-parse", "flor.shadow").strip()


def test_other_update_failures_fail_at_once(project: Project) -> None:
    code = snapshot.capture_code(project.root)
    # A directory where the ref's lock would go: not a lock, not a race; retrying cannot help.
    (project.root / ".git" / "refs" / "heads" / "flor.shadow").mkdir(parents=True)
    (project.root / ".git" / "refs" / "heads" / "flor.shadow" / "x").write_text("")
    with pytest.raises(SnapshotError, match="update-ref"):
        snapshot.commit_snapshot(project.root, code.code_tree, write_journal(project), "j.jsonl", "m\n")
