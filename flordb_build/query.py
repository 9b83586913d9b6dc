"""Reading the store back: ``dataframe`` (the pivot), ``latest``, and read-only ``query``.

The pivot, for ``dataframe("loss", "val_acc")``::

    run ── epoch 0 ── step 0   loss        <- a leaf context: one row
       │          ├── step 1   loss        <- one row
       │          └── val_acc              <- logged above the leaves: repeats on both rows
       └── lr                              <- run level: repeats on every row of the run

A row is a context where a requested name was logged and below which no requested name was
logged; each name takes the value logged at that context or its nearest ancestor. Everything
after the two SELECTs is numpy over integer positions, so a million log rows pivot in about a
second.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .errors import QueryError

# The store, its readers and the team protocol load on the first read: `import flordb_build` in a
# training script (which binds dataframe and query) pays for none of them (issue 14).
if TYPE_CHECKING:
    import sqlite3

    import pandas as pd

    from .config import Config
    from .expression import WhereExpression
    from .runtable import RunTable
    from .store import Store
    from .team._protocol import StoreReader

#: Seconds a where= filter or a query may run by default: sqlguard.DEFAULT_TIMEOUT_S, spelled out
#: here because importing sqlguard loads sqlite3 (tests/test_import_cost.py keeps the two equal).
DEFAULT_TIMEOUT_S = 60.0

def dataframe(
    *names: str,
    where: str | None = None,
    config: Config | None = None,
    timeout: float | None = DEFAULT_TIMEOUT_S,
    store: str = "local",
    remote: str | None = None,
) -> pd.DataFrame:
    """One row per distinct context of the requested names (see the module docstring).

    :param where: a SQL expression over the frame's columns, evaluated read-only.
    :param timeout: seconds the ``where`` filter may run (default 60; None: no limit).
    :param store: ``"local"`` (this clone's ``.flor/flor.db``) or ``"team"`` (the PostgreSQL team
        store every clone pushes to: ``flordb-build push``); the frame has the same shape either way.
    :param remote: the name of the team store (``[tool.flordb_build.remotes.NAME]``) when several are set.
    """
    from .asof import as_of_replay
    from .config import load_config
    from .expression import parse_where
    from .reader import open_read_only
    from .runtable import RUN_COLUMNS
    from .team._protocol import SQLiteReader

    for name in names:
        if not isinstance(name, str) or not name:
            raise QueryError(f"dataframe() takes names as non-empty strings, got {name!r}.")
        if name in RUN_COLUMNS:
            raise QueryError(f"'{name}' is always a column of the dataframe; request logged names only.")
    expression = parse_where(where) if where is not None else None
    config = config or load_config()
    if check_store_kind(store) == "team":
        from .team import open_team_reader

        with open_team_reader(config, remote) as team:
            frame = read_dataframe(team, names, expression, timeout=timeout)
            warn_incomplete_runs(team, frame)
            return frame
    # A replayed script reads what its run read (asof.py).
    local = open_read_only(config, prepare=lambda s: as_of_replay(s.conn))
    if local is None:
        return _empty_frame(list(names))
    try:
        reader = SQLiteReader(local.conn, local)
        frame = read_dataframe(reader, names, expression, timeout=timeout)
        warn_incomplete_runs(reader, frame)
        return frame
    finally:
        local.close()


def check_store_kind(store: str) -> str:
    """``store`` when it is one the readers know ("local" or "team").

    :raises QueryError: for anything else.
    """
    if store not in ("local", "team"):
        raise QueryError(f"store must be 'local' or 'team', got {store!r}.")
    return store


def warn_incomplete_runs(reader: StoreReader, frame: pd.DataFrame) -> None:
    """One warning when the frame draws on runs whose rows could not all be stored (recording.py:
    status ``incomplete``), so that a missing value is never mistaken for one never logged."""
    incomplete = reader.incomplete_run_ids()
    shown = sorted(incomplete.intersection(frame["run_id"])) if incomplete and len(frame) else []
    if shown:
        import warnings

        from .errors import FlorBuildWarning

        warnings.warn(
            f"run(s) {', '.join(shown)} were not fully recorded (status 'incomplete', runs.error says why): "
            "some of their values may be missing from this frame; 'flordb-build rebuild' restores what their "
            "journals hold.",
            FlorBuildWarning,
            stacklevel=3,
        )


def read_dataframe(
    source: sqlite3.Connection | StoreReader,
    names: Sequence[str],
    expression: WhereExpression | None = None,
    *,
    timeout: float | None = DEFAULT_TIMEOUT_S,
) -> pd.DataFrame:
    """``dataframe(*names)`` over a store's reader, or an open local connection (a read-only one
    works: this only reads). ``expression`` is evaluated here, the same way over every store."""
    from .expression import filter_rows

    reader = _as_reader(source)
    runs = reader.run_rows()
    if expression is not None and _reads_run_columns_only(expression):
        # The filter reads run columns only: apply it before reading any log row.
        runs = runs.take(filter_rows(expression, runs.columns, len(runs), timeout=timeout))
        expression = None
    if names:
        columns, filtered = _pivot(reader, runs, list(dict.fromkeys(names)), expression, timeout)
        if filtered:
            expression = None
    else:
        columns = _run_level(reader, runs)
    frame = _to_frame(columns)
    if expression is not None and len(frame):
        used = expression.columns_used(frame.columns)
        keep = filter_rows(
            expression, {c: frame[c].tolist() for c in used}, len(frame), frame_columns=list(frame.columns),
            timeout=timeout,
        )
        frame = frame.iloc[keep].reset_index(drop=True)
    return frame


# Words of SQL that are not column names; anything else an expression names might be a column.
_SQL_WORDS = frozenset(
    """and or not is null in like glob between case when then else end true false escape collate cast
    as exists nocase integer real text blob numeric regexp match distinct isnull notnull abs coalesce
    date datetime julianday strftime time ifnull iif instr length lower ltrim max min nullif printf
    round rtrim substr substring trim typeof upper unixepoch json_extract replace total sum avg count
    group_concat hex quote random sign""".split()
)


def _reads_run_columns_only(expression: WhereExpression) -> bool:
    """True when every identifier of the expression is a run column, a keyword or a function."""
    from .runtable import RUN_COLUMNS

    run_columns = {c.lower() for c in RUN_COLUMNS}
    return all(i.lower() in run_columns or i.lower() in _SQL_WORDS for i in expression.identifiers)


def _empty_frame(names: list[str]) -> pd.DataFrame:
    import pandas as pd

    from .runtable import RUN_COLUMNS

    return pd.DataFrame({c: pd.Series(dtype=object) for c in [*RUN_COLUMNS, *names]})


def _as_reader(source: sqlite3.Connection | StoreReader) -> StoreReader:
    """A reader over ``source``: a bare local connection reads through :class:`SQLiteReader`."""
    import sqlite3

    from .team._protocol import SQLiteReader

    if isinstance(source, sqlite3.Connection):
        return SQLiteReader(source)
    return source


def _pivot(
    reader: StoreReader, runs: RunTable, names: list[str], expression: WhereExpression | None, timeout: float | None
) -> tuple[dict[str, Any], bool]:
    """The frame's columns, and whether ``expression`` was applied already (over run and loop columns)."""
    from .blockpivot import BlockPivot, read_frame_inputs

    # Every store answers the same reads (values as typed parts, loops as blocks): one pivot.
    blocks, rows = read_frame_inputs(reader, runs.run_ids, names)
    pivot = BlockPivot(runs, names, blocks, rows)
    row_filter = None if expression is None else _dimension_filter(expression, runs, timeout)
    columns = pivot.columns(row_filter)
    return columns, pivot.filtered


