"""Reaching the team store: which remote, and a psycopg connection to it (psycopg imported here only).

The url and options come from ``[tool.flordb_build.remotes.NAME]`` (config.py refuses one that
holds a password); libpq finds the password itself in ``PGPASSWORD``, ``~/.pgpass`` or a service
file, so flordb_build never sees, stores or prints it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..config import Config, Remote
from ..errors import TeamStoreError

if TYPE_CHECKING:
    import psycopg

INSTALL_HINT = "pip install 'flordb_build[team]'"


def resolve_remote(config: Config, name: str | None = None) -> Remote:
    """The remote called ``name``, or the only one when ``name`` is None.

    :raises TeamStoreError: no remote is configured, ``name`` is unknown, or several are and none was named.
    """
    remotes = config.remotes
    if not remotes:
        raise TeamStoreError(
            "No team store is configured. Add [tool.flordb_build.remotes.NAME] with "
            'url = "postgresql://host:port/database" to pyproject.toml (no password: PGPASSWORD or ~/.pgpass).'
        )
    if name is None:
        if len(remotes) > 1:
            raise TeamStoreError(
                f"Several team stores are configured ({', '.join(remotes)}); pick one with --remote NAME."
            )
        return next(iter(remotes.values()))
    if name not in remotes:
        raise TeamStoreError(
            f"No remote '{name}' in [tool.flordb_build.remotes]; the configured ones: {', '.join(remotes)}."
        )
    return remotes[name]


def connect_team(remote: Remote, *, read_only: bool = False) -> psycopg.Connection[Any]:
    """A connection to ``remote``; a read-only one refuses every write, server side.

    :raises TeamStoreError: psycopg is not installed, or the server refused or cannot be reached.
    """
    try:
        import psycopg
        import psycopg.conninfo
    except ImportError as exc:
        raise TeamStoreError(f"The team store needs psycopg 3: {INSTALL_HINT}.") from exc
    options = dict(remote.options)
    if read_only:
        # Every transaction of this session is READ ONLY unless it says otherwise, which ours never do.
        options["options"] = (options.get("options", "") + " -c default_transaction_read_only=on").strip()
    try:
        conninfo = psycopg.conninfo.make_conninfo(remote.url, application_name="flordb_build", **options)
        conn = psycopg.connect(conninfo)
    except psycopg.Error as exc:
        raise TeamStoreError(
            f"Could not connect to the team store '{remote.name}': {first_line(exc)}"
        ) from exc
    conn.read_only = read_only or None
    return conn


def first_line(exc: BaseException) -> str:
    """The first line of a driver error (libpq's messages go on with hints over several lines)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
