"""Lineage by content hash through recorded tasks, and ``diff`` between two runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flordb_build.errors import DiffError, LineageError
from flordb_build.lineage import render_lineage, trace_lineage
from flordb_build.rundiff import diff_runs
from tests.conftest import GIT_ENV, Project

PY = sys.executable


def exec_task(project: Project, task: str, deps: list[str], targets: list[str], code: str, pipeline: str) -> None:
    """One recorded step, as a Make recipe would run it (all steps share one pipeline id)."""
    done = subprocess.run(
        [PY, "-m", "flordb_build", "exec", "--task", task, "--deps", *deps, "--targets", *targets, "--", PY, "-c", code],
        cwd=project.root,
        env={**os.environ, **GIT_ENV, "FLOR_MAKE_PIPELINE_ID": pipeline},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


@pytest.fixture
def chain(project: Project) -> Project:
    """raw.csv -[prep]-> clean.csv -[train]-> model.bin -[infer]-> pred.csv, plus a second consumer."""
    project.write("raw.csv", "1\n2\n3\n")
    project.commit_all("data")
    exec_task(project, "prep", ["raw.csv"], ["clean.csv"], "open('clean.csv','w').write(open('raw.csv').read()*2)", "pipe1")
    exec_task(
        project,
        "train",
        ["clean.csv"],
        ["model.bin"],
        "import flordb_build as flor; flor.log('acc', 0.9); open('model.bin','wb').write(b'M'*10)",
        "pipe1",
    )
    exec_task(project, "infer", ["model.bin", "clean.csv"], ["pred.csv"], "open('pred.csv','w').write('p')", "pipe1")
    exec_task(project, "report", ["pred.csv"], ["report.txt"], "open('report.txt','w').write('r')", "pipe2")
    return project


def test_lineage_upstream_names_producers_inputs_and_runs(chain: Project) -> None:
    node = trace_lineage("pred.csv")
    assert node.path == "pred.csv" and node.producer is not None
    infer = node.producer
    # No make ran these recipes: the tool is what did (this test's process), not 'make'.
    runner = os.path.basename(Path("/proc/self/cmdline").read_bytes().split(b"\0")[0].decode())
    assert (infer.task.task, infer.task.pipeline_id, infer.task.tool) == ("infer", "pipe1", runner)
    assert [i.path for i in infer.inputs] == ["clean.csv", "model.bin"]
    model = infer.inputs[1]
    assert model.producer is not None and model.producer.task.task == "train"
    assert [r.filename for r in model.producer.task.runs] == ["-c"]  # the run the recipe started
    clean_via_model = model.producer.inputs[0]
    assert clean_via_model.path == "clean.csv" and clean_via_model.repeated  # expanded once, under infer
    clean = infer.inputs[0]
    assert clean.producer is not None and clean.producer.task.task == "prep"
    assert [i.path for i in clean.producer.inputs] == ["raw.csv"]
    assert clean.producer.inputs[0].producer is None  # a source file
    assert [c.task.task for c in node.consumers] == ["report"]
    text = render_lineage(node)
    assert "task 'infer'" in text and "task 'train'" in text and "model.bin" in text and "task 'prep'" in text


def test_lineage_downstream_follows_consumers(chain: Project) -> None:
    node = trace_lineage("clean.csv")
    assert node.producer is not None and node.producer.task.task == "prep"
    consumers = {c.task.task: c for c in node.consumers}
    assert sorted(consumers) == ["infer", "train"]
    model = consumers["train"].outputs[0]
    assert model.path == "model.bin"
    assert [c.task.task for c in model.consumers] == ["infer"]
    pred = model.consumers[0].outputs[0]
    assert [c.task.task for c in pred.consumers] == ["report"]


def test_lineage_of_changed_or_unknown_content(chain: Project) -> None:
    (chain.root / "pred.csv").write_text("edited by hand")
    node = trace_lineage("pred.csv")
    assert node.producer is None and not node.consumers
    assert node.note is not None and "never recorded" in node.note and "task 'report'" in node.note
    with pytest.raises(LineageError, match="No file 'nope.csv'"):
        trace_lineage("nope.csv")
    cli = chain.cli("lineage", "model.bin", "--format", "json")
    data = json.loads(cli.stdout)
    assert data["producer"]["task"]["task"] == "train"
    assert chain.cli("lineage", "nope.csv", check=False).returncode == 1


SCRIPT = """
    import flordb_build as flor
    lr = flor.arg("lr", 0.1)
    flor.log("loss", lr * 2)
    """


def test_diff_reports_args_packages_environment_and_code(project: Project, tmp_path: Path) -> None:
    project.write("train.py", SCRIPT)
    project.commit_all("train")
    project.run("train.py", "--kwargs", "lr=0.5", env={"OMP_NUM_THREADS": "1"})
    project.write("train.py", SCRIPT.replace("lr * 2)", "lr * 3)  # changed"))
    # A real extra distribution on sys.path: run B sees one more package.
    site = tmp_path / "extra_site"
    dist = site / "fakepkg_for_diff-1.2.3.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fakepkg-for-diff\nVersion: 1.2.3\n")
    project.run("train.py", env={"OMP_NUM_THREADS": "2", "PYTHONPATH": str(site)})

    import flordb_build as flor

    run_a, run_b = flor.query("SELECT run_id FROM runs ORDER BY tstamp")["run_id"]
    diff = diff_runs(run_a[:6], run_b)
    assert diff.args == {"lr": (0.5, 0.1)}
    assert diff.packages == {"fakepkg-for-diff": (None, "1.2.3")}
    assert diff.environment["env_vars.OMP_NUM_THREADS"] == ("1", "2")
    assert diff.code_diff is not None
    assert "-flor.log(\"loss\", lr * 2)" in diff.code_diff and "+flor.log(\"loss\", lr * 3)  # changed" in diff.code_diff
    assert ".flor/" not in diff.code_diff  # the run journals are not code

    out = project.cli("diff", run_a, run_b).stdout
    assert "lr: 0.5 -> 0.1" in out
    assert "fakepkg-for-diff: - -> 1.2.3  (added)" in out
    assert "lr * 3" in out

    same = diff_runs(run_a, run_a)
    assert same.identical
    with pytest.raises(DiffError, match="No run 'ffffffff'"):
        diff_runs("ffffffff", run_a)
    with pytest.raises(DiffError, match="not a run id"):
        diff_runs("x'; drop table runs", run_a)


def test_identical_bytes_at_two_paths_are_two_files(project: Project) -> None:
    """model.txt and preds.txt hold the same bytes: each has its own producer, matched by path and hash."""
    exec_task(project, "train", [], ["model.txt"], "open('model.txt','w').write('same bytes')", "pipe1")
    exec_task(
        project, "infer", ["model.txt"], ["preds.txt"], "open('preds.txt','w').write(open('model.txt').read())", "pipe1"
    )
    assert (project.root / "model.txt").read_bytes() == (project.root / "preds.txt").read_bytes()

    model = trace_lineage("model.txt")
    assert model.producer is not None and model.producer.task.task == "train"
    assert [c.task.task for c in model.consumers] == ["infer"]
    preds = trace_lineage("preds.txt")
    assert preds.producer is not None and preds.producer.task.task == "infer"
    assert [i.path for i in preds.producer.inputs] == ["model.txt"]
    assert preds.producer.inputs[0].producer is not None and preds.producer.inputs[0].producer.task.task == "train"
    assert preds.consumers == ()  # infer read model.txt, not preds.txt
    assert "task 'train'" in project.cli("lineage", "model.txt").stdout.split("consumed by")[0]

    # The same bytes copied by hand to a third path: no producer, and a note that says where they came from.
    (project.root / "copy.txt").write_bytes((project.root / "model.txt").read_bytes())
    copy = trace_lineage("copy.txt")
    assert copy.producer is None and copy.consumers == ()
    assert copy.note is not None and "the same bytes were written to 'preds.txt' by task 'infer'" in copy.note
