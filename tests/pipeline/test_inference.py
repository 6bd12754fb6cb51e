"""Inference: loading checked weights once, running both networks, decisions and masks."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from pipeline.errors import InferenceError
from pipeline.findings import LABELS, Findings
from pipeline.inference import (
    Models,
    load_models,
    predict,
    run_models,
    select_device,
    slab_factor,
)
from pipeline.models.classifier import ClassifierArch, build_classifier
from pipeline.models.config import ModelsConfig, OperatingPoints
from pipeline.models.inputs import classifier_spec, segmenter_spec
from pipeline.models.segmenter import SegmenterArch, build_segmenter
from pipeline.models.weights import WeightsMeta, save_weights
from pipeline.volume import ReconstructionReport, Volume
from tests.pipeline.test_models import toy_study

SIZE = 32


def save_tiny_models(directory: Path, size: int = SIZE, seed: int = 0,
                     segmenter_size: int | None = None) -> ModelsConfig:
    """Randomly initialised small networks written as weights files; their config."""
    torch.manual_seed(seed)
    seg_size = size if segmenter_size is None else segmenter_size
    c_spec, s_spec = classifier_spec(size, 1), segmenter_spec(seg_size, 1)
    c_arch = ClassifierArch(in_channels=c_spec.channels, widths=(8, 16, 16), embedding=16,
                            hidden=8)
    s_arch = SegmenterArch(in_channels=s_spec.channels, features=(4, 4, 8, 8, 16, 4))
    classifier, segmenter = build_classifier(c_arch), build_segmenter(s_arch)
    classifier.eval()  # fresh batch-norm statistics: mean 0, variance 1
    points = {name: 0.5 for name in LABELS}
    save_weights(classifier.state_dict(), directory / "cls.pt",
                 WeightsMeta("classifier", "tiny-classifier", "0.0.1", c_spec, c_arch.to_dict(),
                             operating_points=points))
    save_weights(segmenter.state_dict(), directory / "seg.pt",
                 WeightsMeta("segmenter", "tiny-segmenter", "0.0.1", s_spec, s_arch.to_dict()))
    return ModelsConfig(classifier_weights=directory / "cls.pt",
                        segmenter_weights=directory / "seg.pt", classifier_input_size=size,
                        segmenter_input_size=seg_size, device="cpu",
                        batch_size=3, min_lesion_ml=0.0)


def toy_volume(seed: int = 3, subtypes: tuple[str, ...] = ("subdural",), matrix: int = 40,
               slices: int = 7) -> Volume:
    """A :class:`Volume` around a toy study (no DICOM files)."""
    study = toy_study(seed, subtypes, matrix=matrix, slices=slices)
    return Volume(hu=study.hu, image=study.image, source_sop_uids=[None] * slices,
                  frame_of_reference_uid=None, series_uid="1.2.826.0.1.3680043.10.1047.9",
                  study_uid="1.2.826.0.1.3680043.10.1047.8", report=ReconstructionReport())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelsConfig, Models]:
    config = save_tiny_models(tmp_path_factory.mktemp("weights"))
    return config, load_models(config)


def test_run_models_findings_shape(tiny: tuple[ModelsConfig, Models]) -> None:
    config, models = tiny
    volume = toy_volume(matrix=40)
    findings = run_models(volume, models, config)
    assert isinstance(findings, Findings)
    assert tuple(findings.labels) == LABELS
    assert findings.slice_probabilities.shape == (7, 6)
    assert findings.slice_probabilities.dtype == np.float32
    assert findings.mask.shape == volume.hu.shape and findings.mask.dtype == np.uint8
    assert set(np.unique(findings.mask).tolist()) <= set(range(6))
    assert findings.model.name == "tiny-classifier+tiny-segmenter"
    assert len(findings.model.sha256) == 64
    for name, label in findings.labels.items():
        assert 0.0 <= label.probability <= 1.0 and label.threshold == 0.5, name
    assert {"preprocess", "classifier", "segmenter", "lesions", "total"} <= set(
        findings.timings_s)
    assert findings.to_json()["model"]["demo"] is True


def test_networks_at_different_input_sizes(tmp_path: Path) -> None:
    """A 32-px classifier beside a 64-px segmenter: each sees its own grid, and the
    segmenter's mask comes back on the volume's grid."""
    config = save_tiny_models(tmp_path, size=32, segmenter_size=64)
    models = load_models(config)
    assert (models.classifier_meta.spec.size, models.segmenter_meta.spec.size) == (32, 64)
    volume = toy_volume(matrix=40)
    findings = run_models(volume, models, config)
    assert findings.mask.shape == volume.hu.shape
    assert findings.slice_probabilities.shape == (7, 6)


def test_inference_is_deterministic(tiny: tuple[ModelsConfig, Models]) -> None:
    config, models = tiny
    volume = toy_volume(seed=5, matrix=48)
    first = predict(volume.hu, models, batch_size=3)
    second = predict(volume.hu.copy(), models, batch_size=3)
    np.testing.assert_array_equal(first.slice_probabilities, second.slice_probabilities)
    np.testing.assert_array_equal(first.series_probabilities, second.series_probabilities)
    np.testing.assert_array_equal(first.mask, second.mask)
    # Batching does not change the result beyond float rounding.
    other = predict(volume.hu, models, batch_size=7)
    np.testing.assert_allclose(first.slice_probabilities, other.slice_probabilities, atol=1e-5)


def test_thin_slices_are_averaged_into_slabs_for_the_networks(
        tiny: tuple[ModelsConfig, Models]) -> None:
    """A 1 mm series is seen by the networks as 5 mm slabs (means of 5 slices; the last
    group shorter), and every slice gets its slab's outputs; 5 mm series are untouched."""
    config, models = tiny
    assert [slab_factor(s, 5.0) for s in (0.625, 1.0, 1.25, 2.5, 3.0, 5.0, 7.0)] == \
        [8, 5, 4, 2, 1, 1, 1]
    assert slab_factor(1.0, 0.0) == 1
    volume = toy_volume(seed=9, matrix=32, slices=12)
    thick = np.stack([volume.hu[a:a + 5].mean(axis=0) for a in (0, 5, 10)])
    whole = predict(thick, models, 3)
    slabbed = predict(volume.hu, models, 3, slab=5)
    group = np.array([0] * 5 + [1] * 5 + [2] * 2)
    np.testing.assert_allclose(slabbed.slice_probabilities, whole.slice_probabilities[group],
                               atol=1e-6)
    np.testing.assert_allclose(slabbed.series_probabilities, whole.series_probabilities,
                               atol=1e-6)
    np.testing.assert_array_equal(slabbed.mask, whole.mask[group])
    image = sitk.Image(volume.image)
    image.SetSpacing((*volume.image.GetSpacing()[:2], 1.0))
    thin = replace(volume, image=image)
    findings = run_models(thin, models, config)
    np.testing.assert_allclose(findings.slice_probabilities, slabbed.slice_probabilities,
                               atol=1e-6)
    off = config.model_copy(update={"slab_mm": 0.0})
    plain = predict(volume.hu, models, 3)
    np.testing.assert_allclose(run_models(thin, models, off).slice_probabilities,
                               plain.slice_probabilities, atol=1e-6)
    assert not np.allclose(plain.slice_probabilities, slabbed.slice_probabilities, atol=1e-4)


