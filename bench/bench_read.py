"""The dataframe read path against its physical floor: issue 14's read rows.

Stores (each built once: one real recorded run, copied under new run ids in SQLite):

- ``1xN``: one run of N values of ``loss`` (20 epochs x N/20 steps), ``val_acc`` per epoch;
- ``20x200k``: that script's 200k-value run, 20 times;
- ``1000 runs``: a run with a run-level arg and value and R logged values, 1,000 times, for
  R = 20 and R = 2,000 (``dataframe()`` must not grow with R).

Measures, each in a fresh process per tool (ours, and the peer: ``flordb_build`` at ``--peer-rev``,
default ``main``, from ``git archive``), after one warm-up call, median of ``--repeats``:

- ``dataframe("loss")`` beside the **numpy floor**: the same values read from the same file with the
  least code, ``SELECT ctx_ids, vals FROM log_columns WHERE name = 'loss'`` and ``np.frombuffer`` of
  each chunk, concatenated (the packed copy of the values every writer stores; reading them is a
  range scan and a memcpy). The row floor (``np.fromiter`` over ``SELECT value FROM logs``) is
  printed beside it for scale.
- memory: the tracemalloc peak of one call over the size of the frame it returns (tracemalloc
  counts numpy and pandas buffers), target <= 2x;
- ``where=`` on dimension columns (``epoch >= 8``, ``step < 1000``) over the unfiltered call;
- ``dataframe()`` (one row per run) over 1,000 runs, and over the 1xN store.

    .venv/bin/python bench/bench_read.py                       # N = 1M (a few minutes)
    .venv/bin/python bench/bench_read.py --values 5000000      # issue 14's 1 x 5M
    .venv/bin/python bench/bench_read.py --values 200000 --repeats 3 --skip-peer   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import (  # noqa: E402
    bench_env,
    make_git_repo,
    median,
    peer_tree,
    print_table,
    remove_tree,
    run_timed,
    spread,
)
from bench.bench_team import copy_runs_locally  # noqa: E402

SCRIPT = """
import sys
import flordb_build as flor

