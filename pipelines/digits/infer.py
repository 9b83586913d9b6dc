"""Stage ``infer``: load the best checkpoint of the newest training run and predict the pool.

The model registry is ``flor.dataframe("val_acc")`` (one row per epoch) restricted to the epochs
that have a checkpoint; ``flor.load_checkpoint(row, model=...)`` restores the chosen one. Each
pool item gets ``prediction`` and ``confidence`` (the softmax probability of the prediction),
logged inside ``flor.iteration("item", item_id)`` so they join with the review labels on ``item``.

    python pipelines/digits/infer.py --kwargs device=auto
"""

from __future__ import annotations

import pandas as pd
import torch
from digits import (
    INFER_OUT,
    PipelineError,
    build_model,
    load_split,
    newest_run,
    pick_device,
    to_tensor,
    write_json,
)

import flordb_build as flor

# Epochs of a run that have a model checkpoint (checkpointing is adaptive: not every epoch has one).
CHECKPOINTED_EPOCHS_SQL = (
    "SELECT DISTINCT c.run_id, l.iteration AS epoch FROM checkpoints c "
    "JOIN loops l ON l.run_id = c.run_id AND l.ctx_id = c.ctx_id "
    "WHERE c.name = 'model' AND l.name = 'epoch' AND c.run_id = ?"
)


def choose_checkpoint() -> pd.Series:
    """The newest training run's epoch with the highest ``val_acc`` among those checkpointed."""
    metrics = newest_run(flor.dataframe("val_acc").dropna(subset=["val_acc"]))
    if metrics.empty:
        raise PipelineError("No training run has logged val_acc yet; run the train stage first: doit train")
    run_id = metrics["run_id"].iloc[0]
    saved = flor.query(CHECKPOINTED_EPOCHS_SQL, (run_id,))
    candidates = metrics[metrics["epoch"].isin(saved["epoch"].tolist())]
    if candidates.empty:
        raise PipelineError(
            f"Training run '{run_id}' has no model checkpoint; train.py must wrap its epoch loop in "
            "flor.checkpointing(model=...)."
        )
    # Highest accuracy; among equals the later epoch (it has seen the data more often).
    best = candidates.sort_values(["val_acc", "epoch"], ascending=[False, False]).iloc[0]
    return best


def main() -> None:
    device = pick_device(flor.arg("device", "auto"))
    split = load_split()
    best = choose_checkpoint()

    model = build_model().to(device)
    flor.load_checkpoint(best, model=model, map_location=device)
    model.eval()
    flor.log("model_run", str(best["run_id"]))
    flor.log("model_epoch", int(best["epoch"]))

    with torch.no_grad():
        # The restored model must score what training logged for that epoch: a registry check.
        val_pred = model(to_tensor(split["images"][split["val_ids"]], device)).argmax(dim=1).cpu()
        model_val_acc = float((val_pred == torch.as_tensor(split["val_labels"])).float().mean())
        flor.log("model_val_acc", model_val_acc)
        pool_ids = split["pool_ids"]
        probs = torch.softmax(model(to_tensor(split["images"][pool_ids], device)), dim=1).cpu()
    confidence, prediction = probs.max(dim=1)

    for item_id, pred, conf in zip(pool_ids.tolist(), prediction.tolist(), confidence.tolist(), strict=True):
        with flor.iteration("item", item_id):
            flor.log("prediction", pred)
            flor.log("confidence", conf)

    write_json(
        INFER_OUT,
        {
            "model_epoch": int(best["epoch"]),
            "model_val_acc": round(model_val_acc, 6),
            "n_predicted": len(pool_ids),
            "predicted_counts": [int((prediction == d).sum()) for d in range(probs.shape[1])],
        },
    )
    print(f"infer: epoch {int(best['epoch'])} of run {best['run_id']} (val_acc {model_val_acc:.4f}) "
          f"predicted {len(pool_ids)} pool items")


if __name__ == "__main__":
    main()
