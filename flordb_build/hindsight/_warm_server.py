"""A warm replay server: imports a run's libraries once, then forks one replay process per job.

Run by path (``python .../_warm_server.py --socket S --watch W --idle N``), never imported: it uses
the standard library only. flordb_build comes in as a preload like any library (``_child.WARM_PRELOAD``):
its import here read the server's command line, so the child's ``prepare`` step
(``_child.prepare_warm_child``) takes the child's ``--kwargs`` again once ``sys.argv`` is the script's.

Protocol: one JSON object per packet on an ``AF_UNIX``/``SOCK_SEQPACKET`` socket (packets keep
their boundaries and carry file descriptors)::

    -> {"op": "hello"}                          <- {"op": "hello", "pid", "safe", "reason", "loaded", ...}
    -> {"op": "preload", "modules": [...]}      <- {"op": "preloaded", "loaded": {name: seconds}}
    -> {"op": "run", "argv", "cwd", "env",      <- {"op": "started", "pid", "imported"}  or {"op": "error", "error"}
        "fds": {target: index}, "env_fds",      <- {"op": "exited", "status"}   (the connection then closes)
        "preload", "local_modules", "exclude", "path_prepend", "modules_out"}
        + descriptors                           ("imported": seconds it imported the request's preloads before the fork)
    -> {"op": "stop"}                           <- {"op": "stopping"}

A child becomes the script as ``python script.py args`` would run it: its own working directory,
environment, ``sys.argv``, ``sys.path[0]``, stdout/stderr and inherited descriptors; ``__main__``
is the script; atexit handlers run at the end. What differs from a fresh interpreter: the modules
the server preloaded are already imported (that is the point), and the string hash seed is the
server's. ``random`` reseeds itself after a fork; numpy's global generator is reseeded here.

The server exits when it has had no connection for ``--idle`` seconds (a replay session holds
one open from its first job to its end), when the ``--watch`` path (the project's store directory) disappears, when its socket path no longer names its socket (another
server took the name), or on ``stop``. Closing a connection while its child runs kills the child.
When a child ends, however it ends, its process group (what the script started) is killed too.
With ``--owner PID`` (a Ray worker's pool, ``_warm.WarmPool.for_node``) it also exits as soon as
that process is gone and no connection or child is left, idle time or not: a worker's servers end
with the worker (and so with the Ray session), however it ends.

With ``--starter PID`` (the process that started it, ``_warm.WarmPool``) the idle countdown waits
for that process's first connection, or its end: a starter that a loaded machine keeps off the CPU
for a while must still find its server (an ``--idle 0`` server, or one whose preloads took longer
than ``--idle``, would otherwise exit at its first look, before anyone came). The server writes why
it exits to its log (stderr), so that a server that is gone says why.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import select
import selectors
import signal
import socket
import struct
import sys
import sysconfig
import threading
import time
import traceback
from typing import Any

PROTOCOL = 1
MAX_PACKET = 1 << 20
MAX_FDS = 8
#: Received descriptors are moved at or above this number before being placed at their targets.
HIGH_FD = 200


def library_roots() -> tuple[str, ...]:
    """Directories of installed code (stdlib and site-packages): only modules from there are preloaded."""
    import site

    roots = {sysconfig.get_path(name) for name in ("stdlib", "platstdlib", "purelib", "platlib")}
    try:
        roots.update(site.getsitepackages())
        roots.add(site.getusersitepackages())
    except AttributeError:  # a virtualenv's old site module
        pass
    return tuple(sorted(os.path.realpath(r) + os.sep for r in roots if r))


def preloadable_modules(exclude_roots: tuple[str, ...], baseline: set[str] | None = None) -> list[str]:
    """Loaded modules a server may import ahead of time: installed code, not flordb_build or the script's own."""
    roots = library_roots()
    names = []  # in import order: a server imports them in the order the script did
    for name, module in list(sys.modules.items()):
        if baseline is not None and name in baseline:
            continue
        if name == "__main__" or name.split(".", 1)[0] == "flordb_build" or module is None:
            continue
        path = getattr(module, "__file__", None)
        if not isinstance(path, str):
            continue
        real = os.path.realpath(path)
        if real.startswith(roots) and not real.startswith(exclude_roots):
            names.append(name)
    return names


