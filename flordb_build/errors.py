"""Exceptions raised by flordb_build; every one derives from :class:`FlorBuildError`.

Messages read like directions: what failed, the offending value in quotes, what to do next.
Only ``cli.py`` turns them into exit codes.
"""

from __future__ import annotations


class FlorBuildError(Exception):
    """Base class of every error flordb_build raises on purpose."""


class ConfigError(FlorBuildError):
    """``[tool.flordb_build]`` or an environment override holds a value we cannot use."""


class StoreError(FlorBuildError):
    """The SQLite store could not be opened, migrated or written."""


class QueryError(FlorBuildError):
    """A read query was refused (it writes) or failed in SQLite."""


class ExpressionError(QueryError):
    """A ``where=`` filter is not a single SQL expression over the frame's columns."""


class LogNameError(FlorBuildError):
    """A logged name is empty, not a string, or collides with a dimension column."""


class ArgError(FlorBuildError):
    """A ``flor.arg`` value is missing or cannot be cast to the default's type."""


class SnapshotError(FlorBuildError):
    """A snapshot commit on the shadow branch could not be made or read."""


class RebuildError(FlorBuildError):
    """``flordb-build rebuild`` could not recreate the store from the snapshots."""
