"""Write small synthetic CT series for the pipeline tests (no downloads).

Every series samples one analytic HU field ``hu_fn(x, y, z)`` (patient LPS
coordinates, mm) at the centre of each pixel, so that the expected volume of any
variant (shuffled, tilted, gapped, compressed...) can be computed exactly.
Geometry follows DICOM PS3.3 C.7.6.2 (Image Plane): pixel (r, c) of a slice lies at
``IPP + c * dx * row_cosine + r * dy * col_cosine``.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
from pydicom import uid as dcm_uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence as DicomSequence

HuFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
Storage = Literal["signed", "unsigned", "wrapped12"]

UID_ROOT = "1.2.826.0.1.3680043.10.1047."  # a test-only root


def make_uid() -> str:
    """A unique test UID below the test root."""
    return dcm_uid.generate_uid(prefix=UID_ROOT)


def linear_hu(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """A field that is linear in x, y and z: linear interpolation reproduces it exactly."""
    return 40.0 + 4.0 * x - 2.0 * y + 2.0 * z


def head_hu(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """A crude head: air outside a disk, a skull ring, brain inside (linear in z)."""
    r = np.hypot(x, y)
    out = np.full(np.broadcast(x, y, z).shape, -1000.0)
    out = np.where(r < 7.0, 1200.0 + 0.0 * z, out)
    out = np.where(r < 6.0, 30.0 + 2.0 * z + 2.0 * x, out)
    return out


@dataclass(frozen=True)
class SeriesSpec:
    """What to write; the defaults give a clean, small, axial, uncompressed series."""

    n_slices: int = 10
    rows: int = 24
    cols: int = 20
    pixel_spacing: tuple[float, float] = (0.5, 0.5)  # (between rows, between columns) in mm
    slice_spacing: float = 5.0  # mm along the slice normal
    thickness: float | None = 5.0
    origin: tuple[float, float, float] = (-5.0, -6.0, 10.0)
    row_cosine: tuple[float, float, float] = (1.0, 0.0, 0.0)
    col_cosine: tuple[float, float, float] = (0.0, 1.0, 0.0)
    tilt_deg: float = 0.0  # gantry tilt: positions drift along the column cosine
    z_mm: tuple[float, ...] | None = None  # distances along the normal (overrides n_slices)
    storage: Storage = "signed"
    bits_stored: int = 16
    monochrome1: bool = False
    transfer_syntax: str = dcm_uid.ExplicitVRLittleEndian
    jls_error: int = 2  # NEAR parameter for JPEG-LS near-lossless
    slope: float = 1.0
    intercept: float | None = None  # None: -1024 for unsigned, 0 for signed
    padding_value: int | None = None  # stored value written into the corners and declared
    hu_fn: HuFn = linear_hu
    modality: str = "CT"
    sop_class: str = dcm_uid.CTImageStorage
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL")
    series_description: str = "Head 5mm"
    study_description: str = "CT HEAD WITHOUT CONTRAST"
    body_part: str = "HEAD"
    kernel: str = "H30s"
    manufacturer: str = "ACME"
    series_number: int = 2
    acquisition_number: int = 1
    gantry_tilt_tag: float | None = None  # value of (0018,1120); None: omit
    study_uid: str = field(default_factory=make_uid)
    series_uid: str = field(default_factory=make_uid)
    frame_of_reference_uid: str = field(default_factory=make_uid)


def normal_of(spec: SeriesSpec) -> np.ndarray:
    """Slice normal: row cosine x column cosine (PS3.3 C.7.6.2.1.1)."""
    return np.cross(np.asarray(spec.row_cosine), np.asarray(spec.col_cosine))


def slice_positions(spec: SeriesSpec) -> np.ndarray:
    """IPP of every slice, in acquisition order, shape (n, 3)."""
    n = normal_of(spec)
    c = np.asarray(spec.col_cosine, dtype=float)
    if spec.z_mm is not None:
        z = np.asarray(spec.z_mm, dtype=float)[:, None]
    else:
        z = np.arange(spec.n_slices, dtype=float)[:, None] * spec.slice_spacing
    drift = np.tan(np.radians(spec.tilt_deg))
    return np.asarray(spec.origin, dtype=float) + z * n + z * drift * c


def sample_plane(
    spec: SeriesSpec, ipp: np.ndarray, rows: int | None = None, cols: int | None = None
) -> np.ndarray:
    """The HU field sampled at the pixel centres of one plane with position ``ipp``."""
    rows = spec.rows if rows is None else rows
    cols = spec.cols if cols is None else cols
    r = np.arange(rows, dtype=float)[:, None, None]
    c = np.arange(cols, dtype=float)[None, :, None]
    pts = (
        ipp[None, None, :]
        + c * spec.pixel_spacing[1] * np.asarray(spec.row_cosine)[None, None, :]
        + r * spec.pixel_spacing[0] * np.asarray(spec.col_cosine)[None, None, :]
    )
    return np.rint(spec.hu_fn(pts[..., 0], pts[..., 1], pts[..., 2]))


def expected_volume(spec: SeriesSpec) -> np.ndarray:
    """The HU volume (z, y, x) a correct reader returns for an untilted ``spec``."""
    return np.stack([sample_plane(spec, p) for p in slice_positions(spec)]).astype(np.float32)


def expected_on_grid(spec: SeriesSpec, z_mm: Sequence[float]) -> np.ndarray:
    """The HU field on an orthogonal grid: planes at ``origin + z * normal`` (no tilt)."""
    n = normal_of(spec)
    o = np.asarray(spec.origin, dtype=float)
    return np.stack([sample_plane(spec, o + z * n) for z in z_mm]).astype(np.float32)


def _intercept(spec: SeriesSpec) -> float:
    if spec.intercept is not None:
        return spec.intercept
    return -1024.0 if spec.storage == "unsigned" else 0.0


def encode_stored(spec: SeriesSpec, hu: np.ndarray) -> np.ndarray:
    """HU -> stored values for the spec's storage (the inverse of the Modality LUT)."""
    if spec.storage == "wrapped12":
        # The RSNA 2019 glitch: signed values written with PixelRepresentation 0 and
        # BitsStored 12: the high bits carry the sign extension and must be ignored.
        return np.rint(hu - _intercept(spec)).astype(np.int16).view(np.uint16)
    stored = np.rint((hu - _intercept(spec)) / spec.slope)
    if spec.storage == "unsigned":
        return np.clip(stored, 0, 2**spec.bits_stored - 1).astype(np.uint16)
    lim = 2 ** (spec.bits_stored - 1)
    return np.clip(stored, -lim, lim - 1).astype(np.int16)


