"""Log rows in PostgreSQL's binary ``COPY`` format, built with numpy rather than row by row.

A push is dominated by ``logs``: a million rows of one name, each a float or an int at a loop
context. Within a run of rows that share run id, name and source, every row of the binary
format has the same layout, so numpy writes them all at once as one structured array::

    int16 12 | len run_id | len name | len source | 8 seq | 8 ctx_id | 2 kind | value columns
                                                   (each field: int32 length, then big-endian bytes;
                                                    -1 and no bytes for NULL)

Rows that are not plain floats or ints (text, bools, JSON, big ints) are encoded one at a time
(:func:`encode_row`); they are few.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from ._schema import VALUE_COLUMNS, typed_value

HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
TRAILER = struct.pack(">h", -1)
N_FIELDS = 6 + len(VALUE_COLUMNS)
#: Which of VALUE_COLUMNS a plain float or int goes to.
_FLOAT_AT, _INT_AT = VALUE_COLUMNS.index("value_float"), VALUE_COLUMNS.index("value_int")
_NULL = struct.pack(">i", -1)


#: A column of :func:`encode_columns`: ("text", a str for every row), ("int2", an int for every row),
#: ("int8", ints), ("float8", floats) or ("null", None).
Column = tuple[str, Any]
_ARRAY_TYPES = {"int8": (">i8", np.int64), "float8": (">f8", np.float64)}


def encode_columns(columns: Sequence[Column], n: int) -> bytes | None:
    """``n`` rows in binary COPY format, all with the same layout; None when a value does not fit it
    (a None among the ints or floats, a bool or an int beyond int64: the caller encodes those rows apart)."""
    fields: list[tuple[str, Any]] = [("count", ">i2")]
    fill: list[tuple[str, Any]] = [("count", len(columns))]
    arrays: list[tuple[str, Any, Any]] = []
    for position, (kind, data) in enumerate(columns):
        length = f"l{position}"
        fields.append((length, ">i4"))
        if kind == "null":
            fill.append((length, -1))
        elif kind == "text":
            encoded = data.encode("utf-8")
            fill.append((length, len(encoded)))
            if encoded:  # an empty text is its length alone
                fields.append((f"v{position}", f"S{len(encoded)}"))
                fill.append((f"v{position}", encoded))
        elif kind == "int2":
            fields.append((f"v{position}", ">i2"))
            fill += [(length, 2), (f"v{position}", data)]
        else:
            big_endian, dtype = _ARRAY_TYPES[kind]
            wanted = float if kind == "float8" else int
            if isinstance(data, np.ndarray):  # already typed (log_columns' packed chunks): no check per value
                if data.dtype != dtype:
                    return None
            elif set(map(type, data)) != {wanted}:
                return None
            fields.append((f"v{position}", big_endian))
            fill.append((length, 8))
            arrays.append((f"v{position}", data, dtype))
    rows = np.zeros(n, dtype=np.dtype(fields))
    for name, value in fill:
        rows[name] = value
    try:
        for name, data, dtype in arrays:
            rows[name] = np.asarray(data, dtype=dtype)
    except OverflowError:
        return None
    return rows.tobytes()


def encode_block(
    run_id: str, name: str, source: str, seqs: Sequence[int], ctxs: Sequence[int], values: Sequence[Any]
) -> bytes | None:
    """Log rows of one name whose values are all plain floats, or all plain ints in int64; None otherwise."""
    first = type(values[0]) if values else None
    kind = "float8" if first is float else "int8" if first is int else None
    if kind is None:
        return None
    at = _FLOAT_AT if kind == "float8" else _INT_AT
    value_columns: list[Column] = [
        (kind, values) if i == at else ("null", None) for i in range(len(VALUE_COLUMNS))
    ]
    head: list[Column] = [
        ("text", run_id),
        ("text", name),
        ("text", source),
        ("int8", seqs),
        ("int8", ctxs),
        ("int2", 0),
    ]
    return encode_columns([*head, *value_columns], len(values))


def encode_arrays(
    run_id: str, name: str, source: str, seqs: np.ndarray, ctxs: np.ndarray, values: np.ndarray
) -> bytes | None:
    """:func:`encode_block` of numpy arrays (int64 seqs and ctx ids, float64 or int64 values)."""
    kind = "float8" if values.dtype == np.float64 else "int8" if values.dtype == np.int64 else None
    if kind is None:
        return None
    at = _FLOAT_AT if kind == "float8" else _INT_AT
    value_columns: list[Column] = [(kind, values) if i == at else ("null", None) for i in range(len(VALUE_COLUMNS))]
    head: list[Column] = [
        ("text", run_id), ("text", name), ("text", source), ("int8", seqs), ("int8", ctxs), ("int2", 0),
    ]
    return encode_columns([*head, *value_columns], len(values))


def encode_row(run_id: str, name: str, source: str, seq: int, ctx_id: int, value: Any, kind: int) -> bytes:
    """One log row of any kind (team/_schema.py decides its column)."""
    stored_kind, typed = typed_value(value, kind)
    parts = [struct.pack(">h", N_FIELDS), _text(run_id), _text(name), _text(source)]
    parts += [struct.pack(">iq", 8, seq), struct.pack(">iq", 8, ctx_id), struct.pack(">ih", 2, stored_kind)]
    value_int, value_float, value_text, value_bool, value_bigint, value_json = typed
    parts.append(_NULL if value_int is None else struct.pack(">iq", 8, value_int))
    parts.append(_NULL if value_float is None else struct.pack(">id", 8, value_float))
    parts.append(_NULL if value_text is None else _text(value_text))
    parts.append(_NULL if value_bool is None else struct.pack(">i?", 1, value_bool))
    parts.append(_NULL if value_bigint is None else _numeric(int(value_bigint)))
    parts.append(_NULL if value_json is None else _text(value_json))
    return b"".join(parts)


def _text(value: str) -> bytes:
    data = value.encode("utf-8")
    return struct.pack(">i", len(data)) + data


def _numeric(value: int) -> bytes:
    """An integer as PostgreSQL's binary ``numeric``: base-10000 digits, most significant first."""
    sign = 0x4000 if value < 0 else 0
    magnitude = abs(value)
    digits: list[int] = []
    while magnitude:
        magnitude, digit = divmod(magnitude, 10_000)
        digits.append(digit)
    digits.reverse()
    body = struct.pack(">hhHH", len(digits), max(len(digits) - 1, 0), sign, 0) + struct.pack(
        f">{len(digits)}H", *digits
    )
    return struct.pack(">i", len(body)) + body
