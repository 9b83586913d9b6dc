"""Stage ``review_auto``: a simulated reviewer for demos and CI.

It takes the same queue a person sees in the review app (the ``n`` least-confident pool items of
the newest predictions that nobody labeled yet) and answers from the held-out ground truth that
prep.py set aside. Labels are logged exactly as app.py logs them:
``flor.iteration("item", item_id)`` + ``flor.log("label", digit)``.

    python pipelines/digits/review_auto.py --kwargs n=100
"""

from __future__ import annotations

from digits import REVIEW_OUT, load_pool_truth, review_queue, write_json, write_labels_stamp

import flordb_build as flor


def main() -> None:
    n = flor.arg("n", 100)
    truth = load_pool_truth()
    queue = review_queue(n)
    corrected = 0
    for item_id, predicted in zip(queue["item"].tolist(), queue["prediction"].tolist(), strict=True):
        with flor.iteration("item", item_id):
            flor.log("label", truth[item_id])
            flor.log("corrected", truth[item_id] != predicted)
        corrected += truth[item_id] != predicted
    flor.log("n_labeled", len(queue))
    flor.log("n_corrected", corrected)
    flor.commit()  # make the labels visible (and the stamp below current) before exiting

    write_labels_stamp()
    write_json(REVIEW_OUT, {"items": sorted(queue["item"].tolist()), "n_corrected": corrected})
    print(f"review_auto: labeled {len(queue)} items, corrected {corrected} predictions")


if __name__ == "__main__":
    main()
