"""The DICOM Segmentation (PS3.3 A.51): one BINARY segment per hemorrhage subtype present.

The segmentation is written on the grid of the *source* CT instances, frame by frame, so
that every viewer can overlay it on the images it has without resampling:

* The mask of :class:`pipeline.findings.Findings` lives on the analysed volume's grid. For
  every source instance the reconstruction kept (duplicates and slices of another
  orientation are left out; see ``report.dropped``), the label of the nearest volume voxel is
  taken at each pixel centre of the source plane (PS3.3 C.7.6.2.1.1 geometry).
* On an untilted, evenly spaced series the source planes are the volume's slices and the
  copy is exact. After gantry-tilt correction or z resampling the mapping is nearest
  neighbour in patient coordinates: the SEG then matches the analysed mask to within half a
  voxel, and voxels of gap-filled slices that lie between source planes are not represented
  (the SR says so).
* Frames without any segmented pixel are omitted (highdicom's ``omit_empty_frames``).
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import highdicom as hd
import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset

from pipeline.findings import SUBTYPE_CODE, SUBTYPES, Findings
from pipeline.volume import Volume
from sr_writer import codes
from sr_writer.config import ResultsConfig
from sr_writer.identity import (
    ResultUids,
    character_set_kwargs,
    date_time,
    device_serial_number,
    patched_header,
    restore_character_set,
    software_versions,
    stamp_creation,
)

LOGGER = logging.getLogger(__name__)

SEG_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage (BINARY)


@dataclass(frozen=True)
class SourcePlane:
    """One source frame and its geometry (PS3.3 C.7.6.2)."""

    dataset: Dataset
    frame: int | None  # 0-based frame of a multi-frame instance; None for single-frame
    position: np.ndarray  # ImagePositionPatient, mm
    row_cosine: np.ndarray  # direction of increasing column index
    col_cosine: np.ndarray  # direction of increasing row index
    spacing: tuple[float, float]  # (between rows, between columns), mm
    rows: int
    cols: int

    @property
    def sop_uid(self) -> str:
        """SOPInstanceUID of the instance holding this plane."""
        return str(self.dataset.SOPInstanceUID)


@dataclass
class SegResult:
    """The Segmentation (or None) and what the SR needs to reference it."""

    dataset: hd.seg.Segmentation | None
    segment_numbers: dict[str, int] = field(default_factory=dict)  # subtype -> number
    tracking_uids: dict[str, str] = field(default_factory=dict)  # subtype -> TrackingUID
    planes: list[SourcePlane] = field(default_factory=list)
    source_labels: np.ndarray | None = None  # (planes, rows, cols) uint8 on the source grid
    notes: list[str] = field(default_factory=list)


def _floats(value: Any, n: int) -> np.ndarray:
    arr = np.array([float(v) for v in value], dtype=float)
    if arr.shape != (n,):
        raise ValueError(f"expected {n} numbers, got {value!r}")
    return arr


def _frame_geometry(item: Dataset, shared: Dataset | None, keyword: str) -> Dataset | None:
    """The first item of functional group ``keyword`` (per-frame first, then shared)."""
    for group in (item, shared):
        if group is not None and keyword in group and len(group[keyword].value):
            found: Dataset = group[keyword].value[0]
            return found
    return None


def planes_of(ds: Dataset) -> list[SourcePlane]:
    """The planes of one CT instance: one for single-frame, one per frame for Enhanced CT."""
    rows, cols = int(ds.Rows), int(ds.Columns)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if "PerFrameFunctionalGroupsSequence" not in ds:
        iop = _floats(ds.ImageOrientationPatient, 6)
        dy, dx = _floats(ds.PixelSpacing, 2)
        return [SourcePlane(ds, None, _floats(ds.ImagePositionPatient, 3), iop[:3], iop[3:],
                            (float(dy), float(dx)), rows, cols)]
    shared = (ds.SharedFunctionalGroupsSequence[0]
              if "SharedFunctionalGroupsSequence" in ds else None)
    out = []
    for k, item in enumerate(ds.PerFrameFunctionalGroupsSequence[:frames]):
        orient = _frame_geometry(item, shared, "PlaneOrientationSequence")
        measures = _frame_geometry(item, shared, "PixelMeasuresSequence")
        position = _frame_geometry(item, shared, "PlanePositionSequence")
        if orient is None or measures is None or position is None:
            raise ValueError(f"{ds.SOPInstanceUID} frame {k + 1}: no plane geometry")
        iop = _floats(orient.ImageOrientationPatient, 6)
        dy, dx = _floats(measures.PixelSpacing, 2)
        out.append(SourcePlane(ds, k, _floats(position.ImagePositionPatient, 3), iop[:3],
                               iop[3:], (float(dy), float(dx)), rows, cols))
    return out


def labels_on_plane(labels: np.ndarray, image: sitk.Image, plane: SourcePlane) -> np.ndarray:
    """The label of the nearest voxel of ``labels`` (z, y, x on ``image``'s grid) at every
    pixel centre of ``plane``; 0 outside the volume. Returns (rows, cols) like ``labels``."""
    origin = np.asarray(image.GetOrigin(), dtype=float)
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    to_index = np.linalg.inv(direction * spacing[None, :])  # physical offset -> (i, j, k)
    p0 = to_index @ (plane.position - origin)
    step_c = to_index @ (plane.row_cosine * plane.spacing[1])
    step_r = to_index @ (plane.col_cosine * plane.spacing[0])
    nz, ny, nx = labels.shape
    out = np.zeros((plane.rows, plane.cols), dtype=labels.dtype)
    rounded = np.rint(p0)
    if (np.allclose(step_c, (1.0, 0.0, 0.0), atol=1e-4)
            and np.allclose(step_r, (0.0, 1.0, 0.0), atol=1e-4)
            and np.allclose(p0, rounded, atol=1e-3)):
        # The plane is a slice of the grid (possibly shifted by whole pixels): copy.
        x0, y0, z = (int(v) for v in rounded)
        if not 0 <= z < nz:
            return out
        xs, ys = max(x0, 0), max(y0, 0)
        xe, ye = min(x0 + plane.cols, nx), min(y0 + plane.rows, ny)
        if xe > xs and ye > ys:
            out[ys - y0:ye - y0, xs - x0:xe - x0] = labels[z, ys:ye, xs:xe]
        return out
    r = np.arange(plane.rows, dtype=float)[:, None, None]
    c = np.arange(plane.cols, dtype=float)[None, :, None]
    idx = np.rint(p0[None, None, :] + r * step_r[None, None, :] + c * step_c[None, None, :])
    ix, iy, iz = idx[..., 0], idx[..., 1], idx[..., 2]
    inside = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny) & (iz >= 0) & (iz < nz)
    out[inside] = labels[iz[inside].astype(np.intp), iy[inside].astype(np.intp),
                         ix[inside].astype(np.intp)]
    return out


def select_planes(source_datasets: Sequence[Dataset], volume: Volume
                  ) -> tuple[list[SourcePlane], list[str]]:
    """The source planes of the analysed series that the reconstruction kept, sorted along
    the volume's slice normal, and notes on what was left out."""
    notes: list[str] = []
    dropped = {(d.get("sop_uid"), d.get("frame")) for d in volume.report.dropped}
    dropped_sops = {sop for sop, frame in dropped if frame in (None, 0)}
    planes: list[SourcePlane] = []
    for ds in source_datasets:
        if str(ds.get("SeriesInstanceUID", "")) != volume.series_uid:
            continue
        multi = "PerFrameFunctionalGroupsSequence" in ds
        if not multi and str(ds.SOPInstanceUID) in dropped_sops:
            continue
        try:
            planes.extend(planes_of(ds))
        except (AttributeError, ValueError, TypeError) as exc:
            notes.append(f"source instance {ds.get('SOPInstanceUID', '?')} has no usable "
                         f"plane geometry ({exc}); not referenced by the segmentation")
    normal = np.asarray(volume.image.GetDirection(), dtype=float).reshape(3, 3)[:, 2]
    planes.sort(key=lambda p: (float(p.position @ normal), p.sop_uid, p.frame or 0))
    return planes, notes


def _segment_description(number: int, subtype: str, findings: Findings,
                         config: ResultsConfig, tracking_uid: str) -> hd.seg.SegmentDescription:
    model = findings.model
    algorithm = hd.AlgorithmIdentificationSequence(
        name=model.name,
        family=codes.ARTIFICIAL_INTELLIGENCE,
        version=f"{model.version} weights {model.sha256[:12]}",
        source=config.manufacturer,
        parameters={"weights_sha256": model.sha256,
                    "demo_weights": "yes" if model.demo else "no"},
    )
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=codes.SUBTYPE_LABELS[subtype],
        segmented_property_category=codes.MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
        segmented_property_type=codes.LABEL_CODES[subtype],
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        tracking_uid=tracking_uid,
        tracking_id=f"AI ICH {subtype}",
        anatomic_regions=[codes.INTRACRANIAL_STRUCTURE],
        display_color=hd.color.CIELabColor.from_rgb(*config.segment_colors[subtype]),
    )


