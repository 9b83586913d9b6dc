"""Replay jobs as payloads, the worker function that runs one, and the executors that run many.

The driver (``_execute.py``) turns each job of every run into a :class:`JobPayload` and submits
them all to one :class:`Executor`; each reply comes back as its job ends, and the driver (the only
writer of the store) stages its rows and finishes a run when its last reply is in::

    driver                                        worker (a thread here; a Ray task on a node)
      payload(job): snapshot tar (once per sha),    run_job(payload, progress):
        spec, patched sources, argv, env, config,     tar -> tmp/tree, patched sources over it
        objects location, store slice (_slice.py)     slice -> tmp/store/flor.db (+ objects)
      executor.submit(payload)  ───────────────>      child: warm fork or python -m _child,
                                                        stages its values into the slice
      for reply in executor.completed():  <──────     JobReply: staged rows, outcome, modules
        stage rows, compare, decide, finish run

A payload needs no filesystem shared with the driver: everything the child reads is in it, but
checkpoint objects, which it names by place (the local objects folder where the worker can see
it, or the project's remote ``objects`` URL), and ``replay_links`` inputs, linked where they
exist on the worker.

Backends: :class:`LocalExecutor` (threads, each waiting on its job's child process; the warm
pool of this machine) and ``_ray.RayExecutor``, whose worker processes each make a node-local
warm pool once (:func:`ray_worker_setup`, its ``worker_setup``) and pass it to every job they run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import queue
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import FlorBuildError, WarmStartError
from ._child import MODULE as CHILD_MODULE
from ._child import PREPARE
from ._model import PROGRESS_FD_ENV, REPLAY_ENV, ReplaySpec, format_seconds

if TYPE_CHECKING:
    from ._warm import WarmPool, WarmProcess

Progress = Callable[[int, int], None]  # (main-loop iterations done, total) of one job
#: The child's store inside the job's directory (the slice), and its objects beside it.
_STORE = "store"
_OUTPUT_LINES = 15


@dataclass(frozen=True)
class JobPayload:
    """Everything a worker needs; picklable; assumes NO filesystem shared with the driver."""

    key: str  # unique per job in a session, e.g. f"{run_id}/{worker}"
    snapshot_sha: str  # the snapshot commit
    snapshot_tar: bytes  # `git archive` of that commit (backends may ship it once per sha)
    gpus: float  # 0.0, or 1.0 for --device cuda (Ray sets CUDA_VISIBLE_DEVICES)
    #: The child's spec; ``db``, ``root``, ``result`` and ``progress_fd`` are set by :func:`run_job`.
    spec: ReplaySpec | None = None
    script: str = ""  # the script's path in the snapshot
    sources: Mapping[str, str] = field(default_factory=dict)  # path -> patched text over the snapshot
    argv: tuple[str, ...] = ()  # after the script's path: the recorded flags, then --kwargs
    #: The child's environment (ours with the run's recorded variables); also picks the warm server.
    env: Mapping[str, str] = field(default_factory=dict)
    import_paths: tuple[str, ...] = ()  # project-relative sys.path entries, mapped into the snapshot
    #: ``[tool.flordb_build]`` settings the child's Config takes (flush_seconds, params, objects, ...).
    settings: Mapping[str, Any] = field(default_factory=dict)
    objects_dir: str | None = None  # the project's objects folder (used where this machine has it)
    objects_url: str | None = None  # the project's remote objects store (``objects``), if any
    #: A SQLite store file: the run's own rows, plus what asof.py shows the script (``_slice.py``).
    store_slice: bytes = b""
    reads_store: bool = False  # the slice holds the as-of rows (the script may read the store)
    links: tuple[tuple[str, str], ...] = ()  # (relative path, absolute source): replay_links
    warm: bool = False  # fork from a warm server where the worker has a pool
    project_root: str = ""  # a warm server never imports a module from here (today's tree)


@dataclass(frozen=True)
class JobReply:
    """What a worker returns for one job (never raised: failures are ``ok=False`` with ``error``)."""

    key: str
    ok: bool  # False for any failure: exit != 0 (incl. -9), no result, setup error
    exit_code: int | None
    error: str | None  # readable: what failed, the last output lines
    #: Staged rows: loop blocks ``(ctx, parent, name, iteration, count, value)``, logs ``(seq, ctx, name, value, kind)``.
    loops: tuple[tuple[Any, ...], ...] = ()
    logs: tuple[tuple[Any, ...], ...] = ()
    #: The child's result (``_mode.ReplayRun.close``): counters, notes, compare rows, generators, seconds.
    outcome: Mapping[str, Any] | None = None
    notes: tuple[str, ...] = ()
    modules: tuple[str, ...] = ()  # installed modules a warm child imported that its server lacked
    seconds: float = 0.0
    warm: bool = False  # forked from a warm server
    fresh_server: bool = False  # the job waited for its warm server to start
    #: Seconds of ``seconds`` before its process forked that a fork does not cost: waiting for its
    #: warm server (its own start, or one another job was starting) and the server's import of the
    #: preloads it lacked. The plan models those waits apart (``ReplayPlan.estimate``).
    waited: float = 0.0


class Executor(Protocol):
    """Runs job payloads over ``slots`` at a time (see the module docstring)."""

    slots: int

    def submit(self, payload: JobPayload) -> None: ...

    def completed(self) -> Iterator[JobReply]: ...  # blocks; each reply as its job ends; ends when all replied

    def progress(self) -> Mapping[str, tuple[int, int]]: ...  # key -> (done, total), running jobs

    def cancel(self) -> None: ...  # kill every running job (and its child processes), drop queued

    def close(self) -> tuple[str, ...]: ...  # release resources; notes for the report


# -- the worker side ------------------------------------------------------------------------------


class _Running:
    """This process's running replay children by job key, so that a cancel can kill them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.procs: dict[str, WarmProcess | subprocess.Popen[bytes]] = {}
        self.cancelled: set[str] = set()

    def add(self, key: str, proc: WarmProcess | subprocess.Popen[bytes]) -> None:
        with self.lock:
            self.procs[key] = proc
            if key in self.cancelled:  # cancelled while it was starting: it must not run on
                _kill(proc)

    def discard(self, key: str) -> None:
        with self.lock:
            self.procs.pop(key, None)
            self.cancelled.discard(key)

    def cancel(self, keys: set[str]) -> None:
        with self.lock:
            self.cancelled |= keys
            procs = [proc for key, proc in self.procs.items() if key in keys]
        for proc in procs:
            _kill(proc)