class Server:
    """The accept/fork/reap loop (see the module docstring)."""

    def __init__(
        self, sock_path: str, watch: str, idle: float, owner: int | None = None, starter: int | None = None
    ) -> None:
        self.sock_path = sock_path
        self.watch = watch
        self.idle = idle
        self.owner = owner
        self.owner_gone = False
        self.owner_fd: int | None = None
        self.starter = starter
        self.starter_fd: int | None = None  # open until the starter has connected or is gone
        self.selector = selectors.DefaultSelector()
        self.loaded: dict[str, float] = {}  # module -> seconds its import took here
        self.failed: dict[str, str] = {}
        self.children: dict[int, tuple[socket.socket, int]] = {}  # pidfd -> (connection, pid)
        self.connections: set[socket.socket] = set()
        self.last_active = time.monotonic()
        self.listener: socket.socket | None = None
        self.inode = 0
        self.stopping = False

    # -- preloading ---------------------------------------------------------------------------

    def preload(self, names: list[str]) -> dict[str, float]:
        """Import ``names`` not imported yet; seconds per name (a failed import is remembered, not retried)."""
        done: dict[str, float] = {}
        for name in names:
            if not isinstance(name, str) or name in self.loaded or name in self.failed or name in sys.modules:
                continue
            started = time.perf_counter()
            try:
                importlib.import_module(name)
            except BaseException as exc:  # noqa: BLE001 - an import may raise anything, even SystemExit
                self.failed[name] = f"{type(exc).__name__}: {exc}"
                continue
            done[name] = self.loaded[name] = time.perf_counter() - started
            self.report_exits()
        return done

    def report_exits(self) -> None:
        """Reap the children that have ended: a long preload (a fork request's hundreds of learned
        modules) must not hold back another job's news that its child exited until it is done."""
        if not self.children:
            return
        poll = select.poll()
        for pidfd in self.children:
            poll.register(pidfd, select.POLLIN)
        for pidfd, _events in poll.poll(0):
            if pidfd in self.children:
                self.reap(pidfd, self.children[pidfd][1])

    def fork_safety(self) -> str | None:
        """Why forking now would give a broken child (None: safe)."""
        if threading.active_count() > 1:
            names = ", ".join(t.name for t in threading.enumerate() if t is not threading.main_thread())
            return f"a preloaded module started Python threads ({names})"
        torch = sys.modules.get("torch")
        cuda = getattr(torch, "cuda", None)
        if cuda is not None and getattr(cuda, "is_initialized", lambda: False)():
            return "a preloaded module initialised CUDA, which a forked process cannot use"
        return None

    # -- serving ------------------------------------------------------------------------------

    def bind(self) -> None:
        """Listen on a private name, then take the public one atomically: clients only see a ready server."""
        private = f"{self.sock_path}.{os.getpid()}"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        listener.bind(private)
        os.chmod(private, 0o600)
        listener.listen(16)
        os.replace(private, self.sock_path)
        self.inode = os.stat(self.sock_path).st_ino
        self.listener = listener
        self.selector.register(listener, selectors.EVENT_READ, ("accept", None))
        if self.owner is not None:
            try:  # a pidfd turns readable when the process exits: no polling, no pid reuse
                self.owner_fd = os.pidfd_open(self.owner)
            except OSError:
                self.owner_gone = True  # it exited before we looked
            else:
                self.selector.register(self.owner_fd, selectors.EVENT_READ, ("owner", None))
        if self.starter is not None:
            with contextlib.suppress(OSError):  # already gone: nobody to wait for
                self.starter_fd = os.pidfd_open(self.starter)
                self.selector.register(self.starter_fd, selectors.EVENT_READ, ("starter", None))
        self.last_active = time.monotonic()  # idle from now: the preloads were not idle time

    def serve(self) -> dict[str, Any] | None:
        """Serve until told to exit (returns None) or until a fork (returns the child's request)."""
        while not self.stopping:
            for key, _events in self.selector.select(timeout=1.0):
                kind, data = key.data
                if kind == "accept":
                    assert self.listener is not None
                    conn, _ = self.listener.accept()
                    if self.starter_fd is not None and peer_pid(conn) == self.starter:
                        self.end_starter_wait()
                    self.connections.add(conn)
                    self.selector.register(conn, selectors.EVENT_READ, ("conn", None))
                elif kind == "conn":
                    request = self.handle(key.fileobj)  # type: ignore[arg-type]
                    if request is not None:
                        return request  # in the child
                elif kind == "child":
                    # Unless a preload of this round reaped it already (report_exits), and its
                    # descriptor's number may since name another child's pidfd.
                    pidfd = int(key.fileobj)  # type: ignore[arg-type]
                    if pidfd in self.children and self.children[pidfd][1] == data:
                        self.reap(pidfd, data)
                elif kind == "owner":
                    self.owner_gone = True
                    self.selector.unregister(key.fileobj)
                    self.close_owner()
                elif kind == "starter":
                    self.end_starter_wait()  # it died before it connected: idle from now
                self.last_active = time.monotonic()
            reason = self.should_exit()
            if reason:
                print(f"warm replay server {os.getpid()} exits: {reason}", file=sys.stderr, flush=True)
                break
        self.shutdown()
        return None

    def should_exit(self) -> str | None:
        """Why the server should exit now (None: it stays)."""
        if self.stopping:
            return "asked to stop"
        if self.connections or self.children:
            return None
        if self.owner_gone:
            return f"its owner (pid {self.owner}) is gone and no client is left"
        if not os.path.exists(self.watch):
            return f"its watch path '{self.watch}' is gone"
        try:
            if os.stat(self.sock_path).st_ino != self.inode:
                return "another server took its socket name"
        except OSError:
            return "its socket path was removed"
        if self.starter_fd is not None:
            return None  # its starter is alive and has not connected yet: it is coming
        idle = time.monotonic() - self.last_active
        return f"idle for {idle:.1f}s (--idle {self.idle:g})" if idle > self.idle else None

    def end_starter_wait(self) -> None:
        if self.starter_fd is not None:
            self.selector.unregister(self.starter_fd)
            os.close(self.starter_fd)
            self.starter_fd = None

    def handle(self, conn: socket.socket) -> dict[str, Any] | None:
        try:
            data, fds, _flags, _addr = socket.recv_fds(conn, MAX_PACKET, MAX_FDS)
        except OSError:
            data, fds = b"", []
        if not data:
            self.drop(conn)
            return None
        op = None
        try:
            message = json.loads(data)
            op = message.get("op")
            if op == "hello":
                self.send(conn, self.hello())
            elif op == "preload":
                self.send(conn, {"op": "preloaded", "loaded": self.preload(list(message.get("modules", [])))})
            elif op == "stop":
                self.stopping = True
                self.send(conn, {"op": "stopping"})
            elif op == "run":
                return self.fork(conn, message, fds)
            else:
                self.send(conn, {"op": "error", "error": f"unknown op {op!r}"})
        except (ValueError, AttributeError) as exc:
            self.send(conn, {"op": "error", "error": f"bad request: {exc}"})
        finally:
            if op != "run" or self.stopping:
                for fd in fds:
                    os.close(fd)
        return None

    def hello(self) -> dict[str, Any]:
        return {
            "op": "hello", "protocol": PROTOCOL, "pid": os.getpid(), "executable": sys.executable,
            "safe": self.fork_safety() is None, "reason": self.fork_safety(), "loaded": self.loaded,
            "failed": self.failed, "modules": len(sys.modules), "watch": self.watch, "idle": self.idle,
            "children": len(self.children),
            "rss_bytes": resident_bytes(),
        }

    def fork(self, conn: socket.socket, message: dict[str, Any], fds: list[int]) -> dict[str, Any] | None:
        imported = sum(self.preload(list(message.get("preload", []))).values())
        unsafe = self.fork_safety()
        loaded_tops = {name.split(".", 1)[0] for name in sys.modules}
        clash = sorted(loaded_tops.intersection(message.get("local_modules", [])))
        if unsafe is None and clash:
            # The script's directory has its own module of that name: a fresh interpreter would import
            # that one, a child of this server would find the preloaded one.
            unsafe = f"the script's directory shadows the preloaded module(s) {', '.join(clash)}"
        if unsafe is not None:
            for fd in fds:
                os.close(fd)
            self.send(conn, {"op": "error", "error": f"cannot fork a replay: {unsafe}"})
            return None
        for stream in (sys.stdout, sys.stderr):
            stream.flush()  # the server's buffered output must not reappear in the child's
        pid = os.fork()
        if pid == 0:
            message["_fds"] = fds
            return message
        for fd in fds:
            os.close(fd)
        pidfd = os.pidfd_open(pid)
        self.children[pidfd] = (conn, pid)
        self.selector.register(pidfd, selectors.EVENT_READ, ("child", pid))
        self.send(conn, {"op": "started", "pid": pid, "imported": round(imported, 6)})
        return None

    def reap(self, pidfd: int, pid: int) -> None:
        conn, _ = self.children.pop(pidfd)
        self.selector.unregister(pidfd)
        os.close(pidfd)
        # What the script started (a data loader, a server) ends with it, as a cold child's guard
        # ends it (_child.end_with_parent): killed -9 or done, nobody reads that replay any more.
        # Before the wait: an unreaped child keeps its pid, so the group is still the child's.
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:  # no process of the group is left (or the child never made it)
            pass
        _, status = os.waitpid(pid, 0)
        self.send(conn, {"op": "exited", "status": os.waitstatus_to_exitcode(status)})
        self.drop(conn)

    def drop(self, conn: socket.socket) -> None:
        """Forget a connection; a child still running for it is killed (its client is gone)."""
        for pidfd, (owner, pid) in list(self.children.items()):
            if owner is conn:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except OSError:  # the child has not made its group yet
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
                self.selector.unregister(pidfd)
                os.close(pidfd)
                os.waitpid(pid, 0)
                del self.children[pidfd]
        if conn in self.connections:
            self.connections.discard(conn)
            self.selector.unregister(conn)
            conn.close()

    @staticmethod
    def send(conn: socket.socket, message: dict[str, Any]) -> None:
        try:
            conn.send(json.dumps(message).encode())
        except OSError:
            pass  # the client went away; its connection is dropped when the selector sees it

    def shutdown(self) -> None:
        for conn in list(self.connections):
            self.drop(conn)
        if self.listener is not None:
            try:
                if os.stat(self.sock_path).st_ino == self.inode:
                    os.unlink(self.sock_path)
            except OSError:
                pass
            self.listener.close()

    def close_owner(self) -> None:
        if self.owner_fd is not None:
            os.close(self.owner_fd)
            self.owner_fd = None

    def close_in_child(self) -> None:
        """Drop the server's sockets and selector in a forked child."""
        self.selector.close()
        self.close_owner()
        if self.starter_fd is not None:
            os.close(self.starter_fd)
        for conn in self.connections:
            conn.close()
        for pidfd in self.children:
            os.close(pidfd)
        if self.listener is not None:
            self.listener.close()


