"""What an analysis found: the contract between the models, the DICOM writers and the node.

The JSON shape of :meth:`Findings.to_json` is public (``ich-node analyze --json``, job
reports, notifications); scripts rely on it, so change it only by adding keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# RSNA 2019 label order; index 0 is "any".
LABELS: tuple[str, ...] = ("any", "epidural", "intraparenchymal", "intraventricular",
                           "subarachnoid", "subdural")
SUBTYPES: tuple[str, ...] = LABELS[1:]
# Voxel codes of the subtype label map: 0 = no hemorrhage, 1..5 = SUBTYPES in order.
SUBTYPE_CODE: dict[str, int] = {name: code for code, name in enumerate(SUBTYPES, start=1)}


@dataclass(frozen=True)
class ModelIdentity:
    """Name, version and sha256 of the weights that produced a result (TID 4019)."""

    name: str
    version: str
    sha256: str
    demo: bool = True  # trained on the synthetic phantom: not for clinical use

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"name": self.name, "version": self.version, "sha256": self.sha256,
                "demo": self.demo}


@dataclass(frozen=True)
class LabelFinding:
    """One label's series-level probability and the decision at the operating point."""

    probability: float
    positive: bool
    threshold: float


@dataclass(frozen=True)
class Lesion:
    """One connected component of the segmentation."""

    subtype: str
    code: int  # SUBTYPE_CODE[subtype]
    volume_ml: float
    centroid_mm: tuple[float, float, float]  # patient coordinates (LPS), mm
    extent_mm: tuple[float, float, float]  # bounding box size along x, y, z, mm
    slices: tuple[int, int]  # first and last slice index of the volume (inclusive)
    largest_slice: int  # the slice with the largest cross-section (key image)
    voxels: int


@dataclass
class Findings:
    """Everything one analysis found, on the grid of the analysed volume."""

    labels: dict[str, LabelFinding]
    slice_probabilities: np.ndarray  # (z, 6) float32, LABELS order
    mask: np.ndarray  # (z, y, x) uint8 subtype codes, the volume's grid
    lesions: list[Lesion]
    model: ModelIdentity
    warnings: list[str] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)

    @property
    def positive(self) -> bool:
        """Whether the series is positive for any hemorrhage at the operating point."""
        return self.labels["any"].positive

    @property
    def present_subtypes(self) -> list[str]:
        """Subtypes called positive, in LABELS order."""
        return [s for s in SUBTYPES if self.labels[s].positive]

    def volumes_ml(self) -> dict[str, float]:
        """Segmented volume per subtype (every subtype, 0.0 when absent)."""
        totals = {s: 0.0 for s in SUBTYPES}
        for lesion in self.lesions:
            totals[lesion.subtype] += lesion.volume_ml
        return {s: round(v, 3) for s, v in totals.items()}

    def to_json(self, outputs: dict[str, Any] | None = None) -> dict[str, Any]:
        """The public JSON shape (models issue, offline analysis)."""
        return {
            "positive": self.positive,
            "labels": {name: {"probability": round(f.probability, 6), "positive": f.positive}
                       for name, f in self.labels.items()},
            "volumes_ml": self.volumes_ml(),
            "lesions": [{"subtype": les.subtype, "volume_ml": round(les.volume_ml, 3),
                         "centroid_mm": [round(c, 2) for c in les.centroid_mm],
                         "slices": list(les.slices)} for les in self.lesions],
            "warnings": list(self.warnings),
            "model": self.model.to_dict(),
            "outputs": outputs or {"sr": None, "seg": None, "preview": []},
        }
