"""Change context: one snapshot commit per run on the shadow branch ``flor.shadow``.

Nothing here touches the user's HEAD, branch, index or work tree. The trick is a private index:

    user's .git/index --copy--> tmp index --git add -A--> code tree   (at run start)
    code tree + run journal --read-tree/update-index--> snapshot tree (at run end)
    commit-tree(snapshot tree, parent = shadow tip) --update-ref CAS--> refs/heads/flor.shadow

Copying the user's index keeps its stat cache, so ``git add -A`` re-hashes only changed files.
The ref update is a compare-and-swap: when a concurrent run moved the tip first, we rebuild the
commit on the new tip and try again, so parallel tasks never lose a snapshot.

Plumbing runs through ``git`` itself rather than GitPython: every call needs its own
environment (``GIT_INDEX_FILE``), which is plain subprocess work, and importing GitPython would
add its import time to every recorded run.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import SnapshotError
from .redaction import redact_mapping

SHADOW_BRANCH = "flor.shadow"
SHADOW_REF = "refs/heads/" + SHADOW_BRANCH
ZERO_SHA = "0" * 40
RUN_TRAILER = "Flor-Run"
IDENTITY = {
    "GIT_AUTHOR_NAME": "flordb_build",
    "GIT_AUTHOR_EMAIL": "flordb_build@localhost",
    "GIT_COMMITTER_NAME": "flordb_build",
    "GIT_COMMITTER_EMAIL": "flordb_build@localhost",
}


@dataclass(frozen=True)
class CodeState:
    """The git facts of a run, taken when it starts."""

    head: str | None
    branch: str | None
    code_tree: str
    dirty: bool


def run_git(root: Path, *args: str, env: Mapping[str, str] | None = None, input: bytes | None = None) -> str:
    """Run ``git args`` in ``root`` and return stdout; raise :class:`SnapshotError` on failure.

    ``GIT_OPTIONAL_LOCKS=0`` stops git from refreshing the user's index as a side effect.
    """
    full_env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0", **(env or {})}
    proc = subprocess.run(
        ["git", *args], cwd=root, env=full_env, input=input, capture_output=True, check=False
    )
    if proc.returncode != 0:
        message = proc.stderr.decode(errors="replace").strip() or f"exit status {proc.returncode}"
        raise SnapshotError(f"'git {' '.join(args[:2])}' failed in '{root}': {message}")
    return proc.stdout.decode(errors="replace").strip()


def git_dir(root: Path) -> Path:
    """The repository's git directory (``.git``, or what a ``.git`` file points at)."""
    return Path(run_git(root, "rev-parse", "--absolute-git-dir"))


def resolve(root: Path, rev: str) -> str | None:
    """The commit a revision names, or None when it does not exist (e.g. no commits yet)."""
    try:
        return run_git(root, "rev-parse", "--verify", "--quiet", rev + "^{commit}") or None
    except SnapshotError:
        return None


def capture_code(root: Path) -> CodeState:
    """Write the tree of the work tree as it is now (tracked + untracked-not-ignored files)."""
    head = resolve(root, "HEAD")
    try:
        branch: str | None = run_git(root, "symbolic-ref", "--quiet", "--short", "HEAD")
    except SnapshotError:
        branch = None  # detached HEAD
    with tempfile.TemporaryDirectory(prefix="flor-index-") as tmp:
        index = Path(tmp) / "index"
        user_index = git_dir(root) / "index"
        if user_index.exists():
            shutil.copyfile(user_index, index)
        env = {"GIT_INDEX_FILE": str(index)}
        run_git(root, "add", "--all", "--", ".", env=env)
        tree = run_git(root, "write-tree", env=env)
    head_tree = run_git(root, "rev-parse", head + "^{tree}") if head else None
    return CodeState(head=head, branch=branch, code_tree=tree, dirty=tree != head_tree)


