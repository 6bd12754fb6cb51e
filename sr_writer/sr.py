"""The Comprehensive 3D SR: a TID 1500 Measurement Report of the analysis.

Content tree (PS3.16 TID 1500, see ``docs/results.md`` for every code)::

    Imaging Measurement Report (DCM 126000)
      Language, Observation Context: device observer (TID 1004) = the model
      Procedure reported: CT of head (SCT 303653007)
      Image Library (TID 1600): every analysed CT instance
      Imaging Measurements (DCM 126010)
        per RSNA label, a TID 1501 group: finding (e.g. SCT 1386000), algorithm (TID 4019),
            Probability (DCM 122157, UCUM "1") and Present/Absent (CID 241)
        per subtype in the SEG, a TID 1411 group: Referenced Segment, Volume (SCT 118565006, ml)
        per lesion, a TID 1411 group: centroid (SCOORD3D POINT, purpose Center), Volume,
            extents along the patient axes (mm)
      Qualitative Evaluations (UMLS C0034375)
        Priority (SCT 260870009) = Urgent / Routine, Impression, intended use,
        DEMO warning, reconstruction and analysis notes (TEXT)
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from pipeline.findings import LABELS, Findings, Lesion
from pipeline.volume import Volume
from sr_writer import codes, wording
from sr_writer.config import ResultsConfig
from sr_writer.identity import (
    ResultUids,
    character_set_kwargs,
    date_time,
    device_serial_number,
    device_uid,
    patched_header,
    restore_character_set,
    software_versions,
    stamp_creation,
)
from sr_writer.seg import SEG_SOP_CLASS_UID, SegResult, SourcePlane

LOGGER = logging.getLogger(__name__)


def algorithm_identification(findings: Findings, config: ResultsConfig
                             ) -> hd.sr.AlgorithmIdentification:
    """TID 4019: name, version, manufacturer, family and the weights' checksum and
    operating points as parameters."""
    model = findings.model
    thresholds = ", ".join(f"{name} {f.threshold:.3f}" for name, f in findings.labels.items())
    return hd.sr.AlgorithmIdentification(
        name=model.name,
        version=model.version,
        parameters=[f"weights sha256 {model.sha256}",
                    f"operating thresholds: {thresholds}",
                    f"demo weights: {'yes' if model.demo else 'no'}"],
        family=codes.ARTIFICIAL_INTELLIGENCE,
        manufacturer=config.manufacturer,
    )


def _classification_groups(findings: Findings, uids: ResultUids,
                           algorithm: hd.sr.AlgorithmIdentification
                           ) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    groups = []
    for index, label in enumerate(LABELS):
        result = findings.labels[label]
        finding = codes.LABEL_CODES[label]
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=uids.make("classification-tracking", index),
                identifier=f"AI ICH classification {label}"),
            finding_type=finding,
            algorithm_id=algorithm,
            measurements=[hd.sr.Measurement(name=codes.PROBABILITY,
                                            value=round(float(result.probability), 6),
                                            unit=codes.UNIT_PROBABILITY)],
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(
                name=finding, value=codes.PRESENT if result.positive else codes.ABSENT)],
        ))
    return groups


def _segment_groups(findings: Findings, volume: Volume, seg: SegResult,
                    algorithm: hd.sr.AlgorithmIdentification
                    ) -> list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]:
    if seg.dataset is None:
        return []
    volumes = findings.volumes_ml()
    groups = []
    for subtype, number in seg.segment_numbers.items():
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=seg.tracking_uids[subtype], identifier=f"AI ICH {subtype}"),
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=SEG_SOP_CLASS_UID,
                sop_instance_uid=str(seg.dataset.SOPInstanceUID),
                segment_number=number,
                source_series=hd.sr.SourceSeriesForSegmentation(volume.series_uid)),
            finding_type=codes.LABEL_CODES[subtype],
            finding_category=codes.MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
            algorithm_id=algorithm,
            measurements=[hd.sr.Measurement(name=codes.VOLUME, value=volumes[subtype],
                                            unit=codes.UNIT_ML)],
        ))
    return groups


def _lesion_group(index: int, lesion: Lesion, volume: Volume, uids: ResultUids,
                  frame_of_reference_uid: str
                  ) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    extents: list[tuple[Code, float]] = [
        (codes.EXTENT_LEFT_RIGHT, lesion.extent_mm[0]),
        (codes.EXTENT_ANTERIOR_POSTERIOR, lesion.extent_mm[1]),
        (codes.EXTENT_HEAD_FOOT, lesion.extent_mm[2]),
    ]
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uids.make("lesion-tracking", index),
            identifier=f"AI ICH lesion {index} ({lesion.subtype})"),
        referenced_volume_surface=hd.sr.VolumeSurface(
            graphic_type=hd.sr.GraphicTypeValues3D.POINT,
            graphic_data=np.asarray([lesion.centroid_mm], dtype=float),
            frame_of_reference_uid=frame_of_reference_uid,
            source_series=hd.sr.SourceSeriesForSegmentation(volume.series_uid)),
        geometric_purpose=codes.CENTER,
        finding_type=codes.LABEL_CODES[lesion.subtype],
        finding_category=codes.MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
        measurements=[hd.sr.Measurement(name=codes.VOLUME, value=round(lesion.volume_ml, 3),
                                        unit=codes.UNIT_ML)]
        + [hd.sr.Measurement(name=name, value=round(float(value), 2), unit=codes.UNIT_MM)
           for name, value in extents],
    )


def _text(name: Code, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=name, value=wording.sentence(value),
                                 relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)


def qualitative_evaluations(findings: Findings, notes: Sequence[str],
                            recon_notes: Sequence[str]) -> hd.sr.ContainerContentItem:
    """TID 1500 "Qualitative Evaluations": triage priority and the statements a reader must
    see (impression, intended use, DEMO warning, reconstruction and analysis notes)."""
    container = hd.sr.ContainerContentItem(
        name=codes.QUALITATIVE_EVALUATIONS,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    items: list[hd.sr.ContentItem] = [
        hd.sr.CodeContentItem(name=codes.PRIORITY,
                              value=codes.URGENT if findings.positive else codes.ROUTINE,
                              relationship_type=hd.sr.RelationshipTypeValues.CONTAINS),
        _text(codes.IMPRESSION, wording.impression(findings)),
        _text(codes.INTENDED_USE, wording.INTENDED_USE),
    ]
    if findings.model.demo:
        items.append(_text(codes.DEMO_MODEL, wording.DEMO_WARNING))
    items += [_text(codes.RECONSTRUCTION_NOTE, n) for n in recon_notes]
    items += [_text(codes.ANALYSIS_NOTE, n) for n in notes]
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def library_header(plane: SourcePlane, volume: Volume, notes: list[str]) -> Dataset:
    """A copy of the plane's instance with what TID 1604 (Image Library Entry Descriptors
    for cross-sectional modalities) needs at the top level, where highdicom looks for it:
    Enhanced CT keeps geometry in functional groups (the first frame's is used), and
    SliceThickness is Type 2 in the CT Image module (empty: the analysed slice spacing is
    listed instead, and a note says so)."""
    out = patched_header(plane.dataset)
    out.PixelSpacing = [f"{v:.6g}" for v in plane.spacing]
    out.ImageOrientationPatient = [f"{v:.6g}" for v in (*plane.row_cosine, *plane.col_cosine)]
    out.ImagePositionPatient = [f"{v:.6g}" for v in plane.position]
    thickness = out.get("SliceThickness")
    if thickness in (None, ""):
        measures = (plane.dataset.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
                    if "SharedFunctionalGroupsSequence" in plane.dataset
                    and "PixelMeasuresSequence" in plane.dataset.SharedFunctionalGroupsSequence[0]
                    else Dataset())
        thickness = measures.get("SliceThickness")
    if thickness in (None, ""):
        thickness = round(float(volume.spacing[0]), 3)
        note = ("the source instances have no SliceThickness: the image library lists the "
                "analysed slice spacing instead")
        if note not in notes:
            notes.append(note)
    out.SliceThickness = thickness
    return out


def build_sr(planes: Sequence[SourcePlane], volume: Volume, findings: Findings,
             seg: SegResult, config: ResultsConfig, uids: ResultUids,
             now: datetime.datetime, notes: Sequence[str]) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 report. ``planes`` are the analysed CT frames (their instances form the
    image library and the evidence); ``notes`` are analysis notes to state in the report."""
    if not planes:
        raise ValueError("At least one analysed CT instance is required for the SR.")
    library_notes: list[str] = []
    images: list[Dataset] = []
    listed: set[str] = set()
    for plane in planes:
        if plane.sop_uid not in listed:
            listed.add(plane.sop_uid)
            images.append(library_header(plane, volume, library_notes))
    algorithm = algorithm_identification(findings, config)
    observer = hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept.from_code(codes.DEVICE),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(config, findings),
            name=findings.model.name,
            manufacturer_name=config.manufacturer,
            model_name=f"{findings.model.name} {findings.model.version}",
            serial_number=device_serial_number(config)))
    measurements: list[hd.sr.MeasurementsAndQualitativeEvaluations
                       | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations] = []
    measurements += _classification_groups(findings, uids, algorithm)
    measurements += _segment_groups(findings, volume, seg, algorithm)
    all_notes = [*findings.warnings, *seg.notes, *notes, *library_notes]
    if findings.lesions and volume.frame_of_reference_uid:
        measurements += [_lesion_group(k, lesion, volume, uids, volume.frame_of_reference_uid)
                         for k, lesion in enumerate(findings.lesions, start=1)]
    elif findings.lesions:
        all_notes.append("the source series has no FrameOfReferenceUID: lesion centroids "
                         "are not reported")
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.CT_OF_HEAD,
        imaging_measurements=measurements,
        referenced_images=images,
    )
    report[0].ContentSequence.append(
        qualitative_evaluations(findings, all_notes, wording.reconstruction_notes(volume)))
    evidence: list[Dataset] = list(images)
    if seg.dataset is not None:
        evidence.append(seg.dataset)
    da, tm = date_time(now)
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=uids.make("sr-series"),
        series_number=config.sr_series_number,
        sop_instance_uid=uids.make("sr"),
        instance_number=1,
        manufacturer=config.manufacturer,
        is_complete=True,
        is_final=True,
        is_verified=False,
        institution_name=config.institution_name,
        series_description=config.sr_series_description,
        manufacturer_model_name=config.manufacturer_model_name,
        software_versions=software_versions(findings),
        device_serial_number=device_serial_number(config),
        content_date=da,
        content_time=tm,
        series_date=da,
        series_time=tm,
        coding_schemes=[CodingSchemeIdentificationItem(
            designator=codes.PRIVATE_SCHEME, name=codes.PRIVATE_SCHEME_NAME,
            responsible_organization=codes.PRIVATE_SCHEME_RESPONSIBLE)],
        **character_set_kwargs(images[0]),
    )
    restore_character_set(sr, images[0])
    stamp_creation(sr, now)
    LOGGER.info("SR %s: %d measurement group(s), %d image(s) in the library",
                sr.SOPInstanceUID, len(measurements), len(images))
    return sr
