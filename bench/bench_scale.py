"""Replay at scale (issue 16): every run's jobs in one queue over ``--workers`` slots.

Two recorded projects, each replayed by one ``run_replay`` call per measurement (a session of
its own, like one ``flordb-build replay`` command):

==========  ======================================================================================
``sleep``   ``--runs`` (64) recorded runs whose replay job sleeps ``--sleep`` (1 s) in its suffix,
            standing in for machines: replayed with ``--slots`` (4) slots vs 1 slot (sequential).
            Per-job overhead: (sequential wall - runs x sleep) / runs. Targets: >= 3.4x, <= 0.15 s.
``cpu``     ``--cpu-runs`` (16) recorded runs whose suffix is CPU-bound pure Python (about
            ``--cpu-seconds`` each): ``--workers 2`` vs 1. Target on 2 cores: >= 1.8x.
==========  ======================================================================================

Figures are medians of ``--repeats`` wall times of ``run_replay``; every replay must come back
with all its runs written, or the bench stops. The plan's estimate (a makespan over the slots) is
listed beside the measured time. ``--executor ray`` runs the same replays on the Ray backend
(``flordb_build.hindsight._ray``) once it is installed. The load average is printed before and
after: figures from a machine with load >= 1.5 are not idle-machine figures.

Run from the repository root with the project's interpreter::

    .venv/bin/python bench/bench_scale.py                       # about 4 minutes on 2 cores
    .venv/bin/python bench/bench_scale.py --runs 16 --cpu-runs 8 --repeats 1   # a quick look

The script exits 0 on a MISS: it is a report, not a gate.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from _common import BenchError, bench_env, make_git_repo, median, print_table, remove_tree

SLEEP_TARGET = 3.4
OVERHEAD_TARGET = 0.15
CPU_TARGET = 1.8

SLEEP_SCRIPT = textwrap.dedent(
    """
    import os
    import time
    import flordb_build as flor

    seed = flor.arg("seed", 0)
    state = {"w": seed}
    with flor.checkpointing(state=state):
        for epoch in flor.loop("epoch", range(2)):
            state["w"] += seed + epoch
            flor.log("w", state["w"])
    time.sleep(float(os.environ.get("BENCH_SLEEP", "0")))
    """
)
CPU_SCRIPT = textwrap.dedent(
    """
    import os
    import flordb_build as flor

    seed = flor.arg("seed", 0)
    state = {"w": seed}
    with flor.checkpointing(state=state):
        for epoch in flor.loop("epoch", range(2)):
            state["w"] += seed + epoch
            flor.log("w", state["w"])
    total = 0
    for i in range(int(os.environ.get("BENCH_CPU_ITERATIONS", "0"))):
        total += (i * seed) % 7
    """
)
STATEMENT = {"sleep": 'flor.log("x", state["w"] * 10)\n', "cpu": 'flor.log("y", total)\n'}


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def _record(root: Path, script: str, runs: int, env: dict[str, str]) -> None:
    """``runs`` recorded runs of ``script`` (seed 0..runs-1), two at a time; then today's statement."""

    def one(seed: int) -> None:
        proc = subprocess.run(
            [sys.executable, script, "--kwargs", f"seed={seed}"], cwd=root, env=env, capture_output=True, text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise BenchError(f"recording {script} seed={seed} failed:\n{proc.stderr[-2000:]}")

    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(one, range(runs)))


def _project(base: Path, kind: str, runs: int) -> Path:
    source = SLEEP_SCRIPT if kind == "sleep" else CPU_SCRIPT
    root = make_git_repo(base / kind, {
        "pyproject.toml": "[tool.flordb_build]\ncheckpoint_every = 1\n", f"{kind}.py": source,
    })
    env = bench_env({"BENCH_SLEEP": "0", "BENCH_CPU_ITERATIONS": "0"})
    _record(root, f"{kind}.py", runs, env)
    (root / f"{kind}.py").write_text(source + STATEMENT[kind], encoding="utf-8")
    subprocess.run(["git", "-C", str(root), "commit", "-q", "-am", "today"], check=True, env=env)
    return root


def _executor(name: str, config: Any, slots: int) -> Any:
    if name == "local":
        return None  # run_replay's default: LocalExecutor with the plan's slots and this machine's warm servers
    if name == "ray":
        from flordb_build.hindsight._execute import make_executor

        return make_executor(config, slots, None, "ray")  # as the CLI: each Ray worker's warm pool
    raise BenchError(f"unknown --executor '{name}'; use local or ray")


