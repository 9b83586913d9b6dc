"""Stage ``train``: fit the digits net on the seed labels plus every human label so far.

The label store is ``flor.dataframe("label")``: whatever the review app (task ``run``) or the
simulated reviewer (task ``review_auto``) logged, newest label per item. Each epoch logs
``loss`` per step, ``val_acc`` and per-digit ``recall``; ``flor.checkpointing`` keeps the model
and optimizer so that infer.py can load the best epoch (the model registry), and the best epoch
so far so that a hindsight replay after the epoch loop starts from what the run ended with.

    python pipelines/digits/train.py --kwargs epochs=40 lr=0.003 batch_size=32 seed=0 device=auto
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from digits import (
    N_CLASSES,
    TRAIN_OUT,
    build_model,
    human_labels,
    load_split,
    pick_device,
    to_tensor,
    write_json,
)
from torch import nn

import flordb_build as flor


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, list[float]]:
    """Accuracy and per-digit recall of ``model`` on a labeled set."""
    model.eval()
    with torch.no_grad():
        predicted = model(images).argmax(dim=1)
    model.train()
    correct = predicted == labels
    recall = []
    for digit in range(N_CLASSES):
        mask = labels == digit
        recall.append(float(correct[mask].float().mean()) if bool(mask.any()) else float("nan"))
    return float(correct.float().mean()), recall


def main() -> None:
    lr = flor.arg("lr", 0.003)
    epochs = flor.arg("epochs", 40)
    batch_size = flor.arg("batch_size", 32)
    seed = flor.arg("seed", 0)
    device = pick_device(flor.arg("device", "auto"))
    flor.log("device_used", device)

    torch.manual_seed(seed)
    split = load_split()
    # Every label so far. A hindsight replay of this run reads the store as the run saw it
    # (flordb_build's as-of view), so it rebuilds the training set it had, whatever was reviewed since.
    labels = human_labels()
    # Training set = seed labels + human labels (a human label overrides nothing in the seed set:
    # the review queue only offers pool items).
    train_ids = np.concatenate([split["seed_ids"], labels["item"].to_numpy(dtype=np.int64)])
    train_labels = np.concatenate([split["seed_labels"], labels["label"].to_numpy(dtype=np.int64)])
    flor.log("n_seed", len(split["seed_ids"]))
    flor.log("n_human_labels", len(labels))
    flor.log("n_train", len(train_ids))
    flor.log("train_items", sorted(int(i) for i in train_ids))

    x_train = to_tensor(split["images"][train_ids], device)
    y_train = torch.as_tensor(train_labels, device=device)
    x_val = to_tensor(split["images"][split["val_ids"]], device)
    y_val = torch.as_tensor(split["val_labels"], dtype=torch.int64, device=device)

    model = build_model().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    shuffler = torch.Generator().manual_seed(seed)
    # Checkpointed with the model: a replay that skips the epoch loop (a statement after it)
    # restores the best epoch from the final checkpoint instead of starting from -1.
    best = {"val_acc": -1.0, "epoch": -1}

    with flor.checkpointing(model=model, optimizer=optimizer, best=best):
        for epoch in flor.loop("epoch", range(epochs)):
            order = torch.randperm(len(train_ids), generator=shuffler).to(device)
            batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
            for batch in flor.loop("step", batches):
                optimizer.zero_grad()
                loss = loss_fn(model(x_train[batch]), y_train[batch])
                loss.backward()
                optimizer.step()
                flor.log("loss", loss.item())
            val_acc, recall = evaluate(model, x_val, y_val)
            flor.log("val_acc", val_acc)
            for digit in flor.loop("digit", range(N_CLASSES)):
                flor.log("recall", recall[digit])
            if val_acc > best["val_acc"]:
                best.update(val_acc=val_acc, epoch=epoch)

    best_acc, best_epoch = best["val_acc"], best["epoch"]
    flor.log("best_val_acc", best_acc)
    # The target doit and Make watch: same content for the same training set and result.
    write_json(
        TRAIN_OUT,
        {
            "best_epoch": best_epoch,
            "best_val_acc": round(best_acc, 6),
            "n_train": len(train_ids),
            "train_items_sha256": hashlib.sha256(np.sort(train_ids).tobytes()).hexdigest(),
        },
    )
    print(f"train: {len(train_ids)} labeled items ({len(labels)} from review), best val_acc {best_acc:.4f} "
          f"at epoch {best_epoch}")


if __name__ == "__main__":
    main()
