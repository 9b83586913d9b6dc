"""Hindsight propagation speed (issue 13): one 1,000-line script into 50 old versions.

Today's version of a generated training script (a model class, helpers, ``main()`` with the epoch
loop and a nested step loop, 1,000 lines) gains three ``flor.log`` statements (in ``forward``,
after the step loop, after the epoch loop). Fifty old versions differ from it and from each other
the way recorded versions do: a changed constant, a renamed variable, lines added or removed.

Both sides run in fresh subprocesses, interleaved, ``--repeats`` times each (median reported):

    ours       flordb_build.rewrite.propagate of this work tree
    baseline   the same call with flordb_build/rewrite/ (and errors.py) as they are at ``--baseline``
               (default ``main``), extracted with ``git show`` into a temporary package

Each subprocess times the 50 calls (today's version parsed in the first), wall clock and its own
CPU time (the steadier figure on a shared machine), and reports how many statements it placed.
Target: ours <= 5 s of wall clock, reported as a ratio to the baseline; the load average is printed
beside it. A report, not a gate: it exits 0 whatever the figures::

    .venv/bin/python bench/bench_propagate.py
    .venv/bin/python bench/bench_propagate.py --versions 10 --repeats 1     # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import REPO_ROOT, BenchError, median, print_table, remove_tree, spread

TARGET_SECONDS = 5.0
NAMES = ["h_mean", "val_twice", "final_twice"]

_WORKER = r"""
import json, sys, time
from flordb_build.rewrite import propagate
job = json.load(open(sys.argv[1]))
start, cpu = time.perf_counter(), time.process_time()
placed = 0
for old in job["old"]:
    placed += len(propagate(job["today"], old, job["names"]).placed)
