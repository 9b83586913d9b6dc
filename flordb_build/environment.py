"""The environment a run executed in: Python, packages, platform, CPU, GPU and selected variables.

Each run points at one ``envs`` row (``runs.env_id``); rows are keyed by the sha256 of their
canonical JSON, so a thousand runs in one virtualenv share one row.

Probing packages (``importlib.metadata``) and the GPU (``nvidia-smi``) costs tens of
milliseconds, too much for every run's start, so the *machine* part is cached in
``.flor/env-cache.json`` under a key that changes whenever it could have changed:

    key = sha256(executable, sys.prefix, host, mtime_ns of every sys.path directory)
          installing/removing a package adds/removes a *.dist-info directory -> the
          site-packages mtime changes -> the key changes -> probe again

The *variable* part (an allow-list of environment variables plus ``FLOR_*``) is read on every
call, because it differs between runs of the same interpreter. Names that look like secrets are
dropped and passwords in URL values masked (redaction.py) before anything is hashed or written, and
the full environment is never stored.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .redaction import is_secret_name, mask_url_secrets

if TYPE_CHECKING:
    from .config import Config
    from .store import Store

ENV_FORMAT = 1
CACHE_NAME = "env-cache.json"
NVIDIA_SMI_TIMEOUT_S = 10.0

#: Variables that change what a pipeline computes or where it runs. Their *names* are fixed
#: here; ``[tool.flordb_build] env_vars = [...]`` adds more.
ALLOWED_ENV_VARS = frozenset(
    {
        "CUDA_VISIBLE_DEVICES",
        "CUDA_DEVICE_ORDER",
        "CUBLAS_WORKSPACE_CONFIG",
        "NVIDIA_VISIBLE_DEVICES",
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "NUMEXPR_NUM_THREADS",
        "PYTHONHASHSEED",
        "PYTHONPATH",
        "PYTHONOPTIMIZE",
        "VIRTUAL_ENV",
        "CONDA_DEFAULT_ENV",
        "CONDA_PREFIX",
        "LANG",
        "LC_ALL",
        "TZ",
        "SLURM_JOB_ID",
        "SLURM_JOB_NAME",
        "TOKENIZERS_PARALLELISM",
        "HF_HOME",
        "TORCH_HOME",
    }
)
ALLOWED_PREFIXES = ("FLOR_",)
#: Per-invocation identifiers already stored in ``runs.task``/``runs.pipeline_id``; keeping them
#: out of the environment lets every task of every pipeline share one ``envs`` row.
PER_RUN_VARS = frozenset({"FLOR_TASK", "FLOR_PIPELINE_ID", "FLOR_MAKE_PIPELINE_ID"})


def select_env_vars(environ: Mapping[str, str], extra_names: Iterable[str] = ()) -> dict[str, str]:
    """The allow-listed variables of ``environ`` (plus ``FLOR_*`` and ``extra_names``): secret-named ones
    dropped, whatever list they are on, and URL passwords in the values masked."""
    allowed = ALLOWED_ENV_VARS | frozenset(extra_names)
    selected = {}
    for name, value in environ.items():
        if name in PER_RUN_VARS or is_secret_name(name):
            continue
        if name in allowed or name.startswith(ALLOWED_PREFIXES):
            selected[name] = mask_url_secrets(value)
    return dict(sorted(selected.items()))


def installed_packages() -> dict[str, str]:
    """``{distribution name (normalized): version}`` of every package importable here."""
    import importlib.metadata

    packages: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"] if dist.metadata else None
        if name:
            # The first distribution on sys.path wins, as it does for imports.
            packages.setdefault(re.sub(r"[-_.]+", "-", name).lower(), dist.version)
    return dict(sorted(packages.items()))


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux, else what ``platform`` knows)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_info() -> dict[str, Any] | None:
    """GPU models, driver and CUDA version from ``nvidia-smi`` when it is on PATH, else None."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        query = subprocess.run(
            [exe, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=NVIDIA_SMI_TIMEOUT_S,
            check=False,
        )
        banner = subprocess.run([exe], capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": f"nvidia-smi failed: {exc}"}
    if query.returncode != 0:
        return {"error": (query.stderr or query.stdout).strip()[:500]}
    devices = []
    for line in query.stdout.strip().splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) >= 3:
            devices.append({"name": parts[0], "driver": parts[1], "memory": parts[2]})
    cuda = re.search(r"CUDA Version:\s*([0-9.]+)", banner.stdout)
    return {
        "devices": devices,
        "count": len(devices),
        "driver": devices[0]["driver"] if devices else None,
        "cuda": cuda.group(1) if cuda else None,
    }


