"""Where a recorded run's CPU goes: thread CPU of each part of the flush and exit paths.

Runs bench_write.py's script (``--epochs x --steps`` floats under ``flor.loop``) in a fresh git
project, with the parts of the write path wrapped so that each call adds its
``time.thread_time()`` (and, for git, the CPU of the child processes it reaped) to a total.
cProfile would distort a loop of ~1 us calls; these wrappers cost ~1 us per *flush*, not per value.
Prints per part: calls, CPU seconds, us per logged value. Parts nest (``write_batch`` contains
``column_chunk`` ...): indented names are inside the part above them.

    .venv/bin/python bench/profile_write.py --epochs 20 --steps 100000
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import bench_env, make_git_repo, remove_tree  # noqa: E402
from bench_write import SCRIPT  # noqa: E402

#: (label, module, attribute path, depth): what is wrapped, in the order the table lists it.
PARTS = (
    ("flush (either thread)", "flordb_build.recording", "Run._flush_locked", 0),
    ("take_batch", "flordb_build.recording", "Run._take_batch", 1),
    ("journal entry (encode cols)", "flordb_build.recording", "Batch.journal_entry", 1),
    ("journal append (json + write)", "flordb_build.journalfile", "JournalFile.append", 1),
    ("store.write_batch", "flordb_build.store", "Store.write_batch", 1),
    ("column_chunk", "flordb_build.store", "column_chunk", 2),
    ("run close (exit path)", "flordb_build.recording", "Run.close", 0),
    ("last flush", "flordb_build.recording", "Run._flush_before_end", 1),
    ("store.update_run", "flordb_build.store", "Store.update_run", 1),
    ("snapshot commit (+ git children)", "flordb_build.snapshot", "commit_snapshot", 1),
    ("store.close", "flordb_build.store", "Store.close", 1),
)

PRELUDE = textwrap.dedent(
    """\
    import atexit, importlib, os, resource, sys, time
    _T = {}
    def _cpu():
        c = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.thread_time(), c.ru_utime + c.ru_stime
    def _report():
        s = resource.getrusage(resource.RUSAGE_SELF)
        c = resource.getrusage(resource.RUSAGE_CHILDREN)
        print("PROC", s.ru_utime + s.ru_stime, c.ru_utime + c.ru_stime, s.ru_maxrss, flush=True)
        for label, (calls, own, kids) in _T.items():
            print("PART", repr(label), calls, own, kids, flush=True)
    atexit.register(_report)  # registered before flordb_build's: runs after the run closed
    def _wrap(label, module, path):
        mod = importlib.import_module(module)
        owner, attr = (mod, path) if "." not in path else (getattr(mod, path.split(".")[0]), path.split(".")[1])
        inner = getattr(owner, attr)
        _T[label] = [0, 0.0, 0.0]
        def wrapper(*a, **k):
            t0, k0 = _cpu()
            try:
                return inner(*a, **k)
            finally:
                t1, k1 = _cpu()
                entry = _T[label]
                entry[0] += 1; entry[1] += t1 - t0; entry[2] += k1 - k0
        setattr(owner, attr, wrapper)
    for _label, _module, _path in PARTS:
        _wrap(_label, _module, _path)
    _loop_t0 = time.thread_time()
    """
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--steps", type=int, default=100_000)
    args = parser.parse_args()
    values = args.epochs * args.steps
    parts = [(label, module, path) for label, module, path, _depth in PARTS]
    script = f"PARTS = {parts!r}\n" + PRELUDE + SCRIPT + "print('LOOPCPU', time.thread_time() - _loop_t0, flush=True)\n"
    tmp = Path(tempfile.mkdtemp(prefix="flor-profile-write-"))
    try:
        repo = make_git_repo(tmp / "proj", {"train.py": script})
        env = bench_env({"BENCH_EPOCHS": str(args.epochs), "BENCH_STEPS": str(args.steps), "BENCH_MODE": "flor"})
        env["PYTHONPATH"] = os.environ.get("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
        proc = subprocess.run([sys.executable, "train.py"], cwd=repo, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            sys.exit(proc.stderr)
    finally:
        remove_tree(tmp)
    rows = {}
    for line in proc.stdout.splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "PROC":
            own, kids, rss = rest.split()
            total = float(own) + float(kids)
        elif kind == "LOOPCPU":
            loop_cpu = float(rest)
        elif kind == "PART":
            label_text, calls, own, kids = rest.rsplit(" ", 3)
            rows[eval(label_text)] = (int(calls), float(own), float(kids))  # noqa: S307 - our own repr
    print(f"{values:,} values; whole process CPU {total:.2f} s = {total / values * 1e6:.2f} us/value; "
          f"peak RSS {int(rss) / 1024:.0f} MB")
    print(f"main thread CPU from the loop's start to exit {loop_cpu:.2f} s")
    print(f"{'part':40} {'calls':>6} {'CPU s':>7} {'us/value':>9}")
    for label, _module, _path, depth in PARTS:
        calls, own, kids = rows.get(label, (0, 0.0, 0.0))
        print(f"{'  ' * depth + label:40} {calls:6d} {own + kids:7.3f} {(own + kids) / values * 1e6:9.3f}")


if __name__ == "__main__":
    main()
