"""Demo segmenter 0.3.0: segmenter 0.2.0 fine-tuned on phantom version 2.

Phantom version 2 relabelled blood in the CSF spaces: subarachnoid and intraventricular
blood replaces the CSF share of a voxel, and is labelled only where it is at least half
the voxel and the rest is not bone or calcification. Segmenter 0.2.0 had learnt labels
that also covered the bone under the vertex and the falx. This run starts from 0.2.0
(taken out of the git history, commit 2b6c02c, since ``pipeline/weights/segmenter.pt``
now holds 0.3.0) and trains in two rounds, each on 300 new studies of phantom version 2
(seed 5, then 6: studies from N * 1 000 000, validation from N * 1 000 000 + 500 000), with
the same crops, batches and losses as 0.2.0; round 2 starts from round 1's best epoch.
Validation uses the first 20 of each round's 40 validation studies, tile by tile, to keep
the epochs short on 2 CPU cores. The shipped weights are round 2's ``best.pt``.

Run from the repository root: ``python pipeline/weights/recipes/segmenter_0_3_0.py``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.models.weights import weights_from_git
from pipeline.train import TrainOptions, load_data, run_training

START = Path("runs/segmenter_0_2_0")
ROUNDS = ((Path("runs/seg030"), 5, 0.002), (Path("runs/seg030b"), 6, 0.0015))


def main() -> None:
    """Fetch 0.2.0 and fine-tune it."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    init = weights_from_git("2b6c02c", "segmenter", START)
    for out, seed, lr in ROUNDS:
        opts = TrainOptions(kind="segmenter", fmt="phantom", data=None, epochs=12, batch=16,
                            lr=lr, seed=seed, size=256, crop=128, steps_per_epoch=150,
                            n_train=300, n_val=40, matrix=256, max_minutes=40,
                            command="python pipeline/weights/recipes/segmenter_0_3_0.py",
                            cache="runs/cache", init=str(init))
        train, val = load_data(opts)
        init = run_training(opts, out, resume=True, data=(train, val[:20])).best
    print(init)


if __name__ == "__main__":
    main()