def _dimension_filter(expression: WhereExpression, runs: RunTable, timeout: float | None) -> Any:
    """A blockpivot row filter for a ``where=`` that reads run and loop columns only.

    The expression is evaluated by filter_rows (the same guarded SQLite as every where=) once per
    *distinct combination* of the columns it reads, not once per row: ``epoch >= 8`` over 4M rows
    is 20 evaluations and a gather. Not for expressions that call random() (their value is not a
    function of the row) nor for anything reading a logged value or a loop's ``_value`` column.
    """
    import numpy as np

    from .expression import filter_rows
    from .runtable import RUN_COLUMNS

    if any(i.lower().startswith("random") for i in expression.identifiers):
        return None

    def keep(codes: Any, dimensions: dict[str, Any], frame_columns: list[str]) -> Any:
        used = expression.columns_used(frame_columns)
        mask = _comparison_mask(expression.text, {c: dimensions[c] for c in used if c in dimensions})
        if mask is not None:
            return np.flatnonzero(mask)
        coded: list[tuple[Any, list[Any]]] = []  # per used column: int codes per row, the value of each code
        for column in used:
            if column in RUN_COLUMNS:
                values = runs.columns[column]
                if column == "tstamp":
                    import pandas as pd

                    values = list(pd.to_datetime(pd.Series(values, dtype=object), format="ISO8601"))
                coded.append((codes, list(values)))
            elif column in dimensions and dimensions[column].dtype.kind == "i":
                iterations = dimensions[column]
                top = int(iterations.max()) + 1 if iterations.size else 0
                coded.append((iterations + 1, [None, *range(top)]))  # -1 (not in this loop) is NULL
            else:
                return None
        n_rows = len(codes)
        key = np.zeros(n_rows, dtype=np.int64)
        stride = 1
        for column_codes, levels in coded:
            if stride * len(levels) >= 2**62:
                return None
            key += column_codes * stride
            stride *= len(levels)
        distinct, inverse = np.unique(key, return_inverse=True) if stride > 4 * n_rows + 1024 else _dense(key, stride)
        combos: dict[str, list[Any]] = {}
        rest = distinct
        for column, (_codes, levels) in zip(used, coded, strict=True):
            combos[column] = [levels[i] for i in (rest % len(levels)).tolist()]
            rest = rest // len(levels)
        kept = filter_rows(expression, combos, len(distinct), frame_columns=frame_columns, timeout=timeout)
        chosen = np.zeros(len(distinct), dtype=bool)
        chosen[kept] = True
        return np.flatnonzero(chosen[inverse])

    return keep


