"""Quick start: the closed loop train -> infer -> review -> train, two rounds, end to end.

    python pipelines/digits/demo.py                # a fresh project in a temporary directory
    python pipelines/digits/demo.py --dir ~/digits  # ... or in a directory of your choice

It copies ``dodo.py`` and ``pipelines/digits/`` into a new git repository, configures doit to
record build context (``flordb-build init``), and runs the pipeline with doit:

    round 1   doit review_auto   prep, train on the seed labels, infer, simulated review
    round 2   doit infer         train again (the label store changed), infer
    check     doit infer         nothing changed: every task is up to date, nothing runs

Then it prints the validation accuracy of each round and a dataframe joining the round-1
predictions with the labels the reviewer gave. Everything it recorded stays in the project's
``.flor/flor.db`` for you to query: ``cd DIR && flordb-build dataframe val_acc``.
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


def make_project(directory: Path | None) -> Path:
    """A new git repository holding this pipeline (dodo.py + pipelines/digits), one commit."""
    if directory is None:
        directory = Path(tempfile.mkdtemp(prefix="flordb-digits-"))
    directory = directory.expanduser().resolve()
    if directory.exists() and any(directory.iterdir()):
        raise SystemExit(f"demo: '{directory}' is not empty; pass --dir with a new or empty directory.")
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy2(REPO / "dodo.py", directory / "dodo.py")
    shutil.copytree(HERE, directory / "pipelines" / "digits", ignore=shutil.ignore_patterns("data", "__pycache__"))
    (directory / ".gitignore").write_text(".doit.db*\n__pycache__/\n", encoding="utf-8")
    git = ["git", *GIT_IDENTITY]
    subprocess.run([*git, "init", "-q", "-b", "main"], cwd=directory, check=True)
    subprocess.run([*git, "add", "-A"], cwd=directory, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "digits pipeline"], cwd=directory, check=True)
    return directory


def run_step(project: Path, *args: str) -> str:
    """Run a command in the project with this interpreter's tools; echo and return its output."""
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, *args], cwd=project, capture_output=True, text=True, env=tool_env(), check=False
    )
    output = proc.stdout + proc.stderr
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
    accuracies = summary["model_val_acc"].tolist()
    print(f"\nvalidation accuracy of the deployed model: round 1 {accuracies[0]:.4f} -> round 2 {accuracies[-1]:.4f}   "
          f"({time.perf_counter() - started:.0f} s)")
    print(f"explore: cd {project} && flordb-build dataframe val_acc && flordb-build tasks")


if __name__ == "__main__":
    main()
