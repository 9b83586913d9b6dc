"""Guards for SQL that someone else wrote (``flor.query``, ``where=``): it may read, call ordinary
functions, and run for a bounded time, and Ctrl-C stops it.

Without them a recursive CTE runs forever and ignores Ctrl-C (SQLite's C loop never returns to
the interpreter), ``randomblob(1e8)`` per row takes seconds, and ``fts3_tokenizer('simple')``
hands out a native memory address. The guard is three SQLite hooks on one connection::

    authorizer         every action of the statement, at prepare time: reads yes, writes no,
                       functions only from ALLOWED_FUNCTIONS
    progress handler   every PROGRESS_OPS virtual-machine steps: past the deadline -> stop.
                       It is Python code, so a pending Ctrl-C runs there too; SQLite then stops
                       the statement ("interrupted") and we raise KeyboardInterrupt again
    length limit       no string or BLOB beyond MAX_VALUE_BYTES is ever built

Action names come from :data:`AUTHORIZER_ACTIONS`, SQLite's table of authorizer action codes
(https://sqlite.org/c3ref/c_alter_table.html), never from the ``sqlite3`` module's constants:
those mix in other code families (``SQLITE_LIMIT_*``), and ``DELETE`` (9) read as "limit
variable number".
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import QueryError

#: Seconds a query or a ``where=`` filter may run unless the caller says otherwise.
DEFAULT_TIMEOUT_S = 60.0
#: Virtual-machine steps between two checks of the deadline and of a pending Ctrl-C: about 1%
#: overhead on a scan. A ``where=`` filter checks fifty times as often: its frame has few rows, and
#: one row of a heavy expression is only a few steps.
PROGRESS_OPS = 1_000
WHERE_PROGRESS_OPS = 20
#: The longest string or BLOB a guarded statement may build or read (bigger than any logged value).
MAX_VALUE_BYTES = 64 * 1024 * 1024

# Authorizer action codes (sqlite3.h: SQLITE_COPY .. SQLITE_RECURSIVE).
CREATE_INDEX, CREATE_TABLE, CREATE_TEMP_INDEX, CREATE_TEMP_TABLE = 1, 2, 3, 4
CREATE_TEMP_TRIGGER, CREATE_TEMP_VIEW, CREATE_TRIGGER, CREATE_VIEW = 5, 6, 7, 8
DELETE, DROP_INDEX, DROP_TABLE, DROP_TEMP_INDEX, DROP_TEMP_TABLE = 9, 10, 11, 12, 13
DROP_TEMP_TRIGGER, DROP_TEMP_VIEW, DROP_TRIGGER, DROP_VIEW = 14, 15, 16, 17
INSERT, PRAGMA, READ, SELECT, TRANSACTION, UPDATE, ATTACH, DETACH = 18, 19, 20, 21, 22, 23, 24, 25
ALTER_TABLE, REINDEX, ANALYZE, CREATE_VTABLE, DROP_VTABLE, FUNCTION, SAVEPOINT, RECURSIVE = (
    26, 27, 28, 29, 30, 31, 32, 33,
)
#: What each action code does, as the words of a message ("the statement tries to ...").
AUTHORIZER_ACTIONS: dict[int, str] = {
    0: "copy data",
    CREATE_INDEX: "create the index '{arg1}'",
    CREATE_TABLE: "create the table '{arg1}'",
    CREATE_TEMP_INDEX: "create the temporary index '{arg1}'",
    CREATE_TEMP_TABLE: "create the temporary table '{arg1}'",
    CREATE_TEMP_TRIGGER: "create the temporary trigger '{arg1}'",
    CREATE_TEMP_VIEW: "create the temporary view '{arg1}'",
    CREATE_TRIGGER: "create the trigger '{arg1}'",
    CREATE_VIEW: "create the view '{arg1}'",
    DELETE: "delete rows from '{arg1}'",
    DROP_INDEX: "drop the index '{arg1}'",
    DROP_TABLE: "drop the table '{arg1}'",
    DROP_TEMP_INDEX: "drop the temporary index '{arg1}'",
    DROP_TEMP_TABLE: "drop the temporary table '{arg1}'",
    DROP_TEMP_TRIGGER: "drop the temporary trigger '{arg1}'",
    DROP_TEMP_VIEW: "drop the temporary view '{arg1}'",
    DROP_TRIGGER: "drop the trigger '{arg1}'",
    DROP_VIEW: "drop the view '{arg1}'",
    INSERT: "insert rows into '{arg1}'",
    PRAGMA: "run 'PRAGMA {arg1}'",
    READ: "read '{arg1}'",
    SELECT: "select",
    TRANSACTION: "{arg1} a transaction",
    UPDATE: "update '{arg2}' of '{arg1}'",
    ATTACH: "attach the database '{arg1}'",
    DETACH: "detach the database '{arg1}'",
    ALTER_TABLE: "alter the table '{arg2}'",
    REINDEX: "reindex '{arg1}'",
    ANALYZE: "analyze '{arg1}'",
    CREATE_VTABLE: "create the virtual table '{arg1}'",
    DROP_VTABLE: "drop the virtual table '{arg1}'",
    FUNCTION: "call the function '{arg2}()', which is not one of SQLite's ordinary functions",
    SAVEPOINT: "{arg1} the savepoint '{arg2}'",
    RECURSIVE: "use a recursive query",
}

#: SQLite's ordinary scalar, aggregate, window, date, math and JSON functions. Left out: what
#: makes data out of nothing (randomblob, zeroblob), reaches outside SQL (load_extension,
#: fts3_tokenizer, which returns a native pointer) or reports on the connection. Plus the pure
#: function with which the query connection's ``logs`` view expands packed chunks (packedlogs.py).
ALLOWED_FUNCTIONS = frozenset(
    """
    abs char coalesce concat concat_ws format glob hex ifnull iif instr length like likelihood likely lower
    ltrim max min nullif octet_length printf quote random replace round rtrim sign soundex sqlite_version
    substr substring trim typeof unhex unicode unlikely upper
    avg count group_concat string_agg sum total
    row_number rank dense_rank percent_rank cume_dist ntile lag lead first_value last_value nth_value
    date time datetime julianday unixepoch strftime timediff current_date current_time current_timestamp
    acos acosh asin asinh atan atan2 atanh ceil ceiling cos cosh degrees exp floor ln log log10 log2 mod pi
    pow power radians sin sinh sqrt tan tanh trunc
    json jsonb json_array jsonb_array json_array_length json_error_position json_extract jsonb_extract
    json_insert jsonb_insert json_object jsonb_object json_patch jsonb_patch json_pretty json_remove
    jsonb_remove json_replace jsonb_replace json_set jsonb_set json_type json_valid json_quote
    json_group_array jsonb_group_array json_group_object jsonb_group_object -> ->>
    flor_chunk_rows
    """.split()
)


_SCHEMA_TABLES = frozenset({"sqlite_master", "sqlite_schema", "sqlite_temp_master", "sqlite_temp_schema"})


def describe_action(action: int, arg1: str | None, arg2: str | None) -> str:
    """What an authorizer action does, in words (``delete rows from 'runs'``)."""
    if action in (INSERT, UPDATE, DELETE) and (arg1 or "").lower() in _SCHEMA_TABLES:
        # CREATE/DROP/ALTER ask first about the schema table they rewrite, and stop at its refusal.
        return "change the database schema"
    template = AUTHORIZER_ACTIONS.get(action, f"perform SQLite action {action}")
    return template.format(arg1=(arg1 or "").lower() if action in (TRANSACTION, SAVEPOINT) else arg1, arg2=arg2)


class StatementGuard:
    """The three hooks of the module docstring for one statement at a time on one connection.

    :param timeout: seconds the statement may run (None: no limit).
    :param readable: the only tables it may read (None: any table).
    :param pragmas: pragmas it may run, with no argument (``table_info`` and the like).
    :param progress_ops: virtual-machine steps between two checks of the deadline and Ctrl-C.
    """

    def __init__(
        self,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        readable: frozenset[str] | None = None,
        pragmas: frozenset[str] = frozenset(),
        progress_ops: int = PROGRESS_OPS,
    ) -> None:
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0):
            raise QueryError(f"timeout must be a positive number of seconds, or None for no limit; got {timeout!r}.")
        self.timeout = timeout
        self.readable = readable
        self.pragmas = pragmas
        self.progress_ops = progress_ops
        self.refused: str | None = None
        self.timed_out = False
        self._deadline = float("inf")

    def authorize(self, action: int, arg1: str | None, arg2: str | None, db: str | None, trigger: str | None) -> int:
        """The authorizer callback: reads and ordinary functions only."""
        if action in (SELECT, RECURSIVE):
            return sqlite3.SQLITE_OK
        if action == READ and (self.readable is None or arg1 in self.readable):
            return sqlite3.SQLITE_OK
        if action == FUNCTION and (arg2 or "").lower() in ALLOWED_FUNCTIONS:
            return sqlite3.SQLITE_OK
        if action == PRAGMA and arg1 in self.pragmas and arg2 is None:
            return sqlite3.SQLITE_OK
        if self.refused is None:
            self.refused = describe_action(action, arg1, arg2)
        return sqlite3.SQLITE_DENY

    def _progress(self) -> int:
        # A Ctrl-C that arrives while SQLite runs is handled on entry to this function: the
        # KeyboardInterrupt aborts the statement, and sqlite3 swallows it (see stopped()).
        if time.monotonic() > self._deadline:
            self.timed_out = True
            return 1
        return 0

    @contextmanager
    def installed(self, conn: sqlite3.Connection) -> Iterator[StatementGuard]:
        """Guard ``conn`` while the block prepares, runs and fetches its statement."""
        self.refused, self.timed_out = None, False
        self._deadline = time.monotonic() + self.timeout if self.timeout is not None else float("inf")
        previous_length = conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES)
        conn.set_authorizer(self.authorize)
        conn.set_progress_handler(self._progress, self.progress_ops)
        try:
            yield self
        finally:
            conn.set_progress_handler(None, self.progress_ops)
            conn.set_authorizer(None)
            conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, previous_length)

    def stopped(self, exc: sqlite3.Error) -> bool:
        """True when ``exc`` is the guard stopping the statement at its deadline.

        :raises KeyboardInterrupt: when it was Ctrl-C that stopped it (the one sqlite3 swallowed).
        """
        if getattr(exc, "sqlite_errorname", None) != "SQLITE_INTERRUPT":
            return False
        if self.timed_out:
            return True
        raise KeyboardInterrupt from exc
