"""Pipeline DAGs and file lineage as graphs: built from the store, laid out, written as SVG,
mermaid, dot or text. Used by the UI's Pipelines and Lineage pages and by ``flordb-build dag``
and ``flordb-build lineage --format mermaid|dot``.

The layout is a small layered one (no system binary such as graphviz needed), left to right::

    layer 0        layer 1        layer 2
    [prep] ──────> [train] ─────> [infer]       layer = longest path from a source;
          └──────────────────────> [report]     order in a layer: barycenter sweeps
                                                against the neighbouring layers
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .lineage import LineageNode, TaskRef

NODE_WIDTH = 190
NODE_HEIGHT = 46
LAYER_GAP = 80
ROW_GAP = 22
MARGIN = 16
SWEEPS = 4
NOT_RUN = "not run"

#: Fill colour per task status (and for file nodes).
COLOURS = {
    "executed": "#c8e6c9",
    "up-to-date": "#cfd8dc",
    "failed": "#ffcdd2",
    "ignored": "#eeeeee",
    NOT_RUN: "#ffffff",
    "file": "#fff8e1",
}


class NodeKind(StrEnum):
    """A graph node is a task of a pipeline or a file content."""

    TASK = "task"
    FILE = "file"


@dataclass(frozen=True)
class Node:
    """One box of a graph."""

    id: str
    label: str
    kind: NodeKind
    status: str | None = None
    detail: str = ""  # second line: "executed · 1.25 s" or a short sha256
    tooltip: str = ""
    data: Mapping[str, str] = field(default_factory=dict)  # data-* attributes in the SVG


@dataclass(frozen=True)
class Edge:
    """An arrow from ``source`` to ``target`` (node ids), optionally labelled."""

    source: str
    target: str
    label: str = ""


@dataclass(frozen=True)
class Graph:
    """Nodes and edges in the order they were found."""

    nodes: tuple[Node, ...]
    edges: tuple[Edge, ...]

    def node(self, node_id: str) -> Node:
        return next(n for n in self.nodes if n.id == node_id)


# -- building ---------------------------------------------------------------------------------


def pipeline_graph(dag: Mapping[str, Any], tasks: Sequence[Mapping[str, Any]]) -> Graph:
    """The task graph of one pipeline: its DAG JSON, each task coloured by its ``tasks`` row.

    An edge joins a task to one that names it in ``task_dep``, or that reads (``file_dep``) a
    file it makes (``targets``); the edge is labelled with those files.
    """
    specs = list(dag.get("tasks") or [])
    rows = {str(t["task"]): t for t in tasks}
    names = [str(s["name"]) for s in specs] + [n for n in rows if n not in {str(s["name"]) for s in specs}]
    by_name = {str(s["name"]): s for s in specs}
    maker: dict[str, str] = {}
    for spec in specs:
        for target in spec.get("targets") or []:
            maker.setdefault(str(target), str(spec["name"]))
    nodes = []
    for name in names:
        row = rows.get(name, {})
        status = str(row.get("status") or NOT_RUN)
        seconds = row.get("seconds")
        detail = status + (f" · {float(seconds):.2f} s" if isinstance(seconds, int | float) else "")
        spec = by_name.get(name, {})
        tips = [f"task {name}: {detail}"]
        if row.get("reason"):
            tips.append(f"why it ran: {row['reason']}")
        if row.get("error"):
            tips.append(f"error: {row['error']}")
        if spec.get("file_dep"):
            tips.append("reads: " + ", ".join(map(str, spec["file_dep"])))
        if spec.get("targets"):
            tips.append("makes: " + ", ".join(map(str, spec["targets"])))
        nodes.append(Node(f"task:{name}", name, NodeKind.TASK, status, detail, "\n".join(tips),
                          data={"task": name, "status": status}))
    edges: dict[tuple[str, str], list[str]] = {}
    for spec in specs:
        name = str(spec["name"])
        for dep in spec.get("task_dep") or []:
            if str(dep) in names and str(dep) != name:
                edges.setdefault((str(dep), name), [])
        for path in spec.get("file_dep") or []:
            source = maker.get(str(path))
            if source is not None and source != name:
                edges.setdefault((source, name), []).append(str(path))
    return Graph(tuple(nodes), tuple(Edge(f"task:{a}", f"task:{b}", ", ".join(files)) for (a, b), files in edges.items()))


def lineage_graph(root: LineageNode) -> Graph:
    """A file's lineage tree as a graph: files and tasks as nodes, reads and writes as edges."""
    nodes: dict[str, Node] = {}
    edges: dict[tuple[str, str], Edge] = {}

    def file_id(node: LineageNode) -> str:
        key = f"file:{node.path}@{node.sha256 or '-'}"
        if key not in nodes:
            short = (node.sha256 or "missing")[:12]
            nodes[key] = Node(key, node.path, NodeKind.FILE, None, short,
                              f"{node.path}\nsha256 {node.sha256 or '-'}" + (f"\n{node.note}" if node.note else ""),
                              data={"path": node.path, "sha256": node.sha256 or ""})
        return key

    def task_id(task: TaskRef) -> str:
        key = f"task:{task.pipeline_id}/{task.task}"
        if key not in nodes:
            runs = ", ".join(r.run_id[:8] for r in task.runs)
            nodes[key] = Node(key, task.task, NodeKind.TASK, task.status,
                              f"{task.status or '?'} · {task.tool or '?'} {task.pipeline_id[:8]}",
                              f"task {task.task} of pipeline {task.pipeline_id}" + (f"\nruns: {runs}" if runs else ""),
                              data={"task": task.task, "status": task.status or "", "pipeline": task.pipeline_id})
        return key

    def add(source: str, target: str) -> None:
        edges.setdefault((source, target), Edge(source, target))

    def up(node: LineageNode) -> None:
        me = file_id(node)
        if node.producer is not None:
            producer = task_id(node.producer.task)
            add(producer, me)
            for child in node.producer.inputs:
                add(file_id(child), producer)
                up(child)

    def down(node: LineageNode) -> None:
        me = file_id(node)
        for consumer in node.consumers:
            task = task_id(consumer.task)
            add(me, task)
            for child in consumer.outputs:
                add(task, file_id(child))
                down(child)

    up(root)
    down(root)
    return Graph(tuple(nodes.values()), tuple(edges.values()))


