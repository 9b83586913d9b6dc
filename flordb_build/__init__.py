"""flordb_build: build, application and change context for ML pipelines, with hindsight logging.

``import flordb_build as flor`` has no side effects beyond taking its own ``--kwargs name=value``
tokens out of ``sys.argv``: no git calls, no database. The first recording call opens a run.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .compat import FlorDBUtils
from .errors import FlorBuildError

# `query` (the function) must be bound here, eagerly: importing the submodule of the same name
# later would otherwise leave the module object at `flordb_build.query`.
from .query import dataframe, latest, query
from .runtime import arg, commit, iteration, log, loop

#: FlorDB's ``flor.utils.latest(df)``. A namespace, not a module: ``utils`` is a grab-bag name
#: this project gives no module, so it re-exports ``latest`` and nothing else (compat.py).
utils = FlorDBUtils(latest=latest)

if TYPE_CHECKING:
    from pathlib import Path

    from .checkpoints import checkpointing, load_checkpoint
    from .hindsight import replay

    HOMEDIR: Path

# Checkpointing and replay load on first use (PEP 562): `import flordb_build` in a training
# script costs only what recording needs.
_LAZY = {"checkpointing": "checkpoints", "load_checkpoint": "checkpoints", "replay": "hindsight"}


def __getattr__(name: str) -> Any:
    if name == "HOMEDIR":
        # FlorDB's store directory; here the project's `.flor` (compat.py). Resolved on each use,
        # never at import: finding the project reads the file system.
        from .compat import flordb_home

        return flordb_home()
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'flordb_build' has no attribute '{name}'")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__version__ = "0.1.0"

__all__ = [
    "FlorBuildError",
    "__version__",
    "arg",
    "checkpointing",
    "commit",
    "dataframe",
    "iteration",
    "latest",
    "load_checkpoint",
    "log",
    "loop",
    "query",
    "replay",
    "utils",
]
# HOMEDIR stays out of __all__: `from flordb_build import *` must not create a directory.