# `epoch >= 8 AND step < 1000`: comparisons of a name with a plain number, joined by AND, nothing else.
_NUMBER = r"-?\d{1,15}(?:\.\d{1,15})?"
_COMPARISON = r'\s*("[A-Za-z_][A-Za-z0-9_]*"|[A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=|<>|!=|==|=|<|>)\s*(' + _NUMBER + r")\s*"


@functools.cache
def _comparison_patterns() -> tuple[re.Pattern[str], re.Pattern[str]]:
    """(one comparison, a conjunction of them): compiled on first use, not at `import flordb_build`."""
    return re.compile(_COMPARISON), re.compile(r"(?i)" + _COMPARISON + r"(?:\bAND\b" + _COMPARISON + r")*")


_COMPARE = {
    "<": "less", "<=": "less_equal", ">": "greater", ">=": "greater_equal",
    "=": "equal", "==": "equal", "!=": "not_equal", "<>": "not_equal",
}


def _comparison_mask(text: str, dimensions: dict[str, Any]) -> Any:
    """The rows where ``text``, a conjunction of loop column <op> number, holds, as numpy computes it;
    None for any other expression (filter_rows evaluates those).

    SQL's meaning is kept: a row outside a loop (-1, NULL in the frame) fails every comparison of it,
    and names match columns case-insensitively, as SQLite's do.
    """
    import numpy as np

    comparison, conjunction = _comparison_patterns()
    if not dimensions or conjunction.fullmatch(text) is None:
        return None
    by_lower = {name.lower(): column for name, column in dimensions.items()}
    mask = None
    for name, op, number in comparison.findall(text):
        column = by_lower.get(name.strip('"').lower() if name.startswith('"') else name.lower())
        if column is None or (name.startswith('"') and name.strip('"') not in dimensions):
            return None
        literal = float(number) if "." in number else int(number)
        held = getattr(np, _COMPARE[op])(column, literal) & (column >= 0)
        mask = held if mask is None else mask & held
    return mask


def _dense(key: Any, size: int) -> tuple[Any, Any]:
    """``np.unique(key, return_inverse=True)`` for keys in ``range(size)``, by a presence table."""
    import numpy as np

    present = np.zeros(size, dtype=bool)
    present[key] = True
    distinct = np.flatnonzero(present)
    position = np.cumsum(present) - 1
    return distinct, position[key]


