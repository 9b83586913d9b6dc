"""Coming from FlorDB: calls from FlorDB's README, tutorial and document-parser app, import changed only.

Each test quotes the FlorDB usage it ports in its docstring and runs it with ``import flor``
replaced by ``import flordb_build as flor``: real scripts in subprocesses in a temporary git
repository, real replays of their recorded versions.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

import flordb_build as flor
from flordb_build.errors import ExpressionError, IterationArgumentError, QueryError, ReplayError
from flordb_build.hindsight import read_replay_arguments
from tests.conftest import GIT_ENV, Project

# -- flor.utils.latest, flor.HOMEDIR ---------------------------------------------------------


def test_flor_utils_latest_keeps_the_newest_run(project: Project) -> None:
    """FlorDB's document parser, ``inference.py``::

    df = flor.dataframe("out_path")
    df = flor.utils.latest(df[df["filename"] == "frameextraction.py"])
    DOC_DIR = str(df["out_path"].values[0])
    """
    project.write("frameextraction.py", 'import flordb_build as flor\nflor.log("out_path", flor.arg("out", "a"))\n')
    project.write("other.py", 'import flordb_build as flor\nflor.log("out_path", "other")\n')
    project.commit_all("scripts")
    project.run("frameextraction.py", "--kwargs", "out=frames/first")
    project.run("frameextraction.py", "--kwargs", "out=frames/second")
    project.run("other.py")

    df = flor.dataframe("out_path")
    df = flor.utils.latest(df[df["filename"] == "frameextraction.py"])
    assert str(df["out_path"].values[0]) == "frames/second" and len(df) == 1
    assert flor.utils.latest is flor.latest
    assert list(vars(flor.utils)) == ["latest"]  # a namespace that re-exports latest, nothing else


def test_flor_homedir_is_the_projects_flor_directory(project: Project) -> None:
    """FlorDB's model-registry scripts place and find exported checkpoints under ``flor.HOMEDIR``::

    best_ckpt_path = os.path.join(flor.HOMEDIR, "obj_store", best_ckpt["projid"], ...)
    shutil.copy(best_ckpt_path, ...)
    """
    project.write(
        "export.py",
        """\
        import os
        import flordb_build as flor

        target = os.path.join(flor.HOMEDIR, "model_epochs_5.pth")
        with open(target, "w") as fh:
            fh.write("weights")
        print(flor.HOMEDIR)
        """,
    )
    project.commit_all("export")
    assert not (project.root / ".flor").exists()
    out = project.run("export.py").stdout
    assert Path(out.strip()) == project.root / ".flor"
    assert (project.root / ".flor" / "model_epochs_5.pth").read_text() == "weights"
    assert project.git("status", "--porcelain") == ""  # .flor stays git-ignored
    assert isinstance(flor.HOMEDIR, Path) and flor.HOMEDIR == project.root / ".flor"


# -- flor.iteration(name, idx=None, value=...) -------------------------------------------------


def test_iteration_takes_flordbs_idx_keyword(project: Project) -> None:
    """FlorDB's document parser, ``app.py`` (``flor.iteration(name, idx, value)``)::

    with flor.iteration("document", idx=None, value=pdf_name):
        for i in flor.loop("page", range(len(colors))):
            flor.log(config.page_color, colors[i])
    flor.commit()
    """
    project.write(
        "app.py",
        """\
        import flordb_build as flor

        for pdf_name, colors in (("a.pdf", [0, 1]), ("b.pdf", [1])):
            with flor.iteration("document", idx=None, value=pdf_name):
                for i in flor.loop("page", range(len(colors))):
                    flor.log("page_color", colors[i])
        with flor.iteration("document", idx=7, value="c.pdf") as index:
            flor.log("index", index)
        flor.commit()
        """,
    )
    project.commit_all("app")
    project.run("app.py")
    df = flor.dataframe("page_color")
    assert df["document"].tolist() == [0, 0, 1] and df["document_value"].tolist() == ["a.pdf", "a.pdf", "b.pdf"]
    assert df["page_color"].tolist() == [0, 1, 1]
    assert flor.dataframe("index")[["document", "index"]].values.tolist() == [[7, 7]]
    with pytest.raises(IterationArgumentError, match="both index=1 and idx=2") as caught:
        flor.iteration("document", 1, idx=2)
    assert isinstance(caught.value, TypeError)  # what Python raises for an argument given twice


# -- flor.query over FlorDB's column names -------------------------------------------------------


def test_query_reads_flordbs_column_names_beside_ours(project: Project) -> None:
    """FlorDB's tutorial::

    flor.query("SELECT value_name, value FROM logs")
    """
    project.write(
        "train.py",
        """\
        import flordb_build as flor

        lr = flor.arg("lr", 0.1)
        for epoch in flor.loop("epoch", range(2)):
            flor.log("loss", lr / (epoch + 1))
        """,
    )
    project.commit_all("train")
    project.run("train.py")

    df = flor.query("SELECT value_name, value FROM logs")
    assert sorted(map(tuple, df.values.tolist())) == [("loss", 0.05), ("loss", 0.1), ("lr", 0.1)]
    ours = flor.query("SELECT name, value, kind, source FROM logs WHERE name = ? ORDER BY seq", ("loss",))
    assert ours.values.tolist() == [["loss", 0.1, 0, "record"], ["loss", 0.05, 0, "record"]]
    # Our own columns joined with runs stay unambiguous: logs gains no column that runs has.
    joined = flor.query("SELECT filename, name, tstamp FROM logs JOIN runs USING (run_id) WHERE name = 'lr'")
    assert joined[["filename", "name"]].values.tolist() == [["train.py", "lr"]]
    shaped = flor.query("SELECT * FROM flordb_logs ORDER BY ctx_id IS NOT NULL, value_name")
    assert list(shaped.columns) == [
        "projid", "tstamp", "filename", "ctx_id", "value_name", "value", "value_type", "run_id"
    ]
    assert shaped["projid"].tolist() == ["proj"] * 3 and shaped["filename"].tolist() == ["train.py"] * 3
    assert shaped["ctx_id"].isna().tolist() == [True, False, False]  # run level: NULL, as in FlorDB
    assert shaped["value_name"].tolist() == ["lr", "loss", "loss"]
    for write in ("DELETE FROM logs", "UPDATE flordb_logs SET value = 1"):
        with pytest.raises(QueryError, match="read-only"):
            flor.query(write)
    # The views live on the query's connection only: the store's schema is unchanged.
    conn = sqlite3.connect(project.root / ".flor" / "flor.db")
    views = conn.execute("SELECT name FROM sqlite_master WHERE type = 'view'").fetchall()
    conn.close()
    assert views == [("files",)]  # the store's own view since schema 6 (filesets.py); the query adds none


LABELS = 'import flordb_build as flor\nflor.log("label", 1)\n'
ASOF_TRAIN = """\
import flordb_build as flor

