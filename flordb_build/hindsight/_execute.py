"""Executing a replay plan: one process per run (per segment with workers), then the checks.

    run_replay(plan)
      for each run, its segments in parallel:   executor(job, progress) -> JobResult
        SubprocessExecutor:
          1. before the run's first job: the store shows the run's newest replay journal
          2. git archive <snapshot> -> tmp/tree        (never the user's work tree)
          3. write the patched script at tmp/tree/<filename>
          4. sys.executable <script> --kwargs <recorded args>, cwd tmp/tree,
             FLOR_REPLAY=<spec>: the script's flordb_build stages its values (session's staging)
          5. compare what it logged with what was recorded (nondeterminism check)
      decide(outcome): finish or withhold the run    (_backfill.py: the one decision point)
      executor.finish_run: journal, then promote the staged values in one transaction; or drop them
      -> RunOutcome per run: estimated vs actual seconds, mismatches, errors, why withheld
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

from ..config import Config, load_config
from ..errors import FlorBuildError, WarmStartError
from ..redaction import contains_mask
from ..values import decode_value
from ._backfill import Backfill, Decision, decide
from ._child import MODULE as CHILD_MODULE
from ._child import PREPARE
from ._model import (
    DEFAULT_REL_TOL,
    GENERATORS,
    PROGRESS_FD_ENV,
    REPLAY_ENV,
    JobResult,
    Mismatch,
    ReplayJob,
    ReplayPlan,
    ReplayReport,
    ReplaySpec,
    RunOutcome,
    RunPlan,
)

if TYPE_CHECKING:
    from ._warm import WarmProcess

Progress = Callable[[int, int], None]
#: Recorded environment variables a replay does not take over (they name this replay's own setup).
_NOT_RESTORED_PREFIXES = ("FLOR_", "VIRTUAL_ENV", "CONDA_")


class ReplayExecutor(Protocol):
    """Runs one replay job; ``progress(done, total)`` reports main-loop iterations.

    An executor may also have ``cancel()`` (kill what runs: the session was interrupted) and
    ``finish_run(run, decision) -> decision`` (after all jobs of a run: :class:`SubprocessExecutor`
    journals and promotes the run's staged values there, or drops them, and says what it did).
    """

    def __call__(self, job: ReplayJob, progress: Progress) -> JobResult: ...


# -- the plan as jobs -----------------------------------------------------------------------------


def jobs_of(run: RunPlan, device: str) -> list[ReplayJob]:
    """One job per segment of ``run`` (one job unless a range or validation scan is split across workers)."""
    from ._plan import schedule_scan

    split = len(run.segments) > 1
    return [
        ReplayJob(
            run=run,
            worker=worker,
            segment=segment if split else None,
            schedule=schedule_scan(run.depth, run.iterations, run.checkpointed, segment if split else None, run.nested),
            device=device,
            estimate=run.segment_estimates[worker],
        )
        for worker, segment in enumerate(run.segments)
    ]


def run_replay(
    plan: ReplayPlan,
    executor: ReplayExecutor | None = None,
    *,
    config: Config | None = None,
    progress: Callable[[RunPlan, int, int], None] | None = None,
    rel_tol: float = DEFAULT_REL_TOL,
    warm: bool | None = None,
    accept_divergent: bool = False,
) -> ReplayReport:
    """Execute ``plan``: runs one after another, the segments of a run in parallel processes.

    :param executor: runs one job; default :class:`SubprocessExecutor` for the project.
    :param progress: called with (run, iterations done, iterations total) as replays advance.
    :param warm: fork processes from warm servers (None: the project's setting, on by default).
    :param accept_divergent: write a run's values although values both the record and the replay
        logged differ beyond ``rel_tol`` (marked divergent); by default they are withheld.
    """
    owned = executor is None
    if executor is None:
        executor = SubprocessExecutor(config or load_config(), rel_tol=rel_tol, warm=warm)
    notes: tuple[str, ...] = ()
    try:
        decider = functools.partial(decide, rel_tol=rel_tol, accept_divergent=accept_divergent)
        outcomes = [_replay_run(run, jobs_of(run, plan.device), executor, progress, decider) for run in plan.runs]
    finally:
        if owned:
            notes = executor.close()  # type: ignore[attr-defined]
    return ReplayReport(plan=plan, outcomes=tuple(outcomes), notes=notes)


def _replay_run(
    run: RunPlan,
    jobs: Sequence[ReplayJob],
    executor: ReplayExecutor,
    progress: Callable[[RunPlan, int, int], None] | None,
    decider: Callable[[RunOutcome], Decision] = decide,
) -> RunOutcome:
    """Run the jobs of one run (in parallel threads that wait on their processes)."""
    done = [0] * len(jobs)
    total = sum(len(job.schedule.steps) for job in jobs)
    lock = threading.Lock()

    def reporter(worker: int) -> Progress:
        def report(n_done: int, _n_total: int) -> None:
            with lock:
                done[worker] = n_done
                if progress is not None:
                    progress(run, sum(done), total)

        return report

    started = time.perf_counter()
    if progress is not None:
        progress(run, 0, total)
    if len(jobs) == 1:
        results = [executor(jobs[0], reporter(0))]
    else:
        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            futures = [pool.submit(executor, job, reporter(i)) for i, job in enumerate(jobs)]
            try:
                results = [future.result() for future in futures]
            except BaseException:
                # Ctrl-C reaches this thread only: end the processes the worker threads wait on,
                # or the pool's shutdown would wait for whole replays.
                cancel = getattr(executor, "cancel", None)
                if cancel is not None:
                    cancel()
                raise
    outcome = _outcome(run, results, time.perf_counter() - started)
    decision = decider(outcome)
    finish = getattr(executor, "finish_run", None)
    if finish is not None:
        decision = finish(run, decision)
    # The run's bookkeeping (its journal commit and promotion) is part of what it cost.
    return dataclasses.replace(
        outcome, ok=outcome.ok and decision.finish, withheld=decision.withheld, seconds=time.perf_counter() - started,
        divergent=decision.finish and bool(decision.divergent),
    )


def _outcome(run: RunPlan, results: Sequence[JobResult], seconds: float) -> RunOutcome:
    counters: dict[str, int] = {}
    for result in results:
        for key, value in result.counters.items():
            counters[key] = counters.get(key, 0) + int(value)
    return RunOutcome(
        run_id=run.run_id,
        estimate=run.estimate,
        seconds=seconds,
        ok=all(r.ok for r in results),
        stored=sum(r.stored for r in results),
        errors=tuple(f"worker {r.worker}: {r.error}" if len(results) > 1 else str(r.error) for r in results if r.error),
        notes=tuple(dict.fromkeys(note for r in results for note in r.notes)),
        mismatches=merge_mismatches([m for r in results for m in r.mismatches]),
        counters=counters,
        warm=all(r.warm for r in results),
    )


# -- nondeterminism check -------------------------------------------------------------------------


def values_match(recorded: Any, replayed: Any, rel_tol: float = DEFAULT_REL_TOL) -> bool:
    """Exact for ints, strings and bools; relative tolerance for floats; recursive for lists and dicts.

    A recorded None matches a replayed NaN: SQLite stores a float NaN as NULL, so a NaN the record
    logged reads back as None (and a logged None is stored the same way: neither is kept apart).
    """
    if recorded is None and isinstance(replayed, float) and math.isnan(replayed):
        return True
    if isinstance(recorded, float) or isinstance(replayed, float):
        if isinstance(recorded, bool) or isinstance(replayed, bool):
            return recorded == replayed
        if not isinstance(recorded, int | float) or not isinstance(replayed, int | float):
            return False
        if math.isnan(recorded) and math.isnan(replayed):
            return True
        return math.isclose(recorded, replayed, rel_tol=rel_tol, abs_tol=0.0) or recorded == replayed
    if isinstance(recorded, list) and isinstance(replayed, list):
        return len(recorded) == len(replayed) and all(
            values_match(a, b, rel_tol) for a, b in zip(recorded, replayed, strict=True)
        )
    if isinstance(recorded, dict) and isinstance(replayed, dict):
        return recorded.keys() == replayed.keys() and all(values_match(recorded[k], replayed[k], rel_tol) for k in recorded)
    return type(recorded) is type(replayed) and bool(recorded == replayed)


def compare_values(
    run_id: str,
    recorded: Mapping[tuple[int, str], Sequence[Any]],
    replayed: Mapping[tuple[int, str], Sequence[Any]],
    describe: Callable[[int], str] = str,
    rel_tol: float = DEFAULT_REL_TOL,
) -> tuple[Mismatch, ...]:
    """Per name: how many values logged at the same context (in the same order) differ.

    The names come in the order of their first difference (contexts in the order the run made
    them), so the first mismatch is the earliest point where the replay left the record.
    """
    stats: dict[str, list[Any]] = {}
    for key in sorted(replayed.keys() & recorded.keys()):
        ctx, name = key
        entry = stats.setdefault(name, [0, 0, "", (math.inf, "")])
        for old, new in zip(recorded[key], replayed[key], strict=False):
            entry[0] += 1
            if not values_match(old, new, rel_tol):
                entry[1] += 1
                if not entry[2]:
                    entry[2] = f"{describe(ctx)}: recorded {old!r}, replayed {new!r}"
                    entry[3] = (ctx, name)
    differing = sorted((entry[3], name) for name, entry in stats.items() if entry[1])
    return tuple(Mismatch(run_id, name, *stats[name][:3]) for _first, name in differing)


def merge_mismatches(mismatches: Sequence[Mismatch]) -> tuple[Mismatch, ...]:
    """One mismatch per (run, name) across the workers of a run."""
    merged: dict[tuple[str, str], Mismatch] = {}
    for m in mismatches:
        prev = merged.get((m.run_id, m.name))
        merged[(m.run_id, m.name)] = m if prev is None else Mismatch(
            m.run_id, m.name, prev.compared + m.compared, prev.differing + m.differing, prev.example
        )
    return tuple(merged.values())


# -- running a job in a process ---------------------------------------------------------------------


class SubprocessExecutor:
    """Runs each job as ``sys.executable <patched script>`` in an exported snapshot.

    With warm starts on (the default, ``_warm.py``) the process is forked from a server that has
    imported the script's libraries; where that cannot be done the job starts a fresh interpreter.
    """

    def __init__(
        self, config: Config, *, rel_tol: float = DEFAULT_REL_TOL, keep_dirs: bool = False, warm: bool | None = None
    ) -> None:
        from ._warm import WarmPool, warm_settings

        self.config = config
        self.rel_tol = rel_tol
        self.keep_dirs = keep_dirs
        self.links = replay_links(config)
        self.import_paths = project_import_paths(config.root)
        self._begun: set[str] = set()
        self._lock = threading.Lock()
        self._running: set[WarmProcess | subprocess.Popen[bytes]] = set()
        self._cancelled = False
        enabled, keep_warm = warm_settings(config)
        self.pool: WarmPool | None = None
        self._pool_note: str | None = None
        if enabled if warm is None else warm:
            try:
                self.pool = WarmPool(config, keep_warm)
            except WarmStartError as exc:
                self._pool_note = f"started cold: {exc}"
        self.backfill = Backfill(config)  # last: it holds the session's lock until close()

    def cancel(self) -> None:
        """Kill every replay process still running, and any that starts from now on (an interrupted session)."""
        with self._lock:
            self._cancelled = True
            running = list(self._running)
        for proc in running:
            with contextlib.suppress(OSError):
                proc.kill()

    def finish_run(self, run: RunPlan, decision: Decision) -> Decision:
        """Journal and promote the run's staged values, or drop them (``_backfill.py``); what was done."""
        from ._costs import record_costs

        started = time.perf_counter()
        try:
            done = self.backfill.settle(run, decision)
        except FlorBuildError as exc:  # the store or git refused before anything of the run was written
            return Decision(withheld=f"its values could not be written: {exc}")
        if done.finish:
            record_costs(self.config, run.script, {"journal": time.perf_counter() - started})
        return done

    def close(self) -> tuple[str, ...]:
        """End of the session: drop its staging, let go of the warm servers; a note for each one that stays up."""
        try:
            self.backfill.close()
        finally:
            servers = self.pool.close() if self.pool is not None else []
        return tuple(
            f"the warm replay server (pid {server.pid}) stays up for {format_seconds(server.idle)} of idle time "
            "so the next replay starts warm; 'flordb-build warm stop' ends it now"
            for server in servers
        )

    def __call__(self, job: ReplayJob, progress: Progress) -> JobResult:
        """Replay one job; errors of the script or of the setup come back in the result."""
        started = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f"flor-replay-{job.run.run_id[:8]}-"))
        try:
            with self._lock:
                if job.run.run_id not in self._begun:
                    self.backfill.begin_run(job.run.run_id)
                    self._begun.add(job.run.run_id)
            return self._execute(job, tmp, progress, started)
        except FlorBuildError as exc:
            return JobResult(job.run.run_id, job.worker, False, time.perf_counter() - started, error=str(exc))
        finally:
            if not self.keep_dirs:
                shutil.rmtree(tmp, ignore_errors=True)

    def _execute(self, job: ReplayJob, tmp: Path, progress: Progress, started: float) -> JobResult:
        from ..snapshot import export_snapshot

        run = job.run
        tree = tmp / "tree"
        export_snapshot(self.config.root, run.snapshot, tree)
        script = tree / run.script
        script.parent.mkdir(parents=True, exist_ok=True)
        script.write_text(run.source, encoding="utf-8")
        for path, text in run.modules.items():  # the project's other modules, with their new statements
            (tree / path).parent.mkdir(parents=True, exist_ok=True)
            (tree / path).write_text(text, encoding="utf-8")
        self._link_inputs(tree)
        result_path = tmp / "result.json"
        read_fd, write_fd = os.pipe()
        spec = ReplaySpec(
            run_id=run.run_id, depth=run.depth.value, names=run.names, main_loop=run.main_loop,
            schedule=job.schedule, device=job.device, db=str(self.config.db_path), root=str(self.config.root),
            projid=self.config.projid, filename=run.script, task=run.task, args=run.args,
            session=self.backfill.session, worker=job.worker,
            result=str(result_path), progress_fd=write_fd,
        )
        env = self._environment(run, spec, job.device)
        # The project's own packages import from the snapshot (an editable install points at today's tree).
        snapshot_paths = [tree / p for p in self.import_paths]
        child_env = with_snapshot_paths(env, tree, self.import_paths)
        # The recorded flags first (the script's own argparse reads them), then the recorded --kwargs.
        argv = [str(script), *run.argv, *kwargs_tokens(run.args)]
        notes: list[str] = [self._pool_note] if self._pool_note else []
        with open(tmp / "output.log", "wb") as output:
            try:
                forked, fresh_server = self._start_warm(
                    run, spec, argv, tree, env, child_env, snapshot_paths, output.fileno(), write_fd, tmp, notes
                )
                warm = forked is not None
                proc: WarmProcess | subprocess.Popen[bytes]
                if forked is not None:
                    proc = forked
                else:
                    proc = subprocess.Popen(
                        [sys.executable, "-m", CHILD_MODULE, *argv], cwd=tree, env=child_env, stdout=output, stderr=subprocess.STDOUT,
                        pass_fds=(write_fd,),
                    )
            finally:
                os.close(write_fd)
            reader = threading.Thread(target=_read_progress, args=(read_fd, progress), daemon=True)
            reader.start()
            with self._lock:
                self._running.add(proc)
                if self._cancelled:  # cancelled while this job was starting: it must not run on
                    proc.kill()
            try:
                code = proc.wait()
            except BaseException:
                proc.kill()  # Ctrl-C: a warm child is in another session, so the terminal does not stop it
                raise
            finally:
                with self._lock:
                    self._running.discard(proc)
            reader.join()
        seconds = time.perf_counter() - started
        outcome = json.loads(result_path.read_text(encoding="utf-8")) if result_path.exists() else None
        imported = _read_modules(tmp / "modules.json") if warm else []
        if warm and self.pool is not None:
            self.pool.learn(env, imported)
        if code == 0 and outcome is not None and outcome.get("status") == "ok":
            self._learn_costs(run, outcome, seconds, warm, fresh_server, imported)
        if code != 0 or outcome is None or outcome.get("status") != "ok":
            tail = _tail(tmp / "output.log")
            reason = (outcome or {}).get("error") or f"exit status {code}"
            return JobResult(
                run.run_id, job.worker, False, seconds,
                error=f"the replayed script failed ({reason}); its last output:\n{tail}",
                notes=tuple([*notes, *(outcome or {}).get("notes", ())]), warm=warm,
            )
        mismatches = self._compare(run, outcome["compare"])
        if outcome.get("generators"):  # issue 12.9: the record's checkpoints are another trajectory now
            mismatches = (Mismatch(run.run_id, GENERATORS, 1, 1, str(outcome["generators"])), *mismatches)
        counters = dict(outcome["counters"])
        if warm:
            counters["modules_imported"] = len(imported)  # installed modules the server had not preloaded
        return JobResult(
            run.run_id, job.worker, True, seconds, stored=int(counters.get("stored", 0)),
            notes=tuple([*notes, *outcome.get("notes", ())]), counters=counters, mismatches=mismatches, warm=warm,
        )

    def _start_warm(
        self, run: RunPlan, spec: ReplaySpec, argv: list[str], tree: Path, env: dict[str, str],
        child_env: dict[str, str], snapshot_paths: Sequence[Path], output: int, progress_fd: int, tmp: Path,
        notes: list[str],
    ) -> tuple[WarmProcess | None, bool]:
        """Fork the job from a warm server: (the process, whether this job waited for the server to start).

        ``env`` picks the server (it holds nothing of this job's temporary tree); the child gets
        ``child_env`` and ``snapshot_paths`` on its ``sys.path``. ``(None, False)`` and a note when
        the job must start a fresh interpreter instead.
        """
        if self.pool is None:
            return None, False
        # The child finds its progress descriptor in PROGRESS_FD_ENV: a free number there, not ours.
        child_env = {**child_env, REPLAY_ENV: dataclasses.replace(spec, progress_fd=None).to_json()}
        try:
            server, fresh = self.pool.server_for(env, run.source)
            process = server.run(
                argv, tree, child_env, {1: output, 2: output}, {PROGRESS_FD_ENV: progress_fd},
                preload=self.pool.learned(env), modules_out=tmp / "modules.json", exclude=(self.config.root,),
                path_prepend=snapshot_paths, prepare=PREPARE,
            )
            return process, fresh
        except (WarmStartError, OSError) as exc:  # a warm start is an optimisation: never fail a replay on it
            note = f"started cold: {exc}"
            if note not in notes:
                notes.append(note)
            return None, False

    def _learn_costs(
        self, run: RunPlan, outcome: Mapping[str, Any], seconds: float, warm: bool, fresh_server: bool,
        imported: Sequence[str],
    ) -> None:
        """Feed what this job's start cost into the next plan's estimates (``_costs.py``)."""
        from ._costs import record_costs

        process = outcome.get("process_seconds")
        prefix = outcome.get("prefix_seconds")
        figures: dict[str, float] = {}
        if isinstance(process, int | float) and process > 0 and not fresh_server:
            # A job that waited for its server to start measured that start, not a fork.
            figures["overhead_warm" if warm else "overhead_cold"] = seconds - process
        if warm and not imported and isinstance(prefix, int | float) and run.recorded_prefix > 0:
            # Only a fully warm child (it imported nothing the server lacked) shows the whole saving.
            figures["saving"] = run.recorded_prefix - prefix
        record_costs(self.config, run.script, figures)

    def _environment(self, run: RunPlan, spec: ReplaySpec, device: str) -> dict[str, str]:
        env = replay_environment(self.config, run.run_id, run.task, device)
        env[REPLAY_ENV] = spec.to_json()
        return env

    def _link_inputs(self, tree: Path) -> None:
        """Symlink the inputs named by ``replay_links`` (ignored data the snapshot lacks)."""
        for relative in self.links:
            source = self.config.root / relative
            target = tree / relative
            if source.exists() and not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(source, target_is_directory=source.is_dir())

    def _compare(self, run: RunPlan, replayed_rows: Sequence[Sequence[Any]]) -> tuple[Mismatch, ...]:
        replayed: dict[tuple[int, str], list[Any]] = {}
        for ctx, name, stored, kind in replayed_rows:
            replayed.setdefault((int(ctx), str(name)), []).append(decode_value(stored, int(kind)))
        if not replayed:
            return ()
        recorded, describe = read_recorded(self.config, run.run_id, sorted({name for _c, name in replayed}))
        return compare_values(run.run_id, recorded, replayed, describe, self.rel_tol)


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


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no output)"
    return "\n".join(text.rstrip().splitlines()[-lines:]) or "(no output)"


