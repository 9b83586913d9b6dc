"""Change context: snapshot commits on flor.shadow leave the user's git state byte-for-byte alone."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

from flordb_build import snapshot
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
    journals = list(snapshot.iter_snapshot_journals(project.root, ".flor/runs"))
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
