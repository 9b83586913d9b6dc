"""The replay command shared by ``flordb-build replay``, ``doit replay`` and ``flor.replay``."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO

from ..config import Config
from ..errors import ReplayError
from ..expression import parse_where
from ..replay_options import ReplayOptions
from ._model import DEFAULT_REL_TOL, ReplayPlan, ReplayReport

#: Asks the user whether to run the plan: True or False, or None when no answer came (end of input).
Confirm = Callable[[str], bool | None]

#: Comparison characters: a where clause has one of them (or whitespace), a log name typed at a shell neither.
_WHERE_MARKS = frozenset("=<>!")


@dataclass(frozen=True)
class ReplayArguments:
    """What a replay asks for: the names to replay, and the where clause that selects the runs."""

    names: tuple[str, ...]
    where: str | None


def read_replay_arguments(arguments: Sequence[str], where: str | None) -> ReplayArguments:
    """Read ``replay`` arguments in our form (``a b --where EXPR``) and FlorDB's (``a,b "epochs = 2"``).

    Names may be comma-separated, as FlorDB's command line takes them. The last argument is
    FlorDB's positional where clause when at least one name comes before it and it contains a
    comparison (``=``, ``<``, ``>``, ``!``) or whitespace, which no name in a ``flor.log``
    statement typed at a shell has; it must then parse as a where expression.

    :raises ReplayError: no names, or a positional where clause beside ``--where``.
    :raises ExpressionError: a positional where clause that is not one SQL expression.
    """
    rest = list(arguments)
    if len(rest) >= 2 and _reads_as_where(rest[-1]):
        clause = rest.pop()
        if where is not None:
            raise ReplayError(f"Two where clauses, --where '{where}' and '{clause}'; pass only one of them.")
        where = parse_where(clause).text
    names = [piece.strip() for argument in rest for piece in argument.split(",") if piece.strip()]
    if not names:
        raise ReplayError(
            f"No name to replay in {' '.join(repr(a) for a in arguments) or 'the arguments'}; "
            "name what today's scripts log, e.g. 'replay val_loss' or 'replay val_loss,grad_norm'."
        )
    return ReplayArguments(names=tuple(dict.fromkeys(names)), where=where)


def _reads_as_where(argument: str) -> bool:
    text = argument.strip()
    return any(c in _WHERE_MARKS or c.isspace() for c in text)


def _read_call(names: Sequence[str | Sequence[str]], where: str | None) -> ReplayArguments:
    """``replay("a", "b", where=...)``, or FlorDB's ``replay(["a", "b"], where_clause=None)``."""
    if names and not isinstance(names[0], str):
        apply_vars, *rest = names
        clause = rest[0] if rest else None
        if len(rest) > 1 or not (clause is None or isinstance(clause, str)):
            raise ReplayError(
                f"replay() takes names, or FlorDB's (apply_vars, where_clause): got {len(names)} positional "
                "arguments; e.g. flor.replay(['loss'], \"epochs = 2\") or flor.replay('loss', where=\"epochs = 2\")."
            )
        if clause is not None and where is not None:
            raise ReplayError(f"Two where clauses, where='{where}' and '{clause}'; pass only one of them.")
        names, where = tuple(apply_vars), clause if clause is not None else where
    for name in names:
        if not isinstance(name, str) or not name:
            raise ReplayError(
                f"replay() takes names as non-empty strings, got {name!r}; e.g. flor.replay('loss') or "
                "flor.replay(['loss', 'acc'])."
            )
    return ReplayArguments(names=tuple(str(n) for n in names), where=where)


def replay(
    *names: str | Sequence[str],
    where: str | None = None,
    task: str | None = None,
    workers: int | None = None,
    device: str = "auto",
    dry_run: bool = False,
    rel_tol: float = DEFAULT_REL_TOL,
    quiet: bool = False,
    config: Config | None = None,
    warm: bool | None = None,
    accept_divergent: bool = False,
) -> ReplayReport:
    """Replay today's new ``flor.log`` statements ``names`` in the recorded runs ``where`` selects.

    Also FlorDB's form: ``replay(["a", "b"], "epochs = 2")`` (``apply_vars``, ``where_clause``).
    Prints the plan, a progress line per run and the estimated-vs-actual table to stderr (unless
    ``quiet``); with ``dry_run`` it stops after the plan (the report then has no outcomes).
    ``warm=False`` starts every replay process fresh instead of forking it from a warm server.
    A run whose replay logged other values than its record (beyond ``rel_tol``) is withheld unless
    ``accept_divergent`` (then its values are written, marked divergent). When the plan has no run
    to replay, the report's ``ok`` is False and ``nothing_replayed`` says why.

    :raises ReplayError: unknown names, no matching run, or a run that failed or was withheld.
    """
    from ._execute import ProgressLine, format_placements, format_plan, format_report, run_replay
    from ._select import prepare_replay

    call = _read_call(names, where)
    plan = prepare_replay(
        call.names, where=call.where, task=task, workers=workers, device=device, config=config, warm=warm
    )
    stream = None if quiet else sys.stderr
    if stream is not None:
        print(format_plan(plan), file=stream)
        if dry_run and plan.runs:
            print(format_placements(plan), file=stream)
    if dry_run:
        return ReplayReport(plan=plan, outcomes=())
    if not plan.runs:
        nothing = ReplayReport(plan=plan, outcomes=(), no_runs=plan.why_no_runs())
        if stream is not None:
            print(nothing.nothing_replayed, file=stream)
        return nothing
    report = run_replay(
        plan, config=config, progress=ProgressLine(stream) if stream else None, rel_tol=rel_tol, warm=warm,
        accept_divergent=accept_divergent,
    )
    if stream is not None:
        print(format_report(report), file=stream)
    if not report.ok:
        failed = [o.run_id for o in report.outcomes if not o.ok]
        what = (
            f"failed or was withheld for run(s) {', '.join(failed)}, whose replayed values were not written: "
            f"{report.first_error}"
        )
        # Not one run written: the message says so first, as the command line's last line does.
        raise ReplayError(f"nothing replayed: the replay {what}" if report.nothing_replayed else f"Replay {what}")
    return report


