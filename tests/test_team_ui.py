"""``flordb-build ui --team``: every page over the team store (a real PostgreSQL, tests/pg_server.py)
shows what the same page shows over the local store the runs were pushed from.

The project is tests/ui_project.py's (direct runs, a doit pipeline, a hindsight replay, checkpoints,
two pipeline invocations); it is pushed once, then each page is fetched from two apps, one per store,
through Flask's test client, and the HTML compared whole. The real command is served over HTTP too.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import GIT_ENV, Project
from tests.pg_server import PgServer
from tests.ui_project import UiProject, build_ui_project

flask = pytest.importorskip("flask", reason="the UI extra (flask) is not installed")
pytest.importorskip("psycopg", reason="the team extra (psycopg) is not installed")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory, pg_server: PgServer) -> Iterator[UiProject]:
    """The UI project recorded, then pushed into a fresh team database (the process's cwd is its root)."""
    root = tmp_path_factory.mktemp("team-ui") / "proj"
    root.mkdir()
    keys = (*GIT_ENV, "FLORDB_BUILD_DB", "FLOR_TASK", "FLOR_PIPELINE_ID", "FLORDB_BUILD_REPLAY_KEEP_WARM", "PGPASSWORD")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(GIT_ENV)
    os.environ["FLORDB_BUILD_REPLAY_KEEP_WARM"] = "0"
    os.environ["PGPASSWORD"] = pg_server.password  # the password only where libpq reads it
    for key in ("FLORDB_BUILD_DB", "FLOR_TASK", "FLOR_PIPELINE_ID"):
        os.environ.pop(key, None)
    cwd = os.getcwd()
    project = Project(root)
    project.git("init", "-q", "-b", "main")
    project.write("README.md", "# team ui test\n")
    project.commit_all("initial")
    os.chdir(root)
    try:
        recorded = build_ui_project(project)
        url = pg_server.create_database("ui_" + uuid.uuid4().hex[:12])
        pyproject = root / "pyproject.toml"
        text = pyproject.read_text() if pyproject.exists() else ""
        pyproject.write_text(text + f'\n[tool.flordb_build.remotes.team]\nurl = "{url}"\n')
        out = project.cli("push").stdout
        assert "pushed to 'team'" in out, out
        yield recorded
    finally:
        os.chdir(cwd)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def clients(pushed: UiProject) -> tuple[Any, Any]:
    """(local, team): one test client per store, over the same project."""
    from flordb_build.ui import create_app

    return create_app().test_client(), create_app(team=True).test_client()


def _pages(recorded: UiProject) -> list[str]:
    run = recorded.pipeline_run
    a, b = recorded.direct_runs
    return [
        "/", "/runs?sort=final_acc&desc=0", "/runs?where=lr%20%3E%200.2", "/runs?task=train", "/runs?status=ok",
        "/runs?per=25&page=1", "/runs?where=lr%20%3E%200.2%20AND%20final_acc%20%3E%200",
        f"/run/{run}", f"/run/{a}", f"/run/{b[:6]}", f"/api/run/{run}/figures", f"/api/run/{a}/figures",
        f"/compare?run={a}&run={b}&name=val_acc", f"/compare?run={a}&run={b}&run={run}&name=loss",
        f"/compare?run={a}&run={run}",
        "/pipelines", f"/pipeline/{recorded.pipelines[0]}", f"/pipeline/{recorded.pipelines[1]}",
        "/lineage", "/lineage?path=model.txt", "/lineage?path=clean.txt",
        # refusals read the same too
        "/run/ffffffffffff", "/runs?where=1%3B%20DROP%20TABLE%20runs", "/compare",
    ]


def _same_anchors(page: str) -> str:
    """The page with difflib's table anchors numbered alike (HtmlDiff counts its tables per process)."""
    return re.sub(r"(from|to)\d+_", r"\1N_", page)


def test_every_page_over_the_team_store_is_the_local_page(pushed: UiProject, clients: tuple[Any, Any]) -> None:
    local, team = clients
    for url in _pages(pushed):
        with local.get(url) as mine, team.get(url) as theirs:
            assert theirs.status_code == mine.status_code, (url, theirs.get_data(as_text=True)[:600])
            assert _same_anchors(theirs.get_data(as_text=True)) == _same_anchors(mine.get_data(as_text=True)), url
    # what the pages hold is the runs' content, not two empty pages
    shown = team.get(f"/run/{pushed.direct_runs[1]}").get_data(as_text=True)
    assert 'id="checkpoints"' in shown and ">state<" in shown
    assert 'flor.log("loss", state["w"] + step / 100)' in shown.replace("&#34;", '"')
    runs = team.get("/").get_data(as_text=True)
    assert re.findall(r'<tr data-run="([0-9a-f]+)"', runs) == [pushed.pipeline_run, *reversed(pushed.direct_runs)]
    figures = team.get(f"/api/run/{pushed.pipeline_run}/figures").get_json()
    assert sorted(figures["figures"]) == ["loss", "val_acc", "val_loss"]
    assert any(t["meta"]["source"] == "replay" for t in figures["figures"]["val_loss"]["data"])
    assert 'class="graph"' in team.get(f"/pipeline/{pushed.pipelines[1]}").get_data(as_text=True) or (
        "<svg" in team.get(f"/pipeline/{pushed.pipelines[1]}").get_data(as_text=True)
    )


def test_a_run_pushed_later_shows_on_the_team_runs_page(pushed: UiProject, clients: tuple[Any, Any]) -> None:
    """The runs table is cached per store version: a push is a new version."""
    _local, team = clients
    before = re.findall(r'<tr data-run="([0-9a-f]+)"', team.get("/").get_data(as_text=True))
    project = pushed.project
    project.run("train.py", "--kwargs", "lr=0.7", "epochs=1")
    assert "pushed to 'team'" in project.cli("push").stdout
    after = re.findall(r'<tr data-run="([0-9a-f]+)"', team.get("/").get_data(as_text=True))
    assert len(after) == len(before) + 1 and after[1:] == before


def test_ui_team_command_serves_the_team_store_on_loopback(pushed: UiProject) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "flordb_build", "ui", "--team", "--remote", "team", "--port", "0"],
        cwd=pushed.project.root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, **GIT_ENV},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"serving the team store 'team' at (http://127\.0\.0\.1:(\d+)/)", line)
        assert match, line
        assert "postgresql://" not in line  # the url (user, host) stays out of the log line
        with urllib.request.urlopen(match.group(1) + f"run/{pushed.pipeline_run}", timeout=60) as response:
            page = response.read().decode()
        assert response.status == 200 and 'id="checkpoints"' in page
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        if proc.stdout is not None:
            proc.stdout.close()


def test_ui_team_without_a_remote_says_what_to_configure(project: Project) -> None:
    result = project.cli("ui", "--team", "--port", "0", check=False)
    assert result.returncode != 0
    assert "No team store is configured" in result.stderr + result.stdout
