"""Snapshot capture per run: flordb_build's capture vs main's ``git add --all`` capture, same repos.

A project of ~1,000 tracked files with a 200 MB untracked data file beside the code. Each run
captures its code when it starts and commits the snapshot when it ends; this measures both
steps together, the way a recorded run pays for them:

* flordb_build: ``snapshot.capture_code`` (``add --update`` for tracked files, untracked files
  listed once, the data file left out by the size limit) + ``commit_snapshot``;
* peer, main before this change: a private index copied from the user's, ``git add --all``,
  ``write-tree`` (it hashes the data file, and the first time also compresses it into ``.git``)
  + the same ``commit_snapshot``.

"first run" is a fresh copy of the project (the data file never seen by git), "later runs" the
same project again. Medians of repeats, the two captures interleaved so load hits both alike.

    .venv/bin/python bench/bench_snapshot.py                  # about 2 minutes on 2 cores
    .venv/bin/python bench/bench_snapshot.py --repeats 3 --big-mb 50
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import bench_env, make_git_repo, median, print_table, remove_tree  # noqa: E402

from flordb_build import snapshot  # noqa: E402
from flordb_build.errors import FlorBuildWarning  # noqa: E402


def build_project(root: Path, n_files: int, big_mb: int) -> None:
    """``n_files`` tracked modules in 20 packages, committed; then an untracked ``big_mb`` MB data file."""
    make_git_repo(root, {"train.py": "import flordb_build as flor\nflor.log('x', 1)\n"})
    for i in range(n_files):
        module = root / f"pkg{i % 20}" / f"mod{i}.py"
        module.parent.mkdir(exist_ok=True)
        module.write_text(f"VALUE = {i}\n\ndef f(x):\n    return x * {i}\n")
    for git_args in (["add", "-A"], ["commit", "-q", "-m", "modules"]):
        subprocess.run(["git", "-C", str(root), *git_args], check=True)
    (root / "data").mkdir()
    with open(root / "data" / "train.bin", "wb") as handle:
        for _ in range(big_mb):
            handle.write(os.urandom(1024 * 1024))  # incompressible, like real tensors or images
    (root / "notes.txt").write_text("an untracked note\n")


def capture_main(root: Path) -> str:
    """main's capture (8b38fa8): the user's index copied, ``git add --all``, ``write-tree``."""
    with tempfile.TemporaryDirectory(prefix="flor-index-") as tmp:
        index = Path(tmp) / "index"
        shutil.copyfile(snapshot.git_dir(root) / "index", index)
        env = {"GIT_INDEX_FILE": str(index)}
        snapshot.run_git(root, "add", "--all", "--", ".", env=env)
        return snapshot.run_git(root, "write-tree", env=env)


def capture_now(root: Path) -> str:
    """This branch's capture (the data file is left out, with a warning this benchmark silences)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FlorBuildWarning)
        return snapshot.capture_code(root).code_tree


def one_run(root: Path, capture: Callable[[Path], str]) -> float:
    """Seconds for one run's capture plus its snapshot commit."""
    journal = root / ".flor" / "runs" / "bench.jsonl"
    journal.parent.mkdir(parents=True, exist_ok=True)
    journal.write_text('{"run": {}}\n')
    started = time.perf_counter()
    tree = capture(root)
    snapshot.commit_snapshot(root, tree, journal, ".flor/runs/bench.jsonl", "bench run\n")
    return time.perf_counter() - started


def git_size_mb(root: Path) -> float:
    """Size of the repository's ``.git`` in MB."""
    return sum(p.stat().st_size for p in (root / ".git").rglob("*") if p.is_file()) / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=1000, help="tracked files (default 1000)")
    parser.add_argument("--big-mb", type=int, default=200, help="size of the untracked data file (default 200)")
    parser.add_argument("--repeats", type=int, default=5, help="repeats per measure (default 5)")
    args = parser.parse_args()
    os.environ.clear()
    os.environ.update(bench_env())
    work = Path(tempfile.mkdtemp(prefix="flordb-bench-snapshot-"))
    try:
        template = work / "template"
        build_project(template, args.files, args.big_mb)
        first: dict[str, list[float]] = {"now": [], "main": []}
        later: dict[str, list[float]] = {"now": [], "main": []}
        sizes: dict[str, float] = {}
        captures = {"now": capture_now, "main": capture_main}
        for repeat in range(args.repeats):
            for name, capture in captures.items():
                project = work / f"{name}-{repeat}"
                subprocess.run(["cp", "-a", str(template), str(project)], check=True)
                first[name].append(one_run(project, capture))
                later[name].append(one_run(project, capture))
                sizes[name] = git_size_mb(project)
                remove_tree(project)
        rows = []
        for label, figures in (("first run of a fresh project, s", first), ("later runs, s", later)):
            now, peer = median(figures["now"]), median(figures["main"])
            rows.append([label, f"{now:.3f}", f"{peer:.3f}", f"{peer / now:.1f}x"])
        rows.append([".git after two runs, MB", f"{sizes['now']:.1f}", f"{sizes['main']:.1f}", ""])
        print(f"{args.files} tracked files, a {args.big_mb} MB untracked data file; medians of {args.repeats}")
        print_table(["per-run capture + snapshot commit", "flordb_build", "main (add --all)", "ratio"], rows)
    finally:
        remove_tree(work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
