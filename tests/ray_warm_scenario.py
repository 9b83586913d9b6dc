"""Warm starts on the Ray backend, run by tests/test_replay_ray_warm.py inside a namespace.

    python -m tests.ray_warm_scenario OUT.json      (working directory: a recorded project)

Replays every run of the project through ``make_executor(..., "ray")`` (a local Ray of two
worker slots started here), lists the warm replay servers while the executor is still open,
closes it (``ray.shutdown()``), then waits for the servers to be gone. It runs in a loopback-only
network and PID namespace (``unshare --net --pid --mount-proc``), so the /proc scan sees exactly
the processes of this Ray session. Every wait waits on a condition, with a deadline.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from tests.ray_scenario import wait_until

SERVER_SCRIPT = "_warm_server.py"
SERVERS_GONE_TIMEOUT = 120.0


def warm_server_pids() -> list[int]:
    """Live processes running the warm replay server script (whatever their parent)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and any(arg.endswith(SERVER_SCRIPT.encode()) for arg in argv):
            pids.append(int(entry))
    return pids


def main(out: Path) -> int:
    from flordb_build.config import load_config
    from flordb_build.hindsight import prepare_replay, run_replay
    from flordb_build.hindsight._execute import make_executor

    config = load_config()
    plan = prepare_replay(["x"], workers=2, config=config)
    executor = make_executor(config, 2, None, "ray", None)
    result: dict[str, Any] = {}
    try:
        report = run_replay(plan, executor, config=config)
        result["outcomes"] = [
            {"run_id": o.run_id, "ok": o.ok, "warm": o.warm, "notes": list(o.notes)} for o in report.outcomes
        ]
        result["servers_before_close"] = warm_server_pids()
        runtime = Path(os.environ["XDG_RUNTIME_DIR"]) / "flordb-build"
        result["sockets"] = sorted(str(p.relative_to(runtime)) for p in runtime.glob("**/*.sock"))
    finally:
        executor.close()  # the local Ray it started: ray.shutdown()
    result["servers_gone_s"] = wait_until(lambda: not warm_server_pids(), SERVERS_GONE_TIMEOUT, poll=0.2)
    result["servers_left"] = warm_server_pids()
    out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
