"""Reading the snapshot history back, with gitpython: journals, one file, the diff of two snapshots.

Writing snapshots is on a run's path and stays git plumbing with a temporary index
(snapshot.py). Reading them happens off that path (``rebuild``, ``diff``, the UI's code view),
where gitpython's object database does the work: one ``git cat-file --batch`` process per
repository serves every tree and blob, instead of a ``git`` process per commit and file.
gitpython is imported here only, inside the functions, so ``import flordb_build`` never loads it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import SnapshotError
from .snapshot import SHADOW_REF

if TYPE_CHECKING:
    import git


@contextmanager
def open_repository(root: Path) -> Iterator[git.Repo]:
    """The repository at ``root``, its helper processes ended afterwards.

    :raises SnapshotError: when ``root`` is not a git repository.
    """
    import git

    try:
        repo = git.Repo(root)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError) as exc:
        raise SnapshotError(f"'{root}' is not a git repository: {exc}.") from exc
    try:
        yield repo
    finally:
        repo.close()


def iter_snapshot_journals(root: Path, journal_dir_in_tree: str) -> Iterator[tuple[str, str]]:
    """Yield ``(commit, journal text)`` for every ``*.jsonl`` under ``journal_dir_in_tree`` on the shadow
    branch, oldest commit first (commits without that directory, e.g. replay journals for run journals,
    hold none)."""
    import git

    with open_repository(root) as repo:
        try:
            repo.commit(SHADOW_REF)
        except (git.BadName, ValueError):
            return  # no shadow branch yet
        folder = journal_dir_in_tree.strip("/")
        for commit in repo.iter_commits(SHADOW_REF, reverse=True):
            try:
                tree = commit.tree / folder
            except KeyError:
                continue
            for blob in sorted(tree.blobs, key=lambda b: b.path):
                if blob.path.endswith(".jsonl"):
                    yield commit.hexsha, blob.data_stream.read().decode(errors="replace").strip()


def read_snapshot_file(root: Path, commit: str, path: str) -> str:
    """The text of ``path`` (posix, relative to the root) in snapshot ``commit``.

    :raises SnapshotError: when the commit does not exist or does not hold the file.
    """
    import git

    with open_repository(root) as repo:
        try:
            blob = repo.commit(commit).tree / path
        except (git.BadName, ValueError, KeyError) as exc:
            raise SnapshotError(f"'{path}' is not in snapshot {commit[:12]} of '{root}'.") from exc
        if blob.type != "blob":
            raise SnapshotError(f"'{path}' is a folder in snapshot {commit[:12]}, not a file.")
        return bytes(blob.data_stream.read()).decode(errors="replace")


def diff_snapshots(root: Path, a: str, b: str, exclude: str = ".flor") -> str:
    """The unified diff from snapshot ``a`` to ``b``, files under ``exclude`` left out.

    As ``git diff a b`` prints it, less its ``index`` lines (blob ids, whose abbreviation git
    chooses by the repository's size).

    :raises SnapshotError: when either commit does not exist.
    """
    import git

    with open_repository(root) as repo:
        try:
            old, new = repo.commit(a), repo.commit(b)
        except (git.BadName, ValueError) as exc:
            raise SnapshotError(f"No snapshot {a[:12]} or {b[:12]} in '{root}': {exc}.") from exc
        parts: list[str] = []
        for change in old.diff(new, create_patch=True):
            path_a, path_b = change.a_path or change.b_path, change.b_path or change.a_path
            if any(p == exclude or p.startswith(exclude + "/") for p in (path_a, path_b) if p):
                continue
            parts.append(f"diff --git a/{path_a} b/{path_b}")
            if change.new_file:
                parts.append(f"new file mode {change.b_mode:o}")
            elif change.deleted_file:
                parts.append(f"deleted file mode {change.a_mode:o}")
            elif change.renamed_file:
                parts.extend([f"rename from {change.rename_from}", f"rename to {change.rename_to}"])
            patch = change.diff.decode(errors="replace") if isinstance(change.diff, bytes) else str(change.diff or "")
            if patch:
                parts.append(f"--- {'/dev/null' if change.new_file else 'a/' + str(path_a)}")
                parts.append(f"+++ {'/dev/null' if change.deleted_file else 'b/' + str(path_b)}")
                parts.append(patch.rstrip("\n"))
        return "\n".join(parts)
