"""The replay command's options: one table that ``flordb-build replay`` and ``doit replay`` are built from.

A module of its own, beside (not inside) ``hindsight/``: the CLI builds its parser from it on every
command, and importing anything in ``hindsight/`` runs that package's ``__init__`` (the planner,
executor and model: about 100 ms).

Each row is a doit ``cmd_options`` dict (doit's own keys only: doit refuses others), so the doit
command takes the table as it is; :func:`add_replay_arguments` builds the argparse side from the
same rows. Both front ends turn what they parsed into one :class:`ReplayOptions` with
:func:`options_from`, so an option added here reaches the replay from either front end.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from .errors import ReplayError

if TYPE_CHECKING:
    from .config import Config

#: Relative tolerance when comparing recorded and replayed floats (hindsight/_execute.py).
DEFAULT_REL_TOL = 1e-6

EXECUTORS = (("local", "a process pool on this machine"),
             ("ray", "Ray tasks on a cluster (--address) or a local Ray; pip install 'flordb_build[ray]'"))

DEVICES = (("auto", "cuda if torch sees one, else cpu"), ("cpu", "replay on the CPU"),
           ("cuda", "restore checkpoints onto the GPU and replay there"))


def default_workers() -> int:
    """``--workers`` when not given: the cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class ReplayOptions:
    """What a replay command line asked for besides the names (see :data:`REPLAY_OPTIONS`)."""

    where: str | None = None
    task: str | None = None
    workers: int = 0  # 0: default_workers()
    device: str = "auto"
    #: None: ``replay_executor`` of [tool.flordb_build] (default "local").
    executor: str | None = None
    #: None: ``ray_address`` of [tool.flordb_build] (default: a local Ray).
    address: str | None = None
    dry_run: bool = False
    diff: bool = False
    yes: bool = False
    rel_tol: float = DEFAULT_REL_TOL
    cold: bool = False
    accept_divergent: bool = False


#: One row per option of the replay command, in doit's ``cmd_options`` form; ``name`` is the
#: :class:`ReplayOptions` field it sets and ``default`` that field's default.
REPLAY_OPTIONS: tuple[dict[str, Any], ...] = (
    {"name": "where", "long": "where", "type": str, "default": None, "metavar": "EXPR",
     "help": "SQL expression over the run-level dataframe selecting runs, e.g. \"tstamp >= '2026-06-23'\""},
    {"name": "task", "long": "task", "type": str, "default": None, "metavar": "T", "help": "only runs of this task"},
    {"name": "workers", "long": "workers", "type": int, "default": 0, "metavar": "N",
     "help": "replay processes running at once, across all selected runs; range and validation scans are also "
             "split into up to N segments (default 0: the number of cores this process may use)"},
    {"name": "device", "long": "device", "type": str, "default": "auto", "metavar": "D", "choices": DEVICES,
     "help": "where to replay: auto, cpu or cuda (default auto: cuda if torch sees one; on --executor ray "
             "a job sees only the GPU Ray gave it, so auto runs on the CPU there: ask for cuda)"},
    {"name": "executor", "long": "executor", "type": str, "default": None, "metavar": "E", "choices": EXECUTORS,
     "help": "where replay jobs run: local (a process pool) or ray (Ray tasks across machines and GPUs); "
             "default: replay_executor in [tool.flordb_build], else local"},
    {"name": "address", "long": "address", "type": str, "default": None, "metavar": "ADDR",
     "help": "the Ray cluster --executor ray submits to (e.g. 10.0.0.5:6379); default: ray_address in "
             "[tool.flordb_build], else a local Ray started for the replay"},
    {"name": "dry_run", "long": "dry-run", "type": bool, "default": False,
     "help": "show the plan and, per run, where each statement goes in its version (line, anchor); then stop"},
    {"name": "diff", "long": "diff", "type": bool, "default": False,
     "help": "also show per run the unified diff of the recorded script against what the replay runs"},
    {"name": "yes", "long": "yes", "type": bool, "default": False, "help": "run the plan without asking"},
    {"name": "rel_tol", "long": "rel-tol", "type": float, "default": DEFAULT_REL_TOL, "metavar": "TOL",
     "help": f"relative tolerance when comparing recorded and replayed floats (default {DEFAULT_REL_TOL:g})"},
    {"name": "cold", "long": "cold", "type": bool, "default": False,
     "help": "start every replay in a fresh interpreter instead of forking it from a warm server that has the "
             "script's libraries imported (see 'flordb-build warm --help')"},
    {"name": "accept_divergent", "long": "accept-divergent", "type": bool, "default": False,
     "help": "write a run's replayed values even where values both the record and the replay log differ beyond "
             "--rel-tol, marked divergent (by default such a run's values are withheld and the command fails)"},
)


def add_replay_arguments(parser: argparse.ArgumentParser, *, suppress_defaults: bool = False) -> None:
    """Add every option of :data:`REPLAY_OPTIONS` to ``parser``, as ``--long`` flags.

    :param suppress_defaults: leave options that were not given out of the parsed namespace
        (for reading only what a command line added to options parsed before).
    """
    for row in REPLAY_OPTIONS:
        default = argparse.SUPPRESS if suppress_defaults else row["default"]
        if row["type"] is bool:
            parser.add_argument(f"--{row['long']}", dest=row["name"], action="store_true", default=default,
                                help=row["help"])
            continue
        parser.add_argument(
            f"--{row['long']}", dest=row["name"], type=row["type"], default=default, metavar=row.get("metavar"),
            choices=[value for value, _ in row["choices"]] if "choices" in row else None, help=row["help"],
        )


def options_from(values: Mapping[str, Any]) -> ReplayOptions:
    """The :class:`ReplayOptions` of parsed option values (an argparse namespace's ``vars`` or doit's).

    An empty string reads as not given (doit writes ``--where=`` that way).
    """
    given = {f.name: values[f.name] for f in fields(ReplayOptions) if values.get(f.name) not in (None, "")}
    return ReplayOptions(**given)


def executor_of(options: ReplayOptions, config: Config) -> tuple[str, str | None]:
    """The executor a replay uses and, for Ray, the cluster address: the command line over the config.

    An ``--address`` (or ``ray_address``) alone means Ray.

    :raises ReplayError: ``--executor local`` with an ``--address``.
    """
    address = options.address or config.ray_address
    if options.executor == "local" and options.address:
        raise ReplayError(
            f"'--address {options.address}' names a Ray cluster, but '--executor local' was asked for. "
            "Drop --address, or use '--executor ray'."
        )
    executor = options.executor or ("ray" if options.address else config.replay_executor)
    return executor, address if executor == "ray" else None
