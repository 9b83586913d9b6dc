"""A tiny training loop that records its args, per-step loss and per-epoch accuracy."""

from __future__ import annotations

import math
import random

import flordb_build as flor

lr = flor.arg("lr", 0.1)
epochs = flor.arg("epochs", 3)
steps = flor.arg("steps", 5)
seed = flor.arg("seed", 0)

random.seed(seed)
weight = 0.0
for _epoch in flor.loop("epoch", range(epochs)):
    for _step in flor.loop("step", range(steps)):
        target = 1.0 + random.gauss(0, 0.05)
        grad = 2 * (weight - target)
        weight -= lr * grad
        flor.log("loss", (weight - target) ** 2)
    flor.log("val_acc", round(1 - math.exp(-4 * weight), 4))
flor.log("weight", weight)
