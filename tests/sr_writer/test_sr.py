"""The TID 1500 SR: content read back with highdicom, and dcmtk's dsr2xml reads it."""

from __future__ import annotations

import shutil
import subprocess

import highdicom as hd
import pytest
from pydicom.dataset import Dataset

from pipeline.findings import LABELS
from sr_writer import codes
from tests.sr_writer.conftest import Case

DSR2XML = shutil.which("dsr2xml")


def qualitative_container(sr: Dataset) -> Dataset:
    last: Dataset = sr.ContentSequence[-1]
    assert last.ConceptNameCodeSequence[0].CodeValue == codes.QUALITATIVE_EVALUATIONS.value
    return last


def texts_of(container: Dataset, concept: object) -> list[str]:
    value = concept.value  # type: ignore[attr-defined]
    return [item.TextValue for item in container.ContentSequence
            if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == value]


def test_sr_is_a_measurement_report(positive: Case) -> None:
    sr = hd.sr.srread(positive.file_of("SR"))
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)
    # image library: every analysed CT instance
    library = [item for item in sr.ContentSequence
               if item.ConceptNameCodeSequence[0].CodeValue == "111028"]
    assert len(library) == 1
    listed = {it.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
              for group in library[0].ContentSequence for it in group.ContentSequence
              if it.ValueType == "IMAGE"} | {
        it.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for it in library[0].ContentSequence if it.ValueType == "IMAGE"}
    assert listed == {h.SOPInstanceUID for h in positive.headers}
    procedure = [item for item in sr.ContentSequence
                 if item.ConceptNameCodeSequence[0].CodeValue == "121058"]
    assert procedure[0].ConceptCodeSequence[0].CodeValue == "303653007"


def test_classification_per_label(positive: Case) -> None:
    report = hd.sr.srread(positive.file_of("SR")).content
    assert isinstance(report, hd.sr.MeasurementReport)
    groups = report.get_image_measurement_groups()
    assert len(groups) == len(LABELS)
    for label, group in zip(LABELS, groups, strict=True):
        assert group.finding_type is not None
        assert group.finding_type.value == codes.LABEL_CODES[label].value
        (probability,) = group.get_measurements(name=codes.PROBABILITY)
        assert probability.value == pytest.approx(positive.findings.labels[label].probability)
        assert probability.unit.value == "1"
        (call,) = group.get_qualitative_evaluations(name=codes.LABEL_CODES[label])
        expected = codes.PRESENT if positive.findings.labels[label].positive else codes.ABSENT
        assert call[0].ConceptCodeSequence[0].CodeValue == expected.value
        items = {item.ConceptNameCodeSequence[0].CodeValue: item
                 for item in group[0].ContentSequence}
        assert items["111001"].TextValue == positive.findings.model.name  # Algorithm Name
        parameters = [str(item.TextValue) for item in group[0].ContentSequence
                      if item.ConceptNameCodeSequence[0].CodeValue == "111002"]
        assert any(positive.findings.model.sha256 in p for p in parameters)


def test_volumes_reference_the_seg(positive: Case) -> None:
    sr = hd.sr.srread(positive.file_of("SR"))
    seg = positive.by_modality("SEG")[0]
    assert isinstance(sr.content, hd.sr.MeasurementReport)
    groups = sr.content.get_volumetric_roi_measurement_groups()
    segment_groups = [g for g in groups if g.referenced_segment is not None]
    lesion_groups = [g for g in groups if g.referenced_segment is None]
    assert len(segment_groups) == 2
    assert len(lesion_groups) == len(positive.findings.lesions)
    volumes = positive.findings.volumes_ml()
    by_code = {codes.LABEL_CODES[s].value: s for s in volumes}
    for group in segment_groups:
        assert group.referenced_segment is not None and group.finding_type is not None
        ref = group.referenced_segment[0]
        assert ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == seg.SOPInstanceUID
        number = int(ref.ReferencedSOPSequence[0].ReferencedSegmentNumber)
        segment = seg.SegmentSequence[number - 1]
        subtype = by_code[group.finding_type.value]
        assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == group.finding_type.value
        (volume,) = group.get_measurements(name=codes.VOLUME)
        assert volume.value == pytest.approx(volumes[subtype])
        assert volume.unit.value == "ml"
        assert group.tracking_uid == segment.TrackingUID
    for group, lesion in zip(lesion_groups, positive.findings.lesions, strict=True):
        assert isinstance(group.roi, hd.sr.VolumeSurface)
        surface = group.roi[0]
        assert surface.GraphicType == "POINT"
        assert [float(v) for v in surface.GraphicData] == pytest.approx(
            list(lesion.centroid_mm), abs=1e-3)
        (volume,) = group.get_measurements(name=codes.VOLUME)
        assert volume.value == pytest.approx(lesion.volume_ml, abs=1e-3)
    evidence = {item.ReferencedSOPInstanceUID
                for study in sr.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence
                for item in series.ReferencedSOPSequence}
    assert seg.SOPInstanceUID in evidence


def test_statements_and_priority(positive: Case, negative: Case) -> None:
    for case, urgent in ((positive, True), (negative, False)):
        sr = hd.sr.srread(case.file_of("SR"))
        container = qualitative_container(sr)
        (priority,) = [item for item in container.ContentSequence if item.ValueType == "CODE"]
        assert priority.ConceptNameCodeSequence[0].CodeValue == codes.PRIORITY.value
        expected = codes.URGENT if urgent else codes.ROUTINE
        assert priority.ConceptCodeSequence[0].CodeValue == expected.value
        assert "not a diagnosis" in texts_of(container, codes.INTENDED_USE)[0]
        assert texts_of(container, codes.DEMO_MODEL) == [
            "DEMO WEIGHTS trained on synthetic data - not for clinical use."]
    impression = texts_of(qualitative_container(hd.sr.srread(negative.file_of("SR"))),
                          codes.IMPRESSION)
    assert impression == ["AI triage: no intracranial hemorrhage detected."]
    notes = texts_of(qualitative_container(hd.sr.srread(negative.file_of("SR"))),
                     codes.ANALYSIS_NOTE)
    assert any("no SEG" in n for n in notes)


def test_device_observer(positive: Case, negative: Case) -> None:
    def observer_uid(case: Case) -> str:
        sr = hd.sr.srread(case.file_of("SR"))
        for item in sr.ContentSequence:
            if item.ConceptNameCodeSequence[0].CodeValue == "121012":
                return str(item.UID)
        raise LookupError("Device Observer UID")
    # one device, whatever study it reports on
    assert observer_uid(positive) == observer_uid(negative)


@pytest.mark.dcmtk
@pytest.mark.skipif(DSR2XML is None, reason="dcmtk's dsr2xml is not installed")
@pytest.mark.parametrize("case_name", ["positive", "negative"])
def test_dsr2xml_reads_the_sr(case_name: str, request: pytest.FixtureRequest) -> None:
    case: Case = request.getfixturevalue(case_name)
    proc = subprocess.run([str(DSR2XML), str(case.file_of("SR"))],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr and "Error" not in proc.stderr, proc.stderr
    assert "Imaging Measurement Report" in proc.stdout
    assert "Qualitative Evaluations" in proc.stdout
