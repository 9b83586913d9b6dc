"""doit integration through doit's own COMMAND plugin point: a recording ``run`` command.

``flordb-build init`` writes this into a project (pyproject.toml shown; doit.cfg has the
same under ``[COMMAND]``)::

    [tool.doit.plugins.command]
    run = "flordb_build.dag:RecordingRun"

doit then uses :class:`RecordingRun` for ``doit`` / ``doit run``: doit's own ``Run`` with its
own runners (serial, ``-n N -P process``, ``-P thread``), loader, dependency checks, exit
codes and output. The subclass only

1. wraps the reporter the user chose (``-r``, DOIT_CONFIG or the default) in a
   :class:`RecordingReporter` that forwards every call unchanged and writes ``pipelines`` /
   ``tasks`` / ``files`` rows from doit's main process, where every reporter call lands;
2. makes every task a :class:`FlorTask`, whose ``execute`` (run wherever doit runs it: main
   process, worker process or worker thread) gives its command actions an explicit
   ``env`` with ``FLOR_TASK`` / ``FLOR_PIPELINE_ID`` (explicit, because worker threads share
   ``os.environ``), and runs in-process Python actions as their own flordb_build run.

Python actions that log in-process set ``os.environ`` and use the process's single recording
session, so under ``-P thread`` they take one lock and run one at a time; command actions
and ``-P process`` workers stay fully parallel.
"""

from __future__ import annotations

import codecs
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

from doit.action import CmdAction, PythonAction
from doit.cmd_run import Run
from doit.exceptions import BaseFail
from doit.task import Task

from ..config import load_config
from ..errors import FlorBuildError, SnapshotError
from ..store import Store
from ._record import (
    INTERRUPTED_EXIT,
    BuildRecorder,
    DagNode,
    TaskRecord,
    TaskStatus,
    new_pipeline_id,
    pipeline_status,
)

_PYTHON_ACTION_LOCK = threading.RLock()
_CMD_CLASSES: dict[type, type] = {}


# -- what a task looks like in the DAG -------------------------------------------------------


def action_text(action: Any) -> str:
    """A readable, side-effect-free description of one raw action spec of a task."""
    if isinstance(action, str):
        return action
    if isinstance(action, list | tuple) and action and all(isinstance(a, str | os.PathLike) for a in action):
        import shlex

        return shlex.join(os.fspath(a) for a in action)
    if isinstance(action, tuple) and action and callable(action[0]):
        args = action[1] if len(action) > 1 else ()
        kwargs = action[2] if len(action) > 2 else {}
        return f"{callable_name(action[0])}(*{args!r}, **{kwargs!r})"
    if isinstance(action, CmdAction | PythonAction):
        return str(action)
    if callable(action):
        return callable_name(action) + "()"
    return repr(action)


def callable_name(func: Callable[..., Any]) -> str:
    """``module.qualname`` of a Python action's callable."""
    module = getattr(func, "__module__", None) or "?"
    return f"python: {module}.{getattr(func, '__qualname__', repr(func))}"


def dag_node(task: Task) -> DagNode:
    """The DAG JSON entry of a doit task (from its raw specs: nothing is instantiated or run)."""
    return DagNode(
        name=task.name,
        task_dep=list(task.task_dep),
        file_dep=sorted(task.file_dep),
        targets=list(task.targets),
        actions=[action_text(a) for a in task._actions],
        doc=task.doc or None,
    )


def explain_run(task: Task, missing_targets: list[str], forced: bool) -> str:
    """Why doit executed ``task``: forced, missing targets, changed deps, a false uptodate, or always."""
    if forced:
        return "forced: doit run --always-execute"
    if not task.file_dep and not task.uptodate:
        return "always runs: no file_dep and no uptodate"
    if missing_targets:
        return "missing target: " + ", ".join(missing_targets)
    changed = sorted(task.dep_changed or ())
    if changed:
        return "changed file_dep: " + ", ".join(changed)
    if task.uptodate:
        return "uptodate is false"
    return "not up-to-date (dependency state changed)"


# -- tasks that pass their identity to what they run -----------------------------------------


class FlorCmdMixin:
    """Runs a ``CmdAction`` with ``FLOR_TASK``/``FLOR_PIPELINE_ID`` in an explicit ``env``."""

    flor_env: dict[str, str]
    pkwargs: dict[str, Any]

    def execute(self, out: Any = None, err: Any = None) -> Any:
        saved = self.pkwargs
        base = saved.get("env")
        # Read the environment now, as doit would at Popen time; a user-given env stays the base.
        env = dict(os.environ if base is None else base)
        env.update(self.flor_env)
        self.pkwargs = {**saved, "env": env}
        try:
            return super().execute(out, err)  # type: ignore[misc]
        finally:
            self.pkwargs = saved


