"""Recorded values in two places, read as one: ``log_columns``' packed chunks and ``logs``' rows.

Since schema 7 a recorded float or int64 that a flush batch packs into an 'f8'/'i8' chunk is stored
in that chunk only (store.py's TABLES say why); ``logs`` keeps the rest (a 'rows' chunk's values,
replayed values). A value is in exactly one place, so a reader of recorded values must read both:

- :func:`packed_only`: the chunks of a name when they alone hold its recorded values (the fast path
  of the dataframe, the charts and push: arrays, no Python object per value);
- :func:`recorded_rows`: ``(seq, ctx_id, value, kind)`` of a name from both, in seq order, exactly as
  the ``logs`` rows of schema 6 read (a NaN as None: SQLite stored a NaN bound as REAL as NULL);
- :func:`recorded_names`, :func:`recorded_count`: what the rows alone no longer tell;
- :func:`add_all_logs_view`: for user SQL, a TEMP view of every row ``logs`` held before.

Plain SQL on unqualified ``logs``/``log_columns``, so asof.py's TEMP views (a replay's as-of store)
apply. Below store.py (which migrates old stores through :func:`migrate_chunks`); no numpy here.
"""

from __future__ import annotations

import sqlite3
from array import array
from collections.abc import Sequence
from typing import Any

from .progression import arithmetic_step

PACKED_FORMATS = ("f8", "i8")
_TYPECODES = {"f8": "d", "i8": "q"}

#: A name's packed chunks in seq order: ``(first_seq, count, seq_step, seqs, format, ctx_ids, vals)``.
CHUNKS_SQL = (
    "SELECT first_seq, count, seq_step, seqs, format, ctx_ids, vals FROM log_columns "
    "WHERE run_id = ? AND name = ? AND format IN ('f8', 'i8') ORDER BY first_seq"
)
_HAS_ROW_SQL = "SELECT 1 FROM logs WHERE run_id = ? AND name = ? AND source = 'record' LIMIT 1"
_ROWS_SQL = "SELECT seq, ctx_id, value, kind FROM logs WHERE run_id = ? AND name = ? AND source = 'record'"


def chunk_seqs(first_seq: int, count: int, seq_step: int | None, seqs: bytes | None) -> array[int]:
    """The exact seqs of a packed chunk."""
    if seqs is not None:
        out = array("q")
        out.frombytes(seqs)
        return out
    step = seq_step or 1
    return array("q", range(first_seq, first_seq + count * step, step))


def chunk_values(fmt: str, data: bytes) -> array[Any]:
    """The values of a packed chunk (float64 or int64)."""
    out = array(_TYPECODES[fmt])
    out.frombytes(data)
    return out


def expand_chunk(chunk: Sequence[Any]) -> list[tuple[int, int, Any, int]]:
    """``(seq, ctx_id, value, kind)`` rows of a :data:`CHUNKS_SQL` chunk, as ``logs`` rows read
    (a NaN as None, as SQLite returned a NaN it was given)."""
    first_seq, count, seq_step, seqs, fmt, ctx_ids, vals = chunk
    ctxs = chunk_values("i8", ctx_ids)
    values: list[Any] = chunk_values(fmt, vals).tolist()
    if fmt == "f8":
        values = [None if v != v else v for v in values]  # noqa: PLR0124 - v != v: NaN
    return list(zip(chunk_seqs(first_seq, count, seq_step, seqs), ctxs, values, [0] * len(values), strict=True))


def packed_only(conn: sqlite3.Connection, run_id: str, name: str) -> list[tuple[Any, ...]] | None:
    """The name's packed chunks (:data:`CHUNKS_SQL` rows) when they hold every recorded value of
    it, all of one format; None when some are `logs` rows (or there is nothing packed)."""
    chunks = conn.execute(CHUNKS_SQL, (run_id, name)).fetchall()
    if not chunks or len({c[4] for c in chunks}) != 1:
        return None
    if conn.execute(_HAS_ROW_SQL, (run_id, name)).fetchone() is not None:
        return None
    return chunks


def recorded_rows(conn: sqlite3.Connection, run_id: str, name: str) -> list[tuple[Any, ...]]:
    """Every recorded ``(seq, ctx_id, value, kind)`` of a name, from rows and chunks, in seq order."""
    rows = conn.execute(_ROWS_SQL, (run_id, name)).fetchall()
    for chunk in conn.execute(CHUNKS_SQL, (run_id, name)).fetchall():
        rows.extend(expand_chunk(chunk))
    rows.sort(key=lambda r: r[0])
    return rows


