"""Demo segmenter 0.3.0: segmenter 0.2.0 fine-tuned on phantom version 2.

Phantom version 2 relabelled blood in the CSF spaces: subarachnoid and intraventricular
blood replaces the CSF share of a voxel, and is labelled only where it is at least half
the voxel and the rest is not bone or calcification. Segmenter 0.2.0 had learnt labels
that also covered the bone under the vertex and the falx. This run starts from 0.2.0
(taken out of the git history, commit 2b6c02c, since ``pipeline/weights/segmenter.pt``
now holds 0.3.0) and trains on 300 new studies of phantom version 2 (seed 5: studies from
5 000 000, validation from 5 500 000) with the same crops, batches and losses as 0.2.0.
Validation uses the first 20 of the 40 validation studies, tile by tile, to keep the
epochs short on 2 CPU cores. The shipped weights are this run's ``best.pt``.

Run from the repository root: ``python pipeline/weights/recipes/segmenter_0_3_0.py``.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

from pipeline.train import TrainOptions, load_data, run_training

START = Path("runs/segmenter_0_2_0")
OUT = Path("runs/seg030")


def main() -> None:
    """Fetch 0.2.0 and fine-tune it."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    START.mkdir(parents=True, exist_ok=True)
    for name in ("segmenter.pt", "segmenter.json"):
        blob = subprocess.run(["git", "show", f"2b6c02c:pipeline/weights/{name}"],
                              check=True, capture_output=True).stdout
        (START / name).write_bytes(blob)
    opts = TrainOptions(kind="segmenter", fmt="phantom", data=None, epochs=12, batch=16,
                        lr=0.002, seed=5, size=256, crop=128, steps_per_epoch=150,
                        n_train=300, n_val=40, matrix=256, max_minutes=40,
                        command="python pipeline/weights/recipes/segmenter_0_3_0.py",
                        cache="runs/cache", init=str(START / "segmenter.pt"))
    train, val = load_data(opts)
    result = run_training(opts, OUT, resume=True, data=(train, val[:20]))
    print(result.best)


if __name__ == "__main__":
    main()
