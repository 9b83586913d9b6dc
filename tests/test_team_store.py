"""The team store end to end: two clones of one project record, push into one real PostgreSQL
(tests/pg_server.py), and read it back as the same frames their local stores give."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pandas as pd
import pandas.testing as pdt
import pytest

import flordb_build as flor
from flordb_build.config import config_of_root
from flordb_build.errors import ConfigError, QueryError
from tests.conftest import GIT_ENV, Project
from tests.pg_server import PgServer

SCRIPT = """
import flordb_build as flor

lr = flor.arg("lr", 0.1)
flor.log("label", "x\\x00y")
for epoch in flor.loop("epoch", range(3)):
    for step in flor.loop("step", range(4)):
        flor.log("loss", 1.0 / (1 + epoch * 4 + step) * lr)
        flor.log("count", epoch * 4 + step)
    flor.log("acc", 0.5 + epoch / 10)
    flor.log("ok", epoch % 2 == 0)
    flor.log("hist", [epoch, {"a": epoch, "nan": float("nan")}])
flor.log("big", 2**70 + 1)
flor.log("note", "h\\u00e9llo")
for doc in flor.loop("doc", ["a.txt", "b.txt"]):
    flor.log("words", len(doc))
"""
NAMES = ("loss", "count", "acc", "ok", "hist", "big", "note", "label", "words", "lr")

BIG_SCRIPT = """
import sys
import flordb_build as flor

for step in flor.loop("step", range(int(sys.argv[1]))):
    flor.log("loss", step / 7)
"""


def _pyproject(url: str, **options: str) -> str:
    extra = "".join(f'{k} = "{v}"\n' for k, v in options.items())
    return f'[tool.flordb_build]\nprojid = "teamproj"\n\n[tool.flordb_build.remotes.team]\nurl = "{url}"\n{extra}'


@pytest.fixture
def team_url(pg_server: PgServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh database on the session's server; the password only in PGPASSWORD."""
    monkeypatch.setenv("PGPASSWORD", pg_server.password)
    return pg_server.create_database("t_" + uuid.uuid4().hex[:12])


def _clone(source: Project, root: Path) -> Project:
    subprocess.run(
        ["git", "clone", "-q", str(source.root), str(root)], check=True, env={**os.environ, **GIT_ENV}
    )
    return Project(root)


@pytest.fixture
def clones(project: Project, team_url: str, tmp_path: Path) -> tuple[Project, Project]:
    """Two clones of one project ("two machines": own directories, own stores), both set to push to ``team_url``."""
    project.write("pyproject.toml", _pyproject(team_url))
    project.write("train.py", SCRIPT)
    project.write("big.py", BIG_SCRIPT)
    project.commit_all("train script")
    return project, _clone(project, tmp_path / "machine-b")


def _count(server: PgServer, url: str, sql: str, *params: str) -> int:
    """One number from the team database, read directly (not through flordb_build)."""
    import psycopg

    with psycopg.connect(url) as conn:
        row = conn.execute(sql, params or None).fetchone()
    assert row is not None
    return int(row[0])


def test_two_clones_push_into_one_team_store_that_reads_as_their_local_frames(
    clones: tuple[Project, Project], pg_server: PgServer, team_url: str
) -> None:
    a, b = clones
    a.run("train.py", "--kwargs", "lr=0.1")
    a.run("train.py", "--kwargs", "lr=0.2")
    b.run("train.py", "--kwargs", "lr=0.3")
    for clone in (a, b):
        out = clone.cli("push").stdout
        assert "pushed to 'team'" in out
    config_a, config_b = (config_of_root(c.root, True) for c in (a, b))
    for names in (NAMES, ("loss",), ("acc", "words"), ()):
        local = pd.concat([flor.dataframe(*names, config=c) for c in (config_a, config_b)], ignore_index=True)
        team = flor.dataframe(*names, config=config_b, store="team")
        assert len(team) and team["run_id"].nunique() == 3
        pdt.assert_frame_equal(team, local)
    # where= is the same parsed expression over either store
    where = "lr >= 0.2 AND epoch = 1"
    local = pd.concat(
        [flor.dataframe("loss", "lr", where=where, config=c) for c in (config_a, config_b)], ignore_index=True
    )
    pdt.assert_frame_equal(flor.dataframe("loss", "lr", where=where, config=config_a, store="team"), local)
    assert set(flor.dataframe("label", "big", config=config_a, store="team")["label"]) == {"x\x00y"}
    # the CLI reads the same team store from either clone
    shown = a.cli("dataframe", "acc", "--team", "--format", "csv").stdout
    assert shown.count("teamproj") == 9  # 3 runs x 3 epochs
    runs = b.cli("runs", "--team", "--format", "csv").stdout
    assert len(runs.strip().splitlines()) == 1 + 3
    counted = a.cli(
        "query", "--team", "SELECT count(DISTINCT run_id) AS n FROM logs", "--format", "csv"
    ).stdout
    assert counted.split() == ["n", "3"]


