"""The example pipeline as doit tasks: prep -> train -> infer -> run (human review) -> train.

    doit                      prep, train and infer, each only when out of date
    doit serve                serve the review app on http://127.0.0.1:5000/ (a person labels);
                              the pipeline's "run" stage (`make run`); doit reserves the name
                              "run" for its own command, so the task is called "serve"
    doit review_auto          one closed-loop round with a simulated reviewer instead of a person
    doit epochs=5 train       override a script's flor.arg (any of the names in ARGS below)

The labels live in flordb_build's label store (``flor.dataframe("label")``), not in a file, so
``train`` is out of date when that store gained labels since train last ran: its ``uptodate``
check compares a fingerprint of the store. That is also what keeps the loop free of a cycle in
doit's DAG (train -> infer -> review -> train).

Scripts live in pipelines/digits/; see its README.md.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from doit import get_var
from doit.tools import config_changed

DIGITS = Path("pipelines/digits")
DATA = DIGITS / "data"
SHARED = str(DIGITS / "digits.py")

DOIT_CONFIG = {"default_tasks": ["prep", "train", "infer"], "verbosity": 2}

#: The flor.arg names each script reads; `doit NAME=VALUE ...` passes them as --kwargs.
ARGS = {
    "prep": ("seed", "seed_per_class", "val_size"),
    "train": ("lr", "epochs", "batch_size", "seed", "device"),
    "infer": ("device",),
    "review_auto": ("n",),
    "serve": ("port", "n"),
}


def script_args(stage: str) -> dict[str, str]:
    """The ``NAME=VALUE`` doit command-line variables this stage's script reads."""
    found = {name: get_var(name) for name in ARGS[stage]}
    return {name: value for name, value in found.items() if value is not None}


def command(stage: str, script: str) -> list[str]:
    """``python pipelines/digits/<script> --kwargs ...`` with the interpreter running doit."""
    kwargs = [f"{name}={value}" for name, value in sorted(script_args(stage).items())]
    return [sys.executable, str(DIGITS / script), *(["--kwargs", *kwargs] if kwargs else [])]


def labels_unchanged(task: Any, values: dict[str, Any]) -> bool:
    """doit ``uptodate`` check: True while the label store holds what it held when train last ran."""
    sys.path.insert(0, str(DIGITS.resolve()))
    try:
        from digits import label_fingerprint
    finally:
        sys.path.pop(0)
    fingerprint = label_fingerprint()
    task.value_savers.append(lambda: {"labels": fingerprint})
    return bool(values.get("labels") == fingerprint)


def task_prep() -> dict[str, Any]:
    """Split sklearn's digits into seed / validation / pool; log sizes and class balance."""
    return {
        "actions": [command("prep", "prep.py")],
        "file_dep": [str(DIGITS / "prep.py"), SHARED],
        "targets": [str(DATA / "split.npz"), str(DATA / "pool_truth.npz")],
        "uptodate": [config_changed(script_args("prep"))],
        "clean": True,
    }


def task_train() -> dict[str, Any]:
    """Train the digits net on the seed labels plus every reviewed label so far."""
    return {
        "actions": [command("train", "train.py")],
        "file_dep": [str(DIGITS / "train.py"), SHARED, str(DATA / "split.npz")],
        "targets": [str(DATA / "train.json")],
        "uptodate": [config_changed(script_args("train")), labels_unchanged],
        "clean": True,
    }


def task_infer() -> dict[str, Any]:
    """Predict the pool with the best checkpoint of the newest training run."""
    return {
        "actions": [command("infer", "infer.py")],
        "file_dep": [str(DIGITS / "infer.py"), SHARED, str(DATA / "split.npz"), str(DATA / "train.json")],
        "targets": [str(DATA / "infer.json")],
        "uptodate": [config_changed(script_args("infer"))],
        "clean": True,
    }


def task_review_auto() -> dict[str, Any]:
    """Simulated reviewer: label the least-confident predictions from held-out ground truth."""
    return {
        "actions": [command("review_auto", "review_auto.py")],
        "file_dep": [str(DIGITS / "review_auto.py"), SHARED, str(DATA / "infer.json")],
        "targets": [str(DATA / "review_auto.json")],
        "uptodate": [config_changed(script_args("review_auto"))],
        "clean": True,
    }


def task_serve() -> dict[str, Any]:
    """Serve the review app on 127.0.0.1 (after bringing the predictions up to date)."""
    return {
        "actions": [command("serve", "app.py")],
        "task_dep": ["infer"],
        "uptodate": [False],  # a server: always start it when asked
        "verbosity": 2,
    }