RUNNING = _Running()


def _kill(proc: WarmProcess | subprocess.Popen[bytes]) -> None:
    """Kill a replay child and its process group (it runs in a session of its own)."""
    if isinstance(proc, subprocess.Popen):
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        proc.kill()


def cancel_jobs(keys: set[str]) -> None:
    """Kill the children of these jobs running in this process, and any of them that starts later."""
    RUNNING.cancel(keys)


def run_job(
    payload: JobPayload, progress: Progress, *, pool: WarmPool | None = None, pool_error: str | None = None
) -> JobReply:
    """The worker side (pure function of the payload; never raises for a script failure).

    :param pool: this machine's warm servers; None starts the child in a fresh interpreter.
    :param pool_error: why this worker has no pool (a note of a job that asked for a warm start).
    """
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="flor-job-"))
    try:
        return _run(payload, tmp, progress, started, pool, pool_error)
    except (FlorBuildError, OSError, sqlite3.Error, subprocess.CalledProcessError, ValueError) as exc:
        return JobReply(
            payload.key, False, None, f"the replay job could not be set up or read back: {exc}",
            seconds=time.perf_counter() - started,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(
    payload: JobPayload, tmp: Path, progress: Progress, started: float, pool: WarmPool | None, pool_error: str | None
) -> JobReply:
    from ..snapshot import extract_snapshot
    from ._slice import read_staged

    if payload.spec is None:
        raise ValueError(f"job '{payload.key}' has no replay spec")
    tree = tmp / "tree"
    extract_snapshot(payload.snapshot_tar, tree)
    for path, text in payload.sources.items():  # the patched script and modules, over the snapshot
        (tree / path).parent.mkdir(parents=True, exist_ok=True)
        (tree / path).write_text(text, encoding="utf-8")
    for relative, source in payload.links:  # ignored inputs the snapshot lacks, where this machine has them
        target = tree / relative
        if Path(source).exists() and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(source, target_is_directory=Path(source).is_dir())
    store_dir = tmp / _STORE
    store_dir.mkdir()
    db = store_dir / "flor.db"
    db.write_bytes(payload.store_slice)
    if payload.objects_dir and Path(payload.objects_dir).is_dir():
        (store_dir / "objects").symlink_to(payload.objects_dir, target_is_directory=True)
    result_path = tmp / "result.json"
    read_fd, write_fd = os.pipe()
    spec = dataclasses.replace(
        payload.spec, db=str(db), root=str(tree), result=str(result_path), progress_fd=write_fd,
        settings={**payload.settings, "objects": payload.objects_url},
    )
    # The script's own reads of the store (flor.dataframe) read the slice, through asof.py's views.
    env = {**payload.env, REPLAY_ENV: spec.to_json(), "FLORDB_BUILD_DB": str(db)}
    snapshot_paths = [tree / p for p in payload.import_paths]
    child_env = _with_paths(env, snapshot_paths)
    argv = [str(tree / payload.script), *payload.argv]
    notes: list[str] = [f"started cold: {pool_error}"] if pool is None and payload.warm and pool_error else []
    fresh_server, waited = False, 0.0
    with open(tmp / "output.log", "wb") as output:
        proc: WarmProcess | subprocess.Popen[bytes] | None = None
        try:
            if pool is not None and payload.warm:
                proc, fresh_server, waited = _start_warm(
                    pool, payload, spec, argv, tree, child_env, snapshot_paths, output.fileno(), write_fd, tmp, notes
                )
            warm = proc is not None
            if proc is None:
                proc = subprocess.Popen(
                    [sys.executable, "-m", CHILD_MODULE, *argv], cwd=tree, env=child_env, stdout=output,
                    stderr=subprocess.STDOUT, pass_fds=(write_fd,),
                    # A session of its own, so that a cancel kills what the script started too.
                    start_new_session=True,
                )
        finally:
            os.close(write_fd)
        reader = threading.Thread(target=_read_progress, args=(read_fd, progress), daemon=True)
        reader.start()
        RUNNING.add(payload.key, proc)
        try:
            code = proc.wait()
        except BaseException:
            _kill(proc)
            raise
        finally:
            RUNNING.discard(payload.key)
        reader.join()
    seconds = time.perf_counter() - started
    outcome = json.loads(result_path.read_text(encoding="utf-8")) if result_path.exists() else None
    imported = _read_modules(tmp / "modules.json") if warm else []
    if warm and pool is not None:
        pool.learn(payload.env, imported, _project_root(payload))
    notes.extend((outcome or {}).get("notes", ()))
    if code != 0 or outcome is None or outcome.get("status") != "ok":
        reason = (outcome or {}).get("error") or f"exit status {code}"
        return JobReply(
            payload.key, False, code, f"the replayed script failed ({reason}); its last output:\n{_tail(tmp / 'output.log')}",
            outcome=outcome, notes=tuple(notes), seconds=seconds, warm=warm, fresh_server=fresh_server,
            waited=waited,
        )
    loops, logs = read_staged(db, spec.session, spec.run_id)
    return JobReply(
        payload.key, True, code, None, loops=tuple(loops), logs=tuple(logs), outcome=outcome, notes=tuple(notes),
        modules=tuple(imported), seconds=seconds, warm=warm, fresh_server=fresh_server, waited=waited,
    )


def _start_warm(
    pool: WarmPool, payload: JobPayload, spec: ReplaySpec, argv: list[str], tree: Path, child_env: dict[str, str],
    snapshot_paths: list[Path], output: int, progress_fd: int, tmp: Path, notes: list[str],
) -> tuple[WarmProcess | None, bool, float]:
    """Fork the job from a warm server: (the process, whether it waited for the server to start, the
    seconds it waited for the server and its imports: ``JobReply.waited``); ``(None, False, 0.0)``
    and a note when it must start a fresh interpreter instead."""
    # The child finds its progress descriptor in PROGRESS_FD_ENV: a free number there, not ours.
    child_env = {**child_env, REPLAY_ENV: dataclasses.replace(spec, progress_fd=None).to_json()}
    try:
        # payload.env picks the server: it holds nothing of this job's temporary directory.
        root = _project_root(payload)
        asked = time.perf_counter()
        server, fresh = pool.server_for(payload.env, payload.sources.get(payload.script, ""), root)
        waited = time.perf_counter() - asked
        process = server.run(
            argv, tree, child_env, {1: output, 2: output}, {PROGRESS_FD_ENV: progress_fd},
            preload=pool.learned(payload.env, root), modules_out=tmp / "modules.json",
            exclude=(Path(payload.project_root),) if payload.project_root else (),
            path_prepend=snapshot_paths, prepare=PREPARE,
        )
        return process, fresh, waited + process.imported
    except (WarmStartError, OSError) as exc:  # a warm start is an optimisation: never fail a replay on it
        notes.append(f"started cold: {exc}")
        return None, False, 0.0


def _project_root(payload: JobPayload) -> Path | None:
    """The project as its driver names it: one part of the key of a worker pool's server."""
    return Path(payload.project_root) if payload.project_root else None


def ray_worker_setup() -> dict[str, Any]:
    """``RayExecutor(worker_setup=...)``: once per Ray worker process, its warm pool for :func:`run_job`.

    The pool is node-local (sockets under this machine's runtime directory, in ``ray/``: one
    name for every Ray session, so what earlier replays imported is preloaded next time and no
    directory is left per session) and needs no checkout of the project; the servers it starts
    are owned by this worker and end with it, so with the Ray session (``_warm.WarmPool.for_node``).
    """
    from ._warm import WarmPool

    try:
        return {"pool": WarmPool.for_node("ray")}
    except (WarmStartError, OSError) as exc:
        return {"pool_error": str(exc)}


def _with_paths(env: Mapping[str, str], paths: list[Path]) -> dict[str, str]:
    """``env`` with ``paths`` first on ``PYTHONPATH`` (the snapshot's copies of the project's packages)."""
    if not paths:
        return dict(env)
    existing = [e for e in env.get("PYTHONPATH", "").split(os.pathsep) if e]
    return {**env, "PYTHONPATH": os.pathsep.join([*map(str, paths), *existing])}


def _read_modules(path: Path) -> list[str]:
    """The modules a warm-started child reported importing (nothing when it could not say)."""
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


def _read_progress(fd: int, progress: Progress) -> None:
    with os.fdopen(fd, "rb") as pipe:
        for line in pipe:
            parts = line.split()
            if len(parts) == 2:
                progress(int(parts[0]), int(parts[1]))


def _tail(path: Path, lines: int = _OUTPUT_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no output)"
    return "\n".join(text.rstrip().splitlines()[-lines:]) or "(no output)"


# -- the local backend ----------------------------------------------------------------------------


class LocalExecutor:
    """``slots`` threads on this machine, each running one job's child process at a time.

    :param pool: this machine's warm servers (``_warm.WarmPool``), shared by every job; None: cold.
    :param notes: notes for the report (e.g. why there is no pool), returned by :meth:`close`.
    """

    def __init__(self, slots: int, *, pool: WarmPool | None = None, notes: tuple[str, ...] = ()) -> None:
        if slots < 1:
            raise ValueError(f"an executor needs at least one slot, got {slots}")
        self.slots = slots
        self.pool = pool
        self._notes = notes
        self._threads = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="flor-replay")
        self._replies: queue.Queue[JobReply] = queue.Queue()
        self._lock = threading.Lock()
        self._pending: set[str] = set()  # submitted, no reply yet
        self._progress: dict[str, tuple[int, int]] = {}
        self._cancelled = False

    def submit(self, payload: JobPayload) -> None:
        """Queue ``payload``; it starts when a slot is free."""
        with self._lock:
            if payload.key in self._pending:
                raise ValueError(f"job '{payload.key}' was submitted twice")
            self._pending.add(payload.key)
        self._threads.submit(self._work, payload)

    def _work(self, payload: JobPayload) -> None:
        try:
            if self._cancelled:
                reply = JobReply(payload.key, False, None, "cancelled before it started")
            else:
                def report(done: int, total: int) -> None:
                    with self._lock:
                        self._progress[payload.key] = (done, total)

                reply = run_job(payload, report, pool=self.pool)
        except BaseException as exc:  # never lose a reply: completed() waits for every one
            reply = JobReply(payload.key, False, None, f"the replay job failed in its worker thread: {exc!r}")
        with self._lock:
            self._progress.pop(payload.key, None)
        self._replies.put(reply)

    def completed(self) -> Iterator[JobReply]:
        """Each reply as its job ends, until every submitted job has replied."""
        while True:
            with self._lock:
                if not self._pending:
                    return
            reply = self._replies.get()
            with self._lock:
                self._pending.discard(reply.key)
            yield reply

    def progress(self) -> Mapping[str, tuple[int, int]]:
        """``key -> (done, total)`` of the jobs running now."""
        with self._lock:
            return dict(self._progress)

    def cancel(self) -> None:
        """Kill every running job's processes; queued jobs reply 'cancelled' without starting."""
        self._cancelled = True
        with self._lock:
            keys = set(self._pending)
        cancel_jobs(keys)

    def close(self) -> tuple[str, ...]:
        """Wait for the threads (after a cancel they end at once), let go of the warm servers."""
        self._threads.shutdown(wait=True)
        servers = self.pool.close() if self.pool is not None else []
        return (*self._notes, *(
            f"the warm replay server (pid {server.pid}) stays up for {format_seconds(server.idle)} of idle time "
            "so the next replay starts warm; 'flordb-build warm stop' ends it now"
            for server in servers
        ))
