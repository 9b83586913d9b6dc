"""table.py: one spelling per kind of value in the table output people read."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from flordb_build.table import MISSING, format_cell, format_table


def test_cells() -> None:
    for missing in (None, math.nan, np.nan, pd.NA, pd.NaT, np.float64("nan")):
        assert format_cell(missing) == MISSING == "-"
    assert [format_cell(v) for v in (3, np.int64(3), 2.0, 0.1 + 0.2, 1.5e-7, True, "ok")] == [
        "3", "3", "2.0", "0.3", "1.5e-07", "True", "ok"]
    assert format_cell(float("inf")) == "inf"
    wide = list(range(40))
    assert format_cell(wide) == "[0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,…" and len(format_cell(wide)) == 40
    assert format_cell(wide, full=True) == "[" + ",".join(map(str, wide)) + "]"
    assert format_cell({"a": 1}) == '{"a":1}'
    assert format_cell("x" * 100).endswith("…") and len(format_cell("x" * 100)) == 80


def test_table_keeps_integers_and_aligns_numbers() -> None:
    frame = pd.DataFrame({
        "name": ["a", "bb", None],
        "count": pd.array([1, None, 300], dtype="Int64"),
        "score": [0.5, np.nan, 2.0],
    })
    assert format_table(frame).splitlines() == [
        "name  count  score",
        "a         1    0.5",
        "bb        -      -",
        "-       300    2.0",
    ]
