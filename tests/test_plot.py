"""``flordb-build plot``: charts of real runs into a self-contained HTML page or a PNG."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

import flordb_build as flor
from tests.conftest import Project

pytest.importorskip("plotly", reason="the UI extra (plotly) is not installed")

TRAIN = """
import flordb_build as flor
lr = flor.arg("lr", 0.1)
for epoch in flor.loop("epoch", range(3)):
    for step in flor.loop("step", range(4)):
        flor.log("loss", lr * (12 - epoch * 4 - step))
    flor.log("val_acc", 0.5 + epoch * lr)
flor.log("final_acc", 0.5 + 3 * lr)
flor.log("note", "text")
"""


def figures_in(page: str) -> list[dict[str, Any]]:
    """The traces of each Plotly.newPlot call in a written page."""
    calls = re.findall(r"Plotly\.newPlot\('chart-\d+', (.*?), (\{\"title\".*?\}), \{responsive: true\}\);", page)
    return [json.loads(data) for data, _layout in calls]


def test_plot_html_is_self_contained_and_holds_the_dataframe(project: Project, tmp_path: Path) -> None:
    project.write("train.py", TRAIN)
    project.run("train.py", "--kwargs", "lr=0.1")
    project.run("train.py", "--kwargs", "lr=0.2")
    out = tmp_path / "charts.html"
    done = project.cli("plot", "loss", "val_acc", "final_acc", "-o", str(out))
    assert "over 2 runs" in done.stdout
    page = out.read_text()
    assert "<script src" not in page and "https://" not in page.split("<script>")[0]  # nothing to fetch
    assert "Plotly.newPlot" in page and len(page) > 1_000_000  # plotly.js is inlined
    loss, val_acc, final_acc = figures_in(page)
    frame = flor.dataframe("loss")
    for run_id, rows in frame.groupby("run_id"):
        trace = next(t for t in loss if t["meta"]["run_id"] == run_id)
        assert trace["y"] == rows["loss"].tolist() and trace["x"] == list(range(12))
    acc = flor.dataframe("val_acc")
    assert sorted(tuple(t["y"]) for t in val_acc) == sorted(tuple(g["val_acc"].tolist()) for _r, g in acc.groupby("run_id"))
    assert all(t["x"] == [0, 1, 2] for t in val_acc)  # one loop: its index is x
    assert final_acc[0]["y"] == pytest.approx([0.8, 1.1])  # run level: one point per run, oldest first


def test_plot_where_x_by_and_png(project: Project, tmp_path: Path) -> None:
    project.write("train.py", TRAIN)
    project.run("train.py")
    out = tmp_path / "late.html"
    project.cli("plot", "loss", "--where", "epoch >= 1 AND step < 2", "--x", "step", "--by", "task", "-o", str(out))
    (loss,) = figures_in(out.read_text())
    assert loss[0]["x"] == [0, 1, 0, 1] and loss[0]["y"] == pytest.approx([0.8, 0.7, 0.4, 0.3])
    assert loss[0]["name"] == "(no task)"
    png = tmp_path / "loss.png"
    project.cli("plot", "loss", "val_acc", "-o", str(png))
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("loss", "-o", "x.pdf"), "ending in .html or .png"),
        (("nope", "-o", "x.html"), "No run logged 'nope'"),
        (("note", "-o", "x.html"), "is not a number"),
        (("loss", "--x", "batch", "-o", "x.html"), "not logged inside a loop 'batch'"),
    ],
)
def test_plot_errors_are_one_line(project: Project, args: tuple[str, ...], message: str) -> None:
    project.write("train.py", TRAIN)
    project.run("train.py")
    proc = project.cli("plot", *args, check=False)
    assert proc.returncode == 1 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
