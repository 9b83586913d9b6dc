"""``flordb-build``: thin commands over the library. The only place errors become exit codes.

Exit codes: 0 success, 1 a flordb_build error (one readable line on stderr), 2 a usage error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from .errors import FlorBuildError
from .sqlguard import DEFAULT_TIMEOUT_S

if TYPE_CHECKING:
    import pandas as pd

PROG = "flordb-build"
FORMATS = ("table", "csv", "json")


def _print_frame(frame: pd.DataFrame, fmt: str, empty_note: str) -> None:
    frame = blobs_as_hex(frame)
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


def blobs_as_hex(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with BLOB cells (bytes) as upper-case hex text, as SQL's ``hex()`` writes them.

    A BLOB need not be UTF-8, so no output format can print it as it is.
    """
    blob_columns = [
        name for name in frame.columns
        if frame[name].dtype == object and frame[name].map(lambda v: isinstance(v, bytes | bytearray)).any()
    ]
    if not blob_columns:
        return frame
    frame = frame.copy()
    for name in blob_columns:
        frame[name] = frame[name].map(lambda v: v.hex().upper() if isinstance(v, bytes | bytearray) else v)
    return frame


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

    frame = dataframe(*args.names, where=args.where, timeout=args.timeout or None)
    if args.latest:
        frame = latest(frame)
    _print_frame(frame, args.format, "(no rows)")
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from .query import query

    _print_frame(query(args.sql, args.param, timeout=args.timeout or None), args.format, "(no rows)")
    return 0


def cmd_rebuild(args: argparse.Namespace) -> int:
    from .config import load_config
    from .rebuild import rebuild_store

    result = rebuild_store(load_config(), wait=args.wait)
    for note in result.notes:
        print(f"note: {note}")
    print(
        f"rebuilt '{result.db_path}': {result.runs} runs ({result.killed} killed), {result.loops} loop contexts, "
        f"{result.logs} logs, {result.pipelines} pipelines, {result.tasks} tasks"
    )
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from .config import load_config
    from .retention import collect_garbage, format_bytes

    result = collect_garbage(load_config(), dry_run=args.dry_run)
    verb = "would free" if result.dry_run else "freed"
    for checkpoint in result.evicted:
        action = "would evict" if result.dry_run else "evicted"
        print(f"{action} checkpoint of run {checkpoint.run_id} at {checkpoint.loop_name} {checkpoint.iteration}")
    for note in result.notes:
        print(f"note: {note}")
    print(
        f"{verb} {format_bytes(result.freed_bytes)} in {result.deleted_objects} objects "
        f"({len(result.evicted)} checkpoints evicted)"
    )
    return 0


# -- build context (dag/, lineage.py, rundiff.py) ---------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .dag import init_project

    for step in init_project(Path.cwd(), args.doit_config, args.make, args.makefile):
        print(f"{step.action}: {step.path}")
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    from .dag import run_recipe

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    return run_recipe(args.task, command, args.deps, args.targets, args.changed).exit_code


def cmd_pipelines(args: argparse.Namespace) -> int:
    from .dag._report import list_pipelines

    _print_frame(list_pipelines(args.limit), args.format, "(no pipelines recorded yet)")
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from .dag._report import list_tasks

    _print_frame(list_tasks(args.pipeline), args.format, "(no tasks in this pipeline)")
    return 0


def cmd_lineage(args: argparse.Namespace) -> int:
    import json

    from .lineage import lineage_to_json, render_lineage, trace_lineage

    node = trace_lineage(args.path, max_depth=args.depth)
    print(json.dumps(lineage_to_json(node), indent=2) if args.format == "json" else render_lineage(node))
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from .rundiff import diff_runs, render_diff

    print(render_diff(diff_runs(args.run_a, args.run_b)))
    return 0


