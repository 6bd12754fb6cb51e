"""Training: tiny overfit runs, checkpoints, resume and metadata."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.datasets import Study
from pipeline.evaluate import (
    operating_point,
    roc_auc,
    sensitivity_at_specificity,
    sensitivity_specificity,
    weighted_log_loss,
)
from pipeline.findings import SUBTYPES
from pipeline.models.classifier import ClassifierArch
from pipeline.models.inputs import classifier_spec, segmenter_spec
from pipeline.models.weights import load_weights, read_meta
from pipeline.phantom import PHANTOM_VERSION
from pipeline.train import (
    Prepared,
    TrainingError,
    TrainOptions,
    crop_around_blood,
    segmenter_batch,
    slices_by_class,
    train,
)
from tests.pipeline.test_models import toy_study


def toy_set(n: int, seed: int) -> list[Study]:
    """Studies with 0, 1 or 2 subtypes, every subtype present and absent somewhere."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = i % 3
        subtypes = tuple(str(s) for s in rng.choice(SUBTYPES, size=k, replace=False))
        out.append(toy_study(seed * 100 + i, subtypes))
    return out


def test_metric_helpers() -> None:
    y = np.array([0, 0, 1, 1])
    assert roc_auc(y, np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert roc_auc(y, np.array([0.5, 0.5, 0.5, 0.5])) == pytest.approx(0.5)
    assert roc_auc(np.zeros(3), np.ones(3)) is None
    t = operating_point(y, np.array([0.1, 0.4, 0.35, 0.8]), 0.95)
    assert 0.1 < t < 0.35
    assert sensitivity_specificity(y, np.array([0.1, 0.4, 0.35, 0.8]), t) == (1.0, 0.5)
    youden = operating_point(y, np.array([0.1, 0.4, 0.35, 0.8]))
    assert youden == pytest.approx(0.225)  # J = 0.5 at 0.8 and at 0.35: the lower one
    assert sensitivity_at_specificity(y, np.array([0.1, 0.4, 0.35, 0.8]), 0.95) == 0.5
    perfect = np.eye(6)[[0, 1]]
    assert weighted_log_loss(perfect, perfect) < 1e-5


def test_classifier_overfits_and_resumes(tmp_path: Path) -> None:
    studies = toy_set(9, seed=1)
    out = tmp_path / "cls"
    result = train("classifier", None, "phantom", out, epochs=5, batch=3, lr=3e-3, seed=0,
                   size=32, seq_len=8, steps_per_epoch=16, studies=studies, device="cpu")
    assert result.best.is_file() and result.last.is_file()
    assert (out / "best.json").is_file() and (out / "history.json").is_file()
    state, meta = load_weights(result.best, classifier_spec(32, 1), "classifier")
    assert meta.operating_points.keys() == {"any", *SUBTYPES}
    aucs = meta.metrics["validation"]["auc_series"]
    assert aucs["any"] == pytest.approx(1.0), meta.metrics
    slice_aucs = list(meta.metrics["validation"]["auc_slice"].values())
    assert min(slice_aucs) > 0.8 and np.mean(slice_aucs) > 0.9, meta.metrics
    assert meta.training["options"]["size"] == 32 and meta.demo

    more = train("classifier", None, "phantom", out, epochs=6, batch=3, lr=3e-3, seed=0,
                 size=32, seq_len=8, steps_per_epoch=16, studies=studies, device="cpu",
                 resume=True)
    assert more.epochs_run == 6 and len(more.history) == 6
    with pytest.raises(TrainingError, match="size"):
        train("classifier", None, "phantom", out, epochs=8, size=64, studies=studies,
              device="cpu", resume=True)


def test_training_starts_from_given_weights(tmp_path: Path) -> None:
    """--init: the run starts from the weights file (checked like at inference), so a
    learning rate near zero ends where it started; other sizes are refused."""
    studies = toy_set(6, seed=3)
    first = train("classifier", None, "phantom", tmp_path / "a", epochs=1, batch=3, lr=3e-3,
                  seed=0, size=32, seq_len=8, steps_per_epoch=4, studies=studies, device="cpu")
    start, _ = load_weights(first.best, classifier_spec(32, 1), "classifier")
    tuned = train("classifier", None, "phantom", tmp_path / "b", epochs=1, batch=3, lr=1e-12,
                  seed=5, size=32, seq_len=8, steps_per_epoch=2, studies=studies, device="cpu",
                  init=first.best)
    end, meta = load_weights(tuned.best, classifier_spec(32, 1), "classifier")
    assert meta.training["options"]["init"] == str(first.best)
    weights = [k for k in start if start[k].is_floating_point() and "running" not in k]
    assert weights and all(torch.allclose(start[k], end[k], atol=1e-6) for k in weights)
    fresh = train("classifier", None, "phantom", tmp_path / "c", epochs=1, batch=3, lr=1e-12,
                  seed=5, size=32, seq_len=8, steps_per_epoch=2, studies=studies, device="cpu")
    other, _ = load_weights(fresh.best, classifier_spec(32, 1), "classifier")
    assert not all(torch.allclose(start[k], other[k], atol=1e-6) for k in weights)
    seg = train("segmenter", None, "phantom", tmp_path / "s", epochs=1, batch=4, size=32,
                steps_per_epoch=1, studies=studies, device="cpu")
    with pytest.raises(TrainingError, match=r"--init: .*size: 32 vs 64"):
        train("segmenter", None, "phantom", tmp_path / "t", epochs=1, size=64,
              studies=studies, device="cpu", init=seg.best)


def test_classifier_fine_tunes_at_another_size_with_its_own_architecture(
        tmp_path: Path) -> None:
    """A classifier started from weights of another input size keeps the start's network
    (not the default one for the new size), runs it on the larger slices, and resumes as
    that network; the weights it writes are checked against the new size."""
    studies = toy_set(6, seed=4)
    small = train("classifier", None, "phantom", tmp_path / "a", epochs=1, batch=3, lr=3e-3,
                  seed=0, size=128, seq_len=4, steps_per_epoch=2, studies=studies,
                  device="cpu")
    start, start_meta = load_weights(small.best, classifier_spec(128, 1), "classifier")
    big = train("classifier", None, "phantom", tmp_path / "b", epochs=1, batch=3, lr=1e-12,
                seed=5, size=256, seq_len=4, steps_per_epoch=2, studies=studies,
                device="cpu", init=small.best)
    end, meta = load_weights(big.best, classifier_spec(256, 1), "classifier")
    assert meta.architecture == start_meta.architecture
    assert meta.architecture["widths"] != ClassifierArch.for_size(256, 5).to_dict()["widths"]
    weights = [k for k in start if start[k].is_floating_point() and "running" not in k]
    assert all(torch.allclose(start[k], end[k], atol=1e-6) for k in weights)
    more = train("classifier", None, "phantom", tmp_path / "b", epochs=2, batch=3, lr=1e-3,
                 seed=5, size=256, seq_len=4, steps_per_epoch=2, studies=studies,
                 device="cpu", init=small.best, resume=True)
    assert more.epochs_run == 2
    assert read_meta(more.last.with_name("best.pt")).architecture == start_meta.architecture


def test_segmenter_overfits(tmp_path: Path) -> None:
    studies = toy_set(6, seed=2)
    result = train("segmenter", None, "phantom", tmp_path / "seg", epochs=4, batch=8,
                   lr=1e-2, seed=0, size=32, steps_per_epoch=20, studies=studies,
                   device="cpu")
    _, meta = load_weights(result.best, segmenter_spec(32, 1), "segmenter")
    dice = meta.metrics["validation"]["dice"]
    assert dice["all"] > 0.8, dice
    history = json.loads((tmp_path / "seg" / "history.json").read_text())
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_crops_keep_blood_in_view_and_match_the_target() -> None:
    rng = np.random.default_rng(0)
    y = torch.zeros((64, 64), dtype=torch.int64)
    y[50:53, 5:8] = 3  # a small bleed near the lower left corner
    x = torch.arange(2 * 64 * 64, dtype=torch.float32).reshape(2, 64, 64)
    for _ in range(50):
        xc, yc = crop_around_blood(x, y, 24, rng)
        assert xc.shape == (2, 24, 24) and yc.shape == (24, 24)
        assert (yc == 3).any()
        top, left = divmod(int(xc[0, 0, 0]), 64)  # where the crop came from
        assert torch.equal(yc, y[top:top + 24, left:left + 24])
    empty = torch.zeros((64, 64), dtype=torch.int64)
    corners = {divmod(int(crop_around_blood(x, empty, 24, rng)[0][0, 0, 0]), 64)
               for _ in range(50)}
    assert len(corners) > 10 and all(0 <= t <= 40 and 0 <= c <= 40 for t, c in corners)


def test_rare_subtypes_are_sampled_as_often_as_common_ones() -> None:
    """One slice of subarachnoid blood (code 4) among twenty of epidural (code 1): with a
    class drawn first, about half the blood crops hold subarachnoid blood."""
    z, s = 24, 32
    mask = np.zeros((z, s, s), np.uint8)
    mask[:20, 4:10, 4:10] = 1
    mask[22, 20:22, 20:30] = 4
    study = Prepared("x", np.zeros((z, 3, s, s), np.uint8), np.zeros((z, 6), np.uint8), mask)
    by_class = slices_by_class([study])
    assert sorted(by_class) == [1, 4] and by_class[4] == [(0, 22)] and len(by_class[1]) == 20
    opts = TrainOptions(kind="segmenter", fmt="phantom", data=None, batch=400, crop=16,
                        positive_fraction=1.0)
    everything = [(0, k) for k in range(z)]
    _, y = segmenter_batch([study], segmenter_spec(s, 1), opts, np.random.default_rng(0),
                           by_class, everything)
    with_sah = float((y == 4).flatten(1).any(dim=1).float().mean())
    assert 0.4 < with_sah < 0.6, with_sah


def test_segmenter_trains_on_crops(tmp_path: Path) -> None:
    studies = toy_set(6, seed=2)
    result = train("segmenter", None, "phantom", tmp_path / "seg", epochs=4, batch=8,
                   lr=1e-2, seed=0, size=64, crop=32, steps_per_epoch=20, studies=studies,
                   device="cpu")
    _, meta = load_weights(result.best, segmenter_spec(64, 1), "segmenter")
    assert meta.training["options"]["crop"] == 32 and meta.architecture["tile"] == 32
    assert meta.metrics["validation"]["dice"]["all"] > 0.6, meta.metrics  # whole slices


def test_phantom_needs_no_folder_other_formats_do(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="needs --data"):
        train("classifier", None, "rsna", tmp_path, epochs=1, device="cpu")


def test_phantom_in_memory_with_cache(tmp_path: Path) -> None:
    pytest.importorskip("pipeline.phantom")
    kwargs: dict[str, Any] = dict(epochs=1, batch=2, steps_per_epoch=1, seed=3, size=32,
                                  n_train=2, n_val=1, matrix=32, device="cpu",
                                  cache=tmp_path / "cache",
                                  phantom_options={"negative_fraction": 0.0})
    first = train("segmenter", None, "phantom", tmp_path / "a", **kwargs)
    (cached,) = list((tmp_path / "cache").glob("phantom-*.npz"))
    stamp = cached.stat().st_mtime_ns
    second = train("classifier", None, "phantom", tmp_path / "b", **kwargs)
    assert cached.stat().st_mtime_ns == stamp  # read, not regenerated
    _, meta = load_weights(second.best, classifier_spec(32, 1), "classifier")
    assert f"synthetic phantom version {PHANTOM_VERSION}" in meta.training["data"] and meta.demo
    assert first.best.is_file()


def test_prepare_phantom_matches_prepare_in_order() -> None:
    """The recipes' pool gives, in job order, what :func:`prepare` gives for each seed."""
    from pipeline.datasets import phantom_studies
    from pipeline.train import prepare, prepare_phantom

    jobs = [(31_000, {"subtypes": ["epidural"]}), (31_001, {"subtypes": None})]
    pooled = prepare_phantom(jobs, 64, 32, processes=2, chunksize=1)
    for (seed, options), got in zip(jobs, pooled, strict=True):
        want = prepare(next(phantom_studies(1, seed, 64, **options)), 32)
        assert got.study_id == want.study_id == f"phantom-{seed}"
        np.testing.assert_array_equal(got.windows, want.windows)
        np.testing.assert_array_equal(got.slice_labels, want.slice_labels)
        assert got.mask is not None and want.mask is not None
        np.testing.assert_array_equal(got.mask, want.mask)
