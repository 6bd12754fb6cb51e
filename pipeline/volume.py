"""Volume reconstruction: the files of one CT series -> a float32 HU volume.

Geometry follows DICOM PS3.3 C.7.6.2 (Image Plane) and, for Enhanced CT, the per-frame
functional groups of PS3.3 C.7.6.16; the ordering and clean-up rules live in
:mod:`pipeline.sorting`. Pixel values follow the Modality LUT (PS3.3 C.11.1,
``HU = RescaleSlope * stored + RescaleIntercept``) after the stored values are masked to
BitsStored and sign-extended where PixelRepresentation says so (PS3.5 8.1.1), with
PixelPaddingValue (PS3.3 C.7.5.1.1.2) set to air. See ``docs/volume.md``.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.uid import UID
from scipy import ndimage

from pipeline.config import PipelineConfig, VolumeConfig
from pipeline.errors import PipelineError, UnreadableDicom, VolumeError, print_error
from pipeline.headers import header_int, read_dicom
from pipeline.selection import SelectionResult, select_series
from pipeline.sorting import SliceInfo, StackPlan, plan_stack, slices_from_dataset

LOGGER = logging.getLogger(__name__)

# The largest stack of source slices we allocate (float32 voxels, 8 GiB): a head CT of
# 512 x 512 x 1000 is 2.6e8. Bigger means the header's Rows, Columns or slice count are
# wrong (the pixel data are checked against them only while decoding).
MAX_SOURCE_VOXELS = 2**31


@dataclass
class ReconstructionReport:
    """What was done to turn the files into the volume; JSON-ready via :meth:`to_dict`."""

    files_read: int = 0
    frames_read: int = 0
    slices_out: int = 0
    sorted_by: str = "ImagePositionPatient projected on the slice normal (row x column cosine)"
    shape_zyx: tuple[int, int, int] = (0, 0, 0)
    spacing_xyz_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    gap_mm: dict[str, float] = field(default_factory=dict)  # min / median / max between sources
    dropped: list[dict[str, Any]] = field(default_factory=list)  # sop_uid, frame, reason
    duplicates_dropped: int = 0
    gaps: list[dict[str, Any]] = field(default_factory=list)
    filled_slices: list[int] = field(default_factory=list)  # output indices, interpolated in gaps
    resampled: bool = False
    resampled_slices: list[int] = field(default_factory=list)  # output indices, interpolated
    tilt_corrected: bool = False
    tilt_deg: float = 0.0
    max_shift_mm: float = 0.0
    transfer_syntaxes: list[str] = field(default_factory=list)
    wrapped_unsigned_fixed: int = 0  # slices whose unsigned values were unwrapped
    padding_pixels: int = 0
    monochrome1_slices: int = 0
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only."""
        out: dict[str, Any] = json.loads(json.dumps(asdict(self)))
        return out


@dataclass
class Volume:
    """A HU volume with its DICOM provenance; ``hu`` is (z, y, x), slices ascending along
    the normal, and ``image`` carries the same voxels with LPS spacing, origin and direction."""

    hu: np.ndarray
    image: sitk.Image
    source_sop_uids: list[str | None]
    frame_of_reference_uid: str | None
    series_uid: str
    study_uid: str
    report: ReconstructionReport

    @property
    def spacing(self) -> tuple[float, float, float]:
        """(z, y, x) spacing in mm, matching the axes of ``hu``."""
        x, y, z = self.image.GetSpacing()
        return (z, y, x)


@dataclass(frozen=True)
class _PixelHeader:
    """What the Modality LUT needs from one file (shared by its frames)."""

    pixel_representation: int
    bits_stored: int
    photometric: str
    padding: tuple[int, int] | None  # inclusive range of stored padding values
    transfer_syntax: str