# -- layout -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where each node's box sits (top-left corner), and the canvas size."""

    positions: Mapping[str, tuple[float, float]]
    width: float
    height: float


def layers(graph: Graph) -> list[list[str]]:
    """Node ids by layer (longest path from a source), each layer ordered by barycenter sweeps."""
    ids = [n.id for n in graph.nodes]
    preds: dict[str, list[str]] = {i: [] for i in ids}
    succs: dict[str, list[str]] = {i: [] for i in ids}
    for edge in graph.edges:
        if edge.source in preds and edge.target in preds:
            preds[edge.target].append(edge.source)
            succs[edge.source].append(edge.target)
    # Longest path from a source, in topological order (Kahn). A cycle, which a valid DAG never
    # has, is cut: its nodes go one layer after their placed predecessors.
    layer: dict[str, int] = {}
    waiting = {i: len(set(preds[i])) for i in ids}
    ready = [i for i in ids if waiting[i] == 0]
    while len(layer) < len(ids):
        if not ready:
            ready = [next(i for i in ids if i not in layer)]
        node = ready.pop(0)
        if node in layer:
            continue
        layer[node] = 1 + max((layer[p] for p in preds[node] if p in layer), default=-1)
        for succ in dict.fromkeys(succs[node]):
            waiting[succ] -= 1
            if waiting[succ] == 0 and succ not in layer:
                ready.append(succ)
    out: list[list[str]] = [[] for _ in range(max(layer.values(), default=-1) + 1)]
    for node in ids:
        out[layer[node]].append(node)
    for sweep in range(SWEEPS):
        downward = sweep % 2 == 0
        order = range(1, len(out)) if downward else range(len(out) - 2, -1, -1)
        for i in order:
            ref = {n: k for k, n in enumerate(out[i - 1] if downward else out[i + 1])}
            near = preds if downward else succs

            def centre(node: str, ref: dict[str, int] = ref, near: dict[str, list[str]] = near) -> float:
                linked = [ref[m] for m in near[node] if m in ref]
                return sum(linked) / len(linked) if linked else float("inf")

            current = {n: k for k, n in enumerate(out[i])}
            out[i].sort(key=lambda n: (centre(n), current[n]))
    return out