lr = flor.arg("lr", 0.1)
EPOCHS = 20
steps = max(1, int(sys.argv[1]) // EPOCHS)
for epoch in flor.loop("epoch", range(EPOCHS)):
    for step in flor.loop("step", range(steps)):
        flor.log("loss", step / 7)
    flor.log("val_acc", epoch / 20)
flor.log("final", lr * 2)
"""

#: flor.query statements over `logs` timed on the 1xN store (issue 14 sets no target; the cost of packing).
USER_SQL = (
    "SELECT count(*), total(value) FROM logs WHERE name = 'loss'",
    "SELECT seq, ctx_id, value FROM logs WHERE name = 'loss'",
)

# Runs in the measured process: times calls of one dataframe(...) and prints JSON.
CHILD = r"""
import json, sqlite3, sys, time, tracemalloc
import numpy as np, pandas as pd
import flordb_build as flor
spec = json.loads(sys.argv[1])
names, where, repeats = spec["names"], spec["where"], spec["repeats"]
call = (lambda: flor.query(spec["sql"], timeout=None)) if spec.get("sql") else (lambda: flor.dataframe(*names, where=where))
frame = call()  # warm-up: the OS page cache and the imports, as in a notebook's second call
seconds = []
for _ in range(repeats):
    start = time.perf_counter(); frame = call(); seconds.append(time.perf_counter() - start)
out = {"seconds": seconds, "rows": len(frame), "columns": list(frame.columns)}
if spec["memory"]:
    del frame
    tracemalloc.start()
    frame = call()
    kept, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    out["peak_bytes"], out["frame_bytes"] = peak, kept
if spec["floor"]:
    conn = sqlite3.connect("file:.flor/flor.db?mode=ro", uri=True)
    name = names[0]
    def packed():
        chunks = conn.execute("SELECT ctx_ids, vals FROM log_columns WHERE name = ?", (name,)).fetchall()
        return (np.concatenate([np.frombuffer(c, np.int64) for c, _ in chunks]),
                np.concatenate([np.frombuffer(v, np.float64) for _, v in chunks]))
    def rows():
        cur = conn.execute("SELECT value FROM logs WHERE name = ? AND source = 'record'", (name,))
        return np.fromiter((v for (v,) in cur), np.float64)
    for key, floor in (("floor_packed", packed), ("floor_rows", rows)):
        floor()
        times = []
        for _ in range(repeats):
            start = time.perf_counter(); got = floor(); times.append(time.perf_counter() - start)
        out[key] = times
        n = len(got[1] if isinstance(got, tuple) else got)
        if key == "floor_rows" and n == 0:  # schema 7: the recorded floats are in log_columns only
            del out[key]
            continue
        assert n == out["rows"] or where, (key, n, out["rows"])
print("RESULT " + json.dumps(out))
"""


def build_store(project: Path, values: int, copies: int, work: Path, python_path: Path | None = None) -> list[str]:
    """Record one run of ``values`` values in ``project`` with the code at ``python_path`` (None: ours)
    and copy it ``copies`` times; return the run ids."""
    import sqlite3

    # Recorded by that tree, explicitly: bench_env drops PYTHONPATH, and a venv shared between worktrees
    # would otherwise import whichever checkout it was installed from. Each tool reads a store its own
    # code recorded: a peer of another schema would not see values kept where it does not look.
    env = bench_env({"PYTHONPATH": str(python_path or ROOT)})
    run_timed([sys.executable, "record.py", str(values)], project, work / f"record-{project.name}.log", env)
    db = project / ".flor" / "flor.db"
    conn = sqlite3.connect(db)
    (base,) = conn.execute("SELECT run_id FROM runs").fetchone()
    conn.close()
    return [base, *copy_runs_locally(db, base, copies)] if copies else [base]


def measure(
    project: Path, python_path: Path | None, names: list[str], where: str | None, repeats: int, *, memory: bool, floor: bool,
    sql: str | None = None,
) -> dict[str, object]:
    """One fresh process timing ``dataframe(*names, where=where)`` (or ``query(sql)``), with the code at
    ``python_path`` (None: ours)."""
    env = bench_env({"PYTHONPATH": str(python_path or ROOT)})
    spec = json.dumps({"names": names, "where": where, "repeats": repeats, "memory": memory, "floor": floor, "sql": sql})
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, spec], cwd=project, env=env, capture_output=True, text=True, check=False
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"measuring {names} where={where!r} in '{project}' failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(line[len("RESULT ") :])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--values", type=int, default=1_000_000, help="values of the 1xN store (default 1M)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measure (default 5)")
    parser.add_argument("--peer-rev", default="main", help="the git revision measured as the peer (default main)")
    parser.add_argument("--skip-peer", action="store_true", help="measure our code only")
    parser.add_argument("--skip-runs", action="store_true", help="skip the 1,000-run stores")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="flor-bench-read-"))
    try:
        peer = None if args.skip_peer else peer_tree(args.peer_rev, work / "peer")
        tools: list[tuple[str, Path | None]] = [("ours", None)] + ([] if peer is None else [(args.peer_rev, peer)])
        stores = {
            f"1x{args.values:,}": (args.values, 0),
            "20x200,000": (200_000, 19),
        }
        if not args.skip_runs:
            stores["1000 runs x 20"] = (20, 999)
            stores["1000 runs x 2,000"] = (2_000, 999)
        projects: dict[tuple[str, str], Path] = {}
        for label, (values, copies) in stores.items():
            for tool, path in tools:
                print(f"building {label} for {tool} ...", flush=True)
                project = make_git_repo(work / f"p{len(projects)}", {"record.py": SCRIPT})
                build_store(project, values, copies, work, path)
                projects[(tool, label)] = project
        rows: list[list[str]] = []
        detail: list[str] = []

        def row(what: str, ours: list[float], base: list[float] | None, base_label: str, target: str) -> float:
            ratio = median(ours) / median(base) if base else float("nan")
            rows.append([what, f"{median(ours):.4f}", spread(ours, digits=4), f"{ratio:.2f}x {base_label}", target])
            return ratio

        for label in [k for k in stores if not k.startswith("1000")]:
            results = {
                tool: measure(projects[(tool, label)], path, ["loss"], None, args.repeats, memory=True, floor=True)
                for tool, path in tools
            }
            ours = results["ours"]
            assert isinstance(ours["seconds"], list)
            row(f'{label}: dataframe("loss") s', ours["seconds"], ours["floor_packed"], "numpy floor", "<= 5x floor")  # type: ignore[arg-type]
            with_rows = next((r["floor_rows"] for r in results.values() if "floor_rows" in r), None)
            row_floor = "none: no value is a row" if with_rows is None else f"{median(with_rows):.4f} s"  # type: ignore[arg-type]
            detail.append(
                f"{label}: rows {ours['rows']:,}, numpy floor {median(ours['floor_packed']):.4f} s "  # type: ignore[arg-type]
                f"(row floor {row_floor}), memory peak {ours['peak_bytes'] / 1e6:.0f} MB "  # type: ignore[operator]
                f"= {ours['peak_bytes'] / ours['frame_bytes']:.2f}x the frame's {ours['frame_bytes'] / 1e6:.0f} MB"  # type: ignore[operator]
            )
            for tool, _path in tools[1:]:
                peer_result = results[tool]
                row(f'{label}: dataframe("loss") s, {tool}', peer_result["seconds"], ours["seconds"], "ours", "")  # type: ignore[arg-type]
                detail.append(
                    f"{label} {tool}: memory peak {peer_result['peak_bytes'] / 1e6:.0f} MB = "  # type: ignore[operator]
                    f"{peer_result['peak_bytes'] / peer_result['frame_bytes']:.2f}x the frame"  # type: ignore[operator]
                )
            for where in ("epoch >= 8", "step < 1000"):
                for tool, path in tools:
                    filtered = measure(projects[(tool, label)], path, ["loss"], where, args.repeats, memory=False, floor=False)
                    base = results[tool]["seconds"]
                    row(f"{label}: where {where!r} s, {tool}", filtered["seconds"], base, "unfiltered", "<= 1.2x")  # type: ignore[arg-type]
        # User SQL over `logs`: a table in main; since schema 7 a TEMP view expanding the packed chunks.
        for sql in USER_SQL:
            label = f"1x{args.values:,}"
            times = {tool: measure(projects[(tool, label)], path, [], None, args.repeats, memory=False, floor=False, sql=sql)
                     for tool, path in tools}
            for tool, _path in tools:
                base = times["ours"]["seconds"] if tool != "ours" else None
                row(f"{label}: query {sql!r} s, {tool}", times[tool]["seconds"], base, "ours" if base else "", "")  # type: ignore[arg-type]
        run_level = [k for k in stores if k.startswith("1000")] + [f"1x{args.values:,}"]
        for label in run_level:
            for tool, path in tools:
                result = measure(projects[(tool, label)], path, [], None, args.repeats, memory=False, floor=False)
                rows.append(
                    [f"{label}: dataframe() s, {tool}", f"{median(result['seconds']):.4f}",  # type: ignore[arg-type]
                     spread(result["seconds"], digits=4), f"{result['rows']} rows", "<= 0.012 s (1000 runs)"]  # type: ignore[arg-type]
                )
        print()
        print_table(["measure", "median", "spread", "ratio", "target"], rows)
        print()
        for line in detail:
            print(line)
        print(f"\nload average: {os.getloadavg()[0]:.1f} (cores: {os.cpu_count()})")
    finally:
        remove_tree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
