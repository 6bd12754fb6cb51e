"""Small synthetic CT series for the node's transport tests (headers right, pixels simple).

The realistic head phantom is ``pipeline.phantom``; these series only need to be valid
CT Image Storage instances of a chosen size, fast to make.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, generate_uid
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

TEST_ROOT = "1.2.826.0.1.3680043.8.498.99."


@dataclass(frozen=True)
class SeriesOnDisk:
    """Files of one written series and its UIDs."""

    study_uid: str
    series_uid: str
    files: list[Path]


def make_ct_slice(study_uid: str, series_uid: str, frame_uid: str, index: int, n: int,
                  rows: int = 64, seed: int = 0, patient_name: str = "TEST^PATIENT",
                  patient_id: str = "ID0001") -> Dataset:
    """One axial CT slice of a synthetic series."""
    rng = np.random.default_rng(seed * 100000 + index)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    sop_uid = generate_uid(TEST_ROOT, entropy_srcs=[series_uid, str(index)])
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "O"
    ds.StudyDate = "20260101"
    ds.StudyTime = "030000"
    ds.AccessionNumber = "ACC0001"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.Modality = "CT"
    ds.Manufacturer = "TEST"
    ds.SeriesNumber = 2
    ds.InstanceNumber = index + 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.BodyPartExamined = "HEAD"
    ds.StudyDescription = "CT HEAD WO CONTRAST"
    ds.SeriesDescription = "HEAD 5mm"
    ds.SliceThickness = 5.0
    ds.KVP = 120
    ds.ImagePositionPatient = [-(rows / 2), -(rows / 2), 5.0 * (index - n / 2)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [1.0, 1.0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = rows
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    pixels = (rng.normal(1064, 5, (rows, rows))).astype(np.int16)
    ds.PixelData = pixels.tobytes()
    return ds


def write_series(out_dir: Path, n: int, rows: int = 64, seed: int = 0,
                 compress: bool = False, patient_name: str = "TEST^PATIENT",
                 study_uid: str | None = None) -> SeriesOnDisk:
    """Write an *n*-slice series (JPEG-LS lossless with *compress*) into *out_dir*."""
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid(TEST_ROOT, entropy_srcs=["study", str(seed)])
    series_uid = generate_uid(TEST_ROOT, entropy_srcs=["series", str(seed), str(n), str(rows),
                                                       str(compress), study_uid])
    frame_uid = generate_uid(TEST_ROOT, entropy_srcs=["frame", series_uid])
    files = []
    for index in range(n):
        ds = make_ct_slice(study_uid, series_uid, frame_uid, index, n, rows, seed, patient_name)
        if compress:
            ds.compress(JPEGLSLossless)
        path = out_dir / f"{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return SeriesOnDisk(study_uid, series_uid, files)
