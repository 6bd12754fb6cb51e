"""Demo segmenter 0.5.0: segmenter 0.4.0 trained one round on phantom version 3.

Phantom version 3 labels the blood that fills a voxel of pure CSF, which version 2 lost
(sulcal and ventricular blood was labelled along its edges only; see docs/phantom.md).
Every earlier segmenter learned from those rim labels. This round starts from 0.4.0
(taken out of the git history, commit 4757664, since ``pipeline/weights/segmenter.pt``
holds 0.5.0 after this recipe) and trains on 300 new studies of phantom version 3
generated at **512 px** (the matrix of real head CT and of the held-out set) and
area-averaged to the segmenter's 256-px grid: 100 with subarachnoid blood only (seeds
11 000 000-11 000 099), 50 with intraventricular blood only (11 100 000-11 100 049) and
150 ordinary studies (11 200 000-11 200 149), validated on 20 ordinary studies
(11 500 000-11 500 019). The shipped weights are the round's ``best.pt``.

Run from the repository root: ``python pipeline/weights/recipes/segmenter_0_5_0.py``
(about 5 minutes of phantom data, then about 30 minutes on 2 CPU cores).
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.models.weights import weights_from_git
from pipeline.train import PhantomJob, TrainOptions, prepare_phantom, run_training

START = Path("runs/segmenter_0_4_0")
OUT = Path("runs/seg050")
MATRIX = 512
SAH_ONLY: list[PhantomJob] = [(11_000_000 + i, {"subtypes": ["subarachnoid"]})
                              for i in range(100)]
IVH_ONLY: list[PhantomJob] = [(11_100_000 + i, {"subtypes": ["intraventricular"]})
                              for i in range(50)]
ORDINARY: list[PhantomJob] = [(11_200_000 + i, {"subtypes": None}) for i in range(150)]
VALIDATION: list[PhantomJob] = [(11_500_000 + i, {"subtypes": None}) for i in range(20)]


def main() -> None:
    """Fetch 0.4.0, generate the studies and train one round."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    init = weights_from_git("4757664", "segmenter", START)
    train_jobs = SAH_ONLY + IVH_ONLY + ORDINARY
    data = prepare_phantom(train_jobs + VALIDATION, MATRIX, 256, processes=2)
    n_train = len(train_jobs)
    opts = TrainOptions(kind="segmenter", fmt="phantom", data=None, epochs=12, batch=16,
                        lr=0.0007, seed=11, size=256, crop=128, steps_per_epoch=150,
                        n_train=n_train, n_val=len(VALIDATION), matrix=MATRIX, max_minutes=45,
                        init=str(init),
                        command="python pipeline/weights/recipes/segmenter_0_5_0.py")
    result = run_training(opts, OUT, data=(data[:n_train], data[n_train:]))
    print(result.best)


if __name__ == "__main__":
    main()
