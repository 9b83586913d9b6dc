"""Secrets stay in the process: what looks secret, how it is masked, and that no copy is written anywhere."""

from __future__ import annotations

import json
import sqlite3
import subprocess

import pytest

import flordb_build as flor
from flordb_build.config import load_config
from flordb_build.dag import BuildRecorder, DagNode
from flordb_build.dag._record import TaskRecord, TaskStatus
from flordb_build.environment import select_env_vars
from flordb_build.errors import ReplayError
from flordb_build.redaction import (
    MASK,
    contains_mask,
    is_secret_name,
    mask_url_secrets,
    redact_argv,
    redact_command,
    redact_mapping,
)
from flordb_build.store import Store
from tests.conftest import Project

SECRETS = ("sk-live-1234", "hunter2", "urlpw99", "envpw77")


@pytest.mark.parametrize(
    "name",
    ["api_key", "db_password", "API_TOKEN", "x_token", "Secret", "PASSWD", "my_credentials", "dbPassword",
     "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "GOOGLE_APPLICATION_CREDENTIALS", "hf_token", "--db-password",
     "apikey", "APIKey", "basic_auth", "db_pass", "client_secret_file"],
)
def test_secret_names(name: str) -> None:
    assert is_secret_name(name)


@pytest.mark.parametrize(
    "name", ["lr", "max_tokens", "num_passes", "key_dim", "token_budget", "TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS",
             "bypass", "keys", "author", "monkey"],
)
def test_names_that_only_contain_a_marker_are_not_secret(name: str) -> None:
    assert not is_secret_name(name)


def test_url_passwords_and_secret_url_parameters_are_masked() -> None:
    assert mask_url_secrets("postgres://me:p@ss@db:5432/x?sslmode=require") == "postgres://me:***@db:5432/x?sslmode=require"
    assert mask_url_secrets("https://h/p?access_token=abc&page=2") == "https://h/p?access_token=***&page=2"
    assert mask_url_secrets("ssh://git@github.com/x and lr=0.1") == "ssh://git@github.com/x and lr=0.1"


def test_mappings_argv_and_command_lines_are_masked_alike() -> None:
    assert redact_mapping({"api_key": "x", "cfg": {"password": "p", "url": "http://u:p@h"}, "n": 3, "none": None}) == {
        "api_key": MASK, "cfg": {"password": MASK, "url": "http://u:***@h"}, "n": 3, "none": None,
    }
    assert redact_argv(["doit", "API_TOKEN=abc", "lr=0.1", "--db-password=x", "--password", "p", "--verbose",
                        "url=http://a:b@c"]) == [
        "doit", "API_TOKEN=***", "lr=0.1", "--db-password=***", "--password", MASK, "--verbose", "url=http://a:***@c"
    ]
    assert redact_command(
        "python train.py --kwargs api_key=sk-1 lr=0.1 \"db_password=a b\" --token tok -x 1 DB=mysql://u:p@h/d"
    ) == 'python train.py --kwargs api_key=*** lr=0.1 "db_password=***" --token *** -x 1 DB=mysql://u:***@h/d'
    assert redact_command("python: m.f(*(), **{'api_key': 'x', 'lr': 0.1})") == "python: m.f(*(), **{'api_key': '***', 'lr': 0.1})"
    assert contains_mask("postgres://me:***@db") and contains_mask({"a": [MASK]}) and not contains_mask("x")


def test_recorded_env_vars_mask_url_passwords() -> None:
    assert select_env_vars({"FLOR_DB_URL": "postgres://me:pw@h/db", "FLOR_API_KEY": "k", "TOKENIZERS_PARALLELISM": "0"}) == {
        "FLOR_DB_URL": "postgres://me:***@h/db", "TOKENIZERS_PARALLELISM": "0",
    }


SCRIPT = """
import os, sys
import flordb_build as flor
key = flor.arg("api_key", "none")
password = flor.arg("db_password", "none")
url = flor.arg("db_url", "")
print("received", key, password, url)
for epoch in flor.loop("epoch", range(2)):
    flor.log("loss", 1 / (epoch + 1))
"""


def everything_written(project: Project) -> bytes:
    """Every byte flordb_build could have written: the .flor directory and every git object, decompressed."""
    flor_dir = b"".join(p.read_bytes() for p in sorted((project.root / ".flor").rglob("*")) if p.is_file())
    objects = subprocess.run(
        ["git", "cat-file", "--batch-all-objects", "--batch"], cwd=project.root, capture_output=True, check=True
    ).stdout
    return flor_dir + objects


