"""Build context: doit tasks and Make recipes recorded as pipelines, tasks and files.

- :class:`RecordingRun` (``flordb_build.dag:RecordingRun``): doit's ``run`` command as a
  COMMAND plugin; ``flordb-build init`` puts it in pyproject.toml or doit.cfg.
- :func:`run_recipe`: ``flordb-build exec`` for Make recipes (the top-level ``templates/Makefile``).
- :func:`init_project`: ``flordb-build init [--make]``.

The doit part imports doit, so it loads only when doit asks for the plugin (PEP 562
``__getattr__``); ``exec`` in every Make recipe stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._init import PLUGIN_LOCATION, InitStep, init_project, template_makefile
from ._make import PipelineOrigin, RecipeResult, find_make_process, make_pipeline, run_recipe
from ._record import (
    BuildRecorder,
    DagNode,
    FileFact,
    FileHasher,
    FileRole,
    PipelineStatus,
    TaskRecord,
    TaskStatus,
    sha256_file,
)

if TYPE_CHECKING:
    from ._doit import FlorTask, RecordingReporter, RecordingRun

_LAZY = {"RecordingRun", "RecordingReporter", "FlorTask"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import _doit

        return getattr(_doit, name)
    raise AttributeError(f"module 'flordb_build.dag' has no attribute '{name}'")


__all__ = [
    "PLUGIN_LOCATION",
    "BuildRecorder",
    "DagNode",
    "FileFact",
    "FileHasher",
    "FileRole",
    "FlorTask",
    "InitStep",
    "PipelineOrigin",
    "PipelineStatus",
    "RecipeResult",
    "RecordingReporter",
    "RecordingRun",
    "TaskRecord",
    "TaskStatus",
    "find_make_process",
    "init_project",
    "make_pipeline",
    "run_recipe",
    "sha256_file",
    "template_makefile",
]
