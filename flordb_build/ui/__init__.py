"""``flordb-build ui``: a local, read-only web app over a project's store (needs ``flordb_build[ui]``).

Pages: Runs (filter, sort, page, pick runs), Run (args, environment, code at the snapshot, a
chart per logged name, checkpoints; live while the run logs), Compare, Pipelines (the DAG of each
invocation) and Lineage. It binds to 127.0.0.1 only and serves plotly.js from the installed
``plotly`` package, so it works without a network.
"""

from __future__ import annotations

from collections.abc import Callable

from ..config import Config
from ._app import create_app

HOST = "127.0.0.1"


def serve(
    port: int = 8765,
    *,
    open_browser: bool = False,
    announce: Callable[[str], None] = print,
    config: Config | None = None,
) -> None:
    """Serve the UI on ``127.0.0.1:port`` until interrupted (``port=0``: a free port)."""
    from werkzeug.serving import make_server

    app = create_app(config)
    server = make_server(HOST, port, app, threaded=True)
    url = f"http://{HOST}:{server.server_port}/"
    announce(f"flordb-build ui: serving {app.config['FLOR_CONFIG'].db_path} at {url} (read-only; Ctrl-C stops)")
    if open_browser:
        import webbrowser

        webbrowser.open(url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        announce("flordb-build ui: stopped")
    finally:
        server.server_close()


__all__ = ["HOST", "create_app", "serve"]
