"""Objects in S3 (issue 17.3): a real S3 endpoint (moto_server, a subprocess on 127.0.0.1) behind the cache.

The endpoint reaches s3fs the way it reaches any botocore client: ``AWS_ENDPOINT_URL`` in the
environment, with the test credentials in ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``. The
bucket is versioned, so every write to it leaves a version: counting versions counts writes.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("s3fs", reason="the remote extra (fsspec, s3fs) is not installed")
boto3 = pytest.importorskip("boto3", reason="moto[server] (with boto3) is not installed")

import flordb_build as flor  # noqa: E402
from flordb_build.config import config_of_root  # noqa: E402
from flordb_build.errors import ConfigError, ObjectCorruptError, ObjectMissingError, ObjectStoreError  # noqa: E402
from flordb_build.objects import ObjectStore, sha256_of  # noqa: E402
from flordb_build.remote_objects import RemoteObjects  # noqa: E402

from .conftest import Project  # noqa: E402

BUCKET = "flor-objects"
URL = f"s3://{BUCKET}/team"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server on 127.0.0.1, ready to answer (polled over HTTP, no fixed sleep)."""
    server = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    if server is None:
        pytest.skip("moto[server] is not installed (no moto_server)")
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [server, "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT
        )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    try:
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"moto_server exited {proc.returncode}: {log.read_text()}")
            try:
                with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"moto_server did not answer on {endpoint}: {log.read_text()}"
                    ) from None
                time.sleep(0.05)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture
def s3(moto_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """An empty versioned bucket; the environment points every botocore client (and s3fs) at it."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    client = boto3.client("s3")
    _reset(moto_endpoint)
    client.create_bucket(Bucket=BUCKET)
    client.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    return client


def _reset(endpoint: str) -> None:
    """Forget every bucket of the previous test (moto's own reset endpoint)."""
    req = urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")
    with urllib.request.urlopen(req, timeout=10):
        pass


def _versions(client: Any, sha256: str | None = None) -> list[dict[str, Any]]:
    listed = client.list_object_versions(Bucket=BUCKET).get("Versions", [])
    return [v for v in listed if sha256 is None or v["Key"].endswith("/" + sha256)]


def _store(root: Path) -> ObjectStore:
    return ObjectStore(root / "objects", RemoteObjects(URL))


def test_a_put_that_finds_the_content_in_s3_writes_nothing(s3: Any, tmp_path: Path) -> None:
    data = os.urandom(4096)
    machine_a, machine_b = _store(tmp_path / "a"), _store(tmp_path / "b")
    first = machine_a.put(data)
    assert first.created and first.sha256 == sha256_of(data)
    [version] = _versions(s3)
    assert version["Key"] == f"team/{first.sha256[:2]}/{first.sha256}"
    assert machine_a.put(data).created is False  # the local hit: nothing uploaded either
    # another machine, its own empty cache: it writes its cache entry, but nothing to S3
    assert machine_b.put(data).created
    assert len(_versions(s3)) == 1
    assert machine_b.path_of(first.sha256).read_bytes() == data


def test_a_corrupt_remote_object_is_refused_and_never_cached(s3: Any, tmp_path: Path) -> None:
    data = b"checkpoint bytes " * 100
    sha = _store(tmp_path / "a").put(data).sha256
    s3.put_object(Bucket=BUCKET, Key=f"team/{sha[:2]}/{sha}", Body=b"tampered")
    fresh = _store(tmp_path / "fresh")
    with pytest.raises(
        ObjectCorruptError, match=f"'{sha}' at 's3://{BUCKET}/team' is corrupted.*nothing was cached"
    ):
        fresh.get(sha)
    assert not fresh.path_of(sha).exists() and list(fresh.iter_objects()) == []
    with pytest.raises(
        ObjectMissingError, match="missing from '.*fresh/objects' and from 's3://flor-objects/team'"
    ):
        fresh.get("0" * 64)
    # a machine whose cache is intact reads its own copy; an intact remote copy heals a damaged cache
    s3.put_object(Bucket=BUCKET, Key=f"team/{sha[:2]}/{sha}", Body=data)
    assert fresh.get(sha) == data and fresh.path_of(sha).read_bytes() == data
    fresh.path_of(sha).write_bytes(b"bit rot in the cache")
    assert fresh.get(sha) == data and fresh.path_of(sha).read_bytes() == data


def _create_after_barrier(barrier: Any, root: str, data: bytes, results: Any) -> None:
    local = ObjectStore(Path(root) / "objects")  # each process its own cache, no remote check first
    sha = local.put(data).sha256
    remote = RemoteObjects(URL)
    barrier.wait()
    results.put(remote.create(sha, local.path_of(sha)))


def test_two_processes_creating_one_object_at_once_leave_one_intact_object(s3: Any, tmp_path: Path) -> None:
    data = os.urandom(1 << 20)
    sha = sha256_of(data)
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters, like two machines
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=_create_after_barrier, args=(barrier, str(tmp_path / f"m{i}"), data, results))
        for i in range(2)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
        assert proc.exitcode == 0
    created = sorted(results.get(timeout=10) for _ in procs)
    assert created == [False, True]  # exactly one wrote; the other's conditional create wrote nothing
    assert len(_versions(s3, sha)) == 1
    body = s3.get_object(Bucket=BUCKET, Key=f"team/{sha[:2]}/{sha}")["Body"].read()
    assert sha256_of(body) == sha


def test_an_unreachable_store_is_an_object_store_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s3fs.S3FileSystem.clear_instance_cache()  # fsspec reuses instances, which keep their endpoint
    try:
        store = ObjectStore(tmp_path / "objects", RemoteObjects(URL))
        with pytest.raises(ObjectStoreError, match=f"Could not download object '{'a' * 64}' from '{URL}'"):
            store.get("a" * 64)
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


def test_a_file_url_store_behaves_the_same_without_s3(tmp_path: Path) -> None:
    url = (tmp_path / "shared").as_uri()
    data = b"state" * 1000
    machine_a = ObjectStore(tmp_path / "a", RemoteObjects(url))
    sha = machine_a.put(data).sha256
    remote_path = tmp_path / "shared" / sha[:2] / sha
    assert remote_path.read_bytes() == data
    assert [p.name for p in remote_path.parent.iterdir()] == [sha]  # no temporary name left behind
    mtime = remote_path.stat().st_mtime_ns
    machine_b = ObjectStore(tmp_path / "b", RemoteObjects(url))
    machine_b.put(data)
    assert remote_path.stat().st_mtime_ns == mtime  # found there: not written again
    machine_c = ObjectStore(tmp_path / "c", RemoteObjects(url))
    assert machine_c.get(sha) == data and machine_c.path_of(sha).read_bytes() == data
    remote_path.write_bytes(b"x" * len(data))
    with pytest.raises(ObjectCorruptError, match="nothing was cached"):
        ObjectStore(tmp_path / "d", RemoteObjects(url)).get(sha)
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").rglob("*"))


def test_the_objects_key_takes_fsspec_urls_only(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[tool.flordb_build]\nobjects = "s3://bucket/prefix/"\n')
    assert config_of_root(tmp_path, False).objects == "s3://bucket/prefix"
    (tmp_path / "pyproject.toml").write_text('[tool.flordb_build]\nobjects = "shared/objects"\n')
    with pytest.raises(ConfigError, match="must be an fsspec URL such as"):
        config_of_root(tmp_path, False)
    (tmp_path / "pyproject.toml").write_text(
        '[tool.flordb_build]\nobjects = "s3://AKIA:hunter2@bucket/prefix"\n'
    )
    with pytest.raises(ConfigError, match="must not carry credentials") as refused:
        config_of_root(tmp_path, False)
    assert "hunter2" not in str(refused.value)


# -- end to end: record on one machine, replay on another that never saw the run ------------------

PYPROJECT = f"""\
[tool.flordb_build]
objects = "{URL}"
checkpoint_every = 1
"""

RECORDED = """\
import flordb_build as flor

state = {"w": 0}
with flor.checkpointing(state=state):
    for epoch in flor.loop("epoch", range(3)):
        for step in flor.loop("step", range(4)):
            state["w"] += step + epoch
        flor.log("val", state["w"])
flor.log("final", state["w"])
"""

TODAY = RECORDED.replace(
    '        flor.log("val", state["w"])\n',
    '        flor.log("val", state["w"])\n        flor.log("w2", state["w"] * 2)\n',
)


def _checkpoint_shas(db: Path) -> set[str]:
    with sqlite3.connect(db) as conn:
        return {sha for (sha,) in conn.execute("SELECT sha256 FROM checkpoints")}


def test_a_replay_on_a_machine_that_never_recorded_the_run_restores_from_s3(
    s3: Any, project: Project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # machine A records, its checkpoints going to S3
    project.write(".gitignore", ".flor/\n")
    project.write("pyproject.toml", PYPROJECT)
    project.write("train.py", RECORDED)
    project.commit_all("recorded version")
    project.run("train.py")
    shas = _checkpoint_shas(project.root / ".flor" / "flor.db")
    assert len(shas) >= 3
    remote_names = {v["Key"].rsplit("/", 1)[-1] for v in _versions(s3)}
    assert shas <= remote_names  # the block's exit waited for the uploads

    # machine C: a fresh clone with the shadow branch, its store rebuilt, no object of its own
    clone = Project(tmp_path / "clone")
    subprocess.run(
        ["git", "clone", "-q", str(project.root), str(clone.root)], check=True, capture_output=True
    )
    clone.git("fetch", "-q", "origin", "flor.shadow:flor.shadow")
    monkeypatch.chdir(clone.root)
    clone.cli("rebuild")
    assert _checkpoint_shas(clone.root / ".flor" / "flor.db") == shas  # rebuild sees the remote objects
    assert not (clone.root / ".flor" / "objects").exists() or not any(
        (clone.root / ".flor" / "objects").rglob("*")
    )

    clone.write("train.py", TODAY)
    clone.commit_all("today")
    done = clone.cli("replay", "w2", "--yes")
    assert "FAILED" not in done.stdout, done.stdout + done.stderr
    df = flor.dataframe("val", "w2")
    assert len(df) == 3 and df["w2"].notna().all()
    assert (df["w2"] == 2 * df["val"]).all()
    assert sorted(df["val"].tolist()) == [6, 16, 30]
    with sqlite3.connect(clone.root / ".flor" / "flor.db") as conn:
        replayed = conn.execute(
            "SELECT COUNT(*) FROM logs WHERE source = 'replay' AND name = 'w2'"
        ).fetchone()[0]
    assert replayed == 3
    # the restored checkpoints came from S3 and were verified into the clone's cache
    cached = {info.sha256 for info in ObjectStore(clone.root / ".flor" / "objects").iter_objects()}
    assert cached and cached <= shas


def test_objects_a_run_could_not_upload_are_pushed_later_by_push_objects(s3: Any, project: Project) -> None:
    s3.delete_bucket(Bucket=BUCKET)  # the store is unreachable while the run records
    project.write("pyproject.toml", PYPROJECT)
    project.write("train.py", RECORDED)
    project.commit_all("recorded version")
    proc = project.run("train.py")
    assert (
        "were not uploaded to 's3://flor-objects/team'" in proc.stderr
        and "flordb-build push-objects" in proc.stderr
    )
    shas = _checkpoint_shas(project.root / ".flor" / "flor.db")
    assert len(shas) >= 3  # the run itself lost nothing: its checkpoints are in the local cache

    s3.create_bucket(Bucket=BUCKET)
    s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    local = {info.sha256 for info in ObjectStore(project.root / ".flor" / "objects").iter_objects()}
    assert project.cli("push-objects").stdout == f"uploaded {len(local)} objects to {URL}\n"
    assert {v["Key"].rsplit("/", 1)[-1] for v in _versions(s3)} == local >= shas
    assert project.cli("push-objects").stdout == f"uploaded 0 objects to {URL}\n"
    assert len(_versions(s3)) == len(local)