def confirm_on_stdin() -> Confirm:
    """A yes/no question read from stdin, terminal or pipe; None when stdin ends before an answer.

    For the command-line front ends (``flordb-build replay``, ``doit replay``) only.
    """

    # A pipe answers too: FlorDB asks with input(), so `echo y | python -m flor replay x` runs.
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


def run_replay_command(
    names: Sequence[str],
    options: ReplayOptions,
    *,
    confirm: Confirm | None,
    out: IO[str] | None = None,
) -> int:
    """Plan, show, confirm and run a replay for a command line; returns the exit code.

    Both front ends (``flordb-build replay`` and ``doit replay``) call this with the
    :class:`ReplayOptions` they parsed from the one option table (replay_options.py).

    :param names: the command's positional arguments, read by :func:`read_replay_arguments`.
    :param confirm: asks "run it?"; None when nobody can answer (then ``options.yes`` is required).
    """
    from ..config import load_config
    from ..replay_options import executor_of
    from ._execute import (
        ProgressLine,
        format_placements,
        format_plan,
        format_report,
        make_executor,
        run_replay,
    )
    from ._select import prepare_replay

    out = out if out is not None else sys.stdout
    if not options.rel_tol >= 0:
        raise ReplayError(f"--rel-tol must be a number >= 0, got '{options.rel_tol}'.")
    warm = False if options.cold else None
    config = load_config()
    kind, address = executor_of(options, config)  # refuses --executor local with --address before planning
    arguments = read_replay_arguments(names, options.where)
    plan: ReplayPlan = prepare_replay(
        arguments.names, where=arguments.where, task=options.task, workers=options.workers, device=options.device,
        warm=warm,
    )
    print(format_plan(plan), file=out)
    if (options.dry_run or options.diff) and plan.runs:
        print(format_placements(plan, diff=options.diff), file=out)
    out.flush()
    if options.dry_run:
        return 0
    if not plan.runs:  # a replay asked to run that has nothing to run fails, so that scripts notice
        print(f"nothing replayed: {plan.why_no_runs()}", file=out)
        return 1
    if not options.yes:
        question = f"Replay {len(plan.runs)} run(s), about {plan.estimate:.1f}s? [y/N] "
        answer = confirm(question) if confirm is not None else None
        if answer is None:
            raise ReplayError(
                "No answer to confirm the plan (stdin ended or cannot be read); pass --yes to run it, "
                "or --dry-run to only plan."
            )
        if not answer:
            print("not replayed", file=out)
            return 0
    executor = make_executor(config, plan.workers, warm, kind, address)
    try:
        report = run_replay(
            plan, executor, config=config, progress=ProgressLine(sys.stderr), rel_tol=options.rel_tol, warm=warm,
            accept_divergent=options.accept_divergent,
        )
    finally:
        notes = executor.close()
    report = dataclasses.replace(report, notes=(*report.notes, *notes))
    print(format_report(report), file=out)
    return 0 if report.ok else 1


def warm_command(action: str, out: IO[str] | None = None, config: Config | None = None) -> int:
    """``flordb-build warm status|stop``: list or stop this project's warm replay servers."""
    from ..config import load_config
    from ._execute import format_seconds
    from ._warm import project_servers

    out = out if out is not None else sys.stdout
    servers = project_servers(config or load_config())
    if not servers:
        print("no warm replay server is running for this project", file=out)
        return 0
    for server in servers:
        if action == "stop":
            server.stop()
            print(f"stopped the warm replay server (pid {server.pid})", file=out)
        else:
            print(
                f"pid {server.pid}: {server.modules} modules imported, {server.rss_bytes / 2**20:.0f} MiB "
                f"resident, exits after {format_seconds(server.idle)} idle; socket {server.path}",
                file=out,
            )
            server.release()
    return 0