def replay_environment(config: Config, run_id: str, task: str | None, device: str) -> dict[str, str]:
    """A replay process's environment, but for its spec: ours, with the run's recorded variables."""
    env = dict(os.environ)
    for name in ("FLOR_PIPELINE_ID", "FLOR_MAKE_PIPELINE_ID"):
        env.pop(name, None)
    for name, value in recorded_env_vars(config, run_id).items():
        if name.startswith(_NOT_RESTORED_PREFIXES):
            continue
        if device != "auto" and name in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"):
            continue  # the replay chose its device
        if contains_mask(value):
            continue  # recorded with a password masked: the replaying command's own value stays
        env[name] = value
    if task:
        env["FLOR_TASK"] = task
    # Reads of the store from inside the script (flor.dataframe) see the project's store.
    env["FLORDB_BUILD_DB"] = str(config.db_path)
    return env


def project_import_paths(root: Path) -> list[Path]:
    """``sys.path`` entries inside the project, relative to its root, in order (not the script's own dir).

    They come from ``PYTHONPATH`` or from the ``.pth`` file of an editable install of the project's
    own package: a replay must import that code from the run's snapshot, not from today's tree.
    """
    root = root.resolve()
    found: list[Path] = []
    for entry in sys.path[1:]:  # [0] is this process's own script or working directory
        try:
            relative = Path(entry).resolve().relative_to(root)
        except (ValueError, OSError):
            continue
        if relative not in found:
            found.append(relative)
    return found


