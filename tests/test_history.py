"""Reading snapshots back with gitpython (history.py) gives what git's own commands give."""

from __future__ import annotations

import subprocess
import sys

import pytest

from flordb_build import history
from flordb_build.errors import SnapshotError
from tests.conftest import Project

TRAIN = """\
import flordb_build as flor
lr = flor.arg("lr", 0.1)
for epoch in flor.loop("epoch", range(2)):
    flor.log("loss", lr / (epoch + 1))
"""


def _snapshots(project: Project) -> list[str]:
    return project.git("rev-list", "--reverse", "flor.shadow").split()


def test_diff_file_and_journals_match_git(project: Project) -> None:
    project.write("train.py", TRAIN)
    project.write("old.py", "print('gone soon')\n")
    project.commit_all("train")
    project.run("train.py")
    project.write("train.py", TRAIN.replace("range(2)", "range(3)") + "flor.log('done', 1)\n")
    (project.root / "old.py").unlink()
    project.write("pkg/new.py", "X = 1\n")
    project.commit_all("change")
    project.run("train.py")
    a, b = _snapshots(project)

    git_diff = project.git("diff", "--no-color", "--no-ext-diff", a, b, "--", ".", ":(exclude).flor").strip()
    expected = "\n".join(line for line in git_diff.splitlines() if not line.startswith("index "))
    assert history.diff_snapshots(project.root, a, b) == expected
    assert "+flor.log('done', 1)" in expected and "deleted file mode" in expected and "pkg/new.py" in expected
    assert history.diff_snapshots(project.root, a, a) == ""

    assert history.read_snapshot_file(project.root, a, "train.py") == TRAIN
    with pytest.raises(SnapshotError, match="'pkg/new.py' is not in snapshot"):
        history.read_snapshot_file(project.root, a, "pkg/new.py")
    with pytest.raises(SnapshotError, match="is a folder"):
        history.read_snapshot_file(project.root, b, "pkg")

    journals = list(history.iter_snapshot_journals(project.root, ".flor/runs"))
    assert [commit for commit, _ in journals] == [a, b]
    for commit, text in journals:
        path = project.git("ls-tree", "--name-only", commit, "--", ".flor/runs/").split()[0]
        assert text == project.git("cat-file", "blob", f"{commit}:{path}").strip()


def test_no_shadow_branch_no_journals_and_no_repository_an_error(project: Project, tmp_path: object) -> None:
    assert list(history.iter_snapshot_journals(project.root, ".flor/runs")) == []
    outside = project.root.parent / "not-a-repo"
    outside.mkdir()
    with pytest.raises(SnapshotError, match="not a git repository"):
        list(history.iter_snapshot_journals(outside, ".flor/runs"))


def test_import_flordb_build_loads_neither_git_nor_yaml() -> None:
    code = "import sys, flordb_build; print(sorted(m for m in ('git', 'yaml') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
