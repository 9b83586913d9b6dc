"""Fetching a run's logged values and loop blocks from the team store, a few bytes a value.

A frame (blockpivot.FrameSource) takes :func:`fetch_value_parts` and :func:`fetch_loop_blocks`;
a chart's points (series_points) take :func:`fetch_logs`' per-row arrays. Either starts from the
push's columnar copy (``log_chunks``: a name's recorded plain numbers as two little-endian arrays,
read with ``np.frombuffer``). For what it does not hold (replays, text, bools, JSON, big ints,
None, a run pushed before it existed), one statement per run reads the run's rows once (the BRIN
index finds its pages) and groups them by name and source; per group, the plain floats and the plain ints (the bulk of any store) come back
as three PostgreSQL arrays each (seq, ctx_id, value) in binary, ``array_send(array_agg(...))``:

    int4 ndim | int4 flags | oid elem | int4 n | int4 lbound | n x (int4 length, 8 bytes big-endian)

which numpy reads as a structured array, without a Python object per value. The aggregates see
the rows in one order, so the i-th seq, ctx and value belong together. Only the other values
(text, bools, JSON, big ints, None), counted in the same pass, are read as rows.

What :func:`fetch_logs` returns (:class:`~flordb_build.pivot.LogArrays`), ordered by run, name, recorded
before replayed, then as logged: ``value`` is float64 or int64 when every row is a plain float, or
every row a plain int (``kind`` 0 throughout); an object array otherwise (mixed numbers keep their
Python types, as the local store's rows do).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import TeamStoreError
from ..pivot import LogArrays

if TYPE_CHECKING:
    from ..blockpivot import ValuePart

_PLAIN = "kind = 0 AND value_{0} IS NOT NULL"
_PACKED_SQL = (
    "SELECT name, source, "
    + ", ".join(
        f"array_send(array_agg({column}) FILTER (WHERE {_PLAIN.format(kind)}))"
        for kind in ("float", "int")
        for column in ("seq", "ctx_id", f"value_{kind}")
    )
    + ", count(*) FILTER (WHERE kind <> 0 OR num_nonnulls(value_float, value_int) = 0) "
    "FROM logs WHERE run_id = %s AND name = ANY(%s) AND NOT (source = 'record' AND name = ANY(%s)) "
    "GROUP BY name, source"
)
# The columnar copy of a run's recorded plain numbers (team/_schema.py), and whether it has a replay.
# Each array in a statement of its own: one 16 MB row of ctx_ids and vals took 48 ms to arrive, the
# two 8 MB columns in two statements 24 ms (1M values, local socket). seqs are not read: a name's
# columnar copy holds every recorded row of it (team/_push.py writes none otherwise), in seq order,
# so its rows' order is the order of the arrays.
_CHUNKS_SQL = (
    "SELECT name, format, count, octet_length(ctx_ids), octet_length(vals) FROM log_chunks "
    "WHERE run_id = %s AND name = ANY(%s)"
)
_CHUNK_CTX_SQL = "SELECT ctx_ids FROM log_chunks WHERE run_id = %s AND name = %s"
_CHUNK_VALS_SQL = "SELECT vals FROM log_chunks WHERE run_id = %s AND name = %s"
_REPLAYED_SQL = "SELECT 1 FROM team_units WHERE unit_id = %s AND kind = 'replay'"
# Every other value (text, bools, JSON, big ints, None) as a row.
_ROWS_SQL = (
    "SELECT name, source, seq, ctx_id, kind, value_int, value_float, value_text, value_bool, value_bigint::text, "
    "value_json FROM logs WHERE run_id = %s AND name = ANY(%s) "
    "AND (kind <> 0 OR (value_float IS NULL AND value_int IS NULL))"
)
_HEADER = 20  # ndim, flags, element oid, then one dimension's size and lower bound
_ELEMENT = {"f8": np.dtype([("length", ">i4"), ("value", ">f8")]), "i8": np.dtype([("length", ">i4"), ("value", ">i8")])}


def unpack_array(data: bytes | None, kind: str) -> np.ndarray:
    """A one-dimensional ``array_send`` of float8 (``kind`` "f8") or int8 ("i8") without NULLs, as numpy.

    :raises TeamStoreError: when the bytes are not such an array.
    """
    native = np.dtype(np.float64 if kind == "f8" else np.int64)
    if data is None:
        return np.empty(0, dtype=native)
    head = np.frombuffer(data, dtype=">i4", count=min(5, len(data) // 4))
    if head.size and head[0] == 0:  # an empty array: no dimensions
        return np.empty(0, dtype=native)
    n = int(head[3]) if head.size == 5 and head[0] == 1 and head[1] == 0 else -1
    element = _ELEMENT[kind]
    if n < 0 or len(data) != _HEADER + n * element.itemsize:
        raise TeamStoreError("The team store sent a value array flordb_build cannot read; push with this version again.")
    items = np.frombuffer(data, dtype=element, count=n, offset=_HEADER)
    if not bool((items["length"] == 8).all()):
        raise TeamStoreError("The team store sent a value array with NULLs where none can be; push again.")
    return items["value"].astype(native)


def _value(row: Any) -> Any:
    """The one non-null typed column of a row's value columns (they follow its kind)."""
    for column in row:
        if column is not None:
            return column
    return None


