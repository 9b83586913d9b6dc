"""Hindsight logging: replay today's new ``flor.log`` statements in recorded runs.

(The package is not called ``replay`` because importing a submodule ``flordb_build.replay``
would replace the ``flor.replay`` function with the module.)

    select runs (where, task) -> propagate statements into each snapshot (rewrite/)
      -> plan: scan depth + estimate per run (pure: plan_replay)
      -> run: every run's jobs (one per run, or per segment of a split scan) in one queue over
         --workers slots (run_replay, _execute.py); each job is a JobPayload that needs no shared
         filesystem (snapshot tar, patched sources, settings, a store slice: _slice.py), run by
         run_job in a worker (_executors.py: LocalExecutor here, Ray across machines), whose
         replay-mode child (_mode.py) stages its values in the slice and the reply carries them back
      -> the driver, the only writer of the store, stages each reply's rows for the session
         (_staging.py) and checks them against the record (nondeterminism check)
      -> per run, once its last job replied: finish or withhold (_backfill.py): journal on
         flor.shadow, then the staged values promoted into the original run's rows (source
         'replay') in one transaction, while other runs' jobs still run

Public: :func:`plan_replay` (pure), :func:`run_replay`, :func:`prepare_replay` (selection +
plan), :func:`replay` (all of it, ``flor.replay``), the result dataclasses, and the doit
command :class:`ReplayCommand` (loaded lazily: it imports doit).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._command import ReplayArguments, read_replay_arguments, replay, run_replay_command, warm_command
from ._execute import (
    ProgressLine,
    ReplayDriver,
    ReplayExecutor,
    compare_values,
    format_plan,
    format_report,
    jobs_of,
    local_executor,
    run_replay,
    values_match,
)
from ._executors import Executor, JobPayload, JobReply, LocalExecutor, run_job
from ._model import (
    REPLAY_ENV,
    JobResult,
    Mismatch,
    RecordedRun,
    ReplayJob,
    ReplayPlan,
    ReplayReport,
    ReplaySpec,
    RunOutcome,
    RunPlan,
    Schedule,
    SkippedRun,
    StartCosts,
    Step,
    StepKind,
)
from ._select import prepare_replay

if TYPE_CHECKING:
    from ._doit import ReplayCommand
    from ._plan import balance_segments, plan_replay, schedule_scan, split_segments

# The planner imports libcst and the doit command imports doit: a replaying script's process
# (which imports this package for _mode.py) needs neither.
_LAZY = {
    "ReplayCommand": "_doit",
    "balance_segments": "_plan",
    "plan_replay": "_plan",
    "schedule_scan": "_plan",
    "split_segments": "_plan",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'flordb_build.hindsight' has no attribute '{name}'")


__all__ = [
    "REPLAY_ENV",
    "Executor",
    "JobPayload",
    "JobReply",
    "JobResult",
    "LocalExecutor",
    "Mismatch",
    "ProgressLine",
    "RecordedRun",
    "ReplayArguments",
    "ReplayCommand",
    "ReplayDriver",
    "ReplayExecutor",
    "ReplayJob",
    "ReplayPlan",
    "ReplayReport",
    "ReplaySpec",
    "RunOutcome",
    "RunPlan",
    "Schedule",
    "SkippedRun",
    "StartCosts",
    "Step",
    "StepKind",
    "balance_segments",
    "compare_values",
    "format_plan",
    "format_report",
    "jobs_of",
    "local_executor",
    "plan_replay",
    "prepare_replay",
    "read_replay_arguments",
    "replay",
    "run_job",
    "run_replay",
    "run_replay_command",
    "schedule_scan",
    "split_segments",
    "values_match",
    "warm_command",
]
