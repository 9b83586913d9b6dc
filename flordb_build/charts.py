"""Charts of logged values: plotly figures (as plain JSON) for the UI and ``flordb-build plot``.

A figure is a dict that plotly.js draws as it is: the UI hands it to ``Plotly.react`` and
``plot -o FILE.html`` writes it into a page with plotly.js inlined, so both work offline.
plotly.js comes from the ``plotly`` wheel (``flordb_build[ui]``), which ships it; the Python
side of plotly is never imported. PNG files are drawn with matplotlib from the same traces
(plotly's PNG export needs a browser binary through kaleido).

Long series are cut down to what a screen shows before they leave the server::

    1,000,000 points -> 1,000 buckets of consecutive points -> each bucket's first, min, max and
    last point (in their order): at most MAX_POINTS points, and every spike survives

Each trace's ``meta`` says which run and source (``record``/``replay``) it draws and how many
points it stands for, so a reader of the figure (a test, a person) knows what was cut.
"""

from __future__ import annotations

import html
import importlib.util
import json
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ViewError
from .series import Series

#: Most points a trace sends to the browser (about a wide screen's pixels).
MAX_POINTS = 2000
#: Up to this many points a line also draws a marker per point.
MARKER_POINTS = 200
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)
UI_EXTRA_HINT = "install the UI extra: pip install 'flordb_build[ui]'"


class GroupBy(StrEnum):
    """What gets one colour and legend entry: each run, or all runs of a task."""

    RUN = "run"
    TASK = "task"


@dataclass(frozen=True)
class RunLabel:
    """How a run is named on a chart."""

    run_id: str
    task: str | None
    tstamp: str | None

    @property
    def text(self) -> str:
        return f"{self.run_id[:8]} {self.task or ''}".strip()


