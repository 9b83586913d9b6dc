"""Where a project's store lives and how it is tuned: ``[tool.flordb_build]`` -> :class:`Config`.

Resolution order for the database path: ``FLORDB_BUILD_DB`` in the environment, then ``db`` in
``[tool.flordb_build]`` of the project's pyproject.toml (relative to the project root), then
``<root>/.flor/flor.db``. The project root is the enclosing git work tree, else the current
directory.

Every key of ``[tool.flordb_build]`` is parsed here, once, into a typed field of the frozen
:class:`Config` (:data:`SETTINGS` lists them with their defaults); a key that is not one of them
is an error naming the closest known key, so a misspelling is never silently ignored.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .errors import ConfigError

FLOR_DIR_NAME = ".flor"
DB_ENV_VAR = "FLORDB_BUILD_DB"
DEFAULT_FLUSH_SECONDS = 0.5


DEFAULT_CHECKPOINT_EPSILON = 0.0667
#: Untracked files larger than this stay out of snapshots unless ``snapshot_include`` names them.
DEFAULT_SNAPSHOT_MAX_FILE_BYTES = 5 * 1024 * 1024
DEFAULT_REPLAY_KEEP_WARM = 600.0
#: How long a writer waits for another's lock before it retries (store.py; a recording run loses nothing).
DEFAULT_BUSY_TIMEOUT_SECONDS = 60.0
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclass(frozen=True)
class Config:
    """Everything a process needs to know to record into, or read from, one project's store.

    The fields after ``projid`` are the keys of ``[tool.flordb_build]`` of the same name, parsed
    (see :data:`SETTINGS`); ``db`` sets ``db_path``.
    """

    root: Path
    in_git: bool
    db_path: Path
    projid: str
    flush_seconds: float = DEFAULT_FLUSH_SECONDS
    #: Seconds a writer waits for another's lock, in (0, 3600].
    busy_timeout_seconds: float = DEFAULT_BUSY_TIMEOUT_SECONDS
    #: The tolerated fraction of training time spent checkpointing, in (0, 1].
    checkpoint_epsilon: float = DEFAULT_CHECKPOINT_EPSILON
    #: Checkpoint every Nth outermost-loop iteration whatever the timing (None: adaptive, eq. 4.4).
    checkpoint_every: int | None = None
    #: Checkpoint bytes ``flordb-build gc`` keeps per run / per project (None: no budget).
    checkpoint_budget_per_run: int | None = None
    checkpoint_budget_per_project: int | None = None
    #: More environment variable names to record with each run's environment.
    env_vars: tuple[str, ...] = ()
    #: Untracked path patterns kept out of snapshots (beyond the deny list) / let in despite it.
    snapshot_exclude: tuple[str, ...] = ()
    snapshot_include: tuple[str, ...] = ()
    snapshot_max_file_bytes: int = DEFAULT_SNAPSHOT_MAX_FILE_BYTES
    #: Project paths (relative to the root) linked into replay directories.
    replay_links: tuple[str, ...] = ()
    replay_warm: bool = True
    replay_keep_warm: float = DEFAULT_REPLAY_KEEP_WARM
    #: Where replay jobs run: "local" (a process pool) or "ray" (hindsight/_ray.py, ``flordb_build[ray]``).
    replay_executor: str = "local"
    #: The Ray cluster ``replay_executor = "ray"`` submits to (as ``ray.init`` takes it); None: a local Ray.
    ray_address: str | None = None
    #: A DVC-style params file (relative to the root) that ``flor.arg`` reads defaults from (args.py).
    params: str | None = None
    #: Team stores (``[tool.flordb_build.remotes.NAME]``) that ``flordb-build push`` writes to, by name.
    remotes: Mapping[str, Remote] = field(default_factory=lambda: MappingProxyType({}))
    #: An fsspec URL (``s3://bucket/prefix``, ``file:///path``) holding the objects; ``.flor/objects``
    #: becomes its local cache (objects.py, remote_objects.py). None: objects stay local.
    objects: str | None = None

    @property
    def flor_dir(self) -> Path:
        """``<root>/.flor``: journals, locks and the object store live here."""
        return self.root / FLOR_DIR_NAME

    @property
    def runs_dir(self) -> Path:
        """Per-run journals (``<run_id>.jsonl``) that the snapshot commits carry."""
        return self.flor_dir / "runs"


@dataclass(frozen=True)
class Remote:
    """A team store: a PostgreSQL ``url`` without a password, and the libpq options passed beside it
    (``sslmode``, ``sslrootcert``, ...). Passwords come from ``PGPASSWORD``, ``~/.pgpass`` or a
    service file only, so none is ever in the project (team/_connect.py)."""

    name: str
    url: str
    options: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


#: libpq connection options a remote may set beside ``url`` (TLS, timeouts, a service file entry).
REMOTE_OPTIONS = frozenset({
    "sslmode", "sslrootcert", "sslcert", "sslkey", "sslcrl", "sslcompression", "sslsni", "service",
    "connect_timeout", "application_name", "target_session_attrs", "options",
})


def _remotes(key: str, value: Any) -> Mapping[str, Remote]:
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise ConfigError(f"'{key}' in [tool.flordb_build] must hold tables: [tool.flordb_build.remotes.NAME].")
    remotes: dict[str, Remote] = {}
    for name, table in value.items():
        where = f"[tool.flordb_build.remotes.{name}]"
        url = table.get("url")
        if not isinstance(url, str) or not url.startswith(("postgresql://", "postgres://")):
            raise ConfigError(f"{where} needs url = \"postgresql://host:port/database\".")
        if "password" in table or _url_password(url) is not None:
            raise ConfigError(
                f"{where} holds a password, and a password in the project would land in every clone and "
                "snapshot. Remove it; give it through PGPASSWORD, ~/.pgpass or a service file (PGSERVICEFILE)."
            )
        unknown = sorted(set(table) - REMOTE_OPTIONS - {"url"})
        if unknown:
            raise ConfigError(f"Unknown key '{unknown[0]}' in {where}; the known keys are url, {', '.join(sorted(REMOTE_OPTIONS))}.")
        remotes[name] = Remote(name, url, MappingProxyType({k: str(v) for k, v in table.items() if k != "url"}))
    return MappingProxyType(remotes)


def _url_password(url: str) -> str | None:
    """The password a connection url carries, in its authority (``user:pw@``) or its query (``password=``)."""
    from urllib.parse import parse_qs, urlsplit

    parts = urlsplit(url)
    if parts.password is not None:
        return parts.password
    found = parse_qs(parts.query).get("password")
    return found[0] if found else None


def find_project_root(start: Path) -> tuple[Path, bool]:
    """Return the git work tree enclosing ``start`` (and True), else ``start`` itself (and False).

    Walks up looking for ``.git`` (a directory, or a file in linked worktrees) instead of running
    git, so that resolving the root costs no subprocess.
    """
    start = start.resolve()
    for candidate in (start, *start.parents):
        if (candidate / ".git").exists():
            return candidate, True
    return start, False


# -- parsing one key --------------------------------------------------------------------------


def _number(low: float, high: float, *, low_open: bool, what: str) -> Callable[[str, Any], float]:
    def parse(key: str, value: Any) -> float:
        above = value > low if low_open else value >= low
        if isinstance(value, bool) or not isinstance(value, int | float) or not (above and value <= high):
            raise ConfigError(f"'{key}' in [tool.flordb_build] must be {what}, got '{value}'.")
        return float(value)

    return parse


def parse_size(value: object, key: str) -> int | None:
    """Bytes from an int or a string such as '500MB' or '2 GiB'; None when unset."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[len(number):]
        try:
            amount = float(number)
        except ValueError:
            amount = -1.0
        if unit in _SIZE_UNITS and amount > 0:
            return int(amount * _SIZE_UNITS[unit])
    raise ConfigError(
        f"'{key}' in [tool.flordb_build] must be a positive size such as 500000000, '500MB' or '2GiB', got '{value}'."
    )