class _Parts:
    """Pieces of the arrays, one per (run, name, source, kind of number) or per batch of rows."""

    def __init__(self) -> None:
        self.keys: list[tuple[int, int, bool]] = []
        self.seq: list[np.ndarray] = []
        self.ctx: list[np.ndarray] = []
        self.value: list[np.ndarray] = []
        self.kind: list[np.ndarray] = []
        self.code: list[np.ndarray] = []
        self.name: list[np.ndarray] = []
        self.replay: list[np.ndarray] = []

    def add(
        self, code: int, name: int | np.ndarray, replay: bool | np.ndarray, seq: np.ndarray, ctx: np.ndarray,
        value: np.ndarray, kind: int | np.ndarray,
    ) -> None:
        n = len(seq)
        if isinstance(name, int) and isinstance(replay, bool):
            self.keys.append((code, name, replay))
        else:
            self.keys.append((-1, -1, False))  # rows of several names: never in order by construction
        self.seq.append(seq)
        self.ctx.append(ctx)
        self.value.append(value)
        self.code.append(np.full(n, code, dtype=np.int64))
        self.name.append(np.broadcast_to(np.asarray(name, dtype=np.int64), (n,)))
        self.replay.append(np.broadcast_to(np.asarray(replay, dtype=bool), (n,)))
        self.kind.append(np.broadcast_to(np.asarray(kind, dtype=np.int64), (n,)))

    def by_name(self, n_names: int) -> list[list[ValuePart]]:
        """The parts of one run per name, replayed before recorded (blockpivot.FrameSource.value_parts)."""
        keys = self.keys
        if (
            len(set(keys)) == len(keys) and (-1, -1, False) not in keys
            and all(bool(np.all(s[1:] > s[:-1])) for s in self.seq)
        ):
            # One part per (name, source), each in seq order (a push copies a run's rows so): as they are.
            out: list[list[ValuePart]] = [[] for _ in range(n_names)]
            for i in sorted(range(len(keys)), key=lambda i: (keys[i][1], not keys[i][2])):
                out[keys[i][1]].append((self.ctx[i], self.value[i], None))
            return out
        # Floats and ints of one name, or rows of several names: sorted by name, source and seq first.
        logs = self.arrays()
        result: list[list[ValuePart]] = []
        for code in range(n_names):
            rows = np.flatnonzero(logs.name == code)
            rows = rows[np.argsort(~logs.replay[rows], kind="stable")]  # replayed first: recorded wins
            kind = logs.kind[rows]
            result.append([(logs.ctx[rows], logs.value[rows], kind if kind.any() else None)] if rows.size else [])
        return result

    def arrays(self) -> LogArrays:
        if not self.seq:
            empty = np.empty(0, dtype=np.int64)
            return LogArrays(empty, empty, empty, np.empty(0, dtype=object), empty, np.empty(0, dtype=bool))
        if len(set(self.keys)) == len(self.keys) and (-1, -1, False) not in self.keys:
            # One part per (run, name, source): put them in key order (a few parts, not rows).
            by_key = sorted(range(len(self.keys)), key=self.keys.__getitem__)
            for field in ("keys", "seq", "ctx", "value", "kind", "code", "name", "replay"):
                items = getattr(self, field)
                setattr(self, field, [items[i] for i in by_key])
        dtypes = {v.dtype for v in self.value}
        numeric = len(dtypes) == 1 and next(iter(dtypes)).kind in "if"
        values = [v if numeric else v.astype(object) for v in self.value]
        # Each part is one (run, name, source) in the order the team store holds it, the parts in
        # key order. When every key has one part whose seqs rise (a push copies a run's rows in
        # seq order), the concatenation is the local order and needs no sort of a million rows.
        in_order = len(set(self.keys)) == len(self.keys) and (-1, -1, False) not in self.keys
        in_order = in_order and self.keys == sorted(self.keys)
        in_order = in_order and all(bool(np.all(s[1:] > s[:-1])) for s in self.seq)
        code, name, replay = np.concatenate(self.code), np.concatenate(self.name), np.concatenate(self.replay)
        arrays = LogArrays(
            code=code, ctx=np.concatenate(self.ctx), name=name, value=np.concatenate(values),
            kind=np.concatenate(self.kind), replay=replay,
        )
        if in_order:
            return arrays
        order = np.lexsort((np.concatenate(self.seq), replay, name, code))
        return LogArrays(
            code=arrays.code[order], ctx=arrays.ctx[order], name=arrays.name[order], value=arrays.value[order],
            kind=arrays.kind[order], replay=arrays.replay[order],
        )