def _pixel_header(ds: Dataset) -> _PixelHeader:
    label = str(ds.get("SOPInstanceUID", "?"))

    def integer(keyword: str, default: int) -> int:
        value = header_int(ds, keyword)
        if value is None and ds.get(keyword) not in (None, ""):
            raise VolumeError(f"{label}: {keyword} is not an integer ({ds.get(keyword)!r:.80})")
        return default if value is None else value

    pr = integer("PixelRepresentation", 0)
    bits = integer("BitsStored", integer("BitsAllocated", 16)) or 16
    if not 1 <= bits <= 32:
        raise VolumeError(f"{label}: BitsStored {bits} is outside 1-32 (PS3.3 C.7.6.3)")
    padding = None
    if ds.get("PixelPaddingValue") is not None:
        ppv = integer("PixelPaddingValue", 0)
        lim = integer("PixelPaddingRangeLimit", ppv)
        padding = (min(ppv, lim), max(ppv, lim))
    ts = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
    return _PixelHeader(pr, bits, str(ds.get("PhotometricInterpretation", "MONOCHROME2")),
                        padding, ts)


def _read(path: Path) -> tuple[Dataset, list[SliceInfo]]:
    try:
        ds = read_dicom(path)
    except UnreadableDicom as exc:
        raise VolumeError(str(exc)) from exc
    if "PixelData" not in ds:
        raise VolumeError(f"{path.name}: has no Pixel Data")
    return ds, slices_from_dataset(ds, path)


def _stored_to_hu(stored: np.ndarray, info: SliceInfo, px: _PixelHeader, config: VolumeConfig,
                 out: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, int]]:
    """Modality LUT for one 2D frame: stored values (already masked to BitsStored and
    sign-extended by pydicom) -> float32 HU.

    * MONOCHROME1 changes display only (PS3.3 C.7.6.3.1.2), so HU are left as the Modality
      LUT gives them unless ``config.monochrome1 == 'invert_stored'`` (GDCM's behaviour).
    * Unsigned CT data (PixelRepresentation 0, BitsStored >= 12) whose intercept is above
      -100 HU cannot encode air: its values are two's-complement numbers written as unsigned (seen in the RSNA 2019
      ICH set). They are unwrapped modulo 2**BitsStored into
      ``[wrapped_unsigned_floor_hu, floor + 2**BitsStored * slope)``.
    * PixelPaddingValue (and PixelPaddingRangeLimit) pixels become ``air_hu`` or the minimum.
    """
    counts = {"wrapped": 0, "padding": 0, "monochrome1": 0}
    pad = None
    if px.padding is not None:
        pad = (stored >= px.padding[0]) & (stored <= px.padding[1])
        counts["padding"] = int(pad.sum())
        if not counts["padding"]:
            pad = None
    values: np.ndarray = stored
    slope, intercept = info.slope, info.intercept
    if px.photometric == "MONOCHROME1":
        counts["monochrome1"] = 1
        if config.monochrome1 == "invert_stored":
            values = (-1 - stored.astype(np.int32) if px.pixel_representation
                      else (2**px.bits_stored - 1) - stored.astype(np.int32))
    if px.pixel_representation == 0 and px.bits_stored >= 12 and intercept > -100.0 and slope > 0:
        modulus = 2**px.bits_stored
        lowest = config.wrapped_unsigned_floor_hu
        raw = values.astype(np.int64) % modulus
        stored_floor = int(np.ceil((lowest - intercept) / slope))
        values = (raw - stored_floor) % modulus + stored_floor
        counts["wrapped"] = 1
    if out is None:
        out = np.empty(stored.shape, dtype=np.float32)
    if slope == 1.0 and float(intercept).is_integer():
        np.copyto(out, values, casting="unsafe")
        if intercept:
            out += np.float32(intercept)
    else:  # float64 arithmetic then one rounding, as GDCM's rescaler does
        np.copyto(out, values * np.float64(slope) + np.float64(intercept), casting="unsafe")
    if pad is not None:
        if config.padding_fill == "air":
            fill = config.air_hu
        else:
            rest = out[~pad]
            fill = float(rest.min()) if rest.size else config.air_hu
        out[pad] = fill
    return out, counts


