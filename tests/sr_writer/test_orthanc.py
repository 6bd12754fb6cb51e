"""Orthanc (the PACS) accepts the SR, SEG and previews over C-STORE and lists them in the
source study, with the patient's non-ASCII name intact."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread

from pipeline.config import VolumeConfig
from pipeline.volume import build_volume
from sr_writer.config import ResultsConfig
from sr_writer.results import write_results
from tests.helpers.net import pynetdicom_send
from tests.helpers.orthanc import OrthancServer
from tests.sr_writer.conftest import NOW, save_all
from tests.sr_writer.factory import bleed_mask, findings_for, headers, with_blood, write_head_series

NAME = "Müller^Jürgen"


@pytest.mark.orthanc
def test_orthanc_lists_every_result_in_the_source_study(tmp_path: Path) -> None:
    files, _ = write_head_series(tmp_path / "series")
    for path in files:  # a UTF-8 patient name, as a German hospital sends it
        ds = dcmread(path)
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName = NAME
        ds.save_as(path, enforce_file_format=True)
    volume = build_volume(files, VolumeConfig())
    mask = bleed_mask(volume)
    results = write_results(headers(files), with_blood(volume, mask),
                            findings_for(volume, mask), ResultsConfig(), now=NOW)
    result_files = save_all(results, tmp_path / "out")
    with OrthancServer(tmp_path / "orthanc") as orthanc:
        assert pynetdicom_send(orthanc.dicom_port, files, called_ae="ORTHANC") == [0] * len(files)
        assert pynetdicom_send(orthanc.dicom_port, result_files, called_ae="ORTHANC") \
            == [0] * len(result_files)
        study_id = orthanc.find_study(str(results[0].StudyInstanceUID))
        assert study_id is not None
        series = orthanc.series_of_study(study_id)
        modalities = sorted(s["MainDicomTags"].get("Modality", "") for s in series)
        assert modalities == sorted(["CT", "SR", "SEG", "OT"])
        counts = {s["MainDicomTags"]["Modality"]: len(s["Instances"]) for s in series}
        assert counts["OT"] == sum(1 for ds in results if ds.Modality == "OT")
        for entry in series:
            tags = orthanc.simplified_tags(entry["Instances"][0])
            assert tags["PatientName"] == NAME
