"""The team store end to end: two clones of one project record, push into one real PostgreSQL
(tests/pg_server.py), and read it back as the same frames their local stores give."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
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


def test_two_pushes_of_one_store_at_once_add_each_run_once(
    clones: tuple[Project, Project], pg_server: PgServer, team_url: str
) -> None:
    """Two pushes started together (a watcher and a manual push, or two machines sharing runs): the
    run's team_units key is taken in its transaction, so the later one waits for it and finds it there."""
    a, _b = clones
    a.run("big.py", "200000")
    config = config_of_root(a.root, True)
    pushes = [
        subprocess.Popen(
            [sys.executable, "-m", "flordb_build", "push"], cwd=a.root, stdout=subprocess.PIPE, text=True,
            env={**os.environ, **GIT_ENV},
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in pushes]
    assert [p.returncode for p in pushes] == [0, 0], outputs
    summaries = sorted(next(line for line in out.splitlines() if line.startswith("pushed to 'team'")) for out in outputs)
    assert "0 runs" in summaries[0] and "1 already there" in summaries[0], summaries
    assert "1 runs" in summaries[1] and "200000 values" in summaries[1], summaries
    assert _count(pg_server, team_url, "SELECT count(*) FROM logs") == 200_000
    assert _count(pg_server, team_url, "SELECT count(*) FROM log_chunks") == 1
    assert _count(pg_server, team_url, "SELECT count(*) FROM team_units") == 1
    pdt.assert_frame_equal(flor.dataframe("loss", config=config, store="team"), flor.dataframe("loss", config=config))


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
    from flordb_build.packedlogs import recorded_names, recorded_rows
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
        seen = set()
        for (run_id,) in store.conn.execute("SELECT run_id FROM runs").fetchall():
            for name in recorded_names(store.conn, run_id, "record"):  # logs rows and packed chunks
                seen.add(name)
                rows = recorded_rows(store.conn, run_id, name)
                packed = pusher._packed(run_id, name)
                if name in ("loss", "count", "acc", "words"):  # plain floats or ints in loops
                    assert packed is not None, name
                    assert [tuple(map(list, packed))] == [tuple(map(list, zip(*[r[:3] for r in rows], strict=True)))]
                else:  # text, bools, JSON, big ints, run-level values (lr: never packed): read as rows
                    assert packed is None, name
        assert {"loss", "count", "acc", "words", "lr"} <= seen
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


AWKWARD = """
import flordb_build as flor

for epoch in flor.loop("epoch", range(2)):
    for step in flor.loop("step", range(3)):
        flor.log("signed", [-0.0, float("nan"), float("inf"), -float("inf"), 5e-324, -1.5][epoch * 3 + step])
        flor.log("wide", [2**53 + 1, -(2**63), 2**63 - 1, -(2**53) - 1, 0, 2**62 + 3][epoch * 3 + step])
        flor.log("gappy", None if step == 1 else epoch + step / 4)  # a None among a loop's floats
        flor.log("both", step if epoch else step + 0.5)  # ints in one epoch, floats in the other
        flor.log("word", ["", "h\\u00e9", "x\\x00y", "\\U0001f600", "1", "None"][epoch * 3 + step])
    for doc in flor.loop("doc", [-0.0, 2.5]):  # loop values that are floats
        flor.log("per_doc", 2**53 + 3)
"""
AWKWARD_NAMES = ("signed", "wide", "gappy", "both", "word", "per_doc")


def _cells(frame: pd.DataFrame) -> dict[str, list[str]]:
    """Each column's dtype and cells by repr, floats by their bits: -0.0 and 0.0, or two NaNs, differ."""
    import struct

    def shown(value: object) -> str:
        return struct.pack("<d", value).hex() if isinstance(value, float) else repr(value)

    return {str(c): [str(frame[c].dtype), *map(shown, frame[c].tolist())] for c in frame.columns}


def test_team_frames_keep_every_bit_of_awkward_values(
    clones: tuple[Project, Project], pg_server: PgServer, team_url: str
) -> None:
    """-0.0, NaN, infinities, subnormals, ints beyond 2**53 and at int64's ends, a None among floats,
    ints and floats in one name, empty and astral strings: the team frame is the local one, bit for bit."""
    a, _b = clones
    a.write("awkward.py", AWKWARD)
    a.commit_all("awkward values")
    a.run("awkward.py")
    a.run("awkward.py")
    a.cli("push")
    config = config_of_root(a.root, True)
    assert _count(pg_server, team_url, "SELECT count(*) FROM log_chunks WHERE name = 'wide'") == 2  # packed ints
    for names in (AWKWARD_NAMES, *((n,) for n in AWKWARD_NAMES), ("signed", "per_doc")):
        local = flor.dataframe(*names, config=config)
        team = flor.dataframe(*names, config=config, store="team")
        assert _cells(team) == _cells(local), names
    wide = flor.dataframe("wide", config=config, store="team")["wide"]
    assert str(wide.dtype) == "int64" and wide.tolist()[:3] == [2**53 + 1, -(2**63), 2**63 - 1]
    signed = flor.dataframe("signed", config=config, store="team")["signed"].to_numpy()
    assert str(signed[0]) == "-0.0" and bool(signed[0] == 0) and signed[1] != signed[1]


def test_recorded_values_win_over_replayed_ones_at_one_context_in_both_stores(
    clones: tuple[Project, Project], pg_server: PgServer, team_url: str
) -> None:
    """A replayed row at a context the record also logged loses to the recorded one, in the team
    store as locally: a float beside a run's packed floats (its columnar copy read as it is), and a
    text beside packed ints (read with the run's rows). The replay rows go into both stores' logs
    tables as a replay's backfill and push would leave them (no replay writes a recorded name today)."""
    import sqlite3

    import psycopg

    a, _b = clones
    a.run("train.py")
    a.run("train.py", "--kwargs", "lr=0.2")
    config = config_of_root(a.root, True)
    first, second = flor.query("SELECT run_id FROM runs ORDER BY tstamp", config=config)["run_id"]
    a.cli("push")
    step_ctx = int(flor.query("SELECT min(ctx_id) AS c FROM logs WHERE name = 'loss'", config=config)["c"][0])
    replayed = [  # (run, name, ctx: a recorded one, or the run level above it, value)
        (first, "loss", step_ctx, 999.0), (first, "loss", 0, -7.25),
        (second, "count", step_ctx, "replayed"), (second, "count", 0, "only replayed"),
    ]
    local = sqlite3.connect(config.db_path)
    with local:
        for seq, (run, name, ctx, value) in enumerate(replayed, start=10_000):
            local.execute(
                "INSERT INTO logs (run_id, seq, ctx_id, name, value, kind, source) VALUES (?, ?, ?, ?, ?, 0, 'replay')",
                (run, seq, ctx, name, value),
            )
    local.close()
    with psycopg.connect(team_url) as pg:
        for seq, (run, name, ctx, value) in enumerate(replayed, start=10_000):
            column = "value_float" if isinstance(value, float) else "value_text"
            pg.execute(
                f"INSERT INTO logs (run_id, name, source, seq, ctx_id, kind, {column}) "  # noqa: S608 - a fixed column
                "VALUES (%s, %s, 'replay', %s, %s, 0, %s)",
                (run, name, seq, ctx, value),
            )
        for run in (first, second):
            pg.execute("INSERT INTO team_units (unit_id, kind, content_hash) VALUES (%s, 'replay', 'test')", (run,))
    for names in (("loss",), ("count",), ("loss", "count")):
        frame = flor.dataframe(*names, config=config)
        assert _cells(flor.dataframe(*names, config=config, store="team")) == _cells(frame), names
    loss = flor.dataframe("loss", config=config, store="team")
    assert 999.0 not in set(loss["loss"]) and (loss["run_id"] == first).sum() == 12
    count = flor.dataframe("count", config=config, store="team")
    assert "replayed" not in set(count["count"]) and str(count["count"].dtype) == "int64"


def test_a_store_migrated_to_schema_7_pushes_the_rows_its_schema_6_self_pushed(
    clones: tuple[Project, Project], pg_server: PgServer, team_url: str, tmp_path: Path
) -> None:
    """The team store gets the same `logs` rows and log_chunks whether a run's packed values are
    `logs` rows too (schema 6, pushed by that code) or live only in their chunks (schema 7)."""
    from tests.test_packed_logs import _run, _schema_6_code

    old_code = _schema_6_code(tmp_path)
    a, _b = clones
    _run(a, old_code, "train.py")
    _run(a, old_code, "big.py", "3000")
    assert sqlite3.connect(a.root / ".flor" / "flor.db").execute("PRAGMA user_version").fetchone()[0] == 6
    migrated = Project(tmp_path / "migrated")
    shutil.copytree(a.root, migrated.root)
    new_url = pg_server.create_database("t_" + uuid.uuid4().hex[:12])
    (migrated.root / "pyproject.toml").write_text(_pyproject(new_url))
    _run(a, old_code, "-m", "flordb_build", "push")
    _run(migrated, None, "-m", "flordb_build", "migrate")
    (packed,) = sqlite3.connect(migrated.root / ".flor" / "flor.db").execute(
        "SELECT count(*) FROM log_columns WHERE format IN ('f8', 'i8') AND seq_step IS NULL AND seqs IS NULL"
    ).fetchone()
    assert packed == 0  # every packed chunk knows its seqs: its values left `logs`
    _run(migrated, None, "-m", "flordb_build", "push")
    old_db, new_db = team_url.rsplit("/", 1)[1], new_url.rsplit("/", 1)[1]
    rows = "SELECT * FROM logs ORDER BY run_id, name, source, seq"
    assert pg_server.psql(old_db, rows).count("\n") > 3000
    assert pg_server.psql(new_db, rows) == pg_server.psql(old_db, rows)
    # log_chunks, the columnar copy, is the same but for run-level values (lr), which schema 7
    # never packs: the team store reads those from their `logs` rows, as for any name without a copy
    chunks = "SELECT run_id, name, format, count, md5(seqs), md5(ctx_ids), md5(vals) FROM log_chunks ORDER BY 1, 2"
    old_chunks = pg_server.psql(old_db, chunks).splitlines()
    assert pg_server.psql(new_db, chunks).splitlines() == [line for line in old_chunks if "|lr|" not in line]
    config = config_of_root(migrated.root, True)
    frame = flor.dataframe(*NAMES, config=config)
    pdt.assert_frame_equal(flor.dataframe(*NAMES, config=config, store="team"), frame)
