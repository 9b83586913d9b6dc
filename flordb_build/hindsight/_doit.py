"""``doit replay NAME...``: the replay command as a doit COMMAND plugin.

``flordb-build init`` registers it beside the recording ``run`` command::

    [tool.doit.plugins.command]
    replay = "flordb_build.hindsight:ReplayCommand"
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from doit.cmd_base import Command

from ..errors import FlorBuildError
from ..replay_options import REPLAY_OPTIONS, ReplayOptions, add_replay_arguments, options_from


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


def later_options(arguments: Sequence[str]) -> argparse.Namespace:
    """The names, and the options given among or after them, in ``arguments`` (doit's getopt stops at a name).

    Options not given are absent from the namespace, so they do not overwrite what doit parsed.
    """
    parser = argparse.ArgumentParser(prog="doit replay", add_help=False)
    parser.add_argument("names", nargs="*")
    add_replay_arguments(parser, suppress_defaults=True)
    return parser.parse_intermixed_args(list(arguments))


def command_options(opt_values: Mapping[str, Any], arguments: Sequence[str]) -> tuple[list[str], ReplayOptions]:
    """The replay names and :class:`ReplayOptions` of one ``doit replay`` command line.

    :param opt_values: what doit parsed from the options before the first name (``cmd_options``).
    :param arguments: the arguments from the first name on (see :func:`typed_arguments`).
    """
    later = later_options(arguments)
    merged = {**opt_values, **{k: v for k, v in vars(later).items() if k != "names"}}
    return list(later.names), options_from(merged)


class ReplayCommand(Command):
    """``doit replay NAME... [OPTION...]``, its options those of ``flordb-build replay`` (replay_options.py)."""

    name = "replay"
    doc_purpose = "replay new flor.log statements in recorded runs (flordb_build hindsight logging)"
    doc_usage = "NAME... " + " ".join(
        f"[--{row['long']}]" if row["type"] is bool else f"[--{row['long']} {row.get('metavar', 'ARG')}]"
        for row in REPLAY_OPTIONS
    )
    doc_description = None
    cmd_options = REPLAY_OPTIONS
    _doit_args: list[str] | None = None

    def parse_execute(self, in_args: list[str]) -> Any:
        """Keep the arguments doit hands this command (see :func:`typed_arguments`), then run it."""
        self._doit_args = list(in_args)
        return super().parse_execute(in_args)

    def execute(self, opt_values: dict[str, Any], pos_args: list[str]) -> int:
        """Run the replay command; errors become one line on stderr and exit code 1."""
        from . import _command

        try:
            names, options = command_options(opt_values, typed_arguments(self._doit_args, pos_args))
            return _command.run_replay_command(names, options, confirm=_command.confirm_on_stdin())
        except FlorBuildError as exc:
            print(f"doit replay: error: {exc}", file=sys.stderr)
            return 1
