"""Scanner profiles, synthetic identities and the DICOM writer of the phantom.

The output is a CT Image Storage series (PS3.3 A.3: Patient, General Study, General
Series, Frame of Reference, General Equipment, General Acquisition, General Image,
Image Plane, Image Pixel, CT Image, VOI LUT and SOP Common modules), one file per
slice, explicit VR little endian. Everything, UIDs included, derives from the seed,
so the same seed writes byte-identical files.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_ROOT_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

LOGGER = logging.getLogger(__name__)

STUDY_DESCRIPTION = "CT HEAD WO CONTRAST"
_UID_ROOT = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\.$")


@dataclass(frozen=True)
class ScannerProfile:
    """How one scanner model stores a head CT (pixel representation, rescale, padding, kernel)
    plus the per-study acquisition draws (field of view, noise, calibration offset)."""

    manufacturer: str
    model: str
    kernel: str
    software: str
    pixel_representation: int
    bits_stored: int
    rescale_intercept: float
    padding_value: int | None
    ascending: bool
    kvp: float
    tube_current_ma: int
    exposure_time_ms: int
    fov_mm: float
    noise_sigma: float
    hu_offset: float

    @property
    def stored_range(self) -> tuple[int, int]:
        """Smallest and largest storable pixel value."""
        if self.pixel_representation == 1:
            return -(2 ** (self.bits_stored - 1)), 2 ** (self.bits_stored - 1) - 1
        return 0, 2**self.bits_stored - 1

    @property
    def hu_range(self) -> tuple[float, float]:
        """HU range the scanner reports (physical -1024..3071 within what can be stored)."""
        lo, hi = self.stored_range
        return max(-1024.0, lo + self.rescale_intercept), min(3071.0, hi + self.rescale_intercept)

    @property
    def outside_hu(self) -> float:
        """HU written outside the reconstruction circle (the padding value, or the minimum)."""
        if self.padding_value is not None:
            return float(self.padding_value) + self.rescale_intercept
        return self.hu_range[0]


# manufacturer, model, kernels, software, pixel representation, bits stored, intercept, padding, ascending
_PROFILES: tuple[tuple[str, str, tuple[str, ...], str, int, int, float, int | None, bool], ...] = (
    ("GE MEDICAL SYSTEMS", "Revolution CT", ("STANDARD", "SOFT"), "revo_ct_22.1", 1, 16, -1024.0, -2000, False),
    ("GE MEDICAL SYSTEMS", "LightSpeed VCT", ("STANDARD", "SOFT"), "07MW18.4", 1, 16, -1024.0, -2000, False),
    ("SIEMENS", "SOMATOM Definition AS+", ("J40s", "H31s"), "syngo CT VA48A", 0, 12, -1024.0, None, True),
    ("Philips", "Brilliance 64", ("UB", "UC"), "4.1.6", 0, 12, -1000.0, None, True),
    ("TOSHIBA", "Aquilion ONE", ("FC21", "FC26"), "V8.3", 1, 16, 0.0, None, True),
)


def draw_scanner(rng: np.random.Generator) -> ScannerProfile:
    """A random scanner profile and acquisition (independent of the study's findings)."""
    man, model, kernels, sw, pr, bits, icpt, pad, asc = _PROFILES[int(rng.integers(len(_PROFILES)))]
    return ScannerProfile(
        manufacturer=man, model=model, kernel=kernels[int(rng.integers(len(kernels)))], software=sw,
        pixel_representation=pr, bits_stored=bits, rescale_intercept=icpt, padding_value=pad, ascending=asc,
        kvp=120.0, tube_current_ma=int(rng.integers(180, 360)), exposure_time_ms=int(rng.integers(700, 1100)),
        fov_mm=float(rng.uniform(220.0, 250.0)), noise_sigma=float(rng.uniform(3.0, 8.0)),
        hu_offset=float(rng.uniform(-3.0, 3.0)),
    )


@dataclass(frozen=True)
class StudyIdentity:
    """Synthetic patient and study identity with deterministic UIDs."""

    patient_name: str
    patient_id: str
    patient_birth_date: str
    patient_sex: str
    patient_age: str
    study_date: str
    study_time: str
    accession_number: str
    study_id: str
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    sop_instance_uids: tuple[str, ...]

    @property
    def character_set(self) -> str:
        """``ISO_IR 192`` (UTF-8) when the name is not ASCII, else ``ISO_IR 100``."""
        return "ISO_IR 100" if self.patient_name.isascii() else "ISO_IR 192"


def check_uid_root(root: str | None) -> str:
    """The UID root to use (pydicom's root if None); it must be a dotted numeric prefix ending in '.'."""
    if root is None:
        return PYDICOM_ROOT_UID
    if not _UID_ROOT.match(root) or len(root) > 40:
        raise ValueError(f"UID root must be dotted digits ending with '.' and at most 40 characters: {root!r}.")
    return root


def draw_identity(rng: np.random.Generator, seed: int, n_slices: int, uid_root: str | None,
                  patient_name: str | None, patient_index: int) -> StudyIdentity:
    """Patient/study attributes and UIDs derived from ``seed`` (same seed, same identity)."""
    root = check_uid_root(uid_root)
    study_day = dt.date(2018, 1, 1) + dt.timedelta(days=int(rng.integers(0, 2600)))
    age = int(rng.integers(18, 93))
    birth = study_day - dt.timedelta(days=int(age * 365.25 + rng.integers(1, 360)))
    secs = int(rng.integers(0, 86400))
    tag = hashlib.sha256(f"ich-phantom/{seed}/{patient_index}".encode()).hexdigest()

    def uid(kind: str) -> str:
        return str(generate_uid(prefix=root, entropy_srcs=["ich-node phantom", str(seed), str(patient_index), kind]))

    return StudyIdentity(
        patient_name=patient_name if patient_name is not None else f"PHANTOM^{patient_index:04d}",
        patient_id=f"PH{tag[:10].upper()}",
        patient_birth_date=birth.strftime("%Y%m%d"),
        patient_sex="M" if rng.random() < 0.5 else "F",
        patient_age=f"{age:03d}Y",
        study_date=study_day.strftime("%Y%m%d"),
        study_time=f"{secs // 3600:02d}{secs // 60 % 60:02d}{secs % 60:02d}",
        accession_number=f"A{int(tag[10:18], 16) % 10**9:09d}",
        study_id=f"{int(tag[18:24], 16) % 10**5:05d}",
        study_instance_uid=uid("study"),
        series_instance_uid=uid("series"),
        frame_of_reference_uid=uid("frame-of-reference"),
        sop_instance_uids=tuple(uid(f"sop/{k}") for k in range(n_slices)),
    )


def write_series(out_dir: Path, hu: npt.NDArray[np.float32], spacing_mm: tuple[float, float, float],
                 origin: tuple[float, float, float], thickness: float, scanner: ScannerProfile,
                 ident: StudyIdentity, series_number: int = 2) -> list[Path]:
    """Write one CT Image Storage file per slice (ascending patient z in ``hu``) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    nz, ny, nx = hu.shape
    dz, dy, dx = spacing_mm
    dtype = np.int16 if scanner.pixel_representation == 1 else np.uint16
    t0 = dt.datetime.strptime(ident.study_date + ident.study_time, "%Y%m%d%H%M%S")
    series_time = (t0 + dt.timedelta(seconds=95)).strftime("%H%M%S")
    acq_time = (t0 + dt.timedelta(seconds=60)).strftime("%H%M%S")
    desc = f"HEAD {thickness:g}mm {scanner.kernel}"
    paths: list[Path] = []
    for k in range(nz):
        number = k + 1 if scanner.ascending else nz - k
        stored = np.rint(hu[k] - np.float32(scanner.rescale_intercept)).astype(dtype)
        z = origin[2] + k * dz
        ds = Dataset()
        ds.SpecificCharacterSet = ident.character_set
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceCreationDate = ident.study_date
        ds.InstanceCreationTime = series_time
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ident.sop_instance_uids[k]
        ds.StudyDate = ident.study_date
        ds.SeriesDate = ident.study_date
        ds.AcquisitionDate = ident.study_date
        ds.ContentDate = ident.study_date
        ds.StudyTime = ident.study_time
        ds.SeriesTime = series_time
        ds.AcquisitionTime = acq_time
        ds.ContentTime = series_time
        ds.AccessionNumber = ident.accession_number
        ds.Modality = "CT"
        ds.Manufacturer = scanner.manufacturer
        ds.InstitutionName = "PHANTOM GENERAL HOSPITAL"
        ds.ReferringPhysicianName = ""
        ds.StationName = "CTPHANTOM1"
        ds.StudyDescription = STUDY_DESCRIPTION
        ds.SeriesDescription = desc
        ds.ManufacturerModelName = scanner.model
        ds.PatientName = ident.patient_name
        ds.PatientID = ident.patient_id
        ds.PatientBirthDate = ident.patient_birth_date
        ds.PatientSex = ident.patient_sex
        ds.PatientAge = ident.patient_age
        ds.BodyPartExamined = "HEAD"
        ds.ScanOptions = "HELICAL MODE"
        ds.SliceThickness = f"{thickness:g}"
        ds.KVP = f"{scanner.kvp:g}"
        ds.SpacingBetweenSlices = f"{dz:g}"
        ds.DataCollectionDiameter = "500"
        ds.SoftwareVersions = scanner.software
        ds.ReconstructionDiameter = f"{scanner.fov_mm:.1f}"
        ds.DistanceSourceToDetector = "1085.6"
        ds.DistanceSourceToPatient = "541"
        ds.GantryDetectorTilt = "0"
        ds.TableHeight = "150"
        ds.RotationDirection = "CW"
        ds.ExposureTime = str(scanner.exposure_time_ms)
        ds.XRayTubeCurrent = str(scanner.tube_current_ma)
        ds.Exposure = str(round(scanner.tube_current_ma * scanner.exposure_time_ms / 1000))
        ds.FilterType = "BODY FILTER"
        ds.GeneratorPower = str(round(scanner.kvp * scanner.tube_current_ma / 1000))
        ds.FocalSpots = "0.7"
        ds.ConvolutionKernel = scanner.kernel
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = ident.study_instance_uid
        ds.SeriesInstanceUID = ident.series_instance_uid
        ds.StudyID = ident.study_id
        ds.SeriesNumber = series_number
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = number
        ds.ImagePositionPatient = [f"{origin[0]:.4f}", f"{origin[1]:.4f}", f"{z:.4f}"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.FrameOfReferenceUID = ident.frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{z:.4f}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ny
        ds.Columns = nx
        ds.PixelSpacing = [f"{dy:.6g}", f"{dx:.6g}"]
        ds.BitsAllocated = 16
        ds.BitsStored = scanner.bits_stored
        ds.HighBit = scanner.bits_stored - 1
        ds.PixelRepresentation = scanner.pixel_representation
        if scanner.padding_value is not None:
            ds.PixelPaddingValue = scanner.padding_value
        ds.WindowCenter = ["40", "600"]
        ds.WindowWidth = ["80", "2800"]
        ds.WindowCenterWidthExplanation = ["BRAIN", "BONE"]
        ds.RescaleIntercept = f"{scanner.rescale_intercept:g}"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.PixelData = stored.tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        path = out_dir / f"IM{number:06d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    LOGGER.info("Wrote %d CT slices of series %s to %s", nz, ident.series_instance_uid, out_dir)
    return paths
