"""Small analyzers bound in node tests instead of the models (issue: the node is
tested before the pipeline exists). ``ich-node run`` always uses the real one."""

from __future__ import annotations

import json
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


def _ledger_line(event: str, series_dir: Path, instances: int) -> None:
    path = os.environ.get("ICH_TEST_LEDGER")
    if not path:
        raise RuntimeError("the ledger analyzer needs ICH_TEST_LEDGER (a file to append to)")
    line = json.dumps({"event": event, "series_dir": str(series_dir), "instances": instances,
                       "pid": os.getpid(), "t": time.time()}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode("utf-8"))  # one write: whole lines, even under kill -9
    finally:
        os.close(fd)


def ledger(series_dir: Path, config: Any) -> Results:
    """:func:`summary` with a witness: appends a ``start`` and an ``end`` line (JSON) to the
    file named by ``ICH_TEST_LEDGER``, so fault tests count how often each series was
    analysed, to the end or not, whatever the node's own records say."""
    count = len(list(Path(series_dir).glob("*.dcm")))
    _ledger_line("start", series_dir, count)
    results = summary(series_dir, config)
    _ledger_line("end", series_dir, count)
    return results
