"""The UI's pages through Flask's test client over a store made by real runs (no browser here;
tests/test_ui_browser.py drives them in Chromium), and ``flordb-build ui`` as a real server."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import GIT_ENV, Project
from tests.ui_project import UiProject, build_ui_project

flask = pytest.importorskip("flask", reason="the UI extra (flask) is not installed")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UiProject]:
    """One recorded project for every test of this module (the test process's cwd is its root)."""
    root = tmp_path_factory.mktemp("ui") / "proj"
    root.mkdir()
    keys = (*GIT_ENV, "FLORDB_BUILD_DB", "FLOR_TASK", "FLOR_PIPELINE_ID", "FLORDB_BUILD_REPLAY_KEEP_WARM")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(GIT_ENV)
    os.environ["FLORDB_BUILD_REPLAY_KEEP_WARM"] = "0"  # the replay's warm server stops when it ends
    for key in ("FLORDB_BUILD_DB", "FLOR_TASK", "FLOR_PIPELINE_ID"):
        os.environ.pop(key, None)
    cwd = os.getcwd()
    project = Project(root)
    project.git("init", "-q", "-b", "main")
    project.write("README.md", "# ui test\n")
    project.commit_all("initial")
    os.chdir(root)
    try:
        yield build_ui_project(project)
    finally:
        os.chdir(cwd)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def client(recorded: UiProject) -> Any:
    from flordb_build.ui import create_app

    return create_app().test_client()


def store_fingerprint(root: Path) -> tuple[str, list[tuple[Any, ...]]]:
    """The database file's bytes hash and the runs' statuses: what a write would change."""
    db = root / ".flor" / "flor.db"
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        statuses = conn.execute("SELECT run_id, status FROM runs ORDER BY run_id").fetchall()
    finally:
        conn.close()
    return hashlib.sha256(db.read_bytes()).hexdigest(), statuses


def test_every_page_renders_and_the_store_is_not_written(recorded: UiProject, client: Any) -> None:
    root = recorded.project.root
    # A run still marked 'running' whose process is gone: a writer would mark it killed.
    conn = sqlite3.connect(root / ".flor" / "flor.db")
    conn.execute("UPDATE runs SET status = 'running' WHERE run_id = ?", (recorded.direct_runs[0],))
    conn.commit()
    conn.close()
    before = store_fingerprint(root)
    try:
        run = recorded.pipeline_run
        pages = [
            "/", "/runs?sort=final_acc&desc=0", "/runs?where=lr%20%3E%200.2", "/runs?task=train", "/runs?status=ok",
            f"/run/{run}", f"/run/{run[:6]}", f"/api/run/{run}/figures",
            f"/compare?run={recorded.direct_runs[0]}&run={recorded.direct_runs[1]}&name=val_acc",
            "/pipelines", f"/pipeline/{recorded.pipelines[1]}", "/lineage", "/lineage?path=model.txt",
            "/static/plotly.min.js", "/static/ui.js", "/static/ui.css",
        ]
        for url in pages:
            with client.get(url) as response:
                assert response.status_code == 200, (url, response.data[:400])
        shown = client.get(f"/run/{recorded.direct_runs[0]}").get_data(as_text=True)
        assert 'class="status killed"' in shown  # shown as killed, left as it is in the store
        assert store_fingerprint(root) == before
    finally:
        conn = sqlite3.connect(root / ".flor" / "flor.db")
        conn.execute("UPDATE runs SET status = 'ok' WHERE run_id = ?", (recorded.direct_runs[0],))
        conn.commit()
        conn.close()


def test_runs_page_columns_filter_sort_and_page(recorded: UiProject, client: Any) -> None:
    page = client.get("/runs").get_data(as_text=True)
    header = re.search(r"<thead>(.*?)</thead>", page, re.S)
    assert header is not None
    for column in ("run_id", "tstamp", "task", "filename", "status", "seconds", "lr", "epochs", "final_acc", "note"):
        assert f">{column}" in header.group(1), column
    rows = re.findall(r'<tr data-run="([0-9a-f]+)"', page)
    assert rows == [recorded.pipeline_run, recorded.direct_runs[1], recorded.direct_runs[0]]  # newest first
    filtered = client.get("/runs", query_string={"where": "lr > 0.2"}).get_data(as_text=True)
    assert re.findall(r'<tr data-run="([0-9a-f]+)"', filtered) == [recorded.pipeline_run, recorded.direct_runs[1]]
    by_acc = client.get("/runs", query_string={"sort": "final_acc", "desc": "0"}).get_data(as_text=True)
    assert re.findall(r'<tr data-run="([0-9a-f]+)"', by_acc) == [*recorded.direct_runs, recorded.pipeline_run]
    paged = client.get("/runs", query_string={"per": "25", "page": "1"}).get_data(as_text=True)
    assert 'data-shown="3"' in paged and 'data-all="3"' in paged
    bad = client.get("/runs", query_string={"where": "1; DROP TABLE runs"})
    assert bad.status_code == 400 and "may not contain" in bad.get_data(as_text=True)
    wide = re.search(r'<td class="value" title="(\[[0-9,]+\])">([^<]+)</td>', page)
    assert wide is not None and wide.group(2).endswith("…") and len(wide.group(2)) < len(wide.group(1))


def test_run_page_figures_hold_the_dataframe_points(recorded: UiProject, client: Any) -> None:
    import flordb_build as flor

    run = recorded.direct_runs[1]
    data = json.loads(client.get(f"/api/run/{run}/figures").get_data(as_text=True))
    assert data["status"] == "ok"
    assert sorted(data["figures"]) == ["loss", "val_acc", "val_loss"]
    for name in ("loss", "val_acc", "val_loss"):
        frame = flor.dataframe(name)
        frame = frame[frame["run_id"] == run]
        traces = data["figures"][name]["data"]
        ys = [y for t in traces for y in t["y"]]
        assert sorted(ys) == sorted(frame[name].tolist())
    replayed = [t for t in data["figures"]["val_loss"]["data"] if t["meta"]["source"] == "replay"]
    assert len(replayed) == 1 and replayed[0]["line"]["dash"] == "dash" and replayed[0]["meta"]["points"] == 3
    page = client.get(f"/run/{run}").get_data(as_text=True)
    assert 'flor.log("loss", state["w"] + step / 100)' in page.replace("&#34;", '"')  # the code at the snapshot
    assert 'id="checkpoints"' in page and ">state<" in page


def test_compare_marks_what_differs(recorded: UiProject, client: Any) -> None:
    a, b = recorded.direct_runs
    page = client.get(f"/compare?run={a}&run={b}&name=loss").get_data(as_text=True)
    rows = dict(re.findall(r'<tr class="(?:differs|same)" data-name="([^"]+)" data-section="args" data-differs="(\w+)"', page))
    assert rows == {"lr": "true", "epochs": "false"}
    assert re.search(r'data-name="final_acc" data-section="values" data-differs="true"', page)
    assert page.count('class="diff"') == 1 and "v2, lr " in page  # the two versions of train.py side by side
    figure = json.loads(re.search(r'<script type="application/json" id="figures">(.*?)</script>', page, re.S).group(1))
    assert {t["meta"]["run_id"] for t in figure["loss"]["data"]} == {a, b}


def test_ui_command_binds_to_loopback_and_prints_its_url(recorded: UiProject) -> None:
    import urllib.request

    proc = subprocess.Popen(
        [sys.executable, "-m", "flordb_build", "ui", "--port", "0"],
        cwd=recorded.project.root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, **GIT_ENV},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"at (http://127\.0\.0\.1:(\d+)/)", line)
        assert match, line
        with urllib.request.urlopen(match.group(1), timeout=60) as response:
            assert response.status == 200 and b'id="runs"' in response.read()
        listening = subprocess.run(["ss", "-ltnH", f"sport = :{match.group(2)}"], capture_output=True, text=True, check=False)
        if listening.returncode == 0:  # the local address of the listening socket is loopback only
            assert [line.split()[3] for line in listening.stdout.splitlines()] == [f"127.0.0.1:{match.group(2)}"]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        if proc.stdout is not None:
            proc.stdout.close()
