"""Demo classifier 0.4.0: classifier 0.3.0 fine-tuned on subarachnoid-rich phantom studies.

Classifier 0.3.0 missed thin convexity and sulcal subarachnoid blood on the held-out set
(three of its four missed positive series). This round starts from 0.3.0 (taken out of
the git history, commit 8195b16, since ``pipeline/weights/classifier.pt`` holds 0.4.0
after this recipe) and trains one round of 20 epochs of 100 steps, as 0.3.0's rounds did,
on 300 new studies of phantom version 2 at 256 px: 150 with subarachnoid blood only
(``subtypes=["subarachnoid"]``, seeds 9 000 000-9 000 149) and 150 ordinary ones (seeds
9 100 000-9 100 149), with 40 ordinary validation studies (seeds 9 500 000-9 500 039).
The shipped weights are the round's ``best.pt`` (epoch 15 of 20).

Run from the repository root: ``python pipeline/weights/recipes/classifier_0_4_0.py``
(about 1 minute of phantom data, then about 13 minutes on 2 CPU cores).
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.models.weights import weights_from_git
from pipeline.train import PhantomJob, TrainOptions, prepare_phantom, run_training

START = Path("runs/classifier_0_3_0")
OUT = Path("runs/cls040")
SAH_ONLY: list[PhantomJob] = [(9_000_000 + i, {"subtypes": ["subarachnoid"]})
                              for i in range(150)]
ORDINARY: list[PhantomJob] = [(9_100_000 + i, {"subtypes": None}) for i in range(150)]
VALIDATION: list[PhantomJob] = [(9_500_000 + i, {"subtypes": None}) for i in range(40)]


def main() -> None:
    """Fetch 0.3.0, generate the studies and fine-tune."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    init = weights_from_git("8195b16", "classifier", START)
    data = prepare_phantom(SAH_ONLY + ORDINARY + VALIDATION, 256, 128, processes=2)
    n_train = len(SAH_ONLY) + len(ORDINARY)
    opts = TrainOptions(kind="classifier", fmt="phantom", data=None, epochs=20, batch=6,
                        lr=0.0008, seq_len=16, steps_per_epoch=100, max_minutes=30, seed=9,
                        size=128, n_train=n_train, n_val=len(VALIDATION), matrix=256,
                        init=str(init),
                        command="python pipeline/weights/recipes/classifier_0_4_0.py")
    result = run_training(opts, OUT, data=(data[:n_train], data[n_train:]))
    print(result.best)


if __name__ == "__main__":
    main()