def layout(graph: Graph) -> Layout:
    """Boxes left to right by layer, each layer centred vertically."""
    by_layer = layers(graph)
    tallest = max((len(column) for column in by_layer), default=0)
    height = 2 * MARGIN + tallest * NODE_HEIGHT + max(tallest - 1, 0) * ROW_GAP
    positions = {}
    for i, column in enumerate(by_layer):
        used = len(column) * NODE_HEIGHT + max(len(column) - 1, 0) * ROW_GAP
        top = (height - used) / 2
        for k, node in enumerate(column):
            positions[node] = (MARGIN + i * (NODE_WIDTH + LAYER_GAP), top + k * (NODE_HEIGHT + ROW_GAP))
    width = 2 * MARGIN + len(by_layer) * NODE_WIDTH + max(len(by_layer) - 1, 0) * LAYER_GAP
    return Layout(positions, width, height)


# -- writing ----------------------------------------------------------------------------------


def to_svg(graph: Graph, link: Mapping[str, str] | None = None) -> str:
    """The graph as an inline SVG element; ``link`` maps node ids to the pages they open."""
    placed = layout(graph)
    esc = html.escape
    parts = [
        f'<svg class="graph" xmlns="http://www.w3.org/2000/svg" width="{placed.width:.0f}" '
        f'height="{placed.height:.0f}" viewBox="0 0 {placed.width:.0f} {placed.height:.0f}">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
        'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#607d8b"/></marker></defs>',
    ]
    for edge in graph.edges:
        if edge.source not in placed.positions or edge.target not in placed.positions:
            continue
        (x1, y1), (x2, y2) = placed.positions[edge.source], placed.positions[edge.target]
        sx, sy, tx, ty = x1 + NODE_WIDTH, y1 + NODE_HEIGHT / 2, x2, y2 + NODE_HEIGHT / 2
        bend = max((tx - sx) / 2, 30)
        parts.append(
            f'<path class="edge" data-source="{esc(edge.source)}" data-target="{esc(edge.target)}" '
            f'd="M {sx:.1f} {sy:.1f} C {sx + bend:.1f} {sy:.1f}, {tx - bend:.1f} {ty:.1f}, {tx:.1f} {ty:.1f}" '
            f'fill="none" stroke="#607d8b" stroke-width="1.4" marker-end="url(#arrow)">'
            f"<title>{esc(edge.label)}</title></path>"
        )
    for node in graph.nodes:
        x, y = placed.positions[node.id]
        fill = COLOURS["file"] if node.kind is NodeKind.FILE else COLOURS.get(node.status or NOT_RUN, "#ffffff")
        data = "".join(f' data-{esc(k)}="{esc(v)}"' for k, v in node.data.items())
        dash = ' stroke-dasharray="4 3"' if node.status == NOT_RUN else ""
        radius = 14 if node.kind is NodeKind.FILE else 5
        box = (
            f'<g class="node {node.kind.value}" data-kind="{node.kind.value}"{data}>'
            f"<title>{esc(node.tooltip or node.label)}</title>"
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{NODE_WIDTH}" height="{NODE_HEIGHT}" rx="{radius}" '
            f'fill="{fill}" stroke="#455a64"{dash}/>'
            f'<text x="{x + NODE_WIDTH / 2:.1f}" y="{y + 19:.1f}" text-anchor="middle" class="label">'
            f"{esc(_fit(node.label, 26))}</text>"
            f'<text x="{x + NODE_WIDTH / 2:.1f}" y="{y + 36:.1f}" text-anchor="middle" class="detail">'
            f"{esc(_fit(node.detail, 32))}</text></g>"
        )
        href = (link or {}).get(node.id)
        parts.append(f'<a href="{esc(href)}">{box}</a>' if href else box)
    parts.append("</svg>")
    return "".join(parts)


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]


