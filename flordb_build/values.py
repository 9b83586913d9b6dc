"""Typed values: how a logged Python value is stored in SQLite and read back.

SQLite keeps ints, floats and strings as they are (the ``value`` columns have no affinity), so
those need no marker. Bools and containers would come back as ints and strings, so a small
:class:`ValueKind` travels beside each value.
"""

from __future__ import annotations

import json
from enum import IntEnum
from typing import Any


class ValueKind(IntEnum):
    """How to read a stored value back."""

    NATIVE = 0  # int, float, str or NULL, stored as is
    BOOL = 1  # stored as 0/1
    JSON = 2  # lists, dicts and arrays, stored as JSON text


def _json_default(value: Any) -> Any:
    """Make numpy arrays/scalars and torch tensors inside containers JSON-serialisable."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def encode_value(value: Any) -> tuple[Any, ValueKind]:
    """Return ``(stored, kind)`` for any value; the caller has already handled exact int/float/str.

    numpy scalars and 0-dim tensors become plain numbers; arrays and containers become JSON;
    anything else is stored as its ``str()`` so a log call never fails on an odd type.
    """
    if isinstance(value, bool):
        return int(value), ValueKind.BOOL
    if value is None:
        return None, ValueKind.NATIVE
    if isinstance(value, int):
        return int(value), ValueKind.NATIVE
    if isinstance(value, float):
        return float(value), ValueKind.NATIVE
    if isinstance(value, str):
        return str(value), ValueKind.NATIVE
    if isinstance(value, list | tuple | dict):
        return json.dumps(value, default=_json_default), ValueKind.JSON
    if _is_scalar_like(value):
        return encode_value(value.item())
    if hasattr(value, "tolist"):
        return json.dumps(value.tolist(), default=_json_default), ValueKind.JSON
    return str(value), ValueKind.NATIVE


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
    return json.loads(stored)


def simple_loop_value(element: Any, index: int) -> Any:
    """The loop value worth storing for ``element`` at ``index``: scalars that differ from the
    index (document names, learning rates); None for the index itself and for batches/tensors."""
    if type(element) in (str, float, bool) or (type(element) is int and element != index):
        return element
    return None
