"""Exceptions raised by flordb_build; every one derives from :class:`FlorBuildError`.

Messages read like directions: what failed, the offending value in quotes, what to do next.
Only ``cli.py`` turns them into exit codes.
"""

from __future__ import annotations


class FlorBuildError(Exception):
    """Base class of every error flordb_build raises on purpose."""


class FlorBuildWarning(UserWarning):
    """Something flordb_build did on purpose that the user should know about (the category of its warnings)."""


class ConfigError(FlorBuildError):
    """``[tool.flordb_build]`` or an environment override holds a value we cannot use."""


class StoreError(FlorBuildError):
    """The SQLite store could not be opened, migrated or written."""


class NotAStoreError(StoreError):
    """The store's file exists but is empty or not an SQLite database, so it holds no runs to read."""


class TeamStoreError(FlorBuildError):
    """The team store (PostgreSQL) could not be reached, written or read."""


class QueryError(FlorBuildError):
    """A read query was refused (it writes) or failed in SQLite."""


class ExpressionError(QueryError):
    """A ``where=`` filter is not a single SQL expression over the frame's columns."""


class LogNameError(FlorBuildError):
    """A logged name is empty, not a string, or collides with a dimension column."""


class ArgError(FlorBuildError):
    """A ``flor.arg`` value is missing or cannot be cast to the default's type."""


class IterationArgumentError(FlorBuildError, TypeError):
    """``flor.iteration`` got its index twice: as ``index`` and as FlorDB's ``idx``."""


class SnapshotError(FlorBuildError):
    """A snapshot commit on the shadow branch could not be made or read."""


class RebuildError(FlorBuildError):
    """``flordb-build rebuild`` could not recreate the store from the snapshots."""


class ObjectStoreError(FlorBuildError):
    """The content-addressed object store could not write or read an object."""


class ObjectMissingError(ObjectStoreError):
    """An object the database references has no file in the object store."""


class ObjectCorruptError(ObjectStoreError):
    """An object file's content no longer hashes to its name."""


class CheckpointError(FlorBuildError):
    """A checkpoint could not be taken, found, verified or restored."""


class CheckpointNotFoundError(CheckpointError):
    """The run has no checkpoint at the requested loop iteration."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint's object is missing or corrupted, so restoring it would be wrong."""


class RewriteError(FlorBuildError):
    """A script could not be parsed or analysed for hindsight logging."""


class ExecError(FlorBuildError):
    """``flordb-build exec`` was called without a command to run."""


class InitError(FlorBuildError):
    """``flordb-build init`` could not configure the project (a conflicting entry, a bad file)."""


class LineageError(FlorBuildError):
    """A file's lineage could not be traced (no such file, or never recorded)."""


class DiffError(FlorBuildError):
    """Two runs could not be compared (an unknown or ambiguous run id)."""


class ReplayError(FlorBuildError):
    """A replay could not be planned or run (unknown names, no matching runs, a failed replay)."""


class WarmStartError(ReplayError):
    """A warm replay server could not be started, reached or used; the replay then starts cold."""


class ViewError(FlorBuildError):
    """A view of the store (a chart, a DAG or lineage picture, a UI page) could not be made."""
