"""Every page of ``flordb-build ui`` in headless Chromium, over a store made by real runs, a real
replay and real doit pipelines (tests/ui_project.py); assertions read the DOM.

Set ``FLORDB_BUILD_SCREENSHOTS=docs`` to write the pages' screenshots into that folder (the
README's pictures come from here); they always go into the test's temporary directory.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import flordb_build as flor

from .browser import CHROMIUM, CHROMIUM_ARGS, install_chromium
from .conftest import GIT_ENV, Project
from .storedb import connect_store
from .ui_project import UiProject, build_ui_project

pytest.importorskip("flask", reason="the UI extra (flask) is not installed")
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
_why_no_browser = install_chromium()
if _why_no_browser:
    pytest.skip(_why_no_browser, allow_module_level=True)

pytestmark = pytest.mark.slow
TIMEOUT = 120.0

# A run that logs one value per line it reads: the test decides when the next value comes.
LIVE = """\
import sys
import flordb_build as flor

for tick in flor.loop("tick", range(1000)):
    line = sys.stdin.readline()
    if not line.strip():
        break
    flor.log("live_loss", float(line))
"""

# The traces of a chart, as plotly holds them in the page.
TRACES = "el => el.data.map(t => ({x: Array.from(t.x), y: Array.from(t.y), meta: t.meta, dash: t.line.dash}))"


def wait_until(check: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture
def served(project: Project) -> Iterator[tuple[UiProject, str]]:
    """The recorded project and the URL of ``flordb-build ui`` serving it."""
    recorded = build_ui_project(project)
    server = subprocess.Popen(
        [sys.executable, "-m", "flordb_build", "ui", "--port", "0"],
        cwd=project.root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **GIT_ENV},
    )
    try:
        assert server.stdout is not None
        match = re.search(r"at (http://127\.0\.0\.1:\d+/)", server.stdout.readline())
        assert match, "flordb-build ui did not print its URL"
        yield recorded, match.group(1)
    finally:
        server.terminate()
        server.wait(timeout=60)
        if server.stdout is not None:
            server.stdout.close()


def expected_points(name: str, run_id: str) -> list[tuple[float, float]]:
    """What a chart of ``name`` must hold for the run: (x, y) per dataframe row, in order.

    x is the loop index when the name has one loop, else the row's position (the chart's
    "in order" axis); rows come in the order of their loop indexes, outermost first.
    """
    frame = flor.dataframe(name)
    frame = frame[frame["run_id"] == run_id]
    dims = [c for c in frame.columns[5:] if c != name and not c.endswith("_value")]
    frame = frame.sort_values(dims).reset_index(drop=True)
    xs = frame[dims[0]].tolist() if len(dims) == 1 else list(range(len(frame)))
    return [(float(x), float(y)) for x, y in zip(xs, frame[name].tolist(), strict=True)]


def chart_points(page: Any, name: str, run_id: str) -> tuple[list[tuple[float, float]], set[str]]:
    """The (x, y) points of one run in the chart of ``name``, sorted by x, and their sources."""
    traces = page.locator(f'.chart[data-name="{name}"]').evaluate(TRACES)
    mine = [t for t in traces if t["meta"]["run_id"] == run_id]
    points = sorted((float(x), float(y)) for t in mine for x, y in zip(t["x"], t["y"], strict=True))
    return points, {t["meta"]["source"] for t in mine}


# Resolved at import, before the project fixture changes the working directory.
SCREENSHOTS = Path(os.environ["FLORDB_BUILD_SCREENSHOTS"]).resolve() if os.environ.get("FLORDB_BUILD_SCREENSHOTS") else None


def shoot(page: Any, tmp_path: Path, name: str) -> None:
    page.screenshot(path=str(tmp_path / name), full_page=True)
    if SCREENSHOTS is not None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copy2(tmp_path / name, SCREENSHOTS / name)


def test_every_page_in_a_browser(served: tuple[UiProject, str], tmp_path: Path) -> None:
    recorded, url = served
    a, b = recorded.direct_runs
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(TIMEOUT * 1000)
            # Nothing may come from outside 127.0.0.1: every asset is served by the app.
            outside: list[str] = []
            page.on("request", lambda request: outside.append(request.url) if not request.url.startswith(url) else None)

            # Runs: newest first, every run; a where filter narrows the table.
            page.goto(url)
            assert page.locator("tr[data-run]").count() == 3
            shoot(page, tmp_path, "ui_runs.png")
            page.fill("#where", "lr > 0.2")
            page.click("#filter")
            page.wait_for_selector('#summary[data-shown="2"]')
            assert [r.get_attribute("data-run") for r in page.locator("tr[data-run]").all()] == [recorded.pipeline_run, b]

            # Run: each chart holds exactly the dataframe's points of the run; replayed ones apart.
            page.goto(f"{url}run/{b}")
            page.wait_for_selector('.chart[data-name="val_loss"] .main-svg')
            for name in ("loss", "val_acc", "val_loss"):
                points, sources = chart_points(page, name, b)
                assert points == sorted(expected_points(name, b)), name
                assert sources == ({"replay"} if name == "val_loss" else {"record"}), name
            replayed = page.locator('.chart[data-name="val_loss"]').evaluate(TRACES)
            assert [t["dash"] for t in replayed] == ["dash"]
            assert page.locator("#checkpoints tr").count() > 1
            assert 'flor.log("val_acc"' in page.locator("#code").inner_text()
            shoot(page, tmp_path, "ui_run.png")

            # Compare: pick two runs on the Runs page; what differs is marked.
            page.goto(url)
            for run_id in (a, b):
                page.check(f'input.pick[value="{run_id}"]')
            page.click("#compare")
            page.wait_for_selector('#side-by-side tr[data-name="lr"]')
            assert page.locator('tr[data-section="args"][data-name="lr"]').get_attribute("class") == "differs"
            assert page.locator('tr[data-section="args"][data-name="epochs"]').get_attribute("class") == "same"
            assert page.locator('tr[data-section="values"][data-name="final_acc"]').get_attribute("class") == "differs"
            assert page.locator('tr[data-name="lr"] td.changed').count() == 1  # B's cell, against A
            page.wait_for_selector('.chart[data-name="loss"] .main-svg')  # the first name both logged
            for run_id in (a, b):
                assert chart_points(page, "loss", run_id)[0] == sorted(expected_points("loss", run_id))
            # B ran another version of train.py: the scripts side by side, the changed line marked.
            assert page.locator(".codediff table.diff").count() == 1
            marked = page.locator(".codediff td:has(span.diff_add, span.diff_chg, span.diff_sub)").all_inner_texts()
            assert any("v2, lr " in text.replace("\xa0", " ") for text in marked), marked  # HtmlDiff uses nbsp
            shoot(page, tmp_path, "ui_compare.png")
            page.click('.names a:text-is("val_acc")')
            page.wait_for_selector('.chart[data-name="val_acc"] .main-svg')
            for run_id in (a, b):
                assert chart_points(page, "val_acc", run_id)[0] == sorted(expected_points("val_acc", run_id))

            # Pipelines: the second invocation's DAG shows every task with its status.
            page.goto(f"{url}pipelines")
            page.click(f'a[href="/pipeline/{recorded.pipelines[1]}"]')
            page.wait_for_selector("#dag svg")
            nodes = {n.get_attribute("data-task"): n.get_attribute("data-status") for n in page.locator("#dag g.node").all()}
            assert nodes == {"prep": "up-to-date", "train": "up-to-date", "report": "executed", "audit": "failed"}
            assert page.locator("#dag path.edge").count() == 3  # prep -> train -> report -> audit
            shoot(page, tmp_path, "ui_pipeline.png")
            page.goto(f"{url}pipeline/{recorded.pipelines[0]}")
            statuses = [n.get_attribute("data-status") for n in page.locator("#dag g.node").all()]
            assert statuses == ["executed"] * 4
            page.locator('#dag g.node[data-task="train"]').click()  # a task links to its runs
            page.wait_for_selector('#summary[data-shown="1"]')
            assert page.locator("tr[data-run]").get_attribute("data-run") == recorded.pipeline_run

            # Lineage: the model's producer and consumer, by path and content hash.
            page.goto(f"{url}lineage?path=model.txt")
            tasks = {n.get_attribute("data-task") for n in page.locator('#lineage g.node[data-kind="task"]').all()}
            files = {n.get_attribute("data-path") for n in page.locator('#lineage g.node[data-kind="file"]').all()}
            assert {"train", "report"} <= tasks and {"model.txt", "clean.txt", "report.txt"} <= files
            assert outside == []
        finally:
            browser.close()


def test_a_running_runs_chart_refreshes_while_it_logs(served: tuple[UiProject, str]) -> None:
    recorded, url = served
    project = recorded.project
    project.write("live.py", LIVE)
    live = subprocess.Popen(
        [sys.executable, "live.py"], cwd=project.root, stdin=subprocess.PIPE, text=True, env={**os.environ, **GIT_ENV}
    )
    db = project.root / ".flor" / "flor.db"

    def logged() -> tuple[str, int] | None:
        conn = connect_store(db, read_only=True)
        try:
            row = conn.execute(
                "SELECT r.run_id, count(l.seq) FROM runs r LEFT JOIN logs l ON l.run_id = r.run_id "
                "AND l.name = 'live_loss' WHERE r.filename = 'live.py' GROUP BY r.run_id"
            ).fetchone()
        finally:
            conn.close()
        return (str(row[0]), int(row[1])) if row else None

    try:
        assert live.stdin is not None
        live.stdin.write("0.9\n")
        live.stdin.flush()
        run_id, _ = wait_until(lambda: (r := logged()) and r[1] == 1 and r, "the first live value in the store")
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.set_default_timeout(TIMEOUT * 1000)
                page.goto(f"{url}run/{run_id}")
                assert page.locator("#status").inner_text() == "running"
                page.wait_for_selector('.chart[data-name="live_loss"] .main-svg')
                assert chart_points(page, "live_loss", run_id)[0] == [(0.0, 0.9)]
                for k, value in enumerate(("0.7", "0.4"), start=2):
                    live.stdin.write(value + "\n")
                    live.stdin.flush()
                    page.wait_for_function(
                        "n => document.querySelector('.chart[data-name=\"live_loss\"]').data[0].y.length === n", arg=k
                    )
                assert chart_points(page, "live_loss", run_id)[0] == [(0.0, 0.9), (1.0, 0.7), (2.0, 0.4)]
                live.stdin.close()
                assert live.wait(timeout=TIMEOUT) == 0
                page.wait_for_function("() => document.body.dataset.live === '0'")
                assert page.locator("#status").inner_text() == "ok"
            finally:
                browser.close()
    finally:
        if live.poll() is None:
            live.kill()
            live.wait(timeout=60)
