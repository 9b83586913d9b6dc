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

    from .config import Config
    from .runlist import RunList

PROG = "flordb-build"
#: How often ``push --watch`` looks whether the local store changed.
WATCH_INTERVAL_S = 1.0
FORMATS = ("table", "csv", "json")


def _print_frame(frame: pd.DataFrame, fmt: str, empty_note: str) -> None:
    # csv and json are for machines: every value whole. The table is for people (table.py):
    # one spelling of a missing value, integers as integers, wide JSON cut.
    frame = blobs_as_hex(frame)
    if fmt == "csv":
        sys.stdout.write(frame.to_csv(index=False))
    elif fmt == "json":
        sys.stdout.write(frame.to_json(orient="records", date_format="iso", date_unit="us") + "\n")
    elif frame.empty:
        print(empty_note)
    else:
        from .table import format_table

        print(format_table(frame))


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
    from .config import load_config
    from .reader import open_read_only
    from .runlist import read_run_table, select_runs

    if args.team:
        from .team import open_team_reader

        with open_team_reader(load_config(), args.remote) as team:
            table = select_runs(read_run_table(team, args.where), task=args.task, status=args.status, limit=args.limit)
        _print_runs(table, args)
        return 0
    store = open_read_only(load_config())
    if store is None:
        _print_frame(_no_runs(), args.format, "(no runs recorded yet)")
        return 0
    try:
        table = select_runs(read_run_table(store, args.where), task=args.task, status=args.status, limit=args.limit)
    finally:
        store.close()
    _print_runs(table, args)
    return 0


def _print_runs(table: RunList, args: argparse.Namespace) -> None:
    frame = table.frame.copy()
    frame.insert(6, "exit_code", table.extra["exit_code"])
    frame.insert(7, "snapshot", table.extra["snapshot"].map(lambda s: s[:12] if isinstance(s, str) else s))
    if table.extra["divergent"].notna().any():  # only where some replay was written with --accept-divergent
        frame["replay_divergent"] = table.extra["divergent"]
    _print_frame(frame, args.format, "(no runs match)" if (args.where or args.task or args.status) else "(no runs recorded yet)")


def _no_runs() -> pd.DataFrame:
    import pandas as pd

    from .runlist import FIXED_COLUMNS

    return pd.DataFrame({c: pd.Series(dtype=object) for c in FIXED_COLUMNS})


def cmd_dataframe(args: argparse.Namespace) -> int:
    from .errors import QueryError
    from .query import dataframe, latest

    frame = dataframe(
        *args.names, where=args.where, timeout=args.timeout or None, store=_store_of(args), remote=args.remote
    )
    if args.latest:
        frame = latest(frame)
    if args.columns:
        wanted = [c.strip() for c in args.columns.split(",") if c.strip()]
        unknown = [c for c in wanted if c not in frame.columns]
        if unknown:
            raise QueryError(
                f"No column '{unknown[0]}' in this dataframe; its columns: {', '.join(map(str, frame.columns))}."
            )
        frame = frame[wanted]
    if args.limit is not None:
        frame = frame.head(args.limit)
    _print_frame(frame, args.format, "(no rows)")
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from .query import query

    frame = query(args.sql, args.param, timeout=args.timeout or None, store=_store_of(args), remote=args.remote)
    _print_frame(frame, args.format, "(no rows)")
    return 0


def _store_of(args: argparse.Namespace) -> str:
    return "team" if args.team else "local"


def cmd_push(args: argparse.Namespace) -> int:
    from .config import load_config
    from .reader import store_version
    from .team import push_store

    def progress(event: str, kind: str, unit_id: str, values: int) -> None:
        # One line per step, flushed: a watcher (or a test) sees each as it happens.
        print(f"{event} {kind} {unit_id}" + (f" ({values} values)" if kind != "pipeline" else ""), flush=True)

    config = load_config()
    while True:
        # The version before the push: a run that ends while this push copies is pushed by the next.
        seen = store_version(config)
        result = push_store(config, args.remote, progress=progress)
        print(
            f"pushed to '{result.remote}': {len(result.runs)} runs, {len(result.replays)} replays, "
            f"{len(result.pipelines)} pipelines, {result.values} values; {result.already} already there"
            + (f"; {len(result.unfinished)} still running, left for a later push" if result.unfinished else ""),
            flush=True,
        )
        if not args.watch:
            return 0
        _wait_for_store_change(config, seen)


def _wait_for_store_change(config: Config, seen: tuple[int, ...]) -> None:
    """Return once a writer has committed to the local store since it was at version ``seen``."""
    import time

    from .reader import store_version

    while store_version(config) == seen:
        time.sleep(WATCH_INTERVAL_S)


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


def cmd_migrate(args: argparse.Namespace) -> int:
    from .config import load_config
    from .store import SCHEMA_VERSION, Store

    config = load_config()
    if not config.db_path.exists():
        print(f"no store at '{config.db_path}' yet: nothing to migrate")
        return 0
    store = Store.open(config)  # the writing open: migrates and marks dead runs
    store.close()
    print(f"'{config.db_path}' is at schema version {SCHEMA_VERSION}; runs whose process died are marked killed")
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


