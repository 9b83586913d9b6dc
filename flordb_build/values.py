"""Typed values: how a logged Python value is stored in SQLite and read back.

SQLite keeps ints, floats and strings as they are (the ``value`` columns have no affinity), so
those need no marker. Bools and containers would come back as ints and strings, so a small
:class:`ValueKind` travels beside each value.

Encoding never fails: a value SQLite cannot hold as it is gets another lossless form (an int
beyond int64 as its decimal text, a string with lone surrogates as escaped JSON text), and a
value that has no lossless form at all (a dict with tuple keys, a circular list, an object whose
``str()`` raises) is stored as its ``repr()``, or a placeholder naming its type, with a note
saying so (:func:`encode_value_noting`), which the runtime turns into one warning per name.
"""

from __future__ import annotations

import json
from enum import IntEnum
from typing import Any

#: The int range SQLite stores natively (a 64-bit signed integer).
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


class ValueKind(IntEnum):
    """How to read a stored value back."""

    NATIVE = 0  # int, float, str or NULL, stored as is
    BOOL = 1  # stored as 0/1
    JSON = 2  # lists, dicts and arrays (and strings with lone surrogates), stored as JSON text
    BIGINT = 3  # an int outside int64, stored as its decimal text


def _json_default(value: Any) -> Any:
    """Make numpy arrays/scalars and torch tensors inside containers JSON-serialisable."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def encode_value(value: Any) -> tuple[Any, ValueKind]:
    """Return ``(stored, kind)`` for any value; never raises (see :func:`encode_value_noting`)."""
    stored, kind, _note = encode_value_noting(value)
    return stored, kind


def encode_value_noting(value: Any) -> tuple[Any, ValueKind, str | None]:
    """``(stored, kind, note)`` for any value; ``note`` says why the value was not kept exactly.

    numpy scalars and 0-dim tensors become plain numbers; arrays and containers become JSON;
    anything else is stored as its ``str()`` so a log call never fails on an odd type. ``note``
    is None whenever what is stored is the value itself (or its ``str()`` for an odd type).
    """
    try:
        return (*_encode(value), None)
    except Exception as exc:  # noqa: BLE001 - a logged value must never fail the training
        return _unencodable(value, exc)


def _encode(value: Any) -> tuple[Any, ValueKind]:
    if isinstance(value, bool):
        return int(value), ValueKind.BOOL
    if value is None:
        return None, ValueKind.NATIVE
    if isinstance(value, int):
        return encode_int(int(value))
    if isinstance(value, float):
        return float(value), ValueKind.NATIVE
    if isinstance(value, str):
        return encode_text(str(value))
    if isinstance(value, list | tuple | dict):
        return json.dumps(value, default=_json_default), ValueKind.JSON
    if _is_scalar_like(value):
        return _encode(value.item())
    if hasattr(value, "tolist"):
        return json.dumps(value.tolist(), default=_json_default), ValueKind.JSON
    return encode_text(str(value))


def encode_int(value: int) -> tuple[Any, ValueKind]:
    """An int as is when SQLite can hold it, else its exact decimal text."""
    if INT64_MIN <= value <= INT64_MAX:
        return value, ValueKind.NATIVE
    return str(value), ValueKind.BIGINT


def encode_text(value: str) -> tuple[Any, ValueKind]:
    """A string as is, unless it holds lone surrogates (not UTF-8, so SQLite cannot take it):
    then JSON text, whose ``\\udXXX`` escapes read back to the very same string."""
    if value.isascii():
        return value, ValueKind.NATIVE
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value), ValueKind.JSON
    return value, ValueKind.NATIVE


def _unencodable(value: Any, exc: Exception) -> tuple[str, ValueKind, str]:
    """The repr of a value with no lossless form, or a placeholder naming its type."""
    type_name = type(value).__qualname__
    try:
        text = str(repr(value)).encode("utf-8", "backslashreplace").decode("utf-8")
        how = "its repr()"
    except Exception:  # noqa: BLE001 - even repr() may raise
        text = f"<unprintable {type_name}>"
        how = f"the placeholder '{text}'"
    reason = f"{type(exc).__name__}: {exc}"
    return text, ValueKind.NATIVE, f"a {type_name} that cannot be stored as it is ({reason}); stored {how} instead"


def _is_scalar_like(value: Any) -> bool:
    """numpy scalars and 0-dim arrays/tensors: they have ``item()`` and a size of one element."""
    if not hasattr(value, "item"):
        return False
    ndim = getattr(value, "ndim", None)
    if ndim is None and hasattr(value, "dim"):
        ndim = value.dim()
    return ndim == 0


def decode_value(stored: Any, kind: int) -> Any:
    """Inverse of :func:`encode_value`."""
    if kind == ValueKind.NATIVE or stored is None:
        return stored
    if kind == ValueKind.BOOL:
        return bool(stored)
    if kind == ValueKind.BIGINT:
        return int(stored)
    return json.loads(stored)


def storable_loop_value(value: Any) -> Any:
    """A loop value as ``loops.value`` can hold it (that column has no kind): ints beyond int64
    and other values SQLite cannot take become text; never raises."""
    if value is None or type(value) in (float, bool):
        return value
    if type(value) is int:
        return value if INT64_MIN <= value <= INT64_MAX else str(value)
    try:
        text = value if type(value) is str else str(value)
    except Exception:  # noqa: BLE001 - a loop must never fail on its element's str()
        return f"<unprintable {type(value).__qualname__}>"
    stored, _kind = encode_text(text)
    return stored


def simple_loop_value(element: Any, index: int) -> Any:
    """The loop value worth storing for ``element`` at ``index``: scalars that differ from the
    index (document names, learning rates); None for the index itself and for batches/tensors."""
    if type(element) in (str, float, bool) or (type(element) is int and element != index):
        return storable_loop_value(element)
    return None
