"""Replay correctness on the corpus of real training scripts (issue 12): the table of outcomes.

Runs ``tests/replay_harness.py`` over ``tests/replay_corpus``: six training scripts ported from
public code, three recorded versions each, 39 hindsight statements placed by hand. Every case (a
statement in one version, with one worker, and with two for validation and range) compares the
replayed values with a fresh run of that version with the statement in it, and ends as one of

    equal    every value equals the fresh run's
    wrong    values written that differ from the fresh run's
    flagged  values written, and the replay called the (deterministic) script nondeterministic
    refused  not placed or not replayed, with a reason, before anything ran
    failed   the run's replay failed (partial: it left values in the store)

Issue 12's target: every case equal or refused. Printed per script and depth, with the totals and
the list of the cases that miss it. Run from the repository root with the project's interpreter::

    .venv/bin/python bench/bench_replay_corpus.py              # the whole corpus, 2 scripts at a time
    .venv/bin/python bench/bench_replay_corpus.py --scripts mnist,vae --lanes 1

It is a report, not a gate: it exits 0 whatever the figures (tests/test_replay_corpus.py is the
gate, with today's failing cases marked xfail).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from _common import REPO_ROOT, remove_tree

sys.path.insert(0, str(REPO_ROOT))

from tests.replay_harness import format_summary, load_corpus, run_corpus  # noqa: E402


def main() -> int:
    """Run the corpus and print its table."""
    keys = [s.key for s in load_corpus()]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scripts", default=",".join(keys), help=f"comma-separated corpus scripts (default: all: {','.join(keys)})")
    parser.add_argument("--lanes", type=int, default=2, help="scripts run at a time (default 2)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary projects and print where they are")
    args = parser.parse_args()
    wanted = [k for k in args.scripts.split(",") if k]
    unknown = sorted(set(wanted) - set(keys))
    if unknown:
        parser.error(f"unknown corpus script(s) {', '.join(unknown)}; choose from {', '.join(keys)}")
    base = Path(tempfile.mkdtemp(prefix="flordb-replay-corpus-"))
    try:
        result = run_corpus(base / "corpus", lanes=args.lanes, keys=wanted)
        print(format_summary(result))
        print()
        for script in result.scripts:
            phases = ", ".join(f"{phase} {seconds:.0f}s" for phase, seconds in script.seconds.items())
            print(f"{script.script.key}: {phases} (log: {script.log if args.keep else 'removed'})")
    finally:
        if args.keep:
            print(f"projects kept under {base}")
        else:
            remove_tree(base)
    return 0


if __name__ == "__main__":
    sys.exit(main())
