"""Coming from FlorDB: calls from FlorDB's README, tutorial and document-parser app, import changed only.

Each test quotes the FlorDB usage it ports in its docstring and runs it with ``import flor``
replaced by ``import flordb_build as flor``: real scripts in subprocesses in a temporary git
repository, real replays of their recorded versions.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

import flordb_build as flor
from flordb_build.errors import IterationArgumentError
from tests.conftest import Project

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
    # The views live on the query's connection only: the store's schema is unchanged.
    conn = sqlite3.connect(project.root / ".flor" / "flor.db")
    views = conn.execute("SELECT name FROM sqlite_master WHERE type = 'view'").fetchall()
    conn.close()
    assert views == []


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