def _check_native_length(ds: Dataset) -> None:
    """Native (uncompressed) Pixel Data must have the size that Rows, Columns,
    SamplesPerPixel, NumberOfFrames and BitsAllocated give, plus at most the padding byte
    to an even length (PS3.5 8.1.1); pydicom would decode a longer buffer with a warning,
    from the wrong offsets when the header is wrong."""
    syntax = UID(str(ds.file_meta.get("TransferSyntaxUID", ""))) if hasattr(
        ds, "file_meta") else None
    if not syntax or syntax.is_encapsulated or "PixelData" not in ds:
        return
    label = ds.get("SOPInstanceUID", "?")
    sizes = [header_int(ds, k, d) for k, d in (("Rows", None), ("Columns", None),
                                               ("SamplesPerPixel", 1), ("NumberOfFrames", 1),
                                               ("BitsAllocated", None))]
    if any(v is None or v < 1 for v in sizes):
        raise VolumeError(f"{label}: Rows, Columns, SamplesPerPixel, NumberOfFrames and "
                          "BitsAllocated must be positive integers (PS3.3 C.7.6.3)")
    rows, cols, samples, frames, bits = (int(v or 0) for v in sizes)
    expected = -(-rows * cols * samples * frames * bits // 8)
    actual = len(ds.PixelData or b"")  # an empty element reads as None
    if actual not in (expected, expected + 1):
        raise VolumeError(f"{label}: Pixel Data has {actual} bytes, the header implies "
                          f"{expected} ({rows} x {cols} x {samples} x {frames} frames x "
                          f"{bits} bits)")


def _decode(ds: Dataset) -> np.ndarray:
    """All frames of ``ds`` as (frames, rows, cols) stored values."""
    _check_native_length(ds)
    try:
        arr = ds.pixel_array
    except Exception as exc:  # pydicom raises many types: report the syntax and the cause
        ts = ds.file_meta.get("TransferSyntaxUID", "?")
        raise VolumeError(
            f"{ds.get('SOPInstanceUID', '?')}: pixel data cannot be decoded "
            f"(transfer syntax {ts}: {exc})") from exc
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise VolumeError(f"{ds.get('SOPInstanceUID', '?')}: not a grayscale image")
    return arr if arr.ndim == 3 else arr[None]


def build_volume(files: Sequence[Path], config: VolumeConfig) -> Volume:
    """Read, sort, check and convert the files of one series into a :class:`Volume`.

    Raises :class:`VolumeError` when the files cannot form one volume (see
    :func:`pipeline.sorting.plan_stack`) or a file cannot be read or decoded.
    """
    t0 = time.perf_counter()
    if not files:
        raise VolumeError("no files given")
    report = ReconstructionReport(files_read=len(files))
    with ThreadPoolExecutor(max_workers=min(config.read_threads, len(files))) as pool:
        read = list(pool.map(_read, files))
    datasets: dict[Path, Dataset] = {}
    infos: list[SliceInfo] = []
    for (ds, frames) in read:
        datasets[frames[0].path] = ds
        infos.extend(frames)
    del read
    report.frames_read = len(infos)
    first = next(iter(datasets.values()))
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets.values()}
    if len(series) > 1:
        raise VolumeError(f"the files belong to {len(series)} series; give one series at a time")

    plan = plan_stack(infos, config)
    t_read = time.perf_counter() - t0

    # Decode the files that hold kept slices, one task per file, into the source stack.
    rows, cols = plan.sources[0].rows, plan.sources[0].cols
    if rows < 1 or cols < 1 or len(plan.sources) * rows * cols > MAX_SOURCE_VOXELS:
        raise VolumeError(f"{plan.sources[0].label}: {len(plan.sources)} slices of {rows} x "
                          f"{cols} (Rows x Columns) is not a volume we can build (at most "
                          f"{MAX_SOURCE_VOXELS} voxels)")
    src = np.empty((len(plan.sources), rows, cols), dtype=np.float32)
    by_file: dict[Path, list[tuple[int, SliceInfo]]] = defaultdict(list)
    for k, s in enumerate(plan.sources):
        by_file[s.path].append((k, s))

    def convert(path: Path) -> dict[str, int]:
        ds = datasets[path]
        px = _pixel_header(ds)
        arr = _decode(ds)
        totals = {"wrapped": 0, "padding": 0, "monochrome1": 0}
        for k, s in by_file[path]:
            frame = arr[s.frame or 0]
            if frame.shape != (rows, cols):
                raise VolumeError(f"{s.label}: pixel data is {frame.shape}, header says "
                                  f"{(rows, cols)}")
            _, counts = _stored_to_hu(frame, s, px, config, out=src[k])
            for key, v in counts.items():
                totals[key] += v
        return totals

    with ThreadPoolExecutor(max_workers=min(config.read_threads, len(by_file))) as pool:
        for totals in pool.map(convert, list(by_file)):
            report.wrapped_unsigned_fixed += totals["wrapped"]
            report.padding_pixels += totals["padding"]
            report.monochrome1_slices += totals["monochrome1"]
    report.transfer_syntaxes = sorted({_pixel_header(datasets[p]).transfer_syntax
                                       for p in by_file})
    datasets.clear()
    t_decode = time.perf_counter() - t0 - t_read

    hu = _apply_plan(src, plan, config)
    image = sitk.GetImageFromArray(hu, isVector=False)
    image.SetSpacing(plan.spacing)
    image.SetOrigin(plan.origin)
    image.SetDirection(plan.direction)

    _fill_report(report, plan, hu, config)
    report.seconds = round(time.perf_counter() - t0, 3)
    LOGGER.info(
        "volume %s: %d slices %s from %d files (read %.2fs, decode %.2fs, total %.2fs)",
        first.get("SeriesInstanceUID", "?"), hu.shape[0], hu.shape, len(files), t_read,
        t_decode, report.seconds)
    return Volume(
        hu=hu,
        image=image,
        source_sop_uids=[t.sop_uid for t in plan.targets],
        frame_of_reference_uid=plan.sources[0].frame_of_reference_uid,
        series_uid=str(first.get("SeriesInstanceUID", "")),
        study_uid=str(first.get("StudyInstanceUID", "")),
        report=report,
    )


