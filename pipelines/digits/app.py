"""Stage ``run``: a small review app (Flask, bound to 127.0.0.1).

It shows the least-confident pool items of the newest predictions as 8x8 images with the
predicted digit preselected. A person confirms or corrects each one and presses Save; every save
logs ``label`` (and ``corrected``) per item inside ``flor.iteration("item", item_id)`` and ends
with ``flor.commit()``, so the labels are in ``flor.dataframe("label")`` at once and the next
``train`` uses them.

    python pipelines/digits/app.py --kwargs port=5000 n=24     # then open http://127.0.0.1:5000/
"""

from __future__ import annotations

import html
import signal
import sys
import threading
from types import FrameType

from digits import (
    N_CLASSES,
    PipelineError,
    human_labels,
    latest_predictions,
    load_split,
    newest_run,
    render_svg,
    review_queue,
    write_labels_stamp,
)
from flask import Flask, Response, redirect, request
from werkzeug.wrappers import Response as BaseResponse

import flordb_build as flor

HOST = "127.0.0.1"

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Digits review</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem; background: #fafafa; color: #222; }}
header p {{ margin: .2rem 0; color: #555; }}
.note {{ background: #e7f5e7; border: 1px solid #9c9; padding: .5rem .8rem; display: inline-block; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(190px, 1fr)); gap: .8rem; margin: 1rem 0; }}
.card {{ background: white; border: 1px solid #ddd; border-radius: 6px; padding: .6rem; text-align: center; }}
.card svg {{ border: 1px solid #ccc; }}
.meta {{ font-size: .85rem; margin: .3rem 0; }}
.digits {{ display: flex; flex-wrap: wrap; justify-content: center; gap: 2px; }}
.digits label {{ font-size: .8rem; border: 1px solid #bbb; border-radius: 3px; padding: 1px 3px; cursor: pointer; }}
.digits input {{ margin: 0 1px 0 0; }}
button {{ font-size: 1rem; padding: .4rem 1.4rem; }}
</style></head>
<body>
<header><h1>Review the least-confident digits</h1>
<p>Model: epoch {model_epoch} of run {model_run} &middot; validation accuracy {model_val_acc}</p>
<p>{n_labels} items labeled so far &middot; {n_queue} shown, lowest confidence first.
The predicted digit is preselected: confirm it or pick the right one, then save.</p>
{note}</header>
{body}
</body></html>
"""


def card_html(item_id: int, pixels_svg: str, predicted: int, confidence: float) -> str:
    """One item: its image, the prediction, and radio buttons 0-9 with the prediction checked."""
    choices = []
    for digit in range(N_CLASSES):
        checked = " checked" if digit == predicted else ""
        input_id = f"label-{item_id}-{digit}"
        choices.append(
            f'<label for="{input_id}"><input type="radio" id="{input_id}" name="label-{item_id}" '
            f'value="{digit}"{checked}>{digit}</label>'
        )
    return (
        f'<div class="card" data-item="{item_id}">{pixels_svg}'
        f'<div class="meta">item {item_id} &middot; predicted <b>{predicted}</b> ({confidence:.2f})</div>'
        f'<input type="hidden" name="items" value="{item_id}">'
        f'<div class="digits">{"".join(choices)}</div></div>'
    )


def create_app(limit: int) -> Flask:
    """The review app showing ``limit`` items per page."""
    app = Flask(__name__)
    split = load_split()
    images = split["images"]
    pool = {int(i) for i in split["pool_ids"].tolist()}
    # One save at a time: commit() ends the run that a concurrent save would be logging into.
    save_lock = threading.Lock()

    @app.get("/")
    def review() -> Response:
        try:
            queue = review_queue(limit)
        except PipelineError as exc:
            return Response(html.escape(str(exc)), status=503, mimetype="text/plain")
        saved, corrected = request.args.get("saved", ""), request.args.get("corrected", "")
        note = ""
        if saved.isdigit() and corrected.isdigit():  # the redirect after a save
            note = f'<p class="note">Saved {int(saved)} labels ({int(corrected)} corrected).</p>'
        if queue.empty:
            body = "<p>Nothing left to review: every pool item has a label.</p>"
        else:
            columns = (queue[c].tolist() for c in ("item", "prediction", "confidence"))
            cards = [
                card_html(item, render_svg(images[item]), predicted, confidence)
                for item, predicted, confidence in zip(*columns, strict=True)
            ]
            body = (
                '<form method="post" action="/save"><div class="grid">' + "".join(cards) + "</div>"
                '<button type="submit" id="save">Save labels</button></form>'
            )
        page = PAGE.format(
            **{key: html.escape(value) for key, value in model_summary().items()},
            n_labels=len(human_labels()),
            n_queue=len(queue),
            note=note,
            body=body,
        )
        return Response(page, mimetype="text/html")

    @app.post("/save")
    def save() -> BaseResponse:
        form = request.form
        try:
            choices = {int(item): int(form[f"label-{item}"]) for item in form.getlist("items")}
        except (KeyError, ValueError):
            return Response("Every item needs a digit 0-9; reload the page and try again.", status=400)
        bad = [item for item, digit in choices.items() if item not in pool or not 0 <= digit < N_CLASSES]
        if bad:
            return Response(f"Not a pool item or not a digit: items {bad}; reload the page.", status=400)
        predicted = dict(zip(*(latest_predictions()[c].tolist() for c in ("item", "prediction")), strict=True))
        corrected = 0
        with save_lock:
            for item, digit in choices.items():
                with flor.iteration("item", item):
                    flor.log("label", digit)
                    flor.log("corrected", digit != predicted.get(item))
                corrected += digit != predicted.get(item)
            flor.commit()
            write_labels_stamp()
        return redirect(f"/?saved={len(choices)}&corrected={corrected}", code=303)

    return app


def model_summary() -> dict[str, str]:
    """Which checkpoint made the newest predictions, as infer.py logged it."""
    frame = newest_run(flor.dataframe("model_run", "model_epoch", "model_val_acc").dropna(subset=["model_run"]))
    if frame.empty:
        return {"model_run": "?", "model_epoch": "?", "model_val_acc": "?"}
    row = frame.iloc[0]
    return {
        "model_run": str(row["model_run"]),
        "model_epoch": str(int(row["model_epoch"])),
        "model_val_acc": f"{float(row['model_val_acc']):.3f}",
    }


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # `doit` and `make` stop the app with SIGTERM: exit normally so flordb_build closes the run.
    sys.exit(0)


def main() -> None:
    port = flor.arg("port", 5000)
    limit = flor.arg("n", 24)
    flor.commit()  # the args are their own transaction; each save is one more
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    app = create_app(limit)
    print(f"review app: http://{HOST}:{port}/ (Ctrl-C to stop)", flush=True)
    app.run(host=HOST, port=port, threaded=True)


if __name__ == "__main__":
    main()