seen = len(flor.query("SELECT value FROM logs WHERE value_name = 'label'"))
shaped = len(flor.query("SELECT value FROM flordb_logs WHERE value_name = 'label'"))
state = {"w": 0}
with flor.checkpointing(state=state):
    for epoch in flor.loop("epoch", range(2)):
        state["w"] += seen
        flor.log("val", state["w"])
flor.log("seen", seen)
"""


def test_flordb_columns_in_a_replay_read_the_store_as_the_run_did(project: Project) -> None:
    """FlorDB's ``flor.query("SELECT value_name, value FROM logs")`` inside a replayed script.

    Replay mode (asof.py) shadows ``logs`` with the rows the recorded run could see; the
    FlorDB-shaped ``logs`` and ``flordb_logs`` must read those rows, not today's store.
    """
    project.write("labels.py", LABELS)
    project.write("train.py", ASOF_TRAIN)
    project.commit_all("pipeline")
    for script in ("labels.py", "train.py", "labels.py", "train.py"):
        project.run(script)
    project.write("train.py", ASOF_TRAIN + 'flor.log("seen_now", seen)\nflor.log("shaped_now", shaped)\n')
    project.commit_all("today")

    report = flor.replay("seen_now", "shaped_now", where="filename = 'train.py'", quiet=True)
    assert report.ok and report.mismatches == ()
    df = flor.dataframe("seen", "seen_now", "shaped_now")
    assert df["seen"].tolist() == [1, 2]
    assert df["seen_now"].tolist() == [1, 2] and df["shaped_now"].tolist() == [1, 2]
    assert len(flor.query("SELECT value FROM logs WHERE value_name = 'label'")) == 2


# -- replay: FlorDB's command line and Python forms ----------------------------------------------

TRAIN = """\
import time
import flordb_build as flor