def _apply_plan(src: np.ndarray, plan: StackPlan, config: VolumeConfig) -> np.ndarray:
    """Shear correction (in-plane shift of each source) then z interpolation."""
    if plan.sheared:
        for k, shift in enumerate(plan.shifts_px):
            if np.any(shift != 0.0):
                src[k] = ndimage.shift(src[k], shift, order=1, mode="constant",
                                       cval=config.air_hu, prefilter=False)
    if not plan.resampled and len(plan.targets) == len(src):
        return src
    out = np.empty((len(plan.targets),) + src.shape[1:], dtype=np.float32)
    for j, t in enumerate(plan.targets):
        if t.kind == "source" or t.weight == 0.0:
            out[j] = src[t.lo]
        else:
            np.multiply(src[t.lo], np.float32(1.0 - t.weight), out=out[j])
            out[j] += np.float32(t.weight) * src[t.hi]
    return out


def _fill_report(report: ReconstructionReport, plan: StackPlan, hu: np.ndarray,
                 config: VolumeConfig) -> None:
    report.slices_out = int(hu.shape[0])
    report.shape_zyx = (int(hu.shape[0]), int(hu.shape[1]), int(hu.shape[2]))
    report.spacing_xyz_mm = plan.spacing
    report.gap_mm = plan.gap_stats_mm
    report.dropped = [{"sop_uid": d.sop_uid, "frame": d.frame, "reason": d.reason}
                      for d in plan.dropped]
    report.duplicates_dropped = sum(1 for d in plan.dropped
                                    if d.reason.startswith(("duplicate", "the same")))
    report.gaps = [asdict(g) for g in plan.gaps]
    report.filled_slices = [j for j, t in enumerate(plan.targets) if t.kind == "filled"]
    report.resampled_slices = [j for j, t in enumerate(plan.targets) if t.kind == "resampled"]
    report.resampled = plan.resampled
    report.tilt_corrected = plan.sheared
    report.tilt_deg = round(plan.tilt_deg, 3)
    report.max_shift_mm = round(plan.max_shift_mm, 3)
    report.notes = list(plan.notes)
    report.warnings = list(plan.warnings)
    if report.wrapped_unsigned_fixed:
        report.warnings.append(
            f"{report.wrapped_unsigned_fixed} slice(s) store signed values as unsigned "
            "(PixelRepresentation 0 with a RescaleIntercept that cannot encode air): unwrapped")
    if report.monochrome1_slices:
        how = ("HU taken from the Modality LUT unchanged (MONOCHROME1 affects display only)"
               if config.monochrome1 == "modality_lut" else "stored values inverted first")
        report.notes.append(f"{report.monochrome1_slices} MONOCHROME1 slice(s): {how}")
    if report.padding_pixels:
        report.notes.append(f"{report.padding_pixels} PixelPaddingValue pixel(s) set to "
                            f"{'air' if config.padding_fill == 'air' else 'the slice minimum'}")
    corners = np.concatenate([hu[:, :2, :2].ravel(), hu[:, :2, -2:].ravel(),
                              hu[:, -2:, :2].ravel(), hu[:, -2:, -2:].ravel()])
    corner_hu = float(np.median(corners))
    if corner_hu > -300.0:
        report.warnings.append(
            f"the image corners read {corner_hu:.0f} HU (median) where a head CT shows air "
            "(< -500 HU): check RescaleSlope/Intercept and the photometric interpretation")


