"""Faults of REAL replays on a real 4-node Ray cluster, run by tests/test_replay_ray_faults.py.

Run inside a loopback-only network and PID namespace (the test starts it under ``unshare``), so a
/proc scan sees every process of every node:

    python -m tests.ray_replay_scenario PROJECT RUNS.json OUT.json

PROJECT holds recorded runs of tests/test_replay_ray_faults.py's script, today's version logging
``x``; RUNS.json maps each run id to its seed. One cluster (the slow part) serves every phase, in
this order (the node loss last: it leaves 3 nodes)::

    sigint      seeds 0, 1 finish, the others wait at their gate; SIGINT to the driver
    sigint_cold the same with ``--cold`` (each child a fresh interpreter, its Ray worker's child)
    sigkill     every seed waits at its gate; SIGKILL to the driver
    minus_nine  seed 3 waits at its gate and its replay child is killed with -9
    node_loss   every seed waits at its gate; the node running one of them is removed, the gates
                open: the replay completes (a re-run after the faults above)
    gpu_auto    ``replay visible --where 'seed >= 3'`` (``--device auto``): seeds 3-5 wait at their gate
                until the 2 nodes that declare a GPU run one each; none of them sees a GPU
    gpu         ``replay gpu --device cuda``: every job on a node that declares a GPU

Each phase runs ``flordb-build replay x --executor ray --address <cluster>`` as a user would,
and reports what it saw; the test asserts. Every wait waits on a condition, with a deadline.

Replays start warm (the default) but in sigint_cold: each Ray worker's pool forks a job's child
from a warm server (``_warm_server.py``, started by a worker, owned by it, one per environment
and shared by the workers of every node here: the nodes share this machine's runtime directory).
A warm child is then its server's fork, not its worker's child: its argv and /proc environ are
the server's, its seed is in the replay spec of the process its script started, and its node is
that of the worker that holds the job's output file open.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flordb_build.values import decode_value
from tests.ray_scenario import node_args, wait_until
from tests.storedb import connect_store

#: Every replay process (the ``_child`` and what the script started) has the replay spec here,
#: but a warm child: it is a fork of its server (whose argv and /proc environ it keeps).
REPLAY_ENV = b"FLOR_REPLAY="
CHILD_MODULE = b"flordb_build.hindsight._child"
#: The argv word of a warm replay server (``_warm.WarmPool``) and of every child it forks.
WARM_SERVER = "_warm_server.py"
#: The argv word of the process the recorded script starts (it must die with the replay child).
GRANDCHILD_MARKER = "flordb-fault-grandchild"
GONE_WITHIN_SECONDS = 5.0
#: The runs the gpu_auto phase replays (one per node the node loss leaves).
AUTO_SEEDS = [3, 4, 5]
#: run id -> seed (set by :func:`run`): a warm child's seed is read from its replay spec.
SEEDS: dict[str, int] = {}


def _read(pid: str | int, name: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:
        return b""


def _state_and_ppid(pid: str | int) -> tuple[str, int]:
    fields = _read(pid, "stat").rsplit(b")", 1)[-1].split()
    return (fields[0].decode(), int(fields[1])) if len(fields) > 1 else ("?", 0)


def _live() -> dict[int, tuple[list[str], int]]:
    """Every live process: pid -> (argv, parent pid)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        state, ppid = _state_and_ppid(entry)
        if state in ("Z", "X", "?"):
            continue
        found[int(entry)] = ([word.decode(errors="replace") for word in _read(entry, "cmdline").split(b"\0") if word],
                             ppid)
    return found


def _is_server_like(argv: list[str]) -> bool:
    return any(word.endswith(WARM_SERVER) for word in argv)


def warm_servers(live: dict[int, tuple[list[str], int]] | None = None) -> dict[int, list[str]]:
    """The warm replay servers alive: pid -> argv (not their forks, whose parent is a server)."""
    live = _live() if live is None else live
    return {pid: argv for pid, (argv, ppid) in live.items()
            if _is_server_like(argv) and not _is_server_like(live.get(ppid, ([], 0))[0])}


def warm_children(live: dict[int, tuple[list[str], int]] | None = None) -> set[int]:
    """The replay processes the warm servers forked (each a job's child)."""
    live = _live() if live is None else live
    servers = warm_servers(live)
    return {pid for pid, (_argv, ppid) in live.items() if ppid in servers}


def replay_processes() -> dict[int, list[str]]:
    """Live processes of replays: pid -> argv (the children, cold or warm, and every process they started)."""
    live = _live()
    forks = warm_children(live)
    return {pid: argv for pid, (argv, _ppid) in live.items()
            if pid in forks or GRANDCHILD_MARKER in argv or REPLAY_ENV in _read(pid, "environ")}


