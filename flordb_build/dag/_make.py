"""``flordb-build exec``: record one Make recipe as a task, run it, pass its exit status through.

Make knows nothing of flordb_build, so each recipe records itself::

    make ──> sh ──> flordb-build exec --task T --deps $^ --changed $? --targets $@ -- CMD ...
                      │  pipeline id: $FLOR_MAKE_PIPELINE_ID (the template exports one per make)
                      │               else hash(host, pid and start time of the ancestor `make`)
                      ├─ CMD runs with FLOR_TASK=T, FLOR_PIPELINE_ID=<id>; stdout/stderr stream live
                      └─ tasks + files rows; the pipeline's DAG JSON gains node T

All recipes of one ``make`` (also ``make -j``, also recursive makes that inherit the exported
id) land in one ``pipelines`` row. Recording never stands in the build's way: if the store
cannot be opened the command still runs and its exit status is returned unchanged.
"""

from __future__ import annotations

import hashlib
import os
import shlex
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
from ..errors import ExecError, FlorBuildError
from ..store import Store, write_transaction
from ._record import BuildRecorder, DagNode, TaskRecord, TaskStatus, new_pipeline_id

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


def find_make_process(start_pid: int | None = None, proc: Path = Path("/proc")) -> MakeProcess | None:
    """The nearest ancestor process named make (or gmake), or None where ``/proc`` cannot tell."""
    pid = os.getppid() if start_pid is None else start_pid
    for _ in range(_MAX_ANCESTORS):
        if pid <= 1:
            return None
        try:
            stat = (proc / str(pid) / "stat").read_text()
        except OSError:
            return None
        # "pid (comm) state ppid ... starttime": comm may hold spaces and parentheses.
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        if comm in MAKE_NAMES:
            try:
                raw = (proc / str(pid) / "cmdline").read_bytes()
            except OSError:
                raw = b""
            argv = [part.decode(errors="replace") for part in raw.split(b"\0") if part]
            return MakeProcess(pid, int(fields[19]), argv or [comm])
        pid = int(fields[1])
    return None


def make_pipeline(environ: Mapping[str, str]) -> tuple[str, list[str]]:
    """``(pipeline id, make's argv)`` for the recipe running now (see the module docstring)."""
    make = find_make_process()
    argv = make.argv if make else ["make"]
    given = environ.get(MAKE_PIPELINE_VAR, "").strip()
    if given:
        return given, argv
    if make is not None:
        key = f"{socket.gethostname()}:{make.pid}:{make.start_ticks}"
        return hashlib.sha256(key.encode()).hexdigest()[:16], argv
    return new_pipeline_id(), argv  # not under make: a pipeline of one recipe


def explain_recipe(missing_targets: Sequence[str], changed: Sequence[str]) -> str:
    """Why make ran the recipe: missing targets, newer prerequisites (``$?``), or phony/forced."""
    if missing_targets:
        return "missing target: " + ", ".join(missing_targets)
    if changed:
        return "newer prerequisites: " + ", ".join(changed)
    return "always runs: phony target or forced (make -B)"


def run_streaming(command: Sequence[str], env: Mapping[str, str]) -> tuple[int, str]:
    """Run ``command``; stdout passes straight through, stderr is copied live and its tail kept.

    Returns ``(exit status, stderr tail)``; a signal death is reported as 128 + signal number,
    as a shell would.
    """
    proc = subprocess.Popen(list(command), env=dict(env), stderr=subprocess.PIPE)
    assert proc.stderr is not None
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
            continue  # Ctrl-C reached the whole process group: wait for the command to finish dying
    pump_thread.join()
    proc.stderr.close()
    if code < 0:
        code = 128 - code
    return code, tail.decode(errors="replace")


def open_make_recorder(environ: Mapping[str, str]) -> tuple[BuildRecorder | None, str]:
    """A recorder for this recipe's pipeline (created on first use), or None when the store fails."""
    pipeline_id, argv = make_pipeline(environ)
    try:
        store = Store.open(load_config())
        recorder = BuildRecorder(store, pipeline_id)
        recorder.start_pipeline("make", argv, {"tasks": []})
    except (FlorBuildError, sqlite3.Error, OSError) as exc:
        print(f"flordb_build: running without recording: {exc}", file=sys.stderr)
        return None, pipeline_id
    return recorder, pipeline_id


def run_recipe(
    task: str,
    command: Sequence[str],
    deps: Sequence[str] = (),
    targets: Sequence[str] = (),
    changed: Sequence[str] = (),
) -> RecipeResult:
    """Record and run one recipe; the result's exit code is the command's, unchanged.

    :raises ExecError: when there is no command to run.
    """
    if not command:
        raise ExecError(
            f"No command given for task '{task}'; put it after '--', e.g. "
            "'flordb-build exec --task train -- python train.py'."
        )
    recorder, pipeline_id = open_make_recorder(os.environ)
    text = shlex.join(command)
    missing = [t for t in targets if not os.path.exists(t)]
    if recorder is not None:
        try:
            recorder.add_dag_node(DagNode(task, file_dep=list(deps), targets=list(targets), actions=[text]))
        except (FlorBuildError, sqlite3.Error) as exc:
            print(f"flordb_build: running without recording: {exc}", file=sys.stderr)
            recorder.store.close()
            recorder = None
    env = {**os.environ, "FLOR_TASK": task, "FLOR_PIPELINE_ID": pipeline_id}
    started = time.time()
    try:
        code, err_tail = run_streaming(command, env)
    except OSError as exc:
        # The shell's convention: 127 command not found, 126 found but not executable.
        code = 127 if isinstance(exc, FileNotFoundError) else 126
        err_tail = f"could not start '{command[0]}': {exc}"
        print(f"flordb-build exec: {err_tail}", file=sys.stderr)
    ended = time.time()
    if recorder is None:
        return RecipeResult(code, pipeline_id, recorded=False)
    try:
        failed = code != 0
        error = None
        if failed:
            error = f"command '{text}' exited with status {code}"
            if err_tail.strip():
                error += ":\n" + err_tail.strip()
        record = TaskRecord(
            task,
            TaskStatus.FAILED if failed else TaskStatus.EXECUTED,
            started,
            ended,
            explain_recipe(missing, changed),
            [text],
            error,
        )
        # A failed recipe's targets may be half-written: record its inputs only.
        recorder.record_task(record, recorder.hasher.facts(deps, [] if failed else targets))
        merge_step_status(recorder, failed, code)
        recorder.close()
    except (FlorBuildError, sqlite3.Error, OSError) as exc:
        print(f"flordb_build: recipe '{task}' ran but was not recorded: {exc}", file=sys.stderr)
        return RecipeResult(code, pipeline_id, recorded=False)
    return RecipeResult(code, pipeline_id, recorded=True)


def merge_step_status(recorder: BuildRecorder, failed: bool, exit_code: int) -> None:
    """Fold one recipe's outcome into its pipeline: ``failed`` sticks, else ``ok``; ``ended`` grows."""
    with write_transaction(recorder.store.conn):
        recorder.store.conn.execute(
            "UPDATE pipelines SET ended = max(coalesce(ended, 0), ?), "
            "status = CASE WHEN status = 'failed' THEN 'failed' ELSE ? END, "
            "exit_code = CASE WHEN status = 'failed' THEN exit_code ELSE ? END "
            "WHERE pipeline_id = ?",
            (time.time(), "failed" if failed else "ok", exit_code, recorder.pipeline_id),
        )

