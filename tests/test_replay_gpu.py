"""Issue 16.6: a small torch training recorded on the CPU, replayed with ``--device cuda``.

The run is recorded on the CPU; today's version logs two new statements in the training loop
(the weight after each step, and the device the model is on), and ``flordb-build replay`` puts
them into the recorded run on the device ``--device`` names. The replayed weights must equal
those of the same training done on the CPU here (within a tolerance: CUDA's float arithmetic is
not the CPU's), and the logged device must be the one asked for.

The CUDA case runs where a GPU is present and skips with the reason elsewhere (CI has none); the
same test on ``--device cpu`` runs everywhere, so the harness itself is proven wherever it runs.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

import flordb_build as flor
from tests.conftest import Project

EPOCHS = 4
# The script picks its device as a user's would (FLOR_TEST_DEVICE pins it: cpu when recording).
SCRIPT = """\
import os
import torch
import flordb_build as flor

device = os.environ.get("FLOR_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
torch.manual_seed(0)
x = torch.linspace(-1, 1, 32, dtype=torch.float64).unsqueeze(1).to(device)
y = 3 * x + 0.5
model = torch.nn.Linear(1, 1).double().to(device)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
with flor.checkpointing(model=model, optimizer=optimizer):
    for epoch in flor.loop("epoch", range(%d)):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        flor.log("loss", loss.item())
%s
"""
TODAY = """\
        flor.log("weight", model.weight.item())
        flor.log("device", str(model.weight.device))
"""
REL_TOL = 1e-9


def _cpu_weights() -> list[float]:
    """The weight after each epoch of the same training, done on the CPU in this process."""
    import torch

    torch.manual_seed(0)
    x = torch.linspace(-1, 1, 32, dtype=torch.float64).unsqueeze(1)
    y = 3 * x + 0.5
    model = torch.nn.Linear(1, 1).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    weights = []
    for _epoch in range(EPOCHS):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        weights.append(model.weight.item())
    return weights


def _cuda_refusal() -> str | None:
    """Why CUDA cannot be used here, or None when it can."""
    import torch

    if not torch.cuda.is_available():
        return f"needs a CUDA GPU that torch {torch.__version__} can use (CI has none)"
    return None


@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(
        not Path("/dev/nvidiactl").exists(), reason="needs a CUDA GPU (no NVIDIA device here; CI has none)")),
])
def test_a_cpu_recorded_training_replays_on_the_asked_device_with_the_same_values(
    project: Project, monkeypatch: pytest.MonkeyPatch, device: str
) -> None:
    pytest.importorskip("torch", reason="needs torch: pip install 'flordb_build[example]'")
    if device == "cuda" and (refusal := _cuda_refusal()):
        pytest.skip(refusal)
    project.write("pyproject.toml", "[tool.flordb_build]\ncheckpoint_every = 1\n")
    project.write("train.py", SCRIPT % (EPOCHS, ""))
    project.commit_all("train")
    project.run("train.py", env={"FLOR_TEST_DEVICE": "cpu"})
    project.write("train.py", SCRIPT % (EPOCHS, TODAY))
    project.commit_all("today: weight, device")

    monkeypatch.setenv("FLOR_TEST_DEVICE", device)  # what the script runs on: the replay's device
    done = project.cli("replay", "weight", "device", "--yes", "--device", device)
    assert "nondeterminism" not in done.stdout + done.stderr, done.stdout  # the recorded losses, replayed alike

    frame = flor.dataframe("loss", "weight", "device").sort_values("epoch")
    assert list(frame["epoch"]) == list(range(EPOCHS))
    assert set(frame["device"]) == {"cuda:0" if device == "cuda" else "cpu"}  # it ran where it was asked to
    expected = _cpu_weights()
    replayed = [float(w) for w in frame["weight"]]
    assert all(math.isclose(r, e, rel_tol=REL_TOL) for r, e in zip(replayed, expected, strict=True)), (
        replayed, expected)
    # The training moves the weight towards 3, step by step: the values are the training's, not a constant.
    assert len(set(replayed)) == EPOCHS and abs(replayed[-1] - 3) < abs(replayed[0] - 3)
