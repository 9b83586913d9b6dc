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
    team: bool = False,
    remote: str | None = None,
) -> None:
    """Serve the UI on ``127.0.0.1:port`` until interrupted (``port=0``: a free port).

    :param team: serve the team store (``remote``, or the only one configured), read-only.
    :raises TeamStoreError: with ``team``, when no remote is configured or ``remote`` is unknown.
    """
    from werkzeug.serving import make_server

    app = create_app(config, team=team, remote=remote)
    shown = str(app.config["FLOR_CONFIG"].db_path)
    if team:
        from ..team import resolve_remote

        # The remote's name, never its url: the url may name a user or host the log should not carry.
        shown = f"the team store '{resolve_remote(app.config['FLOR_CONFIG'], remote).name}'"
    server = make_server(HOST, port, app, threaded=True)
    url = f"http://{HOST}:{server.server_port}/"
    announce(f"flordb-build ui: serving {shown} at {url} (read-only; Ctrl-C stops)")
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
