"""``flordb-build exec``: record one Make recipe as a task, run it, pass its exit status through.

Make knows nothing of flordb_build, so each recipe records itself::

    make ──> sh ──> flordb-build exec --task T --deps $^ --changed $? --targets $@ -- CMD ...
                      │  pipeline id: $FLOR_MAKE_PIPELINE_ID (the template exports one per make)
                      │               else hash(host, pid and start time of the ancestor `make`)
                      ├─ CMD runs with FLOR_TASK=T, FLOR_PIPELINE_ID=<id>; stdout/stderr stream live;
                      │  SIGTERM, SIGINT and SIGHUP are passed on to it (_forward.py)
                      ├─ tasks + files rows; the pipeline's DAG JSON gains node T
                      └─ the pipeline's journal committed (make has no end event: every recipe commits)

All recipes of one ``make`` (also ``make -j``, also recursive makes that inherit the exported
id) land in one ``pipelines`` row. An ``exec`` with no ``make`` among its ancestors records the
process that ran it instead (``timeout``, a shell, a script) as the pipeline's tool and argv.
Recording never stands in the build's way: if the store cannot be opened the command still
runs and its exit status is returned unchanged.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ..config import load_config
from ..errors import ExecError, FlorBuildError, SnapshotError
from ..store import Store, write_transaction
from ._forward import SignalForwarder, describe_signals
from ._record import BuildRecorder, DagNode, PipelineStatus, TaskRecord, TaskStatus, new_pipeline_id

MAKE_PIPELINE_VAR = "FLOR_MAKE_PIPELINE_ID"
MAKE_NAMES = frozenset({"make", "gmake", "remake"})
STDERR_TAIL_BYTES = 4000
_MAX_ANCESTORS = 16


@dataclass(frozen=True)
class MakeProcess:
    """The ``make`` process a recipe runs under (Linux ``/proc``)."""

    pid: int
    start_ticks: int
    argv: list[str]


@dataclass(frozen=True)
class RecipeResult:
    """What ``exec`` did: the command's exit status and where it was recorded."""

    exit_code: int
    pipeline_id: str | None
    recorded: bool


@dataclass(frozen=True)
class PipelineOrigin:
    """The pipeline a recipe belongs to and the tool that started it (``pipelines.tool``/``argv``)."""

    pipeline_id: str
    tool: str
    argv: list[str]


def _read_stat(pid: int, proc: Path) -> tuple[str, list[str]]:
    """``(comm, fields after comm)`` of ``/proc/<pid>/stat``: comm may hold spaces and parentheses."""
    stat = (proc / str(pid) / "stat").read_text()
    return stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()


