"""``where=`` filters: one SQL expression over a dataframe's columns, checked and run read-only.

The expression never reaches the store's query. It is tokenized and refused unless it is a
single expression (no statement separators, no comments, no parentheses that close what they
did not open, no statement keywords), then evaluated in a private in-memory SQLite database
that holds only the frame's referenced columns, under sqlguard.py's guard: nothing but reading
that one table with SQLite's ordinary functions, for a bounded time. ``where="1=1; DROP TABLE
runs"`` is refused before it runs, and could not reach the store if it did run.
"""

from __future__ import annotations

import math
import re
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ExpressionError
from .sqlguard import DEFAULT_TIMEOUT_S, WHERE_PROGRESS_OPS, StatementGuard

_TOKEN = re.compile(
    r"""
      (?P<space>\s+)
    | (?P<string>'(?:[^']|'')*')
    | (?P<quoted>"(?:[^"]|"")*"|\[[^\]]*\]|`(?:[^`]|``)*`)
    | (?P<blob>[xX]'[0-9A-Fa-f]*')
    | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
    | (?P<word>[A-Za-z_][A-Za-z0-9_$]*)
    | (?P<comment>--|/\*)
    | (?P<param>[?:@$])
    | (?P<op>\|\||<<|>>|<=|>=|==|!=|<>|[-+*/%<>=~&|(),.])
    | (?P<other>.)
    """,
    re.VERBOSE | re.DOTALL,
)

# Words that only make sense in a statement, never inside one expression over one table.
STATEMENT_WORDS = frozenset(
    """SELECT FROM UNION INTERSECT EXCEPT WITH INSERT UPDATE DELETE DROP CREATE ALTER ATTACH DETACH
    PRAGMA VACUUM REINDEX ANALYZE BEGIN COMMIT ROLLBACK SAVEPOINT RELEASE INTO VALUES""".split()
)
HINT = "write one SQL expression over the dataframe's columns, e.g. \"epoch >= 1 AND task = 'train'\""

FRAME_TABLE = "frame"
ROW_COLUMN = "__flor_row__"
_NO_SUCH_COLUMN = re.compile(r"no such column: (.+)$")


@dataclass(frozen=True)
class WhereExpression:
    """A checked ``where=`` text and the identifiers it mentions."""

    text: str
    identifiers: frozenset[str]

    def columns_used(self, columns: Iterable[str]) -> list[str]:
        """The frame columns this expression reads, in the frame's order."""
        return [c for c in columns if c in self.identifiers or c.lower() in self.identifiers]


def parse_where(text: str) -> WhereExpression:
    """Check that ``text`` is one SQL expression; return it with the identifiers it names.

    :raises ExpressionError: for empty text, ``;``, comments, bound parameters, unbalanced
        parentheses, unterminated quotes (they fall into the ``other`` token) or statement keywords.
    """
    if not isinstance(text, str) or not text.strip():
        raise ExpressionError(f"where= is empty; {HINT}.")
    depth = 0
    identifiers: set[str] = set()
    for match in _TOKEN.finditer(text):
        kind, token = match.lastgroup, match.group()
        if kind == "comment":
            raise ExpressionError(f"where= may not contain SQL comments ('{token}'); {HINT}.")
        if kind == "param":
            raise ExpressionError(f"where= may not contain bound parameters ('{token}'); {HINT}.")
        if kind == "other":
            what = "';' (one expression, not statements)" if token == ";" else f"'{token}'"
            raise ExpressionError(f"where= may not contain {what}: '{text}'; {HINT}.")
        if kind == "word":
            if token.upper() in STATEMENT_WORDS:
                raise ExpressionError(f"where= may not contain '{token}': '{text}'; {HINT}.")
            identifiers.add(token)
            identifiers.add(token.lower())
        elif kind == "quoted":
            identifiers.add(unquote_identifier(token))
        elif token == "(":
            depth += 1
        elif token == ")":
            depth -= 1
            if depth < 0:
                raise ExpressionError(f"where= closes a parenthesis it did not open: '{text}'; {HINT}.")
    if depth != 0:
        raise ExpressionError(f"where= has an unclosed parenthesis: '{text}'; {HINT}.")
    return WhereExpression(text=text, identifiers=frozenset(identifiers))


