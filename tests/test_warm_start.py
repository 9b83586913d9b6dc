"""Starting a warm replay server on a loaded machine: the starter may come late, or lose a race.

A real pool in a real starter process (``python -c`` running ``WarmPool.server_for``), real
servers whose preload blocks on a FIFO the test controls (the ``gate`` module), and SIGSTOP to keep
a starter off the CPU for as long as the test needs: what a busy machine does by chance, here on
purpose. Before the fix, a server with ``--idle 0`` (the tests' keep-warm setting, and the
"stop with the session" one) gave its starter one select timeout after it bound to connect, and a
server whose name another starter's server took exited under its starter: both starters then saw
"the warm replay server exited while it was importing", with nothing in the server's log.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from pathlib import Path
from typing import Any

import pytest

from flordb_build.hindsight._warm import connect, runtime_dir

# Imported by the server as a preload (the starter's script imports it): it announces itself with
# the server's pid, then blocks until the test writes to its FIFO.
GATE = """\
import os

_mark = os.path.join(os.environ["GATE_DIR"], str(os.getpid()))
os.mkfifo(_mark + ".fifo")
with open(_mark + ".tmp", "w") as _fh:
    pass
os.rename(_mark + ".tmp", _mark + ".importing")
with open(_mark + ".fifo") as _fh:
    _fh.read()
"""
# The starter: a replay session's pool asking for the server of its environment.
STARTER = """\
import ctypes
import os
import sys
if sys.argv[2] == "reaper":  # adopt our orphans, the servers, and never wait for them: PID 1 of a
    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PID namespace (PR_SET_CHILD_SUBREAPER)
from flordb_build.config import load_config
from flordb_build.hindsight._warm import WarmPool, server_key

config = load_config()
pool = WarmPool(config, float(sys.argv[1]))
print(server_key(config.root, dict(os.environ)), flush=True)
try:
    server, fresh = pool.server_for(dict(os.environ), "import gate\\n")
except Exception as exc:
    print(f"error {type(exc).__name__}: {exc}", flush=True)
    raise SystemExit(1)
print(f"served {server.pid}", flush=True)
sys.stdin.read()  # hold the server until the test closes our stdin
pool.close()
"""


def _wait_for(condition: Callable[[], bool], seconds: float = 120.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _state(pid: int) -> tuple[str, int] | None:
    """The state letter and parent pid of ``pid`` (None once it is gone, reaped)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1])


def _line(proc: subprocess.Popen[str], seconds: float = 120.0) -> str:
    """The next line ``proc`` prints; "" if none comes within ``seconds`` (generous: a failure)."""
    with ThreadPoolExecutor(1) as pool:  # the reader thread ends at the latest with proc
        line = pool.submit(proc.stdout.readline)  # type: ignore[union-attr]
        try:
            return line.result(timeout=seconds).strip()
        except FuturesTimeout:
            proc.kill()
            return ""


def _serving(sock: Path) -> int:
    """The pid of the server that answers at ``sock`` (0: none)."""
    server = connect(sock)
    if server is None:
        return 0
    server.release()
    return server.pid


def _sleeps(pid: int) -> int:
    """How many times ``pid`` has blocked (its voluntary context switches); -1 once it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("voluntary_ctxt_switches:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


class Gates:
    """The servers blocked in their ``gate`` import, by pid."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def waiting(self) -> set[int]:
        return {int(p.name.split(".")[0]) for p in self.dir.glob("*.importing")}

    def open(self, pid: int) -> None:
        with open(self.dir / f"{pid}.fifo", "w") as fh:
            fh.write("go")


