"""Demo segmenter 0.4.0: segmenter 0.3.0 trained one more round on new phantom studies.

Segmenter 0.3.0's validation Dice was still rising at its last epoch. This round starts
from 0.3.0 (taken out of the git history, commit 2736a47, since
``pipeline/weights/segmenter.pt`` holds 0.4.0 after this recipe) and trains on 300 new
studies of phantom version 2 (seed 7: studies from 7 000 000, validation from 7 500 000),
with the crops, batches and losses of 0.2.0 and 0.3.0, at a lower learning rate. As
before, validation uses the first 20 of the round's 40 validation studies. The shipped
weights are this round's ``best.pt``.

Run from the repository root: ``python pipeline/weights/recipes/segmenter_0_4_0.py``
(about 5 minutes of phantom data, then about 30 minutes on 2 CPU cores).
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.models.weights import weights_from_git
from pipeline.train import TrainOptions, load_data, run_training

START = Path("runs/segmenter_0_3_0")
ROUNDS = ((Path("runs/seg040"), 7, 0.001),)


def main() -> None:
    """Fetch 0.3.0 and fine-tune it."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    init = weights_from_git("2736a47", "segmenter", START)
    for out, seed, lr in ROUNDS:
        opts = TrainOptions(kind="segmenter", fmt="phantom", data=None, epochs=12, batch=16,
                            lr=lr, seed=seed, size=256, crop=128, steps_per_epoch=150,
                            n_train=300, n_val=40, matrix=256, max_minutes=40,
                            command="python pipeline/weights/recipes/segmenter_0_4_0.py",
                            cache="runs/cache", init=str(init))
        train, val = load_data(opts)
        init = run_training(opts, out, resume=True, data=(train, val[:20])).best
    print(init)


if __name__ == "__main__":
    main()
