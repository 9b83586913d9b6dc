"""Build context end to end: real doit and make runs in a temporary git repository.

doit runs as ``python -m doit`` in a subprocess, configured only by what ``flordb-build init``
wrote, exactly as a user runs it; Make runs the copied template with ``make``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from flordb_build.dag import FileHasher, FileRole, init_project
from flordb_build.errors import InitError
from flordb_build.redaction import redact_argv
from tests.conftest import GIT_ENV, Project
from tests.storedb import connect_store

PY = sys.executable


def doit(project: Project, *args: str, env: Mapping[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run plain ``doit`` (python -m doit) in the project."""
    return subprocess.run(
        [PY, "-m", "doit", *args],
        cwd=cwd or project.root,
        env={**os.environ, **GIT_ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


def rows(project: Project, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    conn = connect_store(project.root / ".flor" / "flor.db")
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def task_rows(project: Project, pipeline_id: str) -> dict[str, tuple[Any, ...]]:
    got = rows(project, "SELECT task, status, reason, error, seconds FROM tasks WHERE pipeline_id = ?", (pipeline_id,))
    return {r[0]: r[1:] for r in got}


def pipeline_ids(project: Project) -> list[str]:
    return [r[0] for r in rows(project, "SELECT pipeline_id FROM pipelines ORDER BY started")]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


DODO_ML = f"""
    PY = {PY!r}

    def task_prep():
        return {{"file_dep": ["prep.py", "data/raw.csv"], "targets": ["data/clean.csv"],
                 "actions": [PY + " prep.py"]}}

    def task_train():
        return {{"file_dep": ["train.py", "data/clean.csv"], "targets": ["model.pkl"],
                 "actions": [PY + " train.py"]}}

    def task_infer():
        return {{"file_dep": ["infer.py", "model.pkl", "data/clean.csv"], "targets": ["predictions.csv"],
                 "actions": [PY + " infer.py"]}}
    """

PREP = """
    import flordb_build as flor
    rows = open("data/raw.csv").read().split()
    flor.log("n_rows", len(rows))
    open("data/clean.csv", "w").write("\\n".join(r.strip() for r in rows))
    """

TRAIN = """
    import flordb_build as flor
    lr = flor.arg("lr", 0.1)
    for epoch in flor.loop("epoch", range(3)):
        flor.log("loss", 1.0 / (epoch + 1) * lr)
    open("model.pkl", "w").write(f"weights lr={lr} version=1")
    """

INFER = """
    import flordb_build as flor
    model = open("model.pkl").read()
    flor.log("model_text", model)
    open("predictions.csv", "w").write("pred:" + model)
    """


def ml_project(project: Project) -> None:
    project.write("dodo.py", DODO_ML)
    project.write("prep.py", PREP)
    project.write("train.py", TRAIN)
    project.write("infer.py", INFER)
    project.write("data/raw.csv", "a\nb\nc\n")
    project.commit_all("pipeline")
    init_project(project.root)


def test_prep_train_infer_rerun_after_train_change(project: Project) -> None:
    ml_project(project)
    first = doit(project)
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == [".  prep", ".  train", ".  infer"]

    project.write("train.py", TRAIN.replace("version=1", "version=2"))
    second = doit(project)
    assert second.returncode == 0, second.stderr
    assert second.stdout.splitlines() == ["-- prep", ".  train", ".  infer"]

    p1, p2 = pipeline_ids(project)
    t1, t2 = task_rows(project, p1), task_rows(project, p2)
    assert {name: row[0] for name, row in t1.items()} == {"prep": "executed", "train": "executed", "infer": "executed"}
    assert t1["prep"][1] == "missing target: data/clean.csv"
    assert {name: row[0] for name, row in t2.items()} == {"prep": "up-to-date", "train": "executed", "infer": "executed"}
    assert t2["train"][1] == "changed file_dep: train.py"
    assert t2["infer"][1] == "changed file_dep: model.pkl"  # the new model, not infer.py
    assert t2["prep"][1] is None

    # The pipeline rows: tool, argv, status, and the DAG with deps, targets and actions.
    tool, argv, status, exit_code, dag_text = rows(
        project, "SELECT tool, argv, status, exit_code, dag FROM pipelines WHERE pipeline_id = ?", (p2,)
    )[0]
    assert (tool, status, exit_code) == ("doit", "ok", 0)
    assert isinstance(json.loads(argv), list)
    dag = {t["name"]: t for t in json.loads(dag_text)["tasks"]}
    assert dag["train"]["file_dep"] == ["data/clean.csv", "train.py"]
    assert dag["train"]["targets"] == ["model.pkl"]
    assert dag["infer"]["actions"] == [PY + " infer.py"]

    # files: every dep and target with the sha256 of its content at the time.
    files = rows(project, "SELECT task, path, role, sha256, size FROM files WHERE pipeline_id = ?", (p2,))
    by_key = {(t, p, r): (s, z) for t, p, r, s, z in files}
    assert by_key[("infer", "predictions.csv", "target")] == (
        sha256(project.root / "predictions.csv"),
        (project.root / "predictions.csv").stat().st_size,
    )
    assert by_key[("prep", "data/raw.csv", "dep")][0] == sha256(project.root / "data" / "raw.csv")
    assert by_key[("train", "train.py", "dep")][0] == sha256(project.root / "train.py")
    assert len(files) == 3 + 3 + 4

    # Scripts' runs carry their task and link to their pipeline.
    runs = rows(project, "SELECT task, pipeline_id, filename, env_id FROM runs ORDER BY tstamp")
    assert [(r[0], r[1]) for r in runs] == [
        ("prep", p1), ("train", p1), ("infer", p1), ("train", p2), ("infer", p2)
    ]
    assert all(r[3] for r in runs)  # every run has its environment

    import flordb_build as flor

    loss = flor.dataframe("loss")
    assert len(loss) == 6
    assert set(loss["task"]) == {"train"}
    assert set(flor.dataframe("n_rows")["task"]) == {"prep"}

    lineage = project.cli("lineage", "predictions.csv").stdout
    assert "task 'infer'" in lineage
    assert "task 'train'" in lineage
    assert "model.pkl" in lineage
    assert "task 'prep'" in lineage  # recursively up the DAG
    assert f"task 'infer'  (doit pipeline {p2}" in lineage  # the producer of this exact content
    assert f"task 'prep'  (doit pipeline {p1}" in lineage  # prep last executed in the first pipeline

    tasks_table = project.cli("tasks").stdout
    assert "changed file_dep: train.py" in tasks_table and "up-to-date" in tasks_table
    pipelines_table = project.cli("pipelines").stdout
    assert p1 in pipelines_table and p2 in pipelines_table


def test_forced_run_records_reason_and_up_to_date_files_reuse_hashes(project: Project) -> None:
    ml_project(project)
    assert doit(project).returncode == 0
    forced = doit(project, "run", "-a", "prep")
    assert forced.returncode == 0 and forced.stdout == ".  prep\n"
    quiet = doit(project)
    assert quiet.stdout.splitlines() == ["-- prep", "-- train", "-- infer"]
    p1, p2, p3 = pipeline_ids(project)
    t2 = task_rows(project, p2)
    assert list(t2) == ["prep"] and t2["prep"][:2] == ("executed", "forced: doit run --always-execute")
    assert {k: v[0] for k, v in task_rows(project, p3).items()} == {"prep": "up-to-date", "train": "up-to-date", "infer": "up-to-date"}
    same = rows(
        project,
        "SELECT a.sha256 = b.sha256 FROM files a JOIN files b ON a.path = b.path AND a.role = b.role AND a.task = b.task "
        "WHERE a.pipeline_id = ? AND b.pipeline_id = ?",
        (p1, p3),
    )
    assert same and all(s == (1,) for s in same)


@pytest.mark.parametrize("par_type", ["process", "thread"])
def test_parallel_tasks_each_logging_10k_values(project: Project, par_type: str) -> None:
    project.write(
        "dodo.py",
        f"""
        PY = {PY!r}

        def task_left():
            return {{"actions": [PY + " log10k.py left"]}}

        def task_right():
            return {{"actions": [[PY, "log10k.py", "right"]]}}
        """,
    )
    project.write(
        "log10k.py",
        """
        import os, sys
        import flordb_build as flor
        assert os.environ["FLOR_TASK"] == sys.argv[1], (os.environ["FLOR_TASK"], sys.argv[1])
        for i in flor.loop("step", range(10_000)):
            flor.log("value", i)
        """,
    )
    project.commit_all("parallel")
    init_project(project.root)
    done = doit(project, "-n", "2", "-P", par_type)
    assert done.returncode == 0, done.stdout + done.stderr
    (pipeline_id,) = pipeline_ids(project)
    counts = rows(
        project,
        "SELECT r.task, r.pipeline_id, count(*), min(l.value), max(l.value) FROM logs l JOIN runs r USING (run_id) "
        "GROUP BY r.run_id ORDER BY r.task",
    )
    assert counts == [("left", pipeline_id, 10_000, 0, 9_999), ("right", pipeline_id, 10_000, 0, 9_999)]
    import flordb_build as flor

    frame = flor.dataframe("value")
    assert len(frame) == 20_000
    assert frame.groupby("task").size().to_dict() == {"left": 10_000, "right": 10_000}


@pytest.mark.parametrize("par_type", ["process", "thread"])
def test_python_actions_become_runs_of_their_task(project: Project, par_type: str) -> None:
    project.write(
        "dodo.py",
        """
        import flordb_build as flor

        def log_many(name):
            for i in flor.loop("i", range(200)):
                flor.log(name, i)

        def boom():
            flor.log("before_boom", 1)
            raise RuntimeError("boom from a python action")

        def task_one():
            return {"actions": [(log_many, ["one_value"])]}

        def task_two():
            return {"actions": [(log_many, ["two_value"])]}

        def task_three():
            return {"actions": [boom], "task_dep": ["one"]}
        """,
    )
    project.commit_all("python actions")
    init_project(project.root)
    done = doit(project, "-n", "2", "-P", par_type, "--continue")
    assert done.returncode == 2, done.stdout + done.stderr  # a raising action is doit's TaskError
    got = rows(
        project,
        "SELECT r.task, r.status, l.name, count(*) FROM runs r JOIN logs l USING (run_id) GROUP BY r.run_id ORDER BY r.task",
    )
    assert got == [("one", "ok", "one_value", 200), ("three", "failed", "before_boom", 1), ("two", "ok", "two_value", 200)]
    (pipeline_id,) = pipeline_ids(project)
    tasks = task_rows(project, pipeline_id)
    assert tasks["three"][0] == "failed"
    assert "boom from a python action" in tasks["three"][2]
    error = rows(project, "SELECT error FROM runs WHERE task = 'three'")[0][0]
    assert "boom from a python action" in error
    assert rows(project, "SELECT status, exit_code FROM pipelines") == [("error", 2)]


FAILING_DODO = f"""
    PY = {PY!r}

    def task_ok():
        return {{"actions": [PY + " -c 'print(1)'"], "targets": ["never.txt"]}}

    def task_bad():
        return {{"actions": [PY + " fail.py"], "file_dep": ["fail.py"], "targets": ["out.txt"]}}

    def task_after():
        return {{"actions": ["echo after"], "task_dep": ["bad"]}}
    """


def test_failing_task_keeps_doit_exit_code_and_output(project: Project, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    for root in (project.root, plain):
        (root / "dodo.py").write_text(__import__("textwrap").dedent(FAILING_DODO))
        (root / "fail.py").write_text("import sys\nprint('partial', file=sys.stderr)\nsys.exit(3)\n")
    project.commit_all("failing")
    init_project(project.root)
    expected = doit(project, cwd=plain)
    got = doit(project)
    assert expected.returncode == 1
    assert (got.returncode, got.stdout, got.stderr) == (expected.returncode, expected.stdout, expected.stderr)
    (pipeline_id,) = pipeline_ids(project)
    tasks = task_rows(project, pipeline_id)
    assert tasks["bad"][0] == "failed"
    assert f"Command failed: '{PY} fail.py' returned 3" in tasks["bad"][2]
    assert tasks["ok"][0] == "executed"
    assert "after" not in tasks  # doit stopped before it, as it does without flordb_build
    assert rows(project, "SELECT status, exit_code FROM pipelines") == [("failed", 1)]
    # A failed task's targets are not recorded as made; its inputs are.
    assert rows(project, "SELECT path, role FROM files WHERE task = 'bad'") == [("fail.py", "dep")]

    # Other reporters are wrapped the same way: JSON output stays valid JSON.
    as_json = doit(project, "-r", "json")
    assert as_json.returncode == 1
    assert {t["name"]: t["result"] for t in json.loads(as_json.stdout)["tasks"]}["bad"] == "fail"
    assert len(pipeline_ids(project)) == 2


def test_secret_environment_value_never_reaches_the_store(project: Project) -> None:
    secret = "sk-do-not-store-4f9a1c7e22b0"
    ml_project(project)
    project.write(
        "Makefile.secret",
        f"out.txt: prep.py\n\t{PY} -m flordb_build exec --task secret --deps $^ --targets $@ -- {PY} -c \"open('out.txt','w').write('x')\"\n",
    )
    env = {"MY_API_TOKEN": secret, "FLOR_API_KEY": secret, "OMP_NUM_THREADS": "3"}
    assert doit(project, env=env).returncode == 0
    made = subprocess.run(
        ["make", "-f", "Makefile.secret"], cwd=project.root, env={**os.environ, **env}, capture_output=True, text=True
    )
    assert made.returncode == 0, made.stderr
    conn = sqlite3.connect(project.root / ".flor" / "flor.db")
    try:
        tables = [t for (t,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for row in conn.execute(f"SELECT * FROM {table}"):  # noqa: S608 - names from sqlite_master
                assert secret not in repr(row), table
        env_json = json.loads(conn.execute("SELECT env FROM envs LIMIT 1").fetchone()[0])
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    assert env_json["env_vars"].get("OMP_NUM_THREADS") == "3"  # allow-listed variables are kept
    assert "MY_API_TOKEN" not in env_json["env_vars"] and "FLOR_API_KEY" not in env_json["env_vars"]
    for path in (project.root / ".flor").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def make_project(project: Project) -> None:
    project.write("prep.py", PREP)
    project.write("train.py", TRAIN)
    project.write("infer.py", INFER + 'print("streamed: predictions written")\n')
    project.write("data/raw.csv", "a\nb\n")
    project.commit_all("make pipeline")
    steps = init_project(project.root, make=True)
    assert [(s.path.name, s.action) for s in steps] == [("Makefile", "copied")]
    makefile = project.root / "Makefile"
    makefile.write_text(uncomment_example(makefile.read_text()))


def uncomment_example(text: str) -> str:
    """The template with its example pipeline switched on, as its comment tells a user to."""
    before, rest = text.split("# --- example pipeline ---\n")
    example, after = rest.split("# --- end of the example pipeline ---\n")
    assert all(line.startswith("#") for line in example.splitlines())
    return before + "".join(line[1:] + "\n" for line in example.splitlines()) + after


def make(project: Project, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", f"PYTHON={PY}", f"FLORDB_BUILD={PY} -m flordb_build", *args],
        cwd=project.root,
        env={**os.environ, **GIT_ENV},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_makefile_template_records_tasks_and_failures(project: Project) -> None:
    make_project(project)
    built = make(project)
    assert built.returncode == 0, built.stdout + built.stderr
    assert "streamed: predictions written" in built.stdout  # the recipe's output passes through
    (pipeline_id,) = pipeline_ids(project)
    tasks = task_rows(project, pipeline_id)
    assert {k: v[0] for k, v in tasks.items()} == {"prep": "executed", "train": "executed", "infer": "executed"}
    assert tasks["train"][1] == "missing target: model.pkl"
    targets = rows(project, "SELECT task, path, sha256 FROM files WHERE role = 'target' ORDER BY task")
    assert targets == [
        ("infer", "predictions.csv", sha256(project.root / "predictions.csv")),
        ("prep", "data/clean.csv", sha256(project.root / "data" / "clean.csv")),
        ("train", "model.pkl", sha256(project.root / "model.pkl")),
    ]
    assert rows(project, "SELECT task, pipeline_id FROM runs ORDER BY tstamp") == [
        ("prep", pipeline_id), ("train", pipeline_id), ("infer", pipeline_id)
    ]
    tool, status, dag = rows(project, "SELECT tool, status, dag FROM pipelines")[0]
    assert (tool, status) == ("make", "ok")
    assert sorted(t["name"] for t in json.loads(dag)["tasks"]) == ["infer", "prep", "train"]
    assert "task 'train'" in project.cli("lineage", "predictions.csv").stdout

    # Only train.py changes: make reruns train (newer prerequisite) and infer, in a new pipeline.
    project.write("train.py", TRAIN.replace("version=1", "version=2"))
    rebuilt = make(project)
    assert rebuilt.returncode == 0, rebuilt.stderr
    second = [p for p in pipeline_ids(project) if p != pipeline_id]
    assert len(second) == 1
    again = task_rows(project, second[0])
    assert sorted(again) == ["infer", "train"]
    assert again["train"][1] == "newer prerequisites: train.py"

    # A failing recipe fails make and is recorded failed with its message.
    project.write("infer.py", "import flordb_build as flor\nflor.log('started', 1)\nraise ValueError('inference exploded')\n")
    failed = make(project, "infer")
    assert failed.returncode != 0
    assert "inference exploded" in failed.stderr  # streamed through
    last = pipeline_ids(project)[-1]
    status, reason, error, _ = task_rows(project, last)["infer"]
    assert status == "failed"
    assert "exited with status 1" in error and "ValueError: inference exploded" in error
    assert rows(project, "SELECT status FROM pipelines WHERE pipeline_id = ?", (last,)) == [("failed",)]
    assert rows(project, "SELECT status FROM runs WHERE task = 'infer' ORDER BY tstamp DESC LIMIT 1") == [("failed",)]


def test_exec_passes_exit_status_and_output_through(project: Project) -> None:
    code = "import sys; print('to stdout'); print('to stderr', file=sys.stderr); sys.exit(7)"
    done = project.cli("exec", "--task", "seven", "--", PY, "-c", code, check=False)
    assert done.returncode == 7
    assert done.stdout == "to stdout\n" and "to stderr" in done.stderr
    missing = project.cli("exec", "--task", "nothing", "--", "no-such-command-xyz", check=False)
    assert missing.returncode == 127
    assert "no-such-command-xyz" in missing.stderr
    got = rows(project, "SELECT task, status, error FROM tasks ORDER BY started")
    assert [(t, s) for t, s, _ in got] == [("seven", "failed"), ("nothing", "failed")]
    assert "to stderr" in got[0][2]
    usage = project.cli("exec", "--task", "empty", check=False)
    assert usage.returncode == 1 and "No command given for task 'empty'" in usage.stderr


# -- init ------------------------------------------------------------------------------------


def test_init_edits_pyproject_keeping_its_content(tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    original = '# my project\n[project]\nname = "demo"  # keep me\n\n[tool.doit]\nverbosity = 2\n'
    pyproject.write_text(original)
    steps = init_project(tmp_path)
    assert [(s.path, s.action) for s in steps] == [(pyproject, "updated")]
    text = pyproject.read_text()
    assert text.startswith(original)
    import tomllib

    data = tomllib.loads(text)
    assert data["tool"]["doit"]["plugins"]["command"]["run"] == "flordb_build.dag:RecordingRun"
    assert data["tool"]["doit"]["verbosity"] == 2
    assert [s.action for s in init_project(tmp_path)] == ["unchanged"]
    assert pyproject.read_text() == text


def test_init_inserts_into_an_existing_command_table_and_refuses_conflicts(tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[tool.doit.plugins.command]\nmine = "pkg:Cmd"\n\n[tool.other]\nx = 1\n')
    init_project(tmp_path, doit_config="pyproject.toml")
    import tomllib

    data = tomllib.loads(pyproject.read_text())
    assert data["tool"]["doit"]["plugins"]["command"] == {
        "mine": "pkg:Cmd", "run": "flordb_build.dag:RecordingRun", "replay": "flordb_build.hindsight:ReplayCommand"
    }
    assert data["tool"]["other"] == {"x": 1}

    pyproject.write_text('[tool.doit.plugins.command]\nrun = "someone.else:Run"\n')
    with pytest.raises(InitError, match="someone.else:Run"):
        init_project(tmp_path)
    pyproject.write_text("[tool.doit]\nplugins = {reporter = {x = 'a:b'}}\n")
    with pytest.raises(InitError, match="add it by hand"):
        init_project(tmp_path)
    assert pyproject.read_text() == "[tool.doit]\nplugins = {reporter = {x = 'a:b'}}\n"  # untouched on failure


def test_init_writes_doit_cfg_and_make_only_what_was_asked(tmp_path: Path) -> None:
    cfg = tmp_path / "doit.cfg"
    cfg.write_text("[GLOBAL]\nverbosity = 2\n")
    init_project(tmp_path)
    import configparser

    parser = configparser.ConfigParser()
    parser.read(cfg)
    assert parser["COMMAND"]["run"] == "flordb_build.dag:RecordingRun"
    assert parser["GLOBAL"]["verbosity"] == "2"

    make_only = tmp_path / "make_only"
    make_only.mkdir()
    steps = init_project(make_only, make=True)
    assert [p.name for p in make_only.iterdir()] == ["Makefile"]
    assert [s.action for s in steps] == ["copied"]
    assert "flordb-build exec" in (make_only / "Makefile").read_text()
    with pytest.raises(InitError, match="already exists"):
        init_project(make_only, make=True)
    # One source, the top-level templates/Makefile, shipped as the package data of flordb_build.templates.
    import tomllib

    import flordb_build
    from flordb_build.dag._init import template_makefile

    checkout = Path(flordb_build.__file__).resolve().parents[1]
    assert template_makefile() == checkout / "templates" / "Makefile"
    assert not (checkout / "flordb_build" / "templates").exists()
    setuptools = tomllib.loads((checkout / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"]["flordb_build.templates"] == "templates"
    assert setuptools["package-data"]["flordb_build.templates"] == ["Makefile"]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_init_make_writes_a_makefile_that_runs_as_written(project: Project) -> None:
    """`flordb-build init --make` in a fresh repository, then `make`: it runs, and records nothing."""
    assert project.cli("init", "--make").returncode == 0
    made = make(project)
    assert made.returncode == 0, made.stdout + made.stderr
    assert not (project.root / ".flor" / "flor.db").exists()
    # Its example pipeline, switched on, is what test_makefile_template_records_tasks_and_failures runs.


REPLAYED = """\
import flordb_build as flor
state = {"w": 0}
with flor.checkpointing(state=state):
    for epoch in flor.loop("epoch", range(2)):
        state["w"] += 1
        flor.log("w", state["w"])
"""


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_make_replay_target_runs_a_replay(project: Project) -> None:
    """`make replay NAMES=... REPLAY_ARGS=...`: the Make side of `doit replay`, in a real project."""
    import flordb_build as flor

    assert project.cli("init", "--make").returncode == 0
    project.write("train.py", REPLAYED)
    project.commit_all("train")
    project.run("train.py")
    project.write("train.py", REPLAYED + "        flor.log(\"w2\", state[\"w\"] * 2)\n")
    project.commit_all("log w2")

    planned = make(project, "replay", "NAMES=w2", "REPLAY_ARGS=--dry-run")
    assert planned.returncode == 0, planned.stdout + planned.stderr
    assert "replay w2: 1 run(s)" in planned.stdout and "validation" in planned.stdout
    done = make(project, "replay", "NAMES=w2", "REPLAY_ARGS=--yes --cold")
    assert done.returncode == 0, done.stdout + done.stderr
    assert flor.dataframe("w2")["w2"].tolist() == [2, 4]
    unnamed = make(project, "replay")
    assert unnamed.returncode != 0 and 'make replay NAMES="val_loss"' in unnamed.stderr


@pytest.mark.slow
def test_a_wheel_install_finds_the_template(project: Project, tmp_path: Path) -> None:
    """A non-editable install (pip builds the wheel from this checkout): `init --make` copies templates/Makefile."""
    import flordb_build

    checkout = Path(flordb_build.__file__).resolve().parents[1]
    # pip builds in the source folder: a copy of the work tree, so no earlier build/ leaks into the wheel.
    source = tmp_path / "source"
    shutil.copytree(checkout, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".flor", ".*_cache", "bench", "tests", "pipelines"
    ))
    target = tmp_path / "site"
    pip = subprocess.run(
        [PY, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", "--target", str(target),
         str(source)], capture_output=True, text=True, timeout=600,
    )
    assert pip.returncode == 0, pip.stderr
    assert not (target / "templates").exists()  # installed inside the package, not as a top-level folder
    env = {**os.environ, **GIT_ENV, "PYTHONPATH": str(target)}
    where = subprocess.run([PY, "-c", "import flordb_build; print(flordb_build.__file__)"], cwd=project.root,
                           env=env, capture_output=True, text=True, timeout=60)
    assert where.stdout.strip() == str(target / "flordb_build" / "__init__.py"), where.stderr
    init = subprocess.run([PY, "-m", "flordb_build", "init", "--make"], cwd=project.root, env=env,
                          capture_output=True, text=True, timeout=120)
    assert init.returncode == 0, init.stderr
    assert (project.root / "Makefile").read_bytes() == (checkout / "templates" / "Makefile").read_bytes()


# -- recording helpers ------------------------------------------------------------------------


def test_file_hasher_reuses_hashes_of_unchanged_files_but_not_racy_ones(project: Project) -> None:
    from flordb_build.config import load_config
    from flordb_build.dag import BuildRecorder, TaskRecord, TaskStatus
    from flordb_build.store import Store

    data = project.write("big.bin", "A" * 1000)
    old = 1_600_000_000
    os.utime(data, (old, old))
    store = Store.open(load_config())
    recorder = BuildRecorder(store, "p1")
    recorder.start_pipeline("test", ["t"], {"tasks": []})
    fact = recorder.hasher.fact("big.bin", FileRole.DEP)
    assert fact.sha256 == sha256(data) and fact.mtime_ns == old * 10**9
    recorder.record_task(TaskRecord("t", TaskStatus.EXECUTED, 1.0, 2.0), [fact])

    # Same size and mtime, other bytes: a fresh hasher trusts the stored hash and does not read the file.
    data.write_text("B" * 1000)
    os.utime(data, (old, old))
    assert FileHasher(store).fact("big.bin", FileRole.DEP).sha256 == fact.sha256
    # A just-written file is "racy": hashed from its bytes, and stored without its mtime.
    data.write_text("C" * 1000)
    racy = FileHasher(store).fact("big.bin", FileRole.DEP)
    assert racy.sha256 == sha256(data) and racy.mtime_ns is None
    missing = FileHasher(store).fact("nope.txt", FileRole.TARGET)
    assert (missing.sha256, missing.size) == (None, None)
    store.close()


def test_redact_argv_hides_secret_assignments() -> None:
    assert redact_argv(["doit", "API_TOKEN=abc", "lr=0.1", "--db-password=x", "train"]) == [
        "doit", "API_TOKEN=***", "lr=0.1", "--db-password=***", "train"
    ]


# -- signals: exec passes them on, doit and make record what they stopped ---------------------

SERVE = """
    import os, signal, sys

    def stop(signum, frame):
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)  # a second copy (a group kill) changes nothing
        open("got-" + signal.Signals(signum).name, "w").close()
        sys.exit(128 + signum)

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, stop)
    with open("serve.tmp", "w") as handle:
        handle.write(str(os.getpid()))
    os.replace("serve.tmp", "serve.pid")  # serving, with the handlers in place
    while True:
        signal.pause()
    """


def wait_for(condition: Callable[[], bool], what: str, proc: subprocess.Popen[str] | None = None) -> None:
    """Wait (generously) until ``condition()`` holds; fail at once if ``proc`` exits first."""
    deadline = time.monotonic() + 120
    while not condition():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"exited {proc.returncode} before {what}\n{out}\n{err}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def spawn(project: Project, *argv: str) -> subprocess.Popen[str]:
    """Start ``argv`` in the project in a session of its own (its own process group, no terminal)."""
    return subprocess.Popen(
        list(argv), cwd=project.root, env={**os.environ, **GIT_ENV}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )


def stop_session(proc: subprocess.Popen[str]) -> None:
    """If ``proc`` (a session leader) still runs, say what its session is doing, then kill all of it."""
    if proc.poll() is not None:
        return
    listing = subprocess.run(
        ["ps", "-o", "pid,stat,wchan:32,args", "-s", str(proc.pid)], capture_output=True, text=True
    ).stdout
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    raise AssertionError(f"{proc.args} did not exit; its session was:\n{listing}")


def serving_pid(project: Project, proc: subprocess.Popen[str]) -> int:
    pid_file = project.root / "serve.pid"
    wait_for(pid_file.exists, "the recipe's command started", proc)
    return int(pid_file.read_text())


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def this_process_name() -> str:
    """What ``exec`` started directly by this test records as its tool: this process's argv[0]."""
    return os.path.basename(Path("/proc/self/cmdline").read_bytes().split(b"\0")[0].decode())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_exec_passes_the_signal_on_and_records_the_interrupted_task(project: Project, sig: signal.Signals) -> None:
    project.write("serve.py", SERVE)
    proc = spawn(project, PY, "-m", "flordb_build", "exec", "--task", "serve", "--", PY, "serve.py")
    pid = serving_pid(project, proc)
    try:
        proc.send_signal(sig)  # to exec alone, as `kill -TERM <pid>` does
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 128 + sig, err  # the command's status, not exec's death
        assert (project.root / f"got-{sig.name}").exists()  # the command got the signal ...
        assert gone(pid)  # ... and exec waited for it to end
    finally:
        if not gone(pid):
            os.kill(pid, signal.SIGKILL)
        stop_session(proc)
    (task, status, error), = rows(project, "SELECT task, status, error FROM tasks")
    assert (task, status) == ("serve", "interrupted") and f"interrupted by {sig.name}" in error
    assert rows(project, "SELECT tool, status, exit_code FROM pipelines") == [
        (this_process_name(), "interrupted", 128 + sig)
    ]


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils timeout")
def test_exec_under_timeout_is_recorded_as_run_by_timeout(project: Project) -> None:
    project.write("serve.py", SERVE)
    proc = spawn(project, "timeout", "600", PY, "-m", "flordb_build", "exec", "--task", "serve", "--", PY, "serve.py")
    pid = serving_pid(project, proc)
    try:
        proc.send_signal(signal.SIGTERM)  # timeout passes it to exec and to its process group
        proc.communicate(timeout=120)
        assert gone(pid) and (project.root / "got-SIGTERM").exists()
    finally:
        if not gone(pid):
            os.kill(pid, signal.SIGKILL)
        stop_session(proc)
    (tool, argv, status), = rows(project, "SELECT tool, argv, status FROM pipelines")
    assert (tool, status) == ("timeout", "interrupted")
    assert json.loads(argv)[:2] == ["timeout", "600"]  # what really ran exec, not a make that never was
    assert rows(project, "SELECT task, status FROM tasks") == [("serve", "interrupted")]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_ctrl_c_under_make_records_the_interrupted_recipe(project: Project) -> None:
    project.write("serve.py", SERVE)
    project.write(
        "Makefile",
        f"FLOR_EXEC = {PY} -m flordb_build exec\nserved.txt: serve.py\n\t$(FLOR_EXEC) --task serve --deps $^ --targets $@ -- {PY} serve.py\n",
    )
    proc = spawn(project, "make")
    pid = serving_pid(project, proc)
    try:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground group
        proc.communicate(timeout=120)
        assert proc.returncode != 0 and gone(pid) and (project.root / "got-SIGINT").exists()
    finally:
        if not gone(pid):
            os.kill(pid, signal.SIGKILL)
        stop_session(proc)
    (tool, status, exit_code), = rows(project, "SELECT tool, status, exit_code FROM pipelines")
    assert (tool, status, exit_code) == ("make", "interrupted", 128 + signal.SIGINT)
    (status, error), = rows(project, "SELECT status, error FROM tasks WHERE task = 'serve'")
    assert status == "interrupted" and "interrupted by SIGINT" in error


def test_ctrl_c_under_doit_n4_records_every_started_task(project: Project) -> None:
    project.write(
        "dodo.py",
        f"""
        PY = {PY!r}

        def task_slow():
            for i in range(4):
                yield {{"name": str(i), "actions": [PY + " slow.py " + str(i)], "file_dep": ["slow.py"]}}
        """,
    )
    project.write(
        "slow.py",
        """
        import os, sys, time
        open(f"started-{sys.argv[1]}.tmp", "w").close()
        os.replace(f"started-{sys.argv[1]}.tmp", f"started-{sys.argv[1]}")
        time.sleep(600)
        """,
    )
    project.commit_all("slow tasks")
    init_project(project.root)
    proc = spawn(project, PY, "-m", "doit", "-n", "4")
    try:
        wait_for(lambda: len(list(project.root.glob("started-?"))) == 4, "all four tasks started", proc)
        os.killpg(proc.pid, signal.SIGINT)
        proc.communicate(timeout=300)
    finally:
        stop_session(proc)
    assert proc.returncode != 0
    (pipeline_id, status), = rows(project, "SELECT pipeline_id, status FROM pipelines")
    assert status == "interrupted"
    tasks = task_rows(project, pipeline_id)
    assert {name: row[0] for name, row in tasks.items()} == {f"slow:{i}": "interrupted" for i in range(4)}
    assert all("Ctrl-C" in row[1] for row in tasks.values())
    # Their inputs are recorded, their (half-written) targets are not.
    assert rows(project, "SELECT DISTINCT path, role FROM files") == [("slow.py", "dep")]


PARAMS_DODO = """\
import sys

def task_train():
    return {"actions": [[sys.executable, "train.py"]], "file_dep": ["train.py"], "targets": ["model.txt"]}

def task_report():  # no file_dep: runs every time, and gets no params dependency either
    return {"actions": ["echo report"], "verbosity": 0}
"""
PARAMS_TRAIN = """\
import flordb_build as flor
lr = flor.arg("lr", 0.5)
with open("model.txt", "w") as fh:
    fh.write(str(lr))
"""


def test_doit_reruns_a_task_when_a_params_file_value_changes(project: Project) -> None:
    """[tool.flordb_build] params is a file_dep of each task with file_deps: doit sees a changed value."""
    project.write("dodo.py", PARAMS_DODO)
    project.write("train.py", PARAMS_TRAIN)
    project.write("params.yaml", "lr: 0.1\n")
    project.write("pyproject.toml", '[tool.flordb_build]\nparams = "params.yaml"\n')
    project.commit_all("pipeline")
    init_project(project.root)
    assert doit(project).returncode == 0
    assert (project.root / "model.txt").read_text() == "0.1"
    assert doit(project).returncode == 0
    project.write("params.yaml", "lr: 0.3\n")
    assert doit(project).returncode == 0
    assert (project.root / "model.txt").read_text() == "0.3"
    first, second, third = pipeline_ids(project)
    assert task_rows(project, first)["train"][0] == "executed"
    assert task_rows(project, second)["train"][0] == "up-to-date"
    assert task_rows(project, third)["train"][:2] == ("executed", "changed file_dep: params.yaml")
    assert task_rows(project, third)["report"][1] == "always runs: no file_dep and no uptodate"
    deps = rows(project, "SELECT path FROM files WHERE pipeline_id = ? AND task = 'train' AND role = 'dep'", (third,))
    assert sorted(p for (p,) in deps) == ["params.yaml", "train.py"]
