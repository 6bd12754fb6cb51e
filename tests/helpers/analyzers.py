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


def bleed_if_named(series_dir: Path, config: Any) -> Results:
    """Like :func:`summary`, with findings in the public shape (:meth:`Findings.to_json`):
    positive (a subdural bleed, demo weights) when the patient's family name starts with
    BLEED, negative otherwise."""
    from pipeline.findings import Findings, LabelFinding, Lesion, ModelIdentity

    base = summary(series_dir, config)
    src = dcmread(sorted(Path(series_dir).glob("*.dcm"))[0], stop_before_pixels=True)
    positive = str(src.PatientName).upper().startswith("BLEED")
    probabilities = {"any": 0.93, "epidural": 0.02, "intraparenchymal": 0.04,
                     "intraventricular": 0.01, "subarachnoid": 0.05, "subdural": 0.91}
    labels = {name: LabelFinding(p if positive else p / 10, positive and p > 0.5, 0.5)
              for name, p in probabilities.items()}
    lesions = [Lesion("subdural", 5, 12.5, (10.0, -20.0, 30.0), (8.0, 40.0, 25.0), (3, 7), 5,
                      12500)] if positive else []
    findings = Findings(labels, np.zeros((1, 6), np.float32), np.zeros((1, 1, 1), np.uint8),
                        lesions, ModelIdentity("ich-test", "0.0", "ab" * 32, demo=True))
    return Results(base.datasets, {**findings.to_json(), **base.findings})


def with_previews(series_dir: Path, config: Any) -> Results:
    """The real volume and the real result writers (SR, SEG, preview images) with pretend
    findings: an intraparenchymal bleed of 15 mm radius at the centre of the volume. Fast
    (no models), so that node tests can look at real results and previews."""
    from pipeline.config import PipelineConfig
    from pipeline.findings import LABELS, Findings, LabelFinding, ModelIdentity
    from pipeline.lesions import find_lesions
    from pipeline.volume import load_volume
    from sr_writer.results import write_results

    cfg = config if isinstance(config, PipelineConfig) else PipelineConfig()
    t0 = time.perf_counter()
    volume, selection = load_volume(Path(series_dir), cfg)
    t_volume = time.perf_counter() - t0
    nz, ny, nx = volume.hu.shape
    sz, sy, sx = volume.spacing
    z, y, x = np.ogrid[:nz, :ny, :nx]
    sphere = (((z - nz / 2) * sz) ** 2 + ((y - ny / 2) * sy) ** 2
              + ((x - nx / 2) * sx) ** 2) < 15.0 ** 2
    mask = np.where(sphere, np.uint8(2), np.uint8(0))  # 2 = intraparenchymal
    lesions, mask = find_lesions(mask, volume.image)
    positive = {"any", "intraparenchymal"}
    labels = {name: LabelFinding(0.93 if name in positive else 0.04, name in positive, 0.5)
              for name in LABELS}
    findings = Findings(labels=labels, slice_probabilities=np.zeros((nz, len(LABELS)),
                                                                    np.float32),
                        mask=mask, lesions=lesions,
                        model=ModelIdentity("test-analyzer", "0", "0" * 64, demo=True))
    headers = [dcmread(path, stop_before_pixels=True) for path in selection.files]
    datasets = write_results(headers, volume, findings, cfg.results)
    summary = findings.to_json()
    summary["timings_s"] = {"volume": round(t_volume, 4),
                            "total": round(time.perf_counter() - t0, 4)}
    return Results(datasets, summary)


def bleed(series_dir: Path, config: Any) -> Results:
    """Like :func:`summary`; the findings are positive when the series description contains
    BLEED (so one node sees positive and negative series)."""
    results = summary(series_dir, config)
    src = dcmread(sorted(Path(series_dir).glob("*.dcm"))[0], stop_before_pixels=True)
    positive = "BLEED" in str(src.get("SeriesDescription", "")).upper()
    return Results(results.datasets, {**results.findings, "positive": positive})


def gated(series_dir: Path, config: Any) -> Results:
    """Like :func:`summary`, but waits while the file named by ``ICH_TEST_GATE`` exists, so
    that a test can hold the worker until its queue is full (fails after two minutes)."""
    gate = os.environ.get("ICH_TEST_GATE")
    deadline = time.monotonic() + 120
    while gate and Path(gate).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"test gate {gate} still closed after 120 s")
        time.sleep(0.05)
    return summary(series_dir, config)


def volume_only(series_dir: Path, config: Any) -> Results:
    """The real pipeline up to the volume (selection, sorting, HU volume), no models: the
    path every malformed header goes through before inference."""
    from pipeline.volume import load_volume

    volume, selection = load_volume(Path(series_dir), config)
    return Results([], {"slices": int(volume.hu.shape[0]), "series_uid": selection.series_uid})


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
