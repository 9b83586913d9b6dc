"""Per-row log arrays (LogArrays: the team store's series points) and the frame's column types.

``typed_series`` gives every value column of a frame its dtype (blockpivot.py, query.py). Kept
apart from ``query.py`` so numpy and pandas load only when a frame is built. A frame's own reads
are blockpivot.FrameSource's (localframe.py, team/_fetch.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class LogArrays:
    """Log rows of the requested names as parallel arrays (``name`` indexes the requested names)."""

    code: np.ndarray
    ctx: np.ndarray
    name: np.ndarray
    value: np.ndarray
    kind: np.ndarray
    replay: np.ndarray


def typed_series(name: str, values: Any) -> pd.Series:
    """A column whose dtype follows its values: int64, float64, bool, else object.

    Ints or bools with gaps become pandas' nullable Int64/boolean rather than floats/objects.
    """
    if isinstance(values, pd.Series):  # typed already (blockpivot.py)
        return values
    array = values if isinstance(values, np.ndarray) else _object_array(values)
    if array.dtype.kind == "i":  # loop dimensions: -1 marks "not inside this loop"
        missing = array < 0
        if missing.any():
            return pd.Series(pd.arrays.IntegerArray(np.where(missing, 0, array), missing), name=name)
        return pd.Series(array, name=name, copy=False)
    inferred = pd.api.types.infer_dtype(array, skipna=True)
    if inferred not in ("integer", "floating", "mixed-integer-float", "boolean"):
        return pd.Series(array, dtype=object, name=name)
    missing = pd.isna(array)
    if inferred == "integer" and not _fits_int64(array[~missing]):
        return pd.Series(array, dtype=object, name=name)  # ints beyond int64 (values.py BIGINT) stay exact
    if inferred == "integer":
        if missing.any():
            filled = np.where(missing, 0, array).astype(np.int64)
            return pd.Series(pd.arrays.IntegerArray(filled, missing), name=name)
        return pd.Series(array.astype(np.int64), name=name, copy=False)
    if inferred in ("floating", "mixed-integer-float"):
        return pd.Series(np.where(missing, np.nan, array).astype(np.float64), name=name, copy=False)
    if inferred == "boolean":
        if missing.any():
            return pd.Series(pd.array(array.tolist(), dtype="boolean"), name=name)
        return pd.Series(array.astype(bool), name=name)
    return pd.Series(array, dtype=object, name=name)


def _fits_int64(values: np.ndarray) -> bool:
    """True when every int fits int64 (numpy's own ints always do)."""
    return all(-(2**63) <= v < 2**63 for v in values if type(v) is int)


def _object_array(values: list[Any]) -> np.ndarray:
    """A 1-d object array of ``values``, even when they are lists (np.asarray would nest them)."""
    array = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        array[i] = value
    return array