def machine_facts() -> dict[str, Any]:
    """The slow-to-probe, rarely-changing part of the environment (cached by :func:`cache_key`)."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count() or 0
    return {
        "packages": installed_packages(),
        "cpu": {"model": cpu_model(), "count": os.cpu_count(), "usable": affinity},
        "gpu": gpu_info(),
        "platform": {
            "system": platform.system(),
            "release": platform.release(),
            "machine": platform.machine(),
            "platform": platform.platform(),
            "libc": " ".join(platform.libc_ver()).strip() or None,
        },
    }


def cache_key() -> str:
    """A hash that changes when the interpreter, host or any ``sys.path`` directory changes."""
    parts = [ENV_FORMAT, sys.executable, sys.prefix, socket.gethostname(), shutil.which("nvidia-smi")]
    for entry in sys.path:
        try:
            parts.append((entry, os.stat(entry or ".").st_mtime_ns))
        except OSError:
            parts.append((entry, None))
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


def cached_machine_facts(cache_path: Path | None) -> dict[str, Any]:
    """:func:`machine_facts`, read from ``cache_path`` when its key still matches."""
    key = cache_key()
    if cache_path is not None:
        try:
            cached = json.loads(cache_path.read_text(encoding="utf-8"))
            if cached.get("key") == key:
                facts: dict[str, Any] = cached["facts"]
                return facts
        except (OSError, ValueError, KeyError, AttributeError):
            pass  # missing or damaged cache: probe again and rewrite it
    facts = machine_facts()
    if cache_path is not None:
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_path.with_name(f"{cache_path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"key": key, "facts": facts}), encoding="utf-8")
            os.replace(tmp, cache_path)  # atomic: parallel tasks never read half a file
        except OSError:
            pass  # a read-only project still records; it just probes every time
    return facts


def describe_environment(
    environ: Mapping[str, str] | None = None,
    extra_env_vars: Iterable[str] = (),
    cache_path: Path | None = None,
) -> dict[str, Any]:
    """The environment of this process as a JSON-able dict (no secrets, no full env dump)."""
    return {
        "format": ENV_FORMAT,
        "python": {
            "version": platform.python_version(),
            "implementation": platform.python_implementation(),
            "executable": sys.executable,
            "prefix": sys.prefix,
        },
        **cached_machine_facts(cache_path),
        "env_vars": select_env_vars(os.environ if environ is None else environ, extra_env_vars),
    }


def env_id_of(env: Mapping[str, Any]) -> tuple[str, str]:
    """``(env_id, canonical JSON)``: the id is the sha256 of the JSON with sorted keys."""
    text = json.dumps(env, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32], text


def extra_env_var_names(config: Config) -> list[str]:
    """``[tool.flordb_build] env_vars``: more variable names to record (secret-looking ones still dropped)."""
    return list(config.env_vars)


def record_environment(store: Store, environ: Mapping[str, str] | None = None) -> tuple[str, str]:
    """Describe this process's environment, store it once per content; return ``(env_id, JSON)``."""
    config = store.config
    env = describe_environment(environ, extra_env_var_names(config), config.flor_dir / CACHE_NAME)
    env_id, text = env_id_of(env)
    if store.conn.execute("SELECT 1 FROM envs WHERE env_id = ?", (env_id,)).fetchone():
        return env_id, text  # the common case; skips taking the write lock that parallel tasks share
    from .store import write_transaction

    with write_transaction(store.conn):
        store.conn.execute(
            "INSERT OR IGNORE INTO envs (env_id, env, created) VALUES (?, ?, ?)", (env_id, text, time.time())
        )
    return env_id, text


def load_environment(store: Store, env_id: str) -> dict[str, Any] | None:
    """The stored environment ``env_id`` as a dict, or None when there is no such row."""
    row = store.conn.execute("SELECT env FROM envs WHERE env_id = ?", (env_id,)).fetchone()
    if row is None:
        return None
    env: dict[str, Any] = json.loads(row[0])
    return env
