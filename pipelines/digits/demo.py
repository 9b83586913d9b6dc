"""Quick start: the closed loop train -> infer -> review -> train, two rounds, end to end.

    python pipelines/digits/demo.py                # a fresh project in a temporary directory
    python pipelines/digits/demo.py --dir ~/digits  # ... or in a directory of your choice

It copies ``dodo.py`` and ``pipelines/digits/`` into a new git repository, configures doit to
record build context (``flordb-build init``), and runs the pipeline with doit:

    round 1   doit review_auto   prep, train on the seed labels, infer, simulated review
    round 2   doit infer         train again (the label store changed), infer
    check     doit infer         nothing changed: every task is up to date, nothing runs

Then it prints the validation accuracy of each round and a dataframe joining the round-1
predictions with the labels the reviewer gave, and does what a user does in hindsight:

    edit      train.py gains flor.log("val_macro_f1", ...) after its epoch loop (left uncommitted)
    replay    flordb-build replay val_macro_f1 --task train --yes
              both recorded training runs replay from their final checkpoints (no retraining)
    query     flor.dataframe("val_macro_f1", "best_val_acc"): the new metric for both rounds

Everything it recorded stays in the project's ``.flor/flor.db`` for you to query:
``cd DIR && flordb-build dataframe val_acc``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
GIT_IDENTITY = ["-c", "user.name=flordb_build demo", "-c", "user.email=demo@localhost"]
#: The project's flordb_build settings. A replay runs an old snapshot in a temporary directory,
#: and the split prep.py wrote is git-ignored data the snapshot lacks: link it in. Only that
#: input, so that the replayed script's own output (data/train.json) never touches the project's.
PYPROJECT = """\
[tool.flordb_build]
replay_links = ["pipelines/digits/data/split.npz"]
"""
#: The name the hindsight statement logs, the line it goes after, and the statement itself.
HINDSIGHT_NAME = "val_macro_f1"
HINDSIGHT_ANCHOR = '    flor.log("best_val_acc", best_acc)\n'
HINDSIGHT_LINES = """\
    # hindsight: added after both rounds ran -- macro-F1 of the final model on the validation set
    # (F1 of digit d = 2 TP / (predicted d + labeled d); the model after the last epoch)
    flor.log("val_macro_f1", float(torch.stack([
        2 * ((predicted == d) & (y_val == d)).sum() / ((predicted == d).sum() + (y_val == d).sum())
        for predicted in [model(x_val).argmax(dim=1)]
        for d in range(N_CLASSES)
    ]).mean()))
"""


def make_project(directory: Path | None) -> Path:
    """A new git repository holding this pipeline (dodo.py + pipelines/digits), not committed yet."""
    if directory is None:
        directory = Path(tempfile.mkdtemp(prefix="flordb-digits-"))
    directory = directory.expanduser().resolve()
    if directory.exists() and any(directory.iterdir()):
        raise SystemExit(f"demo: '{directory}' is not empty; pass --dir with a new or empty directory.")
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy2(REPO / "dodo.py", directory / "dodo.py")
    shutil.copytree(HERE, directory / "pipelines" / "digits", ignore=shutil.ignore_patterns("data", "__pycache__"))
    (directory / ".gitignore").write_text(".doit.db*\n__pycache__/\n", encoding="utf-8")
    (directory / "pyproject.toml").write_text(PYPROJECT, encoding="utf-8")
    subprocess.run(["git", *GIT_IDENTITY, "init", "-q", "-b", "main"], cwd=directory, check=True)
    return directory


def commit_all(project: Path, message: str) -> None:
    """Commit everything in the project (the demo's own repository, never the caller's)."""
    git = ["git", *GIT_IDENTITY]
    subprocess.run([*git, "add", "-A"], cwd=project, check=True)
    subprocess.run([*git, "commit", "-q", "-m", message], cwd=project, check=True)


def add_hindsight_log(project: Path) -> str:
    """Insert the hindsight flor.log into the project's train.py (a work-tree edit); return the diff."""
    train = project / "pipelines" / "digits" / "train.py"
    source = train.read_text(encoding="utf-8")
    if source.count(HINDSIGHT_ANCHOR) != 1:
        raise SystemExit(f"demo: '{train}' does not hold the line {HINDSIGHT_ANCHOR.strip()!r} once; "
                         "the hindsight edit needs it as its anchor.")
    train.write_text(source.replace(HINDSIGHT_ANCHOR, HINDSIGHT_ANCHOR + HINDSIGHT_LINES), encoding="utf-8")
    diff = subprocess.run(["git", "diff", "-U1", "--", "pipelines/digits/train.py"], cwd=project,
                          capture_output=True, text=True, check=True)
    return diff.stdout


def run_step(project: Path, *args: str) -> str:
    """Run a command in the project with this interpreter's tools; echo and return its output."""
    started = time.perf_counter()
    proc = subprocess.run(  # stderr into stdout: progress lines and results in the order they came
        [sys.executable, *args], cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=tool_env(), check=False,
    )
    output = proc.stdout
    print(f"$ {' '.join(['python', *args])}   ({time.perf_counter() - started:.1f} s)")
    print("  " + output.strip().replace("\n", "\n  "))
    if proc.returncode != 0:
        raise SystemExit(f"demo: '{' '.join(args)}' failed with exit status {proc.returncode} in '{project}'.")
    return output