def with_snapshot_paths(env: Mapping[str, str], tree: Path, paths: Sequence[Path]) -> dict[str, str]:
    """``env`` with the snapshot's counterparts of ``paths`` first on ``PYTHONPATH``."""
    mapped = [str(tree / p) for p in paths]
    if not mapped:
        return dict(env)
    existing = [e for e in env.get("PYTHONPATH", "").split(os.pathsep) if e]
    return {**env, "PYTHONPATH": os.pathsep.join([*mapped, *existing])}


def kwargs_tokens(args: Mapping[str, Any]) -> list[str]:
    """``--kwargs name=value ...`` reproducing the recorded args (JSON for non-strings)."""
    if not args:
        return []
    return ["--kwargs", *(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in args.items())]


def replay_links(config: Config) -> tuple[str, ...]:
    """``[tool.flordb_build] replay_links``: project paths linked into replay directories."""
    return config.replay_links


def recorded_env_vars(config: Config, run_id: str) -> dict[str, str]:
    """The environment variables recorded with the run's environment (none if unknown)."""
    from ..environment import load_environment
    from ..store import Store

    store = Store.open(config)
    try:
        row = store.conn.execute("SELECT env_id FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        env = load_environment(store, row[0]) if row and row[0] else None
    finally:
        store.close()
    variables = (env or {}).get("env_vars") or {}
    return {str(k): str(v) for k, v in variables.items()}


def read_recorded(
    config: Config, run_id: str, names: Sequence[str]
) -> tuple[dict[tuple[int, str], list[Any]], Callable[[int], str]]:
    """Recorded values of ``names`` by (ctx, name) in log order, and a describer of contexts."""
    from ..store import Store, loop_contexts

    store = Store.open(config)
    try:
        recorded: dict[tuple[int, str], list[Any]] = {}
        for name in names:
            rows = store.conn.execute(
                "SELECT ctx_id, value, kind FROM logs WHERE run_id = ? AND name = ? AND source = 'record' ORDER BY seq",
                (run_id, name),
            ).fetchall()
            for ctx, value, kind in rows:
                recorded.setdefault((int(ctx), name), []).append(decode_value(value, kind))
        loops = {
            int(ctx): (int(parent), str(loop), int(iteration))
            for ctx, parent, loop, iteration, _value in loop_contexts(store.conn, run_id)
        }
    finally:
        store.close()

    def describe(ctx: int) -> str:
        parts = []
        while ctx in loops:
            parent, loop, iteration = loops[ctx]
            parts.append(f"{loop} {iteration}")
            ctx = parent
        return ", ".join(reversed(parts)) or "run level"

    return recorded, describe


# -- what the user sees ---------------------------------------------------------------------------


def format_seconds(seconds: float) -> str:
    """``0.42s``, ``12.3s``, ``4m05s``."""
    if seconds < 10:
        return f"{seconds:.2f}s"
    if seconds < 120:
        return f"{seconds:.1f}s"
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines)