def _base_dataset(spec: SeriesSpec, sop_uid: str, sop_class: str) -> Dataset:
    ds = Dataset()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = dcm_uid.UID(sop_class)
    meta.MediaStorageSOPInstanceUID = dcm_uid.UID(sop_uid)
    meta.TransferSyntaxUID = dcm_uid.ExplicitVRLittleEndian
    meta.ImplementationClassUID = dcm_uid.UID(UID_ROOT + "1")
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.PatientName = "Phantom^Test"
    ds.PatientID = "PHANTOM-0001"
    ds.StudyInstanceUID = spec.study_uid
    ds.SeriesInstanceUID = spec.series_uid
    ds.FrameOfReferenceUID = spec.frame_of_reference_uid
    ds.Modality = spec.modality
    ds.Manufacturer = spec.manufacturer
    ds.SeriesNumber = spec.series_number
    ds.SeriesDescription = spec.series_description
    ds.StudyDescription = spec.study_description
    if spec.body_part:
        ds.BodyPartExamined = spec.body_part
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    return ds


def _pixel_attrs(ds: Dataset, spec: SeriesSpec, rows: int, cols: int) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if spec.monochrome1 else "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 12 if spec.storage == "wrapped12" else spec.bits_stored
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if spec.storage == "signed" else 0