def fetch_logs(conn: Any, run_ids: list[str], names: list[str]) -> LogArrays:
    """Every value of ``names`` that ``run_ids`` logged, recorded and replayed, as per-row arrays."""
    position = {name: code for code, name in enumerate(names)}
    parts = _Parts()
    columnar = _has_log_chunks(conn)
    for code, run_id in enumerate(run_ids):
        _fetch_run(conn, code, run_id, names, position, parts, columnar)
    return parts.arrays()


def fetch_value_parts(conn: Any, run_ids: list[str], names: list[str]) -> Iterator[list[list[ValuePart]]]:
    """blockpivot.FrameSource.value_parts over the team store: per run, per name, its values.

    The bulk (a name's recorded plain numbers from ``log_chunks``) is handed on as the float64 or
    int64 array ``np.frombuffer`` made of it, no Python object per value and no sort.
    """
    position = {name: code for code, name in enumerate(names)}
    columnar = _has_log_chunks(conn)
    for run_id in run_ids:
        parts = _Parts()
        _fetch_run(conn, 0, run_id, names, position, parts, columnar)
        yield parts.by_name(len(names))


_LOOPS_SQL = (
    "SELECT name, ctx_id, parent_ctx, iteration, count, value_int, value_float, value_text, value_bool "
    "FROM loops WHERE run_id = %s"
)


def fetch_loop_blocks(conn: Any, run_id: str) -> list[tuple[Any, ...]]:
    """blockpivot.FrameSource.loop_blocks over the team store: ``(name, ctx_id, parent_ctx, iteration,
    count, value)`` of each of the run's loop blocks, the value from its typed column (team/_schema.py)."""
    return [(name, ctx, parent, it, count, _value(typed)) for name, ctx, parent, it, count, *typed in conn.execute(_LOOPS_SQL, (run_id,))]


def _frombuffer(data: bytes, dtype: np.dtype[Any] | type) -> np.ndarray:
    """A native array of the little-endian ``data`` a push stored (team/_push.py ``_native``)."""
    native = np.dtype(dtype)
    return np.frombuffer(data, dtype=native.newbyteorder("<")).astype(native, copy=False)


def _has_log_chunks(conn: Any) -> bool:
    """True when the store has the columnar copy (a store pushed by an older version may not)."""
    return bool(conn.execute("SELECT to_regclass('log_chunks') IS NOT NULL").fetchone()[0])


def _fetch_run(
    conn: Any, code: int, run_id: str, names: list[str], position: dict[str, int], parts: _Parts, columnar: bool
) -> None:
    """Add run ``run_id``'s values of ``names`` to ``parts`` under run ``code``."""
    covered: list[str] = []
    if columnar:
        for name, fmt, count, ctx_bytes, value_bytes in conn.execute(_CHUNKS_SQL, (run_id, names)).fetchall():
            if not ctx_bytes == value_bytes == 8 * count:
                raise TeamStoreError(
                    f"The team store's columnar copy of '{name}' in run '{run_id}' is damaged ({count} values "
                    f"in {ctx_bytes} bytes of contexts and {value_bytes} bytes of values); push the run again "
                    "into a fresh team store."
                )
            number = np.dtype(np.float64 if fmt == "f8" else np.int64)
            ctx = _frombuffer(conn.execute(_CHUNK_CTX_SQL, (run_id, name), binary=True).fetchone()[0], np.int64)
            value = _frombuffer(conn.execute(_CHUNK_VALS_SQL, (run_id, name), binary=True).fetchone()[0], number)
            seq = np.arange(count, dtype=np.int64)  # the rows' order within the name's recorded rows
            parts.add(code, position[name], False, seq, ctx, value, 0)
            covered.append(name)
    if len(covered) == len(names) and not conn.execute(_REPLAYED_SQL, (run_id,)).fetchone():
        return  # every value from the columnar copy: no pass over the run's rows
    groups = conn.execute(_PACKED_SQL, (run_id, names, covered), binary=True).fetchall()
    groups.sort(key=lambda g: (position[g[0]], g[1] == "replay"))
    others = 0
    for name, source, *packed, other in groups:
        others += other
        for offset, kind in ((0, "f8"), (3, "i8")):
            seq, ctx, value = (unpack_array(packed[offset + i], "i8" if i < 2 else kind) for i in range(3))
            if len(seq):
                parts.add(code, position[name], source == "replay", seq, ctx, value, 0)
    if not others:
        return
    rows = conn.execute(_ROWS_SQL, (run_id, names)).fetchall()
    values = np.empty(len(rows), dtype=object)
    values[:] = [_value(r[5:]) for r in rows]
    parts.add(
        code,
        np.array([position[r[0]] for r in rows], dtype=np.int64),
        np.array([r[1] == "replay" for r in rows], dtype=bool),
        np.array([r[2] for r in rows], dtype=np.int64),
        np.array([r[3] for r in rows], dtype=np.int64),
        values,
        np.array([r[4] for r in rows], dtype=np.int64),
    )