def recorded_names(conn: sqlite3.Connection, run_id: str, source: str | None = None) -> list[str]:
    """The names a run logged (of ``source``, else any), sorted: one index seek per name of
    ``logs`` (clustered by run and name) plus the names of packed chunks."""
    names: set[str] = set()
    where = "run_id = ?" if source is None else "run_id = ? AND source = ?"
    params: tuple[Any, ...] = (run_id,) if source is None else (run_id, source)
    # constant SQL: `where` is one of the two texts above
    row = conn.execute("SELECT min(name) FROM logs WHERE " + where, params).fetchone()  # noqa: S608
    while row is not None and row[0] is not None:
        names.add(row[0])
        row = conn.execute("SELECT min(name) FROM logs WHERE " + where + " AND name > ?", (*params, row[0])).fetchone()  # noqa: S608
    if source in (None, "record"):
        names.update(n for (n,) in conn.execute(
            "SELECT DISTINCT name FROM log_columns WHERE run_id = ? AND format IN ('f8', 'i8')", (run_id,)
        ))
    return sorted(names)


def recorded_count(conn: sqlite3.Connection, run_id: str) -> int:
    """How many values a run recorded: its `logs` rows of source 'record' and its packed values."""
    rows = conn.execute("SELECT count(*) FROM logs WHERE run_id = ? AND source = 'record'", (run_id,)).fetchone()[0]
    packed = conn.execute(
        "SELECT coalesce(sum(count), 0) FROM log_columns WHERE run_id = ? AND format IN ('f8', 'i8')", (run_id,)
    ).fetchone()[0]
    return int(rows) + int(packed)


def has_packed(conn: sqlite3.Connection, run_id: str, name: str) -> bool:
    """True when a name has a packed chunk in the run (whose values are never at run level)."""
    sql = "SELECT 1 FROM log_columns WHERE run_id = ? AND name = ? AND format IN ('f8', 'i8') LIMIT 1"
    return conn.execute(sql, (run_id, name)).fetchone() is not None


# -- user SQL -------------------------------------------------------------------------------------

CHUNK_JSON_FUNCTION = "flor_chunk_rows"


def _chunk_json(first_seq: int, count: int, seq_step: int | None, seqs: bytes | None, fmt: str, ctx_ids: bytes, vals: bytes) -> str:
    """A packed chunk as the JSON object ``{"seq:ctx": value, ...}`` that :data:`ALL_LOGS_OVER_STORE` expands.

    The seq and ctx of a row travel in its key: ``json_each`` hands a key over as plain text, which
    ``CAST`` and ``substr`` read, where three ``j.value ->> i`` per row rendered each row's array
    as text and parsed it again (most of a ``logs`` scan's SQLite time). Floats go as ``repr``, the
    shortest text that reads back as the same bits (SQLite's JSON parser does:
    tests/test_packed_logs.py), with an exponent or a decimal point, so 1.0 stays a REAL; a NaN goes
    as null (what SQLite stored for it), infinities as ``9e999`` (SQLite's own JSON for them). The
    text is joined, not a dict dumped, so that no row could ever collapse into another's key.
    """
    values = chunk_values(fmt, vals)
    text = "{" + ",".join(map('"{}:{}":{!r}'.format, chunk_seqs(first_seq, count, seq_step, seqs), chunk_values("i8", ctx_ids), values)) + "}"
    if fmt == "f8" and ("n" in text or "i" in text):  # nan, inf, -inf (keys are digits and ':')
        text = text.replace(":nan", ":null").replace(":inf", ":9e999").replace(":-inf", ":-9e999")
    return text


