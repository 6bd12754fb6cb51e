"""Second step of the demo segmenter 0.2.0 (see MODEL_CARD.md for the first).

Continues the 256-px crop segmenter of step 1 (``runs/seg256/last.pt``, epoch 16) with
the class-balanced sampling and the present-classes Dice of ``pipeline.train``: 12 more
epochs of 150 steps on the longer cosine schedule. Validation uses 16 of the 40
validation studies, tile by tile, to keep the epochs short on 2 CPU cores. The shipped
weights are this run's ``last.pt`` (epoch 28), not its ``best.pt``: those 16 studies
hold no epidural or subarachnoid blood, so their score could not choose.

Run from the repository root: ``python pipeline/weights/recipes/segmenter_0_2_0_finetune.py``.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from pipeline.train import TrainOptions, load_data, run_training

STEP_1 = Path("runs/seg256")
OUT = Path("runs/seg256ft")


def main() -> None:
    """Run step 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    opts = TrainOptions(kind="segmenter", fmt="phantom", data=None, epochs=28, batch=16,
                        lr=0.005, seed=1, size=256, crop=128, steps_per_epoch=150,
                        n_train=300, n_val=40, matrix=256, max_minutes=40,
                        command="python pipeline/weights/recipes/segmenter_0_2_0_finetune.py",
                        cache="runs/cache")
    train, val = load_data(opts)  # step 1's cached phantom data (same seed, counts, sizes)
    OUT.mkdir(parents=True, exist_ok=True)
    if not (OUT / "last.pt").exists():
        shutil.copy(STEP_1 / "last.pt", OUT / "last.pt")
    result = run_training(opts, OUT, resume=True, data=(train, val[:16]))
    print(result.last)


if __name__ == "__main__":
    main()
