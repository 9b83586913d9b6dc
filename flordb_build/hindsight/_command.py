"""The replay command shared by ``flordb-build replay``, ``doit replay`` and ``flor.replay``."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import IO

from ..config import Config
from ..errors import ReplayError
from ._model import DEFAULT_REL_TOL, ReplayPlan, ReplayReport

#: Asks the user whether to run the plan; None when nobody can answer (not a terminal).
Confirm = Callable[[str], bool]


def replay(
    *names: str,
    where: str | None = None,
    task: str | None = None,
    workers: int = 1,
    device: str = "auto",
    dry_run: bool = False,
    rel_tol: float = DEFAULT_REL_TOL,
    quiet: bool = False,
    config: Config | None = None,
    warm: bool | None = None,
) -> ReplayReport:
    """Replay today's new ``flor.log`` statements ``names`` in the recorded runs ``where`` selects.

    Prints the plan, a progress line per run and the estimated-vs-actual table to stderr (unless
    ``quiet``); with ``dry_run`` it stops after the plan (the report then has no outcomes).
    ``warm=False`` starts every replay process fresh instead of forking it from a warm server.

    :raises ReplayError: unknown names, no matching run, or a replay that failed.
    """
    from ._execute import ProgressLine, format_plan, format_report, run_replay
    from ._select import prepare_replay

    plan = prepare_replay(names, where=where, task=task, workers=workers, device=device, config=config, warm=warm)
    stream = None if quiet else sys.stderr
    if stream is not None:
        print(format_plan(plan), file=stream)
    if dry_run or not plan.runs:
        return ReplayReport(plan=plan, outcomes=())
    report = run_replay(
        plan, config=config, progress=ProgressLine(stream) if stream else None, rel_tol=rel_tol, warm=warm
    )
    if stream is not None:
        print(format_report(report), file=stream)
    if not report.ok:
        failed = [o.run_id for o in report.outcomes if not o.ok]
        raise ReplayError(
            f"Replay failed for run(s) {', '.join(failed)}, whose replayed values were not written: "
            f"{report.first_error}"
        )
    return report


def run_replay_command(
    names: Sequence[str],
    *,
    where: str | None,
    task: str | None,
    workers: int,
    device: str,
    dry_run: bool,
    yes: bool,
    confirm: Confirm | None,
    rel_tol: float = DEFAULT_REL_TOL,
    out: IO[str] | None = None,
    warm: bool | None = None,
) -> int:
    """Plan, show, confirm and run a replay for a command line; returns the exit code.

    :param confirm: asks "run it?"; None when stdin is not interactive (then ``yes`` is required).
    """
    from ._execute import ProgressLine, format_plan, format_report, run_replay
    from ._select import prepare_replay

    out = out if out is not None else sys.stdout
    if not rel_tol >= 0:
        raise ReplayError(f"--rel-tol must be a number >= 0, got '{rel_tol}'.")
    plan: ReplayPlan = prepare_replay(names, where=where, task=task, workers=workers, device=device, warm=warm)
    print(format_plan(plan), file=out)
    out.flush()
    if dry_run:
        return 0
    if not plan.runs:
        print("nothing to replay", file=out)
        return 0
    if not yes:
        if confirm is None:
            raise ReplayError(
                "stdin is not a terminal, so the plan cannot be confirmed; pass --yes to run it, or --dry-run to only plan."
            )
        if not confirm(f"Replay {len(plan.runs)} run(s), about {plan.estimate:.1f}s? [y/N] "):
            print("not replayed", file=out)
            return 0
    report = run_replay(plan, progress=ProgressLine(sys.stderr), rel_tol=rel_tol, warm=warm)
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