def test_pushing_twice_or_from_both_clones_adds_nothing_twice(
    clones: tuple[Project, Project], pg_server: PgServer, team_url: str
) -> None:
    a, b = clones
    a.run("train.py")
    b.run("train.py")
    a.cli("push")
    second = a.cli("push").stdout
    assert "0 runs" in second and "1 already there" in second
    b.cli("push")
    b.cli("push")
    local_values = sum(
        len(flor.query("SELECT 1 FROM logs", config=config_of_root(c.root, True))) for c in (a, b)
    )
    assert _count(pg_server, team_url, "SELECT count(*) FROM logs") == local_values
    assert _count(pg_server, team_url, "SELECT count(*) FROM runs") == 2
    assert _count(pg_server, team_url, "SELECT count(*) FROM team_units WHERE kind = 'run'") == 2


def test_a_push_killed_mid_copy_then_repeated_loses_and_duplicates_nothing(
    clones: tuple[Project, Project], pg_server: PgServer, team_url: str
) -> None:
    a, _b = clones
    a.run("train.py")
    a.run("big.py", "300000")
    config = config_of_root(a.root, True)
    small, big = flor.query("SELECT run_id FROM runs ORDER BY tstamp", config=config)["run_id"]
    push = subprocess.Popen(
        [sys.executable, "-m", "flordb_build", "push"],
        cwd=a.root,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **GIT_ENV},
    )
    assert push.stdout is not None
    for line in push.stdout:  # the push says when it starts copying the big run: kill it there
        if line.startswith(f"copying run {big}"):
            push.send_signal(signal.SIGKILL)
            break
    push.wait()
    push.stdout.close()
    assert push.returncode == -signal.SIGKILL
    db = team_url.rsplit("/", 1)[1]
    assert pg_server.psql(db, "SELECT unit_id FROM team_units ORDER BY unit_id").split() == [small]
    assert _count(pg_server, team_url, "SELECT count(*) FROM logs WHERE run_id = %s", big) == 0
    a.cli("push")
    assert _count(pg_server, team_url, "SELECT count(*) FROM logs WHERE run_id = %s", big) == 300_000
    local = flor.dataframe("loss", config=config)
    pdt.assert_frame_equal(flor.dataframe("loss", config=config, store="team"), local)


def test_an_unfinished_run_is_not_pushed_until_it_ends(
    clones: tuple[Project, Project], pg_server: PgServer, team_url: str
) -> None:
    a, _b = clones
    a.write(
        "wait.py",
        """
        import sys
        import flordb_build as flor

        flor.log("before", 1)
        print("logged", flush=True)
        sys.stdin.readline()  # runs until the test says so
        flor.log("after", 2)
    """,
    )
    proc = subprocess.Popen(
        [sys.executable, "wait.py"],
        cwd=a.root,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **GIT_ENV},
    )
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline().strip() == "logged"
    config = config_of_root(a.root, True)
    assert "running" in set(flor.query("SELECT status FROM runs", config=config)["status"])
    out = a.cli("push").stdout
    assert "still running" in out
    assert _count(pg_server, team_url, "SELECT count(*) FROM runs") == 0
    proc.stdin.write("go\n")
    proc.stdin.close()
    assert proc.wait(timeout=120) == 0
    proc.stdout.close()
    a.cli("push")
    assert _count(pg_server, team_url, "SELECT count(*) FROM logs") == len(
        flor.query("SELECT 1 FROM logs", config=config)
    )
    assert _count(pg_server, team_url, "SELECT count(*) FROM runs WHERE status = 'running'") == 0


