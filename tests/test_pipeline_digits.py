"""End to end: the digits pipeline (pipelines/digits, dodo.py) closes the loop
train -> infer -> review -> train, with doit and with Make, on real data and real processes."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import flordb_build as flor

from .conftest import GIT_ENV, Project

pytest.importorskip("torch")
pytest.importorskip("sklearn")

REPO = Path(__file__).resolve().parent.parent
DIGITS = REPO / "pipelines" / "digits"


def tool_env() -> dict[str, str]:
    """This interpreter's bin directory first on PATH, so recipes find flordb-build."""
    return {**os.environ, **GIT_ENV, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}


def install_pipeline(project: Project) -> None:
    """Copy dodo.py and pipelines/digits into the project, record doit runs, commit."""
    shutil.copy2(REPO / "dodo.py", project.root / "dodo.py")
    shutil.copytree(DIGITS, project.root / "pipelines" / "digits", ignore=shutil.ignore_patterns("data", "__pycache__"))
    project.write(".gitignore", ".doit.db*\n__pycache__/\n")
    project.cli("init")
    project.commit_all("digits pipeline")


def run_tool(root: Path, *args: str, timeout: float = 300) -> str:
    """Run a command (doit through this interpreter, or make) in ``root``; return its output."""
    command = [sys.executable, "-m", *args] if args[0] == "doit" else list(args)
    proc = subprocess.run(command, cwd=root, env=tool_env(), capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{args} exited {proc.returncode}:\n{output}"
    return output


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_page(url: str, server: subprocess.Popen[str], timeout: float = 90) -> str:
    """Poll ``url`` until the server answers; fail with its output if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            output = server.stdout.read() if server.stdout else ""
            raise AssertionError(f"the review app exited with {server.returncode}:\n{output}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return str(response.read().decode())
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.3)
    raise AssertionError(f"the review app did not answer at {url} within {timeout} s")


def start_server(root: Path, command: list[str]) -> subprocess.Popen[str]:
    """Start a server command in its own process group (so stop_server reaches its children)."""
    return subprocess.Popen(
        command, cwd=root, env=tool_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )


def stop_server(server: subprocess.Popen[str]) -> None:
    """SIGTERM the server's process group (the app exits cleanly on it), then reap it."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
    try:
        server.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.communicate()


def train_runs() -> pd.DataFrame:
    """One row per training run, oldest first, with what it trained on and how well."""
    frame = flor.dataframe("n_human_labels", "n_train", "train_items", "best_val_acc")
    return frame[frame["best_val_acc"].notna()].sort_values("tstamp").reset_index(drop=True)


def test_quickstart_demo_closes_the_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in GIT_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("FLORDB_BUILD_DB", raising=False)
    demo_dir = tmp_path / "demo"
    output = run_tool(REPO, sys.executable, str(DIGITS / "demo.py"), "--dir", str(demo_dir), timeout=600)
    monkeypatch.chdir(demo_dir)

    # Two training rounds: the second trained on the seed labels plus round 1's review.
    train = train_runs()
    assert train["task"].tolist() == ["train", "train"]
    labels = flor.dataframe("label")
    labels = labels[labels["label"].notna()]
    assert set(labels["task"]) == {"review_auto"}
    assert set(labels["filename"]) == {"pipelines/digits/review_auto.py"}
    reviewed = set(labels["item"].astype(int))
    assert len(reviewed) == 100
    round1_items, round2_items = (set(items) for items in train["train_items"])
    assert len(round1_items) == 50 and not round1_items & reviewed
    assert round2_items == round1_items | reviewed
    assert train["n_human_labels"].tolist() == [0, 100]

    # The reviewer labeled round 1's 100 least-confident predictions, with the held-out truth.
    predictions = flor.dataframe("prediction", "confidence")
    first = predictions[predictions["tstamp"] == predictions["tstamp"].min()]
    expected = set(first.sort_values(["confidence", "item"]).head(100)["item"].astype(int))
    assert reviewed == expected
    with np.load(demo_dir / "pipelines" / "digits" / "data" / "pool_truth.npz") as npz:
        truth = dict(zip(npz["pool_ids"].tolist(), npz["pool_labels"].tolist(), strict=True))
    given = dict(zip(labels["item"].astype(int).tolist(), labels["label"].astype(int).tolist(), strict=True))
    assert given == {item: truth[item] for item in given}

    # infer loaded a checkpoint of the newest training run, and that model scores exactly what
    # train logged for its epoch (the model registry restores the right weights).
    deployed = flor.dataframe("model_run", "model_epoch", "model_val_acc").dropna(subset=["model_run"])
    deployed = deployed.sort_values("tstamp").reset_index(drop=True)
    assert deployed["model_run"].tolist() == train["run_id"].tolist()
    val_acc = flor.dataframe("val_acc")
    for row in deployed.itertuples():
        logged = val_acc[(val_acc["run_id"] == row.model_run) & (val_acc["epoch"] == row.model_epoch)]["val_acc"]
        assert logged.tolist() == [pytest.approx(row.model_val_acc, abs=1e-12)]

    # Round 2 is at least as good as round 1 (seeded; it is in fact clearly better).
    assert train["best_val_acc"].iloc[1] >= train["best_val_acc"].iloc[0]
    assert deployed["model_val_acc"].iloc[1] >= deployed["model_val_acc"].iloc[0]
    shown = re.search(r"round 1 ([0-9.]+) -> round 2 ([0-9.]+)", output)
    assert shown is not None, output
    assert float(shown.group(1)) == pytest.approx(deployed["model_val_acc"].iloc[0], abs=1e-4)
    assert "corrected" in output and "review_auto" in output

    # The demo's last doit executes nothing.
    last_block = output.split("nothing changed")[1].split("==")[1]
    assert not re.search(r"^\s*\.  ", last_block, re.MULTILINE), last_block

    assert_hindsight_replayed(demo_dir, output, train)

    # Without the hindsight edit (which doit rightly sees as a change to train.py), a plain
    # `doit` executes nothing either: the replay wrote nothing into the project's data/.
    head = subprocess.run(["git", "show", "HEAD:pipelines/digits/train.py"], cwd=demo_dir, env=tool_env(),
                          capture_output=True, text=True, check=True).stdout
    (demo_dir / "pipelines" / "digits" / "train.py").write_text(head, encoding="utf-8")
    run_tool(demo_dir, "doit")
    statuses = flor.query(
        "SELECT t.task, t.status FROM tasks t WHERE t.pipeline_id = "
        "(SELECT pipeline_id FROM pipelines ORDER BY started DESC LIMIT 1) ORDER BY t.task"
    )
    assert dict(zip(statuses["task"], statuses["status"], strict=True)) == {
        "infer": "up-to-date", "prep": "up-to-date", "train": "up-to-date"
    }
    assert len(train_runs()) == 2


def assert_hindsight_replayed(demo_dir: Path, output: str, train: pd.DataFrame) -> None:
    """The demo's hindsight step: an uncommitted flor.log in train.py, replayed into both rounds."""
    status = subprocess.run(["git", "status", "--porcelain"], cwd=demo_dir, env=tool_env(),
                            capture_output=True, text=True, check=True).stdout
    assert status.splitlines() == [" M pipelines/digits/train.py"]
    assert "# hindsight: added after both rounds ran" in (demo_dir / "pipelines/digits/train.py").read_text()
    assert "nondeterminism" not in output and "FAILED" not in output, output

    # One replayed value per training round, in the recorded runs' rows; the replay added no run.
    f1 = flor.dataframe("val_macro_f1")
    f1 = f1[f1["val_macro_f1"].notna()].sort_values("tstamp").reset_index(drop=True)
    assert f1["run_id"].tolist() == train["run_id"].tolist()
    assert f1["task"].tolist() == ["train", "train"]
    assert all(0.5 < value <= 1.0 for value in f1["val_macro_f1"]), f1
    sources = flor.query("SELECT DISTINCT source FROM logs WHERE name = 'val_macro_f1'")
    assert sources["source"].tolist() == ["replay"]
    runs = flor.query("SELECT task, count(*) AS n FROM runs GROUP BY task")
    assert dict(zip(runs["task"], runs["n"], strict=True)) == {"prep": 1, "train": 2, "infer": 2, "review_auto": 1}
    assert "6 before the replay, 6 after" in output

    # Recompute it independently (sklearn's macro-F1) from each run's final checkpoint.
    from sklearn.metrics import f1_score

    spec = importlib.util.spec_from_file_location("demo_digits", demo_dir / "pipelines" / "digits" / "digits.py")
    assert spec is not None and spec.loader is not None
    digits = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(digits)
    with np.load(demo_dir / "pipelines" / "digits" / "data" / "split.npz") as npz:
        x_val = digits.to_tensor(npz["images"][npz["val_ids"]], "cpu")
        y_val = npz["val_labels"]
    for row in f1.itertuples():
        model = digits.build_model()
        flor.load_checkpoint(row, model=model)  # a run-level row: the run's final checkpoint
        predicted = model(x_val).argmax(dim=1).numpy()
        assert row.val_macro_f1 == pytest.approx(f1_score(y_val, predicted, average="macro"), abs=1e-6)


def test_make_retrains_only_after_new_labels(project: Project) -> None:
    install_pipeline(project)
    # Script arguments pass through `flordb-build exec` to the scripts' flor.arg.
    make = ["make", "-C", "pipelines/digits", f"PYTHON={sys.executable}", "TRAIN_ARGS=epochs=8"]
    run_tool(project.root, *make, "review_auto", "REVIEW_ARGS=n=30")
    assert len(train_runs()) == 1

    output = run_tool(project.root, *make, "train")
    train = train_runs()
    assert len(train) == 2, output
    assert train["n_human_labels"].tolist() == [0, 30]
    assert flor.dataframe("epochs")["epochs"].dropna().tolist() == [8, 8]
    assert train["task"].tolist() == ["train", "train"]

    output = run_tool(project.root, *make, "train")  # nothing labeled since: train is up to date
    assert "--task train" not in output, output
    assert len(train_runs()) == 2


def test_doit_serve_saves_labels_that_the_next_train_uses(project: Project) -> None:
    install_pipeline(project)
    run_tool(project.root, "doit", "epochs=5", "infer")
    port = free_port()
    server = start_server(project.root, [sys.executable, "-m", "doit", "epochs=5", f"port={port}", "n=5", "serve"])
    try:
        page = wait_for_page(f"http://127.0.0.1:{port}/", server)
        items = [int(i) for i in re.findall(r'data-item="(\d+)"', page)]
        assert len(items) == 5
        predicted = {int(i): int(p) for i, p in re.findall(r"item (\d+) &middot; predicted <b>(\d)</b>", page)}
        corrected_item = items[0]
        new_label = (predicted[corrected_item] + 1) % 10
        form = [("items", str(i)) for i in items]
        form += [(f"label-{i}", str(new_label if i == corrected_item else predicted[i])) for i in items]
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/save", data=urllib.parse.urlencode(form).encode(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            after = response.read().decode()
        assert "Saved 5 labels (1 corrected)" in after
        assert not set(items) & {int(i) for i in re.findall(r'data-item="(\d+)"', after)}
    finally:
        stop_server(server)

    labels = flor.dataframe("label", "corrected")
    labels = labels[labels["label"].notna()]
    assert sorted(labels["item"].astype(int)) == sorted(items)
    assert set(labels["task"]) == {"serve"}
    row = labels[labels["item"] == corrected_item].iloc[0]
    assert (int(row["label"]), bool(row["corrected"])) == (new_label, True)
    assert labels["corrected"].sum() == 1

    run_tool(project.root, "doit", "epochs=5", "train")
    newest = train_runs().iloc[-1]
    assert newest["n_human_labels"] == 5
    assert set(items) <= set(newest["train_items"])
