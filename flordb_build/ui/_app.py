"""The Flask app of ``flordb-build ui``: routes over a read-only store, templates, static files.

Every request opens the store read-only (reader.py; with ``team=True`` the team store over a
read-only PostgreSQL session) and closes it; nothing here writes. Pages read through the store's
:class:`~flordb_build.team.ViewReader` only, so the team store shows the same pages as the local
one. The runs table of a large store is built once per store version (it changes whenever a
writer commits or a clone pushes) and paged on the server, so a page of 50 rows out of
thousands costs a slice.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from ..charts import plotly_js_path
from ..config import Config, load_config
from ..errors import FlorBuildError, ViewError
from ..reader import reading
from ..runlist import RunList, read_run_table, select_runs
from ..table import MISSING, format_cell
from ..team._protocol import SQLiteReader, ViewReader
from ._pages import build_compare_page, build_run_page, read_run_values, resolve_run_id, run_facts

if TYPE_CHECKING:
    from flask import Flask

PAGE_SIZES = (25, 50, 100, 200)
HERE = Path(__file__).resolve().parent


class RunTableCache:
    """The runs table per (store version, where): rebuilt only after a writer committed."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._entries: dict[str | None, tuple[tuple[Any, ...], RunList]] = {}

    def get(self, store: ViewReader, where: str | None) -> RunList:
        version = store.data_version()
        with self._lock:
            hit = self._entries.get(where)
        if hit is not None and hit[0] == version:
            return hit[1]
        table = read_run_table(store, where)
        with self._lock:
            if len(self._entries) > 16:  # a handful of filters in use at once
                self._entries.clear()
            self._entries[where] = (version, table)
        return table

    def clear(self) -> None:
        """Forget every table (the next request rebuilds it, as after a write)."""
        with self._lock:
            self._entries.clear()


