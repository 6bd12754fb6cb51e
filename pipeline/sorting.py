"""Slice geometry and ordering: from per-frame headers to a reconstruction plan.

Slices are ordered by ImagePositionPatient projected on the slice normal, the cross
product of the row and column direction cosines of ImageOrientationPatient (DICOM
PS3.3 C.7.6.2.1.1, Image Plane Module), never by InstanceNumber. Every orientation,
every gap and every duplicate position is checked, and what was done is recorded in
the returned :class:`StackPlan` (dropped duplicates, filled gaps, resampling, shear
correction for gantry tilt). Pixel data is not touched here: :mod:`pipeline.volume`
executes the plan.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
from pydicom.dataset import Dataset

from pipeline.config import VolumeConfig
from pipeline.errors import VolumeError

LOGGER = logging.getLogger(__name__)

Vec3 = tuple[float, float, float]
TargetKind = Literal["source", "resampled", "filled"]
Orientation = tuple[float, float, float, float, float, float]


@dataclass(frozen=True)
class SliceInfo:
    """Geometry and pixel-value header of one 2D image: an instance or one frame of it."""

    path: Path
    frame: int | None  # 0-based frame of a multi-frame instance; None for single-frame
    sop_uid: str | None
    position: Vec3  # ImagePositionPatient, mm (LPS)
    orientation: Orientation  # row then column cosines
    pixel_spacing: tuple[float, float]  # (between rows, between columns), mm
    rows: int
    cols: int
    slope: float
    intercept: float
    thickness: float | None
    acquisition_number: int | None
    instance_number: int | None
    created: str  # InstanceCreationDate+Time (sortable text, "" when absent)
    content: str  # ContentDate+Time, or AcquisitionDateTime of the frame
    frame_of_reference_uid: str | None
    gantry_tilt_deg: float | None  # (0018,1120), informative only

    @property
    def row_cosine(self) -> np.ndarray:
        return np.asarray(self.orientation[:3], dtype=np.float64)

    @property
    def col_cosine(self) -> np.ndarray:
        return np.asarray(self.orientation[3:], dtype=np.float64)

    @property
    def normal(self) -> np.ndarray:
        """Row cosine x column cosine (PS3.3 C.7.6.2.1.1)."""
        return np.cross(self.row_cosine, self.col_cosine)

    @property
    def label(self) -> str:
        """The SOP Instance UID (and frame) for messages."""
        uid = self.sop_uid or self.path.name
        return uid if self.frame is None else f"{uid} frame {self.frame + 1}"


@dataclass(frozen=True)
class DroppedSlice:
    """A slice left out of the volume, with the reason."""

    sop_uid: str | None
    frame: int | None
    reason: str


@dataclass(frozen=True)
class Gap:
    """Missing slices between two consecutive sources (positions along the normal, mm)."""

    after_sop_uid: str | None
    before_sop_uid: str | None
    start_mm: float
    end_mm: float
    gap_mm: float
    filled: int  # slices inserted by interpolation


@dataclass(frozen=True)
class TargetSlice:
    """One output slice: ``(1 - weight) * sources[lo] + weight * sources[hi]``."""

    lo: int
    hi: int
    weight: float
    kind: TargetKind
    sop_uid: str | None  # the source UID, the nearest source when resampled, None when filled


@dataclass
class StackPlan:
    """How to assemble the volume: sorted sources, their in-plane shifts and the z grid."""

    sources: list[SliceInfo]
    positions_mm: np.ndarray  # projection of each source IPP on the normal, ascending
    shifts_px: np.ndarray  # (n, 2): (row, column) shift moving each source onto slice 0's grid
    targets: list[TargetSlice]
    origin: Vec3
    direction: tuple[float, ...]  # 3x3 row-major, columns = row cosine, column cosine, normal
    spacing: Vec3  # (x, y, z) mm, SimpleITK order
    dropped: list[DroppedSlice] = field(default_factory=list)
    gaps: list[Gap] = field(default_factory=list)
    tilt_deg: float = 0.0
    max_shift_mm: float = 0.0
    gap_stats_mm: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def sheared(self) -> bool:
        return bool(np.any(self.shifts_px != 0.0))

    @property
    def resampled(self) -> bool:
        return any(t.kind != "source" for t in self.targets)


# --------------------------------------------------------------------------- headers


def _floats(value: Any, n: int, what: str, label: str) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise VolumeError(f"{label}: {what} is not numeric ({value!r})") from exc
    if len(out) != n or not all(math.isfinite(v) for v in out):
        raise VolumeError(f"{label}: {what} must have {n} finite values, got {value!r}")
    return out


def _required_number(value: Any, kind: type[int] | type[float], default: float, what: str,
                     label: str) -> Any:
    """*value* as an int or finite float (*default* when absent or empty); VolumeError when
    it is there but not one number (e.g. multi-valued, or text)."""
    if value is None or value == "":
        return kind(default)
    try:
        number = kind(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise VolumeError(f"{label}: {what} is not a single number ({value!r:.80})") from exc
    if not math.isfinite(number):
        raise VolumeError(f"{label}: {what} must be finite, got {value!r:.80}")
    return number


def _opt_int(value: Any) -> int | None:
    try:
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def _opt_float(value: Any) -> float | None:
    try:
        return None if value is None or value == "" else float(value)
    except (TypeError, ValueError):
        return None


def _group_item(ds: Dataset, per_frame: Any, sequence: str) -> Dataset | None:
    """An item of a functional group macro: per-frame first, then shared (PS3.3 C.7.6.16)."""
    for holder in (per_frame, _first(ds.get("SharedFunctionalGroupsSequence"))):
        if holder is not None:
            item = _first(holder.get(sequence))
            if item is not None:
                return item
    return None


def _first(seq: Any) -> Any:
    return seq[0] if seq is not None and len(seq) > 0 else None


def slices_from_dataset(ds: Dataset, path: Path) -> list[SliceInfo]:
    """One :class:`SliceInfo` per frame of ``ds``.

    Single-frame images use the Image Plane Module (PS3.3 C.7.6.2); Enhanced CT uses the
    Plane Position, Plane Orientation, Pixel Measures and Pixel Value Transformation
    functional groups (PS3.3 C.7.6.16.2), per frame or shared.
    """
    sop = str(ds.get("SOPInstanceUID", "")) or None
    label = sop or path.name
    common: dict[str, Any] = {
        "path": path,
        "sop_uid": sop,
        "rows": _required_number(ds.get("Rows"), int, 0, "Rows", label),
        "cols": _required_number(ds.get("Columns"), int, 0, "Columns", label),
        "acquisition_number": _opt_int(ds.get("AcquisitionNumber")),
        "instance_number": _opt_int(ds.get("InstanceNumber")),
        "created": f"{ds.get('InstanceCreationDate', '')}{ds.get('InstanceCreationTime', '')}",
        "frame_of_reference_uid": str(ds.get("FrameOfReferenceUID", "")) or None,
        "gantry_tilt_deg": _opt_float(ds.get("GantryDetectorTilt")),
    }
    content = f"{ds.get('ContentDate', '')}{ds.get('ContentTime', '')}"
    per_frame_seq = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame_seq is None:
        for name in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            if ds.get(name) is None:
                raise VolumeError(f"{label}: {name} is missing (PS3.3 C.7.6.2 Image Plane)")
        return [
            SliceInfo(
                frame=None,
                position=cast(Vec3, _floats(ds.ImagePositionPatient, 3, "ImagePositionPatient", label)),
                orientation=cast(Orientation, _floats(
                    ds.ImageOrientationPatient, 6, "ImageOrientationPatient", label)),
                pixel_spacing=cast(tuple[float, float], _floats(
                    ds.PixelSpacing, 2, "PixelSpacing", label)),
                slope=_required_number(ds.get("RescaleSlope"), float, 1.0, "RescaleSlope",
                                       label) or 1.0,
                intercept=_required_number(ds.get("RescaleIntercept"), float, 0.0,
                                           "RescaleIntercept", label),
                thickness=_opt_float(ds.get("SliceThickness")),
                content=content,
                **common,
            )
        ]
    n_frames = _required_number(ds.get("NumberOfFrames"), int, 1, "NumberOfFrames", label) or 1
    if len(per_frame_seq) != n_frames:
        raise VolumeError(
            f"{label}: {len(per_frame_seq)} per-frame functional groups for {n_frames} frames")
    out = []
    for f, item in enumerate(per_frame_seq):
        flabel = f"{label} frame {f + 1}"
        pos = _group_item(ds, item, "PlanePositionSequence")
        ori = _group_item(ds, item, "PlaneOrientationSequence")
        meas = _group_item(ds, item, "PixelMeasuresSequence")
        pvt = _group_item(ds, item, "PixelValueTransformationSequence")
        fc = _group_item(ds, item, "FrameContentSequence")
        if pos is None or ori is None or meas is None:
            raise VolumeError(
                f"{flabel}: Plane Position, Plane Orientation or Pixel Measures functional "
                "group is missing (PS3.3 C.7.6.16.2)")
        slope = (pvt or ds).get("RescaleSlope", 1.0)
        intercept = (pvt or ds).get("RescaleIntercept", 0.0)
        out.append(
            SliceInfo(
                frame=f,
                position=cast(Vec3, _floats(pos.get("ImagePositionPatient"), 3, "ImagePositionPatient",
                                 flabel)),
                orientation=cast(Orientation, _floats(
                    ori.get("ImageOrientationPatient"), 6, "ImageOrientationPatient", flabel)),
                pixel_spacing=cast(tuple[float, float], _floats(
                    meas.get("PixelSpacing"), 2, "PixelSpacing", flabel)),
                slope=_required_number(slope, float, 1.0, "RescaleSlope", flabel) or 1.0,
                intercept=_required_number(intercept, float, 0.0, "RescaleIntercept", flabel),
                thickness=_opt_float(meas.get("SliceThickness")),
                content=str(fc.get("FrameAcquisitionDateTime", "")) if fc else content,
                **common,
            )
        )
    return out


# --------------------------------------------------------------------------- stacks


def geometry_key(s: SliceInfo) -> tuple[int, int, float, float]:
    """Matrix size and pixel spacing (0.001 mm): slices of one volume share these."""
    return (s.rows, s.cols, round(s.pixel_spacing[0], 3), round(s.pixel_spacing[1], 3))


def split_stacks(slices: Sequence[SliceInfo], orientation_tolerance: float) -> list[list[SliceInfo]]:
    """Group slices by orientation (within tolerance) and matrix; largest group first."""
    stacks: list[tuple[np.ndarray, tuple[int, int, float, float], list[SliceInfo]]] = []
    for s in slices:
        ori = np.asarray(s.orientation)
        key = geometry_key(s)
        for ref, ref_key, members in stacks:
            if ref_key == key and float(np.max(np.abs(ref - ori))) <= orientation_tolerance:
                members.append(s)
                break
        else:
            stacks.append((ori, key, [s]))
    return sorted((m for _, _, m in stacks), key=len, reverse=True)


def describe_stack(stack: Sequence[SliceInfo]) -> str:
    """E.g. 'axial 512x512, 0.49x0.49 mm, 32 slices'."""
    s = stack[0]
    return (f"{orientation_name(s.normal)} {s.rows}x{s.cols}, "
            f"{s.pixel_spacing[0]:g}x{s.pixel_spacing[1]:g} mm, {len(stack)} slices")


def orientation_name(normal: np.ndarray) -> str:
    """axial, coronal or sagittal by the dominant axis of the slice normal (LPS)."""
    return ("sagittal", "coronal", "axial")[int(np.argmax(np.abs(normal)))]


def _keep_key(s: SliceInfo) -> tuple[int, str, str, int, int]:
    """Higher is kept: AcquisitionNumber, then newest creation, content, InstanceNumber."""
    return (
        s.acquisition_number if s.acquisition_number is not None else -1,
        s.created,
        s.content,
        s.instance_number if s.instance_number is not None else -1,
        s.frame if s.frame is not None else -1,
    )


# --------------------------------------------------------------------------- plan


def plan_stack(slices: Sequence[SliceInfo], config: VolumeConfig) -> StackPlan:
    """Sort, de-duplicate and check the slices of one series; decide the output grid.

    Raises :class:`VolumeError` when the slices cannot form one volume under ``config``
    (mixed geometry with ``mixed_geometry='reject'``, missing slices with
    ``missing_slices='reject'``, too few slices, excessive shear).
    """
    if not slices:
        raise VolumeError("no slices to assemble")
    dropped: list[DroppedSlice] = []
    warnings: list[str] = []
    notes: list[str] = []

    stacks = split_stacks(slices, config.orientation_tolerance)
    if len(stacks) > 1:
        parts = "; ".join(describe_stack(st) for st in stacks)
        if config.mixed_geometry == "reject":
            raise VolumeError(
                f"the series mixes {len(stacks)} orientations or matrix sizes ({parts}); "
                "mixed_geometry is 'reject'")
        for st in stacks[1:]:
            dropped.extend(
                DroppedSlice(s.sop_uid, s.frame,
                             f"other orientation or matrix size ({describe_stack(st)})")
                for s in st)
        warnings.append(
            f"the series mixes {len(stacks)} orientations or matrix sizes ({parts}); "
            f"kept the largest ({describe_stack(stacks[0])})")
    stack = stacks[0]
    ref = stack[0]
    row, col = ref.row_cosine, ref.col_cosine
    normal = ref.normal
    norm = float(np.linalg.norm(normal))
    if not 0.99 < norm < 1.01 or abs(float(row @ col)) > 0.01:
        raise VolumeError(
            f"{ref.label}: ImageOrientationPatient cosines are not unit and orthogonal "
            f"({ref.orientation}) (PS3.3 C.7.6.2.1.1)")
    normal = normal / norm
    frames = {s.frame_of_reference_uid for s in stack}
    if len(frames) > 1:
        warnings.append(f"slices carry {len(frames)} different FrameOfReferenceUIDs")

    # Sort by the projection on the normal; ties broken deterministically.
    proj = np.array([np.dot(np.asarray(s.position), normal) for s in stack])
    order = sorted(range(len(stack)), key=lambda i: (proj[i], _keep_key(stack[i])))
    stack = [stack[i] for i in order]
    proj = proj[order]

    # Duplicate positions: keep the highest AcquisitionNumber / newest / last instance.
    kept: list[SliceInfo] = []
    kept_pos: list[float] = []
    i = 0
    while i < len(stack):
        j = i + 1
        while j < len(stack) and proj[j] - proj[i] <= config.duplicate_tolerance_mm:
            j += 1
        group = stack[i:j]
        best = max(group, key=_keep_key)
        for s in group:
            if s is best:
                continue
            same = s.sop_uid is not None and s.sop_uid == best.sop_uid and s.frame == best.frame
            reason = ("the same instance received twice" if same else
                      f"duplicate position {proj[i]:.3f} mm; kept {best.label} "
                      "(higher AcquisitionNumber, newer, or later InstanceNumber)")
            dropped.append(DroppedSlice(s.sop_uid, s.frame, reason))
        kept.append(best)
        kept_pos.append(float(proj[i + group.index(best)]))
        i = j
    n_dups = sum(1 for d in dropped if d.reason.startswith(("duplicate", "the same")))
    if n_dups:
        LOGGER.info("dropped %d duplicate slice(s) of %d", n_dups, len(stack))
        if n_dups >= len(kept):
            warnings.append(
                f"{n_dups} slices share positions with others: the series may hold several "
                "phases or acquisitions; only one slice per position was kept")
    if len(kept) < config.min_slices:
        raise VolumeError(
            f"only {len(kept)} distinct slice position(s) remain; at least "
            f"{config.min_slices} are required (min_slices)")

    pos = np.asarray(kept_pos)
    p = np.array([s.position for s in kept], dtype=np.float64)
    dy, dx = ref.pixel_spacing

    # Gantry tilt / shear: in-plane offsets of the positions from the normal through slice 0.
    rel = p - p[0]
    along = rel @ normal
    offsets = rel - along[:, None] * normal[None, :]
    max_off = float(np.max(np.linalg.norm(offsets, axis=1))) if len(kept) > 1 else 0.0
    shifts = np.zeros((len(kept), 2))
    tilt_deg = 0.0
    tags = {s.gantry_tilt_deg for s in kept if s.gantry_tilt_deg}
    if max_off > config.tilt_tolerance_mm:
        span = along - along[0]
        t = (offsets * span[:, None]).sum(0) / max(float((span**2).sum()), 1e-12)
        tilt_deg = math.degrees(math.atan(float(np.linalg.norm(t))))
        if tilt_deg > config.max_tilt_deg:
            raise VolumeError(
                f"slice positions are sheared by {tilt_deg:.1f} degrees from the slice normal; "
                f"more than max_tilt_deg={config.max_tilt_deg}")
        resid = float(np.max(np.linalg.norm(offsets - span[:, None] * t[None, :], axis=1)))
        if resid > config.tilt_tolerance_mm:
            warnings.append(
                f"slice positions are not on a straight line (up to {resid:.2f} mm off); "
                "each slice was shifted onto the first slice's grid individually")
        shifts[:, 0] = offsets @ col / dy
        shifts[:, 1] = offsets @ row / dx
        notes.append(
            f"gantry tilt {tilt_deg:.2f} degrees detected from ImagePositionPatient (offsets up "
            f"to {max_off:.1f} mm in-plane); slices shifted onto an orthogonal grid")
        if not tags:
            notes.append("GantryDetectorTilt is absent or zero; the tilt was found from geometry")
    elif tags:
        notes.append(
            f"GantryDetectorTilt is {sorted(tags)} degrees but the positions lie on the slice "
            "normal: the images are already on an orthogonal grid")

    # Gaps along the normal.
    gaps_mm = np.diff(pos)
    targets: list[TargetSlice]
    gap_list: list[Gap] = []
    stats: dict[str, float] = {}
    if len(kept) == 1:
        dz = ref.thickness or 1.0
        targets = [TargetSlice(0, 0, 0.0, "source", kept[0].sop_uid)]
        warnings.append(f"single slice: z spacing set to {dz:g} mm from SliceThickness")
    else:
        median = float(np.median(gaps_mm))
        stats = {"min": float(gaps_mm.min()), "median": median, "max": float(gaps_mm.max())}
        big = gaps_mm > config.gap_factor * median
        if np.any(big) and config.missing_slices == "reject":
            where = ", ".join(f"{g:.2f} mm after {kept[k].label}"
                              for k, g in zip(np.flatnonzero(big), gaps_mm[big], strict=True))
            raise VolumeError(
                f"missing slices: gap(s) of {where} exceed {config.gap_factor} x the median "
                f"spacing {median:.2f} mm; missing_slices is 'reject'")
        uniform = (not np.any(big)) and bool(
            np.all(np.abs(gaps_mm - median) <= config.spacing_tolerance_mm))
        span = float(pos[-1] - pos[0])
        if uniform:
            dz = span / (len(kept) - 1)
            targets = [TargetSlice(k, k, 0.0, "source", s.sop_uid) for k, s in enumerate(kept)]
        else:
            normal_gaps = gaps_mm[~big]
            step_ref = float(np.median(normal_gaps)) if normal_gaps.size else median
            n_out = max(1, round(span / step_ref))
            dz = span / n_out
            targets = _resample_targets(kept, pos, dz, n_out, big, config)
            for k in np.flatnonzero(big):
                filled = sum(1 for t in targets if t.kind == "filled" and t.lo == k)
                gap_list.append(Gap(kept[k].sop_uid, kept[k + 1].sop_uid, float(pos[k]),
                                    float(pos[k + 1]), float(gaps_mm[k]), filled))
            n_filled = sum(1 for t in targets if t.kind == "filled")
            n_res = sum(1 for t in targets if t.kind == "resampled")
            if gap_list:
                warnings.append(
                    f"{len(gap_list)} gap(s) with missing slices "
                    f"({', '.join(f'{g.gap_mm:.2f} mm' for g in gap_list)} vs median "
                    f"{median:.2f} mm): {n_filled} slice(s) filled by linear interpolation")
            if n_res:
                warnings.append(
                    f"non-uniform spacing ({stats['min']:.3f}-{stats['max']:.3f} mm): "
                    f"resampled to {dz:.3f} mm; {n_res} slice(s) interpolated")
    direction = tuple(float(v) for v in np.column_stack([row, col, normal]).ravel())
    return StackPlan(
        sources=kept,
        positions_mm=pos,
        shifts_px=shifts,
        targets=targets,
        origin=(float(p[0, 0]), float(p[0, 1]), float(p[0, 2])),
        direction=direction,
        spacing=(float(dx), float(dy), float(dz)),
        dropped=dropped,
        gaps=gap_list,
        tilt_deg=tilt_deg,
        max_shift_mm=max_off,
        gap_stats_mm=stats,
        warnings=warnings,
        notes=notes,
    )


def _resample_targets(kept: Sequence[SliceInfo], pos: np.ndarray, dz: float, n_out: int,
                      big: np.ndarray, config: VolumeConfig) -> list[TargetSlice]:
    """Uniform grid ``pos[0] + j * dz``; each target is a source or an interpolation."""
    targets = []
    for j in range(n_out + 1):
        z = pos[0] + j * dz
        k = int(np.clip(np.searchsorted(pos, z, side="right") - 1, 0, len(pos) - 2))
        lo, hi = float(pos[k]), float(pos[k + 1])
        if abs(z - lo) <= config.spacing_tolerance_mm:
            targets.append(TargetSlice(k, k, 0.0, "source", kept[k].sop_uid))
        elif abs(z - hi) <= config.spacing_tolerance_mm:
            targets.append(TargetSlice(k + 1, k + 1, 0.0, "source", kept[k + 1].sop_uid))
        else:
            w = float(np.clip((z - lo) / (hi - lo), 0.0, 1.0))
            if big[k]:
                targets.append(TargetSlice(k, k + 1, w, "filled", None))
            else:
                near = kept[k] if w < 0.5 else kept[k + 1]
                targets.append(TargetSlice(k, k + 1, w, "resampled", near.sop_uid))
    return targets
