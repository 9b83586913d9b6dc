"""What the digits pipeline's stages share: file locations, the split, the model, the label store.

The stages talk to each other through ``flor.dataframe`` (labels, predictions, metrics, model
checkpoints) and through a few small files that exist so that doit and Make can tell what is
up to date:

    prep.py ──> data/split.npz, data/pool_truth.npz
    train.py ──> data/train.json           (reads split.npz + flor.dataframe("label"))
    infer.py ──> data/infer.json           (reads flor.dataframe("val_acc") + checkpoints)
    app.py / review_auto.py                (read flor.dataframe("prediction", "confidence"),
                                            log "label"; write data/labels.stamp)

Heavy imports (numpy, torch, pandas) stay inside functions so that ``dodo.py`` can import this
module cheaply to compute :func:`label_fingerprint`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    import torch

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
SPLIT = DATA / "split.npz"
#: Ground truth of the unlabeled pool: read only by the simulated reviewer, never by train/infer.
POOL_TRUTH = DATA / "pool_truth.npz"
TRAIN_OUT = DATA / "train.json"
INFER_OUT = DATA / "infer.json"
REVIEW_OUT = DATA / "review_auto.json"
LABELS_STAMP = DATA / "labels.stamp"

N_CLASSES = 10
N_PIXELS = 64
PIXEL_MAX = 16.0  # load_digits pixels are integers 0..16

#: One line that changes whenever a label is added anywhere in the project's label store.
LABELS_FINGERPRINT_SQL = (
    "SELECT count(*) AS labels, max(r.tstamp) AS newest FROM logs l "
    "JOIN runs r ON r.run_id = l.run_id WHERE l.name = 'label'"
)


class PipelineError(Exception):
    """A stage cannot run because an earlier stage has not produced what it needs."""


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as stable, sorted JSON (identical content when nothing changed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def load_split() -> dict[str, np.ndarray]:
    """The arrays prep.py wrote: ``images``, ``seed_ids``, ``seed_labels``, ``val_ids``,
    ``val_labels``, ``pool_ids``."""
    import numpy as np

    if not SPLIT.exists():
        raise PipelineError(f"'{SPLIT}' does not exist; run the prep stage first: doit prep")
    with np.load(SPLIT) as npz:
        return {key: npz[key] for key in npz.files}


def load_pool_truth() -> dict[int, int]:
    """Held-out ground truth of the pool, item id -> digit (the simulated reviewer's answers)."""
    import numpy as np

    if not POOL_TRUTH.exists():
        raise PipelineError(f"'{POOL_TRUTH}' does not exist; run the prep stage first: doit prep")
    with np.load(POOL_TRUTH) as npz:
        return {int(i): int(y) for i, y in zip(npz["pool_ids"], npz["pool_labels"], strict=True)}


def pick_device(name: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is present, else ``cpu``; other names pass through."""
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
    if device == "cpu":
        torch.set_num_threads(1)  # a model this small only loses time to thread hand-offs
    return device


def build_model() -> torch.nn.Module:
    """A small multilayer perceptron over the 64 pixels (about 9k parameters)."""
    from torch import nn

    return nn.Sequential(nn.Linear(N_PIXELS, 128), nn.ReLU(), nn.Linear(128, N_CLASSES))


def to_tensor(images: np.ndarray, device: str) -> torch.Tensor:
    """Scale raw 0..16 pixels to 0..1 floats on ``device``."""
    import torch

    return torch.as_tensor(images, dtype=torch.float32, device=device) / PIXEL_MAX


def newest_run(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of the most recent run in ``frame`` (by its unique tstamp)."""
    if frame.empty:
        return frame
    return frame[frame["tstamp"] == frame["tstamp"].max()].reset_index(drop=True)


def human_labels() -> pd.DataFrame:
    """Every reviewed label so far, the newest per item: columns ``item``, ``label``, ``task``,
    ``filename``, ``tstamp``, ``run_id``.

    A label is a ``flor.log("label", ...)`` inside ``flor.iteration("item", item_id)``, whoever
    logged it (the review app, the simulated reviewer, a notebook). When an item was labeled
    twice, the later label wins: a person's correction overrides an earlier answer.

    In a hindsight replay of a run, ``flor.dataframe`` reads the store as that run saw it, so
    a replayed training gets the labels it had then, not the ones reviewed since.
    """
    import pandas as pd

    import flordb_build as flor

    columns = ["item", "label", "task", "filename", "tstamp", "run_id"]
    frame = flor.dataframe("label")
    if frame.empty or "item" not in frame.columns:
        return pd.DataFrame({column: pd.Series(dtype="int64" if column in ("item", "label") else object)
                             for column in columns})
    frame = frame[frame["label"].notna() & frame["item"].notna()]
    frame = frame.sort_values("tstamp").drop_duplicates("item", keep="last")
    frame = frame.astype({"item": "int64", "label": "int64"})
    return frame[columns].reset_index(drop=True)


def latest_predictions() -> pd.DataFrame:
    """The newest inference run's rows: ``item``, ``prediction``, ``confidence`` per pool item."""
    import flordb_build as flor

    frame = flor.dataframe("prediction", "confidence")
    frame = newest_run(frame[frame["prediction"].notna()]) if not frame.empty else frame
    if frame.empty:
        raise PipelineError("No predictions recorded yet; run the infer stage first: doit infer")
    return frame.astype({"item": "int64", "prediction": "int64"}).reset_index(drop=True)


def review_queue(limit: int) -> pd.DataFrame:
    """The ``limit`` least-confident pool items of the newest predictions that nobody labeled yet."""
    predictions = latest_predictions()
    labeled = set(human_labels()["item"].tolist())
    queue = predictions[~predictions["item"].isin(labeled)]
    # Ties broken by item id so that the queue, and with it every simulated round, is deterministic.
    queue = queue.sort_values(["confidence", "item"], kind="stable")
    return queue.head(limit).reset_index(drop=True)


def label_fingerprint() -> str:
    """A short text that changes whenever the label store gains a label ('none' before any run)."""
    import flordb_build as flor
    from flordb_build.errors import QueryError

    try:
        row = flor.query(LABELS_FINGERPRINT_SQL).iloc[0]
    except QueryError:
        return "none"  # no store yet: nothing recorded, so no labels either
    return f"{int(row['labels'])} labels, newest {row['newest']}"


def write_labels_stamp() -> None:
    """Rewrite ``data/labels.stamp`` when the label store changed (Make's view of the labels)."""
    text = label_fingerprint() + "\n"
    if not LABELS_STAMP.exists() or LABELS_STAMP.read_text(encoding="utf-8") != text:
        LABELS_STAMP.parent.mkdir(parents=True, exist_ok=True)
        LABELS_STAMP.write_text(text, encoding="utf-8")


def render_svg(pixels: np.ndarray, cell: int = 12) -> str:
    """An 8x8 digit as an inline SVG of grey squares (no image library needed)."""
    rects = []
    for index, value in enumerate(pixels.tolist()):
        shade = 255 - round(255 * float(value) / PIXEL_MAX)
        x, y = (index % 8) * cell, (index // 8) * cell
        rects.append(f'<rect x="{x}" y="{y}" width="{cell}" height="{cell}" fill="rgb({shade},{shade},{shade})"/>')
    size = 8 * cell
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" '
        f'viewBox="0 0 {size} {size}" role="img">' + "".join(rects) + "</svg>"
    )


if __name__ == "__main__":
    # `python digits.py labels-stamp`: used by the Makefile to refresh data/labels.stamp.
    import sys

    if sys.argv[1:] != ["labels-stamp"]:
        raise SystemExit("usage: python digits.py labels-stamp")
    write_labels_stamp()