def _size(key: str, value: Any) -> int | None:
    return parse_size(value, key)


def _positive_count(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"'{key}' in [tool.flordb_build] must be a whole number >= 1, got '{value}'.")
    return value


def _names(key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
        raise ConfigError(f"'{key}' in [tool.flordb_build] must be a list of variable names.")
    return tuple(value)


def _patterns(key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(p, str) and p.strip("/") for p in value):
        raise ConfigError(f"'{key}' in [tool.flordb_build] must be a list of path patterns like \".env\" or \"data/\".")
    return tuple(value)


def _byte_count(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"'{key}' in [tool.flordb_build] must be a whole number of bytes >= 0, got '{value}'.")
    return value


def _relative_paths(key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(x, str) and x and not Path(x).is_absolute() for x in value):
        raise ConfigError(
            f"'{key}' in [tool.flordb_build] must be a list of paths relative to the project root, "
            f"e.g. {key} = [\"data\"]."
        )
    return tuple(value)


def _flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"'{key}' in [tool.flordb_build] must be true or false, got '{value}'.")
    return value


def _seconds(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ConfigError(f"'{key}' in [tool.flordb_build] must be a number of seconds >= 0, got '{value}'.")
    return float(value)


def _text(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"'{key}' in [tool.flordb_build] must be a non-empty string.")
    return value


def _object_store_url(key: str, value: Any) -> str:
    # A URL, not a path: a bare path here would silently become a second local store.
    if not isinstance(value, str) or "://" not in value or value.startswith("://"):
        raise ConfigError(
            f"'{key}' in [tool.flordb_build] must be an fsspec URL such as \"s3://bucket/prefix\" "
            f"or \"file:///shared/objects\", got '{value}'."
        )
    if "@" in value.split("://", 1)[1].split("/", 1)[0]:
        # pyproject.toml is committed and snapshotted: a secret here would travel with every clone.
        raise ConfigError(
            f"'{key}' in [tool.flordb_build] must not carry credentials ('user:secret@' in '{value.split('@')[-1]}'); "
            "they come from the environment or the backend's own files (for S3: AWS_ACCESS_KEY_ID, ~/.aws/credentials)."
        )
    return value.rstrip("/")


#: The replay executors (``replay --executor``, ``replay_executor``).
REPLAY_EXECUTORS = ("local", "ray")


def _executor(key: str, value: Any) -> str:
    if value not in REPLAY_EXECUTORS:
        raise ConfigError(
            f"'{key}' in [tool.flordb_build] must be one of {', '.join(map(repr, REPLAY_EXECUTORS))}, got '{value}'."
        )
    return str(value)


def _path_text(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"'{key}' in [tool.flordb_build] must be a path string.")
    return value


#: Every key of ``[tool.flordb_build]`` and how its value is read (the field of :class:`Config`
#: of the same name holds it; ``db`` becomes ``db_path``).
SETTINGS: Mapping[str, Callable[[str, Any], Any]] = MappingProxyType({
    "db": _path_text,
    "projid": _text,
    "flush_seconds": _number(0, 60, low_open=True, what="a number in (0, 60]"),
    "busy_timeout_seconds": _number(0, 3600, low_open=True, what="a number in (0, 3600]"),
    "checkpoint_epsilon": _number(
        0, 1, low_open=True,
        what="a number in (0, 1] (the tolerated fraction of training time spent checkpointing)",
    ),
    "checkpoint_every": _positive_count,
    "checkpoint_budget_per_run": _size,
    "checkpoint_budget_per_project": _size,
    "env_vars": _names,
    "snapshot_exclude": _patterns,
    "snapshot_include": _patterns,
    "snapshot_max_file_bytes": _byte_count,
    "replay_links": _relative_paths,
    "replay_warm": _flag,
    "replay_keep_warm": _seconds,
    "replay_executor": _executor,
    "ray_address": _text,
    "params": _path_text,
    "remotes": _remotes,
    "objects": _object_store_url,
})


def parse_settings(section: Mapping[str, Any]) -> dict[str, Any]:
    """The typed values of the keys ``section`` sets (a ``[tool.flordb_build]`` table), by key.

    :raises ConfigError: a key that is not in :data:`SETTINGS` (naming the closest one), or a
        value of the wrong type or range.
    """
    for key in section:
        if key not in SETTINGS:
            raise ConfigError(f"Unknown key '{key}' in [tool.flordb_build]; {_closest(key)}")
    return {key: SETTINGS[key](key, value) for key, value in section.items()}


def _closest(key: str) -> str:
    import difflib

    match = difflib.get_close_matches(key, list(SETTINGS), n=1, cutoff=0.6)
    if match:
        return f"did you mean '{match[0]}'?"
    return f"the known keys are {', '.join(SETTINGS)}."


def read_tool_section(root: Path) -> Mapping[str, Any]:
    """Return ``[tool.flordb_build]`` of ``<root>/pyproject.toml``, or an empty mapping."""
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file():
        return MappingProxyType({})
    try:
        data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"Could not parse '{pyproject}': {exc}. Fix the file or remove it.") from exc
    section = data.get("tool", {}).get("flordb_build", {})
    if not isinstance(section, dict):
        raise ConfigError(f"'[tool.flordb_build]' in '{pyproject}' must be a table.")
    return MappingProxyType(section)