def process_argv(pid: int, proc: Path = Path("/proc")) -> list[str]:
    """A process's argv (``/proc/<pid>/cmdline``); empty when it is gone or hidden."""
    try:
        raw = (proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def find_make_process(start_pid: int | None = None, proc: Path = Path("/proc")) -> MakeProcess | None:
    """The nearest ancestor process named make (or gmake), or None where ``/proc`` cannot tell."""
    pid = os.getppid() if start_pid is None else start_pid
    for _ in range(_MAX_ANCESTORS):
        if pid <= 1:
            return None
        try:
            comm, fields = _read_stat(pid, proc)
        except OSError:
            return None
        if comm in MAKE_NAMES:
            return MakeProcess(pid, int(fields[19]), process_argv(pid, proc) or [comm])
        pid = int(fields[1])
    return None


def make_pipeline(environ: Mapping[str, str]) -> PipelineOrigin:
    """The pipeline of the recipe running now and what started it (see the module docstring)."""
    given = environ.get(MAKE_PIPELINE_VAR, "").strip()
    make = find_make_process()
    if make is not None:
        if given:
            return PipelineOrigin(given, "make", make.argv)
        key = f"{socket.gethostname()}:{make.pid}:{make.start_ticks}"
        return PipelineOrigin(hashlib.sha256(key.encode()).hexdigest()[:16], "make", make.argv)
    # Not under make (timeout, a shell, a script): a pipeline of its own unless an id was given,
    # recorded as what really ran it, not as a make that never was.
    parent = os.getppid()
    argv = process_argv(parent)
    try:
        comm = _read_stat(parent, Path("/proc"))[0]
    except OSError:
        comm = ""
    tool = os.path.basename(argv[0]) if argv else comm
    return PipelineOrigin(given or new_pipeline_id(), tool or "exec", argv or [tool or "exec"])


def explain_recipe(missing_targets: Sequence[str], changed: Sequence[str]) -> str:
    """Why make ran the recipe: missing targets, newer prerequisites (``$?``), or phony/forced."""
    if missing_targets:
        return "missing target: " + ", ".join(missing_targets)
    if changed:
        return "newer prerequisites: " + ", ".join(changed)
    return "always runs: phony target or forced (make -B)"


@dataclass(frozen=True)
class CommandExit:
    """How a recipe's command ended."""

    code: int  # its exit status; a signal death is 128 + the signal's number, as a shell reports it
    stderr_tail: str
    killed_by: signal.Signals | None = None


def run_streaming(
    command: Sequence[str], env: Mapping[str, str], forwarder: SignalForwarder | None = None
) -> CommandExit:
    """Run ``command``; stdout passes straight through, stderr is copied live and its tail kept.

    ``forwarder`` (active around the call) passes the signals that stop the command on to it.
    """
    proc = subprocess.Popen(list(command), env=dict(env), stderr=subprocess.PIPE)
    assert proc.stderr is not None
    if forwarder is not None:
        forwarder.attach(proc)
    tail = bytearray()
    err_out: IO[bytes] = sys.stderr.buffer

    def pump(pipe: IO[bytes]) -> None:
        fd = pipe.fileno()
        while chunk := os.read(fd, 65536):
            err_out.write(chunk)
            err_out.flush()
            tail.extend(chunk)
            del tail[:-STDERR_TAIL_BYTES]

    pump_thread = threading.Thread(target=pump, args=(proc.stderr,), daemon=True)
    pump_thread.start()
    code = 0
    while True:
        try:
            code = proc.wait()
            break
        except KeyboardInterrupt:
            continue  # no forwarder (not the main thread): Ctrl-C reached the group; wait for the command
    if forwarder is not None:
        forwarder.detach()
    pump_thread.join()
    proc.stderr.close()
    if code < 0:
        return CommandExit(128 - code, tail.decode(errors="replace"), signal.Signals(-code))
    return CommandExit(code, tail.decode(errors="replace"))


def open_make_recorder(origin: PipelineOrigin) -> BuildRecorder | None:
    """A recorder for this recipe's pipeline (created on first use), or None when the store fails."""
    try:
        store = Store.open(load_config())
        recorder = BuildRecorder(store, origin.pipeline_id)
        recorder.start_pipeline(origin.tool, origin.argv, {"tasks": []})
    except (FlorBuildError, sqlite3.Error, OSError) as exc:
        print(f"flordb_build: running without recording: {exc}", file=sys.stderr)
        return None
    return recorder


def run_recipe(
    task: str,
    command: Sequence[str],
    deps: Sequence[str] = (),
    targets: Sequence[str] = (),
    changed: Sequence[str] = (),
) -> RecipeResult:
    """Record and run one recipe; the result's exit code is the command's, unchanged.

    SIGTERM, SIGINT and SIGHUP that reach ``exec`` while the command runs are passed on to it;
    the task is then recorded ``interrupted`` with the signal, and so is the pipeline.

    :raises ExecError: when there is no command to run.
    """
    if not command:
        raise ExecError(
            f"No command given for task '{task}'; put it after '--', e.g. "
            "'flordb-build exec --task train -- python train.py'."
        )
    with SignalForwarder() as forwarder:
        return _record_and_run(task, command, deps, targets, changed, forwarder)


def _record_and_run(
    task: str,
    command: Sequence[str],
    deps: Sequence[str],
    targets: Sequence[str],
    changed: Sequence[str],
    forwarder: SignalForwarder,
) -> RecipeResult:
    origin = make_pipeline(os.environ)
    pipeline_id = origin.pipeline_id
    recorder = open_make_recorder(origin)
    text = shlex.join(command)
    missing = [t for t in targets if not os.path.exists(t)]
    if recorder is not None:
        try:
            recorder.add_dag_node(DagNode(task, file_dep=list(deps), targets=list(targets), actions=[text]))
        except (FlorBuildError, sqlite3.Error, OSError) as exc:
            print(f"flordb_build: running without recording: {exc}", file=sys.stderr)
            recorder.store.close()
            recorder = None
    env = {**os.environ, "FLOR_TASK": task, "FLOR_PIPELINE_ID": pipeline_id}
    started = time.time()
    try:
        outcome = run_streaming(command, env, forwarder)
    except OSError as exc:
        # The shell's convention: 127 command not found, 126 found but not executable.
        outcome = CommandExit(127 if isinstance(exc, FileNotFoundError) else 126, f"could not start '{command[0]}': {exc}")
        print(f"flordb-build exec: {outcome.stderr_tail}", file=sys.stderr)
    code = outcome.code
    ended = time.time()
    if recorder is None:
        return RecipeResult(code, pipeline_id, recorded=False)
    try:
        status, error = recipe_outcome(text, outcome, forwarder.received)
        record = TaskRecord(task, status, started, ended, explain_recipe(missing, changed), [text], error)
        # A failed or interrupted recipe's targets may be half-written: record its inputs only.
        done = status is TaskStatus.EXECUTED
        recorder.record_task(record, recorder.hasher.facts(deps, targets if done else []))
        merge_step_status(recorder, status, code)
        _commit_journal(recorder)
        recorder.close()
    except (FlorBuildError, sqlite3.Error, OSError) as exc:
        print(f"flordb_build: recipe '{task}' ran but was not recorded: {exc}", file=sys.stderr)
        return RecipeResult(code, pipeline_id, recorded=False)
    return RecipeResult(code, pipeline_id, recorded=True)


def recipe_outcome(text: str, outcome: CommandExit, signals: list[signal.Signals]) -> tuple[TaskStatus, str | None]:
    """The task's status and error for a command that ended with ``outcome`` after ``signals`` reached exec."""
    if signals:
        status = TaskStatus.INTERRUPTED
        error = f"interrupted by {describe_signals(signals)} while the command ran; "
    elif outcome.code != 0:
        status, error = TaskStatus.FAILED, ""
    else:
        return TaskStatus.EXECUTED, None
    if outcome.killed_by is not None:
        error += f"command '{text}' was killed by {outcome.killed_by.name} (exit status {outcome.code})"
    else:
        error += f"command '{text}' exited with status {outcome.code}"
    if outcome.stderr_tail.strip():
        error += ":\n" + outcome.stderr_tail.strip()
    return status, error


def _commit_journal(recorder: BuildRecorder) -> None:
    try:
        recorder.commit_journal()
    except SnapshotError as exc:
        # The journal stays in .flor/pipelines, where rebuild finds it too.
        print(f"flordb_build: pipeline {recorder.pipeline_id} recorded without a snapshot commit: {exc}", file=sys.stderr)


#: How a recipe's outcome ranks in its pipeline's status: the highest seen so far sticks.
_STATUS_RANK: dict[str | None, int] = {PipelineStatus.OK: 0, PipelineStatus.FAILED: 1, PipelineStatus.INTERRUPTED: 2}
_STEP_STATUS = {
    TaskStatus.EXECUTED: PipelineStatus.OK,
    TaskStatus.FAILED: PipelineStatus.FAILED,
    TaskStatus.INTERRUPTED: PipelineStatus.INTERRUPTED,
}


def merge_step_status(recorder: BuildRecorder, status: TaskStatus, exit_code: int) -> None:
    """Fold one recipe's outcome into its pipeline: ``interrupted`` sticks, then ``failed``, else ``ok``;
    ``ended`` grows; the exit code is that of the recipe that set the status."""
    step = _STEP_STATUS[status]
    with write_transaction(recorder.store.conn):
        row = recorder.store.conn.execute(
            "SELECT status FROM pipelines WHERE pipeline_id = ?", (recorder.pipeline_id,)
        ).fetchone()
        current = row[0] if row else None
        rank = _STATUS_RANK.get(current, -1)  # 'running': the first recipe to finish sets it
        keep = rank > _STATUS_RANK[step] or (rank == _STATUS_RANK[step] and step is not PipelineStatus.OK)
        recorder.store.conn.execute(
            "UPDATE pipelines SET ended = max(coalesce(ended, 0), ?), status = ?, "
            "exit_code = CASE WHEN ? THEN exit_code ELSE ? END WHERE pipeline_id = ?",
            (time.time(), current if keep else step.value, keep, exit_code, recorder.pipeline_id),
        )
