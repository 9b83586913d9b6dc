"""The runs a dataframe draws on: read once from ``runs``, shared by ``query.py`` and ``pivot.py``.

Its own module so both import it one way (query -> pivot -> runtable, query -> runtable) and so
reading it needs neither numpy nor pandas.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

#: The columns every dataframe starts with, in this order.
RUN_COLUMNS = ("projid", "run_id", "tstamp", "task", "filename")


@dataclass(frozen=True)
class RunTable:
    """The runs a frame draws on, ordered by tstamp, as parallel lists."""

    columns: dict[str, list[Any]]

    @property
    def run_ids(self) -> list[str]:
        return self.columns["run_id"]

    def __len__(self) -> int:
        return len(self.run_ids)

    def take(self, positions: Sequence[int]) -> RunTable:
        return RunTable({k: [v[i] for i in positions] for k, v in self.columns.items()})


def read_run_rows(conn: sqlite3.Connection) -> RunTable:
    """Every run's :data:`RUN_COLUMNS`, ordered by tstamp."""
    rows = conn.execute("SELECT projid, run_id, tstamp, task, filename FROM runs ORDER BY tstamp").fetchall()
    return RunTable({c: [r[i] for r in rows] for i, c in enumerate(RUN_COLUMNS)})