def peer_pid(conn: socket.socket) -> int:
    """The pid of the process that connected ``conn`` (0 where the kernel cannot tell)."""
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return 0
    return int(struct.unpack("3i", creds)[0])


def resident_bytes() -> int:
    """This process's resident memory (0 where /proc cannot tell)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


# -- the child ------------------------------------------------------------------------------------


def place_descriptors(fds: list[int], targets: dict[str, int], env_fds: dict[str, int]) -> dict[str, str]:
    """Put received descriptors where the script expects them.

    ``targets`` (``{"1": 0}``: the first descriptor as stdout) are placed at fixed numbers;
    ``env_fds`` (``{"VAR": 1}``) get any free number, returned as environment variables: a fixed
    number could overwrite a descriptor some preloaded library holds open.
    """
    import fcntl

    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, HIGH_FD) for fd in fds]
    for fd in fds:
        os.close(fd)
    for target, index in targets.items():
        os.dup2(high[index], int(target), inheritable=True)
    exported = {name: str(os.dup(high[index])) for name, index in env_fds.items()}
    for fd in high:
        os.close(fd)
    return exported


def become_script(server: Server, request: dict[str, Any]) -> int:
    """Run the request's script in this forked process as ``python script args`` would; its exit code."""
    os.setpgid(0, 0)  # the client kills the whole group on Ctrl-C
    server.close_in_child()
    exported = place_descriptors(request["_fds"], request.get("fds", {}), request.get("env_fds", {}))
    baseline = set(sys.modules)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ.update(exported)
    script = request["argv"][0]
    sys.argv = list(request["argv"])
    # As `python script.py` with the job's PYTHONPATH: the script's directory, then the project's
    # own import paths in the snapshot (see hindsight/_execute.py), then the rest.
    sys.path[0:0] = [os.path.dirname(os.path.abspath(script)), *request.get("path_prepend", [])]
    drop_server_finalizers()
    numpy_random = sys.modules.get("numpy.random")
    if numpy_random is not None:
        numpy_random.seed()  # a fresh interpreter seeds it from the OS; siblings must not share a stream
    if request.get("prepare"):  # e.g. replay mode (flordb_build/hindsight/_child.py), before the script
        module, _, function = request["prepare"].partition(":")
        getattr(importlib.import_module(module), function)()
    code = run_script(script)
    try:
        threading._shutdown()  # type: ignore[attr-defined]  # join non-daemon threads, as interpreter exit does
    except Exception:  # noqa: BLE001
        pass
    import atexit

    atexit._run_exitfuncs()
    modules_out = request.get("modules_out")
    if modules_out:
        # The run's own tree and the project: their modules are the script's code, never preloaded.
        paths = [request["cwd"], server.watch, *request.get("exclude", [])]
        exclude = tuple(os.path.realpath(path) + os.sep for path in paths)
        try:
            with open(modules_out, "w", encoding="utf-8") as fh:
                json.dump(preloadable_modules(exclude, baseline), fh)
        except OSError:
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    return code