def load_volume(instances_dir: Path, config: PipelineConfig) -> tuple[Volume, SelectionResult]:
    """Select the series of a study folder (:func:`select_series`) and build its volume."""
    selection = select_series(instances_dir, config.selection)
    volume = build_volume(selection.files, config.volume)
    return volume, selection


def format_report(selection: SelectionResult, volume: Volume) -> str:
    """A plain-English summary of selection and reconstruction."""
    r = volume.report
    lines = [f"Selected series {selection.series_uid} ({selection.description or 'no description'}):"
             f" {len(selection.files)} file(s)"]
    lines += [f"  why: {w}" for w in selection.reasons]
    for s in selection.skipped:
        lines.append(f"  skipped {s.series_uid} ({s.description or 'no description'}): {s.reason}")
    lines += [f"  note: {n}" for n in selection.notes]
    z, y, x = r.shape_zyx
    sx, sy, sz = r.spacing_xyz_mm
    lines.append(f"Volume {x}x{y}x{z} voxels, spacing {sx:.3f} x {sy:.3f} x {sz:.3f} mm, "
                 f"{r.frames_read} frame(s) read from {r.files_read} file(s) in {r.seconds:.2f} s")
    lines.append(f"  sorted by {r.sorted_by}")
    if r.duplicates_dropped:
        lines.append(f"  {r.duplicates_dropped} duplicate slice(s) dropped")
    other = len(r.dropped) - r.duplicates_dropped
    if other:
        lines.append(f"  {other} slice(s) of another orientation or matrix size dropped")
    if r.filled_slices:
        lines.append(f"  filled slices (interpolated across gaps): {r.filled_slices}")
    if r.resampled_slices:
        lines.append(f"  {len(r.resampled_slices)} slice(s) resampled to uniform spacing")
    if r.tilt_corrected:
        lines.append(f"  gantry tilt {r.tilt_deg:.2f} degrees corrected (shear up to "
                     f"{r.max_shift_mm:.1f} mm)")
    lines += [f"  note: {n}" for n in r.notes]
    lines += [f"  WARNING: {w}" for w in r.warnings]
    return "\n".join(lines)


def volume_command(input_dir: Path, out_file: Path, as_json: bool, config: PipelineConfig) -> int:
    """``ich-node volume INPUT_DIR --out FILE.nii.gz [--json]``: write the HU volume as NIfTI
    (SimpleITK converts LPS to the NIfTI RAS convention) and print the reports.

    Returns 0 on success, 1 when the study is rejected or the volume cannot be built (the
    reason is printed on stderr, or as ``{"error": ...}`` with ``--json``).
    """
    try:
        volume, selection = load_volume(input_dir, config)
    except PipelineError as exc:
        return print_error(exc, as_json)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(volume.image, str(out_file), True)
    if as_json:
        print(json.dumps({"output": str(out_file), "selection": selection.to_dict(),
                          "volume": volume.report.to_dict(),
                          "source_sop_uids": volume.source_sop_uids}, indent=2))
    else:
        print(format_report(selection, volume))
        print(f"Wrote {out_file}")
    return 0
