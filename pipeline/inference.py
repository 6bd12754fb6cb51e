"""Run the classifier and the segmenter on one volume: ``run_models(volume, models, config)``.

A worker loads the networks once with :func:`load_models` and reuses the :class:`Models`
object for every series. Inference is deterministic: eval mode (batch norm uses its
running statistics, no dropout), ``torch.inference_mode``, and, when
``config.deterministic``, ``torch.use_deterministic_algorithms`` switched on for the
duration of each prediction only. Loading on the CPU sets torch's thread count
(``config.threads``, default all CPUs of the process): a process-wide setting, which is
why a worker holds one :class:`Models`.

Decisions and mask, as written into :class:`~pipeline.findings.Findings`:

* Series probabilities: with a fusion file (``config.fusion``: a named file, or
  ``fusion.json`` beside the classifier weights for 'auto'), the per-label logistic model
  of :mod:`pipeline.models.fusion` over the classifier's series and highest slice
  probabilities and the segmenter's volumes (the shipped default: ``fusion.json``);
  without one, the classifier's attention pooling alone. A label is positive when its probability reaches
  the operating point (config, else the fusion file's, else the classifier metadata's).
  "any" is also positive when any subtype is (RSNA: any = OR of subtypes); the case is
  reported in ``warnings``.
* Thin series: when the slice spacing is at most half of ``config.slab_mm``, groups of
  floor(slab_mm / spacing) consecutive slices are averaged into slabs before both
  networks (:func:`slab_factor`; thick-slab averaging, as a scanner reconstructs thick
  slices from thin ones), since the networks were trained on thick slices: on 1 mm
  phantom series the demo networks called every negative study positive. Each slice
  gets its slab's probabilities and mask.
* The mask is the segmenter's per-pixel argmax on the volume grid (logits resized back
  bilinearly from the model grid). With ``mask_gate='any_positive'`` (default) the mask
  and lesion table are emptied when the series is called negative; a
  segmentation that is withheld, or a positive series without any segmented lesion, is
  reported in ``warnings``. Subtype codes inside the mask are the segmenter's own; the
  classifier's subtype decisions do not edit the mask.
* Each connected epidural/subdural collection gets the one of the two subtypes that most
  of its voxels have (:func:`pipeline.lesions.one_extra_axial_subtype`); components below
  ``min_lesion_ml`` are removed from the mask (see :mod:`pipeline.lesions`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch

from pipeline.errors import InferenceError
from pipeline.findings import LABELS, SUBTYPE_CODE, SUBTYPES, Findings, LabelFinding, ModelIdentity
from pipeline.lesions import (
    find_lesions,
    largest_components,
    one_extra_axial_subtype,
    voxel_volume_ml,
)
from pipeline.models.classifier import ClassifierArch, SliceSeriesClassifier, build_classifier
from pipeline.models.config import ModelsConfig
from pipeline.models.fusion import Fusion, FusionInputs, check_fusion, read_fusion
from pipeline.models.inputs import (
    ModelGrid,
    classifier_spec,
    segmenter_spec,
    slice_inputs,
    windows_on_grid,
)
from pipeline.models.segmenter import Segmenter, SegmenterArch, build_segmenter
from pipeline.models.weights import WeightsMeta, load_weights
from pipeline.volume import Volume

LOGGER = logging.getLogger(__name__)


@dataclass
class Models:
    """Both networks in eval mode on their device, with their metadata; load once per
    worker (:func:`load_models`) and pass to :func:`run_models` for every series."""

    classifier: SliceSeriesClassifier
    segmenter: Segmenter
    classifier_meta: WeightsMeta
    segmenter_meta: WeightsMeta
    device: torch.device
    autocast_dtype: torch.dtype | None  # None: fp32
    thresholds: dict[str, float]  # LABELS order
    deterministic: bool = True  # torch deterministic algorithms while predicting
    fusion: Fusion | None = None  # series decisions from both networks (None: classifier)

    @property
    def identity(self) -> ModelIdentity:
        """One identity for the networks and the fusion (:func:`bundle_identity`)."""
        return bundle_identity(self.classifier_meta, self.segmenter_meta, self.fusion)


def bundle_identity(c: WeightsMeta, s: WeightsMeta, fusion: Fusion | None = None
                    ) -> ModelIdentity:
    """One identity for classifier, segmenter and fusion file: names and versions joined
    with '+', and the sha256 of the files' sha256 hex digests, each followed by a newline."""
    parts = [c, s] + ([fusion] if fusion is not None else [])
    bundle = hashlib.sha256("".join(f"{p.sha256}\n" for p in parts).encode()).hexdigest()
    return ModelIdentity(name="+".join(p.name for p in parts),
                         version="+".join(p.version for p in parts),
                         sha256=bundle, demo=any(p.demo for p in parts))