def test_push_watch_pushes_each_run_as_it_ends(
    clones: tuple[Project, Project], pg_server: PgServer, team_url: str
) -> None:
    a, _b = clones
    watch = subprocess.Popen(
        [sys.executable, "-m", "flordb_build", "push", "--watch"],
        cwd=a.root,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **GIT_ENV},
    )
    assert watch.stdout is not None
    try:
        assert watch.stdout.readline().startswith("pushed to 'team': 0 runs")  # nothing recorded yet
        a.run("train.py")
        (run_id,) = flor.query("SELECT run_id FROM runs", config=config_of_root(a.root, True))["run_id"]
        for line in watch.stdout:  # the watcher reports each unit as it commits it
            if line.startswith(f"pushed run {run_id}"):
                break
        assert _count(pg_server, team_url, "SELECT count(*) FROM runs WHERE run_id = %s", run_id) == 1
    finally:
        watch.kill()
        watch.wait()
        watch.stdout.close()


def test_a_password_in_the_remote_is_refused_and_no_secret_lands_anywhere(
    clones: tuple[Project, Project], pg_server: PgServer, team_url: str
) -> None:
    a, _b = clones
    secret_url = team_url.replace("flor@", f"flor:{pg_server.password}@")
    for pyproject in (
        _pyproject(secret_url),
        _pyproject(team_url, password=pg_server.password),
        _pyproject(team_url + f"?password={pg_server.password}"),
    ):
        (a.root / "pyproject.toml").write_text(pyproject)
        refused = a.cli("push", check=False)
        assert refused.returncode == 1 and "password" in refused.stderr and "PGPASSWORD" in refused.stderr
        assert pg_server.password not in refused.stdout + refused.stderr
        with pytest.raises(ConfigError):
            config_of_root(a.root, True)
    (a.root / "pyproject.toml").write_text(_pyproject(team_url))
    recorded = a.run("train.py")
    pushed = a.cli("push")
    shown = a.cli("dataframe", "loss", "--team")
    for text in (recorded.stdout, recorded.stderr, pushed.stdout, pushed.stderr, shown.stdout, shown.stderr):
        assert pg_server.password not in text
    for path in (a.root / ".flor").rglob("*"):
        if path.is_file():
            assert pg_server.password.encode() not in path.read_bytes(), path
    history = a.git("log", "--all", "-p", "--format=%H %B")
    assert "flor.shadow" in a.git("branch", "--all") and pg_server.password not in history


def test_team_reads_are_read_only(
    clones: tuple[Project, Project], pg_server: PgServer, team_url: str
) -> None:
    a, _b = clones
    a.run("train.py")
    a.cli("push")
    config = config_of_root(a.root, True)
    for sql in (
        "DELETE FROM logs",
        "INSERT INTO runs (run_id) VALUES ('x')",
        "SELECT 1; SET default_transaction_read_only = off; DELETE FROM logs",
    ):
        with pytest.raises(QueryError):
            flor.query(sql, config=config, store="team")
    shown = flor.query(
        "SELECT count(*) AS n FROM logs WHERE name = %s", ["loss"], config=config, store="team"
    )
    assert shown["n"].tolist() == [12]
    assert _count(pg_server, team_url, "SELECT count(*) FROM logs") > 12


def test_importing_flordb_build_needs_no_psycopg() -> None:
    # Nor numpy: the push builds its binary COPY blocks with it, and loads only when a push runs.
    code = "import sys, flordb_build, flordb_build.team; print('psycopg' in sys.modules, 'numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