def flor_cmd_class(cls: type) -> type:
    """The recording subclass of a ``CmdAction`` class (doit.tools' LongRunning, Interactive, ...)."""
    if issubclass(cls, FlorCmdMixin):
        return cls
    sub = _CMD_CLASSES.get(cls)
    if sub is None:
        sub = _CMD_CLASSES[cls] = type("Flor" + cls.__name__, (FlorCmdMixin, cls), {})
    return sub


@dataclass
class TaskOutcome:
    """The result an in-process task scope learns after the actions ran."""

    failure: BaseFail | None = None


@contextmanager
def in_process_task(env: Mapping[str, str]) -> Iterator[TaskOutcome]:
    """Run Python actions as their own flordb_build run, with ``env`` in ``os.environ``.

    A run the process already had (say, the dodo file logged while loading) is ended first, so
    the task's ``flor.log`` calls open a run carrying ``FLOR_TASK``; that run ends with the task,
    marked failed when the task failed.
    """
    with _PYTHON_ACTION_LOCK:
        _commit_session(None)
        saved = {name: os.environ.get(name) for name in env}
        os.environ.update(env)
        outcome = TaskOutcome()
        try:
            yield outcome
        finally:
            try:
                _commit_session(outcome.failure)
            finally:
                for name, value in saved.items():
                    if value is None:
                        os.environ.pop(name, None)
                    else:
                        os.environ[name] = value


def _commit_session(failure: BaseFail | None) -> None:
    runtime = sys.modules.get("flordb_build.runtime")
    if runtime is None:  # the actions never imported flordb_build: nothing was recorded
        return
    run = runtime.SESSION.run
    if run is None:
        return
    if failure is not None and run.failure is None:
        run.failure = (failure.get_msg().strip()[-2000:], 1)
    runtime.SESSION.commit()


class FlorTask(Task):
    """A doit ``Task`` that tells what it runs which task and pipeline it belongs to."""

    flor_pipeline_id: str

    def execute(self, stream: Any) -> Any:
        env = {"FLOR_TASK": self.name, "FLOR_PIPELINE_ID": self.flor_pipeline_id}
        python_actions = False
        for action in self.actions:
            if isinstance(action, CmdAction):
                action.__class__ = flor_cmd_class(type(action))
                action.flor_env = env
            elif isinstance(action, PythonAction):
                python_actions = True
        if not python_actions:
            return super().execute(stream)
        with in_process_task(env) as outcome:
            failure = super().execute(stream)
            outcome.failure = failure if isinstance(failure, BaseFail) else None
        return failure


def adopt_task(task: Task, pipeline_id: str) -> None:
    """Make ``task`` a :class:`FlorTask` of ``pipeline_id`` (idempotent; keeps all its state)."""
    if type(task) is Task:
        task.__class__ = FlorTask
    if isinstance(task, FlorTask):
        task.flor_pipeline_id = pipeline_id


# -- the reporter --------------------------------------------------------------------------