def load_fusion(config: ModelsConfig, c_meta: WeightsMeta, s_meta: WeightsMeta
                ) -> Fusion | None:
    """The configured fusion file after checking that it was fitted for these weights;
    None when ``config.fusion`` is null, or 'auto' without a fusion file beside the
    classifier weights. InferenceError names the file and the mismatch."""
    path = config.fusion_path
    if path is None or (config.fusion == "auto" and not path.is_file()):
        return None
    fusion = read_fusion(path)
    check_fusion(fusion, c_meta.sha256, s_meta.sha256, path)
    return fusion


def cpu_threads() -> int:
    """CPUs this process may run on (the affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def select_device(config: ModelsConfig) -> tuple[torch.device, torch.dtype | None]:
    """Device and autocast dtype from ``config.device`` / ``config.precision``."""
    has_cuda = torch.cuda.is_available()
    if config.device == "cuda" and not has_cuda:
        raise InferenceError("models.device is 'cuda' but torch sees no CUDA device "
                             "(use 'auto' or 'cpu')")
    if config.device == "cuda" or (config.device == "auto" and has_cuda):
        if config.precision == "fp32":
            return torch.device("cuda"), None
        if config.precision == "fp16" or (config.precision == "auto"
                                           and not torch.cuda.is_bf16_supported()):
            return torch.device("cuda"), torch.float16
        return torch.device("cuda"), torch.bfloat16
    if config.precision == "fp16":
        raise InferenceError("models.precision 'fp16' needs CUDA; use 'fp32' or 'bf16' on CPU")
    return torch.device("cpu"), torch.bfloat16 if config.precision == "bf16" else None


def _thresholds(config: ModelsConfig, meta: WeightsMeta, fusion: Fusion | None
                ) -> dict[str, float]:
    try:
        return config.thresholds.resolve(fusion.operating_points if fusion is not None
                                         else meta.operating_points)
    except ValueError as exc:
        raise InferenceError(f"models.thresholds: {exc}") from exc


def assemble_models(classifier: SliceSeriesClassifier, segmenter: Segmenter,
                    classifier_meta: WeightsMeta, segmenter_meta: WeightsMeta,
                    config: ModelsConfig, fusion: Fusion | None = None) -> Models:
    """Wrap networks already built (training, evaluation, tests) as :class:`Models`;
    ``fusion`` is used as given (:func:`load_fusion` reads and checks the configured one)."""
    device, dtype = select_device(config)
    if device.type == "cpu":
        torch.set_num_threads(config.threads or cpu_threads())
    classifier.to(device).eval()
    segmenter.to(device).eval()
    return Models(classifier, segmenter, classifier_meta, segmenter_meta, device, dtype,
                  _thresholds(config, classifier_meta, fusion), config.deterministic, fusion)


def load_models(config: ModelsConfig) -> Models:
    """Load and check both weights files (see :func:`pipeline.models.weights.load_weights`);
    raises :class:`InferenceError` naming the file and the rule that failed."""
    t0 = time.perf_counter()
    c_state, c_meta = load_weights(
        config.classifier_path,
        classifier_spec(config.classifier_input_size, config.classifier_neighbours), "classifier")
    s_state, s_meta = load_weights(
        config.segmenter_path,
        segmenter_spec(config.segmenter_input_size, config.segmenter_neighbours), "segmenter")
    try:
        c_arch = ClassifierArch.from_dict(c_meta.architecture)
        s_arch = SegmenterArch.from_dict(s_meta.architecture)
        classifier = build_classifier(c_arch)
        segmenter = build_segmenter(s_arch)
        classifier.load_state_dict(c_state)
        segmenter.load_state_dict(s_state)
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise InferenceError(f"weights do not fit the architecture in their metadata: {exc}"
                             ) from exc
    if c_arch.in_channels != c_meta.spec.channels or s_arch.in_channels != s_meta.spec.channels:
        raise InferenceError("weights metadata is inconsistent: architecture in_channels "
                             "differs from the input spec's channel count")
    fusion = load_fusion(config, c_meta, s_meta)
    models = assemble_models(classifier, segmenter, c_meta, s_meta, config, fusion)
    LOGGER.info("models loaded on %s in %.2fs: %s %s (sha256 %s), %s %s (sha256 %s), %s",
                models.device, time.perf_counter() - t0, c_meta.name, c_meta.version,
                c_meta.sha256[:12], s_meta.name, s_meta.version, s_meta.sha256[:12],
                f"fusion {fusion.name} {fusion.version}" if fusion is not None
                else "no fusion (classifier decides)")
    return models


@contextlib.contextmanager
def _autocast(models: Models) -> Iterator[None]:
    if models.autocast_dtype is None:
        yield
        return
    with torch.autocast(device_type=models.device.type, dtype=models.autocast_dtype):
        yield


@contextlib.contextmanager
def _deterministic(enabled: bool) -> Iterator[None]:
    """torch's deterministic-algorithms switch for the duration of one prediction; the
    process-wide setting is restored afterwards (it slows training code elsewhere)."""
    if not enabled:
        yield
        return
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


@dataclass
class RawOutputs:
    """Network outputs for one volume before decisions."""

    slice_probabilities: np.ndarray  # (z, 6) float32
    series_probabilities: np.ndarray  # (6,) float32
    mask: np.ndarray  # (z, y, x) uint8 argmax codes
    timings_s: dict[str, float]


def argmax_channels(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(dim=1)`` as uint8 (first maximum wins), by one pass per class:
    three times faster on CPU than torch's strided argmax over a few channels."""
    best = logits[:, 0].clone()
    out = torch.zeros(best.shape, dtype=torch.uint8, device=logits.device)
    for c in range(1, logits.shape[1]):
        channel = logits[:, c]
        out[channel > best] = c
        torch.maximum(best, channel, out=best)
    return out