def _set_pixels(ds: Dataset, spec: SeriesSpec, stored: np.ndarray) -> None:
    """Store ``stored`` (frames, rows, cols) or (rows, cols) with the spec's transfer syntax."""
    ts = dcm_uid.UID(spec.transfer_syntax)
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    if ts in (dcm_uid.ExplicitVRLittleEndian, dcm_uid.ImplicitVRLittleEndian,
              dcm_uid.DeflatedExplicitVRLittleEndian):
        ds.file_meta.TransferSyntaxUID = dcm_uid.UID(ts)
        return
    if ts == dcm_uid.ExplicitVRBigEndian:
        ds.file_meta.TransferSyntaxUID = ts
        ds.PixelData = np.ascontiguousarray(stored).astype(stored.dtype.newbyteorder(">")).tobytes()
        return
    if ts == dcm_uid.JPEGBaseline8Bit:
        _jpeg_baseline(ds, stored)
        return
    if ts == dcm_uid.JPEGLosslessSV1:
        frames = stored if stored.ndim == 3 else stored[None]
        bits = ds.BitsStored
        unsigned = frames.astype(np.int64) & ((1 << bits) - 1)
        ds.PixelData = encapsulate(
            [encode_lossless_sv1(np.asarray(f, dtype=np.int64), bits) for f in unsigned]
        )
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = ts
        return
    kwargs: dict[str, object] = {"generate_instance_uid": False}
    if ts == dcm_uid.JPEGLSNearLossless:
        kwargs["jls_error"] = spec.jls_error
    if ts == dcm_uid.JPEG2000:
        kwargs["j2k_psnr"] = [80.0]
    ds.compress(ts, stored, **kwargs)  # type: ignore[arg-type]


def _jpeg_baseline(ds: Dataset, stored: np.ndarray) -> None:
    """8-bit JPEG baseline (Process 1) through Pillow: only for 8-bit data."""
    from PIL import Image

    frames = stored if stored.ndim == 3 else stored[None]
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    items = []
    for f in frames:
        buf = io.BytesIO()
        Image.fromarray(np.asarray(f, dtype=np.uint8), mode="L").save(buf, "JPEG", quality=95)
        items.append(buf.getvalue())
    ds.PixelData = encapsulate(items)
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = dcm_uid.JPEGBaseline8Bit


def _hu_to_storage(spec: SeriesSpec, hu: np.ndarray) -> np.ndarray:
    if spec.transfer_syntax == dcm_uid.JPEGBaseline8Bit:
        return np.clip(np.rint((hu - _intercept(spec)) / spec.slope), 0, 255).astype(np.uint8)
    stored = encode_stored(spec, hu)
    if spec.padding_value is not None:
        stored[..., :2, :2] = spec.padding_value
    return stored


def _plane_dataset(spec: SeriesSpec, k: int, ipp: np.ndarray) -> Dataset:
    ds = _base_dataset(spec, make_uid(), spec.sop_class)
    ds.ImageType = list(spec.image_type)
    ds.InstanceNumber = k + 1
    ds.AcquisitionNumber = spec.acquisition_number
    ds.ImagePositionPatient = [f"{v:.6f}".rstrip("0").rstrip(".") or "0" for v in ipp]
    ds.ImageOrientationPatient = [float(v) for v in (*spec.row_cosine, *spec.col_cosine)]
    ds.PixelSpacing = list(spec.pixel_spacing)
    if spec.thickness is not None:
        ds.SliceThickness = spec.thickness
    ds.ConvolutionKernel = spec.kernel
    if spec.gantry_tilt_tag is not None:
        ds.GantryDetectorTilt = spec.gantry_tilt_tag
    ds.KVP = 120
    ds.RescaleSlope = spec.slope
    ds.RescaleIntercept = _intercept(spec)
    ds.RescaleType = "HU"
    ds.InstanceCreationDate = "20240101"
    ds.InstanceCreationTime = f"1200{k % 60:02d}"
    _pixel_attrs(ds, spec, spec.rows, spec.cols)
    if spec.padding_value is not None:
        ds.PixelPaddingValue = spec.padding_value
    return ds


