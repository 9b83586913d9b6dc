"""A real PostgreSQL server for the team-store tests: ``initdb`` into a temporary directory, one
``postgres`` listening on 127.0.0.1 only, stopped when the session ends.

Host connections need a password (scram-sha-256), so a test that pushes proves the password came
from ``PGPASSWORD``, never from the project. Readiness is an event: the server's own "ready to
accept connections" line on its stderr, not a sleep. ``initdb`` refuses to run as root, so as
root the cluster belongs to ``nobody`` (its directory is created for that user, outside pytest's
private tmp tree).
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

READY_LINE = "database system is ready to accept connections"
USER = "flor"
DATABASE = "flor_team"


def find_pg_bin() -> Path | None:
    """The directory of PostgreSQL's server binaries: on PATH, else Debian's /usr/lib/postgresql/N/bin."""
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(candidates[-1]).parent if candidates else None


@dataclass(frozen=True)
class PgServer:
    """A running server: where it listens, and the password of its superuser ``flor``."""

    host: str
    port: int
    password: str
    bin_dir: Path

    def url(self, database: str = DATABASE) -> str:
        return f"postgresql://{USER}@{self.host}:{self.port}/{database}"

    def env(self) -> dict[str, str]:
        """The environment a client needs: the password, from where libpq reads it."""
        return {"PGPASSWORD": self.password}

    def create_database(self, name: str) -> str:
        """A fresh database on this server; its url."""
        self.psql("postgres", f'CREATE DATABASE "{name}"')
        return self.url(name)

    def psql(self, database: str, sql: str) -> str:
        out = subprocess.run(
            [
                str(self.bin_dir / "psql"),
                "-X",
                "-q",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
                self.url(database),
            ],
            env={**os.environ, **self.env()},
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_server_user(argv: list[str]) -> list[str]:
    """``argv`` run as ``nobody`` when we are root (initdb and postgres refuse root)."""
    return ["runuser", "-u", "nobody", "--", *argv] if os.geteuid() == 0 else argv


@contextmanager
def running_server(bin_dir: Path, *, durable: bool = False) -> Iterator[PgServer]:
    """Start a throwaway cluster and yield it; stop it and remove its files afterwards.

    :param durable: keep PostgreSQL's default fsync and commit settings (the benchmarks do);
        tests turn them off, since a test server's data never outlives its session.
    """
    workdir = Path(tempfile.mkdtemp(prefix="flor-pg-"))
    if os.geteuid() == 0:
        shutil.chown(workdir, user="nobody")
    password = secrets.token_urlsafe(16)
    pwfile = workdir / "pw"
    pwfile.write_text(password + "\n")
    if os.geteuid() == 0:
        shutil.chown(pwfile, user="nobody")
    data = workdir / "data"
    subprocess.run(
        _as_server_user(
            [
                str(bin_dir / "initdb"),
                "-D",
                str(data),
                "-U",
                USER,
                f"--pwfile={pwfile}",
                "--auth-host=scram-sha-256",
                "--auth-local=trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                *([] if durable else ["--no-sync"]),
            ]
        ),
        check=True,
        capture_output=True,
    )
    pwfile.unlink()
    port = _free_port()
    proc = subprocess.Popen(
        _as_server_user(
            [
                str(bin_dir / "postgres"),
                "-D",
                str(data),
                "-k",
                str(workdir),
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                *(
                    []
                    if durable
                    else ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
                ),
            ]
        ),
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    drain: threading.Thread | None = None
    try:
        assert proc.stderr is not None
        seen: list[str] = []
        for line in proc.stderr:  # blocks until the server says something, or exits (EOF)
            seen.append(line)
            if READY_LINE in line:
                break
        else:
            raise RuntimeError("postgres exited before it was ready:\n" + "".join(seen))
        # Keep draining its log so the server never blocks on a full pipe.
        drain = threading.Thread(target=lambda: [None for _ in proc.stderr or ()], daemon=True)
        drain.start()
        server = PgServer("127.0.0.1", port, password, bin_dir)
        server.psql("postgres", f"CREATE DATABASE {DATABASE}")
        yield server
    finally:
        if proc.poll() is None:
            # SIGINT is postgres' "fast" shutdown. Signal the process group (start_new_session): as
            # root, proc is runuser, which ignores SIGINT while it waits for its child, so a signal
            # to proc alone waited out the timeout and then killed runuser, leaving postgres behind.
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if drain is not None:
            drain.join(timeout=10)  # the server is gone: its log ends
        if proc.stderr is not None:
            proc.stderr.close()
        shutil.rmtree(workdir, ignore_errors=True)
