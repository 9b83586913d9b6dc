"""The plan's estimate vs the replay's wall time, first replay of a fresh project included (issue 16).

Each case is a FRESH project: a new git repository and store, and a runtime directory of its own
(``XDG_RUNTIME_DIR``), so no warm server is up and no replay cost was learned yet. ``--runs``
recorded runs of a small torch training (an MLP, SGD ``--epochs`` epochs, a checkpoint per epoch) get one new
statement, then are replayed ``--replays`` times in a row, each replay a session of its own (one
``run_replay`` call, like one ``flordb-build replay`` command):

==============  =====================================================================================
``validation``  ``flor.log("wnorm", ...)`` after the step loop: every epoch restored, its steps skipped
``suffix``      ``flor.log("final2", ...)`` after the training loop: restore the end, run the tail
==============  =====================================================================================

The first replay starts the project's warm server (its preload imports included) and learns the
project's costs; the later ones fork from that server and use what was learned. Every replay
lists the plan's estimate (``ReplayPlan.estimate``: a makespan over the ``--workers`` slots)
beside the wall time of ``run_replay``; target: within 25 % for the first replay and the later
ones. ``--load N`` keeps N busy processes spinning during the measurement (a loaded machine);
the load average is printed before and after.

Run from the repository root with the project's interpreter::

    .venv/bin/python bench/bench_estimate.py                      # about 5 minutes on 2 cores (load ~2)
    .venv/bin/python bench/bench_estimate.py --load 2             # the same on a loaded machine
    .venv/bin/python bench/bench_estimate.py --runs 3 --more 0    # a quick look

The script exits 0 on a MISS: it is a report, not a gate.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from _common import BenchError, bench_env, make_git_repo, median, print_table, remove_tree

TARGET = 0.25

TRAIN = textwrap.dedent(
    """
    import torch
    import flordb_build as flor

    torch.set_num_threads(1)
    seed = flor.arg("seed", 0)
    epochs = flor.arg("epochs", 4)
    torch.manual_seed(seed)
    x = torch.randn(1024, 64)
    y = x[:, :10].argmax(dim=1)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = torch.nn.CrossEntropyLoss()
    with flor.checkpointing(model=model, optimizer=optimizer):
        for epoch in flor.loop("epoch", range(epochs)):
            for step in flor.loop("step", range(16)):
                xb, yb = x[step * 64:(step + 1) * 64], y[step * 64:(step + 1) * 64]
                optimizer.zero_grad()
                loss_fn(model(xb), yb).backward()
                optimizer.step()
            with torch.no_grad():
                flor.log("loss", float(loss_fn(model(x), y)))  # validation
    with torch.no_grad():
        flor.log("final", float(sum(p.norm() for p in model.parameters())))  # suffix
    """
)
NEW_STATEMENT = {
    "validation": '\n            flor.log("wnorm", float(sum(p.norm() for p in model.parameters())))',
    "suffix": '\n    flor.log("final2", float(loss_fn(model(x), y)))',
}
NAME = {"validation": "wnorm", "suffix": "final2"}


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def _spin() -> None:  # a busy process: the "loaded machine" of --load
    while True:
        pass


def _project(base: Path, kind: str, runs: int, epochs: int, env: dict[str, str]) -> Path:
    """A new project with ``runs`` recorded runs, then today's statement committed."""
    root = make_git_repo(base / "proj", {
        "pyproject.toml": "[tool.flordb_build]\ncheckpoint_every = 1\n",
        "train.py": TRAIN,
    })

    def one(seed: int) -> None:
        proc = subprocess.run(
            [sys.executable, "train.py", "--kwargs", f"seed={seed}", f"epochs={epochs}"], cwd=root, env=env,
            capture_output=True, text=True, check=False,
        )
        if proc.returncode != 0:
            raise BenchError(f"recording seed={seed} failed:\n{proc.stderr[-2000:]}")

    for seed in range(runs):  # one at a time: a run's timings are what the estimate starts from
        one(seed)
    today = TRAIN.replace(f"  # {kind}", NEW_STATEMENT[kind])
    (root / "train.py").write_text(today, encoding="utf-8")
    subprocess.run(["git", "-C", str(root), "commit", "-q", "-am", "today"], check=True, env=env)
    return root


