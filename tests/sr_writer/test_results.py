"""write_results: the objects returned, their identity, deterministic UIDs, refused input."""

from __future__ import annotations

import datetime
import io
from dataclasses import replace

import numpy as np
import pydantic
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    Comprehensive3DSRStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)

from pipeline.findings import ModelIdentity
from sr_writer.config import ResultsConfig
from sr_writer.results import ResultsError, write_results
from tests.sr_writer.conftest import NOW, Case

IDENTITY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
            "StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName", "StudyID")


def reread(ds: Dataset) -> Dataset:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    return dcmread(buf)


def test_positive_gives_sr_seg_and_previews(positive: Case) -> None:
    classes = [str(ds.SOPClassUID) for ds in positive.results]
    assert classes[0] == Comprehensive3DSRStorage
    assert classes[1] == SegmentationStorage
    # summary + one key image per lesion (two lesions on different slices)
    assert classes[2:] == [SecondaryCaptureImageStorage] * 3
    cfg = ResultsConfig()
    numbers = {ds.Modality: int(ds.SeriesNumber) for ds in positive.results}
    assert numbers == {"SR": cfg.sr_series_number, "SEG": cfg.seg_series_number,
                       "OT": cfg.preview_series_number}
    previews = positive.by_modality("OT")
    assert [int(ds.InstanceNumber) for ds in previews] == [1, 2, 3]
    assert len({ds.SeriesInstanceUID for ds in previews}) == 1
    assert all(ds.BurnedInAnnotation == "YES" for ds in previews)
    for ds in positive.results:
        assert ds.SeriesInstanceUID.startswith(cfg.uid_root)
        assert ds.SOPInstanceUID.startswith(cfg.uid_root)
        assert ds.SeriesDescription.startswith("AI ICH")
        assert ds.Manufacturer == "ICH-Node"
        assert str(ds.ContentDate) == "20240102" and str(ds.ContentTime) == "030405"


def test_key_images_reference_their_ct_slice(positive: Case) -> None:
    by_uid = {h.SOPInstanceUID: h for h in positive.headers}
    expected = sorted({les.largest_slice for les in positive.findings.lesions})
    keys = positive.by_modality("OT")[1:]
    for ds, k in zip(keys, expected, strict=True):
        ref = ds.SourceImageSequence[0].ReferencedSOPInstanceUID
        assert ref == positive.volume.source_sop_uids[k]
        assert ds.SourceImageSequence[0].ReferencedSOPClassUID == by_uid[ref].SOPClassUID


def test_identity_copied_from_source(positive: Case) -> None:
    source = positive.headers[0]
    for ds in positive.results:
        back = reread(ds)
        for keyword in IDENTITY:
            assert str(back.get(keyword, "")) == str(source.get(keyword, "")), keyword


def test_negative_gives_sr_and_one_summary(negative: Case) -> None:
    modalities = [ds.Modality for ds in negative.results]
    assert modalities == ["SR", "OT"]
    assert "SourceImageSequence" not in negative.results[1]


def test_uids_are_deterministic(positive: Case) -> None:
    later = NOW + datetime.timedelta(hours=5)
    again = write_results(positive.headers, positive.volume, positive.findings,
                          ResultsConfig(), now=later)
    assert [ds.SOPInstanceUID for ds in again] == [ds.SOPInstanceUID
                                                   for ds in positive.results]
    assert [ds.SeriesInstanceUID for ds in again] == [ds.SeriesInstanceUID
                                                      for ds in positive.results]
    assert str(again[0].ContentTime) == "080405"
    # the SEG's segments keep their tracking UIDs too
    assert ([s.TrackingUID for s in again[1].SegmentSequence]
            == [s.TrackingUID for s in positive.results[1].SegmentSequence])
    # and its dimension organization (highdicom draws that one at random)
    for keyword in ("DimensionOrganizationSequence", "DimensionIndexSequence"):
        assert ([d.DimensionOrganizationUID for d in again[1][keyword].value]
                == [d.DimensionOrganizationUID for d in positive.results[1][keyword].value])
    assert len({d.DimensionOrganizationUID for d in again[1].DimensionIndexSequence}) == 1


def test_other_weights_give_other_uids(positive: Case) -> None:
    other = replace(positive.findings,
                    model=ModelIdentity("ich-demo", "0.1.1", "ab" * 32, demo=True))
    again = write_results(positive.headers, positive.volume, other, ResultsConfig(), now=NOW)
    assert not ({ds.SOPInstanceUID for ds in again}
                & {ds.SOPInstanceUID for ds in positive.results})


def test_mask_on_another_grid_is_refused(positive: Case) -> None:
    bad = replace(positive.findings, mask=np.zeros((3, 4, 5), dtype=np.uint8))
    with pytest.raises(ResultsError, match="mask"):
        write_results(positive.headers, positive.volume, bad, ResultsConfig(), now=NOW)


def test_headers_of_another_study_are_refused(positive: Case) -> None:
    other = [reread(h) for h in positive.headers[:2]]
    for h in other:
        h.StudyInstanceUID = "1.2.3.4"
    with pytest.raises(ResultsError, match="study"):
        write_results(other, positive.volume, positive.findings, ResultsConfig(), now=NOW)


def test_no_headers_is_refused(positive: Case) -> None:
    with pytest.raises(ResultsError, match="At least one"):
        write_results([], positive.volume, positive.findings, ResultsConfig(), now=NOW)


@pytest.mark.parametrize("overrides", [
    {"uid_root": "1.2.3"},  # no trailing dot
    {"uid_root": "1.02.3."},  # leading zero
    {"uid_root": "1." * 21},  # too long
    {"sr_series_number": 0},
    {"segment_colors": {"subdural": (255, 0, 0)}},
    {"preview_window": (40.0, 0.0)},
    {"sr_series_descripton": "typo"},
])
def test_config_refuses_nonsense(overrides: dict[str, object]) -> None:
    with pytest.raises(pydantic.ValidationError):
        ResultsConfig(**overrides)


def test_config_documents_every_field() -> None:
    for name, field in ResultsConfig.model_fields.items():
        assert field.description and "Default" in field.description, name


def test_objects_read_back_without_validation_warnings(positive: Case) -> None:
    """Every value fits its VR: pydicom reads each saved object back without a warning
    (a 64-character LO value in a multi-valued element used to read back as 65)."""
    import warnings

    from pydicom import dcmread

    for path in positive.files:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for _ in dcmread(path).iterall():
                pass
    versions = list(dcmread(positive.file_of("SR")).SoftwareVersions)
    assert f"sha256:{positive.findings.model.sha256[:16]}" in versions


def test_software_versions_keep_a_long_bundle_version_whole() -> None:
    """The shipped bundle's name and version together pass the 64 characters of LO: they
    become two values, so the version is not cut (it was '... 0.4.0+0.6')."""
    from types import SimpleNamespace

    from pipeline.findings import ModelIdentity
    from sr_writer.identity import software_versions
    from tests.sr_writer.factory import DEMO_MODEL

    long = ModelIdentity(name="ich-demo-classifier+ich-demo-segmenter+ich-demo-fusion",
                         version="0.4.0+0.6.0+0.6.0", sha256="ab" * 32)
    findings = SimpleNamespace(model=long)
    values = software_versions(findings)  # type: ignore[arg-type]
    assert values[1:] == [long.name, long.version, "sha256:" + "ab" * 8]
    assert all(len(v) <= 64 for v in values)
    short = software_versions(SimpleNamespace(model=DEMO_MODEL))  # type: ignore[arg-type]
    assert short[1:] == ["ich-demo 0.1.0", "sha256:" + "5e" * 8]
