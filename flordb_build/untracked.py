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

import functools
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import DEFAULT_SNAPSHOT_MAX_FILE_BYTES, parse_settings

if TYPE_CHECKING:
    from .config import Config

#: Secret-looking files that never go into a snapshot unless ``snapshot_include`` names them.
DEFAULT_EXCLUDE = (
    ".env", ".env.*", "*.env", ".envrc", "*.pem", "*.key", "*.p12", "*.pfx", "*.jks", "*.keystore", "*.kdbx",
    "id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*", ".ssh/", ".gnupg/", ".aws/", ".azure/", ".kube/",
    ".docker/", "credentials*.json", "credentials", "client_secret*.json", "service-account*.json", ".netrc",
    "_netrc", ".pgpass", ".pypirc", ".npmrc", ".git-credentials", "secrets.*", "secret.*", "*.secret",
)
#: Untracked files larger than this stay out of snapshots unless ``snapshot_include`` names them.
DEFAULT_MAX_FILE_BYTES = DEFAULT_SNAPSHOT_MAX_FILE_BYTES
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
    def from_config(cls, config: Config) -> SnapshotPolicy:
        """The policy a project's ``[tool.flordb_build]`` asks for (the defaults where it says nothing)."""
        return cls(
            exclude=DEFAULT_EXCLUDE + config.snapshot_exclude,
            include=config.snapshot_include,
            max_file_bytes=config.snapshot_max_file_bytes,
        )

    @classmethod
    def from_section(cls, section: Mapping[str, Any]) -> SnapshotPolicy:
        """The policy of the snapshot keys in ``section``, read as config.py reads them.

        :raises ConfigError: for a value of the wrong type, or a key that is not a setting.
        """
        settings = parse_settings(section)
        return cls(
            exclude=DEFAULT_EXCLUDE + settings.get("snapshot_exclude", ()),
            include=settings.get("snapshot_include", ()),
            max_file_bytes=settings.get("snapshot_max_file_bytes", DEFAULT_MAX_FILE_BYTES),
        )

    def check(self, path: str, size: int) -> LeftOut | None:
        """None when the untracked file ``path`` (posix, relative to the root) of ``size`` bytes goes in."""
        if self.include and self._include.search(path):
            return None
        if self._exclude.search(path):
            pattern = first_match(path, self.exclude)
            return LeftOut(path, LeftOutReason.SECRET, f"matches the secret-file pattern '{pattern}'")
        if size > self.max_file_bytes:
            return LeftOut(
                path,
                LeftOutReason.TOO_LARGE,
                f"{format_size(size)}, over snapshot_max_file_bytes = {self.max_file_bytes}",
            )
        return None


    @functools.cached_property
    def _include(self) -> re.Pattern[str]:
        return combined_regex(self.include)

    @functools.cached_property
    def _exclude(self) -> re.Pattern[str]:
        return combined_regex(self.exclude)


def first_match(path: str, patterns: Iterable[str]) -> str | None:
    """The first of ``patterns`` that ``path`` matches (see the module docstring), else None."""
    for pattern in patterns:
        if pattern_regex(pattern).search(path):
            return pattern
    return None


def matches_any(path: str, patterns: Sequence[str]) -> bool:
    """True when ``path`` matches one of ``patterns`` (one regex search for all of them)."""
    return bool(patterns) and combined_regex(tuple(patterns)).search(path) is not None


@functools.lru_cache(maxsize=256)
def pattern_regex(pattern: str) -> re.Pattern[str]:
    """One pattern as a regex over a whole posix path, ignoring case."""
    return re.compile(_pattern_source(pattern), re.IGNORECASE)


@functools.lru_cache(maxsize=16)
def combined_regex(patterns: tuple[str, ...]) -> re.Pattern[str]:
    """All ``patterns`` as one regex: a path is searched once, whatever their number.

    The patterns for any directory level share one ``(?:^|/)`` prefix, so the search tries their
    alternatives only where a path component starts.
    """
    anchored = [_pattern_source(p) for p in patterns if _is_anchored(p)]
    anywhere = [_component_source(p) for p in patterns if not _is_anchored(p)]
    parts = []
    if anywhere:
        parts.append("(?:^|/)(?:" + "|".join(anywhere) + ")")
    parts.extend(f"(?:{source})" for source in anchored)
    return re.compile("|".join(parts), re.IGNORECASE)


