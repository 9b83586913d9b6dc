"""What starting a replay process costs beyond a run's recorded timings, learned from earlier replays.

A recorded run's timings cover its process from interpreter start to the close of the run. A
replay adds what happens outside that span (exporting the snapshot, starting or forking the
process, interpreter teardown, reading the result) and, when it is forked from a warm server,
skips the imports that the recorded prefix paid. Neither can be read from the record, so each
replay measures them and the next plan uses the learned figures (``.flor/replay_costs.json``,
per script; losing the file only makes estimates coarser)::

    {"train.py": {"saving": 3.1, "overhead_warm": 0.02, "overhead_cold": 0.21, "journal": 0.05,
                  "server": 2.4, "prepare": 0.03}}

``saving``: recorded prefix minus the prefix of a fully warm replay (no import left to do).
``warm_prefix``: the prefix seconds of that fully warm replay (what a warm estimate's prefix takes).
``overhead_*``: a job's wall time minus its process's own lifetime, warm or cold. A warm job's
waits for its server (one another job was starting, the preloads it imported before the fork:
``JobReply.waited``) are left out: the plan models them apart, and a fork does not pay them.
``journal``: staging a run's replayed rows and committing its replay journal once its processes are done.
``server``: what the job that started the script's warm server took beyond its estimate as a fork
(the server's interpreter and preload imports, and the imports its first children did that it lacked).
``prepare``: the driver's seconds to prepare one run's jobs (snapshot archive, store slice).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping
from pathlib import Path

from ..config import Config
from ._model import StartCosts

FILE_NAME = "replay_costs.json"
_lock = threading.Lock()


def costs_path(config: Config) -> Path:
    """Where the learned figures live: beside the store's journals."""
    return config.flor_dir / FILE_NAME


def read_costs(config: Config) -> dict[str, dict[str, float]]:
    """The learned figures per script (empty when none were learned or the file is unreadable)."""
    try:
        data = json.loads(costs_path(config).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {
        str(script): {str(k): float(v) for k, v in figures.items() if isinstance(v, int | float)}
        for script, figures in data.items()
        if isinstance(figures, dict)
    }


def record_costs(config: Config, script: str, figures: Mapping[str, float]) -> None:
    """Learn ``script``'s ``figures``: each the mean of the one learned before and the new one (one
    replay's measure on a loaded machine is noisy; the mean follows a real change within a few
    replays). Atomic: a reader sees the old file or the new one."""
    if not figures:
        return
    with _lock:
        data = read_costs(config)
        known = data.setdefault(script, {})
        for key, value in figures.items():
            value = max(value, 0.0)
            known[key] = round((known[key] + value) / 2 if key in known else value, 4)
        path = costs_path(config)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{FILE_NAME}.{os.getpid()}.{threading.get_ident()}")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)


def start_costs(config: Config, warm: bool, live: frozenset[str]) -> StartCosts:
    """The planner's view: learned figures, whether warm starts are on, which scripts have a live server."""
    learned = read_costs(config)
    return StartCosts(
        warm=warm,
        live=live,
        saving={script: f["saving"] for script, f in learned.items() if "saving" in f},
        overhead={
            (script, is_warm): f[key]
            for script, f in learned.items()
            for is_warm, key in ((True, "overhead_warm"), (False, "overhead_cold"))
            if key in f
        },
        journal={script: f["journal"] for script, f in learned.items() if "journal" in f},
        warm_prefix={script: f["warm_prefix"] for script, f in learned.items() if "warm_prefix" in f},
        server={script: f["server"] for script, f in learned.items() if "server" in f},
        prepare={script: f["prepare"] for script, f in learned.items() if "prepare" in f},
    )