def build_segmentation(source_datasets: Sequence[Dataset], volume: Volume,
                       findings: Findings, config: ResultsConfig, uids: ResultUids,
                       now: datetime.datetime) -> SegResult:
    """The Segmentation of ``findings.mask`` on the source frames, or a result without a
    dataset (and a note saying why) when there is nothing to segment."""
    present = [s for s in SUBTYPES if bool(np.any(findings.mask == SUBTYPE_CODE[s]))]
    if not present:
        return SegResult(None, notes=["no hemorrhage voxels were segmented: no SEG written"])
    if not volume.frame_of_reference_uid:
        return SegResult(None, notes=["the source series has no FrameOfReferenceUID: the "
                                      "segmentation cannot be placed and was not written"])
    planes, notes = select_planes(source_datasets, volume)
    if not planes:
        return SegResult(None, notes=notes + ["none of the source instances of the analysed "
                                              "series was given: no SEG written"])
    multi = {p.sop_uid for p in planes if p.frame is not None}
    if multi and (len(multi) > 1 or any(p.frame is None for p in planes)):
        return SegResult(None, notes=notes + [
            "the series mixes several multi-frame instances: a SEG must reference one "
            "multi-frame image or single-frame images only; no SEG written"])
    if len({(p.rows, p.cols) for p in planes}) > 1:
        return SegResult(None, notes=notes + ["the source frames differ in matrix size: no "
                                              "SEG written"])
    mask = np.ascontiguousarray(findings.mask.astype(np.uint8, copy=False))
    labels = np.stack([labels_on_plane(mask, volume.image, p) for p in planes])
    present_on_source = [s for s in present if bool(np.any(labels == SUBTYPE_CODE[s]))]
    for s in present:
        if s not in present_on_source:
            notes.append(f"{s}: all segmented voxels lie between source slices (gap-filled "
                         "or resampled slices); not in the SEG")
    if not present_on_source:
        return SegResult(None, planes=planes, source_labels=labels,
                         notes=notes + ["no segmented voxel falls on a source slice: no SEG "
                                        "written"])
    if volume.report.tilt_corrected or volume.report.resampled or volume.report.filled_slices:
        notes.append("the analysed volume was tilt-corrected, resampled or gap-filled: the "
                     "SEG holds the nearest analysed voxel at each source pixel")

    numbers = {s: k for k, s in enumerate(present_on_source, start=1)}
    tracking = {s: uids.make("segment-tracking", SUBTYPE_CODE[s]) for s in present_on_source}
    descriptions = [_segment_description(numbers[s], s, findings, config, tracking[s])
                    for s in present_on_source]
    stacked = np.stack([labels == SUBTYPE_CODE[s] for s in present_on_source], axis=-1)
    if multi:
        source_images = [patched_header(planes[0].dataset)]
        order = np.argsort([p.frame or 0 for p in planes])
        stacked = stacked[order]
    else:
        source_images = [patched_header(p.dataset) for p in planes]
    if not multi and any(img.get("SliceThickness") in (None, "") for img in source_images):
        # Type 2 in the CT Image module; highdicom copies it into the SEG's Pixel Measures
        # (on these copies only: the sources are not changed).
        for img in source_images:
            if img.get("SliceThickness") in (None, ""):
                img.SliceThickness = round(float(volume.spacing[0]), 3)
        notes.append("the source instances have no SliceThickness: the SEG's pixel measures "
                     "give the analysed slice spacing instead")
    da, tm = date_time(now)
    seg = hd.seg.Segmentation(
        source_images=source_images,
        pixel_array=stacked.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=uids.make("seg-series"),
        series_number=config.seg_series_number,
        sop_instance_uid=uids.make("seg"),
        instance_number=1,
        manufacturer=config.manufacturer,
        manufacturer_model_name=config.manufacturer_model_name,
        # LO, VM 1-n: highdicom annotates tuple[str], pydicom wants a list for 2+ values
        software_versions=cast(Any, software_versions(findings)),
        device_serial_number=device_serial_number(config),
        content_description=("AI ICH segmentation - not for diagnostic use"
                             + (" (DEMO weights)" if findings.model.demo else "")),
        content_creator_name=config.content_creator,
        content_label="ICH_AI",
        series_description=config.seg_series_description,
        content_date=da,
        content_time=tm,
        series_date=da,
        series_time=tm,
        institution_name=config.institution_name,
        **character_set_kwargs(source_images[0]),
    )
    restore_character_set(seg, source_images[0])
    pin_dimension_organizations(seg, uids)
    seg.BodyPartExamined = str(source_images[0].get("BodyPartExamined", "") or "HEAD")[:16]
    stamp_creation(seg, now)
    LOGGER.info("SEG %s: %d segment(s) %s on %d of %d source frame(s)", seg.SOPInstanceUID,
                len(present_on_source), present_on_source,
                int(np.count_nonzero(labels.reshape(len(planes), -1).any(axis=1))), len(planes))
    return SegResult(seg, numbers, tracking, planes, labels, notes)


def pin_dimension_organizations(seg: Dataset, uids: ResultUids) -> None:
    """Replace the Dimension Organization UIDs that highdicom draws at random with UIDs
    derived from the input (PS3.3 C.7.6.17), so that re-running an analysis, or running it
    offline (``ich-node analyze``), makes the same SEG."""
    pinned: dict[str, str] = {}
    for index, item in enumerate(seg.get("DimensionOrganizationSequence", [])):
        new = uids.make("seg-dimension-organization", index)
        pinned[str(item.DimensionOrganizationUID)] = new
        item.DimensionOrganizationUID = new
    for item in seg.get("DimensionIndexSequence", []):
        old = str(item.get("DimensionOrganizationUID", ""))
        if old in pinned:
            item.DimensionOrganizationUID = pinned[old]