def _case(base: Path, kind: str, runs: int, epochs: int, replays: int, workers: int) -> list[tuple[float, float]]:
    """(estimate, wall) of each replay of a fresh project, in order."""
    runtime = base / "runtime"
    runtime.mkdir(mode=0o700, parents=True)
    env = bench_env({"OMP_NUM_THREADS": "1", "XDG_RUNTIME_DIR": str(runtime)})
    root = _project(base, kind, runs, epochs, env)
    saved = {k: os.environ.get(k) for k in ("XDG_RUNTIME_DIR", "OMP_NUM_THREADS", "FLORDB_BUILD_REPLAY_KEEP_WARM")}
    cwd = Path.cwd()
    os.environ.update({"XDG_RUNTIME_DIR": str(runtime), "OMP_NUM_THREADS": "1", "FLORDB_BUILD_REPLAY_KEEP_WARM": "600"})
    os.environ.update({k: v for k, v in env.items() if k.startswith("GIT_")})
    os.chdir(root)
    from flordb_build.config import load_config
    from flordb_build.hindsight import prepare_replay, run_replay
    from flordb_build.hindsight._warm import project_servers

    config = load_config(root)
    figures: list[tuple[float, float]] = []
    try:
        for _ in range(replays):
            plan = prepare_replay([NAME[kind]], workers=workers, config=config)
            if len(plan.runs) != runs:
                raise BenchError(f"expected {runs} runs to replay, got {len(plan.runs)}: {plan.skipped}")
            started = time.perf_counter()
            report = run_replay(plan, config=config)
            wall = time.perf_counter() - started
            if not report.ok:
                raise BenchError(f"the {kind} replay failed: {[o.errors or o.withheld for o in report.outcomes]}")
            figures.append((plan.estimate, wall))
            print(f"bench: {kind} x{runs} replay {len(figures)}: estimated {plan.estimate:.2f}s, took {wall:.2f}s "
                  f"({'warm' if all(o.warm for o in report.outcomes) else 'some cold'})", flush=True)
    finally:
        for server in project_servers(config):
            server.stop()
        os.chdir(cwd)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="recorded runs of the small case (default 3)")
    parser.add_argument("--more", type=int, default=8, help="recorded runs of the larger case (default 8; 0: none)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--replays", type=int, default=3, help="replays in a row per fresh project (default 3)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="fresh projects per case (default 1)")
    parser.add_argument("--load", type=int, default=0, help="busy processes spinning meanwhile (default 0)")
    parser.add_argument("--keep", action="store_true", help="leave the temporary projects in place")
    args = parser.parse_args()

    print(f"bench: load average before: {_load()}", flush=True)
    spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(args.load)]
    for spinner in spinners:
        spinner.start()
    work = Path(tempfile.mkdtemp(prefix="flor-bench-estimate-"))
    rows = []
    errors: dict[str, list[float]] = {"first": [], "later": []}
    try:
        cases = [(kind, runs) for runs in (args.runs, args.more) if runs > 0 for kind in ("validation", "suffix")]
        for kind, runs in cases:
            for repeat in range(args.repeats):
                figures = _case(work / f"{kind}-{runs}-{repeat}", kind, runs, args.epochs, args.replays, args.workers)
                for i, (estimate, wall) in enumerate(figures):
                    error = (estimate - wall) / wall
                    errors["first" if i == 0 else "later"].append(abs(error))
                    rows.append([f"{kind} x{runs}", str(i + 1), f"{estimate:.2f}s", f"{wall:.2f}s", f"{error:+.0%}",
                                 "PASS" if abs(error) <= TARGET else "MISS"])
    finally:
        for spinner in spinners:
            spinner.kill()
        if args.keep:
            print(f"bench: kept '{work}'")
        else:
            remove_tree(work)
    print(f"bench: load average after: {_load()} (--load {args.load}, --workers {args.workers}, {os.cpu_count()} cores)")
    print()
    print_table(["case", "replay", "estimate", "wall", "error", f"<= {TARGET:.0%}"], rows)
    print()
    for which, values in errors.items():
        if values:
            print(f"{which} replays: median |error| {median(values):.0%}, worst {max(values):.0%} "
                  f"({sum(v <= TARGET for v in values)}/{len(values)} within {TARGET:.0%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
