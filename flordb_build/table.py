"""Cells and tables as a person reads them: the ``table`` output of the CLI and the UI's cells.

One rule per kind of value, used everywhere a frame is shown to a person:

- a missing value (None, NaN, pandas' NA, NaT) is :data:`MISSING`, whatever the column's dtype;
- integers print as integers (``Int64`` columns keep them when values are missing);
- floats print with up to 6 significant digits and always look like floats (``0.812345``, ``2.0``,
  ``1.5e-07``);
- lists and dicts print as compact JSON, cut to :data:`JSON_WIDTH` characters with ``…``; other text
  is cut to :data:`TEXT_WIDTH`. Machine formats (csv, json) are never cut: they go through pandas.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

MISSING = "-"
JSON_WIDTH = 40
TEXT_WIDTH = 80
ELLIPSIS = "…"


def is_missing(value: Any) -> bool:
    """True for None, float NaN, pandas' NA and NaT."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    return type(value).__name__ in ("NAType", "NaTType")


def cut(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters, the last one an ellipsis when it was longer."""
    return text if len(text) <= width else text[: width - 1] + ELLIPSIS


def format_cell(value: Any, *, full: bool = False) -> str:
    """One value as table text (see the module docstring); ``full`` leaves long values uncut."""
    if is_missing(value):
        return MISSING
    if isinstance(value, bool):
        return str(value)
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy scalars
        value = value.item()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        text = f"{value:.6g}"
        # "2" would read as an integer: a whole float keeps its ".0" (nan and inf stay as they are)
        return text if "." in text or "e" in text or not text[-1].isdigit() else text + ".0"
    if isinstance(value, list | dict | tuple):
        text = json.dumps(value, separators=(",", ":"), default=str)
        return text if full else cut(text, JSON_WIDTH)
    if hasattr(value, "isoformat"):
        return str(value)
    text = str(value)
    return text if full else cut(text, TEXT_WIDTH)


def format_table(frame: pd.DataFrame) -> str:
    """The frame as aligned text columns: numbers right-aligned, everything else left-aligned."""
    header = [str(c) for c in frame.columns]
    cells = [[format_cell(v) for v in frame.iloc[:, i].tolist()] for i in range(frame.shape[1])]
    numeric = [frame.dtypes.iloc[i].kind in "iuf" for i in range(frame.shape[1])]
    widths = [max([len(h), *(len(c) for c in col)]) for h, col in zip(header, cells, strict=True)]

    def line(values: list[str]) -> str:
        parts = [
            v.rjust(w) if right else v.ljust(w) for v, w, right in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    rows = [line(header)]
    for r in range(len(frame)):
        rows.append(line([col[r] for col in cells]))
    return "\n".join(rows)