def to_mermaid(graph: Graph) -> str:
    """The graph as a mermaid ``flowchart LR`` (renders on GitHub, in mkdocs, in the mermaid CLI)."""
    ids = {n.id: f"n{i}" for i, n in enumerate(graph.nodes)}
    lines = ["flowchart LR"]
    for node in graph.nodes:
        text = _mermaid_text(node.label + (f"<br/>{node.detail}" if node.detail else ""))
        shape = f'(["{text}"])' if node.kind is NodeKind.FILE else f'["{text}"]'
        style = _class_name(node)
        lines.append(f"    {ids[node.id]}{shape}:::{style}")
    for edge in graph.edges:
        label = f"|{_mermaid_text(edge.label)}|" if edge.label else ""
        lines.append(f"    {ids[edge.source]} -->{label} {ids[edge.target]}")
    for status in sorted({_class_name(n) for n in graph.nodes}):
        colour = COLOURS.get(status.replace("_", "-").replace("not-run", NOT_RUN), "#ffffff")
        lines.append(f"    classDef {status} fill:{colour},stroke:#455a64")
    return "\n".join(lines)


def _class_name(node: Node) -> str:
    if node.kind is NodeKind.FILE:
        return "file"
    return (node.status or NOT_RUN).replace("-", "_").replace(" ", "_")


def _mermaid_text(text: str) -> str:
    return text.replace('"', "#quot;").replace("|", "#124;")


def to_dot(graph: Graph, name: str = "pipeline") -> str:
    """The graph in graphviz's dot language (``dot -Tsvg``)."""
    lines = [f"digraph {json.dumps(name)} {{", "    rankdir=LR;", '    node [shape=box, style="rounded,filled"];']
    for node in graph.nodes:
        colour = COLOURS["file"] if node.kind is NodeKind.FILE else COLOURS.get(node.status or NOT_RUN, "#ffffff")
        label = node.label + (f"\n{node.detail}" if node.detail else "")
        shape = ", shape=note" if node.kind is NodeKind.FILE else ""
        lines.append(f"    {json.dumps(node.id)} [label={json.dumps(label)}, fillcolor={json.dumps(colour)}{shape}];")
    for edge in graph.edges:
        label = f" [label={json.dumps(edge.label)}]" if edge.label else ""
        lines.append(f"    {json.dumps(edge.source)} -> {json.dumps(edge.target)}{label};")
    lines.append("}")
    return "\n".join(lines)


def to_text(graph: Graph) -> str:
    """Tasks in layer order, one line each, with what they wait for."""
    preds: dict[str, list[Edge]] = {}
    for edge in graph.edges:
        preds.setdefault(edge.target, []).append(edge)
    lines = []
    for i, column in enumerate(layers(graph)):
        for node_id in column:
            node = graph.node(node_id)
            after = ", ".join(graph.node(e.source).label + (f" ({e.label})" if e.label else "") for e in preds.get(node_id, []))
            lines.append(f"{i}  {node.label}  [{node.detail}]" + (f"  <- {after}" if after else ""))
            reason = next((t for t in node.tooltip.splitlines() if t.startswith("why it ran: ")), None)
            if reason:
                lines.append(f"     {reason}")
    return "\n".join(lines)