def _seed_of_spec(environ: bytes) -> int | None:
    """The seed of the run whose replay spec this environment holds (None: none there)."""
    for item in environ.split(b"\0"):
        if item.startswith(REPLAY_ENV):
            try:
                return SEEDS.get(json.loads(item[len(REPLAY_ENV):])["run_id"], -1)
            except (ValueError, KeyError, TypeError):
                return -1
    return None


def replay_children() -> dict[int, int]:
    """The replay children alive, cold (``python -m ..._child``) and warm (a server's fork): pid -> seed.

    Not a cold child's guard (``_child.end_with_parent``): forked, it has the same argv, and a child
    as parent. A warm child's argv and /proc environ are its server's: its seed is in the replay spec
    of the process the gated script started (-1 while it has started none).
    """
    live = _live()
    cold = {pid for pid, (argv, _ppid) in live.items() if CHILD_MODULE.decode() in argv}
    children = {}
    for pid in cold:
        if live[pid][1] not in cold:
            seeds = [word.split("=", 1)[1] for word in live[pid][0] if word.startswith("seed=")]
            children[pid] = int(seeds[0]) if seeds else -1
    for pid in warm_children(live):
        found = [_seed_of_spec(_read(kid, "environ")) for kid, (_argv, ppid) in live.items() if ppid == pid]
        children[pid] = next((seed for seed in found if seed is not None), -1)
    return children


def grandchildren() -> list[int]:
    return [pid for pid, argv in replay_processes().items() if GRANDCHILD_MARKER in argv]


def _opened(pid: int) -> set[str]:
    """The paths of the files ``pid`` has open."""
    paths = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return paths
    for fd in fds:
        try:
            paths.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return paths


def job_worker(child: int) -> int:
    """The Ray worker whose job ``child`` replays: a cold child's parent; for a warm child (its
    server's fork, on whichever node's worker started that server) the worker that holds the job's
    output file open, which the child writes as its stdout (0: none found)."""
    live = _live()
    if child not in warm_children(live):
        return live.get(child, ([], 0))[1]
    try:
        log = os.readlink(f"/proc/{child}/fd/1")
    except OSError:
        return 0
    replay = set(replay_processes())
    holders = [pid for pid, (argv, _ppid) in live.items()
               if pid not in replay and not _is_server_like(argv) and log in _opened(pid)]
    return holders[0] if len(holders) == 1 else 0


def on_nodes(raylets: set[int]) -> dict[int, int]:
    """The replay children (pid -> seed) whose jobs run on the nodes of these raylets."""
    return {pid: seed for pid, seed in replay_children().items()
            if raylets & set(ancestors(job_worker(pid)) + [job_worker(pid)])}


def ancestors(pid: int) -> list[int]:
    chain = []
    while pid > 1 and len(chain) < 32:
        _state, pid = _state_and_ppid(str(pid))
        chain.append(pid)
    return chain


def stored_x(project: Path, seeds: dict[str, int], name: str = "x") -> dict[int, list[Any]]:
    """seed -> every value of ``name`` in the store's logs (the values readers see), in seq order."""
    conn = connect_store(project / ".flor" / "flor.db", timeout=30)
    try:
        rows = conn.execute("SELECT run_id, value, kind FROM logs WHERE name = ? ORDER BY run_id, seq",
                            (name,)).fetchall()
        staged = conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'replay_staged_logs'").fetchone()[0]
        staged_rows = conn.execute("SELECT count(*) FROM replay_staged_logs").fetchone()[0] if staged else 0
    finally:
        conn.close()
    found: dict[int, list[Any]] = {}
    for run_id, value, kind in rows:
        found.setdefault(seeds[run_id], []).append(decode_value(value, kind))
    found[-1] = [staged_rows]  # not a seed: the rows left in the staging tables
    return found