def drop_server_finalizers() -> None:
    """In a forked child, keep the ``weakref.finalize`` callbacks of the server's objects from running at exit.

    Those objects were made by the server's preloads, and their finalizers clean up the server's
    state: a ``tempfile.TemporaryDirectory`` a library made at import is the server's, still in
    use by it and by the siblings. They are the server's to run at its own exit; in every child
    they would also cost time (torch's library finalizers: ~40 ms a child). Finalizers of objects
    the child makes, and every ``atexit`` handler, run at the child's exit as usual.
    """
    import weakref

    for info in getattr(weakref.finalize, "_registry", {}).values():
        info.atexit = False


def run_script(script: str) -> int:
    """Execute ``script`` as ``__main__``; the exit code the interpreter would give."""
    import runpy

    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        return exit_code(exc.code)
    except BaseException:  # noqa: BLE001 - the interpreter reports any uncaught exception this way
        sys.excepthook(*sys.exc_info())
        return 1
    return 0


def exit_code(code: object) -> int:
    """``sys.exit(code)`` as the interpreter maps it to a status."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def detach(log: str) -> None:
    """Fork: the parent prints the server's pid and exits (its starter reaps it at once), so the
    server is nobody's child that must be waited for; the child serves with its output in ``log``."""
    pid = os.fork()
    if pid:
        print(pid, flush=True)
        os._exit(0)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description="flordb_build warm replay server (started by 'flordb-build replay')")
    parser.add_argument("--socket", required=True, help="the socket path to serve on")
    parser.add_argument("--watch", required=True, help="exit when this path disappears (the project's store dir)")
    parser.add_argument("--idle", type=float, default=600.0, help="exit after this many idle seconds")
    parser.add_argument("--preload-file", help="a JSON list of modules to import before serving")
    parser.add_argument("--owner", type=int, help="exit once this process is gone and no connection is left")
    parser.add_argument("--starter", type=int, help="start the idle countdown only once this process has "
                                                    "connected, or is gone")
    parser.add_argument("--log", help="detach: print the server's pid, exit, and serve on in the background "
                                      "with stdout and stderr appended to this file")
    args = parser.parse_args()
    if args.log:
        detach(args.log)
    del sys.path[0]  # this file's directory: nothing beside it is meant to be importable
    server = Server(args.socket, args.watch, args.idle, args.owner, args.starter)
    if args.preload_file:
        with open(args.preload_file, encoding="utf-8") as fh:
            server.preload(json.load(fh))
    server.bind()
    request = server.serve()
    if request is None:
        return
    try:
        code = become_script(server, request)
    except BaseException:  # noqa: BLE001 - a child must never return into the server loop
        traceback.print_exc()
        code = 1
    os._exit(code)


if __name__ == "__main__":
    main()
