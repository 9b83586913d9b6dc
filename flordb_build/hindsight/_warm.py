"""Warm starts for replay processes: fork each replay from a server that has imported its libraries.

A replayed script pays its imports on every replay. For a torch training that is ``import torch``
plus the ``torch._dynamo`` import that building an optimizer triggers: over 3 s on these machines,
more than restoring the final checkpoint and running a suffix. A warm server (``_warm_server.py``)
imports those modules once and forks one child per replay job; the child runs the patched script
with the job's argv, working directory, environment and descriptors.

    WarmPool (one per replay session)
      server_for(env) -> WarmServer      one per (project, interpreter, environment, installed packages);
                                         reused across sessions while it lives (replay_keep_warm)
      WarmServer.run(...) -> WarmProcess started by the server; wait() -> exit status

    WarmPool.for_node(name) (one per Ray worker process, ``_executors.ray_worker_setup``)
      the same, with no project checkout: keyed by each job's project root as the driver names
      it, sockets and learned modules in a node-local directory, servers owned by the worker
      (``--owner``: they exit once it is gone and nobody is connected)

What a server preloads: the imports of the script (read with ``ast``), flordb_build and its replay
mode (``_child.WARM_PRELOAD``; the child takes its ``--kwargs`` after the fork), then every installed
module the replayed children imported (reported after each job, remembered in the runtime
directory for the next server). A module the script's own directory or the project's import paths
provide is never preloaded, and the server refuses a job whose directory shadows a module it has
loaded: that job starts cold.

Settings (``[tool.flordb_build]``): ``replay_warm = false`` turns warm starts off;
``replay_keep_warm = SECONDS`` (default 600; 0: stop with the session) is how long an idle server
stays; the ``FLORDB_BUILD_REPLAY_KEEP_WARM`` environment variable overrides the latter.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..config import DEFAULT_REPLAY_KEEP_WARM, Config
from ..errors import ConfigError, WarmStartError
from ._child import WARM_PRELOAD
from ._warm_server import PROTOCOL

SERVER_SCRIPT = Path(__file__).with_name("_warm_server.py")
KEEP_WARM_ENV = "FLORDB_BUILD_REPLAY_KEEP_WARM"
DEFAULT_KEEP_WARM = DEFAULT_REPLAY_KEEP_WARM
#: How long a new server may take to import its preload list before the job starts cold instead.
START_TIMEOUT = 300.0
#: Environment variables that change from shell to shell and that no library reads at import.
_VOLATILE_ENV = frozenset({"_", "OLDPWD", "PWD", "SHLVL"})
_JOB_ENV_PREFIXES = ("FLOR_",)  # per job (the replay spec, the task): set in the child, not the server


def warm_settings(config: Config) -> tuple[bool, float]:
    """``(enabled, keep-warm seconds)`` from the project's settings and the environment."""
    keep: Any = os.environ.get(KEEP_WARM_ENV) or config.replay_keep_warm
    try:
        seconds = float(keep)
    except (TypeError, ValueError):
        seconds = -1.0
    if not seconds >= 0 or isinstance(keep, bool):
        raise ConfigError(
            f"'replay_keep_warm' (or ${KEEP_WARM_ENV}) must be a number of seconds >= 0, got '{keep}'."
        )
    return config.replay_warm, seconds


def runtime_dir() -> Path:
    """A directory only this user can use, for server sockets and logs (sockets need short paths)."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    root = Path(base) / "flordb-build" if base and Path(base).is_dir() else (
        Path(tempfile.gettempdir()) / f"flordb-build-{os.getuid()}"
    )
    return _private_dir(root)


def _private_dir(root: Path) -> Path:
    with contextlib.suppress(FileExistsError):
        root.mkdir(mode=0o700)
    info = root.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise WarmStartError(
            f"'{root}' is not a private directory of this user (a symlink, another owner, or open "
            "permissions); warm replay starts are off until it is removed."
        )
    return root


#: (site directories, their modification times) -> fingerprint: listing a large site-packages on
#: every job cost more than the rest of picking its server.
_FINGERPRINTS: dict[tuple[tuple[str, int], ...], str] = {}


def _installed_fingerprint() -> str:
    """Names of the installed distributions (a pip install or upgrade changes them)."""
    import sysconfig

    paths = sorted({sysconfig.get_path(key) for key in ("purelib", "platlib")})
    stamps = []
    for path in paths:
        try:
            stamps.append((path, os.stat(path).st_mtime_ns))  # adding or removing a .dist-info changes it
        except OSError:
            stamps.append((path, -1))
    cached = _FINGERPRINTS.get(tuple(stamps))
    if cached is not None:
        return cached
    names: list[str] = []
    for path in paths:
        with contextlib.suppress(OSError):
            names.extend(n for n in os.listdir(path) if n.endswith((".dist-info", ".egg-info", ".pth")))
    fingerprint = hashlib.sha256("\n".join(sorted(set(names))).encode()).hexdigest()
    _FINGERPRINTS[tuple(stamps)] = fingerprint
    return fingerprint


def server_environment(env: Mapping[str, str]) -> dict[str, str]:
    """The environment a server starts with: the job's, less what is set per job."""
    return {k: v for k, v in env.items() if not k.startswith(_JOB_ENV_PREFIXES)}