def test_remote_options_reach_libpq_and_the_remote_is_chosen_by_name(
    clones: tuple[Project, Project], pg_server: PgServer, team_url: str
) -> None:
    a, _b = clones
    # The test server has no TLS: sslmode=require must reach libpq and fail there, naming SSL.
    (a.root / "pyproject.toml").write_text(_pyproject(team_url, sslmode="require"))
    refused = a.cli("push", check=False)
    assert refused.returncode == 1 and "SSL" in refused.stderr
    (a.root / "pyproject.toml").write_text(
        _pyproject(team_url, sslmode="disable")
        + '\n[tool.flordb_build.remotes.other]\nurl = "postgresql://nowhere/x"\n'
    )
    several = a.cli("push", check=False)
    assert several.returncode == 1 and "--remote NAME" in several.stderr
    assert "pushed to 'team'" in a.cli("push", "--remote", "team").stdout
    unknown = a.cli("push", "--remote", "tem", check=False)
    assert unknown.returncode == 1 and "No remote 'tem'" in unknown.stderr


def test_push_copies_packed_names_from_log_columns_with_the_rows_seqs(
    clones: tuple[Project, Project], pg_server: PgServer, team_url: str
) -> None:
    """Floats and ints go from log_columns' chunks (no row read); each row keeps its own seq and ctx."""
    from flordb_build.reader import open_read_only
    from flordb_build.team._push import _Pusher

    a, _b = clones
    a.run("train.py")  # loss and count interleave in one loop: their chunks have gaps between them
    a.run("big.py", "30000")  # one name alone: adjacent chunks
    config = config_of_root(a.root, True)
    store = open_read_only(config)
    assert store is not None
    try:
        pusher = _Pusher(store.conn, None, lambda *_: None)
        for run_id, name in store.conn.execute("SELECT DISTINCT run_id, name FROM logs").fetchall():
            rows = store.conn.execute(
                "SELECT seq, ctx_id, value, kind FROM logs WHERE run_id = ? AND name = ? AND source = 'record' "
                "ORDER BY seq",
                (run_id, name),
            ).fetchall()
            packed = pusher._packed(run_id, name)
            if name in ("loss", "count", "acc", "words", "lr"):  # plain floats or ints
                assert packed is not None, name
                assert [tuple(map(list, packed))] == [tuple(map(list, zip(*[r[:3] for r in rows], strict=True)))]
            else:  # text, bools, JSON, big ints: read as rows
                assert packed is None, name
    finally:
        store.close()
    a.cli("push")
    for name in ("loss", "count", "acc", "words"):
        local = flor.dataframe(name, config=config)
        pdt.assert_frame_equal(flor.dataframe(name, config=config, store="team"), local)
    seqs = "SELECT count(DISTINCT (run_id, seq)) FROM logs WHERE name = 'loss'"
    assert _count(pg_server, team_url, seqs) == _count(pg_server, team_url, "SELECT count(*) FROM logs WHERE name = 'loss'")


def test_runs_read_the_same_from_the_columnar_copy_and_from_the_rows(
    clones: tuple[Project, Project], pg_server: PgServer, team_url: str
) -> None:
    """log_chunks (a push's columnar copy of plain numbers) and logs (the rows) give one frame; a run
    pushed without the copy (an older flordb_build) reads from the rows."""
    a, _b = clones
    a.run("train.py")
    a.run("big.py", "20000")
    a.cli("push")
    config = config_of_root(a.root, True)
    assert _count(pg_server, team_url, "SELECT count(*) FROM log_chunks WHERE name = 'loss'") == 2
    assert _count(pg_server, team_url, "SELECT count(*) FROM log_chunks WHERE name = 'note'") == 0  # text: rows only
    local = {names: flor.dataframe(*names, config=config) for names in (NAMES, ("loss",), ("loss", "count"))}
    for names, frame in local.items():
        pdt.assert_frame_equal(flor.dataframe(*names, config=config, store="team"), frame)
    pg_server.psql(team_url.rsplit("/", 1)[1], "DELETE FROM log_chunks")
    for names, frame in local.items():
        pdt.assert_frame_equal(flor.dataframe(*names, config=config, store="team"), frame)
