"""Which untracked files a snapshot takes: the deny list, the size limit and their configuration."""

from __future__ import annotations

import pytest

from flordb_build.errors import ConfigError
from flordb_build.untracked import (
    DEFAULT_EXCLUDE,
    DEFAULT_MAX_FILE_BYTES,
    LeftOutReason,
    SnapshotPolicy,
    first_match,
)


@pytest.mark.parametrize(
    ("path", "pattern"),
    [
        (".env", ".env"),
        ("app/.env.local", ".env.*"),
        ("home/.ssh/id_ed25519.pub", "id_ed25519*"),
        (".ssh/config", ".ssh/"),
        ("deploy/certs/server.PEM", "*.pem"),
        ("gcp/credentials-prod.json", "credentials*.json"),
        (".aws/credentials", ".aws/"),
        ("conf/secrets.yaml", "secrets.*"),
        (".netrc", ".netrc"),
        ("db/.pgpass", ".pgpass"),
    ],
)
def test_default_deny_list_catches_secret_files_anywhere(path: str, pattern: str) -> None:
    assert first_match(path, DEFAULT_EXCLUDE) == pattern


@pytest.mark.parametrize("path", ["train.py", "environment.yml", "keys.py", "data/ssh_notes.txt", "src/env/x.py"])
def test_ordinary_files_are_not_secrets(path: str) -> None:
    assert first_match(path, DEFAULT_EXCLUDE) is None


def test_pattern_shapes_follow_gitignore() -> None:
    assert first_match("a/b/scratch/x.py", ["scratch/"]) == "scratch/"
    assert first_match("scratch", ["scratch/"]) is None  # a file named like the directory pattern
    assert first_match("data/raw/x.csv", ["data/raw"]) == "data/raw"  # anchored, and what lies below
    assert first_match("other/data/raw/x.csv", ["data/raw"]) is None
    assert first_match("configs/a.json", ["configs/*.json"]) == "configs/*.json"


def test_policy_checks_include_then_deny_list_then_size() -> None:
    policy = SnapshotPolicy.from_section({"snapshot_include": [".env.example"], "snapshot_max_file_bytes": 10})
    assert policy.check(".env.example", 1000) is None
    secret = policy.check(".env", 1)
    assert secret is not None and secret.reason is LeftOutReason.SECRET
    large = policy.check("data.bin", 11)
    assert large is not None and large.reason is LeftOutReason.TOO_LARGE and "11 bytes" in large.detail
    assert policy.check("data.bin", 10) is None
    assert SnapshotPolicy.from_section({}).max_file_bytes == DEFAULT_MAX_FILE_BYTES


@pytest.mark.parametrize(
    "section",
    [{"snapshot_exclude": ".env"}, {"snapshot_include": [1]}, {"snapshot_max_file_bytes": "5MB"},
     {"snapshot_max_file_bytes": -1}, {"snapshot_max_file_bytes": True}],
)
def test_bad_settings_are_config_errors_naming_the_key(section: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match=next(iter(section))):
        SnapshotPolicy.from_section(section)
