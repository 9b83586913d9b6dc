"""What recording costs over a whole run, not only inside ``log()``: issue 14's write rows.

A script logs ``--epochs x --steps`` floats (default 20 x 100,000 = 2M) under ``flor.loop`` in a
fresh subprocess of a fresh git project, and the parent reports, medians of repeats:

* whole-run CPU (``wait4`` rusage of the child: user + sys) per logged value,
* peak RSS (``ru_maxrss``),
* ``log()`` per call in the loop (loop time / calls, the ``flor.loop`` step included),
* wall time after the loop ended (flush, exit, snapshot commit),
* flushes that landed while the loop ran (a watcher thread stats the run's journal, which every
  flush appends to before SQLite) and the share of the values on disk when the loop ended,
* bytes on disk per value (``flor.db`` + ``-wal`` + journal + what git's object store grew by).

Variants, interleaved per repeat:

* ``floor``: the same loops with ``log()`` replaced by ``list.append`` (no import of the tool),
* ``flor``: the tool in this worktree, default config,
* ``noflush``: the same with ``flush_seconds = 60``, so that nothing flushes inside the loop: the
  loop's slowdown of ``flor`` against it is what flushing during the loop costs,
* ``peer``: the tool at ``--peer-rev`` (default ``main``), extracted with ``git archive``.

The script exits 0 on a MISS: it is a report, not a gate.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    REPO_ROOT,
    bench_env,
    make_git_repo,
    median,
    peer_tree,
    print_table,
    remove_tree,
    spread,
)

CPU_US_TARGET = 1.0
RSS_MB_TARGET = 200.0
LOG_US_TARGET = 0.5
SLOWDOWN_TARGET = 0.10
BYTES_TARGET = 60.0

SCRIPT = textwrap.dedent(
    """\
    import os
    import sys
    import time

    EPOCHS = int(os.environ["BENCH_EPOCHS"])
    STEPS = int(os.environ["BENCH_STEPS"])
    MODE = os.environ["BENCH_MODE"]

    if MODE == "floor":
        sink = []
        log = lambda name, value: sink.append(value)  # noqa: E731 - the floor of a call
        loop = lambda name, iterable: iterable  # noqa: E731
    else:
        import flordb_build as flor

        flor.arg("lr", 0.01)  # starts the run, so the loop below times steady-state calls
        log, loop = flor.log, flor.loop

    # Floats with a full mantissa (a real loss does not compress like 0.5 * step).
    t_loop = time.perf_counter()
    wall_loop = time.time()
    for epoch in loop("epoch", range(EPOCHS)):
        for step in loop("step", range(STEPS)):
            log("loss", (step * 0.6180339887498949 + epoch) % 1.0)
    t_end = time.perf_counter()
    print(f"LOOP {wall_loop!r} {time.time()!r} {t_end - t_loop!r}", flush=True)
    """
)


@dataclass
class Measure:
    """One run of the script."""

    cpu_s: float
    rss_mb: float
    loop_s: float
    after_loop_s: float
    flushes_in_loop: int
    on_disk_at_loop_end: float
    disk_bytes: int


@dataclass
class Variant:
    name: str
    pythonpath: str | None
    flush_seconds: float | None
    runs: list[Measure] = field(default_factory=list)


def tree_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except FileNotFoundError:
                pass
    return total


class JournalWatcher(threading.Thread):
    """Stats the run's journal every ``period`` s: when it grew, and by how much."""

    def __init__(self, runs_dir: Path, period: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.runs_dir = runs_dir
        self.period = period
        self.samples: list[tuple[float, int]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        last = -1
        while not self.stop.is_set():
            size = 0
            try:
                for entry in os.scandir(self.runs_dir):
                    if entry.name.endswith(".jsonl"):
                        size += entry.stat().st_size
            except FileNotFoundError:
                pass
            if size != last:
                self.samples.append((time.time(), size))
                last = size
            self.stop.wait(self.period)


def measure(variant: Variant, work: Path, epochs: int, steps: int, index: int) -> Measure:
    project = make_git_repo(work / f"{variant.name}-{index}", {"write.py": SCRIPT})
    if variant.flush_seconds is not None:
        (project / "pyproject.toml").write_text(f"[tool.flordb_build]\nflush_seconds = {variant.flush_seconds}\n")
        subprocess.run(["git", "-C", str(project), "add", "-A"], check=True, env=bench_env())
        subprocess.run(["git", "-C", str(project), "commit", "-qm", "config"], check=True, env=bench_env())
    git_before = tree_bytes(project / ".git")
    extra = {"BENCH_EPOCHS": str(epochs), "BENCH_STEPS": str(steps), "BENCH_MODE": variant.name}
    if variant.pythonpath:
        extra["PYTHONPATH"] = variant.pythonpath
    env = bench_env(extra)
    watcher = JournalWatcher(project / ".flor" / "runs")
    watcher.start()
    proc = subprocess.Popen(
        [sys.executable, "write.py"], cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    _pid, status, usage = os.wait4(proc.pid, 0)
    ended = time.time()
    proc.returncode = os.waitstatus_to_exitcode(status)
    out = proc.stdout.read().decode() if proc.stdout else ""
    err = proc.stderr.read().decode() if proc.stderr else ""
    watcher.stop.set()
    watcher.join()
    if proc.returncode != 0:
        raise SystemExit(f"bench: {variant.name} exited {proc.returncode}:\n{err[-3000:]}")
    line = next(ln for ln in out.splitlines() if ln.startswith("LOOP "))
    loop_start, loop_end, loop_s = (float(x) for x in line.split()[1:])
    final = watcher.samples[-1][1] if watcher.samples else 0
    grew_in_loop = [s for (t, s) in watcher.samples if loop_start <= t <= loop_end and s > 0]
    at_end = max([s for (t, s) in watcher.samples if t <= loop_end] or [0])
    flor_dir = project / ".flor"
    disk = 0
    if flor_dir.exists():
        disk = sum(
            p.stat().st_size for p in (flor_dir / "flor.db", flor_dir / "flor.db-wal") if p.exists()
        ) + tree_bytes(flor_dir / "runs")
        disk += tree_bytes(project / ".git") - git_before
    result = Measure(
        cpu_s=usage.ru_utime + usage.ru_stime,
        rss_mb=usage.ru_maxrss / 1024,
        loop_s=loop_s,
        after_loop_s=ended - loop_end,
        flushes_in_loop=len(grew_in_loop),
        on_disk_at_loop_end=(at_end / final) if final else 0.0,
        disk_bytes=disk,
    )
    remove_tree(project)
    return result


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def render(variants: dict[str, Variant], values: int, calls: int, flush_seconds: float) -> None:
    def med(name: str, attr: str) -> float:
        return median([getattr(m, attr) for m in variants[name].runs])

    def spr(name: str, attr: str, scale: float = 1.0, digits: int = 2) -> str:
        return spread([getattr(m, attr) for m in variants[name].runs], scale, digits)

    names = [n for n in ("floor", "flor", "noflush", "peer") if n in variants]
    header = ["measure (medians)", *names, "target", "result (flor)"]
    rows = []

    def row(label: str, attr: str, scale: float, fmt: str, target: str, ok: bool | None) -> None:
        cells = [fmt.format(med(n, attr) * scale) for n in names]
        rows.append([label, *cells, target, "" if ok is None else verdict(ok)])

    cpu_us = med("flor", "cpu_s") * 1e6 / values
    row("whole-run CPU per value, us", "cpu_s", 1e6 / values, "{:.2f}", f"<= {CPU_US_TARGET}", cpu_us <= CPU_US_TARGET)
    rss = med("flor", "rss_mb")
    row("peak RSS, MB", "rss_mb", 1.0, "{:.0f}", f"<= {RSS_MB_TARGET:.0f}", rss <= RSS_MB_TARGET)
    log_us = med("flor", "loop_s") * 1e6 / calls
    row("log() in the loop, us/call", "loop_s", 1e6 / calls, "{:.3f}", f"<= {LOG_US_TARGET}", log_us <= LOG_US_TARGET)
    row("wall after the loop ended, s", "after_loop_s", 1.0, "{:.2f}", "", None)
    expected = max(int(med("flor", "loop_s") / flush_seconds) - 1, 1)
    flushes = med("flor", "flushes_in_loop")
    row("flushes seen while the loop ran", "flushes_in_loop", 1.0, "{:.0f}", f">= {expected} (every {flush_seconds} s)",
        flushes >= expected)
    row("share of values on disk at loop end", "on_disk_at_loop_end", 100.0, "{:.0f}%", "", None)
    bpv = med("flor", "disk_bytes") / values
    row("bytes on disk per value (db+wal+journal+git)", "disk_bytes", 1.0 / values, "{:.1f}", f"<= {BYTES_TARGET:.0f}",
        bpv <= BYTES_TARGET)
    print_table(header, rows)
    if "noflush" in variants:
        slow = med("flor", "loop_s") / med("noflush", "loop_s") - 1
        print(f"loop slowdown of flor against noflush (flushing inside the loop): {slow * 100:+.1f}% "
              f"(target <= {SLOWDOWN_TARGET * 100:.0f}%: {verdict(slow <= SLOWDOWN_TARGET)})")
    floor_loop = med("floor", "loop_s")
    print(f"loop against the list.append floor: flor {med('flor', 'loop_s') / floor_loop:.2f}x"
          + (f", peer {med('peer', 'loop_s') / floor_loop:.2f}x" if "peer" in variants else ""))
    for n in names:
        print(f"spreads {n}: cpu {spr(n, 'cpu_s')} s, rss {spr(n, 'rss_mb', digits=0)} MB, "
              f"loop {spr(n, 'loop_s')} s, after {spr(n, 'after_loop_s')} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peer-rev", default="main", help="git rev of the peer ('' for none)")
    parser.add_argument("--variants", default="floor,flor,noflush,peer")
    parser.add_argument("--json", type=Path, help="also write the raw measures here")
    args = parser.parse_args(argv)
    wanted = args.variants.split(",")
    if not args.peer_rev and "peer" in wanted:
        wanted.remove("peer")
    work = Path(tempfile.mkdtemp(prefix="flordb-bench-write-"))
    try:
        peer_path = str(peer_tree(args.peer_rev, work / "peer")) if "peer" in wanted else None
        variants = {
            "floor": Variant("floor", None, None),
            # This tree on the path: bench_env drops PYTHONPATH, and the venv's editable install may
            # be another checkout's (a worktree shares the lead's venv).
            "flor": Variant("flor", str(REPO_ROOT), None),
            "noflush": Variant("noflush", str(REPO_ROOT), 60.0),
            "peer": Variant("peer", peer_path, None),
        }
        variants = {n: v for n, v in variants.items() if n in wanted}
        for rep in range(args.repeats):
            order = list(variants)
            order = order[rep % len(order):] + order[: rep % len(order)]
            for name in order:
                variants[name].runs.append(measure(variants[name], work, args.epochs, args.steps, rep))
                print(f"bench: repeat {rep + 1}/{args.repeats} {name} done", file=sys.stderr, flush=True)
        values = args.epochs * args.steps
        from flordb_build.config import DEFAULT_FLUSH_SECONDS

        print(f"{args.epochs} x {args.steps} = {values:,} floats, medians of {args.repeats}, peer = {args.peer_rev}")
        render(variants, values, values, DEFAULT_FLUSH_SECONDS)
        if args.json:
            args.json.write_text(json.dumps({n: [m.__dict__ for m in v.runs] for n, v in variants.items()}, indent=1))
    finally:
        remove_tree(work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