epochs = flor.arg("epochs", 2)
state = {"w": 0.0}
with flor.checkpointing(state=state):
    for epoch in flor.loop("epoch", range(epochs)):
        for step in flor.loop("step", range(3)):
            state["w"] += 0.5
            time.sleep(0.02)  # epochs slow enough that every one is checkpointed
            flor.log("loss", state["w"])
        flor.log("acc", state["w"] * 2)
"""
# Today's version adds hindsight statements at the start of each epoch, as FlorDB's tutorial does.
TODAY = TRAIN.replace(
    '        for step in flor.loop("step", range(3)):\n',
    '        flor.log("gradient_norm", state["w"] / 10)\n'
    '        flor.log("weight", state["w"])\n'
    '        for step in flor.loop("step", range(3)):\n',
)


# The tests below record two runs and replay them (~20 s each on a loaded 2-core machine): marked slow.
@pytest.fixture
def tutorial(project: Project) -> Project:
    """FlorDB's tutorial: ``python train.py``, then ``python train.py --kwargs epochs=3 ...``; then the new log."""
    project.write("train.py", TRAIN)
    project.commit_all("train")
    project.run("train.py")
    project.run("train.py", "--kwargs", "epochs=3")
    project.write("train.py", TODAY)
    project.commit_all("hindsight logging: gradient norm")
    return project


def replay_cli(project: Project, *args: str, stdin: str = "", module: str = "flordb_build") -> subprocess.CompletedProcess[str]:
    """``python -m MODULE replay ARGS`` with ``stdin`` piped in (not a terminal)."""
    return subprocess.run(
        [sys.executable, "-m", module, "replay", *args],
        cwd=project.root, env={**os.environ, **GIT_ENV}, input=stdin, capture_output=True, text=True, timeout=300,
    )


def replayed(name: str) -> dict[int, list[float]]:
    """``{epochs arg: the values of name}`` per recorded run, from the dataframe."""
    df = flor.dataframe("epochs", name)
    return {int(e): df[(df["epochs"] == e) & df[name].notna()][name].tolist() for e in sorted(set(df["epochs"]))}


@pytest.mark.slow
def test_replay_takes_an_answer_piped_to_stdin(tutorial: Project) -> None:
    """FlorDB's tutorial answers the replay's ``input()`` question::

    python -m flor replay gradient_norm
    ...
    Continue replay estimated to finish in under 2 minutes [y/N]? y
    """
    refused = replay_cli(tutorial, "gradient_norm", stdin="")  # stdin ends: no answer
    assert refused.returncode == 1 and "--yes" in refused.stderr and "stdin ended" in refused.stderr
    declined = replay_cli(tutorial, "gradient_norm", stdin="n\n")
    assert declined.returncode == 0 and "not replayed" in declined.stdout
    assert replayed("gradient_norm") == {2: [], 3: []}

    done = replay_cli(tutorial, "gradient_norm", stdin="y\n")
    assert done.returncode == 0, done.stderr
    assert "[y/N]" in done.stdout and "not replayed" not in done.stdout
    assert replayed("gradient_norm") == {2: [0.0, 0.15], 3: [0.0, 0.15, 0.3]}


@pytest.mark.slow
def test_replay_takes_comma_separated_names(tutorial: Project) -> None:
    """FlorDB's tutorial: "the name of the (comma-separated) variable(s) we want to hindsight log"::

    python -m flor replay gradient_norm,weight
    """
    done = replay_cli(tutorial, "gradient_norm,weight", "--yes")
    assert done.returncode == 0, done.stderr
    assert replayed("gradient_norm") == {2: [0.0, 0.15], 3: [0.0, 0.15, 0.3]}
    assert replayed("weight") == {2: [0.0, 1.5], 3: [0.0, 1.5, 3.0]}


@pytest.mark.slow
def test_replay_takes_flordbs_positional_where_clause(tutorial: Project) -> None:
    """FlorDB's command line, ``replay apply_vars [where_clause]``::

    python -m flor replay gradient_norm "epochs = 2"
    """
    plan = replay_cli(tutorial, "gradient_norm", "epochs = 2", "--dry-run")
    assert plan.returncode == 0, plan.stderr
    # One run selected (the plan's first line), its placement listed once.
    assert "does not log" not in plan.stderr and "replay gradient_norm: 1 run(s)" in plan.stdout
    assert plan.stdout.count("(validation)") == 1
    done = replay_cli(tutorial, "gradient_norm", "epochs = 2", stdin="y\n")
    assert done.returncode == 0, done.stderr
    assert replayed("gradient_norm") == {2: [0.0, 0.15], 3: []}
    both = replay_cli(tutorial, "gradient_norm", "epochs = 2", "--where", "epochs = 3", "--yes")
    assert both.returncode == 1 and "Two where clauses" in both.stderr


