"""Stage ``prep``: split scikit-learn's bundled digits into a labeled seed set, a validation set
and an unlabeled pool; log the sizes and the class balance.

The digits (1,797 8x8 grey images of handwritten 0-9, from the UCI repository) ship inside the
scikit-learn wheel, so nothing is downloaded at run time. Item ids are row numbers of
``sklearn.datasets.load_digits()``.

    python pipelines/digits/prep.py --kwargs seed=0 seed_per_class=5 val_size=400
"""

from __future__ import annotations

import numpy as np
from digits import DATA, N_CLASSES, POOL_TRUTH, SPLIT
from sklearn.datasets import load_digits

import flordb_build as flor


def split_ids(labels: np.ndarray, seed: int, seed_per_class: int, val_size: int) -> dict[str, np.ndarray]:
    """Seed: ``seed_per_class`` items of each digit; val: ``val_size`` random others; pool: the rest."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    seed_ids = np.concatenate([order[labels[order] == digit][:seed_per_class] for digit in range(N_CLASSES)])
    rest = order[~np.isin(order, seed_ids)]
    return {"seed_ids": np.sort(seed_ids), "val_ids": np.sort(rest[:val_size]), "pool_ids": np.sort(rest[val_size:])}


def main() -> None:
    seed = flor.arg("seed", 0)
    seed_per_class = flor.arg("seed_per_class", 5)
    val_size = flor.arg("val_size", 400)

    digits = load_digits()
    images = digits.data.astype(np.uint8)  # integers 0..16
    labels = digits.target.astype(np.int64)
    ids = split_ids(labels, seed, seed_per_class, val_size)

    flor.log("n_items", len(labels))
    for part in ("seed", "val", "pool"):
        flor.log(f"n_{part}", len(ids[f"{part}_ids"]))
    # Class balance of each part: one row per digit in flor.dataframe("seed_count", ...).
    for digit in flor.loop("digit", range(N_CLASSES)):
        for part in ("seed", "val", "pool"):
            flor.log(f"{part}_count", int((labels[ids[f"{part}_ids"]] == digit).sum()))

    DATA.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        SPLIT,
        images=images,
        seed_ids=ids["seed_ids"],
        seed_labels=labels[ids["seed_ids"]],
        val_ids=ids["val_ids"],
        val_labels=labels[ids["val_ids"]],
        pool_ids=ids["pool_ids"],
    )
    # The pool's answers go to a separate file that only the simulated reviewer opens.
    np.savez_compressed(POOL_TRUTH, pool_ids=ids["pool_ids"], pool_labels=labels[ids["pool_ids"]])
    print(f"prep: {len(ids['seed_ids'])} seed, {len(ids['val_ids'])} val, {len(ids['pool_ids'])} pool items")


if __name__ == "__main__":
    main()
