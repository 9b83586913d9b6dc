"""The content-addressed object store: ``.flor/objects/<sha256[:2]>/<sha256>``.

An object's name is the sha256 of its bytes, so identical content (the same model state saved
by two runs, a frozen layer saved every epoch) is stored once, and every read can prove that
the bytes are the ones that were written. Writes go to a temporary file in the target folder
and are renamed into place, so a reader (or a process killed mid-write) never sees half an
object under a real name; stray temporary files are swept by ``flordb-build gc``.

The store lives beside the database (``Config.db_path``'s folder, ``<repo>/.flor`` by default)
so that a process working in another directory against the same database (a replay in a
temporary worktree) finds the same objects.

With ``objects = "<fsspec URL>"`` in ``[tool.flordb_build]`` the folder is a cache in front of a
shared remote store (remote_objects.py)::

    put: local file (as without a remote) ──> remote, unless it has that name already
         (at once, or on a background uploader: ``put(..., upload=False)`` + :meth:`upload`)
    get: local hit ──> verify ──> bytes
         local miss or damaged ──> remote ──> verify ──> cache locally ──> bytes
         (a remote object that fails the check is refused and never cached)
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .config import Config
from .errors import ObjectCorruptError, ObjectMissingError, ObjectStoreError

if TYPE_CHECKING:
    from .remote_objects import RemoteObjects

OBJECTS_DIR_NAME = "objects"
TMP_PREFIX = ".tmp-"
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class StoredObject:
    """The result of a put: the object's address, its size, and whether this put created it."""

    sha256: str
    bytes: int
    created: bool


@dataclass(frozen=True)
class ObjectInfo:
    """One object file on disk (for garbage collection)."""

    sha256: str
    bytes: int
    mtime: float


def sha256_of(data: bytes | bytearray | memoryview) -> str:
    """Hex sha256 of ``data`` (hashlib releases the GIL for large buffers)."""
    return hashlib.sha256(data).hexdigest()


def check_sha256(sha256: str) -> str:
    """Return ``sha256`` if it is 64 lowercase hex digits; refuse anything else (it becomes a path)."""
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        raise ObjectStoreError(f"'{sha256}' is not a sha256 object address (64 lowercase hex digits).")
    return sha256


