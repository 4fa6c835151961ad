"""Child process of ``test_manager_crash.py``: saves steps through a CheckpointManager
until it is killed, printing ``published <step>`` when a save has returned."""

from __future__ import annotations

import sys

import numpy as np

from ckptable import CheckpointManager
from trees import Model


def model_at(step: int, width: int) -> Model:
    model = Model(layers=3, width=width)
    model.epoch = step
    for i, leaf in enumerate(model.layers.values()):
        leaf.weights = np.full(width, step * 10 + i, dtype=np.float32)
    return model


def main() -> None:
    directory, mode, keep_last, width = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    manager = CheckpointManager(
        directory, keep_last=keep_last, keep_best=1, metric="score", mode="max"
    )
    step = (manager.latest_step() or 0) + 1
    print("ready", flush=True)
    while True:
        model = model_at(step, width)
        score = float(-abs(step - 3))  # step 3 is the best
        if mode == "async":
            future = manager.save_async(model, step, {"score": score})
            model.epoch = -1  # changed right after: must not reach the checkpoint
            future.result()
        else:
            manager.save(model, step, {"score": score})
        print(f"published {step}", flush=True)
        step += 1


if __name__ == "__main__":
    main()
