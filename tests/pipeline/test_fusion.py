"""Fusion of classifier and segmenter evidence into the series decisions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.errors import InferenceError
from pipeline.evaluate import fuse
from pipeline.findings import LABELS, SUBTYPE_CODE
from pipeline.inference import RawOutputs, fusion_inputs, load_models, predict, run_models
from pipeline.models.fusion import (
    FEATURES,
    Fusion,
    FusionInputs,
    fit_fusion,
    fit_logistic,
    read_fusion,
    write_fusion,
)
from pipeline.models.weights import read_meta
from pipeline.phantom import PHANTOM_VERSION
from tests.pipeline.test_inference import save_tiny_models, toy_volume
from tests.pipeline.test_models import toy_study

REPO = Path(__file__).resolve().parents[2]


def _inputs(p: float, slice_max: float, ml: list[float], any_ml: float | None = None) -> FusionInputs:
    """Fusion inputs whose largest region of any blood is ``any_ml`` (default: the largest
    subtype region, as when the subtypes' regions do not touch)."""
    return FusionInputs(np.full(6, p), np.full(6, slice_max), np.asarray(ml, dtype=float),
                        max(ml) if any_ml is None else any_ml)


def test_features_per_label() -> None:
    x = _inputs(0.5, 0.9, [0.0, 2.0, 0.0, 0.0, 1.0], any_ml=3.0).features()
    assert x.shape == (len(LABELS), len(FEATURES))
    np.testing.assert_allclose(x[:, 0], 0.0, atol=1e-9)  # logit(0.5)
    np.testing.assert_allclose(x[:, 1], np.log(9.0), rtol=1e-6)
    # 'any' takes the largest region of any blood (3 mL), each subtype its own largest region;
    # the last column is the largest region of any blood.
    np.testing.assert_allclose(x[:, 2], np.log1p([3.0, 0.0, 2.0, 0.0, 0.0, 1.0]))
    np.testing.assert_allclose(x[:, 3], np.log1p(3.0))


def test_fusion_reads_the_largest_region_not_the_specks() -> None:
    # One 4x4x4 intraparenchymal region (64 voxels) touching a 2x4x4 subdural one, plus 40
    # single-voxel subarachnoid specks: the largest regions are 64, 32 and 1 voxels, and the
    # largest region of any blood is the touching pair (96 voxels).
    mask = np.zeros((20, 40, 40), np.uint8)
    mask[2:6, 2:6, 2:6] = SUBTYPE_CODE["intraparenchymal"]
    mask[6:8, 2:6, 2:6] = SUBTYPE_CODE["subdural"]
    for k in range(40):
        mask[10 + (k % 2) * 5, 2 * (k % 20), 30 + 4 * (k // 20)] = SUBTYPE_CODE["subarachnoid"]
    image = sitk.GetImageFromArray(mask.astype(np.float32))
    image.SetSpacing((0.5, 0.5, 2.0))  # 0.5 uL per voxel
    raw = RawOutputs(np.full((20, 6), 0.1, np.float32), np.full(6, 0.2, np.float32), mask, {})
    got = fusion_inputs(raw, image)
    vox = 0.5 * 0.5 * 2.0 / 1000.0
    np.testing.assert_allclose(got.largest_ml, np.array([0, 64, 0, 1, 32]) * vox)
    assert got.any_largest_ml == pytest.approx(96 * vox)
    np.testing.assert_allclose(got.slice_max, 0.1, rtol=1e-6)
    # A convexity collection split 48 subdural / 16 epidural voxels by the argmax counts as
    # one 64-voxel subdural region, as the lesion table reports it.
    mask[:] = 0
    mask[12:16, 20:24, 20:24] = SUBTYPE_CODE["subdural"]
    mask[12:16, 20:24, 23] = SUBTYPE_CODE["epidural"]
    got = fusion_inputs(RawOutputs(raw.slice_probabilities, raw.series_probabilities, mask,
                                   {}), image)
    np.testing.assert_allclose(got.largest_ml, np.array([0, 0, 0, 0, 64]) * vox)


def test_logistic_fit_separates_and_keeps_weights_nonnegative() -> None:
    rng = np.random.default_rng(0)
    evidence = rng.normal(size=200)
    y = (evidence + 0.3 * rng.normal(size=200) > 0).astype(float)
    noise_against = -y + 0.8 * rng.normal(size=200)  # anti-correlated with the label
    x = np.stack([evidence, noise_against], axis=1)
    free = fit_logistic(x, y, l2=0.1, nonnegative=False)
    assert free[0] > 1.0 and free[1] < 0.0
    kept = fit_logistic(x, y, l2=0.1)
    assert kept[0] > 1.0 and kept[1] == 0.0
    p = 1 / (1 + np.exp(-(x @ kept[:-1] + kept[-1])))
    assert ((p > 0.5) == (y > 0.5)).mean() > 0.85


def _fitted(classifier_sha: str = "c" * 64, segmenter_sha: str = "s" * 64) -> Fusion:
    """A fusion fitted on series whose label follows the segmented volume alone."""
    rng = np.random.default_rng(1)
    inputs, labels = [], []
    for i in range(40):
        positive = i % 2 == 1
        ml = [0.0] * 5
        if positive:
            ml[int(rng.integers(0, 5))] = float(rng.uniform(1.0, 20.0))
        inputs.append(_inputs(float(rng.uniform(0.05, 0.95)), float(rng.uniform(0.05, 0.95)), ml))
        labels.append([positive] + [ml[k] > 0 for k in range(5)])
    return fit_fusion(inputs, np.array(labels), classifier_sha, segmenter_sha, l2=0.1,
                      fitted_on="test series")


def test_fit_fusion_learns_from_the_volumes_and_round_trips(tmp_path: Path) -> None:
    fusion = _fitted()
    assert fusion.metrics["auc_fit"]["any"] == pytest.approx(1.0)
    assert fusion.coefficients["any"][2] > 0.5  # the label's volume carries the decision
    bleed = fusion.probabilities(_inputs(0.5, 0.5, [0.0, 0.0, 8.0, 0.0, 0.0]))
    clean = fusion.probabilities(_inputs(0.5, 0.5, [0.0] * 5))
    assert bleed[0] > fusion.operating_points["any"] > clean[0]
    assert bleed[3] > fusion.operating_points["intraventricular"]
    path = write_fusion(fusion, tmp_path / "fusion.json")
    again = read_fusion(path)
    assert again.coefficients == fusion.coefficients and len(again.sha256) == 64
    np.testing.assert_allclose(again.probabilities(_inputs(0.3, 0.4, [1.0, 0, 0, 0, 0])),
                               fusion.probabilities(_inputs(0.3, 0.4, [1.0, 0, 0, 0, 0])))


def test_fusion_needs_both_classes_and_a_whole_file(tmp_path: Path) -> None:
    inputs = [_inputs(0.2, 0.2, [0.0] * 5), _inputs(0.8, 0.8, [5.0, 0, 0, 0, 0])]
    labels = np.array([[0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    with pytest.raises(ValueError, match="all negative for 'intraparenchymal'"):
        fit_fusion(inputs, labels, "c", "s")
    data = _fitted().to_dict()
    del data["coefficients"]["subdural"]
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(InferenceError, match=r"bad.json is unreadable: coefficients of 'subdural'"):
        read_fusion(tmp_path / "bad.json")
    with pytest.raises(InferenceError, match="does not exist"):
        read_fusion(tmp_path / "none.json")


def test_models_use_a_matching_fusion_and_refuse_another(tmp_path: Path) -> None:
    config = save_tiny_models(tmp_path)
    volume = toy_volume(seed=7, matrix=32)
    alone = load_models(config)  # 'auto' without fusion.json beside the weights
    assert alone.fusion is None
    c_sha = read_meta(config.classifier_path).sha256
    s_sha = read_meta(config.segmenter_path).sha256
    wrong = write_fusion(_fitted(c_sha, "0" * 64), tmp_path / "fusion.json")
    with pytest.raises(InferenceError, match=r"fusion.json was fitted for other weights "
                                             r"\(segmenter sha256 000000000000"):
        load_models(config)
    write_fusion(_fitted(c_sha, s_sha), wrong)
    fused = load_models(config)
    assert fused.fusion is not None
    assert fused.thresholds == fused.fusion.operating_points
    assert fused.identity.sha256 != alone.identity.sha256
    assert fused.identity.name.endswith("+ich-fusion")
    findings = run_models(volume, fused, config)
    raw = predict(volume.hu, fused, config.batch_size)
    expected = fused.fusion.probabilities(fusion_inputs(raw, volume.image))
    got = [findings.labels[n].probability for n in LABELS]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    plain = run_models(volume, alone, config)
    np.testing.assert_allclose([plain.labels[n].probability for n in LABELS],
                               raw.series_probabilities, rtol=1e-6)
    # Set off, or named explicitly but missing.
    assert load_models(config.model_copy(update={"fusion": None})).fusion is None
    with pytest.raises(InferenceError, match="does not exist"):
        load_models(config.model_copy(update={"fusion": tmp_path / "missing.json"}))


def test_fuse_fits_on_studies_and_the_cli_refuses_one_class_data(tmp_path: Path) -> None:
    config = save_tiny_models(tmp_path)
    studies = [toy_study(seed, subtypes, matrix=32, slices=5)
               for seed, subtypes in [(1, ()), (2, ("subdural",)), (3, ("epidural",)),
                                      (4, ("intraparenchymal",)), (5, ("intraventricular",)),
                                      (6, ("subarachnoid",)), (7, ())]]
    fusion = fuse(None, "phantom", tmp_path / "fusion.json", config, studies=studies)
    assert read_fusion(tmp_path / "fusion.json").coefficients == fusion.coefficients
    assert fusion.classifier_sha256 == read_meta(config.classifier_path).sha256
    assert fusion.metrics["series"] == 7 and fusion.metrics["positives"][0] == 5
    assert fusion.fitted_on.endswith(f"phantom version {PHANTOM_VERSION}")
    assert load_models(config).fusion is not None  # 'auto' finds it beside the weights
    # The command line: one class only in the data is a clear error, exit status 2. The
    # weights come from --weights, their 32-pixel input size from the sidecars (with the
    # configured 128/256 the load would fail on the input spec instead).
    run = subprocess.run([sys.executable, "-m", "node.cli", "fuse",
                          "--weights", str(config.classifier_path),
                          "--weights", str(config.segmenter_path),
                          "--n", "2", "--matrix", "32", "--seed", "5", "--out",
                          str(tmp_path / "cli.json")], capture_output=True, text=True,
                         cwd=REPO, timeout=300)
    assert run.returncode == 2, run.stderr
    assert "ich-node fuse: the fitting series are all" in run.stderr


def test_the_shipped_fusion_fits_the_shipped_weights_and_is_on_by_default() -> None:
    from pipeline.models.config import ModelsConfig

    fused = load_models(ModelsConfig(device="cpu"))  # 'auto': pipeline/weights/fusion.json
    assert fused.fusion is not None and fused.fusion.name == "ich-demo-fusion"
    assert fused.thresholds == fused.fusion.operating_points
    assert fused.identity.name.endswith("+ich-demo-fusion")
    alone = load_models(ModelsConfig(device="cpu", fusion=None))
    assert alone.fusion is None
    assert alone.thresholds == {k: alone.classifier_meta.operating_points[k] for k in LABELS}