def _run_level(reader: StoreReader, runs: RunTable) -> dict[str, Any]:
    """``dataframe()`` with no names: one row per run with every run-level name."""
    from .runtable import RUN_COLUMNS
    from .values import ValueKind, decode_value

    out: dict[str, Any] = {c: list(runs.columns[c]) for c in RUN_COLUMNS}
    scanned = _run_level_rows_by_run(reader)
    n_runs = len(runs)
    for position, run_id in enumerate(runs.run_ids):
        if scanned is None:
            rows = reader.run_level_rows(run_id)
            replayed = any(r[3] != "record" for r in rows)
        else:
            rows = scanned[0].get(run_id, [])
            replayed = run_id in scanned[1]
        # Replayed values first so that recorded ones, written after, take precedence.
        if replayed:
            rows = sorted(rows, key=lambda r: r[3] == "record")
        for name, value, kind, _source in rows:
            column = out.get(name)
            if column is None:
                column = out[name] = [None] * n_runs
            column[position] = value if kind == ValueKind.NATIVE else decode_value(value, kind)
    return out


def _run_level_rows_by_run(reader: StoreReader) -> tuple[dict[str, list[tuple[Any, ...]]], set[str]] | None:
    """Every run's run-level rows from one scan of the local store's run-level index (store.py),
    and the runs that have replayed ones; None where there is no such index (another store, a
    store made before it, a replay's as-of views)."""
    from .team._protocol import SQLiteReader

    if not isinstance(reader, SQLiteReader):
        return None
    from .store import RUN_LEVEL_ROWS_SQL, has_run_level_index

    conn = reader.conn
    if conn.execute("SELECT 1 FROM temp.sqlite_master WHERE name = 'logs'").fetchone() or not has_run_level_index(conn):
        return None
    from itertools import groupby
    from operator import itemgetter

    rows = conn.execute(RUN_LEVEL_ROWS_SQL).fetchall()  # ordered by run (the index's order)
    by_run = {run_id: [r[1:] for r in group] for run_id, group in groupby(rows, key=itemgetter(0))}
    return by_run, {r[0] for r in rows if r[4] != "record"}


def _to_frame(columns: dict[str, Any]) -> pd.DataFrame:
    import pandas as pd

    from .pivot import typed_series
    from .runtable import RUN_COLUMNS

    frame = pd.DataFrame(
        {
            # Run columns are text (or None) by construction: no need to infer their type.
            name: _run_series(name, values) if name in RUN_COLUMNS else typed_series(name, values)
            for name, values in columns.items()
        },
        copy=False,  # one block per column: consolidating 4M-row object columns costs a copy and a fill
    )
    if "tstamp" in frame and len(frame) and frame["tstamp"].dtype == object:
        frame["tstamp"] = pd.to_datetime(frame["tstamp"], format="ISO8601")
    return frame


def _run_series(name: str, values: Any) -> pd.Series:
    """A run column: text as objects; tstamp already parsed (per run, by the pivot) stays as it is."""
    import pandas as pd

    if isinstance(values, pd.DatetimeIndex):
        return pd.Series(values, name=name, copy=False)
    return pd.Series(values, dtype=object, name=name, copy=False)


def latest(df: pd.DataFrame) -> pd.DataFrame:
    """Keep the rows of the newest run for each ``(task, filename)``."""
    if df.empty:
        return df
    missing = [c for c in ("task", "filename", "tstamp") if c not in df.columns]
    if missing:
        raise QueryError(f"latest() needs a flor.dataframe with columns task, filename and tstamp; missing {missing}.")
    newest = df.groupby(["task", "filename"], dropna=False)["tstamp"].transform("max")
    return df[df["tstamp"] == newest].reset_index(drop=True)


# -- read-only SQL ------------------------------------------------------------------------------

_SAFE_PRAGMAS = frozenset({"table_info", "table_xinfo", "index_list", "index_info", "table_list"})
#: The most rows one query returns: a runaway query fills memory faster than its timeout ends it.
MAX_QUERY_ROWS = 10_000_000
_FETCH_ROWS = 50_000


