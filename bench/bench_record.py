"""Recording and query speed of flordb_build against FlorDB 4.0.1, measured in the same run.

Three measurements, each a median of repeats in fresh subprocesses inside temporary git repos:

1. ``log()`` in a nested loop: a script loops ``epoch x step`` with ``flor.loop`` and logs
   ``loss`` every step and ``val_acc`` every epoch (20 x 10,000 -> 200,020 calls). The script
   times its own loop (run already started by a ``flor.arg`` call, so start-up is not spread
   over the calls); the parent times the whole process, flush, exit and snapshot included.
   Targets: <= 3 us per call and >= 30x cheaper than FlorDB.
2. ``dataframe("loss")`` over the 5 runs that step 1 recorded (5 x 200,000 rows): the call
   alone, timed inside a fresh process that has already imported pandas and the tool.
   Target: >= 10x faster than FlorDB.
3. ``import flordb_build``: wall clock of ``python -c "import X"`` minus ``python -c pass``
   with the same interpreter, and ``-X importtime``'s cumulative figure. Target: <= 50 ms.

The repeats of step 1 run one after another in one project per tool (repeat i records run i),
so step 2 reads what the tools themselves wrote; the two tools' repeats are interleaved so
that load from other processes on the machine hits both alike. FlorDB 4.0.1 runs from its own
venv (default ``bench/.venv-flordb``, or ``$FLORDB_BENCH_VENV``), created on first use.

Run from the repository root with the project's interpreter::

    .venv/bin/python bench/bench_record.py                # full run, about 7 minutes on 2 cores
    .venv/bin/python bench/bench_record.py --steps 1000 --repeats 3   # a quick look
    .venv/bin/python bench/bench_record.py --import-only main         # measurement 3 vs main alone
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from _common import (
    DEFAULT_FLORDB_VENV,
    FLORDB_VENV_ENV_VAR,
    FLORDB_VERSION,
    REPO_ROOT,
    BenchError,
    bench_env,
    ensure_flordb_venv,
    make_git_repo,
    median,
    peer_tree,
    print_table,
    remove_tree,
    run_timed,
    spread,
)

# Targets from issue 2, "Speed".
LOG_US_TARGET = 3.0
LOG_RATIO_TARGET = 30.0
DATAFRAME_RATIO_TARGET = 10.0
IMPORT_MS_TARGET = 50.0

# The training script both tools run; only the import line differs. It reports its own
# timings to a file outside the repository (FlorDB captures stdout and commits the work tree).
TRAIN_SCRIPT = textwrap.dedent(
    """\
    import json
    import os
    import time

    EPOCHS = int(os.environ["BENCH_EPOCHS"])
    STEPS = int(os.environ["BENCH_STEPS"])

    # The same loop body without the tool, as a floor for the per-call figure. It runs before
    # the import so that no background thread of the tool (a flusher) competes with it.
    t_bare = time.perf_counter()
    sink = 0.0
    for epoch in range(EPOCHS):
        for step in range(STEPS):
            sink += 0.01 / (epoch * STEPS + step + 1)
        sink += epoch / EPOCHS
    t_bare_end = time.perf_counter()

    t_start = time.perf_counter()
    import {module} as flor
    t_imported = time.perf_counter()

    lr = flor.arg("lr", 0.01)  # starts the run, so the loop below times steady-state calls
    t_loop = time.perf_counter()
    for epoch in flor.loop("epoch", range(EPOCHS)):
        for step in flor.loop("step", range(STEPS)):
            flor.log("loss", lr / (epoch * STEPS + step + 1))
        flor.log("val_acc", epoch / EPOCHS)
    t_end = time.perf_counter()

    with open(os.environ["BENCH_RESULT"], "w") as out:
        json.dump(
            {{
                "import_s": t_imported - t_start,
                "start_s": t_loop - t_imported,
                "loop_s": t_end - t_loop,
                "bare_s": t_bare_end - t_bare,
                "logs": EPOCHS * STEPS + EPOCHS,
            }},
            out,
        )
    """
)

# Reads the frame back. pandas is imported before the clock starts: both tools hand back pandas
# frames, FlorDB imports pandas eagerly and flordb_build lazily, and the target is the query.
QUERY_SCRIPT = textwrap.dedent(
    """\
    import json
    import os
    import time

    import pandas
    import {module} as flor

    t0 = time.perf_counter()
    frame = flor.dataframe("loss")
    t1 = time.perf_counter()
    with open(os.environ["BENCH_RESULT"], "w") as out:
        json.dump({{"seconds": t1 - t0, "rows": len(frame), "columns": [str(c) for c in frame.columns]}}, out)
    """
)


@dataclass(frozen=True)
class Tool:
    """One contender: the interpreter that has it and the module a script imports."""

    label: str
    python: Path
    module: str
    pythonpath: str | None = None  # where its code comes from instead of the install (--import-only's peer)


@dataclass(frozen=True)
class RecordRun:
    """What one training-script run reported, plus its end-to-end wall time."""

    loop_us_per_call: float
    bare_us_per_call: float
    start_s: float
    end_to_end_s: float


@dataclass(frozen=True)
class Results:
    """Everything the table prints, per tool label."""

    record: dict[str, list[RecordRun]]
    dataframe_s: dict[str, list[float]]
    dataframe_rows: dict[str, int]
    import_wall_ms: dict[str, list[float]]
    import_self_ms: dict[str, list[float]]


def make_projects(tools: Sequence[Tool], work: Path) -> dict[str, Path]:
    """One git repository per tool, holding the training script in its first commit."""
    return {
        tool.label: make_git_repo(
            work / tool.module / "project", {"train.py": TRAIN_SCRIPT.format(module=tool.module)}
        )
        for tool in tools
    }


def measure_record(
    tools: Sequence[Tool], projects: dict[str, Path], work: Path, epochs: int, steps: int, repeats: int
) -> dict[str, list[RecordRun]]:
    """Median material for measurement 1: ``repeats`` runs per tool, each a new run in its project."""
    runs: dict[str, list[RecordRun]] = {tool.label: [] for tool in tools}
    for i in range(repeats):
        for tool in tools:
            result = work / tool.module / f"record-{i}.json"
            env = bench_env(
                {"BENCH_EPOCHS": str(epochs), "BENCH_STEPS": str(steps), "BENCH_RESULT": str(result)}
            )
            wall = run_timed(
                [str(tool.python), "train.py"],
                projects[tool.label],
                work / tool.module / f"record-{i}.log",
                env,
            )
            data = json.loads(result.read_text())
            run = RecordRun(
                loop_us_per_call=data["loop_s"] / data["logs"] * 1e6,
                bare_us_per_call=data["bare_s"] / data["logs"] * 1e6,
                start_s=data["start_s"],
                end_to_end_s=wall,
            )
            runs[tool.label].append(run)
            print(
                f"  record {i + 1}/{repeats} {tool.label:<13} {run.loop_us_per_call:8.2f} us/call  "
                f"end-to-end {wall:6.2f} s",
                flush=True,
            )
    return runs


def measure_dataframe(
    tools: Sequence[Tool], projects: dict[str, Path], work: Path, repeats: int, expected_rows: int
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Measurement 2: ``dataframe("loss")`` in a fresh process per repeat, per tool."""
    seconds: dict[str, list[float]] = {tool.label: [] for tool in tools}
    rows: dict[str, int] = {}
    for tool in tools:
        # Outside the project: FlorDB commits the whole work tree of the runs it records.
        (work / tool.module / "query.py").write_text(
            QUERY_SCRIPT.format(module=tool.module), encoding="utf-8"
        )
    for i in range(repeats):
        for tool in tools:
            result = work / tool.module / f"query-{i}.json"
            run_timed(
                [str(tool.python), str(work / tool.module / "query.py")],
                projects[tool.label],
                work / tool.module / f"query-{i}.log",
                bench_env({"BENCH_RESULT": str(result)}),
            )
            data = json.loads(result.read_text())
            if data["rows"] != expected_rows:
                raise BenchError(
                    f"{tool.label} dataframe('loss') returned {data['rows']} rows, expected {expected_rows}; "
                    f"columns {data['columns']}. The comparison would be meaningless."
                )
            rows[tool.label] = data["rows"]
            seconds[tool.label].append(data["seconds"])
            print(f"  dataframe {i + 1}/{repeats} {tool.label:<13} {data['seconds']:7.3f} s", flush=True)
    return seconds, rows