@pytest.mark.slow
def test_doit_replay_takes_flordbs_forms(tutorial: Project) -> None:
    """The same FlorDB command line through ``doit replay``: ``replay gradient_norm,weight "epochs = 3"``.

    doit takes arguments with ``=`` as its own ``name=value`` variables; a where clause is one.
    """
    tutorial.cli("init", "--doit-config", "pyproject.toml")
    tutorial.commit_all("configure doit")
    plan = replay_cli(tutorial, "gradient_norm", "--where", "epochs = 2", "--dry-run", module="doit")
    assert plan.returncode == 0, plan.stderr
    assert "replay gradient_norm: 1 run(s)" in plan.stdout and plan.stdout.count("(validation)") == 1
    done = replay_cli(tutorial, "gradient_norm,weight", "epochs = 3", stdin="y\n", module="doit")
    assert done.returncode == 0, done.stderr
    assert replayed("gradient_norm") == {2: [], 3: [0.0, 0.15, 0.3]}
    assert replayed("weight") == {2: [], 3: [0.0, 1.5, 3.0]}


@pytest.mark.slow
def test_flor_replay_takes_flordbs_apply_vars_list(tutorial: Project) -> None:
    """FlorDB's Python API, ``replay(apply_vars: List[str], where_clause: Optional[str] = None)``::

    flor.replay(["gradient_norm"])
    flor.replay(["gradient_norm", "weight"], "epochs = 3")
    """
    report = flor.replay(["gradient_norm"], quiet=True)
    assert report.ok and len(report.outcomes) == 2
    assert replayed("gradient_norm") == {2: [0.0, 0.15], 3: [0.0, 0.15, 0.3]}
    report = flor.replay(["gradient_norm", "weight"], "epochs = 3", quiet=True)
    assert report.ok and len(report.outcomes) == 1
    assert replayed("weight") == {2: [], 3: [0.0, 1.5, 3.0]}
    # Our own form keeps working beside it.
    assert flor.replay("weight", where="epochs = 2", dry_run=True, quiet=True).plan.runs[0].args == {"epochs": 2}
    with pytest.raises(ReplayError, match="Two where clauses"):
        flor.replay(["weight"], "epochs = 2", where="epochs = 3", quiet=True)
    with pytest.raises(ReplayError, match="non-empty strings"):
        flor.replay([3], quiet=True)


@pytest.mark.parametrize(
    ("arguments", "where", "names", "expected_where"),
    [
        (["a"], None, ("a",), None),
        (["a", "b"], None, ("a", "b"), None),
        (["a,b"], None, ("a", "b"), None),
        (["a, b,", "c", "a"], None, ("a", "b", "c"), None),
        (["a", "epochs = 2"], None, ("a",), "epochs = 2"),
        (["a,b", "epochs=2"], None, ("a", "b"), "epochs=2"),
        (["a", "epoch IN (1, 2)"], None, ("a",), "epoch IN (1, 2)"),  # its commas are not name separators
        (["a", "lr IS NULL"], None, ("a",), "lr IS NULL"),
        (["a", "b"], "epochs = 2", ("a", "b"), "epochs = 2"),
        (["epochs=2"], None, ("epochs=2",), None),  # no name before it: a name (that nothing logs)
    ],
)
def test_replay_arguments_in_our_form_and_flordbs(
    arguments: list[str], where: str | None, names: tuple[str, ...], expected_where: str | None
) -> None:
    """How ``replay`` arguments read: comma-separated names, FlorDB's trailing where clause."""
    parsed = read_replay_arguments(arguments, where)
    assert parsed.names == names and parsed.where == expected_where


def test_replay_arguments_that_cannot_be_read_are_refused() -> None:
    """A positional where clause beside ``--where``, one that is not an expression, or no name at all."""
    with pytest.raises(ReplayError, match="Two where clauses"):
        read_replay_arguments(["a", "epochs = 2"], "epochs = 3")
    with pytest.raises(ExpressionError):
        read_replay_arguments(["a", "1=1; DROP TABLE runs"], None)
    with pytest.raises(ReplayError, match="No name to replay"):
        read_replay_arguments([",", " "], None)