def slab_factor(spacing_z_mm: float, slab_mm: float) -> int:
    """How many consecutive slices of ``spacing_z_mm`` to average into one slab of at most
    ``slab_mm`` (1: use the slices as they are)."""
    if slab_mm <= 0 or spacing_z_mm <= 0:
        return 1
    return max(1, math.floor(slab_mm / spacing_z_mm + 1e-6))


def predict(hu: np.ndarray, models: Models, batch_size: int = 16,
            segment: bool = True, slab: int = 1) -> RawOutputs:
    """Probabilities and argmax mask for a (z, y, x) HU volume (no thresholds, no gate).

    ``slab`` > 1: the networks see the means of ``slab`` consecutive slices (the last
    group may be shorter) and every slice gets its group's outputs (:func:`slab_factor`).
    """
    if hu.ndim != 3 or hu.shape[0] < 1:
        raise InferenceError(f"expected a (z, y, x) HU volume, got shape {hu.shape}")
    if slab > 1 and hu.shape[0] > 1:
        t0 = time.perf_counter()
        thick = np.stack([hu[a:a + slab].mean(axis=0, dtype=np.float32)
                          for a in range(0, hu.shape[0], slab)])
        averaging = time.perf_counter() - t0
        raw = predict(thick, models, batch_size, segment)
        t1 = time.perf_counter()
        group = np.arange(hu.shape[0]) // slab
        out = RawOutputs(raw.slice_probabilities[group], raw.series_probabilities,
                         raw.mask[group], dict(raw.timings_s))
        out.timings_s["preprocess"] += averaging + time.perf_counter() - t1
        return out
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    c_spec, s_spec = models.classifier_meta.spec, models.segmenter_meta.spec
    z = hu.shape[0]
    grids = {spec.size: ModelGrid.for_shape(hu.shape, spec.size) for spec in (c_spec, s_spec)}
    windows: dict[tuple[int, tuple[tuple[float, float], ...]], torch.Tensor] = {}
    for spec in (c_spec, s_spec):  # once when both networks share size and windows
        key = (spec.size, spec.windows)
        if key not in windows:
            windows[key] = windows_on_grid(hu, grids[spec.size], spec.windows,
                                           device=models.device)
    timings["preprocess"] = time.perf_counter() - t0
    dev = models.device
    with torch.inference_mode(), _autocast(models), _deterministic(models.deterministic):
        t1 = time.perf_counter()
        win = windows[(c_spec.size, c_spec.windows)]
        emb = [models.classifier.encode(
            slice_inputs(win, c_spec, np.arange(a, min(a + batch_size, z))).to(dev))
            for a in range(0, z, batch_size)]
        slice_logits, series_logits = models.classifier.sequence(torch.cat(emb)[None])
        slice_p = torch.sigmoid(slice_logits[0].float()).cpu().numpy().astype(np.float32)
        series_p = torch.sigmoid(series_logits[0].float()).cpu().numpy().astype(np.float32)
        timings["classifier"] = time.perf_counter() - t1
        mask = np.zeros(hu.shape, dtype=np.uint8)
        if segment:
            t2 = time.perf_counter()
            win = windows[(s_spec.size, s_spec.windows)]
            grid = grids[s_spec.size]
            for a in range(0, z, batch_size):
                idx = np.arange(a, min(a + batch_size, z))
                logits = models.segmenter.predict(slice_inputs(win, s_spec, idx).to(dev)).float()
                full = grid.to_volume(logits)
                mask[a:a + len(idx)] = argmax_channels(full).cpu().numpy()
            timings["segmenter"] = time.perf_counter() - t2
    return RawOutputs(slice_p, series_p, mask, timings)


