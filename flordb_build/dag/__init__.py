"""Build context: doit tasks and Make recipes recorded as pipelines, tasks and files.

- :class:`RecordingRun` (``flordb_build.dag:RecordingRun``): doit's ``run`` command as a
  COMMAND plugin; ``flordb-build init`` puts it in pyproject.toml or doit.cfg.
- :func:`run_recipe`: ``flordb-build exec`` for Make recipes (the top-level ``templates/Makefile``).
- :func:`init_project`: ``flordb-build init [--make]``.

Every name loads its module on first use (PEP 562 ``__getattr__``): doit asking for the
plugin loads the doit part and the recorder, not the Make and init parts (every up-to-date
``doit`` pays for what it imports), and ``exec`` in every Make recipe never imports doit.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._doit import FlorTask, RecordingReporter, RecordingRun
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

_MODULE_OF = {
    **dict.fromkeys(("RecordingRun", "RecordingReporter", "FlorTask"), "_doit"),
    **dict.fromkeys(("PLUGIN_LOCATION", "InitStep", "init_project", "template_makefile"), "_init"),
    **dict.fromkeys(
        ("PipelineOrigin", "RecipeResult", "find_make_process", "make_pipeline", "run_recipe"), "_make"
    ),
    **dict.fromkeys(
        (
            "BuildRecorder",
            "DagNode",
            "FileFact",
            "FileHasher",
            "FileRole",
            "PipelineStatus",
            "TaskRecord",
            "TaskStatus",
            "sha256_file",
        ),
        "_record",
    ),
}


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'flordb_build.dag' has no attribute '{name}'")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


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
