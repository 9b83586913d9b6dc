"""Which untracked files a run's snapshot takes: not secrets, not huge data files.

Tracked files are the user's repository and always go in. Untracked files that ``.gitignore``
does not ignore go in too (a run's code is often not committed yet), except

* files matching the deny list of secret-looking names (:data:`DEFAULT_EXCLUDE` plus
  ``snapshot_exclude``): ``flor.shadow`` is an ordinary branch, and ``git push --all`` uploads it;
* files over ``snapshot_max_file_bytes`` (:data:`DEFAULT_MAX_FILE_BYTES`): a 500 MB data file
  next to the script would be copied into ``.git`` on every run's first capture.

``snapshot_include`` patterns override both. Patterns follow ``.gitignore``'s shape, matched
without regard to case: ``name`` or ``*.pem`` matches that name in any directory, ``dir/``
matches a directory anywhere (and everything below it), and a pattern with a ``/`` inside
matches from the project root (``data/raw``, ``configs/*.json``).
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from .errors import ConfigError

#: Secret-looking files that never go into a snapshot unless ``snapshot_include`` names them.
DEFAULT_EXCLUDE = (
    ".env", ".env.*", "*.env", ".envrc", "*.pem", "*.key", "*.p12", "*.pfx", "*.jks", "*.keystore", "*.kdbx",
    "id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*", ".ssh/", ".gnupg/", ".aws/", ".azure/", ".kube/",
    ".docker/", "credentials*.json", "credentials", "client_secret*.json", "service-account*.json", ".netrc",
    "_netrc", ".pgpass", ".pypirc", ".npmrc", ".git-credentials", "secrets.*", "secret.*", "*.secret",
)
#: Untracked files larger than this stay out of snapshots unless ``snapshot_include`` names them.
DEFAULT_MAX_FILE_BYTES = 5 * 1024 * 1024
_MAX_NAMED = 10  # files a warning names before it says "and N more"


class LeftOutReason(StrEnum):
    """Why an untracked file stayed out of a snapshot."""

    SECRET = "secret"
    TOO_LARGE = "too-large"


@dataclass(frozen=True)
class LeftOut:
    """One untracked file a snapshot did not take, and why."""

    path: str
    reason: LeftOutReason
    detail: str  # the pattern it matched, or its size

    def describe(self) -> str:
        """``'path' (why)`` for a warning."""
        return f"'{self.path}' ({self.detail})"


@dataclass(frozen=True)
class SnapshotPolicy:
    """``[tool.flordb_build]``'s ``snapshot_exclude``, ``snapshot_include`` and ``snapshot_max_file_bytes``."""

    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    include: tuple[str, ...] = ()
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES

    @classmethod
    def from_section(cls, section: Mapping[str, Any]) -> SnapshotPolicy:
        """The policy a project's ``[tool.flordb_build]`` asks for (the defaults where it says nothing).

        :raises ConfigError: for a value of the wrong type.
        """
        extra = _patterns(section, "snapshot_exclude")
        include = _patterns(section, "snapshot_include")
        max_bytes = section.get("snapshot_max_file_bytes", DEFAULT_MAX_FILE_BYTES)
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ConfigError(
                f"'snapshot_max_file_bytes' in [tool.flordb_build] must be a whole number of bytes >= 0, "
                f"got '{max_bytes}'."
            )
        return cls(exclude=DEFAULT_EXCLUDE + extra, include=include, max_file_bytes=max_bytes)

    def check(self, path: str, size: int) -> LeftOut | None:
        """None when the untracked file ``path`` (posix, relative to the root) of ``size`` bytes goes in."""
        if self.include and matches_any(path, self.include):
            return None
        pattern = first_match(path, self.exclude)
        if pattern is not None:
            return LeftOut(path, LeftOutReason.SECRET, f"matches the secret-file pattern '{pattern}'")
        if size > self.max_file_bytes:
            return LeftOut(
                path,
                LeftOutReason.TOO_LARGE,
                f"{format_size(size)}, over snapshot_max_file_bytes = {self.max_file_bytes}",
            )
        return None


def _patterns(section: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = section.get(key, [])
    if not isinstance(value, list) or not all(isinstance(p, str) and p.strip("/") for p in value):
        raise ConfigError(f"'{key}' in [tool.flordb_build] must be a list of path patterns like \".env\" or \"data/\".")
    return tuple(value)


def first_match(path: str, patterns: Iterable[str]) -> str | None:
    """The first of ``patterns`` that ``path`` matches (see the module docstring), else None."""
    parts = path.lower().split("/")
    for pattern in patterns:
        if _matches(parts, pattern.lower()):
            return pattern
    return None


def matches_any(path: str, patterns: Iterable[str]) -> bool:
    """True when ``path`` matches one of ``patterns``."""
    return first_match(path, patterns) is not None


def _matches(parts: Sequence[str], pattern: str) -> bool:
    directory_only = pattern.endswith("/")
    pattern = pattern.strip("/")
    if "/" in pattern:  # anchored at the root: the path or one of its leading directories
        depth = pattern.count("/") + 1
        if len(parts) < depth:
            return False
        prefix = "/".join(parts[:depth])
        return fnmatch.fnmatchcase(prefix, pattern) and (len(parts) > depth or not directory_only)
    candidates = parts[:-1] if directory_only else parts
    return any(fnmatch.fnmatchcase(part, pattern) for part in candidates)


def format_size(size: int) -> str:
    """``5.2 MB`` style sizes for messages."""
    value = float(size)
    for unit in ("bytes", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{int(value)} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{size} bytes"


def select_untracked(root: bytes, paths: Iterable[bytes], policy: SnapshotPolicy) -> tuple[list[bytes], list[LeftOut]]:
    """Split untracked ``paths`` (as ``git ls-files -z`` prints them) into those to take and those left out.

    A directory entry (``sub/``: git lists a nested repository that way) is skipped: its gitlink
    would hold only a commit id of another repository, no content of this one.
    """
    taken: list[bytes] = []
    left_out: list[LeftOut] = []
    for path in paths:
        if not path or path.endswith(b"/"):
            continue
        try:
            size = os.lstat(os.path.join(root, path)).st_size
        except FileNotFoundError:
            continue  # deleted since git listed it
        verdict = policy.check(os.fsdecode(path), size)
        if verdict is None:
            taken.append(path)
        else:
            left_out.append(verdict)
    return taken, left_out


def left_out_message(left_out: Sequence[LeftOut]) -> str:
    """One warning naming what a snapshot left out and how to include it."""
    named = ", ".join(item.describe() for item in left_out[:_MAX_NAMED])
    more = f" and {len(left_out) - _MAX_NAMED} more" if len(left_out) > _MAX_NAMED else ""
    return (
        f"The run's snapshot left out {len(left_out)} untracked file(s): {named}{more}. To include a file, "
        "add its path to snapshot_include = [...] in [tool.flordb_build] of pyproject.toml, or track it with "
        "'git add'; to leave it out silently, add it to .gitignore."
    )
