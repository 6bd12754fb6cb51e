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
from multiprocessing import Pool
from pathlib import Path

import torch

from pipeline.datasets import phantom_studies
from pipeline.models.weights import weights_from_git
from pipeline.train import Prepared, TrainOptions, prepare, run_training

START = Path("runs/segmenter_0_4_0")
OUT = Path("runs/seg050")
MATRIX = 512
Job = tuple[int, list[str] | None]  # (seed, subtypes or None for an ordinary study)
SAH_ONLY: list[Job] = [(11_000_000 + i, ["subarachnoid"]) for i in range(100)]
IVH_ONLY: list[Job] = [(11_100_000 + i, ["intraventricular"]) for i in range(50)]
ORDINARY: list[Job] = [(11_200_000 + i, None) for i in range(150)]
VALIDATION: list[Job] = [(11_500_000 + i, None) for i in range(20)]


def study(job: Job) -> Prepared:
    """One phantom study at 512 px on the segmenter's 256-px grid (one thread per worker)."""
    seed, subtypes = job
    torch.set_num_threads(1)
    return prepare(next(phantom_studies(1, seed, MATRIX, subtypes=subtypes)), 256)


def main() -> None:
    """Fetch 0.4.0, generate the studies and train one round."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    init = weights_from_git("4757664", "segmenter", START)
    train_jobs = SAH_ONLY + IVH_ONLY + ORDINARY
    with Pool(2) as pool:
        data = pool.map(study, train_jobs + VALIDATION, chunksize=4)
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
