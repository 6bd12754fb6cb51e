"""Typed configuration of the models (the ``pipeline.models`` section of ``config.yaml``).

Embedded into :class:`pipeline.config.PipelineConfig`; like the other sections it
forbids unknown keys and is frozen. The default weights are the demo weights shipped
in ``pipeline/weights/`` (trained on the synthetic phantom: not for clinical use).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.findings import LABELS

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
FUSION_FILE = "fusion.json"  # the fusion file that models.fusion 'auto' looks for


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OperatingPoints(_Strict):
    """Probability thresholds per label; ``null`` takes the stored operating point: the
    fusion file's when ``models.fusion`` is set, else the classifier metadata's (both
    chosen on validation series)."""

    any: float | None = Field(
        default=None, gt=0.0, lt=1.0,
        description="Series probability (0..1) at or above which 'any' is positive. "
        "Default: null (the stored operating point).")
    epidural: float | None = Field(
        default=None, gt=0.0, lt=1.0,
        description="Threshold (0..1) for epidural. Default: null (the stored operating point).")
    intraparenchymal: float | None = Field(
        default=None, gt=0.0, lt=1.0,
        description="Threshold (0..1) for intraparenchymal. Default: null (the stored operating point).")
    intraventricular: float | None = Field(
        default=None, gt=0.0, lt=1.0,
        description="Threshold (0..1) for intraventricular. Default: null (the stored operating point).")
    subarachnoid: float | None = Field(
        default=None, gt=0.0, lt=1.0,
        description="Threshold (0..1) for subarachnoid. Default: null (the stored operating point).")
    subdural: float | None = Field(
        default=None, gt=0.0, lt=1.0,
        description="Threshold (0..1) for subdural. Default: null (the stored operating point).")

    def resolve(self, stored: dict[str, float]) -> dict[str, float]:
        """Thresholds in LABELS order: the configured value, else the stored one."""
        out: dict[str, float] = {}
        for label in LABELS:
            value = getattr(self, label)
            if value is None:
                if label not in stored:
                    raise ValueError(f"no operating point for '{label}' in the config or the "
                                     "weights' metadata")
                value = stored[label]
            out[label] = float(value)
        return out


class ModelsConfig(_Strict):
    """Classifier and segmenter weights, their input spec and how inference runs."""

    classifier_weights: Path = Field(
        default=Path("classifier.pt"),
        description="Path of the classifier state dict (.pt) with its JSON sidecar (.json) "
        "beside it; a relative path is taken from the shipped weights folder "
        "(pipeline/weights/). Default: classifier.pt, the shipped demo weights.")
    segmenter_weights: Path = Field(
        default=Path("segmenter.pt"),
        description="Path of the segmenter state dict (.pt) with its JSON sidecar; a "
        "relative path is taken from pipeline/weights/. Default: segmenter.pt, the shipped "
        "demo weights.")
    classifier_input_size: int = Field(
        default=128, ge=32, le=1024,
        description="Pixels; for the classifier, slices are padded square and resized to "
        "this size. Must equal the size the classifier weights were trained at. Default: 128.")
    segmenter_input_size: int = Field(
        default=256, ge=32, le=1024,
        description="Pixels; the same for the segmenter, whose logits are resized back to "
        "the volume's grid. Must equal the size the segmenter weights were trained at. "
        "Default: 256.")
    classifier_neighbours: int = Field(
        default=1, ge=0, le=3,
        description="Slices on each side whose brain window is added as extra classifier "
        "channels. Must match the weights. Default: 1.")
    segmenter_neighbours: int = Field(
        default=1, ge=0, le=3,
        description="Slices on each side whose three windows are added as extra segmenter "
        "channels (2.5D). Must match the weights. Default: 1.")
    thresholds: OperatingPoints = Field(
        default=OperatingPoints(),
        description="Per-label probability thresholds (0..1). Default: the operating points "
        "stored in the fusion file (or, without one, in the classifier's metadata).")
    slab_mm: float = Field(
        default=5.0, ge=0.0, le=20.0,
        description="mm; thinner slices are averaged in groups of floor(slab_mm / spacing) "
        "consecutive slices before both networks (a 1 mm series becomes 5 mm slabs), "
        "because the networks were trained on slices of about this thickness (the demo "
        "weights: 5 mm phantom slices); per-slice probabilities and the mask are mapped back to every "
        "slice of the group. 0: never average. Default: 5.")
    batch_size: int = Field(
        default=16, ge=1, le=512,
        description="Slices per forward pass. Default: 16.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto",
        description="'auto': CUDA when available, else CPU; 'cuda' fails at start without "
        "CUDA. Default: auto.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto",
        description="'auto': bf16 autocast on CUDA (fp16 where bf16 is unsupported), fp32 on "
        "CPU. Default: auto.")
    threads: int = Field(
        default=0, ge=0, le=256,
        description="CPU threads for torch; 0 = os.cpu_count(). Default: 0.")
    deterministic: bool = Field(
        default=True,
        description="Ask torch for deterministic algorithms (same input, same probabilities). "
        "Default: true.")
    min_lesion_ml: float = Field(
        default=0.05, ge=0.0,
        description="mL; connected components of the mask below this volume are removed "
        "and not reported. Default: 0.05.")
    fusion: Literal["auto"] | Path | None = Field(
        default="auto",
        description="The fusion file that turns the classifier's probabilities and the "
        "segmenter's volumes into the series probabilities and holds their operating points "
        "(fit one with 'ich-node fuse'); it names the sha256 of the two weights files it was "
        "fitted for and is refused for any others. 'auto': fusion.json beside the "
        "classifier weights when there is one, else the classifier alone; a path: that file "
        "(relative: from pipeline/weights/), which must exist; null: the classifier alone, "
        "at the operating points of its metadata. Default: auto.")
    mask_gate: Literal["any_positive", "none"] = Field(
        default="any_positive",
        description="'any_positive': the segmentation mask (and lesion table) is kept only "
        "when the series is called positive for 'any'; 'none': always kept. "
        "Default: any_positive.")

    @property
    def classifier_path(self) -> Path:
        """The classifier weights file (relative paths from the shipped weights folder)."""
        return self.classifier_weights if self.classifier_weights.is_absolute() \
            else WEIGHTS_DIR / self.classifier_weights

    @property
    def segmenter_path(self) -> Path:
        """The segmenter weights file (relative paths from the shipped weights folder)."""
        return self.segmenter_weights if self.segmenter_weights.is_absolute() \
            else WEIGHTS_DIR / self.segmenter_weights

    @property
    def fusion_path(self) -> Path | None:
        """The fusion file: ``fusion.json`` beside the classifier weights for 'auto', a
        path (relative paths from the shipped weights folder), or None for null."""
        if self.fusion is None:
            return None
        if self.fusion == "auto":
            return self.classifier_path.parent / FUSION_FILE
        return self.fusion if self.fusion.is_absolute() else WEIGHTS_DIR / self.fusion

    @model_validator(mode="after")
    def _distinct_weights(self) -> ModelsConfig:
        if self.classifier_weights == self.segmenter_weights:
            raise ValueError("classifier_weights and segmenter_weights name the same file")
        return self
