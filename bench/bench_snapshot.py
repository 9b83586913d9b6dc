"""Snapshot cost per run: this tree's capture + commit vs the code before issue 14, same projects, same run.

A project of ~1,000 tracked files in 20 packages and a small untracked note. Each run captures
its code when it starts (``snapshot.capture_code``) and commits the snapshot with its journal
when it ends (``commit_snapshot``); this measures both steps together, as a run pays for them.

* ``1,000 tracked files``: later runs of that project (git's stat cache is warm for both);
* ``+ untracked 200 MB file``: the same project with a 200 MB not-ignored data file that
  ``snapshot_include`` takes into every snapshot. The figure is what the file adds to a later
  run: (runs with it) - (runs without it), for each implementation. Before issue 14 every run
  read and hashed it again; now its blob id comes from the hash cache (untracked.py) once the
  file has settled (``RACY_NS`` after its last change: the bench waits for that condition);
* ``first run`` of the project with the data file: git has never seen it, both hash and
  compress it into ``.git``.

The peer is ``--peer-rev`` (default: the commit before issue 14's work) extracted with ``git
archive`` and imported in its own subprocess, so both implementations run the same driver
(``--driver``) under the same interpreter. Medians of ``--repeats``, the two interleaved so load
hits both alike; the git processes per run are counted with GIT_TRACE2_EVENT.

    .venv/bin/python bench/bench_snapshot.py                  # ~3 minutes on 2 cores
    .venv/bin/python bench/bench_snapshot.py --repeats 3 --big-mb 50 --runs 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO_ROOT, bench_env, make_git_repo, median, peer_tree, print_table, remove_tree  # noqa: E402

PEER_REV = "200d913"  # main before issue 14's snapshot work
OVERHEAD_TARGET_S = 0.040
UNTRACKED_TARGET_S = 0.020
SETTLE_S = 2.1  # untracked.RACY_NS and a margin: a data file must have settled before it is cached


def build_project(root: Path, n_files: int, big_mb: int) -> None:
    """``n_files`` tracked modules in 20 packages, committed, and a small untracked note; with
    ``big_mb`` > 0 also an untracked ``data/train.bin`` that ``snapshot_include`` takes."""
    make_git_repo(
        root, {"train.py": "import flordb_build as flor\nflor.log('x', 1)\n", ".gitignore": ".flor/\n"}
    )
    (root / "pyproject.toml").write_text('[tool.flordb_build]\nsnapshot_include = ["data/"]\n')
    for i in range(n_files):
        module = root / f"pkg{i % 20}" / f"mod{i}.py"
        module.parent.mkdir(exist_ok=True)
        module.write_text(f"VALUE = {i}\n\ndef f(x):\n    return x * {i}\n")
    for git_args in (["add", "-A"], ["commit", "-q", "-m", "modules"]):
        subprocess.run(["git", "-C", str(root), *git_args], check=True)
    (root / "notes.txt").write_text("an untracked note\n")
    if big_mb:
        (root / "data").mkdir()
        with open(root / "data" / "train.bin", "wb") as handle:
            for _ in range(big_mb):
                handle.write(os.urandom(1024 * 1024))  # incompressible, like real tensors or images


def copy_project(template: Path, project: Path) -> None:
    """A copy of ``template`` whose index stat data is fresh, as the user's own ``git status`` keeps it.

    A copy has new inodes and ctimes; without the refresh every capture (both implementations)
    would re-hash every tracked file, which no real project does twice.
    """
    subprocess.run(["cp", "-a", str(template), str(project)], check=True)
    subprocess.run(["git", "-C", str(project), "status", "--porcelain"], check=True, capture_output=True)


def drive(root: Path, runs: int, settle: Path | None) -> None:
    """(the --driver side) ``runs`` runs' capture + commit in ``root``; print their seconds as JSON.

    With ``settle``, wait after the first run until that file has settled, and run once more
    off the clock, so the runs measured are the "every later run" of a real project.
    """
    import warnings

    from flordb_build import snapshot
    from flordb_build.errors import FlorBuildWarning

    journal = root / ".flor" / "runs" / "bench.jsonl"
    journal.parent.mkdir(parents=True, exist_ok=True)
    journal.write_text('{"run": {}}\n')

    def one_run() -> float:
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FlorBuildWarning)
            tree = snapshot.capture_code(root).code_tree
        snapshot.commit_snapshot(root, tree, journal, ".flor/runs/bench.jsonl", "bench run\n")
        return time.perf_counter() - started

    seconds = [one_run()]
    if settle is not None:
        last_change = max(os.lstat(settle).st_mtime, os.lstat(settle).st_ctime)
        while time.time() < last_change + SETTLE_S:  # the condition the cache needs, polled
            time.sleep(0.05)
        seconds.append(one_run())
    seconds += [one_run() for _ in range(runs)]
    print(json.dumps(seconds))


def driver_seconds(
    python_path: Path, root: Path, runs: int, settle: bool, trace: Path | None = None
) -> list[float]:
    """Seconds per run from a driver subprocess importing flordb_build from ``python_path``."""
    env = bench_env({"PYTHONPATH": str(python_path)})
    if trace is not None:
        env["GIT_TRACE2_EVENT"] = str(trace)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--driver", str(root), "--runs", str(runs)]
    if settle:
        cmd += ["--settle", str(root / "data" / "train.bin")]
    out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"driver failed in '{root}':\n{out.stderr[-3000:]}")
    return [float(s) for s in json.loads(out.stdout.strip().splitlines()[-1])]


def git_processes_per_run(python_path: Path, template: Path, work: Path) -> int:
    """git processes of one later run (GIT_TRACE2_EVENT counts every git that starts)."""
    project = work / "trace-project"
    copy_project(template, project)
    trace = work / "trace.json"
    driver_seconds(python_path, project, 0, False)  # the first run, off the count
    driver_seconds(python_path, project, 0, False, trace)
    starts = sum(1 for line in trace.read_text().splitlines() if json.loads(line).get("event") == "start")
    trace.unlink()
    remove_tree(project)
    return starts


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=1000, help="tracked files (default 1000)")
    parser.add_argument(
        "--big-mb", type=int, default=200, help="size of the untracked data file (default 200)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="repeats per measure (default 5)")
    parser.add_argument("--runs", type=int, default=5, help="later runs measured per repeat (default 5)")
    parser.add_argument("--peer-rev", default=PEER_REV, help=f"the peer's commit (default {PEER_REV})")
    parser.add_argument("--driver", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--settle", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.driver is not None:
        drive(args.driver, args.runs, args.settle)
        return 0

    work = Path(tempfile.mkdtemp(prefix="flordb-bench-snapshot-"))
    try:
        impls = {"now": REPO_ROOT, "peer": peer_tree(args.peer_rev, work / "peer")}
        plain, data = work / "plain", work / "data"
        build_project(plain, args.files, 0)
        build_project(data, args.files, args.big_mb)
        later: dict[tuple[str, str], list[float]] = {}
        first: dict[str, list[float]] = {"now": [], "peer": []}
        for repeat in range(args.repeats):
            for name, path in impls.items():
                for kind, template in (("plain", plain), ("data", data)):
                    project = work / f"{name}-{kind}-{repeat}"
                    copy_project(template, project)
                    seconds = driver_seconds(path, project, args.runs, settle=kind == "data")
                    if kind == "data":
                        first[name].append(seconds[0])
                        seconds = seconds[1:]  # the run that caches the settled file: not a later run
                    later.setdefault((name, kind), []).extend(seconds[1:])
                    remove_tree(project)
        processes = {name: git_processes_per_run(path, plain, work) for name, path in impls.items()}
    finally:
        remove_tree(work)

    def figure(name: str, kind: str) -> float:
        return median(later[(name, kind)])

    overhead = {name: figure(name, "plain") for name in impls}
    added = {name: figure(name, "data") - figure(name, "plain") for name in impls}
    rows = [
        [
            f"per-run snapshot overhead, {args.files:,} tracked files, ms",
            f"{overhead['now'] * 1000:.1f}",
            f"{overhead['peer'] * 1000:.1f}",
            f"{overhead['peer'] / overhead['now']:.2f}x",
            f"<= {OVERHEAD_TARGET_S * 1000:.0f} ms",
            "PASS" if overhead["now"] <= OVERHEAD_TARGET_S else "MISS",
        ],
        [
            f"untracked {args.big_mb} MB file, added to every later run, ms",
            f"{added['now'] * 1000:.1f}",
            f"{added['peer'] * 1000:.1f}",
            f"{added['peer'] / added['now']:.0f}x" if added["now"] >= 0.001 else "(now < 1 ms)",
            f"<= {UNTRACKED_TARGET_S * 1000:.0f} ms",
            "PASS" if added["now"] <= UNTRACKED_TARGET_S else "MISS",
        ],
        [
            f"first run with the {args.big_mb} MB file (hash + compress), s",
            f"{median(first['now']):.2f}",
            f"{median(first['peer']):.2f}",
            f"{median(first['peer']) / median(first['now']):.2f}x",
            "reported",
            "",
        ],
        ["git processes per run", str(processes["now"]), str(processes["peer"]), "", "", ""],
    ]
    print(
        f"snapshot capture + commit per run: medians of {args.repeats} repeats x {args.runs} later runs; "
        f"peer = flordb_build at {args.peer_rev}"
    )
    print_table(["measure", "now", f"peer ({args.peer_rev})", "ratio", "target", "result"], rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