def server_key(root: Path, env: Mapping[str, str]) -> str:
    """Which server a job may fork from: same project, interpreter, environment and installed code."""
    stable_env = {k: v for k, v in server_environment(env).items() if k not in _VOLATILE_ENV}
    material = {
        "server": hashlib.sha256(SERVER_SCRIPT.read_bytes()).hexdigest(),
        "executable": sys.executable,
        "root": str(root),
        "env": sorted(stable_env.items()),
        "installed": _installed_fingerprint(),
    }
    return hashlib.sha256(json.dumps(material).encode()).hexdigest()[:24]


def script_imports(source: str) -> list[str]:
    """Top-level package names that ``source`` imports absolutely, in order of appearance."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name.split(".", 1)[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module.split(".", 1)[0])
    return [n for n in dict.fromkeys(names) if n not in ("flordb_build", "__future__")]


def installed_module(name: str, root: Path) -> bool:
    """Whether top-level module ``name`` resolves here to installed code, not to the project's own."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    locations = list(spec.submodule_search_locations or [])
    if spec.origin and spec.has_location:
        locations.append(spec.origin)
    project = root.resolve()
    return not any(Path(location).resolve().is_relative_to(project) for location in locations)


def local_modules(script_dir: Path) -> frozenset[str]:
    """Top-level module names the script's directory provides (it comes first on the script's path)."""
    names = set()
    with contextlib.suppress(OSError):
        for entry in os.scandir(script_dir):
            if entry.is_dir():
                names.add(entry.name)
            elif entry.name.endswith((".py", ".pyc")) or ".cpython-" in entry.name or entry.name.endswith(".so"):
                names.add(entry.name.split(".", 1)[0])
    return frozenset(names)


class WarmProcess:
    """A replay process a warm server forked; the connection reports its exit."""

    def __init__(self, conn: socket.socket, pid: int, imported: float = 0.0) -> None:
        self.conn = conn
        self.pid = pid
        self.imported = imported  # seconds the server imported this request's preloads before it forked

    def wait(self) -> int:
        """Block until the process ends; its exit status (negative: killed by that signal)."""
        try:
            reply = _receive(self.conn, None)
        except (OSError, WarmStartError):
            reply = {}
        finally:
            self.conn.close()
        if reply.get("op") != "exited":
            return -int(signal.SIGKILL)  # the server went away: it kills its children when it goes
        return int(reply["status"])

    def kill(self) -> None:
        """Kill the process and its group."""
        for kill in (lambda: os.killpg(self.pid, signal.SIGKILL), lambda: os.kill(self.pid, signal.SIGKILL)):
            with contextlib.suppress(OSError):
                kill()
                return


def _receive(conn: socket.socket, timeout: float | None) -> dict[str, Any]:
    conn.settimeout(timeout)
    data = conn.recv(1 << 20)
    if not data:
        raise WarmStartError("the warm replay server closed the connection")
    reply = json.loads(data)
    if not isinstance(reply, dict):
        raise WarmStartError(f"unexpected reply from the warm replay server: {reply!r}")
    return reply


