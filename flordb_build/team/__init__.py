"""The team store: finished runs of every clone pushed into one PostgreSQL (``flordb-build push``),
read through the same reader interface as the local store (``store="team"``, ``--team``).

psycopg is imported only when a team store is reached, so ``import flordb_build`` never needs it;
the push (and numpy, which builds its binary COPY blocks) loads on first use: query.py imports this
package's reader protocol on every ``import flordb_build``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from ..config import Config
from ..errors import TeamStoreError
from ._connect import connect_team, first_line, resolve_remote
from ._protocol import RUN_FACT_COLUMNS, SQLiteReader, StoreReader

if TYPE_CHECKING:
    from ._postgres import PostgresReader
    from ._push import PushResult, push_store

__all__ = [
    "RUN_FACT_COLUMNS",
    "PushResult",
    "SQLiteReader",
    "StoreReader",
    "connect_team",
    "open_team_reader",
    "push_store",
    "resolve_remote",
]


@contextmanager
def open_team_reader(config: Config, remote_name: str | None = None) -> Iterator[PostgresReader]:
    """``with open_team_reader(config) as reader:`` the team store over a read-only connection.

    :raises TeamStoreError: no remote, the server is unreachable, or nothing was pushed there yet.
    """
    import psycopg

    from ._postgres import PostgresReader

    remote = resolve_remote(config, remote_name)
    with connect_team(remote, read_only=True) as conn:
        try:
            row = conn.execute("SELECT to_regclass('team_units') IS NOT NULL").fetchone()
        except psycopg.Error as exc:
            raise TeamStoreError(f"Could not read the team store '{remote.name}': {first_line(exc)}") from exc
        if row is None or not row[0]:
            raise TeamStoreError(
                f"The team store '{remote.name}' holds no flordb_build tables yet; push runs first (flordb-build push)."
            )
        conn.rollback()  # end the check's transaction: each read starts its own, read only
        try:
            yield PostgresReader(conn)
        except psycopg.Error as exc:
            raise TeamStoreError(f"Reading the team store '{remote.name}' failed: {first_line(exc)}") from exc


def __getattr__(name: str) -> object:
    """``PushResult`` and ``push_store`` from ``_push``, imported when first asked for."""
    if name in ("PushResult", "push_store"):
        from . import _push

        return getattr(_push, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