print(json.dumps({"seconds": time.perf_counter() - start, "cpu": time.process_time() - cpu, "placed": placed}))
"""


def script(lines: int, version: int, today: bool = False) -> str:
    """A training script of about ``lines`` lines; ``version`` varies constants, names and helpers."""
    rate = f"{0.1 / (1 + version % 7):.4f}"
    hidden = 16 + version % 5
    acc = "total" if version % 3 else "running"
    out = [
        "import math",
        "import flordb_build as flor",
        "",
        "",
        "class Net:",
        "    def __init__(self, width):",
        f"        self.width = width + {hidden}",
        "        self.scale = 1.0 / math.sqrt(self.width)",
        "",
        "    def forward(self, x):",
        "        h = [v * self.scale for v in x]",
        *(["        flor.log('h_mean', sum(h) / len(h))"] if today else []),
        "        return sum(h)",
        "",
        "    def __call__(self, x):",
        "        return self.forward(x)",
        "",
        "",
    ]
    helpers = max(1, (lines - 80) // 22)
    for f in range(helpers):
        removed = version % 11 == f % 11 and f > 3  # some versions lack a line in some helpers
        out += [
            f"def helper_{f}(x, y):",
            f"    a = x * {f + 1} + {version % 4}",
            "    b = y + a",
            "    if a > b:",
            "        a = b - 1",
            "    else:",
            "        b = a + 1",
            *([] if removed else ["    c = math.sqrt(abs(a * b))"]),
            *(["    c = a"] if removed else []),
            "    for k in range(2):",
            "        c += k * 0.5",
            "    return c",
            "",
            "",
        ]
    out += [
        "def main():",
        "    model = Net(8)",
        f"    {acc} = 0.0",
        "    state = {'w': 0.0}",
        "    for epoch in flor.loop('epoch', range(3)):",
    ]
    for f in range(0, helpers, 3):
        out += [f"        v{f} = helper_{f}(state['w'], epoch)", f"        state['w'] += v{f} * {rate}"]
    out += [
        "        for step in flor.loop('step', range(4)):",
        "            loss = model([state['w'], step])",
        f"            {acc} += loss",
        *(["        flor.log('val_twice', state['w'] * 2)"] if today else []),
        "        flor.log('val', state['w'])",
        f"    flor.log('final', {acc})",
        *([f"    flor.log('final_twice', {acc} * 2)"] if today else []),
        "    return state",
        "",
        "",
    ]
    tail = ["if __name__ == '__main__':", "    main()"]
    while len(out) + len(tail) < lines:
        out.insert(len(out) - 2, f"CONSTANT_{len(out)} = {len(out) + version}")
    return "\n".join(out + tail) + "\n"


def baseline_package(ref: str, into: Path) -> Path:
    """``flordb_build/rewrite`` and ``errors.py`` at ``ref`` as an importable ``flordb_build`` under ``into``."""
    package = into / "flordb_build"
    (package / "rewrite").mkdir(parents=True)
    (package / "__init__.py").write_text("", encoding="utf-8")
    listing = subprocess.run(
        ["git", "ls-tree", "--name-only", f"{ref}:flordb_build/rewrite"], cwd=REPO_ROOT,
        capture_output=True, text=True,
    )
    if listing.returncode != 0:
        raise BenchError(f"Cannot read flordb_build/rewrite at '{ref}': {listing.stderr.strip()}. Pass --baseline REF.")
    for path in ["errors.py", *(f"rewrite/{name}" for name in listing.stdout.split())]:
        shown = subprocess.run(["git", "show", f"{ref}:flordb_build/{path}"], cwd=REPO_ROOT, capture_output=True)
        if shown.returncode != 0:
            raise BenchError(f"Cannot read flordb_build/{path} at '{ref}'.")
        (package / path).write_bytes(shown.stdout)
    return into


def run_worker(job: Path, path_first: Path | None) -> dict[str, float]:
    """One timed subprocess; ``path_first`` puts another flordb_build ahead of ours."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FLORDB_BUILD_DB")}
    if path_first is not None:
        env["PYTHONPATH"] = str(path_first)
    proc = subprocess.run([sys.executable, "-c", _WORKER, str(job)], capture_output=True, text=True, env=env,
                          cwd=job.parent)
    if proc.returncode != 0:
        raise BenchError(f"The propagation worker failed:\n{proc.stderr[-3000:]}")
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    """Build the versions, time both sides, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=1000)
    parser.add_argument("--versions", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", default="main", help="git ref of the propagate to compare with")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="flordb-bench-propagate-"))
    try:
        today = script(args.lines, args.versions, today=True)
        olds = [script(args.lines, v) for v in range(args.versions)]
        job = work / "job.json"
        job.write_text(json.dumps({"today": today, "old": olds, "names": NAMES}), encoding="utf-8")
        base = baseline_package(args.baseline, work / "baseline")
        ours: list[dict[str, float]] = []
        theirs: list[dict[str, float]] = []
        for _ in range(args.repeats):
            ours.append(run_worker(job, None))
            theirs.append(run_worker(job, base))
        mine, peer = median([r["seconds"] for r in ours]), median([r["seconds"] for r in theirs])
        mine_cpu, peer_cpu = median([r["cpu"] for r in ours]), median([r["cpu"] for r in theirs])
        wanted = len(NAMES) * args.versions
        print(f"{len(today.splitlines())}-line script, {args.versions} old versions, {len(NAMES)} new statements each,"
              f" {args.repeats} repeats; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        print_table(
            ["measure", "median", "spread", "placed", "target", "verdict"],
            [
                ["propagate (ours)", f"{mine:.2f}s", spread([r["seconds"] for r in ours]) + "s",
                 f"{int(ours[0]['placed'])}/{wanted}", f"<= {TARGET_SECONDS:.0f}s",
                 "PASS" if mine <= TARGET_SECONDS else "MISS"],
                [f"propagate ({args.baseline})", f"{peer:.2f}s", spread([r["seconds"] for r in theirs]) + "s",
                 f"{int(theirs[0]['placed'])}/{wanted}", "", ""],
                ["ratio baseline / ours", f"{peer / mine:.1f}x", "", "", "", ""],
                ["CPU s, ours", f"{mine_cpu:.2f}s", spread([r["cpu"] for r in ours]) + "s", "", "", ""],
                [f"CPU s, {args.baseline}", f"{peer_cpu:.2f}s", spread([r["cpu"] for r in theirs]) + "s", "", "", ""],
                ["CPU ratio baseline / ours", f"{peer_cpu / mine_cpu:.1f}x", "", "", "", ""],
            ],
        )
    finally:
        remove_tree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