def query(
    sql: str,
    params: Sequence[Any] | dict[str, Any] = (),
    config: Config | None = None,
    *,
    timeout: float | None = DEFAULT_TIMEOUT_S,
    store: str = "local",
    remote: str | None = None,
) -> pd.DataFrame:
    """Run one read-only SQL statement over the store with bound ``params``; return a dataframe.

    The statement may read and call SQLite's ordinary functions only (sqlguard.py); Ctrl-C stops it.
    With ``store="team"`` it runs on the team store in PostgreSQL's dialect (``%s`` placeholders),
    in a read-only transaction.

    :param timeout: seconds it may run (default 60; None: no limit).
    :raises QueryError: when the statement would write, calls another function, runs past
        ``timeout``, returns more than :data:`MAX_QUERY_ROWS` rows, or SQLite rejects it.
    """
    import sqlite3

    import pandas as pd

    from .compat import refused_view_write
    from .config import load_config
    from .reader import open_read_only
    from .sqlguard import StatementGuard

    if not isinstance(sql, str) or not sql.strip():
        raise QueryError("query() needs a SQL SELECT statement.")
    config = config or load_config()
    if check_store_kind(store) == "team":
        return _query_team(sql, params, config, remote, timeout)
    guard = StatementGuard(timeout, pragmas=_SAFE_PRAGMAS)
    local = open_read_only(config, prepare=_query_views)
    if local is None:
        raise QueryError(f"No flordb_build store at '{config.db_path}' yet; record a run first.")
    conn = local.conn
    shown = sql.strip()[:80]
    try:
        with guard.installed(conn):
            try:
                cursor = conn.execute(sql, params)
                rows: list[Any] = []
                while chunk := cursor.fetchmany(_FETCH_ROWS):
                    rows.extend(chunk)
                    if len(rows) > MAX_QUERY_ROWS:
                        raise QueryError(
                            f"query returned more than {MAX_QUERY_ROWS:,} rows ('{shown}'); add a LIMIT or aggregate."
                        )
            except sqlite3.Error as exc:
                if guard.stopped(exc):
                    raise QueryError(
                        f"query stopped after its timeout of {guard.timeout:g} s ('{shown}'); narrow it, or allow "
                        "more time with timeout=... (flordb-build query --timeout SECONDS)."
                    ) from exc
                refused = guard.refused or refused_view_write(exc)
                if refused:
                    raise QueryError(
                        f"query() is read-only: the statement tries to {refused} ('{shown}'). "
                        "Use SELECT with SQLite's ordinary functions; record data with flor.log."
                    ) from exc
                raise QueryError(f"query failed: {exc} in '{sql.strip()[:200]}'.") from exc
            except (ValueError, sqlite3.Warning) as exc:
                raise QueryError(f"query failed: {exc}.") from exc
    finally:
        local.close()
    columns = [d[0] for d in cursor.description or ()]
    frame = pd.DataFrame.from_records(rows, columns=columns)
    return keep_integers(frame, rows)


def _query_team(
    sql: str, params: Sequence[Any] | dict[str, Any], config: Config, remote: str | None, timeout: float | None
) -> pd.DataFrame:
    import pandas as pd

    from .team import open_team_reader
    from .team._postgres import query_team

    with open_team_reader(config, remote) as team:
        columns, rows = query_team(team.conn, sql, params, timeout=timeout, max_rows=MAX_QUERY_ROWS)
    return keep_integers(pd.DataFrame.from_records(rows, columns=columns), rows)


def _query_views(store: Store) -> None:
    """The TEMP views ``query`` reads through, made before its connection turns query-only."""
    from .asof import as_of_replay
    from .compat import add_flordb_views
    from .reader import show_dead_runs_killed

    as_of_replay(store.conn)  # a replayed script reads what its run read (asof.py)
    show_dead_runs_killed(store)  # a dead run reads 'killed', as a writer would have marked it
    add_flordb_views(store.conn)  # FlorDB's column names beside ours (compat.py)


def keep_integers(frame: pd.DataFrame, rows: Sequence[Sequence[Any]]) -> pd.DataFrame:
    """Integer columns with NULLs as pandas' nullable ``Int64`` (from_records makes them floats)."""
    import pandas as pd

    for position in range(frame.shape[1]):
        if frame.dtypes.iloc[position].kind != "f" or not frame.iloc[:, position].isna().any():
            continue
        values = [row[position] for row in rows]
        if all(v is None or type(v) is int for v in values) and any(v is not None for v in values):
            frame.isetitem(position, pd.array(values, dtype="Int64"))
    return frame