@pytest.fixture
def starters(project: Any, tmp_path: Path) -> Iterator[tuple[Callable[[float], subprocess.Popen[str]], Gates]]:
    lib = tmp_path / "lib"  # installed code, outside the project: the server may preload it
    lib.mkdir()
    (lib / "gate.py").write_text(GATE, encoding="utf-8")
    gates_dir = tmp_path / "gates"
    gates_dir.mkdir()
    (project.root / ".flor").mkdir(exist_ok=True)
    # The starter must import this checkout's flordb_build, wherever the test's own came from.
    pythonpath = os.pathsep.join([str(lib), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "PYTHONPATH": pythonpath, "GATE_DIR": str(gates_dir)}
    procs: list[subprocess.Popen[str]] = []

    def start(keep_warm: float, reaper: bool = False) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", STARTER, str(keep_warm), "reaper" if reaper else "-"], cwd=project.root, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        procs.append(proc)
        return proc

    gates = Gates(gates_dir)
    yield start, gates
    for pid in gates.waiting():
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    for proc in procs:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stdin.close()  # type: ignore[union-attr]


def test_a_server_that_stops_with_its_session_waits_for_a_starter_kept_off_the_cpu(starters: Any) -> None:
    start, gates = starters
    starter = start(0.0)  # keep_warm 0: the server exits as soon as it is idle
    key = starter.stdout.readline().strip()
    assert _wait_for(lambda: len(gates.waiting()) == 1), "the server never reached its preloads"
    (pid,) = gates.waiting()
    os.kill(starter.pid, signal.SIGSTOP)  # the machine keeps the starter off the CPU ...
    gates.open(pid)
    sock = runtime_dir() / f"{key}.sock"
    assert _wait_for(lambda: sock.exists() or not _alive(pid)), "the server neither served nor exited"
    # ... while the server serves and looks whether it is idle: each look ends a blocking wait of
    # its loop (at most a second); a few of them, and a server that would leave has left.
    sleeps = _sleeps(pid)
    assert _wait_for(lambda: not _alive(pid) or _sleeps(pid) >= sleeps + 3)
    assert _alive(pid), "the server exited before its starter could connect"
    os.kill(starter.pid, signal.SIGCONT)
    assert starter.stdout.readline().strip() == f"served {pid}"
    starter.stdin.close()
    assert starter.wait(timeout=120) == 0
    assert _wait_for(lambda: not _alive(pid)), "the server outlived its session (keep_warm 0)"


def test_two_starters_of_one_environment_share_the_server_that_took_the_name(starters: Any) -> None:
    start, gates = starters
    first = start(60.0)
    key = first.stdout.readline().strip()
    assert _wait_for(lambda: len(gates.waiting()) == 1), "the first server never reached its preloads"
    (first_server,) = gates.waiting()
    second = start(60.0)  # no server answers yet: the second starter starts one too
    assert second.stdout.readline().strip() == key  # the same environment: one socket name
    assert _wait_for(lambda: len(gates.waiting()) == 2), "the second server never reached its preloads"
    (second_server,) = gates.waiting() - {first_server}
    sock = runtime_dir() / f"{key}.sock"
    os.kill(first.pid, signal.SIGSTOP)  # the first starter is off the CPU ...
    gates.open(first_server)
    assert _wait_for(lambda: _serving(sock) == first_server), "the first server never served"
    gates.open(second_server)  # ... when the second starter's server takes the name
    assert _wait_for(lambda: _serving(sock) == second_server), "the second server never took the name"
    os.kill(first.pid, signal.SIGCONT)
    assert first.stdout.readline().strip() == f"served {second_server}", "the first starter got no server"
    assert second.stdout.readline().strip() == f"served {second_server}"
    assert _wait_for(lambda: not _alive(first_server)), "the server that lost its name stayed up"
    for proc in (first, second):
        proc.stdin.close()
        assert proc.wait(timeout=120) == 0
    server = connect(sock)
    assert server is not None and server.pid == second_server  # kept warm (60 s) for the next session
    server.stop()



def test_a_starter_that_never_reaps_sees_its_server_exit_and_takes_the_winner(starters: Any) -> None:
    """The race above where the starter's process adopts the orphans it starts and never waits for
    them (a Ray job's driver as PID 1 of its PID namespace, a container's application): the server
    that lost the name stays a zombie, which kill 0 finds, and its starter waited START_TIMEOUT
    (300 s) for a server that was long gone."""
    start, gates = starters
    first = start(60.0, reaper=True)
    key = first.stdout.readline().strip()
    assert _wait_for(lambda: len(gates.waiting()) == 1), "the first server never reached its preloads"
    (first_server,) = gates.waiting()
    second = start(60.0)
    assert second.stdout.readline().strip() == key
    assert _wait_for(lambda: len(gates.waiting()) == 2), "the second server never reached its preloads"
    (second_server,) = gates.waiting() - {first_server}
    os.kill(first.pid, signal.SIGSTOP)
    gates.open(first_server)
    sock = runtime_dir() / f"{key}.sock"
    assert _wait_for(lambda: _serving(sock) == first_server), "the first server never served"
    gates.open(second_server)
    # The first server sees its name taken and exits; its parent is now the first starter, stopped.
    assert _wait_for(lambda: _state(first_server) == ("Z", first.pid)), "the first server is not a zombie of its starter"
    os.kill(first.pid, signal.SIGCONT)
    assert _line(first) == f"served {second_server}", "the first starter waited on its dead server"
    assert second.stdout.readline().strip() == f"served {second_server}"
    assert _wait_for(lambda: _state(first_server) is None), "the starter left its server a zombie"
    for proc in (first, second):
        proc.stdin.close()
        assert proc.wait(timeout=120) == 0
    server = connect(sock)
    assert server is not None and server.pid == second_server
    server.stop()
