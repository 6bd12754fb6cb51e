"""Dataset readers on small files written here: RSNA 2019, CT-ICH and the phantom layouts."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom import uid as dcm_uid
from pydicom.dataset import Dataset, FileMetaDataset

from pipeline.datasets import (
    UNKNOWN_SUBTYPE,
    DatasetError,
    ctich_studies,
    index_rsna,
    iter_studies,
    load_rsna_series,
    read_rsna_csv,
)
from pipeline.findings import LABELS, SUBTYPE_CODE

ROOT = "1.2.826.0.1.3680043.10.1047."


def write_ct(path: Path, study: str, series: str, sop: str, z_mm: float, hu: np.ndarray,
             instance: int) -> None:
    """One unsigned CT slice (intercept -1024, as RSNA stores them) at height ``z_mm``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = dcm_uid.CTImageStorage
    meta.MediaStorageSOPInstanceUID = dcm_uid.UID(sop)
    meta.TransferSyntaxUID = dcm_uid.ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = dcm_uid.CTImageStorage
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.FrameOfReferenceUID = study + ".1"
    ds.Modality = "CT"
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [-10.0, -12.0, z_mm]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [0.8, 0.8]
    ds.SliceThickness = 5.0
    ds.Rows, ds.Columns = hu.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope = -1024.0, 1.0
    ds.PixelData = (hu + 1024).astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def make_rsna(root: Path, rng: np.random.Generator) -> dict[str, tuple[list[float], list[float]]]:
    """Two studies in the RSNA layout: shuffled files, one series stored vertex-first,
    SOP UIDs spelled like the real data (``ID_…``) in one and as plain UIDs in the other."""
    images = root / "stage_2_train"
    images.mkdir(parents=True)
    rows: list[tuple[str, int]] = []
    truth: dict[str, tuple[list[float], list[float]]] = {}
    for s, (n, subdural_slices, rsna_style) in enumerate(((6, (2, 3), True),
                                                          (5, (4,), False))):
        study, series = f"{ROOT}{s}.1", f"{ROOT}{s}.2"
        heights = 5.0 * np.arange(n) + 100.0 * s
        order = rng.permutation(n)
        if s == 0:
            heights = heights[::-1]  # files numbered from the vertex down
        sops = []
        for k in order:
            sop = f"ID_{s}{k:03d}abc" if rsna_style else f"{ROOT}{s}.3.{k}"
            hu = np.full((6, 8), 10.0 * float(heights[k]), np.float32)
            hu[0, 0] = -1000.0
            write_ct(images / f"{sop if rsna_style else 'ID_' + sop}.dcm", study, series, sop,
                     float(heights[k]), hu, int(k) + 1)
            sops.append((float(heights[k]), sop, int(k)))
            for label in LABELS[::-1]:
                positive = int(label in ("subdural", "any") and int(k) in subdural_slices)
                rows.append((f"{sop if rsna_style else 'ID_' + sop}_{label}", positive))
        truth[series] = (sorted(h for h, _, _ in sops),
                         sorted(float(heights[k]) for k in subdural_slices))
    # A file whose SOP has no labels: skipped.
    write_ct(images / "extra.dcm", f"{ROOT}9.1", f"{ROOT}9.2", f"{ROOT}9.3", 0.0,
             np.zeros((6, 8), np.float32), 1)
    rng.shuffle(rows)
    with (root / "stage_2_train.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["ID", "Label"])
        w.writerows(rows)
    return truth


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # the real data's "ID_…" UIDs
def test_rsna_reader(tmp_path: Path) -> None:
    truth = make_rsna(tmp_path, np.random.default_rng(0))
    index = index_rsna(tmp_path)
    assert [s.series_uid for s in index] == sorted(truth)
    for series in index:
        study = load_rsna_series(series)
        all_heights, positive_heights = truth[series.series_uid]
        heights = np.asarray(all_heights)
        assert study.hu.shape == (len(heights), 6, 8)
        # Sorted inferior to superior by ImagePositionPatient; HU from the Modality LUT.
        np.testing.assert_allclose(study.hu[:, 1, 1], 10.0 * heights)
        assert study.hu[0, 0, 0] == -1000.0
        positive = heights[study.slice_labels[:, LABELS.index("subdural")] == 1]
        np.testing.assert_allclose(positive, positive_heights)
        np.testing.assert_array_equal(study.slice_labels[:, 0], study.slice_labels[:, 5])
        assert study.slice_labels[:, 1:5].sum() == 0
        assert study.spacing == pytest.approx((5.0, 0.8, 0.8))
        assert study.mask is None


def test_rsna_csv_errors(tmp_path: Path) -> None:
    bad = tmp_path / "stage_2_train.csv"
    bad.write_text("ID,Label\nID_abc_epidural,0\nID_abc_subdural,1\nID_abc_subdural,0\n")
    labels = read_rsna_csv(bad)
    assert labels["ID_abc"].tolist() == [0, 0, 0, 0, 0, 1]  # duplicates are OR-ed
    bad.write_text("ID,Label\nID_abc_haemorrhage,1\n")
    with pytest.raises(DatasetError, match="does not end in _<label>"):
        read_rsna_csv(bad)
    bad.write_text("ID,Label\nID_abc_any,yes\n")
    with pytest.raises(DatasetError, match="0 or 1"):
        read_rsna_csv(bad)


def make_ctich(root: Path) -> np.ndarray:
    """Patients 49 and 50: NIfTI scans (x, y, z), binary masks (0/255) and the CSV."""
    (root / "ct_scans").mkdir(parents=True)
    (root / "masks").mkdir()
    affine = np.diag([-0.5, -0.5, 5.0, 1.0])  # RAS: LPS identity directions
    affine[:3, 3] = (20.0, 30.0, -40.0)
    data = np.zeros((10, 12, 4), np.int16)  # (x, y, z)
    data[..., :] = np.arange(4, dtype=np.int16) * 10
    data[2, 3, 1] = 999
    mask = np.zeros(data.shape, np.uint8)
    mask[4:6, 4:6, 1] = 255  # slice 2: epidural only
    mask[1:3, 1:3, 2] = 255  # slice 3: epidural + subdural
    columns = ["PatientNumber", "SliceNumber", "Intraventricular", "Intraparenchymal",
               "Subarachnoid", "Epidural", "Subdural", "No_Hemorrhage", "Fracture_Yes_No"]
    rows = [[49, 1, 0, 0, 0, 0, 0, 1, 0], [49, 2, 0, 0, 0, 1, 0, 0, 0],
            [49, 3, 0, 0, 0, 1, 1, 0, 1], [49, 4, 0, 0, 0, 0, 0, 1, 0]]
    rows += [[50, k, 0, 0, 0, 0, 0, 1, 0] for k in range(1, 5)]
    for number in (49, 50):
        nib.save(nib.Nifti1Image(data, affine), root / "ct_scans" / f"{number:03d}.nii")
        nib.save(nib.Nifti1Image(mask if number == 49 else mask * 0, affine),
                 root / "masks" / f"{number:03d}.nii")
    with (root / "hemorrhage_diagnosis_raw_ct.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(columns)
        w.writerows(rows)
    return data


def test_ctich_reader(tmp_path: Path) -> None:
    data = make_ctich(tmp_path)
    studies = list(ctich_studies(tmp_path))
    assert [s.study_id for s in studies] == ["049", "050"]
    first = studies[0]
    assert first.hu.shape == (4, 12, 10)
    assert first.hu[1, 3, 2] == 999.0 and first.hu[3, 0, 0] == 30.0
    np.testing.assert_array_equal(first.hu, np.transpose(data, (2, 1, 0)))
    assert first.spacing == pytest.approx((5.0, 0.5, 0.5))
    assert first.image.GetOrigin() == pytest.approx((-20.0, -30.0, -40.0))
    assert first.image.GetDirection() == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert first.slice_labels.tolist() == [[0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0],
                                           [1, 1, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0]]
    assert first.mask is not None
    # A single subtype on the slice: its code; several: unknown subtype.
    assert set(np.unique(first.mask[1]).tolist()) == {0, SUBTYPE_CODE["epidural"]}
    assert set(np.unique(first.mask[2]).tolist()) == {0, UNKNOWN_SUBTYPE}
    assert int((first.mask[1] > 0).sum()) == 4
    assert studies[1].series_labels.sum() == 0
    assert [s.study_id for s in iter_studies(tmp_path, "phantom")] == ["049", "050"]


def test_ctich_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="hemorrhage_diagnosis_raw_ct.csv"):
        list(ctich_studies(tmp_path))
    make_ctich(tmp_path)
    csv_path = tmp_path / "hemorrhage_diagnosis_raw_ct.csv"
    csv_path.write_text(csv_path.read_text() + "49,9,0,0,0,0,0,1,0\n")
    with pytest.raises(DatasetError, match="SliceNumber 9 is outside 1..4"):
        list(ctich_studies(tmp_path))
    with pytest.raises(DatasetError, match="needs a data folder"):
        list(iter_studies(None, "rsna"))


def test_phantom_layouts_round_trip(tmp_path: Path) -> None:
    phantom = pytest.importorskip("pipeline.phantom")
    phantom.write_studies(tmp_path / "dicom", n=1, seed=3, subtypes=["subdural:8"], slices=20,
                          matrix=48)
    reference = phantom.generate_study(
        int(np.random.SeedSequence([3, 0]).generate_state(1, np.uint32)[0]),
        subtypes=["subdural:8"], slices=20, matrix=48)
    (study,) = list(iter_studies(tmp_path / "dicom", "phantom"))
    assert study.hu.shape == reference.hu.shape
    np.testing.assert_allclose(study.hu, reference.hu, atol=1.0)
    np.testing.assert_array_equal(study.slice_labels, reference.slice_labels)
    assert study.mask is not None
    np.testing.assert_array_equal(study.mask, reference.labels)

    phantom.write_studies(tmp_path / "ctich", n=1, seed=3, subtypes=["subdural:8"], slices=20,
                          matrix=48, layout="ctich")
    (ct,) = list(iter_studies(tmp_path / "ctich", "ctich"))
    np.testing.assert_allclose(ct.hu, reference.hu, atol=1.0)
    np.testing.assert_array_equal(ct.slice_labels, reference.slice_labels)
    assert ct.mask is not None
    np.testing.assert_array_equal(ct.mask > 0, reference.labels > 0)
    assert set(np.unique(ct.mask).tolist()) <= {0, SUBTYPE_CODE["subdural"]}


def test_phantom_in_memory() -> None:
    pytest.importorskip("pipeline.phantom")
    studies = list(iter_studies(None, "phantom", n=2, seed=4, matrix=32,
                                subtypes=["epidural:5"]))
    assert len(studies) == 2 and studies[0].study_id == "phantom-4"
    for study in studies:
        assert 24 <= study.hu.shape[0] <= 40 and study.hu.shape[1:] == (32, 32)
        assert study.series_labels[[0, 1]].tolist() == [1, 1]
        assert study.mask is not None and (study.mask == SUBTYPE_CODE["epidural"]).any()