def downsample(y: np.ndarray, max_points: int = MAX_POINTS) -> np.ndarray:
    """Positions to keep of ``y``: all of them when few, else each bucket's first, min, max, last.

    Buckets are ``ceil(n / (max_points / 4))`` consecutive points wide (the last one may be
    shorter); NaN is never a bucket's min or max.
    """
    n = len(y)
    if n <= max_points:
        return np.arange(n)
    width = -(-n // max(max_points // 4, 1))
    buckets = -(-n // width)
    pad = buckets * width - n
    nan = np.isnan(y)
    low = np.where(nan, np.inf, y) if nan.any() else y
    high = np.where(nan, -np.inf, y) if nan.any() else y
    # One row per bucket (the last padded with values that never win): argmin/argmax per row in C.
    mins = np.argmin(np.concatenate([low, np.full(pad, np.inf)]).reshape(buckets, width), axis=1)
    maxs = np.argmax(np.concatenate([high, np.full(pad, -np.inf)]).reshape(buckets, width), axis=1)
    starts = np.arange(buckets) * width
    ends = np.minimum(starts + width, n) - 1
    keep = np.concatenate([starts, starts + mins, starts + maxs, ends])
    return np.unique(keep[keep < n])


def x_axis(series: Series, x_dim: str | None) -> tuple[np.ndarray, str]:
    """The x of each point and the axis title: a loop's index, or the order of the points.

    :raises ViewError: when ``x_dim`` is not one of the series' loops.
    """
    if x_dim is not None:
        if x_dim not in series.dims:
            known = ", ".join(series.dims) or "none (a run-level value)"
            raise ViewError(f"'{series.name}' is not logged inside a loop '{x_dim}'; its loops: {known}.")
        return series.dim(x_dim), x_dim
    if len(series.dims) == 1:
        return series.dim(series.dims[0]), series.dims[0]
    if not series.dims:
        return np.zeros(len(series), dtype=np.int64), "run"
    return np.arange(len(series)), " × ".join(series.dims) + " (in order)"


def hover_text(series: Series, positions: np.ndarray) -> list[str]:
    """``epoch=3 step=120`` for each kept point."""
    columns = [(d, series.index[i][positions]) for i, d in enumerate(series.dims)]
    return [" ".join(f"{d}={int(v[k])}" for d, v in columns if v[k] >= 0) for k in range(len(positions))]


def series_traces(series: Series, label: RunLabel, colour: str, x_dim: str | None = None,
                  legend_group: str | None = None, show_legend: bool = True) -> list[dict[str, Any]]:
    """Plotly traces of one run's series: recorded points as a line, replayed ones dashed apart.

    :raises ViewError: for text or JSON values, which a line cannot draw.
    """
    if not series.numeric:
        raise ViewError(
            f"'{series.name}' in run '{series.run_id}' holds text or JSON values, which a chart cannot draw; "
            f"read them with flor.dataframe('{series.name}')."
        )
    x, _title = x_axis(series, x_dim)
    y = series.y()
    traces = []
    for source, mask in (("record", ~series.replayed), ("replay", series.replayed)):
        positions = np.flatnonzero(mask)
        if positions.size == 0:
            continue
        kept = positions[downsample(y[positions])]
        name = label.text if source == "record" else f"{label.text} (replayed)"
        traces.append({
            "type": "scatter",
            "mode": "lines+markers" if kept.size <= MARKER_POINTS else "lines",
            "x": x[kept].tolist(),
            "y": [None if np.isnan(v) else float(v) for v in y[kept]],
            "text": hover_text(series, kept),
            "name": name,
            "legendgroup": legend_group or label.run_id,
            "showlegend": show_legend,
            "line": {"color": colour, "dash": "dash" if source == "replay" else "solid", "width": 1.5},
            "marker": {"color": colour, "symbol": "diamond-open" if source == "replay" else "circle", "size": 6},
            "hovertemplate": "%{text}<br>%{y}<extra>" + html.escape(name) + "</extra>",
            "meta": {"run_id": series.run_id, "source": source, "points": int(positions.size),
                     "shown": int(kept.size)},
        })
    return traces


def run_value_trace(name: str, points: Sequence[tuple[RunLabel, float]], colour: str,
                    group: str, show_legend: bool = True) -> dict[str, Any]:
    """A run-level value across runs: one point per run at its start time."""
    return {
        "type": "scatter",
        "mode": "lines+markers",
        "x": [label.tstamp for label, _v in points],
        "y": [value for _l, value in points],
        "text": [label.run_id for label, _v in points],
        "name": group,
        "legendgroup": group,
        "showlegend": show_legend,
        "line": {"color": colour, "width": 1.5},
        "marker": {"color": colour, "size": 7},
        "hovertemplate": "run %{text}<br>%{y}<extra>" + html.escape(group) + "</extra>",
        "meta": {"run_ids": [label.run_id for label, _v in points], "source": "record", "points": len(points)},
    }


def figure(name: str, traces: list[dict[str, Any]], x_title: str) -> dict[str, Any]:
    """A plotly figure of one name."""
    return {
        "data": traces,
        "layout": {
            "title": {"text": name},
            "xaxis": {"title": {"text": x_title}},
            "yaxis": {"title": {"text": name}},
            "margin": {"l": 60, "r": 20, "t": 40, "b": 50},
            "height": 340,
            "legend": {"orientation": "h"},
            "hovermode": "closest",
        },
    }


def plotly_js_path() -> Path:
    """plotly.min.js as the ``plotly`` wheel installed it.

    :raises ViewError: when plotly is not installed.
    """
    spec = importlib.util.find_spec("plotly")  # locates the package without importing it
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / "package_data" / "plotly.min.js"
        if path.is_file():
            return path
    raise ViewError(f"Charts need plotly.js from the 'plotly' package; {UI_EXTRA_HINT}.")


def write_html(figures: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """A self-contained page of ``figures`` (plotly.js inlined: no network needed to view it)."""
    script = plotly_js_path().read_text(encoding="utf-8")
    divs = []
    calls = []
    for i, fig in enumerate(figures):
        divs.append(f'<div class="chart" id="chart-{i}"></div>')
        calls.append(f"Plotly.newPlot('chart-{i}', {_json_for_script(fig['data'])}, "
                     f"{_json_for_script(fig['layout'])}, {{responsive: true}});")
    page = (
        "<!doctype html>\n<html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title>"
        "<style>body{font-family:sans-serif;margin:1em 2em}.chart{margin-bottom:1em}</style>"
        "<script>" + script.replace("</script", "<\\/script") + "</script></head><body>"
        "<h1>" + html.escape(title) + "</h1>" + "".join(divs) + "<script>" + "\n".join(calls) + "</script>"
        "</body></html>\n"
    )
    path.write_text(page, encoding="utf-8")


def _json_for_script(value: Any) -> str:
    """JSON that is safe inside a <script> element."""
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def write_png(figures: Sequence[dict[str, Any]], path: Path) -> None:
    """The same figures drawn by matplotlib into one PNG, one panel per name.

    :raises ViewError: when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)  # no display: draw into memory
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ViewError(f"PNG charts need matplotlib; {UI_EXTRA_HINT}.") from exc
    fig, axes = plt.subplots(len(figures), 1, figsize=(10, 3.6 * len(figures)), squeeze=False)
    try:
        for ax, spec in zip(axes[:, 0], figures, strict=True):
            for trace in spec["data"]:
                y = [np.nan if v is None else v for v in trace["y"]]
                x = trace["x"]
                if trace["meta"].get("run_ids") is not None:
                    import pandas as pd

                    x = pd.to_datetime(x, format="ISO8601")
                ax.plot(x, y, color=trace["line"]["color"], linestyle="--" if trace["line"].get("dash") == "dash" else "-",
                        marker="D" if trace["marker"]["symbol"].startswith("diamond") else ("o" if len(y) <= MARKER_POINTS else None),
                        markersize=3, linewidth=1.2, label=trace["name"] if trace["showlegend"] else None)
            layout = spec["layout"]
            ax.set_title(layout["title"]["text"])
            ax.set_xlabel(layout["xaxis"]["title"]["text"])
            ax.set_ylabel(layout["yaxis"]["title"]["text"])
            ax.grid(alpha=0.3)
            if any(t["showlegend"] for t in spec["data"]):
                ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=100)
    finally:
        plt.close(fig)