def _is_anchored(pattern: str) -> bool:
    return "/" in pattern.strip("/")


def _component_source(pattern: str) -> str:
    """The regex of a pattern for one path component and what follows it (``/``, or the end)."""
    return _glob_source(pattern.strip("/")) + ("/" if pattern.endswith("/") else "(?:/|$)")


def _pattern_source(pattern: str) -> str:
    if _is_anchored(pattern):  # anchored at the root: the path, or a directory leading to it
        return "^" + _component_source(pattern)
    return "(?:^|/)" + _component_source(pattern)


def _glob_source(glob: str) -> str:
    """A glob as a regex where ``*`` and ``?`` never cross a ``/`` (``[...]`` classes kept)."""
    out: list[str] = []
    i = 0
    while i < len(glob):
        char = glob[i]
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[" and "]" in glob[i + 2 :]:
            end = glob.index("]", i + 2)
            inner = glob[i + 1 : end]
            out.append("[" + ("^" + inner[1:] if inner.startswith("!") else inner).replace("\\", "\\\\") + "]")
            i = end
        else:
            out.append(re.escape(char))
        i += 1
    return "".join(out)


def format_size(size: int) -> str:
    """``5.2 MB`` style sizes for messages."""
    value = float(size)
    for unit in ("bytes", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{int(value)} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{size} bytes"


def select_untracked(root: bytes, paths: Iterable[bytes], policy: SnapshotPolicy) -> tuple[list[bytes], list[LeftOut]]:
    """Split untracked ``paths`` (as ``git ls-files -z`` prints them) into those to take and those left out."""
    taken, left_out = select_untracked_stats(root, paths, policy)
    return [item.path for item in taken], left_out


def select_untracked_stats(
    root: bytes, paths: Iterable[bytes], policy: SnapshotPolicy
) -> tuple[list[UntrackedFile], list[LeftOut]]:
    """:func:`select_untracked`, keeping the ``lstat`` of each file taken (the hash cache's key).

    A directory entry (``sub/``: git lists a nested repository that way) is skipped: its gitlink
    would hold only a commit id of another repository, no content of this one.
    """
    taken: list[UntrackedFile] = []
    left_out: list[LeftOut] = []
    for path in paths:
        if not path or path.endswith(b"/"):
            continue
        try:
            st = os.lstat(os.path.join(root, path))
        except FileNotFoundError:
            continue  # deleted since git listed it
        verdict = policy.check(os.fsdecode(path), st.st_size)
        if verdict is None:
            taken.append(UntrackedFile(path, st))
        else:
            left_out.append(verdict)
    return taken, left_out


# -- the hash cache of untracked files ------------------------------------------------------------

#: The cache's file in ``.flor/``.
UNTRACKED_CACHE_NAME = "untracked-hashes.json"
#: A file whose mtime or ctime is this close to the capture may change again within the same
#: timestamp tick without its stat data changing (git's "racily clean" files): its blob id is
#: not kept, so it is hashed again next time. 2 s covers the coarsest common clocks (FAT, SMB).
RACY_NS = 2_000_000_000
_CACHE_VERSION = 1


@dataclass(frozen=True)
class UntrackedFile:
    """An untracked file a snapshot takes: its path (as git lists it) and its ``lstat``."""

    path: bytes
    stat: os.stat_result

    def key(self) -> list[int]:
        """What must be equal for the content to count as unchanged: size, times, inode, device, mode."""
        st = self.stat
        return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev, st.st_mode]

    def last_change_ns(self) -> int:
        """The later of its mtime and ctime: a rewrite that restores the mtime still moves the ctime."""
        return max(self.stat.st_mtime_ns, self.stat.st_ctime_ns)

    def settled_before(self, now_ns: int) -> bool:
        """True when it last changed more than :data:`RACY_NS` before ``now_ns``."""
        return self.last_change_ns() < now_ns - RACY_NS


