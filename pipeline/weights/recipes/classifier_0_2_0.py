"""Demo classifier 0.2.0: classifier 0.1.0 fine-tuned in three rounds on fresh phantom data.

Classifier 0.1.0 (sha256 ``abe82bcd...``, MODEL_CARD.md has its two commands) had seen
1,600 steps of one set of 300 studies. Each round here starts from the best epoch of the
one before (``train(..., init=...)``), draws 300 new training and 40 new validation
studies (seed 2, 3 and 4: studies from seed N * 1 000 000 and N * 1 000 000 + 500 000),
and runs 20 epochs of 100 steps on a cosine schedule with a lower peak learning rate
each time. The shipped weights are round 3's ``best.pt``. 0.1.0 comes out of the git
history (commit 070fb48), since ``pipeline/weights/classifier.pt`` now holds 0.2.0.

Run from the repository root: ``python pipeline/weights/recipes/classifier_0_2_0.py``
(about 14 minutes per round on 2 CPU cores, plus 2 minutes of phantom data per round).
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.models.weights import weights_from_git
from pipeline.train import train

START = Path("runs/classifier_0_1_0")
ROUNDS = ((Path("runs/cls128ft"), 2, 0.0015), (Path("runs/cls128ft2"), 3, 0.001),
          (Path("runs/cls128ft3"), 4, 0.0008))


def main() -> None:
    """Run the three rounds."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    init = weights_from_git("070fb48", "classifier", START)
    for out, seed, lr in ROUNDS:
        result = train("classifier", None, "phantom", out, epochs=20, batch=6, lr=lr,
                       seq_len=16, steps_per_epoch=100, max_minutes=50, seed=seed, size=128,
                       n_train=300, n_val=40, matrix=256, cache=Path("runs/cache"), init=init,
                       command="python pipeline/weights/recipes/classifier_0_2_0.py")
        init = result.best
    print(init)


if __name__ == "__main__":
    main()