def _replay(root: Path, name: str, slots: int, executor: str) -> tuple[float, float]:
    """One replay session of every run: (wall seconds of run_replay, the plan's estimate)."""
    from flordb_build.config import load_config
    from flordb_build.hindsight import prepare_replay, run_replay

    os.chdir(root)
    config = load_config(root)
    plan = prepare_replay([name], workers=slots, config=config)
    backend = _executor(executor, config, slots)
    started = time.perf_counter()
    try:
        report = run_replay(plan, backend, config=config)
    finally:
        if backend is not None:
            backend.close()
    seconds = time.perf_counter() - started
    if not report.ok or len(report.outcomes) != len(plan.runs):
        raise BenchError(f"a replay of '{name}' with {slots} slot(s) failed: {report.first_error}")
    return seconds, plan.estimate


def _measure(root: Path, name: str, slots: Sequence[int], repeats: int, executor: str) -> dict[int, list[tuple[float, float]]]:
    """Replays of every run with each number of slots; the warm server stays up between them."""
    from flordb_build.config import load_config
    from flordb_build.hindsight._warm import project_servers

    _replay(root, name, max(slots), executor)  # starts the warm server (listed apart in bench_replay)
    found: dict[int, list[tuple[float, float]]] = {n: [] for n in slots}
    try:
        for _ in range(repeats):
            for n in slots:  # interleaved, so that the machine's load drifts over both alike
                found[n].append(_replay(root, name, n, executor))
    finally:
        for server in project_servers(load_config(root)):
            server.stop()
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=64)
    parser.add_argument("--sleep", type=float, default=1.0)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--cpu-runs", type=int, default=16)
    parser.add_argument("--cpu-iterations", type=int, default=3_000_000, help="suffix loop length (~0.5 s)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--executor", default="local", choices=("local", "ray"))
    parser.add_argument("--only", choices=("sleep", "cpu"))
    args = parser.parse_args(argv)
    print(f"load average before: {_load()} (idle-machine figures need < 1.5)")
    base = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    rows: list[list[str]] = []
    cwd = os.getcwd()
    try:
        os.environ["FLORDB_BUILD_REPLAY_KEEP_WARM"] = "300"  # one server across the measured sessions
        if args.only in (None, "sleep"):
            root = _project(base, "sleep", args.runs)
            os.environ["BENCH_SLEEP"] = str(args.sleep)
            found = _measure(root, "x", (1, args.slots), args.repeats, args.executor)
            os.environ["BENCH_SLEEP"] = "0"
            one = median([s for s, _e in found[1]])
            many = median([s for s, _e in found[args.slots]])
            overhead = (one - args.runs * args.sleep) / args.runs
            ratio = one / many
            rows.append([f"sleep {args.runs} x {args.sleep:g}s, 1 slot", f"{one:.2f}", f"{found[1][0][1]:.2f}", "-", ""])
            rows.append([f"sleep, {args.slots} slots", f"{many:.2f}", f"{found[args.slots][0][1]:.2f}",
                         f"{ratio:.2f}x", "PASS" if ratio >= SLEEP_TARGET else f"MISS (>= {SLEEP_TARGET}x)"])
            rows.append(["per-job overhead (1 slot)", f"{overhead:.3f}", "-", "-",
                         "PASS" if overhead <= OVERHEAD_TARGET else f"MISS (<= {OVERHEAD_TARGET}s)"])
        if args.only in (None, "cpu"):
            root = _project(base, "cpu", args.cpu_runs)
            os.environ["BENCH_CPU_ITERATIONS"] = str(args.cpu_iterations)
            found = _measure(root, "y", (1, 2), args.repeats, args.executor)
            one = median([s for s, _e in found[1]])
            two = median([s for s, _e in found[2]])
            ratio = one / two
            rows.append([f"cpu {args.cpu_runs} suffixes, --workers 1", f"{one:.2f}", f"{found[1][0][1]:.2f}", "-", ""])
            rows.append(["cpu, --workers 2", f"{two:.2f}", f"{found[2][0][1]:.2f}", f"{ratio:.2f}x",
                         "PASS" if ratio >= CPU_TARGET else f"MISS (>= {CPU_TARGET}x)"])
    finally:
        os.chdir(cwd)
        remove_tree(base)
    print_table(["replay", "seconds", "estimate", "speed-up", "target"], rows)
    print(f"executor: {args.executor}; repeats: {args.repeats}; load average after: {_load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
