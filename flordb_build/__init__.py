"""flordb_build: build, application and change context for ML pipelines, with hindsight logging.

``import flordb_build as flor`` has no side effects beyond taking its own ``--kwargs name=value``
tokens out of ``sys.argv``: no git calls, no database. The first recording call opens a run.
"""

from __future__ import annotations

from .errors import FlorBuildError
from .query import dataframe, latest, query
from .runtime import arg, commit, iteration, log, loop

__version__ = "0.1.0"

__all__ = [
    "FlorBuildError",
    "__version__",
    "arg",
    "commit",
    "dataframe",
    "iteration",
    "latest",
    "log",
    "loop",
    "query",
]
