"""``flordb-build``: thin commands over the library. The only place errors become exit codes.

Exit codes: 0 success, 1 a flordb_build error (one readable line on stderr), 2 a usage error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from .errors import FlorBuildError

if TYPE_CHECKING:
    import pandas as pd

PROG = "flordb-build"
FORMATS = ("table", "csv", "json")


def _print_frame(frame: pd.DataFrame, fmt: str, empty_note: str) -> None:
    if fmt == "csv":
        sys.stdout.write(frame.to_csv(index=False))
    elif fmt == "json":
        sys.stdout.write(frame.to_json(orient="records", date_format="iso", date_unit="us") + "\n")
    elif frame.empty:
        print(empty_note)
    else:
        import pandas as pd

        with pd.option_context("display.max_rows", None, "display.max_columns", None, "display.width", 200):
            print(frame.to_string(index=False))


def cmd_runs(args: argparse.Namespace) -> int:
    from .query import query

    frame = query(
        "SELECT run_id, tstamp, task, filename, status, exit_code, round(seconds, 3) AS seconds, "
        "substr(snapshot, 1, 12) AS snapshot FROM runs ORDER BY tstamp DESC LIMIT ?",
        (args.limit,),
    )
    _print_frame(frame, args.format, "(no runs recorded yet)")
    return 0


def cmd_dataframe(args: argparse.Namespace) -> int:
    from .query import dataframe, latest

    frame = dataframe(*args.names, where=args.where)
    if args.latest:
        frame = latest(frame)
    _print_frame(frame, args.format, "(no rows)")
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from .query import query

    _print_frame(query(args.sql, args.param), args.format, "(no rows)")
    return 0


def cmd_rebuild(args: argparse.Namespace) -> int:
    from .config import load_config
    from .rebuild import rebuild_store

    result = rebuild_store(load_config())
    print(f"rebuilt '{result.db_path}': {result.runs} runs, {result.loops} loop contexts, {result.logs} logs")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Query what your ML pipeline recorded: runs, logged values as dataframes, raw SQL, and "
            "rebuilding the store from the snapshot commits on the 'flor.shadow' branch. Scripts record "
            "with 'import flordb_build as flor'; the store is <repo>/.flor/flor.db."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, handler: Callable[[argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        return p

    p = add("runs", cmd_runs, "List recorded runs, newest first: id, time, task, script, status, snapshot commit.")
    p.add_argument("--limit", type=int, default=50, help="show at most this many runs (default 50)")
    p.add_argument("--format", choices=FORMATS, default="table", help="output format (default table)")

    p = add(
        "dataframe",
        cmd_dataframe,
        "Print flor.dataframe(NAME...): one row per loop context where the names were logged, with "
        "projid, run_id, tstamp, task, filename and loop columns first.",
    )
    p.add_argument("names", nargs="*", metavar="NAME", help="logged names; none: one row per run with its run-level values")
    p.add_argument("--where", metavar="EXPR", help="SQL expression over the frame's columns, e.g. \"epoch >= 1\"")
    p.add_argument("--latest", action="store_true", help="keep only the newest run per (task, filename)")
    p.add_argument("--format", choices=FORMATS, default="table", help="output format (default table)")

    p = add(
        "query",
        cmd_query,
        "Run one read-only SQL statement over the store (tables: runs, loops, logs, pipelines, tasks, "
        "files, envs, checkpoints, timings). Writes are refused.",
    )
    p.add_argument("sql", help="a SELECT statement; use ? placeholders with --param")
    p.add_argument("--param", action="append", default=[], metavar="VALUE", help="bind a value to the next ?")
    p.add_argument("--format", choices=FORMATS, default="table", help="output format (default table)")

    add(
        "rebuild",
        cmd_rebuild,
        "Recreate .flor/flor.db from the run journals in the snapshot commits on 'flor.shadow' "
        "(after the database was deleted or damaged).",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``flordb-build`` and ``python -m flordb_build``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except FlorBuildError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
