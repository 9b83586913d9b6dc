"""``[tool.flordb_build]`` -> the frozen, typed :class:`Config`: every key, its default, and misspellings."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from flordb_build.config import SETTINGS, Config, load_config
from flordb_build.errors import ConfigError


def _config(tmp_path: Path, body: str) -> Config:
    (tmp_path / "pyproject.toml").write_text("[tool.flordb_build]\n" + body)
    return load_config(tmp_path)


def test_defaults_when_the_section_says_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLORDB_BUILD_DB", raising=False)
    config = _config(tmp_path, "")
    assert config.db_path == tmp_path.resolve() / ".flor" / "flor.db" and config.projid == tmp_path.name
    assert (config.flush_seconds, config.checkpoint_epsilon) == (0.5, 0.0667)
    assert (config.checkpoint_budget_per_run, config.checkpoint_budget_per_project) == (None, None)
    assert (config.env_vars, config.snapshot_exclude, config.snapshot_include, config.replay_links) == ((),) * 4
    assert config.snapshot_max_file_bytes == 5 * 1024 * 1024
    assert (config.replay_warm, config.replay_keep_warm) == (True, 600.0)
    assert (config.replay_executor, config.ray_address) == ("local", None)


def test_every_key_is_parsed_into_a_typed_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLORDB_BUILD_DB", raising=False)
    config = _config(
        tmp_path,
        """\
db = "store/x.db"
projid = "demo"
flush_seconds = 2
checkpoint_epsilon = 0.5
checkpoint_budget_per_run = "2GiB"
checkpoint_budget_per_project = 1000
env_vars = ["MY_VAR"]
snapshot_exclude = ["*.bin"]
snapshot_include = [".env.example"]
snapshot_max_file_bytes = 10
replay_links = ["data"]
replay_warm = false
replay_keep_warm = 0
replay_executor = "ray"
ray_address = "10.0.0.5:6379"
""",
    )
    assert config.db_path == tmp_path.resolve() / "store" / "x.db" and config.projid == "demo"
    assert config.flush_seconds == 2.0 and isinstance(config.flush_seconds, float)
    assert config.checkpoint_epsilon == 0.5
    assert (config.checkpoint_budget_per_run, config.checkpoint_budget_per_project) == (2 * 2**30, 1000)
    assert (config.env_vars, config.snapshot_exclude, config.snapshot_include) == (("MY_VAR",), ("*.bin",), (".env.example",))
    assert (config.snapshot_max_file_bytes, config.replay_links) == (10, ("data",))
    assert (config.replay_warm, config.replay_keep_warm) == (False, 0.0)
    assert (config.replay_executor, config.ray_address) == ("ray", "10.0.0.5:6379")
    # Each key of the table is a field (db sets db_path), and the config cannot change under a reader.
    assert set(SETTINGS) - {"db"} <= {f.name for f in dataclasses.fields(Config)}
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.replay_warm = True  # type: ignore[misc]


@pytest.mark.parametrize(
    ("typo", "meant"),
    [("replay_link", "replay_links"), ("checkpoint_epsilion", "checkpoint_epsilon"), ("envvars", "env_vars"),
     ("replay_keepwarm", "replay_keep_warm"), ("flush_second", "flush_seconds")],
)
def test_an_unknown_key_names_the_closest_one(tmp_path: Path, typo: str, meant: str) -> None:
    with pytest.raises(ConfigError, match=rf"Unknown key '{typo}' in \[tool.flordb_build\]; did you mean '{meant}'\?"):
        _config(tmp_path, f'{typo} = ["data"]\n')


def test_an_unknown_key_nothing_like_a_setting_lists_them(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Unknown key 'zzz'.*known keys are db, projid,"):
        _config(tmp_path, "zzz = 1\n")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("replay_warm = 'no'\n", "'replay_warm' in \\[tool.flordb_build\\] must be true or false"),
        ("replay_keep_warm = -1\n", "'replay_keep_warm' .* must be a number of seconds >= 0"),
        ("replay_links = ['/abs']\n", "'replay_links' .* relative to the project root"),
        ("env_vars = 'HOME'\n", "'env_vars' .* list of variable names"),
        ("snapshot_max_file_bytes = -1\n", "'snapshot_max_file_bytes' .* whole number of bytes"),
        ("snapshot_exclude = [1]\n", "'snapshot_exclude' .* list of path patterns"),
        ("checkpoint_budget_per_run = 'lots'\n", "'checkpoint_budget_per_run' .* positive size"),
        ("flush_seconds = 0\n", "'flush_seconds' .* number in \\(0, 60\\]"),
        ("busy_timeout_seconds = 0\n", "'busy_timeout_seconds' .* number in \\(0, 3600\\]"),
        ("checkpoint_every = 0\n", "'checkpoint_every' .* whole number >= 1"),
        ("checkpoint_every = 1.5\n", "'checkpoint_every' .* whole number >= 1"),
        ("projid = ''\n", "'projid' .* non-empty string"),
        ("db = 3\n", "'db' .* path string"),
        ("replay_executor = 'dask'\n", "'replay_executor' .* one of 'local', 'ray', got 'dask'"),
        ("ray_address = ''\n", "'ray_address' .* non-empty string"),
    ],
)
def test_a_bad_value_is_refused_when_the_config_loads(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, body)


def test_a_misspelled_key_stops_a_recording_script(project: Any) -> None:
    """A typo no longer passes silently: the script's first recording call names the key it meant."""
    project.write("pyproject.toml", '[tool.flordb_build]\nreplay_link = ["data"]\n')
    project.write("train.py", "import flordb_build as flor\nflor.log('x', 1)\n")
    out = subprocess.run([sys.executable, "train.py"], cwd=project.root, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "did you mean 'replay_links'?" in out.stderr
