"""Pipeline DAGs and lineage as pictures: ``flordb-build dag`` and ``lineage --format mermaid|dot``
over real doit invocations, and the layered layout on small graphs."""

from __future__ import annotations

import json
import re

from flordb_build.graph import Edge, Graph, Node, NodeKind, layers, layout, pipeline_graph, to_svg
from tests.conftest import Project
from tests.ui_project import record_pipelines


def test_dag_formats_show_every_task_with_its_status(project: Project) -> None:
    first, second = record_pipelines(project, direct_runs=False)
    text = project.cli("dag").stdout  # the latest pipeline
    assert text.splitlines()[0].startswith(f"pipeline {second} (doit, failed)")
    lines = text.splitlines()[1:]
    assert re.match(r"0  prep  \[up-to-date · [\d.]+ s\]$", lines[0])
    assert re.match(r"1  train  \[up-to-date · [\d.]+ s\]  <- prep \(clean.txt\)$", lines[1])
    assert re.match(r"2  report  \[executed · [\d.]+ s\]  <- train \(model.txt\)$", lines[2])
    assert lines[3] == "     why it ran: changed file_dep: report.py"
    assert re.match(r"3  audit  \[failed · [\d.]+ s\]  <- report \(report.txt\)$", lines[4])

    mermaid = project.cli("dag", "--pipeline", first[:6], "--format", "mermaid").stdout.splitlines()
    assert mermaid[0] == "flowchart LR"
    assert sum(line.strip().endswith(":::executed") for line in mermaid) == 4
    assert "    n0 -->|clean.txt| n1" in mermaid and "    n2 -->|report.txt| n3" in mermaid
    assert any(line.startswith("    classDef executed fill:#c8e6c9") for line in mermaid)

    dot = project.cli("dag", "--pipeline", second, "--format", "dot").stdout
    assert dot.startswith('digraph "pipeline" {') and dot.rstrip().endswith("}")
    for task, colour in (("prep", "#cfd8dc"), ("report", "#c8e6c9"), ("audit", "#ffcdd2")):
        assert f'"task:{task}" [label="{task}\\n' in dot and f'fillcolor="{colour}"' in dot
    assert '"task:train" -> "task:report" [label="model.txt"];' in dot

    bad = project.cli("dag", "--pipeline", "zzz", check=False)
    assert bad.returncode == 1 and "No pipeline 'zzz'" in bad.stderr


def test_lineage_as_a_graph(project: Project) -> None:
    record_pipelines(project, direct_runs=False)
    mermaid = project.cli("lineage", "model.txt", "--format", "mermaid").stdout
    assert mermaid.startswith("flowchart LR")
    assert re.search(r'n\d+\(\["model.txt<br/>[0-9a-f]{12}"\]\):::file', mermaid)
    assert re.search(r'n\d+\["train<br/>executed · doit [0-9a-f]{8}"\]:::executed', mermaid)
    dot = project.cli("lineage", "model.txt", "--format", "dot").stdout
    assert dot.startswith('digraph "lineage"') and "shape=note" in dot and '"task:' in dot
    tree = json.loads(project.cli("lineage", "model.txt", "--format", "json").stdout)
    assert tree["path"] == "model.txt" and tree["producer"]["task"]["task"] == "train"


def test_layers_order_nodes_by_their_neighbours() -> None:
    #   a ──> c ──> e        b's child d sits beside its parent's row, c beside a's:
    #   b ──> d ──┘          the sweeps keep the edges from crossing
    nodes = tuple(Node(n, n, NodeKind.TASK, "executed") for n in ("b", "a", "c", "d", "e"))
    graph = Graph(nodes, (Edge("a", "c"), Edge("b", "d"), Edge("c", "e"), Edge("d", "e")))
    assert layers(graph) == [["b", "a"], ["d", "c"], ["e"]]
    placed = layout(graph)
    assert placed.positions["a"][0] == placed.positions["b"][0] < placed.positions["c"][0] < placed.positions["e"][0]
    svg = to_svg(graph, {"a": "/runs?task=a"})
    assert svg.count('<g class="node task"') == 5 and svg.count('class="edge"') == 4
    assert '<a href="/runs?task=a">' in svg


def test_pipeline_graph_marks_tasks_that_did_not_run() -> None:
    dag = {"tasks": [{"name": "prep", "targets": ["x"]}, {"name": "train", "file_dep": ["x"], "task_dep": ["prep"]}]}
    graph = pipeline_graph(dag, [{"task": "prep", "status": "failed", "seconds": 0.5, "reason": None, "error": "boom"}])
    assert [(n.label, n.status) for n in graph.nodes] == [("prep", "failed"), ("train", "not run")]
    assert [(e.source, e.target, e.label) for e in graph.edges] == [("task:prep", "task:train", "x")]
    assert "error: boom" in graph.nodes[0].tooltip