def cmd_push_objects(args: argparse.Namespace) -> int:
    from .config import load_config
    from .objects import ObjectStore

    config = load_config()
    if config.objects is None:
        print("no remote object store: set objects = \"s3://bucket/prefix\" in [tool.flordb_build]", file=sys.stderr)
        return 1
    uploaded = ObjectStore.for_config(config).push_objects()
    print(f"uploaded {uploaded} objects to {config.objects}")
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

    from .graph import lineage_graph, to_dot, to_mermaid
    from .lineage import lineage_to_json, render_lineage, trace_lineage

    node = trace_lineage(args.path, max_depth=args.depth)
    if args.format == "json":
        print(json.dumps(lineage_to_json(node), indent=2))
    elif args.format == "mermaid":
        print(to_mermaid(lineage_graph(node)))
    elif args.format == "dot":
        print(to_dot(lineage_graph(node), "lineage"))
    else:
        print(render_lineage(node))
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from .rundiff import diff_rows, diff_runs, render_diff

    diff = diff_runs(args.run_a, args.run_b)
    if args.format == "table":
        print(render_diff(diff))
    else:
        import pandas as pd

        _print_frame(pd.DataFrame(diff_rows(diff)), args.format, "")
    return 0


def cmd_dag(args: argparse.Namespace) -> int:
    from .dag._report import pipeline_view
    from .graph import to_dot, to_mermaid, to_text

    view = pipeline_view(args.pipeline)
    if args.format == "mermaid":
        print(to_mermaid(view.graph))
    elif args.format == "dot":
        print(to_dot(view.graph))
    else:
        print(f"pipeline {view.pipeline_id} ({view.tool or '?'}, {view.status or '?'}): {' '.join(view.argv)}")
        print(to_text(view.graph))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .charts import GroupBy
    from .plot import plot_to_file

    result = plot_to_file(args.names, Path(args.output), where=args.where, x_dim=args.x, by=GroupBy(args.by))
    print(f"wrote {result.path}: {', '.join(result.names)} over {result.runs} runs ({result.points} points)")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from .ui import serve

    serve(
        port=args.port, open_browser=args.open, announce=lambda line: print(line, flush=True),
        team=args.team, remote=args.remote,
    )
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
    p.add_argument("--format", choices=("text", "json", "mermaid", "dot"), default="text",
                   help="output format: text (default), json, or a graph as mermaid or graphviz dot")

    p = add(
        "diff",
        cmd_diff,
        "Compare two runs: args, run-level values (metrics), the last and best value of each name logged in "
        "loops, changed packages and environment, and the code diff of their snapshots; '*' marks what changed.",
    )
    p.add_argument("run_a", metavar="RUN_A", help="a run id or unique prefix (see 'flordb-build runs')")
    p.add_argument("run_b", metavar="RUN_B", help="another run id or prefix")
    add_format_option(p)

    p = add("dag", cmd_dag, "Draw a recorded pipeline's task graph with each task's status, seconds and why it ran.")
    p.add_argument("--pipeline", metavar="ID", help="a pipeline id or unique prefix (default: the latest)")
    p.add_argument("--format", choices=("text", "mermaid", "dot"), default="text",
                   help="text (default), mermaid (a flowchart for GitHub or mkdocs) or graphviz dot")


# -- hindsight logging (replay/) ---------------------------------------------------------------


def cmd_replay(args: argparse.Namespace) -> int:
    from .hindsight import _command
    from .replay_options import options_from

    return _command.run_replay_command(args.names, options_from(vars(args)), confirm=_command.confirm_on_stdin())


def cmd_warm(args: argparse.Namespace) -> int:
    from .hindsight import warm_command

    return warm_command(args.action)


def _add_replay_command(add: Callable[[str, Callable[[argparse.Namespace], int], str], argparse.ArgumentParser]) -> None:
    from .replay_options import add_replay_arguments

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
    add_replay_arguments(p)
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


def _add_view_commands(add: Callable[[str, Callable[[argparse.Namespace], int], str], argparse.ArgumentParser]) -> None:
    p = add(
        "plot",
        cmd_plot,
        "Chart logged names without a server: one line per run over its loops (loss per step, val_acc per "
        "epoch), replayed values dashed, into a self-contained HTML page (works offline) or a PNG.",
    )
    p.add_argument("names", nargs="+", metavar="NAME", help="logged names, one chart each")
    p.add_argument("--where", metavar="EXPR", help="SQL expression over flor.dataframe(NAME...)'s columns, e.g. \"task = 'train'\"")
    p.add_argument("--x", metavar="DIM", help="the loop to put on the x axis (default: the only loop, else all points in order)")
    p.add_argument("--by", choices=("run", "task"), default="run", help="one colour per run (default) or per task")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="FILE.html or FILE.png")

    p = add(
        "ui",
        cmd_ui,
        "Serve a local, read-only web app over this project's store on 127.0.0.1: runs, a run's charts and "
        "code, comparisons, pipeline DAGs and file lineage. Needs flordb_build[ui].",
    )
    p.add_argument("--port", type=int, default=8765, metavar="N", help="the port (default 8765; 0 picks a free one)")
    p.add_argument("--open", action="store_true", help="open the app in the default web browser")
    add_team_options(p, "; every page the same as over the local store, read-only")