def write_dataset(ds: Dataset, path: Path) -> Path:
    """Save as a DICOM Part 10 file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_series(
    out_dir: Path, spec: SeriesSpec, *, names: Sequence[str] | None = None
) -> list[Path]:
    """Write one file per slice, in acquisition order; returns the paths."""
    paths = []
    for k, ipp in enumerate(slice_positions(spec)):
        ds = _plane_dataset(spec, k, ipp)
        _set_pixels(ds, spec, _hu_to_storage(spec, sample_plane(spec, ipp)))
        name = (names[k] if names is not None
                else f"{spec.series_uid[-6:]}_{k:04d}_{ds.SOPInstanceUID[-8:]}.dcm")
        paths.append(write_dataset(ds, out_dir / name))
    return paths


def copy_as_duplicate(src: Path, dst: Path, *, newer: bool) -> Path:
    """A second instance at the same position: a new SOP Instance UID, older or newer."""
    from pydicom import dcmread, dcmwrite

    ds = dcmread(src)
    ds.SOPInstanceUID = make_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceCreationTime = "235959" if newer else "000000"
    ds.InstanceNumber = int(ds.InstanceNumber) + (1000 if newer else -1000)
    if not newer:  # an older copy carries different pixels: it must not be the one kept
        arr = ds.pixel_array.copy()
        arr[...] = arr.flat[0]
        ds.PixelData = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
        ds["PixelData"].VR = "OW"
        ds.file_meta.TransferSyntaxUID = dcm_uid.ExplicitVRLittleEndian
    dcmwrite(dst, ds, implicit_vr=False, little_endian=True,
             force_encoding=True)
    return dst


def write_enhanced_ct(out_dir: Path, spec: SeriesSpec) -> Path:
    """One Enhanced CT Image (multi-frame) with per-frame functional groups (PS3.3 C.7.6.16)."""
    ds = _base_dataset(spec, make_uid(), dcm_uid.EnhancedCTImageStorage)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.InstanceNumber = 1
    ds.AcquisitionNumber = spec.acquisition_number
    ds.ContentDate = "20240101"
    ds.ContentTime = "120000"
    positions = slice_positions(spec)
    ds.NumberOfFrames = len(positions)
    _pixel_attrs(ds, spec, spec.rows, spec.cols)

    shared = Dataset()
    orient = Dataset()
    orient.ImageOrientationPatient = [float(v) for v in (*spec.row_cosine, *spec.col_cosine)]
    shared.PlaneOrientationSequence = DicomSequence([orient])
    measures = Dataset()
    measures.PixelSpacing = list(spec.pixel_spacing)
    measures.SliceThickness = spec.thickness if spec.thickness is not None else spec.slice_spacing
    shared.PixelMeasuresSequence = DicomSequence([measures])
    ct_frame = Dataset()
    ct_frame.FrameType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    shared.CTImageFrameTypeSequence = DicomSequence([ct_frame])
    recon = Dataset()
    recon.ConvolutionKernel = spec.kernel
    shared.CTReconstructionSequence = DicomSequence([recon])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])

    per_frame = []
    order = list(range(len(positions)))[::-1]  # frames stored top-down: the reader must sort
    for k in order:
        item = Dataset()
        pos = Dataset()
        pos.ImagePositionPatient = [float(v) for v in positions[k]]
        item.PlanePositionSequence = DicomSequence([pos])
        pvt = Dataset()
        pvt.RescaleSlope = spec.slope
        pvt.RescaleIntercept = _intercept(spec)
        pvt.RescaleType = "HU"
        item.PixelValueTransformationSequence = DicomSequence([pvt])
        fc = Dataset()
        fc.FrameAcquisitionNumber = spec.acquisition_number
        fc.InStackPositionNumber = k + 1
        item.FrameContentSequence = DicomSequence([fc])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    stored = np.stack([_hu_to_storage(spec, sample_plane(spec, positions[k])) for k in order])
    _set_pixels(ds, spec, stored)
    return write_dataset(ds, out_dir / f"enhanced_{spec.series_uid[-6:]}.dcm")


def write_localizer(out_dir: Path, spec: SeriesSpec) -> Path:
    """A lateral scout (LOCALIZER) in its own series."""
    s = replace(spec, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
                row_cosine=(0.0, 1.0, 0.0), col_cosine=(0.0, 0.0, -1.0), n_slices=1, z_mm=None,
                series_description="Topogram 0.6 T20s", thickness=None)
    return write_series(out_dir, s)[0]


def write_dose_sr(out_dir: Path, spec: SeriesSpec) -> Path:
    """An X-Ray Radiation Dose SR (no pixels)."""
    ds = _base_dataset(replace(spec, modality="SR", series_description="Dose Report"),
                       make_uid(), dcm_uid.XRayRadiationDoseSRStorage)
    ds.Modality = "SR"
    ds.ValueType = "CONTAINER"
    ds.InstanceNumber = 1
    return write_dataset(ds, out_dir / f"dose_sr_{spec.series_uid[-6:]}.dcm")


def write_dose_capture(out_dir: Path, spec: SeriesSpec) -> Path:
    """A CT dose screen saved as a Secondary Capture image (modality CT)."""
    s = replace(spec, sop_class=dcm_uid.SecondaryCaptureImageStorage, n_slices=1, z_mm=None,
                image_type=("DERIVED", "SECONDARY", "OTHER"), series_description="Dose Report",
                kernel="")
    return write_series(out_dir, s)[0]


def encode_lossless_sv1(img: np.ndarray, precision: int) -> bytes:
    """A minimal JPEG lossless encoder (ITU T.81 Process 14, predictor 1, one component).

    pydicom has no encoder for this syntax; this one uses a flat Huffman table (every
    category 0-16 gets a 5-bit code), which any conforming decoder accepts.
    """
    rows, cols = img.shape
    mod = 1 << 16
    pred = np.empty_like(img)
    pred[0, 0] = 1 << (precision - 1)
    pred[0, 1:] = img[0, :-1]
    pred[1:, 0] = img[:-1, 0]
    pred[1:, 1:] = img[1:, :-1]
    diff = (img - pred) % mod
    diff = np.where(diff > mod // 2, diff - mod, diff)  # range -32767..32768
    bits: list[str] = []
    for d in diff.ravel().tolist():
        ssss = 16 if d == 32768 else int(abs(d)).bit_length()
        bits.append(format(ssss, "05b"))
        if 0 < ssss < 16:
            extra = d if d > 0 else d + (1 << ssss) - 1
            bits.append(format(extra, f"0{ssss}b"))
    stream = "".join(bits)
    stream += "1" * (-len(stream) % 8)
    data = bytearray()
    for i in range(0, len(stream), 8):
        byte = int(stream[i:i + 8], 2)
        data.append(byte)
        if byte == 0xFF:
            data.append(0x00)

    def segment(marker: int, payload: bytes) -> bytes:
        return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload

    sof = bytes([precision]) + rows.to_bytes(2, "big") + cols.to_bytes(2, "big") + bytes(
        [1, 1, 0x11, 0])
    counts = bytes([0, 0, 0, 0, 17] + [0] * 11)
    dht = bytes([0x00]) + counts + bytes(range(17))
    sos = bytes([1, 1, 0x00, 1, 0, 0])  # Ns=1, Cs=1 Td=0, Ss=1 (predictor), Se=0, Ah/Al=0
    return (b"\xff\xd8" + segment(0xC3, sof) + segment(0xC4, dht) + segment(0xDA, sos)
            + bytes(data) + b"\xff\xd9")


def clean_dir(path: Path) -> Path:
    """An empty folder (tests reuse one tmp dir across hypothesis examples)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path