_IMPORTTIME_LINE = re.compile(r"^import time:\s*(\d+)\s*\|\s*(\d+)\s*\|(\s*)(\S+)\s*$")


def importtime_ms(stderr: str, module: str) -> float:
    """The cumulative milliseconds ``-X importtime`` reports for top-level ``module``."""
    for line in stderr.splitlines():
        match = _IMPORTTIME_LINE.match(line)
        if match and match.group(4) == module and len(match.group(3)) == 1:
            return int(match.group(2)) / 1000.0
    raise BenchError(f"-X importtime printed no top-level line for '{module}'.")


def measure_import(
    tools: Sequence[Tool], work: Path, repeats: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Measurement 3: import wall time above a bare interpreter, and -X importtime's figure."""
    # FlorDB refuses to import outside a git repository (and makes .flor/ there on import).
    repo = make_git_repo(work / "import-project")

    def env_of(tool: Tool) -> dict[str, str]:
        return bench_env({"PYTHONPATH": tool.pythonpath} if tool.pythonpath else None)

    def wall(tool: Tool, code: str) -> float:
        start = time.perf_counter()
        subprocess.run([str(tool.python), "-c", code], cwd=repo, env=env_of(tool), check=True, capture_output=True)
        return time.perf_counter() - start

    def self_reported(tool: Tool) -> float:
        proc = subprocess.run(
            [str(tool.python), "-X", "importtime", "-c", f"import {tool.module}"],
            cwd=repo,
            env=env_of(tool),
            check=True,
            capture_output=True,
            text=True,
        )
        return importtime_ms(proc.stderr, tool.module)

    for tool in tools:  # warm-up: byte-compile caches, page cache, FlorDB's one-time .flor/ setup
        wall(tool, f"import {tool.module}")
    wall_ms: dict[str, list[float]] = {tool.label: [] for tool in tools}
    self_ms: dict[str, list[float]] = {tool.label: [] for tool in tools}
    for _ in range(repeats):
        for tool in tools:
            bare = wall(tool, "pass")
            wall_ms[tool.label].append((wall(tool, f"import {tool.module}") - bare) * 1000)
            self_ms[tool.label].append(self_reported(tool))
    return wall_ms, self_ms


def verdict(ok: bool) -> str:
    """The table's result cell."""
    return "PASS" if ok else "MISS"


def render(results: Results, ours: str, peer: str, epochs: int, steps: int, repeats: int) -> bool:
    """Print the table; return whether every target was met."""
    rec_ours, rec_peer = results.record[ours], results.record[peer]

    def med(runs: list[RecordRun], field: Callable[[RecordRun], float]) -> float:
        return median([field(r) for r in runs])

    log_ours = med(rec_ours, lambda r: r.loop_us_per_call)
    log_peer = med(rec_peer, lambda r: r.loop_us_per_call)
    e2e_ours = med(rec_ours, lambda r: r.end_to_end_s)
    e2e_peer = med(rec_peer, lambda r: r.end_to_end_s)
    df_ours, df_peer = median(results.dataframe_s[ours]), median(results.dataframe_s[peer])
    imp_ours, imp_peer = median(results.import_wall_ms[ours]), median(results.import_wall_ms[peer])
    self_ours, self_peer = median(results.import_self_ms[ours]), median(results.import_self_ms[peer])
    log_ratio, df_ratio = log_peer / log_ours, df_peer / df_ours

    log_ok = log_ours <= LOG_US_TARGET and log_ratio >= LOG_RATIO_TARGET
    df_ok = df_ratio >= DATAFRAME_RATIO_TARGET
    imp_ok = imp_ours <= IMPORT_MS_TARGET
    n_logs = epochs * steps + epochs
    rows = [
        [
            f"log() in epoch x step loop, us/call ({n_logs:,} calls)",
            f"{log_ours:.2f}",
            f"{log_peer:.1f}",
            f"{log_ratio:.0f}x",
            f"<= {LOG_US_TARGET:g} us, >= {LOG_RATIO_TARGET:g}x",
            verdict(log_ok),
        ],
        [
            "  same loop without the tool, us/iter (floor)",
            f"{med(rec_ours, lambda r: r.bare_us_per_call):.3f}",
            f"{med(rec_peer, lambda r: r.bare_us_per_call):.3f}",
            "",
            "",
            "",
        ],
        [
            "  run start (first flor.arg), s",
            f"{med(rec_ours, lambda r: r.start_s):.3f}",
            f"{med(rec_peer, lambda r: r.start_s):.3f}",
            f"{med(rec_peer, lambda r: r.start_s) / med(rec_ours, lambda r: r.start_s):.1f}x",
            "",
            "",
        ],
        [
            "training script end to end (import, loop, flush, exit), s",
            f"{e2e_ours:.2f}",
            f"{e2e_peer:.2f}",
            f"{e2e_peer / e2e_ours:.1f}x",
            "",
            "",
        ],
        [
            f'dataframe("loss"), s ({repeats} runs x {epochs * steps:,} rows)',
            f"{df_ours:.3f}",
            f"{df_peer:.3f}",
            f"{df_ratio:.1f}x",
            f">= {DATAFRAME_RATIO_TARGET:g}x",
            verdict(df_ok),
        ],
        [
            "import, ms (wall minus bare interpreter)",
            f"{imp_ours:.1f}",
            f"{imp_peer:.1f}",
            f"{imp_peer / imp_ours:.1f}x",
            f"<= {IMPORT_MS_TARGET:g} ms",
            verdict(imp_ok),
        ],
        [
            "  import, ms (-X importtime cumulative)",
            f"{self_ours:.1f}",
            f"{self_peer:.1f}",
            f"{self_peer / self_ours:.1f}x",
            "",
            "",
        ],
    ]
    print()
    print_table(["measure (medians)", ours, peer, "ratio", "target", "result"], rows)
    print()
    print("spread (min-max over repeats):")
    print(
        f"  log us/call      {ours}: {spread([r.loop_us_per_call for r in rec_ours])}"
        f"   {peer}: {spread([r.loop_us_per_call for r in rec_peer], digits=1)}"
    )
    print(
        f"  end to end s     {ours}: {spread([r.end_to_end_s for r in rec_ours])}"
        f"   {peer}: {spread([r.end_to_end_s for r in rec_peer])}"
    )
    print(
        f"  dataframe s      {ours}: {spread(results.dataframe_s[ours], digits=3)}"
        f"   {peer}: {spread(results.dataframe_s[peer], digits=3)}"
    )
    print(
        f"  import ms        {ours}: {spread(results.import_wall_ms[ours], digits=1)}"
        f"   {peer}: {spread(results.import_wall_ms[peer], digits=1)}"
    )
    return log_ok and df_ok and imp_ok


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=20, help="outer loop iterations (default 20)")
    parser.add_argument(
        "--steps", type=int, default=10_000, help="inner loop iterations per epoch (default 10000)"
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="training runs per tool = runs the dataframe reads"
    )
    parser.add_argument("--df-repeats", type=int, default=5, help="dataframe() repeats per tool (default 5)")
    parser.add_argument("--import-repeats", type=int, default=9, help="import timings per tool (default 9)")
    parser.add_argument(
        "--flordb-venv",
        type=Path,
        default=Path(os.environ.get(FLORDB_VENV_ENV_VAR, DEFAULT_FLORDB_VENV)),
        help=f"venv holding flordb=={FLORDB_VERSION}; created when missing (default bench/.venv-flordb)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary projects and print where")
    parser.add_argument(
        "--import-only", metavar="REV", nargs="?", const="main", default=None,
        help="measure only `import flordb_build`, against flordb_build at git revision REV (default main)",
    )
    args = parser.parse_args(argv)
    for name in ("epochs", "steps", "repeats", "df_repeats", "import_repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got '{getattr(args, name)}'.")
    return args


