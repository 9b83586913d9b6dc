"""Recording overhead of the doit integration: plain doit vs doit configured by ``flordb-build init``.

The same 200-task pipeline (one file_dep, one target and one shell command each) runs in two
git repositories that differ only in the doit.cfg ``init`` writes. Measured, alternating
between the two, medians of ``--repeats``:

- forced run (``doit -a``): every task executes; the per-task overhead is
  (recorded - plain) / tasks, target <= 10 ms;
- up-to-date run (``doit``): every task is checked and skipped; target ratio <= 1.5x.

Run: ``.venv/bin/python bench/bench_dag.py [--tasks 200] [--repeats 5]``
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import bench_env, make_git_repo, median, print_table, remove_tree, run_timed, spread  # noqa: E402

PER_TASK_TARGET_MS = 10.0
UP_TO_DATE_TARGET_RATIO = 1.5


def dodo_text(n_tasks: int) -> str:
    """A dodo.py with ``n_tasks`` independent no-op command tasks that can be up-to-date."""
    return (
        f"N = {n_tasks}\n\n"
        "def task_step():\n"
        "    for i in range(N):\n"
        "        yield {\n"
        "            'name': str(i),\n"
        "            'file_dep': [f'src/{i}.txt'],\n"
        "            'targets': [f'out/{i}.txt'],\n"
        "            'actions': [f'touch out/{i}.txt'],\n"
        "        }\n"
    )


def make_pipeline(root: Path, n_tasks: int, recorded: bool) -> Path:
    """A git repo with the pipeline; ``recorded`` adds the doit.cfg that ``flordb-build init`` writes."""
    files = {"dodo.py": dodo_text(n_tasks)}
    repo = make_git_repo(root, files)
    (repo / "src").mkdir()
    (repo / "out").mkdir()
    for i in range(n_tasks):
        (repo / "src" / f"{i}.txt").write_text(f"input {i}\n")
    if recorded:
        from flordb_build.dag import init_project

        init_project(repo, doit_config="doit.cfg")
    return repo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="flor-bench-dag-"))
    # As installed for real: bytecode cached (pip compiles at install). With
    # PYTHONDONTWRITEBYTECODE every recorded run would recompile flordb_build's sources.
    env = {k: v for k, v in bench_env().items() if k != "PYTHONDONTWRITEBYTECODE"}
    doit = [sys.executable, "-m", "doit"]
    try:
        plain = make_pipeline(work / "plain", args.tasks, recorded=False)
        recorded = make_pipeline(work / "recorded", args.tasks, recorded=True)
        log = work / "log.txt"
        for repo in (plain, recorded):  # warm-up: first build, doit state, the store and its schema
            run_timed(doit, repo, log, env)
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.repeats):
            for kind, cmd in (("forced", [*doit, "-a"]), ("up-to-date", doit)):
                for name, repo in (("plain", plain), ("recorded", recorded)):
                    times.setdefault((kind, name), []).append(run_timed(cmd, repo, log, env))
        check = run_timed(
            [sys.executable, "-m", "flordb_build", "query", "SELECT count(*) FROM tasks"], recorded, log, env
        )
        del check
        recorded_rows = log.read_text().split()[-1]
    finally:
        remove_tree(work)

    n = args.tasks
    forced_plain, forced_rec = median(times[("forced", "plain")]), median(times[("forced", "recorded")])
    utd_plain, utd_rec = median(times[("up-to-date", "plain")]), median(times[("up-to-date", "recorded")])
    per_task_ms = (forced_rec - forced_plain) / n * 1000
    utd_ratio = utd_rec / utd_plain
    rows = [
        [
            f"forced run, {n} tasks (doit -a)",
            f"{forced_plain:.3f}",
            f"{forced_rec:.3f}",
            f"{forced_rec / forced_plain:.2f}x",
            f"{spread(times[('forced', 'plain')])} / {spread(times[('forced', 'recorded')])}",
            f"{per_task_ms:.2f} ms/task",
            f"<= {PER_TASK_TARGET_MS:.0f} ms/task",
            "ok" if per_task_ms <= PER_TASK_TARGET_MS else "MISSED",
        ],
        [
            f"up-to-date run, {n} tasks (doit)",
            f"{utd_plain:.3f}",
            f"{utd_rec:.3f}",
            f"{utd_ratio:.2f}x",
            f"{spread(times[('up-to-date', 'plain')])} / {spread(times[('up-to-date', 'recorded')])}",
            f"{(utd_rec - utd_plain) / n * 1000:.2f} ms/task",
            f"<= {UP_TO_DATE_TARGET_RATIO:.1f}x",
            "ok" if utd_ratio <= UP_TO_DATE_TARGET_RATIO else "MISSED",
        ],
    ]
    print(f"doit recording overhead: median of {args.repeats} repeats, seconds per invocation")
    print_table(
        ["measurement", "plain doit", "recorded", "ratio", "spread (plain / rec)", "overhead", "target", "met"],
        rows,
    )
    print(f"(tasks rows recorded in the recorded project: {recorded_rows})")
    return 0 if per_task_ms <= PER_TASK_TARGET_MS and utd_ratio <= UP_TO_DATE_TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
