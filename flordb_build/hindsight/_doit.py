"""``doit replay NAME...``: the replay command as a doit COMMAND plugin.

``flordb-build init`` registers it beside the recording ``run`` command::

    [tool.doit.plugins.command]
    replay = "flordb_build.hindsight:ReplayCommand"
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from doit.cmd_base import Command

from ..errors import FlorBuildError
from ._command import run_replay_command

_OPTIONS: tuple[dict[str, Any], ...] = (
    {"name": "where", "long": "where", "type": str, "default": "",
     "help": "SQL expression over the run-level dataframe selecting runs, e.g. \"tstamp >= '2026-06-23'\""},
    {"name": "task", "long": "task", "type": str, "default": "", "help": "replay only runs of this task"},
    {"name": "workers", "long": "workers", "type": int, "default": 1,
     "help": "split range and validation scans into this many parallel segments (default 1)"},
    {"name": "device", "long": "device", "type": str, "default": "auto", "help": "auto, cpu or cuda (default auto)"},
    {"name": "dry_run", "long": "dry-run", "type": bool, "default": False, "help": "show the plan, run nothing"},
    {"name": "yes", "long": "yes", "type": bool, "default": False, "help": "run the plan without asking"},
    {"name": "cold", "long": "cold", "type": bool, "default": False,
     "help": "start every replay in a fresh interpreter, not forked from a warm server"},
)


def typed_arguments(doit_args: Sequence[str] | None, pos_args: list[str]) -> list[str]:
    """The replay command's arguments as typed, with those doit took as its ``name=value`` variables.

    doit reads every argument that has ``=`` and does not start with ``-`` as a command-line
    variable (``doit x=1``) and drops it from the arguments it hands on, so a where clause
    (``--where "epochs = 2"``, or FlorDB's positional ``"epochs = 2"``) would vanish. When doit
    runs from its command line, ``sys.argv`` still holds every argument: take those after
    ``replay`` from there, provided that dropping the ``=`` ones gives exactly ``doit_args``
    (what doit passed this command); otherwise ``pos_args``.
    """
    argv = sys.argv[1:]
    if doit_args is None or "replay" not in argv:
        return pos_args
    typed = argv[argv.index("replay") + 1 :]
    kept = [a for a in typed if not (a[:1] != "-" and "=" in a)]  # doit_cmd.DoitMain.process_args's rule
    return typed if kept == list(doit_args) and typed != kept else pos_args


class ReplayCommand(Command):
    """``doit replay NAME... [--where EXPR] [--task T] [--workers N] [--device D] [--dry-run] [--yes] [--cold]``."""

    name = "replay"
    doc_purpose = "replay new flor.log statements in recorded runs (flordb_build hindsight logging)"
    doc_usage = "NAME... [--where EXPR] [--task T] [--workers N] [--device auto|cpu|cuda] [--dry-run] [--yes] [--cold]"
    doc_description = None
    cmd_options = _OPTIONS
    _doit_args: list[str] | None = None

    def parse_execute(self, in_args: list[str]) -> Any:
        """Keep the arguments doit hands this command (see :func:`typed_arguments`), then run it."""
        self._doit_args = list(in_args)
        return super().parse_execute(in_args)

    def execute(self, opt_values: dict[str, Any], pos_args: list[str]) -> int:
        """Run the replay command; errors become one line on stderr and exit code 1."""
        from ..cli import build_parser, confirm_on_stdin

        # doit stops reading options at the first name; options after the names (as in
        # `doit replay w2 --yes`) are read here with flordb-build's own parser.
        arguments = typed_arguments(self._doit_args, pos_args)
        later = build_parser().parse_args(["replay", *arguments]) if arguments else None

        def option(name: str, default: Any) -> Any:
            value = opt_values.get(name)
            if later is not None and getattr(later, name) not in (None, False, default):
                value = getattr(later, name)
            return value if value not in (None, "") else default

        try:
            return run_replay_command(
                later.names if later is not None else [],
                where=option("where", None),
                task=option("task", None),
                workers=int(option("workers", 1)),
                device=str(option("device", "auto")),
                dry_run=bool(option("dry_run", False)),
                yes=bool(option("yes", False)),
                confirm=confirm_on_stdin(),
                warm=False if option("cold", False) else None,
            )
        except FlorBuildError as exc:
            print(f"doit replay: error: {exc}", file=sys.stderr)
            return 1