def format_placements(plan: ReplayPlan, diff: bool = False) -> str:
    """Per run, where each statement went in its version (line, depth, anchor); with ``diff``, the
    unified diff of the recorded script against what the replay runs."""
    parts: list[str] = []
    for run in plan.runs:
        for placed in run.placed:
            parts.append(
                f"placed: run {run.run_id} ({run.version}): '{placed.name}' at {placed.path or run.script}:{placed.line} "
                f"({placed.position.value}), {placed.anchor}"
            )
        if diff:
            versions = [(run.script, run.old_source, run.source)]
            versions += [(path, run.old_modules.get(path, ""), text) for path, text in run.modules.items()]
            for path, before, after in versions:
                parts.extend(line.rstrip("\n") for line in difflib.unified_diff(
                    before.splitlines(keepends=True), after.splitlines(keepends=True),
                    fromfile=f"{path} @ {run.version} (recorded)", tofile=f"{path} @ {run.version} (replayed)",
                ))
    return "\n".join(parts)


def format_plan(plan: ReplayPlan) -> str:
    """The plan as a table (run, task, script, version, depth, estimate), notes, and the total."""
    rows = [
        [run.run_id, run.task or "-", run.script, run.version, run.depth.value
         + (f" x{len(run.segments)}" if len(run.segments) > 1 else ""), format_seconds(run.estimate)]
        for run in plan.runs
    ]
    parts = [f"replay {', '.join(plan.names)}: {len(plan.runs)} run(s)"]
    if rows:
        parts.append(_table(["run", "task", "script", "version", "depth", "estimate"], rows))
    for run in plan.runs:
        for missing in run.not_placed:
            parts.append(f"note: run {run.run_id} ({run.version}): '{missing.name}' not placed: {missing.reason}")
    unaffected = [s for s in plan.skipped if s.unaffected]
    for skipped in plan.skipped:
        if skipped not in unaffected:
            parts.append(f"skip: run {skipped.run_id} ({skipped.script}): {skipped.reason}")
    if unaffected:
        parts.append(f"({len(unaffected)} selected run(s) not affected: their script does not log these names today)")
    parts.append(f"total estimate: {format_seconds(plan.estimate)}")
    return "\n".join(parts)