def test_thresholds_and_mask_gate(tmp_path: Path, tiny: tuple[ModelsConfig, Models]) -> None:
    config, _ = tiny
    volume = toy_volume(seed=7, matrix=32)
    high = {name: 0.999999 for name in LABELS}
    low = {name: 1e-6 for name in LABELS}
    negative_cfg = config.model_copy(update={"thresholds": OperatingPoints(**high)})
    negative = run_models(volume, load_models(negative_cfg), negative_cfg)
    assert not negative.positive and not negative.mask.any() and not negative.lesions
    raw = predict(volume.hu, load_models(negative_cfg), 3)
    if raw.mask.any():
        assert any("no mask or lesions reported" in w for w in negative.warnings)
    ungated = config.model_copy(update={"thresholds": OperatingPoints(**high),
                                        "mask_gate": "none"})
    kept = run_models(volume, load_models(ungated), ungated)
    np.testing.assert_array_equal(kept.mask > 0, raw.mask > 0)
    positive_cfg = config.model_copy(update={"thresholds": OperatingPoints(**low)})
    positive = run_models(volume, load_models(positive_cfg), positive_cfg)
    assert positive.positive and positive.present_subtypes == list(LABELS[1:])
    assert positive.labels["subdural"].threshold == pytest.approx(1e-6)
    # A subtype above its threshold makes the series positive even when 'any' is not.
    mixed = dict(high, subdural=1e-6)
    mixed_cfg = config.model_copy(update={"thresholds": OperatingPoints(**mixed)})
    called = run_models(volume, load_models(mixed_cfg), mixed_cfg)
    assert called.positive and any("series called positive" in w for w in called.warnings)


def test_weights_must_match_config(tmp_path: Path) -> None:
    config = save_tiny_models(tmp_path)
    with pytest.raises(InferenceError, match=r"cls.pt .*size: 32 vs 64"):
        load_models(config.model_copy(update={"classifier_input_size": 64}))
    with pytest.raises(InferenceError, match=r"seg.pt .*size: 32 vs 64"):
        load_models(config.model_copy(update={"segmenter_input_size": 64}))
    with pytest.raises(InferenceError, match=r"seg.pt .*neighbours: 1 vs 2"):
        load_models(config.model_copy(update={"segmenter_neighbours": 2}))
    swapped = config.model_copy(update={"classifier_weights": config.segmenter_weights,
                                        "segmenter_weights": config.classifier_weights})
    with pytest.raises(InferenceError):
        load_models(swapped)
    with pytest.raises(InferenceError, match="does not exist"):
        load_models(config.model_copy(update={"classifier_weights": tmp_path / "x.pt"}))


