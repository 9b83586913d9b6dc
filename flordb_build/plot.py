"""``flordb-build plot``, and the figures the UI draws: logged names of chosen runs as charts.

For each name, each run that logged it gives its series (series.py): a loop-level name becomes
one line per run over its loops (``--x DIM`` picks the loop), a run-level name one point per run
at its start time. ``where=`` selects rows exactly as ``flor.dataframe(*names, where=...)`` does:
a run's line keeps only the contexts of the rows that the filter kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .charts import (
    PALETTE,
    GroupBy,
    RunLabel,
    figure,
    run_value_trace,
    series_traces,
    write_html,
    write_png,
    x_axis,
)
from .config import Config
from .errors import ViewError
from .reader import reading
from .series import Series, is_loop_level, read_series
from .store import Store
from .team._protocol import ViewReader, as_view_reader

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class PlotResult:
    """What ``plot`` wrote."""

    path: Path
    names: tuple[str, ...]
    runs: int
    points: int


def run_labels(store: Store | ViewReader, run_ids: Sequence[str] | None = None) -> dict[str, RunLabel]:
    """Labels of the given runs (every run when None), by run id, oldest first."""
    runs = as_view_reader(store).run_rows()
    wanted = None if run_ids is None else set(run_ids)
    return {
        r: RunLabel(r, task, tstamp)
        for r, task, tstamp in zip(runs.columns["run_id"], runs.columns["task"], runs.columns["tstamp"], strict=True)
        if wanted is None or r in wanted
    }


def runs_logging(store: Store | ViewReader, name: str, run_ids: Sequence[str]) -> list[str]:
    """Those of ``run_ids`` that logged ``name`` (an index seek per run)."""
    reader = as_view_reader(store)
    return [r for r in run_ids if reader.has_logged(r, name)]


def name_figure(
    store: Store | ViewReader,
    name: str,
    labels: dict[str, RunLabel],
    *,
    x_dim: str | None = None,
    by: GroupBy = GroupBy.RUN,
    keep: pd.DataFrame | None = None,
    read: dict[str, Series] | None = None,
) -> dict[str, Any]:
    """The figure of ``name`` over the runs of ``labels`` that logged it.

    :param keep: rows of ``flor.dataframe(name, where=...)``: only their contexts are drawn.
    :param read: series of ``name`` already read, by run id (not read again).
    :raises ViewError: when no run logged the name, or its values are not numbers.
    """
    read = read or {}
    run_ids = [r for r in labels if r in read] + runs_logging(store, name, [r for r in labels if r not in read])
    if not run_ids:
        raise ViewError(f"No run logged '{name}'; list the names with flor.dataframe() or 'flordb-build runs'.")
    colours = _colours([labels[r] for r in run_ids], by)
    shown_groups: set[str] = set()
    if not any(is_loop_level(store, r, name) for r in run_ids):
        return _run_level_figure(store, name, [labels[r] for r in run_ids], colours, by, keep)
    traces: list[dict[str, Any]] = []
    x_title = "step"
    for run_id in run_ids:
        series = read.get(run_id) or read_series(store, run_id, name)
        if keep is not None:
            series = restrict(series, keep)
        if len(series) == 0:
            continue
        label = labels[run_id]
        group = label.run_id if by is GroupBy.RUN else (label.task or "(no task)")
        traces.extend(series_traces(series, label, colours[run_id], x_dim, legend_group=group,
                                    show_legend=by is GroupBy.RUN or group not in shown_groups))
        shown_groups.add(group)
        x_title = x_axis(series, x_dim)[1]
    if by is GroupBy.TASK:
        for trace in traces:
            if trace["meta"]["source"] == "record":
                trace["name"] = trace["legendgroup"]
    return figure(name, traces, x_title)


def _run_level_figure(store: Store | ViewReader, name: str, labels: list[RunLabel], colours: dict[str, str], by: GroupBy,
                      keep: pd.DataFrame | None) -> dict[str, Any]:
    groups: dict[str, list[tuple[RunLabel, float]]] = {}
    kept_runs = None if keep is None else set(keep["run_id"].tolist())
    for label in labels:
        if kept_runs is not None and label.run_id not in kept_runs:
            continue
        series = read_series(store, label.run_id, name)
        if not series.numeric:
            raise ViewError(f"'{name}' in run '{label.run_id}' is not a number, which a chart cannot draw.")
        group = "runs" if by is GroupBy.RUN else (label.task or "(no task)")
        groups.setdefault(group, []).extend((label, float(v)) for v in series.y().tolist())
    traces = [
        run_value_trace(name, points, colours[points[0][0].run_id] if by is GroupBy.TASK else PALETTE[0], group)
        for group, points in groups.items()
    ]
    return figure(name, traces, "run start")


def restrict(series: Series, keep: pd.DataFrame) -> Series:
    """The points of ``series`` whose contexts are among the rows ``keep`` of a filtered dataframe."""
    import numpy as np

    rows = keep[(keep["run_id"] == series.run_id) & keep[series.name].notna()]
    if not series.dims:
        mask = np.full(len(series), len(rows) > 0)
    else:
        wanted = {
            tuple(-1 if v is None or v != v else int(v) for v in row)
            for row in rows[list(series.dims)].astype(object).itertuples(index=False, name=None)
        }
        points = zip(*(ix.tolist() for ix in series.index), strict=True)
        mask = np.array([p in wanted for p in points], dtype=bool)
    return Series(series.run_id, series.name, series.dims, tuple(ix[mask] for ix in series.index),
                  series.values[mask], series.replayed[mask])


def _colours(labels: list[RunLabel], by: GroupBy) -> dict[str, str]:
    keys: dict[str, int] = {}
    out = {}
    for label in labels:
        key = label.run_id if by is GroupBy.RUN else (label.task or "")
        out[label.run_id] = PALETTE[keys.setdefault(key, len(keys)) % len(PALETTE)]
    return out


def plot_to_file(
    names: Sequence[str],
    output: Path,
    *,
    where: str | None = None,
    x_dim: str | None = None,
    by: GroupBy = GroupBy.RUN,
    config: Config | None = None,
) -> PlotResult:
    """Write the charts of ``names`` to ``output`` (``.html``, self-contained, or ``.png``).

    :raises ViewError: for another file type, an unknown name or values that are not numbers.
    """
    from .expression import parse_where
    from .query import read_dataframe

    suffix = output.suffix.lower()
    if suffix not in (".html", ".htm", ".png"):
        raise ViewError(f"Cannot write a chart to '{output}': give a file name ending in .html or .png.")
    expression = parse_where(where) if where is not None else None
    with reading(config) as store:
        keep = read_dataframe(store.conn, names, expression) if expression is not None else None
        labels = run_labels(store, None if keep is None else keep["run_id"].unique().tolist())
        figures = []
        for name in names:
            name_keep = None if keep is None else keep[keep[name].notna()]
            figures.append(name_figure(store, name, labels, x_dim=x_dim, by=by, keep=name_keep))
    if suffix == ".png":
        write_png(figures, output)
    else:
        write_html(figures, output, "flordb_build: " + ", ".join(names))
    run_ids = {t["meta"]["run_id"] for f in figures for t in f["data"] if "run_id" in t["meta"]}
    run_ids |= {r for f in figures for t in f["data"] for r in t["meta"].get("run_ids", [])}
    points = sum(t["meta"]["points"] for f in figures for t in f["data"])
    return PlotResult(output, tuple(names), len(run_ids), points)
