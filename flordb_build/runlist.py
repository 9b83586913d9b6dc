"""The runs table: one row per run with its status, time, args and final run-level values.

What ``flordb-build runs`` prints and the UI's Runs page shows. The values come from
``flor.dataframe()`` (no names: one row per run with every run-level value) read over a read-only
connection, so ``where=`` means exactly what it means there; the ``runs`` rows add status, seconds
and snapshot. Columns, in order::

    run_id  tstamp  task  filename  status  seconds  <args...>  <values...>

Args are the names a run read with ``flor.arg`` (``runs.args``); values are the other names
logged at run level (final metrics). Both keep their types (integers stay integers).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import QueryError
from .expression import parse_where
from .store import Store
from .team._protocol import SQLiteReader, StoreReader, ViewReader, as_view_reader

if TYPE_CHECKING:
    import pandas as pd

FIXED_COLUMNS = ("run_id", "tstamp", "task", "filename", "status", "seconds")
DEFAULT_SORT = "tstamp"
_RUN_ID = re.compile(r"^[0-9a-f]{1,32}$")


@dataclass(frozen=True)
class RunList:
    """A page of the runs table, and what it was cut from."""

    frame: pd.DataFrame
    total: int
    arg_names: tuple[str, ...]
    value_names: tuple[str, ...]
    extra: pd.DataFrame  # per row of ``frame``: exit_code, snapshot, pipeline_id, divergent (names or None)


def read_run_table(store: Store | StoreReader, where: str | None = None) -> RunList:
    """Every run (newest first) with status, seconds, args and run-level values; ``where`` filters.

    :param store: the local store, or any store's reader (the team store's: ``runs --team``).
    """
    import pandas as pd

    from .query import read_dataframe

    reader = SQLiteReader(store.conn, store) if isinstance(store, Store) else store
    expression = parse_where(where) if where is not None else None
    values = read_dataframe(reader, (), expression)
    # run_id, status, seconds, exit_code, args, snapshot, pipeline_id, started (RUN_FACT_COLUMNS)
    rows = reader.run_facts()
    facts = {r[0]: r for r in rows}
    divergent = reader.divergent_names()
    arg_names: dict[str, None] = {}
    for row in rows:
        for name in _arg_names(row[4]):
            arg_names.setdefault(name, None)
    logged = [c for c in values.columns if c not in ("projid", "run_id", "tstamp", "task", "filename")]
    args = tuple(n for n in arg_names if n in logged)
    rest = tuple(n for n in logged if n not in arg_names)
    run_ids = values["run_id"].tolist()
    out = pd.DataFrame(
        {
            "run_id": values["run_id"],
            "tstamp": values["tstamp"],
            "task": values["task"],
            "filename": values["filename"],
            "status": pd.Series([facts[r][1] if r in facts else None for r in run_ids], dtype=object),
            "seconds": pd.Series([facts[r][2] if r in facts else None for r in run_ids], dtype="float64"),
        }
    )
    for name in (*args, *rest):
        out[name] = values[name]
    extra = pd.DataFrame(
        {
            "exit_code": pd.array([facts[r][3] if r in facts else None for r in run_ids], dtype="Int64"),
            "snapshot": pd.Series([facts[r][5] if r in facts else None for r in run_ids], dtype=object),
            "pipeline_id": pd.Series([facts[r][6] if r in facts else None for r in run_ids], dtype=object),
            "divergent": pd.Series([divergent.get(r) for r in run_ids], dtype=object),
        }
    )
    order = sort_positions(out, DEFAULT_SORT, descending=True)
    out, extra = out.iloc[order].reset_index(drop=True), extra.iloc[order].reset_index(drop=True)
    return RunList(out, len(out), args, rest, extra)


def divergent_marks(store: Store | ViewReader, run_id: str) -> dict[str, str]:
    """The run's replayed names written with --accept-divergent, each with why it diverged."""
    return as_view_reader(store).divergent_marks(run_id)


def select_runs(
    table: RunList,
    *,
    task: str | None = None,
    status: str | None = None,
    pipeline: str | None = None,
    sort: str | None = None,
    descending: bool = True,
    offset: int = 0,
    limit: int | None = None,
) -> RunList:
    """The rows of ``table`` for one task/status/pipeline, sorted by ``sort``, one page of them.

    :raises QueryError: for a sort column the table does not have.
    """
    frame, extra = table.frame, table.extra
    keep = [True] * len(frame)
    for column, wanted, source in (("task", task, frame), ("status", status, frame), ("pipeline_id", pipeline, extra)):
        if wanted is not None:
            keep = [k and v == wanted for k, v in zip(keep, source[column].tolist(), strict=True)]
    frame, extra = frame[keep].reset_index(drop=True), extra[keep].reset_index(drop=True)
    if sort is not None and sort != DEFAULT_SORT or not descending:
        column = sort or DEFAULT_SORT
        if column not in frame.columns:
            raise QueryError(f"Cannot sort runs by '{column}': the columns are {', '.join(frame.columns)}.")
        order = sort_positions(frame, column, descending)
        frame, extra = frame.iloc[order].reset_index(drop=True), extra.iloc[order].reset_index(drop=True)
    total = len(frame)
    end = None if limit is None else offset + limit
    page = slice(offset, end)
    return RunList(
        frame.iloc[page].reset_index(drop=True), total, table.arg_names, table.value_names,
        extra.iloc[page].reset_index(drop=True),
    )


def run_level_values(store: Store | StoreReader, run_id: str) -> dict[str, Any]:
    """One run's run-level values (args and final metrics) as ``flor.dataframe()`` reads them."""
    from .query import read_dataframe
    from .table import is_missing

    if not _RUN_ID.match(run_id):
        raise QueryError(f"'{run_id}' is not a run id; list run ids with 'flordb-build runs'.")
    reader = SQLiteReader(store.conn, store) if isinstance(store, Store) else store
    frame = read_dataframe(reader, (), parse_where(f"run_id = '{run_id}'"))  # a checked hex id
    if frame.empty:
        return {}
    out = {}
    for column in frame.columns[5:]:
        value = frame[column].iloc[0]
        if not is_missing(value):
            out[str(column)] = value.item() if hasattr(value, "item") else value
    return out


def sort_positions(frame: pd.DataFrame, column: str, descending: bool) -> list[int]:
    """Row positions sorting ``frame`` by ``column``; missing values last, either direction."""
    values = frame[column].tolist()
    present = [i for i, v in enumerate(values) if not _missing(v)]
    absent = [i for i, v in enumerate(values) if _missing(v)]
    try:
        present.sort(key=lambda i: values[i], reverse=descending)
    except TypeError:  # a column mixing kinds (numbers and text): order by kind, then value
        present.sort(key=lambda i: _mixed_key(values[i]), reverse=descending)
    return present + absent


def _mixed_key(value: Any) -> tuple[int, Any]:
    if isinstance(value, int | float):
        return (0, float(value))
    return (1, json.dumps(value, default=str) if isinstance(value, list | dict) else str(value))


def _missing(value: Any) -> bool:
    from .table import is_missing

    return is_missing(value)


def _arg_names(text: str | None) -> Sequence[str]:
    try:
        args = json.loads(text) if text else {}
    except ValueError:
        return ()
    return list(args) if isinstance(args, dict) else ()