class RecordingReporter:
    """Forwards every call to the user's reporter unchanged and records what happened."""

    desc = "records build context with flordb_build, then reports like the wrapped reporter"

    def __init__(self, inner: Any, recorder: BuildRecorder | None, forced: bool, argv: list[str]) -> None:
        self.inner = inner
        self.recorder = recorder
        self.forced = forced
        self.argv = argv
        self._lock = threading.Lock()
        #: task -> (when doit checked it, its missing targets, the stat of the others)
        self._checked: dict[str, tuple[float, list[str], dict[str, os.stat_result]]] = {}
        self._started: dict[str, tuple[float, Task]] = {}

    # Reporter attributes a caller might read (ConsoleReporter.failures, outstream, ...).
    def __getattr__(self, name: str) -> Any:
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def _guard(self, what: Callable[[], None]) -> None:
        """Run a recording step; on a store failure warn once and stop recording (the build goes on)."""
        if self.recorder is None:
            return
        try:
            what()
        except (FlorBuildError, sqlite3.Error, OSError) as exc:
            print(f"flordb_build: stopped recording this doit run: {exc}", file=sys.stderr)
            recorder, self.recorder = self.recorder, None
            try:
                recorder.store.close()
            except sqlite3.Error:
                pass

    # -- doit reporter interface ---------------------------------------------------------

    def initialize(self, tasks: Mapping[str, Task], selected_tasks: list[str]) -> None:
        recorder = self.recorder
        if recorder is not None:
            for task in tasks.values():
                adopt_task(task, recorder.pipeline_id)
            dag = {
                "tasks": [dag_node(t).to_json() for t in tasks.values()],
                "selected": list(selected_tasks or []),
            }
            self._guard(lambda: recorder.start_pipeline("doit", self.argv, dag))
            self._guard(lambda: recorder.remember_previous("doit"))
        if hasattr(self.inner, "initialize"):
            self.inner.initialize(tasks, selected_tasks)

    def get_status(self, task: Task) -> None:
        if self.recorder is not None:
            # Delayed tasks (create_after) appear only now; adopt them before they run.
            adopt_task(task, self.recorder.pipeline_id)
            # One stat per target: the missing ones explain a run, and a skipped task's facts reuse the rest.
            missing, stats = [], {}
            for target in task.targets:
                try:
                    stats[target] = os.stat(target)
                except OSError:
                    missing.append(target)
            with self._lock:
                self._checked[task.name] = (time.time(), missing, stats)
        self.inner.get_status(task)

    def execute_task(self, task: Task) -> None:
        with self._lock:
            self._started[task.name] = (time.time(), task)
        self.inner.execute_task(task)

    def add_success(self, task: Task) -> None:
        self._finish(task, TaskStatus.EXECUTED, None)
        self.inner.add_success(task)

    def add_failure(self, task: Task, fail: BaseFail) -> None:
        self._finish(task, TaskStatus.FAILED, fail)
        self.inner.add_failure(task, fail)

    def skip_uptodate(self, task: Task) -> None:
        self._skipped(task, TaskStatus.UP_TO_DATE)
        self.inner.skip_uptodate(task)

    def skip_ignore(self, task: Task) -> None:
        self._skipped(task, TaskStatus.IGNORED)
        self.inner.skip_ignore(task)

    def cleanup_error(self, exception: BaseFail) -> None:
        self.inner.cleanup_error(exception)

    def runtime_error(self, msg: str) -> None:
        self.inner.runtime_error(msg)

    def teardown_task(self, task: Task) -> None:
        self.inner.teardown_task(task)

    def complete_run(self) -> None:
        recorder = self.recorder
        if recorder is not None:
            self._guard(recorder.flush)
        self.inner.complete_run()

    def record_interrupted(self) -> None:
        """A ``tasks`` row (``interrupted``) for every task that started and never finished.

        Under ``doit -n N`` a Ctrl-C stops the workers before they report; the main process
        still knows which tasks had started (doit reports ``execute_task`` to it first).
        """
        recorder = self.recorder
        if recorder is None:
            return
        now = time.time()
        with self._lock:
            started, self._started = self._started, {}
        for name, (began, task) in sorted(started.items(), key=lambda item: item[1][0]):
            record = TaskRecord(
                name,
                TaskStatus.INTERRUPTED,
                began,
                now,
                "interrupted: Ctrl-C (SIGINT) stopped doit while the task ran",
                [action_text(a) for a in task._actions],
                "KeyboardInterrupt: the task was running when doit was interrupted",
            )
            # Its targets may be half-written: its inputs only, as for a failed task.
            self._guard(partial(_queue_inputs_only, recorder, record, sorted(task.file_dep)))
        self._guard(recorder.flush)

    def finish(self, exit_code: int) -> None:
        """Close the pipeline: its status and exit code, its journal committed, the store closed."""
        recorder = self.recorder
        if recorder is None:
            return
        self._guard(lambda: recorder.finish_pipeline(pipeline_status(exit_code), exit_code))
        if self.recorder is not None:
            try:
                recorder.commit_journal()
            except SnapshotError as exc:
                # The journal stays in .flor/pipelines, where rebuild finds it too.
                print(f"flordb_build: pipeline {recorder.pipeline_id} recorded without a snapshot commit: {exc}",
                      file=sys.stderr)
            except (FlorBuildError, sqlite3.Error, OSError) as exc:
                print(f"flordb_build: pipeline {recorder.pipeline_id} was not journaled: {exc}", file=sys.stderr)
        self._guard(recorder.close)

    # -- recording -------------------------------------------------------------------------

    def _skipped(self, task: Task, status: TaskStatus) -> None:
        recorder = self.recorder
        if recorder is None:
            return
        now = time.time()
        with self._lock:
            checked, _, stats = self._checked.pop(task.name, (now, [], {}))
        record = TaskRecord(task.name, status, checked, now, actions=[action_text(a) for a in task._actions])

        def queue() -> None:
            up_to_date = status is TaskStatus.UP_TO_DATE
            files = recorder.hasher.observe(sorted(task.file_dep), task.targets, stats) if up_to_date else []
            recorder.queue_task(record, files)

        self._guard(queue)

    def _finish(self, task: Task, status: TaskStatus, fail: BaseFail | None) -> None:
        recorder = self.recorder
        if recorder is None:
            return
        now = time.time()
        with self._lock:
            checked, missing, _ = self._checked.pop(task.name, (now, [], {}))
            started = self._started.pop(task.name, (checked, task))[0]
        executed = bool(getattr(task, "executed", False)) or status is TaskStatus.EXECUTED
        reason = explain_run(task, missing, self.forced) if executed else None
        error = None
        if fail is not None:
            error = f"{fail.get_name()}: {fail.get_msg().strip()}"[-4000:]
            if not executed:
                reason = "not executed: " + fail.get_name()
        record = TaskRecord(
            task.name, status, started, now, reason, [action_text(a) for a in task._actions], error
        )

        def write() -> None:
            # A failed task's targets may be half-written: record its inputs only.
            targets = task.targets if fail is None else []
            recorder.record_task(record, recorder.hasher.facts(sorted(task.file_dep), targets))

        self._guard(write)


