"""Where a project's store lives and how it is tuned: ``[tool.flordb_build]`` -> :class:`Config`.

Resolution order for the database path: ``FLORDB_BUILD_DB`` in the environment, then ``db`` in
``[tool.flordb_build]`` of the project's pyproject.toml (relative to the project root), then
``<root>/.flor/flor.db``. The project root is the enclosing git work tree, else the current
directory.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .errors import ConfigError

FLOR_DIR_NAME = ".flor"
DB_ENV_VAR = "FLORDB_BUILD_DB"
DEFAULT_FLUSH_SECONDS = 0.5


@dataclass(frozen=True)
class Config:
    """Everything a process needs to know to record into, or read from, one project's store."""

    root: Path
    in_git: bool
    db_path: Path
    projid: str
    flush_seconds: float = DEFAULT_FLUSH_SECONDS
    section: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def flor_dir(self) -> Path:
        """``<root>/.flor``: journals, locks and the object store live here."""
        return self.root / FLOR_DIR_NAME

    @property
    def runs_dir(self) -> Path:
        """Per-run journals (``<run_id>.jsonl``) that the snapshot commits carry."""
        return self.flor_dir / "runs"


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
    """Resolve the project root, store path and settings for the process's working directory."""
    root, in_git = find_project_root(cwd or Path.cwd())
    section = read_tool_section(root)
    env_db = os.environ.get(DB_ENV_VAR)
    if env_db:
        db_path = Path(env_db).expanduser().resolve()
    elif "db" in section:
        if not isinstance(section["db"], str):
            raise ConfigError("'db' in [tool.flordb_build] must be a path string.")
        db_path = (root / section["db"]).resolve()
    else:
        db_path = root / FLOR_DIR_NAME / "flor.db"
    projid = section.get("projid", root.name)
    if not isinstance(projid, str) or not projid:
        raise ConfigError("'projid' in [tool.flordb_build] must be a non-empty string.")
    flush_seconds = section.get("flush_seconds", DEFAULT_FLUSH_SECONDS)
    if not isinstance(flush_seconds, int | float) or not 0 < flush_seconds <= 60:
        raise ConfigError(
            f"'flush_seconds' in [tool.flordb_build] must be a number in (0, 60], got '{flush_seconds}'."
        )
    return Config(
        root=root,
        in_git=in_git,
        db_path=db_path,
        projid=projid,
        flush_seconds=float(flush_seconds),
        section=section,
    )