def _add_build_commands(add: Callable[[str, Callable[[argparse.Namespace], int], str], argparse.ArgumentParser]) -> None:
    p = add(
        "init",
        cmd_init,
        "Set up this directory so plain 'doit' records build context (a COMMAND plugin entry in "
        "pyproject.toml or doit.cfg); with --make, copy the recording Makefile template instead.",
    )
    p.add_argument(
        "--doit-config",
        choices=("auto", "pyproject.toml", "doit.cfg"),
        help="where to put the doit entry (default: pyproject.toml if it exists, else doit.cfg)",
    )
    p.add_argument("--make", action="store_true", help="copy flordb_build's Makefile template (alone, unless --doit-config is given too)")
    p.add_argument("--makefile", default="Makefile", help="file name for the copied template (default Makefile)")

    p = add(
        "exec",
        cmd_exec,
        "Run one Make recipe's command as a recorded task and exit with its status; all recipes of one "
        "'make' form one pipeline. Use: flordb-build exec --task $@ --deps $^ --targets $@ -- CMD ARG...",
    )
    p.add_argument("--task", required=True, help="the task name (in Make: $@ or the rule's TASK)")
    p.add_argument("--deps", nargs="*", default=[], metavar="FILE", help="the recipe's inputs (in Make: $^)")
    p.add_argument("--targets", nargs="*", default=[], metavar="FILE", help="the files it makes (in Make: $@)")
    p.add_argument("--changed", nargs="*", default=[], metavar="FILE", help="prerequisites newer than the target ($?)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command and its arguments (no shell)")

    p = add("pipelines", cmd_pipelines, "List recorded doit/make invocations, newest first, with task counts.")
    p.add_argument("--limit", type=int, default=50, help="show at most this many (default 50)")
    add_format_option(p)

    p = add("tasks", cmd_tasks, "List the tasks of a pipeline (default: the latest): status, seconds, why it ran.")
    p.add_argument("--pipeline", metavar="ID", help="a pipeline id or unique prefix (see 'flordb-build pipelines')")
    add_format_option(p)

    p = add(
        "lineage",
        cmd_lineage,
        "Which task and run produced this exact file content (by sha256), from which inputs, recursively, "
        "and which later tasks consumed it.",
    )
    p.add_argument("path", help="a file a recorded pipeline read or wrote")
    p.add_argument("--depth", type=int, default=50, help="how many tasks to follow in each direction (default 50)")
    p.add_argument("--format", choices=("text", "json"), default="text", help="output format (default text)")

    p = add("diff", cmd_diff, "Compare two runs: args, changed packages and environment, and the code diff of their snapshots.")
    p.add_argument("run_a", metavar="RUN_A", help="a run id or unique prefix (see 'flordb-build runs')")
    p.add_argument("run_b", metavar="RUN_B", help="another run id or prefix")


# -- hindsight logging (replay/) ---------------------------------------------------------------


def confirm_on_stdin() -> Callable[[str], bool | None]:
    """A yes/no question read from stdin, terminal or pipe; None when stdin ends before an answer."""

    # A pipe answers too: FlorDB asks with input(), so `echo y | python -m flordb replay x` runs.
    def ask(question: str) -> bool | None:
        if sys.stdin is None:  # the process was started with stdin closed
            return None
        try:
            answer = input(question)
        except (EOFError, OSError):
            print()  # end the question's line before the error message
            return None
        return answer.strip().lower() in ("y", "yes")

    return ask


def cmd_replay(args: argparse.Namespace) -> int:
    from .hindsight import run_replay_command

    return run_replay_command(
        args.names, where=args.where, task=args.task, workers=args.workers, device=args.device,
        dry_run=args.dry_run, yes=args.yes, confirm=confirm_on_stdin(), rel_tol=args.rel_tol,
        warm=False if args.cold else None,
    )


def cmd_warm(args: argparse.Namespace) -> int:
    from .hindsight import warm_command

    return warm_command(args.action)


def _add_replay_command(add: Callable[[str, Callable[[argparse.Namespace], int], str], argparse.ArgumentParser]) -> None:
    p = add(
        "replay",
        cmd_replay,
        "Hindsight logging: put today's new flor.log statements NAME... into the recorded versions of the "
        "selected runs and replay them from checkpoints; the values land in those runs' rows. Shows the plan "
        "(scan depth and estimated seconds per run) and asks before running.",
    )
    p.add_argument("names", nargs="+", metavar="NAME",
                   help="names that today's scripts log and old versions lack, also comma-separated (a,b); a last "
                        "argument with a comparison or a space is a where clause, as in FlorDB: replay NAME \"epochs = 2\"")
    p.add_argument("--where", metavar="EXPR", help="SQL expression over the run-level dataframe, e.g. \"tstamp >= '2026-06-23'\"")
    p.add_argument("--task", metavar="T", help="only runs of this task")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="split range and validation scans into N segments replayed in parallel processes (default 1)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to replay: cuda restores checkpoints onto the GPU (default auto: cuda if torch sees one)")
    p.add_argument("--dry-run", action="store_true", help="show the plan and stop")
    p.add_argument("--yes", action="store_true", help="run the plan without asking")
    p.add_argument("--rel-tol", type=float, default=1e-6, metavar="TOL",
                   help="relative tolerance when comparing recorded and replayed floats (default 1e-6)")
    p.add_argument("--cold", action="store_true",
                   help="start every replay in a fresh interpreter instead of forking it from a warm server that "
                        "has the script's libraries imported (see 'flordb-build warm --help')")
    p = add(
        "warm",
        cmd_warm,
        "Warm replay servers: a replay forks its processes from a server that has imported the script's "
        "libraries (torch alone takes seconds), and the server stays up for replay_keep_warm seconds of idle "
        "time (default 600; [tool.flordb_build], or $FLORDB_BUILD_REPLAY_KEEP_WARM) so the next replay starts "
        "warm too. replay_warm = false turns them off. 'status' lists this project's servers; 'stop' ends them.",
    )
    p.add_argument("action", choices=("status", "stop"), nargs="?", default="status",
                   help="status (default) or stop")