def format_report(report: ReplayReport) -> str:
    """Estimated vs actual seconds per run, then errors, withheld values and nondeterminism warnings."""
    rows = [
        [o.run_id, ("divergent" if o.divergent else "ok") if o.ok else "FAILED", "warm" if o.warm else "cold",
         "withheld" if o.withheld is not None else str(o.stored),
         format_seconds(o.estimate), format_seconds(o.seconds),
         f"{(o.seconds - o.estimate) / o.estimate:+.0%}" if o.estimate > 0 else "-"]
        for o in report.outcomes
    ]
    parts = [_table(["run", "status", "start", "values", "estimated", "actual", "error"], rows)] if rows else []
    for outcome in report.outcomes:
        for error in outcome.errors:
            parts.append(f"error: run {outcome.run_id}: {error}")
        if outcome.withheld is not None:
            parts.append(
                f"withheld: run {outcome.run_id}: none of its replayed values were written, so it shows what it "
                f"showed before the replay: {outcome.withheld}"
            )
        if outcome.divergent:
            parts.append(
                f"divergent: run {outcome.run_id}: its replayed values were written as --accept-divergent asks, "
                "marked divergent (table replay_divergent; 'flordb-build runs' shows them)"
            )
        for note in outcome.notes:
            parts.append(f"note: run {outcome.run_id}: {note}")
    for m in report.mismatches:
        if m.name == GENERATORS:  # not nondeterminism: the statements' own draws (withheld or divergent above)
            continue
        parts.append(
            f"warning: nondeterminism in run {m.run_id}: '{m.name}' differs in {m.differing} of {m.compared} "
            f"values recorded and replayed (first at {m.example})"
        )
    parts.extend(f"note: {note}" for note in report.notes)
    if report.nothing_replayed is not None:
        parts.append(report.nothing_replayed)
    return "\n".join(parts)


class ProgressLine:
    """A one-line progress bar per run on a stream (redrawn in place on a terminal)."""

    def __init__(self, stream: IO[str] | None = None, width: int = 24) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last: dict[str, int] = {}
        self._started: dict[str, float] = {}

    def __call__(self, run: RunPlan, done: int, total: int) -> None:
        """Draw ``run``'s progress (on a pipe: only the start and the end)."""
        now = time.perf_counter()
        started = self._started.setdefault(run.run_id, now)
        finished = total > 0 and done >= total or total == 0 and done > 0
        if not self.tty and self._last.get(run.run_id) is not None and not finished:
            return
        if self._last.get(run.run_id) == done and run.run_id in self._last and not finished:
            return
        self._last[run.run_id] = done
        filled = int(self.width * done / total) if total else (self.width if finished else 0)
        bar = "#" * filled + "-" * (self.width - filled)
        line = (f"replay {run.run_id} {run.depth.value:<10} [{bar}] {done}/{total} {run.main_loop or 'steps'}"
                f"  {format_seconds(now - started)} of ~{format_seconds(run.estimate)}")
        if self.tty:
            self.stream.write("\r" + line + ("\n" if finished else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