@dataclass(frozen=True)
class CachedBlob:
    """The index entry git made of an untracked file: its mode and blob id."""

    mode: str
    oid: str


class UntrackedHashCache:
    """Blob ids of untracked files by their stat data, so a snapshot need not read them again.

    git keeps such a cache for tracked files in the index; untracked files have no index
    entry, so without this one a 200 MB untracked data file was read and hashed on every run.
    An entry is used only when the file's stat data (:meth:`UntrackedFile.key`) is what it was
    and the file last changed before the cache was written (git's racy-git rule: the cache
    file's own mtime is the reference, from the same clock as the file's), and entries are kept
    only for files that had settled (:data:`RACY_NS`). A changed ``fingerprint`` (git config,
    attributes) empties it. A cache that cannot be read is empty; one that cannot be written
    is skipped: a miss only costs hashing.
    """

    def __init__(self, path: Path, fingerprint: list[list[int]], entries: dict[str, list[Any]], written_ns: int) -> None:
        self.path = path
        self.fingerprint = fingerprint
        self.entries = entries
        self.written_ns = written_ns
        self.changed = False

    @classmethod
    def load(cls, path: Path, fingerprint: list[list[int]]) -> UntrackedHashCache:
        """The cache at ``path``, empty when missing, unreadable, of another version or fingerprint."""
        try:
            with open(path, "rb") as handle:
                written_ns = os.fstat(handle.fileno()).st_mtime_ns
                data = json.loads(handle.read())
        except (OSError, ValueError):
            return cls(path, fingerprint, {}, 0)
        valid = (
            isinstance(data, dict)
            and data.get("version") == _CACHE_VERSION
            and data.get("fingerprint") == fingerprint
            and isinstance(data.get("entries"), dict)
        )
        if not valid:
            return cls(path, fingerprint, {}, 0)
        return cls(path, fingerprint, data["entries"], written_ns)

    def lookup(self, item: UntrackedFile) -> CachedBlob | None:
        """The blob of ``item`` when it is unchanged since it was hashed, else None."""
        entry = self.entries.get(os.fsdecode(item.path))
        if not isinstance(entry, list) or len(entry) != 3:
            return None
        key, mode, oid = entry
        if key != item.key() or item.last_change_ns() >= self.written_ns:
            return None
        return CachedBlob(str(mode), str(oid))

    def keep(self, item: UntrackedFile, mode: str, oid: str) -> None:
        """Remember the blob git made of ``item`` (a file that has settled: :meth:`UntrackedFile.settled_before`)."""
        self.entries[os.fsdecode(item.path)] = [item.key(), mode, oid]
        self.changed = True

    def retain(self, paths: Iterable[bytes]) -> None:
        """Forget every file not among ``paths`` (deleted, now ignored or tracked)."""
        names = {os.fsdecode(p) for p in paths}
        for name in [n for n in self.entries if n not in names]:
            del self.entries[name]
            self.changed = True

    def save(self) -> None:
        """Write the cache atomically (concurrent runs: the last rename wins, none is torn)."""
        data = {"version": _CACHE_VERSION, "fingerprint": self.fingerprint, "entries": self.entries}
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.{os.urandom(4).hex()}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # surrogateescape names (undecodable bytes) go through ensure_ascii's \u escapes.
            tmp.write_text(json.dumps(data))
            os.replace(tmp, self.path)
        except OSError:
            tmp.unlink(missing_ok=True)
        self.changed = False


def left_out_message(left_out: Sequence[LeftOut]) -> str:
    """One warning naming what a snapshot left out and how to include it."""
    named = ", ".join(item.describe() for item in left_out[:_MAX_NAMED])
    more = f" and {len(left_out) - _MAX_NAMED} more" if len(left_out) > _MAX_NAMED else ""
    return (
        f"The run's snapshot left out {len(left_out)} untracked file(s): {named}{more}. To include a file, "
        "add its path to snapshot_include = [...] in [tool.flordb_build] of pyproject.toml, or track it with "
        "'git add'; to leave it out silently, add it to .gitignore."
    )