class ObjectStore:
    """A folder of immutable objects named by the sha256 of their content, optionally caching a remote."""

    def __init__(self, root: Path, remote: RemoteObjects | None = None) -> None:
        self.root = root
        self.remote = remote

    @classmethod
    def for_config(cls, config: Config) -> ObjectStore:
        """The project's object store, beside its database (caching ``objects`` when it is set)."""
        remote = None
        if config.objects is not None:
            from .remote_objects import RemoteObjects  # fsspec only when a remote is configured

            remote = RemoteObjects(config.objects)
        return cls(config.db_path.parent / OBJECTS_DIR_NAME, remote)

    def path_of(self, sha256: str) -> Path:
        """Where the object ``sha256`` lives (whether or not it exists)."""
        check_sha256(sha256)
        return self.root / sha256[:2] / sha256

    def put(self, data: bytes | bytearray | memoryview, *, upload: bool = True) -> StoredObject:
        """Store ``data`` under its sha256 unless an object of that content already exists.

        :param upload: also create it in the remote store (when there is one) before returning;
            False leaves that to :meth:`upload` (a background uploader, or ``push_objects``).
        """
        stored = self._put_local(data)
        if upload and self.remote is not None:
            self.upload(stored.sha256)
        return stored

    def upload(self, sha256: str) -> bool:
        """Create the local object ``sha256`` in the remote store unless it has it; True when created."""
        if self.remote is None:
            return False
        return self.remote.upload(sha256, self.path_of(sha256))

    def push_objects(self) -> int:
        """Upload every local object the remote store lacks (after a killed run); return how many."""
        if self.remote is None:
            return 0
        from .remote_objects import push_missing

        return push_missing(self.remote, ((info.sha256, self.path_of(info.sha256)) for info in self.iter_objects()))

    def _put_local(self, data: bytes | bytearray | memoryview) -> StoredObject:
        sha256 = sha256_of(data)
        path = self.path_of(sha256)
        size = memoryview(data).nbytes
        try:
            existing = path.stat().st_size
        except FileNotFoundError:
            existing = -1
        if existing == size:
            # Refresh the mtime: garbage collection spares recently touched objects, so an
            # object that a live run just referenced again is not deleted under it.
            os.utime(path)
            return StoredObject(sha256, size, created=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f"{TMP_PREFIX}{sha256[:16]}-{os.getpid()}-{os.urandom(4).hex()}"
        try:
            # No fsync: a killed process leaves the page cache intact, and losing an object to a
            # power cut is caught by the hash check on read rather than paid for on every write.
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise ObjectStoreError(f"Could not write object '{sha256}' to '{path}': {exc}.") from exc
        return StoredObject(sha256, size, created=True)

    def get(self, sha256: str) -> bytes:
        """The bytes of object ``sha256``, verified against their hash.

        :raises ObjectMissingError: no such object file.
        :raises ObjectCorruptError: the file's content does not hash to ``sha256``.
        """
        path = self.path_of(sha256)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            if self.remote is None:
                raise ObjectMissingError(f"object '{sha256}' is missing from '{self.root}'") from None
            return self._fetch(self.remote, sha256)
        except OSError as exc:
            raise ObjectStoreError(f"Could not read object '{sha256}' at '{path}': {exc}.") from exc
        actual = sha256_of(data)
        if actual != sha256:
            if self.remote is not None and self.remote.exists(sha256):
                return self._fetch(self.remote, sha256)  # a damaged cache entry heals from the shared copy
            raise ObjectCorruptError(
                f"object '{sha256}' at '{path}' is corrupted: its content hashes to '{actual}'"
            )
        return data

    def _fetch(self, remote: RemoteObjects, sha256: str) -> bytes:
        """Download ``sha256``, verify it, then cache it: bytes that fail the check never reach the cache."""
        try:
            data = remote.fetch(sha256)
        except ObjectMissingError:
            raise ObjectMissingError(f"object '{sha256}' is missing from '{self.root}' and from '{remote.url}'") from None
        actual = sha256_of(data)
        if actual != sha256:
            raise ObjectCorruptError(
                f"object '{sha256}' at '{remote.url}' is corrupted: its content hashes to '{actual}'; "
                f"nothing was cached. Delete '{remote.key_of(sha256)}' there, then run 'flordb-build push-objects' "
                "on a machine whose cache holds it intact."
            )
        self.delete(sha256)  # a damaged cache entry of the same size would otherwise count as present
        self._put_local(data)
        return data

    def contains(self, sha256: str) -> bool:
        """True when an object named ``sha256`` exists here or in the remote store (content not verified)."""
        if self.path_of(sha256).is_file():
            return True
        return self.remote is not None and self.remote.exists(sha256)

    def size_of(self, sha256: str) -> int | None:
        """Size in bytes of object ``sha256``, or None when it does not exist."""
        try:
            return self.path_of(sha256).stat().st_size
        except FileNotFoundError:
            return None

    def delete(self, sha256: str) -> int:
        """Remove object ``sha256``; return the bytes freed (0 when it was already gone)."""
        path = self.path_of(sha256)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        try:
            path.parent.rmdir()  # drop the fan-out folder once it is empty
        except OSError:
            pass
        return size

    def iter_objects(self) -> Iterator[ObjectInfo]:
        """Every object file in the store (temporary files excluded)."""
        if not self.root.is_dir():
            return
        for fan in sorted(self.root.iterdir()):
            if not fan.is_dir() or len(fan.name) != 2:
                continue
            for entry in sorted(fan.iterdir()):
                if _SHA256.fullmatch(entry.name) and entry.name.startswith(fan.name):
                    st = entry.stat()
                    yield ObjectInfo(entry.name, st.st_size, st.st_mtime)

    def sweep_temporary(self, older_than_seconds: float) -> int:
        """Delete temporary files left by killed writers older than the given age; return bytes freed."""
        if not self.root.is_dir():
            return 0
        cutoff = time.time() - older_than_seconds
        freed = 0
        for tmp in self.root.glob(f"*/{TMP_PREFIX}*"):
            try:
                st = tmp.stat()
                if st.st_mtime < cutoff:
                    tmp.unlink()
                    freed += st.st_size
            except FileNotFoundError:
                continue
        return freed
