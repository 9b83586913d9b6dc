"""The content-addressed object store: addressing, dedup, verification on read, deletion."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from flordb_build.errors import ObjectCorruptError, ObjectMissingError, ObjectStoreError
from flordb_build.objects import ObjectStore, check_sha256


def test_put_stores_under_sha256_fanout_and_get_returns_the_bytes(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path / "objects")
    data = b"model weights" * 1000
    stored = store.put(data)
    sha = hashlib.sha256(data).hexdigest()
    assert stored.sha256 == sha and stored.bytes == len(data) and stored.created
    assert (tmp_path / "objects" / sha[:2] / sha).read_bytes() == data
    assert store.get(sha) == data
    assert store.contains(sha) and store.size_of(sha) == len(data)


def test_identical_content_is_stored_once(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path / "objects")
    first = store.put(b"same state")
    second = store.put(bytearray(b"same state"))
    assert first.sha256 == second.sha256
    assert first.created and not second.created
    files = [p for p in (tmp_path / "objects").rglob("*") if p.is_file()]
    assert len(files) == 1
    assert [info.sha256 for info in store.iter_objects()] == [first.sha256]


def test_corrupted_object_fails_verification_instead_of_returning_wrong_bytes(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path / "objects")
    sha = store.put(b"A" * 4096).sha256
    path = store.path_of(sha)
    path.write_bytes(b"B" * 4096)  # same size, different content: only the hash can tell
    with pytest.raises(ObjectCorruptError, match=sha):
        store.get(sha)


def test_truncated_object_is_rewritten_by_the_next_put(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path / "objects")
    data = b"C" * 4096
    sha = store.put(data).sha256
    store.path_of(sha).write_bytes(data[:10])
    assert store.put(data).created
    assert store.get(sha) == data


def test_missing_object_and_bad_addresses(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path / "objects")
    missing = "ab" * 32
    with pytest.raises(ObjectMissingError, match=missing):
        store.get(missing)
    for bad in ("../../etc/passwd", "AB" * 32, "ab" * 31):
        with pytest.raises(ObjectStoreError, match="not a sha256"):
            check_sha256(bad)
        with pytest.raises(ObjectStoreError):
            store.path_of(bad)


def test_delete_frees_bytes_and_sweep_removes_only_old_temporary_files(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path / "objects")
    sha = store.put(b"x" * 100).sha256
    assert store.delete(sha) == 100
    assert store.delete(sha) == 0
    assert not store.contains(sha)
    fan = tmp_path / "objects" / "ab"
    fan.mkdir(parents=True)
    old_tmp, new_tmp = fan / ".tmp-old", fan / ".tmp-new"
    old_tmp.write_bytes(b"1" * 10)
    new_tmp.write_bytes(b"2" * 20)
    past = time.time() - 3600
    os.utime(old_tmp, (past, past))
    assert store.sweep_temporary(older_than_seconds=60) == 10
    assert not old_tmp.exists() and new_tmp.exists()
    assert list(store.iter_objects()) == []
