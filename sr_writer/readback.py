"""Read our own TID 1500 SR back into findings: what a PACS user (or a test) gets.

:func:`read_sr` takes an SR that :func:`sr_writer.sr.build_sr` wrote, as it arrived at a
receiver or in a PACS, and returns the per-label probabilities and Present/Absent calls,
the segmented volume per subtype (the TID 1411 groups that reference the SEG), the triage
priority and the statements. ``ich-node demo`` builds its table from it, so the table shows
what reached the receiver, not what the worker meant to send.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import highdicom as hd
from pydicom.dataset import Dataset

from pipeline.findings import LABELS, SUBTYPES
from sr_writer import codes


class ReadbackError(ValueError):
    """The SR is not a report of this project's shape (a missing group or measurement)."""


@dataclass(frozen=True)
class ReportedLabel:
    """One RSNA label as the SR states it."""

    probability: float
    present: bool


@dataclass(frozen=True)
class ReportedFindings:
    """What one SR says. ``volumes_ml`` has the subtypes present in the SEG only."""

    labels: dict[str, ReportedLabel]
    volumes_ml: dict[str, float]
    urgent: bool
    impression: str
    statements: dict[str, list[str]] = field(default_factory=dict)  # code value -> texts

    @property
    def positive(self) -> bool:
        """Whether the SR reports "any" intracranial hemorrhage as present."""
        return self.labels["any"].present

    def top_subtypes(self, n: int = 2) -> list[tuple[str, float]]:
        """The *n* subtypes with the highest probability, highest first."""
        ranked = sorted(((s, self.labels[s].probability) for s in SUBTYPES),
                        key=lambda item: -item[1])
        return ranked[:n]

    @property
    def demo_warning(self) -> str | None:
        """The demonstration-model statement, when the SR carries one."""
        texts = self.statements.get(codes.DEMO_MODEL.value, [])
        return texts[0] if texts else None


_LABEL_BY_CODE: dict[tuple[str, str], str] = {
    (code.value, code.scheme_designator): label for label, code in codes.LABEL_CODES.items()}


def _label_of(concept: hd.sr.CodedConcept | None) -> str:
    if concept is None:
        raise ReadbackError("a measurement group has no Finding (TID 1501/1411 row 'Finding')")
    try:
        return _LABEL_BY_CODE[(concept.value, concept.scheme_designator)]
    except KeyError:
        raise ReadbackError(f"finding {concept.value} ({concept.scheme_designator}) is not one "
                            "of the hemorrhage labels") from None


def _single_value(measurements: list[hd.sr.Measurement], what: str) -> float:
    if len(measurements) != 1:
        raise ReadbackError(f"expected one {what} measurement, found {len(measurements)}")
    return float(measurements[0].value)


def read_sr(dataset: Dataset) -> ReportedFindings:
    """The findings stated by one of our SRs (Comprehensive 3D SR, TID 1500). Raises
    ReadbackError when a label, its probability or its Present/Absent call is missing."""
    report = hd.sr.Comprehensive3DSR.from_dataset(dataset).content
    if not isinstance(report, hd.sr.MeasurementReport):
        raise ReadbackError("the SR content is not a TID 1500 Measurement Report")
    labels: dict[str, ReportedLabel] = {}
    for group in report.get_image_measurement_groups():
        label = _label_of(group.finding_type)
        probability = _single_value(group.get_measurements(name=codes.PROBABILITY),
                                    "Probability")
        calls = group.get_qualitative_evaluations(name=codes.LABEL_CODES[label])
        if len(calls) != 1:
            raise ReadbackError(f"label {label}: expected one Present/Absent call, "
                                f"found {len(calls)}")
        present = calls[0][0].ConceptCodeSequence[0].CodeValue == codes.PRESENT.value
        labels[label] = ReportedLabel(probability, present)
    missing = [label for label in LABELS if label not in labels]
    if missing:
        raise ReadbackError(f"the SR has no classification group for {missing}")
    volumes: dict[str, float] = {}
    for roi in report.get_volumetric_roi_measurement_groups():
        if roi.referenced_segment is None:  # a lesion group (centroid), not a subtype total
            continue
        subtype = _label_of(roi.finding_type)
        volumes[subtype] = _single_value(roi.get_measurements(name=codes.VOLUME), "Volume")
    statements: dict[str, list[str]] = {}
    urgent = False
    qualitative = [item for item in dataset.ContentSequence
                   if item.ValueType == "CONTAINER" and item.ConceptNameCodeSequence[0].CodeValue
                   == codes.QUALITATIVE_EVALUATIONS.value]
    for item in (qualitative[0].ContentSequence if qualitative else []):
        name = str(item.ConceptNameCodeSequence[0].CodeValue)
        if item.ValueType == "TEXT":
            statements.setdefault(name, []).append(str(item.TextValue))
        elif item.ValueType == "CODE" and name == codes.PRIORITY.value:
            urgent = item.ConceptCodeSequence[0].CodeValue == codes.URGENT.value
    impression = statements.get(codes.IMPRESSION.value, [""])[0]
    return ReportedFindings(labels, volumes, urgent, impression, statements)