def test_secret_args_and_url_passwords_are_written_nowhere(project: Project) -> None:
    project.write("train.py", SCRIPT)
    project.commit_all("add training")
    proc = project.run(
        "train.py", "--kwargs", "api_key=sk-live-1234", "db_password=hunter2", "db_url=mysql://me:urlpw99@db/x",
        env={"FLOR_DB_URL": "postgres://me:envpw77@h/db"},
    )
    # The script itself gets the real values.
    assert "received sk-live-1234 hunter2 mysql://me:urlpw99@db/x" in proc.stdout
    written = everything_written(project)
    assert not [secret for secret in SECRETS if secret.encode() in written]
    conn = sqlite3.connect(project.root / ".flor" / "flor.db")
    args = json.loads(conn.execute("SELECT args FROM runs").fetchone()[0])
    env = json.loads(conn.execute("SELECT env FROM envs").fetchone()[0])
    conn.close()
    assert args == {"api_key": MASK, "db_password": MASK, "db_url": "mysql://me:***@db/x"}
    assert env["env_vars"]["FLOR_DB_URL"] == "postgres://me:***@h/db"
    run_level = flor.dataframe()
    assert run_level[["api_key", "db_password", "db_url"]].iloc[0].tolist() == [MASK, MASK, "mysql://me:***@db/x"]
    message = project.git("log", "-1", "--format=%B", "flor.shadow")
    assert "api_key=*** db_password=*** db_url=mysql://me:***@db/x" in message


def test_pipeline_argv_and_task_actions_are_masked(project: Project) -> None:
    store = Store.open(load_config())
    recorder = BuildRecorder(store, "p1")
    command = "python train.py --kwargs api_key=sk-live-1234 db_url=mysql://me:urlpw99@db/x"
    node = DagNode("train", actions=[command])
    recorder.start_pipeline("doit", ["doit", "--db-password", "hunter2"], {"tasks": [node.to_json()]})
    recorder.add_dag_node(node)
    error = f"command '{command}' exited with status 1"
    recorder.record_task(TaskRecord("train", TaskStatus.FAILED, 0.0, 1.0, actions=[command], error=error), [])
    recorder.close()
    dump = "\n".join(sqlite3.connect(load_config().db_path).iterdump())
    assert not [secret for secret in SECRETS if secret in dump]
    assert "api_key=***" in dump and "mysql://me:***@db/x" in dump


REPLAYED = """
import os
import flordb_build as flor
key = flor.arg("api_key", os.environ.get("SERVICE_KEY", "no key"))
scale = flor.arg("scale", 1)
flor.log("key_seen", key)
for epoch in flor.loop("epoch", range(2)):
    flor.log("x", epoch * scale)
"""


def test_a_replay_never_passes_a_mask_as_the_value(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    project.write("train.py", REPLAYED.replace('flor.log("key_seen", key)\n', ""))
    project.commit_all("add training")
    project.run("train.py", "--kwargs", "api_key=sk-live-1234", "scale=3",
                env={"FLOR_DB_URL": "postgres://me:envpw77@h/db"})
    project.write("train.py", REPLAYED)  # today's version logs what the script received
    monkeypatch.setenv("SERVICE_KEY", "key of the replaying shell")
    monkeypatch.setenv("FLOR_DB_URL", "postgres://me:replaypw@h/db")

    report = flor.replay("key_seen", quiet=True)

    assert report.ok
    # The masked arg took the script's default, evaluated by the replay; the other arg came back as recorded.
    assert flor.dataframe("key_seen")["key_seen"].tolist() == ["key of the replaying shell"]
    assert flor.dataframe("x")["x"].tolist() == [0, 3]
    notes = [note for outcome in report.outcomes for note in outcome.notes]
    assert any("arg 'api_key' was recorded masked" in note for note in notes)
    assert not [secret for secret in SECRETS if secret.encode() in everything_written(project)]


def test_a_masked_arg_without_default_fails_the_replay_with_directions(project: Project) -> None:
    project.write("train.py", 'import flordb_build as flor\nkey = flor.arg("api_key")\nflor.log("x", 1)\n')
    project.commit_all("add training")
    project.run("train.py", "--kwargs", "api_key=sk-live-1234")
    project.write("train.py", 'import flordb_build as flor\nkey = flor.arg("api_key")\nflor.log("x", 1)\nflor.log("n", len(key))\n')
    with pytest.raises(ReplayError, match="arg 'api_key' was recorded masked .* give it one"):
        flor.replay("n", quiet=True)
    assert flor.dataframe("n")["n"].isna().all()  # nothing computed from the mask reached the store