def _queue_inputs_only(recorder: BuildRecorder, record: TaskRecord, deps: list[str]) -> None:
    recorder.queue_task(record, recorder.hasher.facts(deps, []))


# -- the command ---------------------------------------------------------------------------


class RecordingRun(Run):
    """doit's ``run`` command, recording build context into the project's flordb_build store."""

    name = "run"
    doc_purpose = "run tasks (build context recorded by flordb_build)"

    def _execute(
        self,
        outfile: Any,
        verbosity: int | None = None,
        always: bool = False,
        continue_: bool = False,
        reporter: Any = "console",
        num_process: int = 0,
        par_type: str = "process",
        single: bool = False,
        auto_delayed_regex: bool = False,
        force_verbosity: bool = False,
        failure_verbosity: int = 0,
        pdb: bool = False,
    ) -> int:
        """Run doit's ``run`` with the chosen reporter wrapped and the tasks adopted."""
        # Open the output file here (doit would do the same) so the reporter the user chose can
        # be built around it and wrapped; doit accepts a reporter instance.
        opened = codecs.open(outfile, "w", encoding="utf-8") if isinstance(outfile, str) else None
        stream = opened if opened is not None else outfile
        try:
            inner = self._user_reporter(reporter, stream, failure_verbosity)
            add_params_dependency(self.task_list)
            recorder = open_recorder()
            if recorder is not None:
                for task in self.task_list:
                    adopt_task(task, recorder.pipeline_id)
            wrapper = RecordingReporter(inner, recorder, bool(always), list(sys.argv))
            exit_code = 3
            try:
                exit_code = int(
                    super()._execute(
                        stream,
                        verbosity=verbosity,
                        always=always,
                        continue_=continue_,
                        reporter=wrapper,
                        num_process=num_process,
                        par_type=par_type,
                        single=single,
                        auto_delayed_regex=auto_delayed_regex,
                        force_verbosity=force_verbosity,
                        failure_verbosity=failure_verbosity,
                        pdb=pdb,
                    )
                )
            except KeyboardInterrupt:
                exit_code = INTERRUPTED_EXIT
                wrapper.record_interrupted()
                raise
            finally:
                wrapper.finish(exit_code)
            return exit_code
        finally:
            if opened is not None:
                opened.close()

    def _user_reporter(self, reporter: Any, stream: Any, failure_verbosity: int) -> Any:
        """The reporter doit would have used, built exactly as doit builds it."""
        reporter_cls = self.reporters[reporter] if isinstance(reporter, str) else reporter
        if isinstance(reporter_cls, type):
            return reporter_cls(stream, {"failure_verbosity": failure_verbosity})
        return reporter_cls


def add_params_dependency(tasks: list[Task]) -> None:
    """Make the project's params file (``[tool.flordb_build] params``) a file_dep of every task with file_deps.

    ``flor.arg`` reads its defaults from that file (args.py), so a changed value must make doit run
    the tasks again. Tasks without file_dep run every time anyway; giving them one would let doit
    skip them, so they are left as they are. A params file named with ``--params FILE`` in an
    action is the task's own to list.
    """
    try:
        config = load_config()
    except FlorBuildError:
        return  # open_recorder reports the configuration error
    if config.params is None:
        return
    path = config.root / config.params
    if not path.is_file():
        return
    # Spelled as users spell file_deps (relative to the dodo's directory) where it lies below it.
    here = os.getcwd()
    dep = os.path.relpath(path, here) if os.path.abspath(path).startswith(here + os.sep) else str(path)
    for task in tasks:
        if task.file_dep and not any(os.path.abspath(d) == os.path.abspath(path) for d in task.file_dep):
            task.file_dep.add(dep)


def open_recorder() -> BuildRecorder | None:
    """A recorder for a new pipeline in the project's store; None (with a warning) if the store fails."""
    try:
        store = Store.open(load_config())
    except FlorBuildError as exc:
        print(f"flordb_build: not recording this doit run: {exc}", file=sys.stderr)
        return None
    return BuildRecorder(store, new_pipeline_id())