def test_device_selection() -> None:
    device, dtype = select_device(ModelsConfig(device="cpu"))
    assert device.type == "cpu" and dtype is None
    assert select_device(ModelsConfig(device="cpu", precision="bf16"))[1] == torch.bfloat16
    with pytest.raises(InferenceError, match="fp16"):
        select_device(ModelsConfig(device="cpu", precision="fp16"))
    if not torch.cuda.is_available():
        with pytest.raises(InferenceError, match="no CUDA"):
            select_device(ModelsConfig(device="cuda"))


def test_volume_shape_checked(tiny: tuple[ModelsConfig, Models]) -> None:
    _, models = tiny
    with pytest.raises(InferenceError, match="z, y, x"):
        predict(np.zeros((4, 4), np.float32), models)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_gpu_parity(tiny: tuple[ModelsConfig, Models]) -> None:
    config, cpu_models = tiny
    gpu_cfg = config.model_copy(update={"device": "cuda", "precision": "fp32"})
    gpu_models = load_models(gpu_cfg)
    volume = toy_volume(seed=11, matrix=64)
    cpu = predict(volume.hu, cpu_models, 3)
    gpu = predict(volume.hu, gpu_models, 3)
    np.testing.assert_allclose(cpu.slice_probabilities, gpu.slice_probabilities, atol=1e-3)
    np.testing.assert_allclose(cpu.series_probabilities, gpu.series_probabilities, atol=1e-3)
    assert (cpu.mask == gpu.mask).mean() > 0.999
    amp = load_models(config.model_copy(update={"device": "cuda", "precision": "auto"}))
    mixed = predict(volume.hu, amp, 3)
    np.testing.assert_allclose(cpu.series_probabilities, mixed.series_probabilities, atol=0.05)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_windows_on_gpu_match_cpu() -> None:
    """Windowing and resizing on the GPU give the CPU's inputs (int16 HU as CT stores them)."""
    from pipeline.models.inputs import ModelGrid, windows_on_grid

    hu = np.random.default_rng(3).integers(-1024, 2000, (5, 96, 80)).astype(np.int16)
    grid = ModelGrid.for_shape(hu.shape, 64)
    cpu = windows_on_grid(hu, grid, chunk=2)
    gpu = windows_on_grid(hu, grid, chunk=2, device=torch.device("cuda"))
    assert gpu.device.type == "cuda" and gpu.shape == cpu.shape
    np.testing.assert_allclose(gpu.cpu().numpy(), cpu.numpy(), atol=1e-5)


def test_models_identity_combines_both(tiny: tuple[ModelsConfig, Models]) -> None:
    _, models = tiny
    ident = models.identity
    assert ident.version == "0.0.1+0.0.1" and ident.demo
    other = replace(models, segmenter_meta=replace(models.segmenter_meta, sha256="0" * 64))
    assert other.identity.sha256 != ident.sha256


def test_shipped_demo_weights_find_a_large_bleed() -> None:
    """The default config loads the shipped weights (sha256 and spec checked) and calls a
    phantom study with a 30 mL epidural hematoma positive, with the lesion in the mask."""
    phantom = pytest.importorskip("pipeline.phantom")
    from pipeline.datasets import phantom_to_study

    config = ModelsConfig(device="cpu")
    models = load_models(config)
    assert models.identity.demo
    assert models.classifier_meta.spec.size == 128 and models.segmenter_meta.spec.size == 256
    study = phantom_to_study(phantom.generate_volume(424242, shape=(28, 160, 160),
                                                     subtypes=["epidural:30"]), "ship")
    volume = Volume(hu=study.hu, image=study.image, source_sop_uids=[None] * 28,
                    frame_of_reference_uid=None, series_uid="ship", study_uid="ship",
                    report=ReconstructionReport())
    findings = run_models(volume, models, config)
    assert findings.positive, findings.to_json()
    assert findings.lesions and findings.volumes_ml()["epidural"] > 10.0, findings.to_json()


def test_argmax_channels_matches_torch() -> None:
    from pipeline.inference import argmax_channels

    logits = torch.randn(3, 6, 17, 9)
    logits[0, 2, 0, 0] = logits[0, 4, 0, 0] = 50.0  # tie: the first maximum wins
    expected = logits.argmax(dim=1).to(torch.uint8)
    torch.testing.assert_close(argmax_channels(logits), expected)
    assert int(argmax_channels(logits)[0, 0, 0]) == 2


def test_prediction_leaves_torch_settings_alone(tiny: tuple[ModelsConfig, Models]) -> None:
    _, models = tiny
    assert not torch.are_deterministic_algorithms_enabled()
    predict(toy_volume(matrix=32).hu, models, 3)
    assert not torch.are_deterministic_algorithms_enabled()
