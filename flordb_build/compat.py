"""Coming from FlorDB: the names FlorDB scripts use that flordb_build would spell differently.

FlorDB scripts port by changing ``import flor`` to ``import flordb_build as flor``. Most of
FlorDB's API has the same name and meaning here; this module holds the counterparts of the rest:

- ``flor.utils.latest(df)``: FlorDB keeps ``latest`` in a module ``flor.utils``. ``utils`` is a
  grab-bag name this project gives no module, so ``flor.utils`` is a :class:`FlorDBUtils`
  namespace whose only member is :func:`flordb_build.latest`.
- ``flor.HOMEDIR``: FlorDB's store directory (``~/.flor``); here the project's ``.flor``
  directory, which holds the store (:func:`flordb_home`).
- FlorDB's column names for ``flor.query``: on every query connection, ``logs`` also has
  FlorDB's ``value_name`` and ``value_type``, and ``flordb_logs`` has the columns of FlorDB's
  ``logs`` table (:func:`add_flordb_views`)::

      logs          run_id, seq, ctx_id, name, value, kind, source   (ours: every value,
                    the packed ones expanded from log_columns, packedlogs.py)
                    + value_name (= name), value_type (= kind)
      flordb_logs   projid, tstamp, filename, ctx_id (NULL at run level, as in FlorDB),
                    value_name, value, value_type, run_id

  ``logs`` gains only names that no other table has, so a query joining ``logs`` with ``runs``
  or ``loops`` over our own columns never becomes ambiguous; FlorDB's ``projid``, ``tstamp`` and
  ``filename`` (columns of our ``runs``) live in ``flordb_logs`` instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # `import flordb_build` imports this module: the config and sqlite3 load on use
    import sqlite3
    from pathlib import Path

    import pandas as pd

    from .config import Config


class FlorDBUtils:
    """``flor.utils`` as FlorDB scripts call it: ``flor.utils.latest(df)``, nothing else.

    Read-only, as the frozen dataclass it was; not a dataclass because ``dataclasses`` imports
    ``inspect``, which ``import flordb_build`` should not pay for (issue 14).
    """

    latest: Callable[[pd.DataFrame], pd.DataFrame]

    def __init__(self, latest: Callable[[pd.DataFrame], pd.DataFrame]) -> None:
        object.__setattr__(self, "latest", latest)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"flor.utils is read-only; cannot set '{name}'")

    def __repr__(self) -> str:
        return f"FlorDBUtils(latest={self.latest!r})"


def flordb_home(config: Config | None = None) -> Path:
    """The project's ``.flor`` directory (FlorDB's ``flor.HOMEDIR``), created git-ignored if missing."""
    from .config import load_config
    from .store import ignore_flor_dir

    config = config or load_config()
    # FlorDB creates its HOMEDIR at import; scripts save files straight into it.
    ignore_flor_dir(config)
    return config.flor_dir


# Constant SQL, written out. `logs` is a TEMP view named like the table, which SQLite resolves
# first. During a replay asof.py has already shadowed `logs` with a view over `temp.as_of_logs`
# (the rows the replayed run could see); the FlorDB-shaped `logs` then reads those rows instead
# of the store's, so the two compose. `flordb_logs` reads `temp.logs` and the unqualified `runs`
# (asof.py's view of the runs during a replay, the table otherwise).
# Both read every row `logs` held before schema 7: its rows and the packed chunks expanded
# (packedlogs.py), in the table's order (run, name, source, seq), as a scan of the table gave them.
_LOGS_VIEW = "CREATE TEMP VIEW logs AS SELECT *, name AS value_name, kind AS value_type FROM ({}) ORDER BY run_id, name, source, seq"
_FLORDB_LOGS = (
    "CREATE TEMP VIEW flordb_logs AS SELECT r.projid AS projid, r.tstamp AS tstamp, r.filename AS filename, "
    "CASE WHEN l.ctx_id = 0 THEN NULL ELSE l.ctx_id END AS ctx_id, l.name AS value_name, l.value AS value, "
    "l.kind AS value_type, l.run_id AS run_id FROM temp.logs AS l JOIN runs AS r ON r.run_id = l.run_id"
)


def add_flordb_views(conn: sqlite3.Connection) -> None:
    """Give ``conn`` FlorDB's column names beside ours (see the module docstring); call after asof.py."""
    from .packedlogs import ALL_LOGS_OVER_AS_OF, ALL_LOGS_OVER_STORE, register_chunk_function

    register_chunk_function(conn)
    as_of = conn.execute("SELECT 1 FROM temp.sqlite_master WHERE type = 'view' AND name = 'as_of_logs'").fetchone()
    if as_of is not None:
        conn.execute("DROP VIEW temp.logs")
        conn.execute(_LOGS_VIEW.format(ALL_LOGS_OVER_AS_OF))
    else:
        conn.execute(_LOGS_VIEW.format(ALL_LOGS_OVER_STORE))
    conn.execute(_FLORDB_LOGS)


#: SQLite's own refusals to change a view, raised before the query's authorizer is asked.
_VIEW_WRITE_ERRORS = ("because it is a view", "column to a view", "views may not be indexed")


def refused_view_write(exc: sqlite3.Error) -> str | None:
    """What a statement tried on one of these read-only views, from SQLite's error; None for other errors."""
    text = str(exc)
    if any(fragment in text.lower() for fragment in _VIEW_WRITE_ERRORS):
        return f"change a read-only view ({text})"
    return None