class Phase:
    """One ``flordb-build replay x`` against the cluster, with its gates."""

    def __init__(self, project: Path, address: str, gates: Path, name: str, gated: list[int],
                 replay: tuple[str, ...] = ("x",), cold: bool = False) -> None:
        self.gate = gates / f"gate-{name}"
        env = {**os.environ, "FLOR_TEST_GATE": str(self.gate), "FLOR_TEST_GATED": ",".join(map(str, gated))}
        argv = [sys.executable, "-m", "flordb_build", "replay", *replay, "--yes", "--executor", "ray",
                "--address", address, "--workers", "4", *(("--cold",) if cold else ())]
        self.started = time.monotonic()
        self.driver = subprocess.Popen(argv, cwd=project, env=env, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def open_gate(self) -> None:
        self.gate.touch()

    def wait_for(self, condition: Callable[[], bool], timeout: float = 120) -> float | None:
        """Seconds until ``condition`` held while the driver still ran; None when it did not."""
        wait_until(lambda: self.driver.poll() is not None or condition(), timeout)
        if self.driver.poll() is not None or not condition():
            return None
        return time.monotonic() - self.started

    def signal_and_watch(self, signum: int) -> dict[str, Any]:
        """Send ``signum`` to the driver: how soon every replay process was gone, what was left."""
        before = replay_processes()
        signalled = time.monotonic()
        self.driver.send_signal(signum)
        gone = wait_until(lambda: not replay_processes(), GONE_WITHIN_SECONDS)
        left = replay_processes()
        out, err = self.driver.communicate(timeout=120)
        return {"before": len(before), "before_grandchildren": sum(GRANDCHILD_MARKER in a for a in before.values()),
                "gone_s": gone, "left_after_5s": {str(k): v for k, v in left.items()},
                "signalled_after_s": signalled - self.started,
                "driver_exit": self.driver.returncode, "stdout": out[-3000:], "stderr": err[-3000:]}

    def finish(self, timeout: float = 240) -> dict[str, Any]:
        out, err = self.driver.communicate(timeout=timeout)
        return {"driver_exit": self.driver.returncode, "stdout": out[-4000:], "stderr": err[-3000:],
                "seconds": time.monotonic() - self.started}


def phase_interrupted(project: Path, address: str, gates: Path, seeds: dict[str, int], signum: int,
                      name: str, gated: list[int], cold: bool = False) -> dict[str, Any]:
    """Replay with ``gated`` seeds held at their gate; ``signum`` once 4 replay children run (and the
    ungated runs are in the store)."""
    phase = Phase(project, address, gates, name, gated, cold=cold)
    finished = [seed for seed in seeds.values() if seed not in gated]

    def ready() -> bool:
        stored = stored_x(project, seeds)
        return (len(replay_children()) >= 4 and len(grandchildren()) >= 4
                and all(len(stored.get(seed, [])) == 1 for seed in finished))

    ready_after = phase.wait_for(ready)
    result = {"ready_after_s": ready_after, "children_at_signal": sorted(replay_children().values()),
              "warm_at_signal": len(warm_children())}
    if ready_after is None:
        phase.driver.kill()
        return {**result, **phase.finish(), "error": "the replay never reached the point to interrupt it at"}
    result.update(phase.signal_and_watch(signum))
    # Past the 5 s (for the report, and so that the next phase starts clean): how long they lived.
    result["lived_s"] = wait_until(lambda: not replay_processes(), 30)
    # The warm servers end with the Ray workers that own them (the driver's end ends its workers).
    result["servers_gone_s"] = wait_until(lambda: not warm_servers(), 60)
    result["servers_left"] = {str(k): v for k, v in warm_servers().items()}
    phase.open_gate()
    result["stored_after"] = stored_x(project, seeds)
    return result


def phase_minus_nine(project: Path, address: str, gates: Path, seeds: dict[str, int]) -> dict[str, Any]:
    """Seed 3 waits at its gate; its replay child is SIGKILLed; the others run to the end."""
    phase = Phase(project, address, gates, "minus-nine", [3])
    ready_after = phase.wait_for(lambda: 3 in replay_children().values() and len(grandchildren()) >= 1)
    result: dict[str, Any] = {"ready_after_s": ready_after}
    if ready_after is None:
        phase.driver.kill()
        return {**result, **phase.finish(), "error": "seed 3's replay child never ran"}
    victim = next(pid for pid, seed in replay_children().items() if seed == 3)
    result["victim_warm"] = victim in warm_children()
    os.kill(victim, signal.SIGKILL)
    result.update(phase.finish())
    # What the killed child had started dies with its job, not only when the gate opens.
    result["grandchildren_gone_s"] = wait_until(lambda: not grandchildren(), GONE_WITHIN_SECONDS)
    phase.open_gate()
    result["stored_after"] = stored_x(project, seeds)
    return result


def phase_node_loss(project: Path, address: str, gates: Path, seeds: dict[str, int], cluster: Any,
                    victim: Any) -> dict[str, Any]:
    """Every seed waits at its gate; once the victim node runs one, it is removed and the gates open."""
    raylet = victim.all_processes["raylet"][0].process.pid
    phase = Phase(project, address, gates, "node-loss", sorted(seeds.values()))

    def on_victim() -> dict[int, int]:
        return on_nodes({raylet})

    ready_after = phase.wait_for(lambda: len(replay_children()) >= 4 and bool(on_victim()))
    doomed = on_victim()
    result: dict[str, Any] = {"ready_after_s": ready_after, "seeds_on_victim": sorted(doomed.values()),
                              "children_at_removal": len(replay_children()),
                              "warm_at_removal": len(warm_children())}
    if ready_after is None:
        phase.driver.kill()
        return {**result, **phase.finish(), "error": "the victim node never ran a replay job"}
    cluster.remove_node(victim, allow_graceful=False)
    # The replay children of the dead node die with it (their worker is gone) ...
    result["victim_children_gone_s"] = wait_until(
        lambda: not set(doomed) & set(replay_children()), GONE_WITHIN_SECONDS)
    phase.open_gate()  # ... and their runs, retried on the other nodes, pass the gate there
    result.update(phase.finish())
    result["stored_after"] = stored_x(project, seeds)
    result["left_after"] = len(replay_processes())
    return result


def phase_gpu_auto(project: Path, address: str, gates: Path, seeds: dict[str, int],
                   gpu_nodes: list[Any]) -> dict[str, Any]:
    """``--device auto``: jobs that ask Ray for no GPU, held until the nodes that declare one run
    some; the ``CUDA_VISIBLE_DEVICES`` each saw (today's script logs it as ``visible``)."""
    raylets = {node.all_processes["raylet"][0].process.pid for node in gpu_nodes}
    # Three runs, one per node left: one wave, and both nodes that declare a GPU run one.
    phase = Phase(project, address, gates, "gpu-auto", AUTO_SEEDS,
                  replay=("visible", "--where", f"seed >= {min(AUTO_SEEDS)}"))

    def on_gpu_nodes() -> list[int]:
        return sorted(on_nodes(raylets).values())

    ready_after = phase.wait_for(lambda: len(on_gpu_nodes()) >= len(gpu_nodes))
    result: dict[str, Any] = {"ready_after_s": ready_after, "seeds_on_gpu_nodes": on_gpu_nodes()}
    phase.open_gate()
    if ready_after is None:
        phase.driver.kill()
        return {**result, **phase.finish(), "error": "no --device auto job ran on a node that declares a GPU"}
    result.update(phase.finish())
    result["stored_after"] = stored_x(project, seeds, "visible")
    return result


def phase_gpu(project: Path, address: str, gates: Path, seeds: dict[str, int]) -> dict[str, Any]:
    """``--device cuda``: each job asks for a GPU, so it runs on a node that declares one and sees
    it in ``CUDA_VISIBLE_DEVICES`` (which today's script logs as ``gpu``); no real GPU is needed."""
    phase = Phase(project, address, gates, "gpu", [], replay=("gpu", "--device", "cuda"))
    result = phase.finish()
    result["stored_after"] = stored_x(project, seeds, "gpu")
    return result


def run(project: Path, runs_file: Path, out: Path) -> int:
    from ray.cluster_utils import Cluster

    # A background job's children start with SIGINT ignored (tests/conftest.py): the driver must hear it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    seeds: dict[str, int] = json.loads(runs_file.read_text())
    SEEDS.update(seeds)
    temp_dir = tempfile.mkdtemp(prefix="frf-", dir="/tmp")  # short: Ray's socket paths have a limit
    gates = Path(tempfile.mkdtemp(prefix="frf-gates-", dir="/tmp"))
    result: dict[str, Any] = {"seeds": seeds}
    started = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args=node_args(temp_dir))
    try:
        workers = [cluster.add_node(wait=False, **node_args(temp_dir, num_gpus=1 if i < 2 else 0)) for i in range(3)]
        cluster.wait_for_nodes()
        result["cluster_start_s"] = time.monotonic() - started
        address = cluster.address
        timed: dict[str, float] = {}
        for name, phase in (
            ("sigint", lambda: phase_interrupted(project, address, gates, seeds, signal.SIGINT, "sigint",
                                                 [s for s in seeds.values() if s >= 2])),
            # The same with cold starts (``--cold``): the children Ray's forced cancel kills itself.
            ("sigint_cold", lambda: phase_interrupted(project, address, gates, seeds, signal.SIGINT, "sigint-cold",
                                                      [s for s in seeds.values() if s >= 2], cold=True)),
            ("sigkill", lambda: phase_interrupted(project, address, gates, seeds, signal.SIGKILL, "sigkill",
                                                  sorted(seeds.values()))),
            ("minus_nine", lambda: phase_minus_nine(project, address, gates, seeds)),
            ("node_loss", lambda: phase_node_loss(project, address, gates, seeds, cluster, workers[2])),
            ("gpu_auto", lambda: phase_gpu_auto(project, address, gates, seeds, workers[:2])),
            ("gpu", lambda: phase_gpu(project, address, gates, seeds)),
        ):
            began = time.monotonic()
            result[name] = phase()
            timed[name] = time.monotonic() - began
        result["seconds"] = timed
    finally:
        for gate in ("sigint", "sigint-cold", "sigkill", "minus-nine", "node-loss", "gpu-auto"):
            (gates / f"gate-{gate}").touch()  # nothing left waits at a gate
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        shutil.rmtree(gates, ignore_errors=True)
        out.write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(run(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])))
