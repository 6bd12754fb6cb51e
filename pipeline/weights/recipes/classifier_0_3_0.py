"""Demo classifier 0.3.0: classifier 0.2.0 fine-tuned on phantom version 2.

Phantom version 2 relabelled blood in the CSF spaces (subarachnoid and intraventricular
blood replaces the CSF share of a voxel and is labelled only where it shows; see
``pipeline.phantom_lesions``), so slices that 0.2.0 learnt as positive with invisible
blood are negative now and faint sulcal blood is brighter. Each round starts from the
best epoch of the one before (``train(..., init=...)``) on 300 new training and 40 new
validation studies of phantom version 2 (seeds 5 and 6: studies from N * 1 000 000 and
N * 1 000 000 + 500 000), 20 epochs of 100 steps on a cosine schedule. 0.2.0 comes out of
the git history (commit 2b6c02c), since ``pipeline/weights/classifier.pt`` now holds
0.3.0. The shipped weights are the last round's ``best.pt``.

Run from the repository root: ``python pipeline/weights/recipes/classifier_0_3_0.py``
(about 14 minutes per round on 2 CPU cores, plus 2 minutes of phantom data per round).
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.models.weights import weights_from_git
from pipeline.train import train

START = Path("runs/classifier_0_2_0")
ROUNDS = ((Path("runs/cls030a"), 5, 0.001), (Path("runs/cls030b"), 6, 0.0008))


def main() -> None:
    """Run the rounds."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    init = weights_from_git("2b6c02c", "classifier", START)
    for out, seed, lr in ROUNDS:
        result = train("classifier", None, "phantom", out, epochs=20, batch=6, lr=lr,
                       seq_len=16, steps_per_epoch=100, max_minutes=50, seed=seed, size=128,
                       n_train=300, n_val=40, matrix=256, cache=Path("runs/cache"), init=init,
                       command="python pipeline/weights/recipes/classifier_0_3_0.py")
        init = result.best
    print(init)


if __name__ == "__main__":
    main()
