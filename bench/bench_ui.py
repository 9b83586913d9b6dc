"""Server time of ``flordb-build ui``'s pages over big stores: the runs page over 1,000 runs, the
run page of a run with 1,000,000 logged values (target: <= 1 s each).

Both stores are recorded by real scripts through the real API: 1,000 runs of a training loop in
one long-lived process (``flor.commit()`` ends each run) and one script logging ``loss`` per step
over 100 epochs x 10,000 steps plus ``val_acc`` per epoch. Server time is Flask's handling of
the request, from the request to the last byte of the response (its test client: no network, no
browser), after one request off the clock that compiles the page's templates. The runs table is
cached per store version, so "cold" clears that cache before each request (as a write would);
"warm" pages through a cached table. Nothing of a run page is cached. Prints medians of repeats.

    .venv/bin/python bench/bench_ui.py              # ~2 minutes on 2 cores (recording is most of it)
    .venv/bin/python bench/bench_ui.py --repeats 3 --runs 200 --steps 1000
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _common import BENCH_DIR, bench_env, make_git_repo, median, print_table, remove_tree, run_timed, spread

TARGET_SECONDS = 1.0

MANY_RUNS = """
import flordb_build as flor
import warnings
warnings.simplefilter("ignore")  # no git here: no snapshot commits, one warning
for i in range({runs}):
    lr = flor.arg("lr", round(0.0005 * (i + 1), 6))
    epochs = flor.arg("epochs", 10)
    acc = 0.0
    for epoch in flor.loop("epoch", range(epochs)):
        for step in flor.loop("step", range(20)):
            flor.log("loss", 1.0 / (1 + epoch + step * lr))
        acc = 1 - 1 / (2 + epoch * lr * 100)
        flor.log("val_acc", acc)
    flor.log("final_acc", acc)
    flor.log("best_epoch", epochs - 1)
    flor.commit()
"""

BIG_RUN = """
import flordb_build as flor
for epoch in flor.loop("epoch", range({epochs})):
    for step in flor.loop("step", range({steps})):
        flor.log("loss", 1.0 / (1 + epoch + step / {steps}))
    flor.log("val_acc", epoch / {epochs})
"""


def timed(get: Callable[[], object], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        get()
        out.append(time.perf_counter() - start)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1000, help="runs in the runs-page store (default 1000)")
    parser.add_argument("--steps", type=int, default=10_000, help="steps per epoch of the big run (100 epochs; default 10000)")
    parser.add_argument("--repeats", type=int, default=5, help="repeats per measure (default 5)")
    parser.add_argument("--keep", action="store_true", help="leave the temporary stores in place")
    args = parser.parse_args()

    sys.path.insert(0, str(BENCH_DIR.parent))
    from flordb_build.config import load_config
    from flordb_build.ui import create_app

    work = Path(tempfile.mkdtemp(prefix="flordb-bench-ui-"))
    try:
        many = work / "many"
        many.mkdir()
        (many / "record.py").write_text(MANY_RUNS.format(runs=args.runs))
        seconds = run_timed([sys.executable, "record.py"], many, work / "many.log", bench_env())
        print(f"recorded {args.runs} runs in {seconds:.1f} s", flush=True)
        big = make_git_repo(work / "big", {"train.py": BIG_RUN.format(epochs=100, steps=args.steps)})
        seconds = run_timed([sys.executable, "train.py"], big, work / "big.log", bench_env())
        print(f"recorded one run of {100 * args.steps + 100:,} values in {seconds:.1f} s", flush=True)

        here = os.getcwd()
        rows = []
        try:
            os.chdir(many)
            app = create_app(load_config(many))
            cache = app.extensions["flordb_build.run_tables"]
            client = app.test_client()

            def runs_page(url: str) -> Callable[[], object]:
                def get() -> object:
                    cache.clear()  # as after a write: the runs table is built again
                    response = client.get(url)
                    assert response.status_code == 200 and response.data.count(b"<tr data-run=") == 50, url
                    return response

                return get

            for label, url in (
                ("runs page, newest 50 of {n} (cold)", "/runs"),
                ("runs page, sorted by final_acc (cold)", "/runs?sort=final_acc&desc=1"),
                ("runs page, where lr > 0.2 (cold)", "/runs?where=lr%20%3E%200.2"),
            ):
                runs_page(url)()  # compiles the templates and imports what the page needs, off the clock
                values = timed(runs_page(url), args.repeats)
                rows.append((label.format(n=args.runs), values))
            client.get("/runs")
            values = timed(lambda: client.get("/runs?page=7"), args.repeats)
            rows.append((f"runs page 7 of {args.runs} (warm: table cached)", values))

            os.chdir(big)
            client = create_app(load_config(big)).test_client()
            run_id = client.get("/runs").data.split(b'<tr data-run="')[1].split(b'"')[0].decode()

            def run_page(url: str) -> Callable[[], object]:
                def get() -> object:
                    response = client.get(url)  # nothing of a run page is cached: every request reads it all
                    assert response.status_code == 200, url
                    return response

                return get

            for label, url in (
                (f"run page, {100 * args.steps + 100:,} values", f"/run/{run_id}"),
                ("live refresh of that run's charts", f"/api/run/{run_id}/figures"),
            ):
                run_page(url)()  # compiles the template, off the clock
                rows.append((label, timed(run_page(url), args.repeats)))
            page = client.get(f"/run/{run_id}")
            print(f"run page: {len(page.data):,} bytes sent (charts downsampled)")
        finally:
            os.chdir(here)

        table = [
            (label, f"{median(v):.3f}", spread(v, digits=3), f"<= {TARGET_SECONDS:.0f} s",
             "PASS" if median(v) <= TARGET_SECONDS else "MISS")
            for label, v in rows
        ]
        print()
        load = os.getloadavg()[0]
        print_table((f"measure (server time, s, medians of {args.repeats})", "median", "spread", "target", "result"),
                    table)
        print(f"load average during the run: {load:.1f} on {os.cpu_count()} cores")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            remove_tree(work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
