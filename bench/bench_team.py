"""The team store's speed: ``push`` of 1M logged values, and reads over a 10M-value team store.

Peers, measured in the same run on the same machine:

- push (SQLite rows -> PostgreSQL with COPY, one transaction) beside a SQLite batched write of the
  same rows (``executemany`` into a fresh file's ``logs`` table, one transaction);
- one run's ``flor.dataframe(..., store="team")`` and a ``GROUP BY run_id`` over the team store
  beside the same calls over a local store holding the same 10M values.

The PostgreSQL server is the tests' throwaway one (tests/pg_server.py) with its durable defaults
(fsync on). Figures are medians of repeats; the script exits 0 on a MISS: a report, not a gate.

    .venv/bin/python bench/bench_team.py                         # 1M values per run, 10 runs (minutes)
    .venv/bin/python bench/bench_team.py --values 100000 --repeats 2   # a quick look
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import bench_env, make_git_repo, median, print_table, remove_tree, run_timed, spread  # noqa: E402
from tests.pg_server import find_pg_bin, running_server  # noqa: E402

SCRIPT = """
import sys
import flordb_build as flor

EPOCHS = 20
for epoch in flor.loop("epoch", range(EPOCHS)):
    for step in flor.loop("step", range(int(sys.argv[1]) // EPOCHS)):
        flor.log("loss", step / 7)
"""


def timed(call: Callable[[], object], repeats: int) -> list[float]:
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return seconds


def sqlite_batched_write(rows: list[tuple[object, ...]], path: Path) -> None:
    """The peer: the same log rows into a fresh SQLite ``logs`` table, one transaction."""
    path.unlink(missing_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(
        "CREATE TABLE logs (run_id TEXT, seq INTEGER, ctx_id INTEGER, name TEXT, value BLOB, kind INTEGER, "
        "source TEXT, PRIMARY KEY (run_id, name, source, seq)) WITHOUT ROWID"
    )
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany("INSERT INTO logs VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    conn.execute("COMMIT")
    conn.close()


def copy_runs_locally(db: Path, base: str, copies: int) -> list[str]:
    """``copies`` more runs in the local store, each a copy of ``base`` under a new id and tstamp."""
    from flordb_build.store import TABLES, bump_tstamp

    conn = sqlite3.connect(db, isolation_level=None)
    columns = list(TABLES["runs"]["columns"])
    row = dict(
        zip(
            columns,
            conn.execute(f"SELECT {', '.join(columns)} FROM runs WHERE run_id = ?", (base,)).fetchone(),  # noqa: S608
            strict=True,
        )
    )  # noqa: S608
    tstamp = conn.execute("SELECT max(tstamp) FROM runs").fetchone()[0]
    ids = []
    conn.execute("BEGIN")
    for _ in range(copies):
        run_id, tstamp = uuid.uuid4().hex, bump_tstamp(tstamp)
        ids.append(run_id)
        values = [run_id if c == "run_id" else tstamp if c == "tstamp" else row[c] for c in columns]
        conn.execute(
            f"INSERT INTO runs ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",  # noqa: S608
            values,
        )
        for table in ("logs", "loops", "log_columns"):
            # the file's own columns: a peer's older schema has fewer (bench_read builds a store per tool)
            rest = [r[1] for r in conn.execute(f"PRAGMA table_info({table})") if r[1] != "run_id"]
            conn.execute(
                f"INSERT INTO {table} (run_id, {', '.join(rest)}) SELECT ?, {', '.join(rest)} FROM {table} WHERE run_id = ?",  # noqa: S608
                (run_id, base),
            )
    conn.execute("COMMIT")
    conn.close()
    return ids


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--values", type=int, default=1_000_000, help="logged values per run (default 1M)")
    parser.add_argument(
        "--runs", type=int, default=10, help="runs in the read benchmarks' stores (default 10)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="repeats per measure (default 3)")
    args = parser.parse_args()
    bin_dir = find_pg_bin()
    if bin_dir is None:
        print("no PostgreSQL server binaries (initdb): nothing measured")
        return 0
    import flordb_build as flor
    from flordb_build.config import config_of_root
    from flordb_build.team import push_store

    work = Path(tempfile.mkdtemp(prefix="flor-bench-team-"))
    try:
        with running_server(bin_dir, durable=True) as server:
            os.environ.update(server.env())
            project = make_git_repo(work / "project", {"record.py": SCRIPT})
            run_timed(
                [sys.executable, "record.py", str(args.values)], project, work / "record.log", bench_env()
            )
            config = config_of_root(project, True)
            db = config.db_path
            conn = sqlite3.connect(db)
            (base,) = conn.execute("SELECT run_id FROM runs").fetchone()
            rows = conn.execute("SELECT * FROM logs WHERE run_id = ?", (base,)).fetchall()
            conn.close()

            def configured(url: str) -> None:
                (project / "pyproject.toml").write_text(f'[tool.flordb_build.remotes.team]\nurl = "{url}"\n')

            push_seconds = []
            for repeat in range(args.repeats):
                configured(server.create_database(f"push_{repeat}"))
                config = config_of_root(project, True)
                start = time.perf_counter()
                result = push_store(config)
                push_seconds.append(time.perf_counter() - start)
                assert result.values == args.values, result
            peer_seconds = timed(lambda: sqlite_batched_write(rows, work / "peer.db"), args.repeats)

            # The read benchmarks: the same runs in both stores, pushed runs copied by SQL on each side.
            copies = copy_runs_locally(db, base, args.runs - 1)
            configured(server.create_database("reads"))
            config = config_of_root(project, True)
            push_store(config)
            total = args.values * args.runs
            server.psql("reads", "VACUUM ANALYZE")
            one_run = f"run_id = '{copies[len(copies) // 2]}'"
            frame_team = timed(
                lambda: flor.dataframe("loss", where=one_run, config=config, store="team"), args.repeats
            )
            frame_local = timed(lambda: flor.dataframe("loss", where=one_run, config=config), args.repeats)
            assert len(flor.dataframe("loss", where=one_run, config=config, store="team")) == args.values
            group_team_sql = (
                "SELECT run_id, count(*) AS n, avg(value_float) AS mean FROM logs GROUP BY run_id"
            )
            group_local_sql = "SELECT run_id, count(*) AS n, avg(value) AS mean FROM logs GROUP BY run_id"
            group_team = timed(lambda: flor.query(group_team_sql, config=config, store="team"), args.repeats)
            group_local = timed(lambda: flor.query(group_local_sql, config=config), args.repeats)
            grouped = flor.query(group_team_sql, config=config, store="team")
            assert int(grouped["n"].sum()) == total, grouped
    finally:
        remove_tree(work)

    def row(what: str, ours: list[float], peer: list[float], target: float | None) -> list[str]:
        verdict = "-" if target is None else ("PASS" if median(ours) <= target else "MISS")
        return [
            what,
            f"{median(ours):.3f}",
            spread(ours, digits=3),
            f"{median(peer):.3f}",
            f"{median(ours) / median(peer):.2f}",
            "-" if target is None else f"<= {target:g} s",
            verdict,
        ]

    full = args.values == 1_000_000 and args.runs == 10
    print(
        f"team store: {args.values:,} values per run, reads over {total:,} values in {args.runs} runs; "
        f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"
    )
    print_table(
        ["measure", "s (median)", "spread", "peer s", "ratio", "target", ""],
        [
            row(
                f"push {args.values:,} values (peer: SQLite batched write)",
                push_seconds,
                peer_seconds,
                6.0 if full else None,
            ),
            row("one run's dataframe, team (peer: local)", frame_team, frame_local, 0.5 if full else None),
            row(
                "GROUP BY run_id over all, team (peer: local)", group_team, group_local, 3.0 if full else None
            ),
        ],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
