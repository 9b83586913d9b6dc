"""series.py holds a run's points of a name exactly as ``flor.dataframe(name)`` holds its rows,
and charts.downsample keeps what a screen needs (first, last, each bucket's min and max)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest

import flordb_build as flor
from flordb_build.charts import MAX_POINTS, downsample
from flordb_build.reader import reading
from flordb_build.series import NOT_LOGGED, logged_names, read_series
from tests.conftest import Project

# Every shape the pivot knows: nested loops, a name logged at two levels, a name logged twice in
# one context, loops whose elements are not their index, a loop driven by hand, text and JSON,
# and run-level values (one also logged inside a loop).
SCRIPT = """
import flordb_build as flor

flor.log("lr", 0.1)
flor.log("both", -1)
for epoch in flor.loop("epoch", range(3)):
    for step in flor.loop("step", range(4)):
        flor.log("loss", epoch * 10 + step + 0.5)
        if epoch == 0:
            flor.log("m", step)
    flor.log("m", 100 + epoch)
    flor.log("twice", epoch)
    flor.log("twice", epoch * 2)
    flor.log("both", epoch)
    flor.log("tag", "e" + str(epoch))
    flor.log("vec", [epoch, epoch + 1])
for doc in flor.loop("doc", ["a.txt", "b.txt"]):
    flor.log("words", len(doc))
for k in range(2):
    with flor.iteration("request", None, "r" + str(k)):
        flor.log("latency", k * 1.5)
flor.log("flag", True)
"""


def rows_of(frame: Any, name: str, dims: tuple[str, ...]) -> list[tuple[Any, ...]]:
    """(dims..., value) of the frame's rows where ``name`` has a value, sorted."""
    frame = frame[frame[name].notna()]
    out = []
    for row in frame[[*dims, name]].astype(object).itertuples(index=False, name=None):
        *index, value = row
        out.append((*(-1 if pd.isna(v) else int(v) for v in index), value))
    return sorted(out, key=repr)


def test_each_name_holds_the_dataframe_rows_of_its_run(project: Project) -> None:
    project.write("train.py", SCRIPT)
    project.run("train.py")
    project.run("train.py")  # two runs: a series is one run's rows only
    run_id = str(flor.query("SELECT run_id FROM runs ORDER BY tstamp DESC LIMIT 1")["run_id"].iloc[0])
    with reading() as store:
        names = logged_names(store, run_id)
        assert names == sorted(["lr", "both", "loss", "m", "twice", "tag", "vec", "words", "latency", "flag"])
        run_level = flor.dataframe()
        run_level = run_level[run_level["run_id"] == run_id].iloc[0]
        for name in names:
            series = read_series(store, run_id, name)
            frame = flor.dataframe(name)
            frame = frame[frame["run_id"] == run_id]
            # The frame may carry loop columns that are empty on every row (loops the pivot read on its
            # way to the ones it needed); a series names only the loops enclosing its points.
            frame_dims = tuple(
                c for c in frame.columns[5:] if c != name and not c.endswith("_value") and frame[c].notna().any()
            )
            assert series.dims == frame_dims, name
            mine = sorted(
                ((*(int(ix[k]) for ix in series.index), series.values[k]) for k in range(len(series))), key=repr
            )
            assert mine == rows_of(frame, name, frame_dims), name
            expected_run_value = run_level[name] if name in run_level and run_level[name] == run_level[name] else None
            got = None if series.run_value is NOT_LOGGED else series.run_value
            assert got == expected_run_value, name
    with reading() as store:
        loss = read_series(store, run_id, "loss")
        assert loss.numeric and loss.dims == ("epoch", "step") and len(loss) == 12
        assert loss.y().tolist() == [e * 10 + s + 0.5 for e in range(3) for s in range(4)]  # in logged order
        assert not read_series(store, run_id, "tag").numeric
        assert read_series(store, run_id, "twice").values.tolist() == [0, 2, 4]  # the last value per context
        assert not read_series(store, run_id, "loss").replayed.any()


def test_downsample_keeps_first_last_and_every_buckets_extremes() -> None:
    rng = np.random.default_rng(0)
    y = rng.normal(size=1_000_000)
    y[123_457] = 50.0  # a spike
    y[876_543] = -50.0
    y[10] = np.nan
    kept = downsample(y)
    assert len(kept) <= MAX_POINTS and kept[0] == 0 and kept[-1] == len(y) - 1
    assert {123_457, 876_543} <= set(kept.tolist())
    assert np.all(np.diff(kept) > 0)  # in order, no repeats
    edges = np.linspace(0, len(y), MAX_POINTS // 4 + 1).astype(np.int64)
    for start, end in zip(edges[:-1], edges[1:], strict=True):
        inside = kept[(kept >= start) & (kept < end)]
        assert np.nanmax(y[start:end]) in y[inside] and np.nanmin(y[start:end]) in y[inside]
    short = np.arange(50.0)
    assert downsample(short).tolist() == list(range(50))


@pytest.mark.parametrize("n", [MAX_POINTS, MAX_POINTS + 1])
def test_downsample_cuts_only_above_the_limit(n: int) -> None:
    kept = downsample(np.arange(float(n)))
    assert len(kept) == n if n <= MAX_POINTS else len(kept) < n