def commit_snapshot(root: Path, code_tree: str, journal: Path, journal_path_in_tree: str, message: str) -> str:
    """Commit ``code_tree`` plus the run's journal onto the shadow branch; return the commit sha."""
    blob = run_git(root, "hash-object", "-w", "--", str(journal))
    return _append_to_shadow(root, _tree_with(root, code_tree, blob, journal_path_in_tree), message)


def commit_file(root: Path, content: bytes, path_in_tree: str, message: str) -> str:
    """Commit a tree holding only ``content`` at ``path_in_tree`` onto the shadow branch (a replay journal)."""
    blob = run_git(root, "hash-object", "-w", "--stdin", input=content)
    return _append_to_shadow(root, _tree_with(root, None, blob, path_in_tree), message)


def _tree_with(root: Path, base_tree: str | None, blob: str, path_in_tree: str) -> str:
    """``base_tree`` (or an empty tree) plus ``blob`` at ``path_in_tree``, written with a private index."""
    with tempfile.TemporaryDirectory(prefix="flor-index-") as tmp:
        env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
        if base_tree is not None:
            run_git(root, "read-tree", base_tree, env=env)
        run_git(root, "update-index", "--add", "--cacheinfo", f"100644,{blob},{path_in_tree}", env=env)
        return run_git(root, "write-tree", env=env)


def _append_to_shadow(root: Path, tree: str, message: str) -> str:
    """Commit ``tree`` on the shadow tip and move the branch to it (compare-and-swap); the commit sha."""
    for attempt in range(100):
        parent = resolve(root, SHADOW_REF)
        parent_args = ["-p", parent] if parent else []
        commit = run_git(root, "commit-tree", tree, *parent_args, env=IDENTITY, input=message.encode())
        try:
            run_git(root, "update-ref", "-m", "flordb_build snapshot", SHADOW_REF, commit, parent or ZERO_SHA)
            return commit
        except SnapshotError:
            # Another run moved the tip between our read and our write: rebuild on the new tip.
            time.sleep(random.uniform(0.001, 0.02) * (attempt + 1))
    raise SnapshotError(f"Could not update '{SHADOW_BRANCH}' after 100 attempts; is another tool rewriting it?")


def snapshot_message(run_id: str, filename: str, task: str | None, args: Mapping[str, object]) -> str:
    """A commit message naming the run, its script, its task and its args (secrets masked), with a trailer."""
    arg_text = " ".join(f"{k}={v}" for k, v in redact_mapping(args).items()) or "(no args)"
    task_text = f" task {task}" if task else ""
    return f"flor run {run_id}: {filename}{task_text} {arg_text}\n\n{RUN_TRAILER}: {run_id}\n"


def iter_snapshot_journals(root: Path, journal_dir_in_tree: str) -> Iterator[tuple[str, str]]:
    """Yield ``(commit, journal text)`` for every journal under ``journal_dir_in_tree`` on the shadow
    branch, oldest first (commits without that directory, e.g. replay journals for run journals, hold none)."""
    if resolve(root, SHADOW_REF) is None:
        return
    commits = run_git(root, "rev-list", "--reverse", SHADOW_REF).split()
    for commit in commits:
        listing = run_git(root, "ls-tree", "--name-only", commit, "--", journal_dir_in_tree.rstrip("/") + "/")
        for path in listing.split("\n"):
            if path.endswith(".jsonl"):
                yield commit, run_git(root, "cat-file", "blob", f"{commit}:{path}")


def export_snapshot(root: Path, commit: str, destination: Path) -> None:
    """Write the files of a snapshot commit into ``destination`` (never the user's work tree)."""
    destination.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "archive", "--format=tar", commit], cwd=root, capture_output=True, check=False
    )
    if archive.returncode != 0:
        raise SnapshotError(
            f"Snapshot '{commit}' is not in '{root}': {archive.stderr.decode(errors='replace').strip()}"
        )
    subprocess.run(["tar", "-x", "-C", str(destination)], input=archive.stdout, check=True)
