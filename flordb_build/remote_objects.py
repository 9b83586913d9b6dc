"""Objects in a shared store at an fsspec URL (``objects = "s3://bucket/prefix"``), behind the local cache.

The remote holds ``<url>/<sha256[:2]>/<sha256>``, the layout of ``.flor/objects``. Objects are
immutable and named by their content, so the remote needs no index and no locking:

- an object is created only where none of that name exists: on S3 with a conditional create
  (``IfNoneMatch='*'``, through s3fs' ``mode="create"``), elsewhere by writing a temporary name
  and renaming it into place; a writer that loses the race to another writer of the same name
  loses nothing (the winner's bytes are the same bytes), and no reader ever sees half an object;
- a read is verified against the name by the caller (objects.py) before it is cached or used.

Credentials and endpoints come only from the backend's own configuration (for S3: the
environment, ``~/.aws/config`` and ``~/.aws/credentials``, including ``AWS_ENDPOINT_URL``);
nothing of them is stored by flordb_build. fsspec and the backend's package (s3fs for S3) are
imported on first use: ``pip install 'flordb_build[remote]'``.

Uploads of checkpoints run on an :class:`ObjectUploader` thread, so a slow network never slows the
training loop; ``push_missing`` uploads what a killed process left local.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .errors import ObjectMissingError, ObjectStoreError

TMP_PREFIX = ".tmp-"


class RemoteObjects:
    """The objects under one fsspec URL."""

    def __init__(self, url: str) -> None:
        try:
            import fsspec
        except ImportError as exc:
            raise ObjectStoreError(
                f"'objects = \"{url}\"' in [tool.flordb_build] needs fsspec (and s3fs for s3:// URLs): "
                "pip install 'flordb_build[remote]'."
            ) from exc
        self.url = url
        try:
            self.fs, root = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as exc:
            raise ObjectStoreError(
                f"Could not open the object store '{url}': {exc}. For s3:// URLs: pip install s3fs."
            ) from exc
        self.root = root.rstrip("/")
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        # s3fs implements mode="create" as a conditional PUT; fsspec's generic one is check-then-write.
        self._conditional_create = any(p in ("s3", "s3a") for p in protocols)

    def key_of(self, sha256: str) -> str:
        """The object's path in the remote filesystem."""
        return f"{self.root}/{sha256[:2]}/{sha256}"

    def exists(self, sha256: str) -> bool:
        """True when the remote has an object of that name (its content not verified)."""
        key = self.key_of(sha256)
        try:
            self.fs.invalidate_cache(key)  # another machine may have written it since we last looked
            self.fs.info(key)
        except FileNotFoundError:
            return False
        except Exception as exc:  # botocore's connection errors are no OSError
            raise ObjectStoreError(f"Could not look up object '{sha256}' in '{self.url}': {exc}.") from exc
        return True

    def fetch(self, sha256: str) -> bytes:
        """The remote object's bytes, unverified (the caller checks them against the name)."""
        try:
            return bytes(self.fs.cat_file(self.key_of(sha256)))
        except FileNotFoundError:
            raise ObjectMissingError(f"object '{sha256}' is missing from '{self.url}'") from None
        except Exception as exc:  # botocore's connection errors are no OSError
            raise ObjectStoreError(f"Could not download object '{sha256}' from '{self.url}': {exc}.") from exc

    def upload(self, sha256: str, local_path: Path) -> bool:
        """Create the object from ``local_path`` unless the remote has it; True when this call created it."""
        if self.exists(sha256):
            return False  # the common case for repeated state: one HEAD, nothing written
        return self.create(sha256, local_path)

    def create(self, sha256: str, local_path: Path) -> bool:
        """Write the object unless one of that name appears first; True when this call wrote it.

        Safe against concurrent writers of the same object: the loser writes nothing (S3) or
        replaces the object with identical bytes (a rename elsewhere); never half an object.
        """
        key = self.key_of(sha256)
        try:
            if self._conditional_create:
                self.fs.put_file(str(local_path), key, mode="create")
            else:
                self._upload_by_rename(sha256, local_path, key)
        except FileExistsError:
            return False  # another writer created it between our look-up and our write
        except Exception as exc:  # botocore's connection errors are no OSError
            # S3 without If-None-Match support answers differently: a present object is still a lost race.
            if self.exists(sha256):
                return False
            raise ObjectStoreError(f"Could not upload object '{sha256}' to '{self.url}': {exc}.") from exc
        return True

    def _upload_by_rename(self, sha256: str, local_path: Path, key: str) -> None:
        tmp = f"{self.root}/{sha256[:2]}/{TMP_PREFIX}{sha256[:16]}-{os.getpid()}-{os.urandom(4).hex()}"
        self.fs.makedirs(f"{self.root}/{sha256[:2]}", exist_ok=True)
        try:
            self.fs.put_file(str(local_path), tmp)
            self.fs.mv(tmp, key)
        except BaseException:
            try:
                self.fs.rm_file(tmp)
            except Exception:  # a leftover temporary name is harmless: names() skips it
                pass
            raise

    def names(self) -> set[str]:
        """Every object name in the remote (one listing; temporary names excluded)."""
        try:
            self.fs.invalidate_cache(self.root)
            paths = self.fs.find(self.root)
        except FileNotFoundError:
            return set()
        except Exception as exc:  # botocore's connection errors are no OSError
            raise ObjectStoreError(f"Could not list the object store '{self.url}': {exc}.") from exc
        names = {str(p).rsplit("/", 1)[-1] for p in paths}
        return {n for n in names if len(n) == 64 and not n.startswith(TMP_PREFIX)}


def push_missing(remote: RemoteObjects, local: Iterable[tuple[str, Path]]) -> int:
    """Upload every ``(sha256, path)`` of ``local`` that the remote lacks; return how many were uploaded."""
    present = remote.names()
    uploaded = 0
    for sha256, path in local:
        if sha256 not in present and path.is_file():
            uploaded += remote.upload(sha256, path)
    return uploaded


class ObjectUploader:
    """A background thread that uploads objects by name, in the order they were submitted.

    An upload that fails is remembered, not raised: the object is safe in the local cache and
    ``flordb-build push-objects`` uploads it later; :meth:`close` returns the failures.
    """

    def __init__(self, upload: Callable[[str], Any]) -> None:
        self._upload = upload
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.failures: list[tuple[str, BaseException]] = []
        self._thread = threading.Thread(target=self._work, name="flordb_build-uploads", daemon=True)
        self._thread.start()

    def submit(self, sha256: str) -> None:
        """Queue one object for upload."""
        self._queue.put(sha256)

    def close(self) -> list[tuple[str, BaseException]]:
        """Wait until every queued object is uploaded (or failed); return the failures."""
        self._queue.put(None)
        self._thread.join()
        return self.failures

    def _work(self) -> None:
        while True:
            sha256 = self._queue.get()
            if sha256 is None:
                return
            try:
                self._upload(sha256)
            except Exception as exc:  # kept for close(); the object stays in the local cache
                self.failures.append((sha256, exc))