def import_only(rev: str, repeats: int) -> int:
    """Measurement 3 alone: this tree's ``import flordb_build`` vs the same at ``rev``, interleaved."""
    work = Path(tempfile.mkdtemp(prefix="flordb-bench-import-"))
    try:
        peer_dir = peer_tree(rev, work / "peer")
        ours = Tool("flordb_build (this tree)", Path(sys.executable), "flordb_build", str(REPO_ROOT))
        peer = Tool(f"flordb_build at {rev}", Path(sys.executable), "flordb_build", str(peer_dir))
        load = " ".join(f"{v:.2f}" for v in os.getloadavg())
        wall_ms, self_ms = measure_import((ours, peer), work, repeats)
    finally:
        remove_tree(work)
    print(f"import flordb_build, median of {repeats} (load average before {load}, after "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}):")
    for tool in (ours, peer):
        wall_med, self_med = median(wall_ms[tool.label]), median(self_ms[tool.label])
        print(f"  {tool.label:<28} {wall_med:6.1f} ms wall minus bare interpreter, {self_med:6.1f} ms -X importtime  "
              f"{verdict(wall_med <= IMPORT_MS_TARGET) if tool is ours else ''}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the three measurements and print the table; exit 0 even on a MISS (it is a report)."""
    args = parse_args(argv)
    try:
        import flordb_build
    except ImportError:
        print(
            "bench: flordb_build is not importable; run with the project's venv: .venv/bin/python",
            file=sys.stderr,
        )
        return 1
    if args.import_only is not None:
        return import_only(args.import_only, args.import_repeats)
    try:
        peer_python = ensure_flordb_venv(args.flordb_venv.resolve())
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    ours = Tool("flordb_build", Path(sys.executable), "flordb_build")
    peer = Tool(f"FlorDB {FLORDB_VERSION}", peer_python, "flordb")
    tools = (ours, peer)
    print(
        f"flordb_build {flordb_build.__version__} vs FlorDB {FLORDB_VERSION}; Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, {platform.machine()}; {args.epochs} x {args.steps} loop, "
        f"{args.repeats} runs per tool",
        flush=True,
    )
    work = Path(tempfile.mkdtemp(prefix="flordb-bench-"))
    try:
        projects = make_projects(tools, work)
        print("1/3 log() in a nested loop", flush=True)
        record = measure_record(tools, projects, work, args.epochs, args.steps, args.repeats)
        print("2/3 dataframe('loss')", flush=True)
        expected = args.repeats * args.epochs * args.steps
        df_seconds, df_rows = measure_dataframe(tools, projects, work, args.df_repeats, expected)
        print("3/3 import", flush=True)
        wall_ms, self_ms = measure_import(tools, work, args.import_repeats)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        print(f"bench: temporary projects kept in '{work}'", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"temporary projects kept in '{work}'")
    if not args.keep:
        remove_tree(work)
    results = Results(record, df_seconds, df_rows, wall_ms, self_ms)
    all_ok = render(results, ours.label, peer.label, args.epochs, args.steps, args.repeats)
    print()
    print("all targets met" if all_ok else "some targets missed (see MISS above)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
