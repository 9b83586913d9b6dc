"""Replay mode: the runtime of a script that ``flordb-build replay`` runs on a recorded version.

A replay child starts through ``python -m flordb_build.hindsight.child script.py ...``
(child.py), which installs :func:`start_replay_run` as the session's run starter
(``runtime.Session.use_run_starter``) before the script runs. The script's first ``flor`` call
then starts a :class:`ReplayRun` instead of a recorded run. A replay run records nothing new: no
run row, no journal, no snapshot. It is composed of the recording layer's public parts (a
``recorder.Recorder`` for the values it keeps, a ``recorder.Flusher`` that stages them) and

- answers ``flor.arg`` with the values the run recorded (``device`` as the replay asks);
- maps each loop iteration to the recorded context of the same (parent, loop, occurrence,
  index), so replayed values land in the original run's rows, with ``source = 'replay'``,
  once the driver promotes them: the process writes into its session's staging (``_staging.py``),
  which no reader sees, so a run's backfill is all or nothing (``_backfill.py``);
- stores only the requested names, and only in the parts of the script this process owns
  (a range worker owns its segment); every other value goes to the result file, where the
  parent compares it with what was recorded (the nondeterminism check);
- drives the main loop by the :class:`Schedule` of the plan::

      SKIP      element consumed, body not run      RESTORE   checkpoint restored, body not run
      SILENT    body run in full, values dropped     FULL      body run in full, values kept
      VALIDATE  body run, nested flor.loops yield nothing; the iteration's checkpoint of the point
                where the first of them ended is restored there; the rest of the body runs once

  and compares its random generators with the record's after each iteration it runs
  (``_generators.py``): a VALIDATE step where nothing recorded them runs as FULL, and a run whose
  statements drew before a restore is reported for withholding (issue 12.9).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from ..args import resolve_arg
from ..checkpoints import CheckpointPoint, RecordedGenerators
from ..config import Config, config_of_root
from ..errors import ArgError, ReplayError
from ..recorder import LOOP_CONTEXT, ROOT_CTX, Flusher, Recorder
from ..recording import LoopObserver, load_params, process_age
from ..redaction import contains_mask, redact_value
from ..store import Store, coalesce_loops, loop_contexts
from ..values import encode_value, simple_loop_value
from ._generators import GeneratorCheck
from ._model import PROGRESS_FD_ENV, REPLAY_ENV, ReplaySpec, Step, StepKind
from ._staging import stage_batch

T = TypeVar("T")
_NATIVE_TYPES = (int, float, str)
#: Replay log rows of different workers of one run must not share a ``seq``.
SEQ_STRIDE = 10**12
#: Contexts a replay creates (iterations the record does not have) get ids above the recorded ones.
CTX_STRIDE = 10**9


class RecordedContexts:
    """The recorded loop contexts of a run, looked up by (parent, loop name, occurrence, index)."""

    def __init__(self, rows: Iterable[tuple[int, int, str, int]]) -> None:
        # rows: (ctx_id, parent_ctx, name, iteration). A loop that runs twice under the same parent
        # (two `step` loops in one epoch) restarts its index: that starts a new occurrence.
        self._table: dict[tuple[int, str], list[dict[int, int]]] = {}
        self.max_ctx = ROOT_CTX
        for ctx, parent, name, iteration in sorted(rows):
            occurrences = self._table.setdefault((parent, name), [])
            if not occurrences or iteration in occurrences[-1]:
                occurrences.append({})
            occurrences[-1][iteration] = ctx
            self.max_ctx = max(self.max_ctx, ctx)

    def find(self, parent: int, name: str, occurrence: int, index: int) -> int | None:
        """The recorded ctx id, or None when the record has no such iteration."""
        occurrences = self._table.get((parent, name), [])
        if occurrence >= len(occurrences):
            return None
        return occurrences[occurrence].get(index)


_CTX = LOOP_CONTEXT


class ReplayRun:
    """A replay of one recorded run (see the module docstring); the session's run in a replay child."""

    def __init__(self, config: Config, store: Store, spec: ReplaySpec, kwargs: dict[str, str]) -> None:
        self.config = config
        self.store = store
        self.run_id = spec.run_id
        self.filename = spec.filename
        self.kwargs = kwargs
        self.spec = spec
        self.names = frozenset(spec.names)
        self.args: dict[str, Any] = {}
        self.args_asked: set[str] = set()
        self.failure: tuple[str, int] | None = None
        self.interrupted = False
        #: The flor.checkpointing block's observer: replay uses its objects to restore checkpoints.
        self.checkpointer: LoopObserver | None = None
        self.started = time.time()
        rows = loop_contexts(store.conn, spec.run_id)  # loops rows are blocks of contexts
        self.contexts = RecordedContexts((ctx, parent, name, iteration) for ctx, parent, name, iteration, _v in rows)
        # The replayed values to keep, and contexts the record lacks; worker ranges keep seqs and
        # new context ids of different workers of one run apart.
        self.recorder = Recorder(
            seq_start=spec.worker * SEQ_STRIDE + 1, ctx_start=self.contexts.max_ctx + 1 + spec.worker * CTX_STRIDE
        )
        self._flush_lock = threading.Lock()
        self._flusher = Flusher(self.flush, config.flush_seconds, self._note_stage_failure)
        self._closed = False
        self._param_values: dict[str, Any] | None = None
        self._occurrences: dict[tuple[int, str], int] = {}  # flor.loop runs per (parent, name)
        self._driven: dict[tuple[int, str], int] = {}  # next index of flor.iteration per (parent, name)
        self._keeping = spec.schedule.writes_prefix  # store requested names logged now
        self._compare: list[tuple[int, str, Any, int]] = []
        self._main_seen = False
        self._skip_nested = False
        self._pending_restore: int | None = None
        #: Issue 12.9's comparison of the generators with the record's, once the main loop starts.
        self.generator_check: GeneratorCheck | None = None
        self._device: str | None = None
        self._progress_fd = spec.progress_fd
        if self._progress_fd is None and os.environ.get(PROGRESS_FD_ENV, "").isdigit():
            self._progress_fd = int(os.environ[PROGRESS_FD_ENV])  # a warm start put it at a free number
        self._prefix_seconds: float | None = None
        #: The replay's working tree (the child starts in it): restored files are written here.
        self.tree = Path.cwd()
        self.notes: list[str] = []
        self.counters = {"restores": 0, "nested_skipped": 0, "nested_run": 0, "iterations_run": 0,
                         "iterations_validated": 0, "iterations_skipped": 0, "stored": 0}
        self._result_lock = threading.Lock()

    # -- values -----------------------------------------------------------------------------

    def log(self, name: str, value: T) -> T:
        """Keep a requested name for the store, anything else for the comparison, as the schedule says."""
        self.recorder.admit_value_name(name)
        if name in self.names:
            if self._keeping:
                self.recorder.log(name, value)
                self.counters["stored"] += 1
        elif name not in self.spec.args:
            stored: Any = value
            kind = 0
            if type(value) not in _NATIVE_TYPES:
                stored, value_kind = encode_value(value)
                kind = int(value_kind)
            self._compare.append((_CTX.get(), name, stored, kind))
        return value

    def arg(self, name: str, default: Any = None) -> Any:
        """The value the replayed run recorded for ``name``; ``device`` as the replay asks; a name
        the record lacks as a recording run would read it (``--kwargs``, params file, default)."""
        self.args_asked.add(name)
        if name in self.args:
            return self.args[name]
        if name == "device":
            value: Any = self.device()
        elif name in self.spec.args and contains_mask(self.spec.args[name]):
            value = self._masked_arg(name, default)
        elif name in self.spec.args:
            value = self.spec.args[name]
            if isinstance(default, tuple) and isinstance(value, list):
                value = tuple(value)
        else:
            value = resolve_arg(name, default, self.kwargs, self._params)
            self.args[name] = value
            token = _CTX.set(ROOT_CTX)  # compared with the record like any value the replay logs
            try:
                self.log(name, redact_value(name, value))
            finally:
                _CTX.reset(token)
            return value
        self.args[name] = value
        return value

    def _params(self) -> dict[str, Any]:
        if self._param_values is None:
            self._param_values = load_params(self.config)
        return self._param_values

    def _masked_arg(self, name: str, default: Any) -> Any:
        """A secret arg is recorded masked (redaction.py): the replay takes the script's default, which
        the replaying process evaluates (e.g. from its own environment), and says so; never the mask."""
        if default is None:
            message = (
                f"arg '{name}' was recorded masked (it looks like a secret) and the script gives it no default; "
                f"give it one to replay this run, e.g. flor.arg('{name}', os.environ.get('...'))"
            )
            raise ArgError(message)
        self.notes.append(f"arg '{name}' was recorded masked (a secret): the replay used the script's default")
        return default

    def device(self) -> str:
        """``cpu`` or ``cuda``: the replay's device (``auto``: cuda when torch sees a GPU)."""
        if self._device is None:
            wanted = self.spec.device
            if wanted == "auto":
                wanted = "cpu"
                try:
                    import torch

                    if torch.cuda.is_available():
                        wanted = "cuda"
                except ImportError:
                    pass
            self._device = wanted
        return self._device

    # -- loops ------------------------------------------------------------------------------

    def loop(self, name: str, iterable: Iterable[T]) -> Iterator[T]:
        """Iterate as the schedule says: the main loop by steps, nested loops skipped in validation."""
        self.recorder.admit_loop_name(name)
        parent = _CTX.get()
        if parent == ROOT_CTX and not self._main_seen and name == self.spec.main_loop:
            self._main_seen = True
            yield from self._main_loop(name, iterable)
            return
        if self._skip_nested and parent != ROOT_CTX:
            self.counters["nested_skipped"] += 1
            if self._pending_restore is not None:
                self._restore(self._pending_restore, CheckpointPoint.NESTED)
                self._pending_restore = None
            return
        if parent != ROOT_CTX:
            self.counters["nested_run"] += 1
        occurrence = self._next_occurrence(parent, name)
        try:
            for index, element in enumerate(iterable):
                _CTX.set(self._context(parent, name, occurrence, index, element))
                yield element
                _CTX.set(parent)
        finally:
            _CTX.set(parent)

    def iteration(self, name: str, index: int | None = None, value: Any = None) -> Any:
        """A caller-driven iteration, mapped to the recorded context like loop iterations."""

        @contextmanager
        def scope() -> Iterator[int]:
            self.recorder.admit_loop_name(name)
            parent = _CTX.get()
            key = (parent, name)
            position = index if index is not None else self._driven.get(key, 0)
            if index is None:
                self._driven[key] = position + 1
            token = _CTX.set(self._context(parent, name, 0, position, value))
            try:
                yield position
            finally:
                _CTX.reset(token)

        return scope()

    def _next_occurrence(self, parent: int, name: str) -> int:
        key = (parent, name)
        occurrence = self._occurrences.get(key, 0)
        self._occurrences[key] = occurrence + 1
        return occurrence

    def _context(self, parent: int, name: str, occurrence: int, index: int, element: Any) -> int:
        ctx = self.contexts.find(parent, name, occurrence, index)
        if ctx is None:  # an iteration the record does not have: give the values a context of their own
            ctx = self.recorder.new_ctx()
            self.recorder.queue_loop(ctx, parent, name, index, simple_loop_value(element, index))
        return ctx

    def _main_loop(self, name: str, iterable: Iterable[T]) -> Iterator[T]:
        self._prefix_seconds = process_age()  # what this process's prefix cost (warm or cold start)
        schedule = self.spec.schedule
        steps = list(schedule.steps)
        objects = self.checkpointer.objects if self.checkpointer is not None else None
        restoring = (StepKind.RESTORE, StepKind.VALIDATE, StepKind.SKIP)
        if objects is None and any(s.kind in restoring for s in steps):
            self.notes.append("no flor.checkpointing block was active at the main loop: ran its iterations in full")
            steps = [Step(StepKind.FULL if s.kind in (StepKind.FULL, StepKind.VALIDATE) else StepKind.SILENT)
                     for s in steps]
        occurrence = self._next_occurrence(ROOT_CTX, name)
        total = len(steps)
        self._progress(0, total)
        check = self.generator_check = GeneratorCheck(
            RecordedGenerators.of_run(self.store, self.run_id, name, self.config), name
        )
        verified = check.verify(-1)  # the code before the loop ran here, as it did when recorded
        iterator = iter(iterable)
        for index, step in enumerate(steps):
            try:
                element = next(iterator)
            except StopIteration:
                self.notes.append(f"the main loop '{name}' ended after {index} iterations; the record had {total}")
                break
            if step.kind is StepKind.VALIDATE and check.drift is None and not verified:
                # Nothing recorded the generators where this process arrives: restoring the record's
                # state could hide a statement's draws, so the iteration runs on its own state.
                step = Step(StepKind.FULL)
                self.counters["validations_run_in_full"] = self.counters.get("validations_run_in_full", 0) + 1
            if step.kind in (StepKind.VALIDATE, StepKind.RESTORE):
                check.restoring(index)
            self._run_step(index, step)
            if step.kind in (StepKind.SKIP, StepKind.RESTORE):
                verified = step.kind is StepKind.RESTORE  # the record's own state, generators included
                self._progress(index + 1, total)
                continue
            self._keeping = step.kind in (StepKind.FULL, StepKind.VALIDATE)
            self._skip_nested = step.kind is StepKind.VALIDATE
            self._pending_restore = index if step.kind is StepKind.VALIDATE else None
            ctx = self._context(ROOT_CTX, name, occurrence, index, element)
            _CTX.set(ctx)
            try:
                yield element
            finally:
                _CTX.set(ROOT_CTX)
                self._skip_nested = False
            if self._pending_restore is not None:  # no nested loop ran: restore at the iteration's end
                self._restore(index)
                self._pending_restore = None
                verified = True
            else:
                verified = check.verify(index)
            self._flusher.wake.set()
            self._progress(index + 1, total)
        if schedule.stop_after:
            check.handing_over()
            self._end_process()
        self._keeping = schedule.writes_suffix

    def _run_step(self, index: int, step: Step) -> None:
        kind = step.kind
        if kind is StepKind.SKIP:
            self.counters["iterations_skipped"] += 1
        elif kind is StepKind.RESTORE:
            self.counters["iterations_skipped"] += 1
            self._restore(index)
        elif kind is StepKind.VALIDATE:
            self.counters["iterations_validated"] += 1
        else:
            self.counters["iterations_run"] += 1

    def _restore(self, iteration: int, point: str = CheckpointPoint.END) -> None:
        from ..checkpoints import restore_objects

        assert self.checkpointer is not None  # the schedule restores only inside flor.checkpointing
        # A script that has not imported torch by now holds no tensor in its state: load to the CPU
        # without asking torch for a GPU (importing it costs a second or more per process).
        uses_torch = "torch" in sys.modules or self.spec.device == "cuda"
        map_location = "cuda" if uses_torch and self.device() == "cuda" else "cpu"
        # The objects come from the project's own hash-verified store, written by the run being
        # replayed: they are the run's own, so pickled ones (a scikit-learn estimator) load too
        # (the user-facing load_checkpoint keeps weights_only=True). The generators, gradients and
        # the files the run had written go back to where the record had them (training_state.py).
        restore_objects(
            self.run_id, iteration, self.checkpointer.objects, loop_name=self.spec.main_loop,
            map_location=map_location, weights_only=False, training_state=True, files_root=self.tree,
            point=point, config=self.config,
        )
        self.counters["restores"] += 1

    def _end_process(self) -> None:
        """End the process cleanly: the rest of the script is another process's (or nobody's) work."""
        self.notes.append("stopped after the planned part of the script")
        raise SystemExit(0)

    def _progress(self, done: int, total: int) -> None:
        if self._progress_fd is None:
            return
        try:
            os.write(self._progress_fd, f"{done} {total}\n".encode())
        except OSError:  # the parent stopped listening; the replay itself goes on
            self._progress_fd = None

    # -- lifecycle ----------------------------------------------------------------------------

    def begin(self) -> None:
        """Start the flusher; a replay adds no run row, journal or lock."""
        self._flusher.start()

    def flush(self) -> None:
        """Stage queued replay values (and contexts the record lacks) for the driver to promote."""
        with self._flush_lock:
            contexts, logs = self.recorder.take()
            if not contexts and not logs:
                return
            try:
                stage_batch(self.store.conn, self.spec.session, self.run_id, coalesce_loops(contexts), logs)
            except BaseException:
                self.recorder.put_back(contexts, logs)
                raise

    def _note_stage_failure(self, exc: BaseException) -> None:
        """A background staging write failed: the rows stay queued, the flusher retries, close() flushes."""
        self.counters["stage_retries"] = self.counters.get("stage_retries", 0) + 1

    def written_files(self) -> list[str]:
        """A replay takes no checkpoints, so it keeps no files for them (it restores them, _restore)."""
        return []

    def queue_checkpoint_rows(self, rows: Iterable[tuple[Any, ...]]) -> None:
        """A replay restores checkpoints and never takes one (its main loop tells the checkpointer of
        no boundary), so no checkpoint rows can arise."""
        raise ReplayError("a replay writes no checkpoints")

    def abandon_in_child(self) -> None:
        """In a forked child of a replay process: never use the parent's connection again.

        The child's own ``flor`` calls start a replay run of its own (the run starter stays
        installed); the inherited connection is kept alive unclosed, as recording.Run does.
        """
        import ctypes

        ctypes.pythonapi.Py_IncRef(ctypes.py_object(self.store.conn))
        self._closed = True

    def close(self, status: str = "ok", exit_code: int = 0, error: str | None = None) -> None:
        """Flush the replayed values and write the result file for the parent."""
        if self._closed:
            return
        self._closed = True
        if self.failure is not None:
            status, error = "failed", self.failure[0]
        if self.checkpointer is not None:
            checkpointer, self.checkpointer = self.checkpointer, None
            checkpointer.close(raise_errors=False)
        self._flusher.stop()
        self.flush()
        self.store.close()
        if self.spec.result:
            result = {
                "status": status, "error": error, "notes": self.notes, "counters": self.counters,
                "compare": self._compare, "seconds": time.time() - self.started,
                "generators": self.generator_check.divergence if self.generator_check is not None else None,
                "prefix_seconds": self._prefix_seconds, "process_seconds": process_age(),
            }
            Path(self.spec.result).write_text(json.dumps(result, default=str), encoding="utf-8")


def start_replay_run(kwargs: dict[str, str]) -> ReplayRun:
    """The replay run of this process, from :data:`REPLAY_ENV` (called by ``Session.start``)."""
    spec = ReplaySpec.from_json(os.environ[REPLAY_ENV])
    root = Path(spec.root)
    if spec.settings is not None:  # the driver's settings travel with the job (_executors.py)
        config = Config(root=root, in_git=True, db_path=Path(spec.db), projid=spec.projid, **spec.settings)
    else:
        config = config_of_root(root, True, db_path=Path(spec.db), projid=spec.projid)
    store = Store.open(config)
    run = ReplayRun(config, store, spec, kwargs)
    run.begin()
    return run