def tool_env() -> dict[str, str]:
    """The environment with this interpreter's bin directory first (flordb-build for doit/make)."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}


def round_summary() -> pd.DataFrame:
    """One row per training round: its labels, its best epoch, and the checkpoint infer deployed."""
    import flordb_build as flor

    train = flor.dataframe("n_human_labels", "n_train", "best_val_acc")
    train = train[train["best_val_acc"].notna()].sort_values("tstamp").reset_index(drop=True)
    train.insert(0, "round", range(1, len(train) + 1))
    # The model registry link: infer logs which training run and epoch it loaded.
    deployed = flor.dataframe("model_run", "model_epoch", "model_val_acc").dropna(subset=["model_run"])
    deployed = deployed.sort_values("tstamp").drop_duplicates("model_run", keep="last")
    summary = train.merge(deployed[["model_run", "model_epoch", "model_val_acc"]], left_on="run_id",
                          right_on="model_run", how="left")
    columns = ["round", "run_id", "task", "n_human_labels", "n_train", "best_val_acc", "model_epoch", "model_val_acc"]
    return summary[columns]


def predictions_with_labels() -> pd.DataFrame:
    """The round-1 predictions the reviewer saw, joined on ``item`` with the labels it gave."""
    import flordb_build as flor

    predictions = flor.dataframe("prediction", "confidence")
    first_infer = predictions["tstamp"].min()
    predictions = predictions[predictions["tstamp"] == first_infer]
    labels = flor.dataframe("label", "corrected")
    labels = labels[labels["label"].notna()]
    joined = predictions[["item", "prediction", "confidence"]].merge(
        labels[["item", "label", "corrected", "task", "filename"]], on="item"
    )
    return joined.sort_values("confidence").reset_index(drop=True)


def hindsight(project: Path) -> None:
    """Add a flor.log that the recorded runs lack, replay it over both rounds, show the values."""
    import flordb_build as flor

    n_runs = int(flor.query("SELECT count(*) AS n FROM runs")["n"].iloc[0])
    print(f"\n== hindsight: today's train.py logs {HINDSIGHT_NAME!r}, which neither round recorded ==")
    print("  " + add_hindsight_log(project).strip().replace("\n", "\n  "))
    status = subprocess.run(["git", "status", "--short"], cwd=project, capture_output=True, text=True, check=True)
    print("$ git status --short   (the edit is not committed; replay reads today's work tree)")
    print("  " + status.stdout.rstrip().replace("\n", "\n  "))
    print(f"\n== replay {HINDSIGHT_NAME!r} over both training rounds, from their final checkpoints ==")
    run_step(project, "-m", "flordb_build", "replay", HINDSIGHT_NAME, "--task", "train", "--yes")
    backfilled = flor.dataframe(HINDSIGHT_NAME, "best_val_acc").sort_values("tstamp")
    columns = ["run_id", "tstamp", "task", "n_human_labels", HINDSIGHT_NAME, "best_val_acc"]
    backfilled = backfilled.merge(flor.dataframe("n_human_labels")[["run_id", "n_human_labels"]], on="run_id")
    n_after = int(flor.query("SELECT count(*) AS n FROM runs")["n"].iloc[0])
    print(f"\n== flor.dataframe({HINDSIGHT_NAME!r}, 'best_val_acc'): backfilled into the recorded runs "
          f"(runs in the store: {n_runs} before the replay, {n_after} after) ==")
    print(backfilled[columns].to_string(index=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, help="where to create the demo project (default: a new temp dir)")
    parser.add_argument("--epochs", type=int, help="training epochs per round (default: train.py's)")
    parser.add_argument("--n", type=int, help="items the simulated reviewer labels per round (default 100)")
    options = parser.parse_args()
    started = time.perf_counter()

    project = make_project(options.dir)
    print(f"demo project: {project}\n")
    doit_vars = [f"{name}={value}" for name, value in (("epochs", options.epochs), ("n", options.n)) if value]
    run_step(project, "-m", "flordb_build", "init")
    commit_all(project, "digits pipeline")
    print("\n== round 1: prep, train on the seed labels, infer, simulated review ==")
    run_step(project, "-m", "doit", *doit_vars, "review_auto")
    print("\n== round 2: train on seed + reviewed labels, infer ==")
    run_step(project, "-m", "doit", *doit_vars, "infer")
    print("\n== nothing changed: doit runs nothing ==")
    run_step(project, "-m", "doit", *doit_vars, "infer")

    import pandas as pd

    os.chdir(project)  # flor.dataframe reads the store of the project it runs in
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        summary = round_summary()
        print("\n== validation accuracy per round (train's best epoch; the checkpoint infer deployed) ==")
        print(summary.to_string(index=False))
        joined = predictions_with_labels()
        wrong = int((joined["prediction"] != joined["label"]).sum())
        print(f"\n== round-1 predictions joined with the review labels on item ({wrong} of {len(joined)} corrected) ==")
        print(joined.head(15).to_string(index=False))
        hindsight(project)
    accuracies = summary["model_val_acc"].tolist()
    print(f"\nvalidation accuracy of the deployed model: round 1 {accuracies[0]:.4f} -> round 2 {accuracies[-1]:.4f}   "
          f"({time.perf_counter() - started:.0f} s)")
    print(f"explore: cd {project} && flordb-build dataframe val_acc && flordb-build tasks")


if __name__ == "__main__":
    main()