def unquote_identifier(token: str) -> str:
    if token[0] == "[":
        return token[1:-1]
    quote = token[0]
    return token[1:-1].replace(quote * 2, quote)


def quote_identifier(name: str) -> str:
    """A double-quoted SQL identifier; safe for any name without NUL."""
    if "\x00" in name:
        raise ExpressionError(f"column name {name!r} contains NUL.")
    return '"' + name.replace('"', '""') + '"'


def sql_value(value: Any) -> Any:
    """A frame cell as SQLite can bind it (NaN/NaT -> NULL, bool -> 0/1, objects -> text)."""
    if value is None or type(value).__name__ in ("NAType", "NaTType"):
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | str | bytes):
        return value
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return sql_value(value.item())
    if hasattr(value, "isoformat"):
        return None if str(value) == "NaT" else value.isoformat(sep="T", timespec="microseconds")
    return str(value)


def filter_rows(
    expression: WhereExpression,
    columns: Mapping[str, Sequence[Any]],
    n_rows: int,
    *,
    frame_columns: Sequence[str] | None = None,
    timeout: float | None = DEFAULT_TIMEOUT_S,
) -> list[int]:
    """Evaluate ``expression`` over the given columns; return the positions of the matching rows.

    It runs under the same guard as ``flor.query`` (sqlguard.py): it reads the frame only, calls
    SQLite's ordinary functions only, stops at ``timeout`` seconds and on Ctrl-C.

    :param columns: frame columns by name; those the expression reads must be among them.
    :param frame_columns: every column of the frame, for messages (default: ``columns``).
    """
    guard = StatementGuard(timeout, readable=frozenset({FRAME_TABLE}), progress_ops=WHERE_PROGRESS_OPS)
    used = expression.columns_used(columns)
    conn = sqlite3.connect(":memory:")
    try:
        col_defs = ", ".join([ROW_COLUMN + " INTEGER"] + [quote_identifier(c) for c in used])
        conn.execute("CREATE TABLE " + FRAME_TABLE + " (" + col_defs + ")")
        placeholders = ", ".join("?" for _ in range(len(used) + 1))
        data = [columns[c] for c in used]
        conn.executemany(
            "INSERT INTO " + FRAME_TABLE + " VALUES (" + placeholders + ")",  # noqa: S608 - constants
            ((i, *(sql_value(col[i]) for col in data)) for i in range(n_rows)),
        )
        sql = "SELECT " + ROW_COLUMN + " FROM " + FRAME_TABLE + " WHERE (" + expression.text + ")"  # noqa: S608
        with guard.installed(conn):
            try:
                return [row for (row,) in conn.execute(sql)]
            except sqlite3.Error as exc:
                known = list(frame_columns if frame_columns is not None else columns)
                raise evaluation_error(expression, exc, guard, known) from exc
    finally:
        conn.close()


def evaluation_error(
    expression: WhereExpression, exc: sqlite3.Error, guard: StatementGuard, frame_columns: Sequence[str]
) -> ExpressionError:
    """The message for a ``where=`` that SQLite refused or stopped: what, and what to write instead."""
    text = expression.text
    listed = ", ".join(frame_columns) or "(none)"
    if guard.stopped(exc):
        return ExpressionError(
            f"where= '{text}' stopped after its timeout of {guard.timeout:g} s; simplify it, or allow more "
            "time with timeout=... (--timeout SECONDS)."
        )
    if guard.refused:
        return ExpressionError(f"where= '{text}' may not {guard.refused}; {HINT}.")
    missing = _NO_SUCH_COLUMN.match(str(exc))
    if missing:
        import difflib

        name = missing.group(1)
        close = difflib.get_close_matches(name, frame_columns, n=1) or difflib.get_close_matches(
            name.lower(), [c.lower() for c in frame_columns], n=1
        )
        guess = f"did you mean '{close[0]}'? " if close else ""
        return ExpressionError(f"where= '{text}': no such column '{name}'; {guess}Columns: {listed}.")
    return ExpressionError(f"where= '{text}' could not be evaluated: {exc}. Columns: {listed}.")