def add_format_option(parser: argparse.ArgumentParser) -> None:
    """``--format table|csv|json`` for a command that prints a frame."""
    parser.add_argument(
        "--format", choices=FORMATS, default="table", help="output format (default table; BLOBs print as hex)"
    )


def add_timeout_option(parser: argparse.ArgumentParser, what: str) -> None:
    """``--timeout SECONDS`` for a command that runs SQL the user wrote."""
    parser.add_argument(
        "--timeout", type=_seconds, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
        help=f"stop {what} after this many seconds (default {DEFAULT_TIMEOUT_S:g}; 0: no limit)",
    )


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of seconds") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of seconds >= 0")
    return value


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
    add_format_option(p)

    p = add(
        "dataframe",
        cmd_dataframe,
        "Print flor.dataframe(NAME...): one row per loop context where the names were logged, with "
        "projid, run_id, tstamp, task, filename and loop columns first.",
    )
    p.add_argument("names", nargs="*", metavar="NAME", help="logged names; none: one row per run with its run-level values")
    p.add_argument("--where", metavar="EXPR", help="SQL expression over the frame's columns, e.g. \"epoch >= 1\"")
    p.add_argument("--latest", action="store_true", help="keep only the newest run per (task, filename)")
    add_timeout_option(p, "the --where filter")
    add_format_option(p)

    p = add(
        "query",
        cmd_query,
        "Run one read-only SQL statement over the store (tables: runs, loops, logs, pipelines, tasks, "
        "files, envs, checkpoints, timings). Writes and functions other than SQLite's ordinary ones are "
        "refused; Ctrl-C stops it.",
    )
    p.add_argument("sql", help="a SELECT statement; use ? placeholders with --param")
    p.add_argument("--param", action="append", default=[], metavar="VALUE", help="bind a value to the next ?")
    add_timeout_option(p, "the query")
    add_format_option(p)

    p = add(
        "rebuild",
        cmd_rebuild,
        "Recreate .flor/flor.db from the run, pipeline and replay journals in the snapshot commits on "
        "'flor.shadow' and in .flor (after the database was deleted or damaged). Refuses while runs or "
        "other processes have the store open.",
    )
    p.add_argument("--wait", action="store_true", help="wait until every process has closed the store, then rebuild")
    p = add(
        "gc",
        cmd_gc,
        "Apply the checkpoint budgets of [tool.flordb_build] (checkpoint_budget_per_run, "
        "checkpoint_budget_per_project), keeping each run's final and evenly spaced checkpoints, and "
        "delete objects in .flor/objects that nothing references. Prints what it frees.",
    )
    p.add_argument("--dry-run", action="store_true", help="report what would be evicted and freed; change nothing")
    _add_build_commands(add)
    _add_replay_command(add)
    return parser


def _command_line() -> list[str]:
    """The process's arguments, with the ``--kwargs`` tokens that ``import flordb_build`` took out."""
    from . import runtime

    if sys.argv[1:] == runtime.ARGV_AFTER_KWARGS[1:]:
        return runtime.ARGV_BEFORE_KWARGS[1:]
    return sys.argv[1:]  # the caller replaced sys.argv since the import: take it as it is


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``flordb-build`` and ``python -m flordb_build``."""
    parser = build_parser()
    args = parser.parse_args(_command_line() if argv is None else argv)
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
