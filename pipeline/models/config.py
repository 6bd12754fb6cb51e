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


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OperatingPoints(_Strict):
    """Probability thresholds per label; ``null`` takes the operating point stored in the
    weights' metadata (chosen on the validation set when the weights were trained)."""

    any: float | None = Field(
        default=None, gt=0.0, lt=1.0,
        description="Series probability (0..1) at or above which 'any' is positive. "
        "Default: null (the weights' operating point).")
    epidural: float | None = Field(
        default=None, gt=0.0, lt=1.0,
        description="Threshold (0..1) for epidural. Default: null (from the weights).")
    intraparenchymal: float | None = Field(
        default=None, gt=0.0, lt=1.0,
        description="Threshold (0..1) for intraparenchymal. Default: null (from the weights).")
    intraventricular: float | None = Field(
        default=None, gt=0.0, lt=1.0,
        description="Threshold (0..1) for intraventricular. Default: null (from the weights).")
    subarachnoid: float | None = Field(
        default=None, gt=0.0, lt=1.0,
        description="Threshold (0..1) for subarachnoid. Default: null (from the weights).")
    subdural: float | None = Field(
        default=None, gt=0.0, lt=1.0,
        description="Threshold (0..1) for subdural. Default: null (from the weights).")

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
        "stored with the weights.")
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
    mask_gate: Literal["any_positive", "none"] = Field(
        default="any_positive",
        description="'any_positive': the segmentation mask (and lesion table) is kept only "
        "when the classifier calls the series positive for 'any'; 'none': always kept. "
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

    @model_validator(mode="after")
    def _distinct_weights(self) -> ModelsConfig:
        if self.classifier_weights == self.segmenter_weights:
            raise ValueError("classifier_weights and segmenter_weights name the same file")
        return self
