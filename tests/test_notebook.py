"""Runs started in a real Jupyter kernel (ipykernel, driven by jupyter_client as a notebook
server drives it): the run is named after the notebook, and a missing ``flor.arg`` is an
``ArgError`` the notebook can catch, not a ``SystemExit`` that kills the kernel."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from typing import Any

import pytest

import flordb_build as flor
from tests.conftest import GIT_ENV, Project

manager = pytest.importorskip("jupyter_client.manager", reason="jupyter_client is not installed (dev extra)")
pytest.importorskip("ipykernel", reason="ipykernel is not installed (dev extra)")

NOTEBOOK = {"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}


@pytest.fixture
def kernel(project: Project) -> Iterator[Any]:
    """A Python kernel of this interpreter in the project, serving ``notebooks/analysis.ipynb``."""
    project.write("notebooks/analysis.ipynb", json.dumps(NOTEBOOK))
    project.commit_all("notebook")
    env = {
        **os.environ, **GIT_ENV,
        # What jupyter_server puts in a kernel's environment: the notebook it serves.
        "JPY_SESSION_NAME": str(project.root / "notebooks" / "analysis.ipynb"),
    }
    km = manager.KernelManager(kernel_name="python3")
    km.kernel_spec.argv[0] = sys.executable  # this interpreter, the one with flordb_build installed
    km.start_kernel(cwd=str(project.root / "notebooks"), env=env)
    client = km.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=120)
        yield client
    finally:
        client.stop_channels()
        km.shutdown_kernel(now=True)


def execute(client: Any, code: str) -> dict[str, Any]:
    """Run one cell; return the reply's content (status, and ename/evalue on error)."""
    reply = client.execute_interactive(code, timeout=120, output_hook=lambda _msg: None)
    return dict(reply["content"])


def test_a_notebook_run_is_named_after_the_notebook_and_arg_raises(kernel: Any, project: Project) -> None:
    assert execute(kernel, "import flordb_build as flor")["status"] == "ok"
    missing = execute(kernel, "lr = flor.arg('lr')")
    assert (missing["status"], missing["ename"]) == ("error", "ArgError")
    assert "--kwargs lr=VALUE" in missing["evalue"]
    caught = execute(kernel, "try:\n    flor.arg('lr')\nexcept flor.FlorBuildError:\n    lr = 0.01")
    assert caught["status"] == "ok"  # the kernel lives on: the next cell runs
    cell = "for epoch in flor.loop('epoch', range(2)):\n    flor.log('loss', lr / (epoch + 1))\nflor.commit()"
    assert execute(kernel, cell)["status"] == "ok"
    frame = flor.dataframe("loss")
    assert frame["filename"].tolist() == ["notebooks/analysis.ipynb"] * 2
    assert frame["loss"].tolist() == [0.01, 0.005]
    status = flor.query("SELECT status FROM runs")["status"].tolist()
    assert status == ["ok"]  # a refused arg in a notebook does not fail the run