#: Every row ``logs`` held before schema 7 (constant SQL, written out): its rows and the packed
#: chunks expanded, of the store (``main``) or of asof.py's as-of views (``temp``).
ALL_LOGS_OVER_STORE = (
    "SELECT run_id, seq, ctx_id, name, value, kind, source FROM main.logs UNION ALL "
    "SELECT c.run_id, CAST(j.key AS INTEGER), CAST(substr(j.key, instr(j.key, ':') + 1) AS INTEGER), c.name, j.value, 0, 'record' FROM "
    "main.log_columns AS c, "
    "json_each(flor_chunk_rows(c.first_seq, c.count, c.seq_step, c.seqs, c.format, c.ctx_ids, c.vals)) AS j "
    "WHERE c.format IN ('f8', 'i8')"
)
ALL_LOGS_OVER_AS_OF = (
    "SELECT run_id, seq, ctx_id, name, value, kind, source FROM temp.as_of_logs UNION ALL "
    "SELECT c.run_id, CAST(j.key AS INTEGER), CAST(substr(j.key, instr(j.key, ':') + 1) AS INTEGER), c.name, j.value, 0, 'record' FROM "
    "temp.log_columns AS c, "
    "json_each(flor_chunk_rows(c.first_seq, c.count, c.seq_step, c.seqs, c.format, c.ctx_ids, c.vals)) AS j "
    "WHERE c.format IN ('f8', 'i8')"
)


def register_chunk_function(conn: sqlite3.Connection) -> None:
    """Give ``conn`` the SQL function :data:`ALL_LOGS_OVER_STORE` expands chunks with."""
    conn.create_function(CHUNK_JSON_FUNCTION, 7, _chunk_json, deterministic=True)


# -- migration from schema 6 ----------------------------------------------------------------------


def migrate_chunks(conn: sqlite3.Connection) -> int:
    """Schema 7, inside the caller's write transaction: give each old f8/i8 chunk its exact seqs,
    read from the `logs` rows it copied, and delete those rows; a chunk whose rows do not match it
    value for value (or that holds a run-level value) becomes a 'rows' chunk and keeps its rows.
    Returns how many rows moved into chunks."""
    moved = 0
    old = conn.execute(
        "SELECT run_id, name, first_seq, count, format, ctx_ids, vals FROM log_columns "
        "WHERE format IN ('f8', 'i8') AND seq_step IS NULL AND seqs IS NULL"
    ).fetchall()
    for run_id, name, first_seq, count, fmt, ctx_ids, vals in old:
        rows = conn.execute(
            "SELECT seq, ctx_id, value, kind FROM logs WHERE run_id = ? AND name = ? AND source = 'record' "
            "AND seq >= ? ORDER BY seq LIMIT ?",
            (run_id, name, first_seq, count),
        ).fetchall()
        key = (run_id, name, first_seq)
        if not _rows_match(rows, count, fmt, ctx_ids, vals):
            conn.execute(
                "UPDATE log_columns SET format = 'rows', ctx_ids = NULL, vals = NULL "
                "WHERE run_id = ? AND name = ? AND first_seq = ?",
                key,
            )
            continue
        seqs = array("q", [r[0] for r in rows])
        step = arithmetic_step(seqs)
        conn.execute(
            "UPDATE log_columns SET seq_step = ?, seqs = ? WHERE run_id = ? AND name = ? AND first_seq = ?",
            (step, None if step else seqs.tobytes(), *key),
        )
        conn.execute(
            "DELETE FROM logs WHERE run_id = ? AND name = ? AND source = 'record' AND seq BETWEEN ? AND ?",
            (run_id, name, seqs[0], seqs[-1]),
        )
        moved += len(rows)
    return moved


def _rows_match(rows: list[tuple[Any, ...]], count: int, fmt: str, ctx_ids: bytes | None, vals: bytes | None) -> bool:
    """True when ``rows`` are exactly the chunk's values (a NaN of the chunk is a NULL row)."""
    if len(rows) != count or ctx_ids is None or vals is None or any(r[3] != 0 for r in rows):
        return False
    ctxs = chunk_values("i8", ctx_ids)
    if 0 in ctxs or array("q", [r[1] for r in rows]).tobytes() != ctxs.tobytes():
        return False
    values = chunk_values(fmt, vals)
    if len(values) != count:
        return False
    wanted = float if fmt == "f8" else int
    stored = []
    for row, chunk_value in zip(rows, values, strict=True):
        value = row[2]
        if value is None and fmt == "f8" and chunk_value != chunk_value:  # noqa: PLR0124 - NaN
            value = chunk_value
        if type(value) is not wanted:
            return False
        stored.append(value)
    try:
        return array(values.typecode, stored).tobytes() == values.tobytes()
    except OverflowError:
        return False