def create_app(config: Config | None = None, *, team: bool = False, remote: str | None = None) -> Flask:
    """The UI over ``config``'s store (the current project's by default).

    :param team: show the team store (``remote``, or the only one configured) instead, read-only.
    :raises ViewError: when Flask is not installed.
    """
    try:
        from flask import Flask, jsonify, render_template, request, send_file
    except ImportError as exc:
        raise ViewError("The UI needs Flask; install the UI extra: pip install 'flordb_build[ui]'.") from exc

    config = config or load_config()
    app = Flask(__name__, template_folder=str(HERE / "templates"), static_folder=str(HERE / "static"))
    app.config["FLOR_CONFIG"] = config
    app.config["FLOR_TEAM"] = (team, remote)
    cache = RunTableCache(config)
    app.extensions["flordb_build.run_tables"] = cache
    app.jinja_env.filters["cell"] = format_cell
    app.jinja_env.filters["full"] = lambda v: format_cell(v, full=True)
    app.jinja_env.globals["MISSING"] = MISSING

    @contextmanager
    def store() -> Iterator[ViewReader]:
        if team:
            from ..team import open_team_reader

            with open_team_reader(config, remote) as reader:
                yield reader
            return
        with reading(config, missing=f"No flordb_build store at '{config.db_path}' yet; record a run first.") as st:
            yield SQLiteReader(st.conn, st)

    @app.errorhandler(FlorBuildError)
    def _error(exc: FlorBuildError) -> Any:
        return render_template("error.html", message=str(exc), project=config.root), 400

    @app.get("/static/plotly.min.js")
    def plotly_js() -> Any:
        return send_file(plotly_js_path(), mimetype="text/javascript", max_age=3600)

    @app.get("/")
    @app.get("/runs")
    def runs() -> Any:
        where = request.args.get("where") or None
        per = request.args.get("per", 50, type=int)
        per = per if per in PAGE_SIZES else 50
        page = max(request.args.get("page", 1, type=int), 1)
        sort = request.args.get("sort") or None
        descending = request.args.get("desc", "1") != "0"
        filters = {k: request.args.get(k) or None for k in ("task", "status", "pipeline")}
        with store() as st:
            table = cache.get(st, where)
            shown = select_runs(table, sort=sort, descending=descending, offset=(page - 1) * per, limit=per, **filters)
            tasks = sorted({t for t in table.frame["task"].tolist() if isinstance(t, str)})
            statuses = sorted({s for s in table.frame["status"].tolist() if isinstance(s, str)})
        pages = max((shown.total + per - 1) // per, 1)
        return render_template(
            "runs.html", table=shown, all_runs=table.total, page=page, pages=pages, per=per, sort=sort or "tstamp",
            descending=descending, where=where or "", filters=filters, tasks=tasks, statuses=statuses,
            page_sizes=PAGE_SIZES, project=config.root,
        )

    @app.get("/run/<run_id>")
    def run(run_id: str) -> Any:
        with store() as st:
            full = resolve_run_id(st, run_id)
            page = build_run_page(st, full, config)
        return render_template("run.html", page=page, project=config.root)

    @app.get("/api/run/<run_id>/figures")
    def run_figures(run_id: str) -> Any:
        with store() as st:
            full = resolve_run_id(st, run_id)
            facts = run_facts(st, full)
            values = read_run_values(st, full)
        return jsonify({"status": facts["status"], "figures": values.figures})

    @app.get("/compare")
    def compare() -> Any:
        picked = [r for r in request.args.getlist("run") if r] or [
            r for r in (request.args.get("runs") or "").split(",") if r
        ]
        if not picked:
            raise ViewError("Pick runs to compare: tick them on the Runs page, or /compare?run=ID&run=ID.")
        with store() as st:
            run_ids = list(dict.fromkeys(resolve_run_id(st, r) for r in picked))
            page = build_compare_page(st, run_ids, request.args.get("name"), config)
        return render_template("compare.html", page=page, project=config.root)

    @app.get("/pipelines")
    def pipelines() -> Any:
        from ..dag._report import read_pipelines

        with store() as st:
            frame = read_pipelines(st.build_context(), 500)
        return render_template("pipelines.html", rows=frame.to_dict("records"), project=config.root)

    @app.get("/pipeline/<pipeline_id>")
    def pipeline(pipeline_id: str) -> Any:
        from ..dag._report import read_pipeline, read_tasks
        from ..graph import to_svg

        with store() as st:
            conn = st.build_context()
            view = read_pipeline(conn, pipeline_id)
            tasks = read_tasks(conn, view.pipeline_id).to_dict("records")
        links = {n.id: "/runs?" + urlencode({"pipeline": view.pipeline_id, "task": n.label}) for n in view.graph.nodes}
        return render_template("pipeline.html", view=view, svg=to_svg(view.graph, links), tasks=tasks,
                               project=config.root)

    @app.get("/lineage")
    def lineage() -> Any:
        from ..graph import NodeKind, lineage_graph, to_svg
        from ..lineage import LineageTracer

        path = request.args.get("path") or None
        sha = request.args.get("sha") or None
        with store() as st:
            conn = st.build_context()
            files = conn.execute(
                "SELECT f.path, f.sha256, max(t.started) AS at, count(DISTINCT f.pipeline_id) AS pipelines FROM files f "
                "JOIN tasks t ON t.pipeline_id = f.pipeline_id AND t.task = f.task "
                "WHERE f.sha256 IS NOT NULL GROUP BY f.path, f.sha256 ORDER BY f.path, at DESC"
            ).fetchall()
            svg = None
            node = None
            if path is not None:
                if sha is None:
                    sha = _current_sha(config, path) or next((f[1] for f in files if f[0] == path), None)
                if sha is None:
                    raise ViewError(f"No recorded task read or wrote '{path}'; pick a file from the list.")
                size = conn.execute("SELECT size FROM files WHERE sha256 = ? LIMIT 1", (sha,)).fetchone()
                node = LineageTracer(conn).trace(path, sha, size[0] if size else None)
        if node is not None:
            graph = lineage_graph(node)
            links = {
                n.id: "/runs?" + urlencode({"pipeline": n.data["pipeline"], "task": n.data["task"]})
                if n.kind is NodeKind.TASK
                else "/lineage?" + urlencode({"path": n.data["path"], "sha": n.data["sha256"]})
                for n in graph.nodes
            }
            svg = to_svg(graph, links)
        return render_template("lineage.html", files=files, path=path, sha=sha, node=node, svg=svg,
                               project=config.root)

    return app


def _current_sha(config: Config, path: str) -> str | None:
    """The sha256 of the project file ``path`` as it is now, if it exists."""
    from ..dag._record import sha256_file

    file = (config.root / path).resolve()
    if not file.is_relative_to(config.root) or not file.is_file():
        return None
    return sha256_file(file)