class WarmServer:
    """A live server (see the module docstring), held by an open session connection.

    The server does not exit while a connection is open, so it cannot time out between the jobs
    of a session; its idle time starts when the session lets go (:meth:`release`).
    """

    def __init__(self, path: Path, hello: Mapping[str, Any], session: socket.socket) -> None:
        self.path = path
        self.session: socket.socket | None = session
        self.pid = int(hello["pid"])
        self.loaded: dict[str, float] = dict(hello.get("loaded", {}))
        self.safe = bool(hello.get("safe"))
        self.reason = hello.get("reason")
        self.watch = str(hello.get("watch", ""))
        self.idle = float(hello.get("idle", 0.0))
        self.rss_bytes = int(hello.get("rss_bytes", 0))
        self.children = int(hello.get("children", 0))  # replay processes running when it said hello
        self.modules = int(hello.get("modules", 0))  # imported in all, preloads and what they import

    def release(self) -> None:
        """Close the session connection: the server's idle countdown starts."""
        if self.session is not None:
            self.session.close()
            self.session = None

    def request(self, message: Mapping[str, Any], timeout: float | None = 30.0) -> dict[str, Any]:
        """Send one message on a new connection and return the reply."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
            conn.settimeout(timeout)
            conn.connect(str(self.path))
            conn.send(json.dumps(message).encode())
            return _receive(conn, timeout)

    def run(
        self,
        argv: Sequence[str],
        cwd: Path,
        env: Mapping[str, str],
        fds: Mapping[int, int],
        env_fds: Mapping[str, int] | None = None,
        preload: Sequence[str] = (),
        modules_out: Path | None = None,
        exclude: Sequence[Path] = (),
        path_prepend: Sequence[Path] = (),
        prepare: str | None = None,
    ) -> WarmProcess:
        """Fork a process running ``argv`` (the script first).

        :param fds: target number in the child -> our descriptor (``{1: log, 2: log}``).
        :param env_fds: environment variable -> our descriptor; the child gets it at a free number
            and the variable names that number.
        :param modules_out: where the child lists the installed modules it imported (for preloading).
        :param exclude: directories whose modules are never listed there (the project's code).
        :param path_prepend: directories the child puts on ``sys.path`` right after the script's own.
        :param prepare: ``module:function`` the child calls before it runs the script (replay mode).
        :raises WarmStartError: the server refused (not fork-safe, shadowed modules) or is gone.
        """
        env_fds = env_fds or {}
        order = list(dict.fromkeys([*fds.values(), *env_fds.values()]))
        # The script's directory and the project's import paths come before installed code in the
        # child: a module they provide must not be taken from the server's preloads.
        local = local_modules(Path(argv[0]).parent).union(*(local_modules(Path(p)) for p in path_prepend))
        message = {
            "op": "run", "argv": list(argv), "cwd": str(cwd), "env": dict(env),
            "fds": {str(target): order.index(fd) for target, fd in fds.items()},
            "env_fds": {name: order.index(fd) for name, fd in env_fds.items()},
            "preload": [name for name in preload if name.split(".", 1)[0] not in local],
            "local_modules": sorted(local), "modules_out": str(modules_out) if modules_out else None,
            "exclude": [str(path) for path in exclude], "path_prepend": [str(path) for path in path_prepend],
            "prepare": prepare,
        }
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            conn.connect(str(self.path))
            socket.send_fds(conn, [json.dumps(message).encode()], order)
            # The server imports the preload list before it forks: that may take a while.
            reply = _receive(conn, START_TIMEOUT)
        except (OSError, ValueError) as exc:
            conn.close()
            raise WarmStartError(f"the warm replay server at '{self.path}' did not answer: {exc}") from exc
        except WarmStartError:
            conn.close()
            raise
        if reply.get("op") != "started":
            conn.close()
            raise WarmStartError(str(reply.get("error") or reply))
        self.loaded.update({name: 0.0 for name in preload if name not in self.loaded})
        imported = reply.get("imported")
        return WarmProcess(conn, int(reply["pid"]), float(imported) if isinstance(imported, int | float) else 0.0)

    def stop(self) -> None:
        """Ask the server to exit now (jobs still running are killed)."""
        with contextlib.suppress(OSError, WarmStartError, ValueError):
            self.request({"op": "stop"}, timeout=5.0)
        self.release()


def connect(path: Path, timeout: float = 5.0) -> WarmServer | None:
    """The server listening at ``path``, held by a session connection; None when none answers there."""
    if not path.exists():
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        conn.settimeout(timeout)
        conn.connect(str(path))
        conn.send(b'{"op": "hello"}')
        hello = _receive(conn, timeout)
    except (OSError, ValueError, WarmStartError):
        conn.close()
        return None
    if hello.get("op") != "hello" or hello.get("protocol") != PROTOCOL:
        conn.close()
        return None
    return WarmServer(path, hello, conn)


def project_servers(config: Config) -> list[WarmServer]:
    """The live servers of this project (each held until released or stopped)."""
    try:
        directory = runtime_dir()
    except WarmStartError:
        return []
    servers = []
    watch = str(config.db_path.parent)
    for path in sorted(directory.glob("*.sock")):
        server = connect(path)
        if server is None:
            continue
        if server.watch == watch:
            servers.append(server)
        else:
            server.release()
    return servers


def _last_words(log: Path, offset: int) -> str:
    """What a server wrote to its log after ``offset`` (the servers of one key share it), for an
    error message: why it exited, or a traceback."""
    try:
        with log.open("rb") as fh:
            fh.seek(offset)
            text = fh.read().decode("utf-8", errors="replace").strip()
    except OSError as exc:
        return f"its log '{log}' cannot be read ({exc.strerror})"
    if not text:
        return f"it wrote nothing to its log '{log}' (killed by a signal?)"
    return f"{text[-600:]} (log '{log}')"


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not: kill 0 still finds one that nobody reaps)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except FileNotFoundError:
        return not os.path.isdir("/proc/self")  # gone meanwhile, or no /proc to tell (kill 0 found it)
    except (OSError, IndexError):
        return True


def _reap(pid: int) -> None:
    """Reap the exited server ``pid`` if it is our child: it is where this process adopts orphans
    (PID 1 of a container or PID namespace, a subreaper); else it stays a zombie until we exit."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


class WarmPool:
    """The warm servers of one replay session, started on first use (see the module docstring).

    :param config: the project whose replays this pool starts (its root keys the servers, its
        store directory is their watch path); None for a worker's pool (:meth:`for_node`).
    :param directory: where the sockets, logs and learned modules live (default :func:`runtime_dir`).
    :param watch: the servers exit when it disappears (default: the project's store directory).
    :param owner: the servers exit once this process is gone and nobody is connected.
    """

    def __init__(
        self, config: Config | None, keep_warm: float, *, directory: Path | None = None,
        watch: Path | None = None, owner: int | None = None,
    ) -> None:
        if config is None and watch is None:
            raise ValueError("a warm pool without a project needs a watch path")
        self.config = config
        self.keep_warm = keep_warm
        self.dir = directory if directory is not None else runtime_dir()
        self.watch = watch if watch is not None else config.db_path.parent  # type: ignore[union-attr]
        self.owner = owner
        self._servers: dict[str, WarmServer | None] = {}
        self._lock = threading.Lock()

    @classmethod
    def for_node(cls, name: str, keep_warm: float = DEFAULT_KEEP_WARM) -> WarmPool:
        """The pool of a worker process (a Ray worker) that has no checkout of the projects it replays.

        Node-local: a private directory ``name`` under :func:`runtime_dir` holds the sockets, and
        is the servers' watch path; the calling process owns the servers it starts. Pools of other
        workers with the same ``name`` (the node's) share the servers: a server ends when its owner
        is gone and no worker is connected to it any more.

        :raises WarmStartError: the runtime directory is not private.
        """
        directory = _private_dir(runtime_dir() / name)
        return cls(None, keep_warm, directory=directory, watch=directory, owner=os.getpid())

    def _root(self, root: Path | None) -> Path:
        """The project root that keys a job's server: the pool's own, else the job's (as its driver names it)."""
        if self.config is not None:
            return self.config.root
        return root if root is not None else Path("/")

    def server_for(
        self, env: Mapping[str, str], script_source: str, root: Path | None = None
    ) -> tuple[WarmServer, bool]:
        """The server for jobs with environment ``env``, and whether it was started for this call.

        A server is started (preloading the script's imports and what earlier replays imported)
        when none lives; concurrent callers wait for the same one.

        :param root: the job's project root (a pool of a project uses its own).
        :raises WarmStartError: it cannot be started, or it is not fork-safe.
        """
        root = self._root(root)
        key = server_key(root, env)
        with self._lock:
            if key in self._servers:
                server = self._servers[key]
                if server is None:
                    raise WarmStartError("the warm replay server for this environment could not start earlier")
                return server, False
            fresh = False
            try:
                server = connect(self.dir / f"{key}.sock")
                if server is None:
                    server, fresh = self._start(key, env, script_source, root), True
            except WarmStartError:
                self._servers[key] = None
                raise
            if not server.safe:
                self._servers[key] = None
                server.stop()
                raise WarmStartError(f"warm replay starts are off for this environment: {server.reason}")
            self._servers[key] = server
            return server, fresh

    def is_live(self, env: Mapping[str, str], root: Path | None = None) -> bool:
        """Whether a server for ``env`` is up now (a plan's estimate depends on it)."""
        server = connect(self.dir / f"{server_key(self._root(root), env)}.sock")
        if server is None:
            return False
        server.release()
        return True

    def learned(self, key_env: Mapping[str, str], root: Path | None = None) -> list[str]:
        """Modules earlier replays in this environment imported (the next server preloads them)."""
        path = self.dir / f"{server_key(self._root(root), key_env)}.modules.json"
        try:
            names = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return []
        return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []

    def learn(self, key_env: Mapping[str, str], modules: Sequence[str], root: Path | None = None) -> None:
        """Remember ``modules`` (imported by a replayed script) for this environment's next server."""
        if not modules:
            return
        with self._lock:
            known = self.learned(key_env, root)
            merged = list(dict.fromkeys([*known, *modules]))
            if len(merged) == len(known):
                return
            path = self.dir / f"{server_key(self._root(root), key_env)}.modules.json"
            tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps(merged), encoding="utf-8")
            os.replace(tmp, path)

    def _start(self, key: str, env: Mapping[str, str], script_source: str, root: Path) -> WarmServer:
        sock = self.dir / f"{key}.sock"
        preload_file = self.dir / f"{key}.preload.json"
        imports = [name for name in script_imports(script_source) if installed_module(name, root)]
        # flordb_build too: the child would spend more on importing it than on anything else it does
        # before the script's first flor call (bench/README.md, bench_scale).
        preload = list(dict.fromkeys([*imports, *WARM_PRELOAD, *self.learned(env, root)]))
        preload_file.write_text(json.dumps(preload), encoding="utf-8")
        watch = self.watch
        watch.mkdir(parents=True, exist_ok=True)
        log = self.dir / f"{key}.log"
        try:
            log_offset = log.stat().st_size  # the log is appended to: what comes after is this server's
        except OSError:
            log_offset = 0
        command = [
            sys.executable, str(SERVER_SCRIPT), "--socket", str(sock), "--watch", str(watch),
            "--idle", str(self.keep_warm), "--preload-file", str(preload_file), "--log", str(log),
            "--starter", str(os.getpid()),  # it waits for us, however long the machine keeps us off the CPU
            *(("--owner", str(self.owner)) if self.owner is not None else ()),
        ]
        # The starter forks the server off, prints its pid and exits: the server outlives this
        # process without being a child anyone must reap. A new session: Ctrl-C here is not for it.
        started = subprocess.run(
            command, cwd=self.dir, env=server_environment(env), stdin=subprocess.DEVNULL, capture_output=True,
            text=True, start_new_session=True, check=False,
        )
        if started.returncode != 0 or not started.stdout.strip().isdigit():
            raise WarmStartError(
                f"the warm replay server did not start (status {started.returncode}): {started.stderr.strip()[-300:]}"
            )
        pid = int(started.stdout.strip())
        try:  # readable once the server has exited (not our child: no status to wait for)
            exited = os.pidfd_open(pid)
        except OSError:
            exited = None
        try:
            return self._await_server(sock, pid, exited, log, log_offset)
        finally:
            if exited is not None:
                os.close(exited)

    def _await_server(self, sock: Path, pid: int, exited: int | None, log: Path, log_offset: int) -> WarmServer:
        """The server ``pid`` once it serves at ``sock``, or another that serves there instead of it."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            server = connect(sock)
            if server is not None and server.pid == pid:
                return server
            # The pidfd is readable once the server has exited, zombie or not: where nobody reaps
            # it (PID 1 of a Ray job's PID namespace, of a container), kill 0 would still find it.
            gone = not _alive(pid) if exited is None else bool(select.select([exited], [], [], 0)[0])
            if gone:
                _reap(pid)
            if server is not None:
                if gone:
                    # Another process started a server for this environment at the same time and
                    # took the name; ours saw that and exited. That one serves these jobs as well.
                    return server
                server.release()  # an older server still had the name: ours takes it when ready
            elif gone:
                raise WarmStartError(
                    f"the warm replay server (pid {pid}) exited before it served: {_last_words(log, log_offset)}"
                )
            if exited is not None:
                select.select([exited], [], [], 0.02)  # wakes at once if it exits meanwhile
            else:
                time.sleep(0.02)
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
        raise WarmStartError(
            f"the warm replay server (pid {pid}) did not serve within {START_TIMEOUT:.0f}s, killed: {_last_words(log, log_offset)}"
        )

    def close(self) -> list[WarmServer]:
        """End of the session: let go of the servers (they stay ``keep_warm`` idle seconds); those kept."""
        with self._lock:
            servers = [s for s in self._servers.values() if s is not None]
            self._servers.clear()
        for server in servers:
            if self.keep_warm <= 0:
                server.stop()
            else:
                server.release()
        return servers if self.keep_warm > 0 else []
