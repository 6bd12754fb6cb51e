"""Small analyzers bound in node tests instead of the models (issue: the node is
tested before the pipeline exists). ``ich-node run`` always uses the real one."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset, FileMetaDataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom.sop_class import SecondaryCaptureImageStorage

from pipeline.analyze import Results

ROOT = "1.2.826.0.1.3680043.8.498.98."


def summary(series_dir: Path, config: Any) -> Results:
    """One Secondary Capture in the source study, UIDs derived from the input (so a
    re-run makes the same object), and findings counting the instances."""
    files = sorted(Path(series_dir).glob("*.dcm"))
    if not files:
        raise ValueError(f"no instances in {series_dir}")
    src = dcmread(files[0], stop_before_pixels=True)
    delay = float(os.environ.get("ICH_TEST_ANALYZER_DELAY", "0"))
    if delay:
        time.sleep(delay)
    series_uid = generate_uid(ROOT, entropy_srcs=["sc-series", src.SeriesInstanceUID,
                                                  str(len(files))])
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(ROOT, entropy_srcs=[series_uid, "1"])
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    for keyword in ("SpecificCharacterSet", "PatientName", "PatientID", "PatientBirthDate",
                    "PatientSex", "StudyInstanceUID", "StudyDate", "StudyTime",
                    "AccessionNumber", "ReferringPhysicianName", "StudyID"):
        if keyword in src:
            setattr(ds, keyword, src.data_element(keyword).value)
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 9001
    ds.InstanceNumber = 1
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.SeriesDescription = "TEST ANALYZER"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.full((8, 8), len(files) % 256, np.uint8).tobytes()
    return Results([ds], {"instances": len(files), "series_uid": str(src.SeriesInstanceUID)})


def failing(series_dir: Path, config: Any) -> Results:
    """Always fails, like a pipeline that meets a series it cannot handle."""
    from pipeline.errors import SeriesRejected

    raise SeriesRejected("test analyzer: this series breaks a selection rule")


def volume_only(series_dir: Path, config: Any) -> Results:
    """The real pipeline up to the volume (selection, sorting, HU volume), no models: the
    path every malformed header goes through before inference."""
    from pipeline.volume import load_volume

    volume, selection = load_volume(Path(series_dir), config)
    return Results([], {"slices": int(volume.hu.shape[0]), "series_uid": selection.series_uid})
