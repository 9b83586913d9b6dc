"""The review app in a real browser: headless Chromium corrects a label, and train uses it.

Drives Debian's ``chromium`` through Playwright's Python package (no browser download); skips
with the reason when either is missing.
"""

from __future__ import annotations

import shutil
import sys

import pytest

import flordb_build as flor

from .browser import CHROMIUM, CHROMIUM_ARGS, install_chromium
from .conftest import Project
from .test_pipeline_digits import (
    free_port,
    install_pipeline,
    run_tool,
    start_server,
    stop_server,
    train_runs,
    wait_for_page,
)

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
_why_no_browser = install_chromium()
if _why_no_browser:
    pytest.skip(_why_no_browser, allow_module_level=True)
if shutil.which("make") is None:
    pytest.skip("'make' is not installed", allow_module_level=True)


def test_browser_correction_lands_in_the_label_store_and_the_next_train(project: Project) -> None:
    install_pipeline(project)
    make = ["make", "-C", "pipelines/digits", f"PYTHON={sys.executable}"]
    run_tool(project.root, *make, "infer")
    port = free_port()
    server = start_server(project.root, [*make, "run", f"RUN_ARGS=port={port}"])
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for_page(url, server)
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.goto(url)
                card = page.locator(".card").first
                item = int(card.get_attribute("data-item") or "-1")
                predicted = int(card.locator("input[type=radio]:checked").get_attribute("value") or "-1")
                shown = page.locator(".card").count()
                corrected = (predicted + 3) % 10
                card.locator(f"label[for=label-{item}-{corrected}]").click()
                assert card.locator("input[type=radio]:checked").get_attribute("value") == str(corrected)
                page.locator("#save").click()
                page.wait_for_selector(".note")
                assert page.locator(".note").inner_text() == f"Saved {shown} labels (1 corrected)."
                assert page.locator(f'.card[data-item="{item}"]').count() == 0  # reviewed: off the queue
            finally:
                browser.close()
    finally:
        stop_server(server)

    labels = flor.dataframe("label", "corrected")
    labels = labels[labels["label"].notna()]
    row = labels[labels["item"] == item]
    assert len(row) == 1
    assert (int(row["label"].iloc[0]), bool(row["corrected"].iloc[0]), row["task"].iloc[0]) == (corrected, True, "run")
    assert len(labels) == shown and int(labels["corrected"].sum()) == 1

    run_tool(project.root, *make, "train")  # the label store changed, so make trains again
    newest = train_runs()
    assert len(newest) == 2
    assert newest["n_human_labels"].iloc[-1] == shown
    assert item in newest["train_items"].iloc[-1]