def add_team_options(parser: argparse.ArgumentParser, note: str = "") -> None:
    parser.add_argument(
        "--team", action="store_true",
        help="read the team store (what every clone pushed with 'flordb-build push') instead of this clone's" + note,
    )
    parser.add_argument("--remote", metavar="NAME", help="with --team: which remote (default: the only one configured)")


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
    from . import __version__

    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, handler: Callable[[argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        return p

    p = add(
        "runs",
        cmd_runs,
        "List recorded runs, newest first: id, time, task, script, status, seconds, exit code, snapshot "
        "commit, then each arg and each final run-level value.",
    )
    p.add_argument("--limit", type=int, default=50, help="show at most this many runs (default 50)")
    p.add_argument("--where", metavar="EXPR", help="SQL expression over flor.dataframe()'s columns, e.g. \"lr < 0.01\"")
    p.add_argument("--task", metavar="T", help="only runs of this task")
    p.add_argument("--status", metavar="S", help="only runs with this status (ok, failed, killed, running)")
    add_team_options(p)
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
    p.add_argument("--limit", type=int, metavar="N", help="print at most N rows")
    p.add_argument("--columns", metavar="A,B,...", help="print only these columns, in this order")
    add_team_options(p)
    add_format_option(p)

    p = add(
        "query",
        cmd_query,
        "Run one read-only SQL statement over the store (tables: runs, loops, logs, pipelines, tasks, "
        "files, envs, checkpoints, timings). Writes and functions other than SQLite's ordinary ones are "
        "refused; Ctrl-C stops it.",
    )
    p.add_argument("sql", help="a SELECT statement; use ? placeholders with --param")
    p.add_argument(
        "--param", action="append", default=[], metavar="VALUE", help="bind a value to the next ? (%%s with --team)"
    )
    add_timeout_option(p, "the query")
    add_team_options(p, "; SQL in PostgreSQL's dialect, over the same tables, values in typed columns")
    add_format_option(p)

    p = add(
        "push",
        cmd_push,
        "Copy finished runs (their recorded and replayed values, loops, checkpoints, timings, environment) "
        "and finished pipelines (tasks, files) into the team store, a PostgreSQL database named in "
        "[tool.flordb_build.remotes.NAME] url = \"postgresql://host:port/db\". Idempotent: a unit the team "
        "store holds is never copied twice, a killed push leaves nothing half-copied. Runs still running "
        "wait for a later push. The password comes from PGPASSWORD, ~/.pgpass or a service file, never the project.",
    )
    p.add_argument("--remote", metavar="NAME", help="the remote to push to (default: the only one configured)")
    p.add_argument("--watch", action="store_true", help="keep going: push again whenever the local store changes (Ctrl-C stops)")

    p = add(
        "rebuild",
        cmd_rebuild,
        "Recreate .flor/flor.db from the run, pipeline and replay journals in the snapshot commits on "
        "'flor.shadow' and in .flor (after the database was deleted or damaged). Refuses while runs or "
        "other processes have the store open.",
    )
    p.add_argument("--wait", action="store_true", help="wait until every process has closed the store, then rebuild")
    add(
        "migrate",
        cmd_migrate,
        "Bring the store's schema up to this flordb_build's version and mark runs whose process died "
        "'killed' (what every recording run does when it opens the store; reading commands never write).",
    )
    p = add(
        "gc",
        cmd_gc,
        "Apply the checkpoint budgets of [tool.flordb_build] (checkpoint_budget_per_run, "
        "checkpoint_budget_per_project), keeping each run's final and evenly spaced checkpoints, and "
        "delete objects in .flor/objects that nothing references. Prints what it frees.",
    )
    p.add_argument("--dry-run", action="store_true", help="report what would be evicted and freed; change nothing")
    add(
        "push-objects",
        cmd_push_objects,
        "Upload every object of .flor/objects that the remote object store (objects in "
        "[tool.flordb_build]) lacks: what a run killed before its uploads finished left local.",
    )
    _add_build_commands(add)
    _add_replay_command(add)
    _add_view_commands(add)
    return parser


def _command_line() -> list[str]:
    """The process's arguments, with the ``--kwargs`` tokens that ``import flordb_build`` took out."""
    from .cmdline import ARGV_AFTER_KWARGS, ARGV_BEFORE_KWARGS

    if sys.argv[1:] == ARGV_AFTER_KWARGS[1:]:
        return ARGV_BEFORE_KWARGS[1:]
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