def predict_volume(hu: np.ndarray, image: sitk.Image, models: Models, config: ModelsConfig
                   ) -> RawOutputs:
    """:func:`predict` for a volume on ``image``'s grid as ``config`` asks: its batch size
    and, for a thin series, slab averaging (:func:`slab_factor` of the slice spacing)."""
    spacing = image.GetSpacing()[2]
    slab = slab_factor(spacing, config.slab_mm)
    if slab > 1:
        LOGGER.info("%.2f mm slices averaged in groups of %d for the networks "
                    "(models.slab_mm %g)", spacing, slab, config.slab_mm)
    return predict(hu, models, config.batch_size, slab=slab)


def run_models(volume: Volume, models: Models, config: ModelsConfig) -> Findings:
    """Classify and segment ``volume``; see the module docstring for the decision rules."""
    t0 = time.perf_counter()
    raw = predict_volume(volume.hu, volume.image, models, config)
    findings = decide(raw, volume.image, models, config)
    findings.timings_s["total"] = round(time.perf_counter() - t0, 4)
    LOGGER.info("series %s: any=%.3f (%s), %d lesion(s), %.2fs", volume.series_uid,
                findings.labels["any"].probability,
                "positive" if findings.positive else "negative", len(findings.lesions),
                findings.timings_s["total"])
    return findings


def fusion_inputs(raw: RawOutputs, image: sitk.Image) -> FusionInputs:
    """What the fusion reads of network outputs on ``image``'s grid: series and highest
    slice probabilities, and the mL of the largest connected region the segmenter marks
    (argmax with each epidural/subdural collection given one subtype, before gate and size
    filter) per subtype and for all blood."""
    per_code, anywhere = largest_components(one_extra_axial_subtype(raw.mask),
                                            [SUBTYPE_CODE[s] for s in SUBTYPES])
    vox_ml = voxel_volume_ml(image)
    return FusionInputs(np.asarray(raw.series_probabilities, dtype=np.float64),
                        np.asarray(raw.slice_probabilities, dtype=np.float64).max(axis=0),
                        per_code.astype(np.float64) * vox_ml, float(anywhere) * vox_ml)


def series_probabilities(raw: RawOutputs, image: sitk.Image, models: Models) -> np.ndarray:
    """Series probability per label (LABELS order): fused when ``models.fusion`` is set,
    else the classifier's."""
    if models.fusion is None:
        return np.asarray(raw.series_probabilities, dtype=np.float32)
    return models.fusion.probabilities(fusion_inputs(raw, image))


def decide(raw: RawOutputs, image: sitk.Image, models: Models, config: ModelsConfig
           ) -> Findings:
    """Thresholds, mask gate and lesion table for network outputs on ``image``'s grid."""
    warnings: list[str] = []
    thresholds = models.thresholds
    probabilities = series_probabilities(raw, image, models)
    labels = {name: LabelFinding(probability=float(probabilities[i]),
                                 positive=bool(probabilities[i] >= thresholds[name]),
                                 threshold=thresholds[name])
              for i, name in enumerate(LABELS)}
    positive_subtypes = [s for s in SUBTYPES if labels[s].positive]
    if positive_subtypes and not labels["any"].positive:
        f = labels["any"]
        labels["any"] = LabelFinding(f.probability, True, f.threshold)
        warnings.append(f"'any' probability {f.probability:.3f} is below its threshold "
                        f"{f.threshold:.3f} but {', '.join(positive_subtypes)} is positive: "
                        "series called positive")
    t1 = time.perf_counter()
    mask = raw.mask
    if config.mask_gate == "any_positive" and not labels["any"].positive and mask.any():
        ml = float(np.count_nonzero(mask)) * voxel_volume_ml(image)
        warnings.append(f"the segmenter marked {ml:.2f} mL but the series is called "
                        "negative: no mask or lesions reported (mask_gate any_positive)")
        mask = np.zeros_like(mask)
    lesions, mask = find_lesions(one_extra_axial_subtype(mask), image, config.min_lesion_ml)
    if labels["any"].positive and not lesions:
        warnings.append(f"the series is called positive but the segmenter found no "
                        f"lesion of {config.min_lesion_ml} mL or more")
    timings = dict(raw.timings_s)
    timings["lesions"] = time.perf_counter() - t1
    return Findings(labels=labels, slice_probabilities=raw.slice_probabilities, mask=mask,
                    lesions=lesions, model=models.identity, warnings=warnings,
                    timings_s={k: round(v, 4) for k, v in timings.items()})