def load_config(cwd: Path | None = None) -> Config:
    """Resolve the project root, store path and settings for the process's working directory.

    :raises ConfigError: an unreadable pyproject.toml, an unknown key or a bad value in
        ``[tool.flordb_build]``.
    """
    root, in_git = find_project_root(cwd or Path.cwd())
    return config_of_root(root, in_git)


def config_of_root(root: Path, in_git: bool, *, db_path: Path | None = None, projid: str | None = None) -> Config:
    """The :class:`Config` of the project at ``root``, its settings read from ``<root>/pyproject.toml``.

    :param db_path: the store, when the caller knows it (a replay child); else resolved as the
        module docstring says.
    :param projid: the project id, when the caller knows it; else ``projid`` or the root's name.
    """
    settings = parse_settings(read_tool_section(root))
    configured_db = settings.pop("db", None)
    configured_projid = settings.pop("projid", root.name)
    if db_path is None:
        env_db = os.environ.get(DB_ENV_VAR)
        if env_db:
            db_path = Path(env_db).expanduser().resolve()
        elif configured_db is not None:
            db_path = (root / configured_db).resolve()
        else:
            db_path = root / FLOR_DIR_NAME / "flor.db"
    return Config(
        root=root, in_git=in_git, db_path=db_path, projid=projid if projid is not None else configured_projid,
        **settings,
    )
