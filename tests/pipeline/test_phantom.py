"""Tests of the synthetic head-CT phantom (pipeline.phantom).

Small matrices (128) keep the suite fast; one test runs the full 512 matrix. Every
written object is read back (pydicom, SimpleITK, nibabel, csv).
"""

from __future__ import annotations

import csv
import filecmp
import math
import re
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from pipeline import phantom as P
from pipeline.phantom_lesions import DEFAULT_ML

DCIODVFY = shutil.which("dciodvfy")
SIZES_ML = {
    "epidural": (0.1, 5.0, 80.0),
    "intraparenchymal": (0.1, 5.0, 80.0),
    "intraventricular": (0.1, 2.0, 12.0),
    # At 128 px (1.8 mm pixels) few sulcal voxels are at least half CSF: a convexity region
    # holds about 20 mL of labelled subarachnoid space (25 mL fits from 256 px).
    "subarachnoid": (0.1, 5.0, 15.0),
    "subdural": (0.1, 5.0, 80.0),
}


def _small(seed: int, subtypes: list[str] | None, slices: int = 24, **kw: object) -> P.PhantomStudy:
    return P.generate_study(seed, subtypes=subtypes, slices=slices, matrix=128, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def all_subtypes() -> P.PhantomStudy:
    return _small(21, ["epidural:20", "subdural:15", "intraparenchymal:10", "intraventricular:3", "subarachnoid:6"],
                  slices=30)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[P.StudySummary]]:
    out = tmp_path_factory.mktemp("phantom_dicom")
    summaries = P.write_studies(out, n=2, seed=5, subtypes=["subdural:12", "intraventricular:2"], slices=20,
                                matrix=128)
    return out, summaries


def test_slice_labels_are_derived_from_the_masks(all_subtypes: P.PhantomStudy) -> None:
    st = all_subtypes
    assert st.slice_labels.shape == (st.hu.shape[0], 6)
    for k in range(st.hu.shape[0]):
        present = set(np.unique(st.labels[k]).tolist()) - {0}
        for j, name in enumerate(P.RSNA_LABELS[1:], start=1):
            assert st.slice_labels[k, j] == int(P.SUBTYPE_CODES[name] in present), (k, name)
        assert st.slice_labels[k, 0] == int(bool(present))
    assert set(st.subtypes) == set(P.SUBTYPES)


def test_labels_cover_the_painted_blood(all_subtypes: P.PhantomStudy) -> None:
    st = all_subtypes
    assert st.lesion_ids is not None
    for i, les in enumerate(st.lesions, start=1):
        mask = st.lesion_ids == i
        assert np.all(st.labels[mask] == les.code)
        core = mask & np.roll(mask, 1, axis=2) & np.roll(mask, -1, axis=2) & np.roll(mask, 1, axis=1) \
            & np.roll(mask, -1, axis=1)
        if core.sum() > 20:
            # Acute blood is 50-90 HU; the core (away from partial volume) must read as blood.
            assert 45.0 < float(np.median(st.hu[core])) < 95.0, les
    assert np.all((st.labels > 0) == (st.lesion_ids > 0))


def test_blood_in_csf_spaces_is_labelled_only_where_it_shows() -> None:
    # Same seed with and without the bleeds: anatomy, scanner and noise are identical, so the
    # difference is the blood alone. A labelled voxel is at least half blood that replaced CSF
    # (+20 HU or more) and was not bone or a calcification before (it reads as blood).
    pos = _small(31, ["subarachnoid:6", "intraventricular:3"], slices=30)
    neg = _small(31, [], slices=30)
    lab = (pos.labels == P.SUBTYPE_CODES["subarachnoid"]) | (pos.labels == P.SUBTYPE_CODES["intraventricular"])
    assert lab.sum() > 100
    delta = pos.hu.astype(np.float64) - neg.hu
    assert float(delta[lab].min()) >= 15.0
    assert float(np.percentile(pos.hu[lab], 99)) < 110.0


def test_blood_that_fills_csf_is_labelled() -> None:
    # The converse: where blood replaced (nearly) all of a voxel's CSF, the voxel is labelled.
    # Phantom version 2 lost exactly those voxels (pure CSF failed the bone test by float32
    # rounding), so a ventricle full of blood was labelled as a rim. 256 px has pure-CSF
    # voxels in the ventricles and sulci; 128 px has few.
    pos = P.generate_study(31, subtypes=["subarachnoid:8", "intraventricular:4"], slices=24, matrix=256)
    neg = P.generate_study(31, subtypes=[], slices=24, matrix=256)
    delta = pos.hu.astype(np.float64) - neg.hu
    csf_kinds = (pos.labels == P.SUBTYPE_CODES["subarachnoid"]) | (pos.labels == P.SUBTYPE_CODES["intraventricular"])
    # Blood of 50-90 HU over CSF of 3-10 HU: +40 HU or more only where blood holds most of the voxel.
    filled = delta >= 40.0
    assert filled.sum() > 500
    # Interior voxels (all four in-plane neighbours filled too) as well as edges; version 2
    # labelled 66 % of the filled voxels and 28 % of the interior ones. What stays unlabelled
    # is blood over a dense structure (choroid plexus, falx), which reads as bone by design.
    core = filled & np.roll(filled, 1, 1) & np.roll(filled, -1, 1) & np.roll(filled, 1, 2) & np.roll(filled, -1, 2)
    assert core.sum() > 100
    assert float(csf_kinds[filled].mean()) > 0.95
    assert float(csf_kinds[core].mean()) > 0.95


@pytest.mark.parametrize("subtype", P.SUBTYPES)
def test_requested_sizes_are_met(subtype: str) -> None:
    for i, ml in enumerate(SIZES_ML[subtype]):
        st = _small(100 + i, [f"{subtype}:{ml}"])
        vox_ml = float(np.prod(st.spacing_mm)) / 1000.0
        got = st.volume_ml().get(subtype, 0.0)
        assert abs(got - ml) <= max(0.02 * ml, vox_ml), (subtype, ml, got)
        assert st.lesions[0].requested_ml == ml
        assert st.subtypes == (subtype,)


def test_random_studies_are_about_half_negative() -> None:
    rng = np.random.default_rng(0)
    draws = [P._random_requests(rng, 0.5) for _ in range(2000)]
    negative = sum(1 for d in draws if not d) / len(draws)
    assert 0.45 < negative < 0.55
    kinds = {r.subtype for d in draws for r in d}
    assert kinds == set(P.SUBTYPES)
    assert all(r.volume_ml is None for d in draws for r in d)
    assert set(DEFAULT_ML) == set(P.SUBTYPES)


@pytest.mark.parametrize("request_", ["subdural:10", "epidural:10", "subarachnoid:5"])
def test_positive_and_negative_twins_differ_only_at_the_lesion(request_: str) -> None:
    """Same seed with and without a bleed: anatomy, mimics, scanner and noise are identical,
    so a model cannot find the bleed through anything but its appearance (blood plus its
    partial-volume rim, within a slice thickness of the labelled voxels)."""
    from scipy import ndimage as ndi

    neg = _small(33, [])
    pos = _small(33, [request_])
    assert neg.hard_negatives == pos.hard_negatives
    assert neg.scanner == pos.scanner and neg.identity.patient_id == pos.identity.patient_id
    assert not np.any(neg.labels)
    dist = ndi.distance_transform_edt(pos.labels == 0, sampling=pos.spacing_mm)
    changed = neg.hu != pos.hu
    assert changed.sum() >= (pos.labels > 0).sum() * 0.9
    assert float(dist[changed].max()) <= 10.0


def test_hard_negatives_are_dense_but_unlabelled() -> None:
    st = _small(8, [], hard_negatives=True)
    assert "beam-hardening streaks" in st.hard_negatives
    assert not np.any(st.slice_labels)
    # Calcifications / dura / venous sinus: hyperdense (> 60 HU) voxels inside the head that are not bone.
    dense = (st.hu > 60) & (st.hu < 400)
    assert dense.sum() > 20


def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        P.write_studies(out, n=1, seed=3, slices=20, matrix=128, patient_name="Ærø^Søren")
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) > 20
    match, mismatch, errors = filecmp.cmpfiles(a, b, [str(f) for f in files_a], shallow=False)
    assert not mismatch and not errors
    c = tmp_path / "c"
    P.write_studies(c, n=1, seed=4, slices=20, matrix=128)
    first = next(iter(sorted((a / "study_0001" / "dicom").iterdir())))
    other = next(iter(sorted((c / "study_0001" / "dicom").iterdir())))
    assert first.read_bytes() != other.read_bytes()


def test_dicom_read_back_gives_the_generated_hu(written: tuple[Path, list[P.StudySummary]]) -> None:
    out, summaries = written
    s = summaries[0]
    study = P.generate_study(s.seed, subtypes=["subdural:12", "intraventricular:2"], slices=20, matrix=128)
    dss = [pydicom.dcmread(p) for p in sorted(s.image_path.glob("*.dcm"))]
    assert len(dss) == s.n_slices == study.hu.shape[0]
    dss.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    for k, ds in enumerate(dss):
        hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(hu, study.hu[k])
        assert ds.SOPInstanceUID == study.identity.sop_instance_uids[k]
        assert ds.StudyInstanceUID == s.study_instance_uid and ds.SeriesInstanceUID == s.series_instance_uid
        np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient],
                                   [study.origin[0], study.origin[1], study.origin[2] + k * study.spacing_mm[0]],
                                   atol=1e-3)
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        np.testing.assert_allclose([float(v) for v in ds.PixelSpacing], study.spacing_mm[1:], rtol=1e-5)
        assert float(ds.SliceThickness) == study.slice_thickness_mm
        assert ds.Modality == "CT" and ds.BodyPartExamined == "HEAD"
        assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
        assert ds.StudyDescription == "CT HEAD WO CONTRAST"
    numbers = sorted(int(d.InstanceNumber) for d in dss)
    assert numbers == list(range(1, len(dss) + 1))


def test_scanner_profiles_vary_rescale_and_representation() -> None:
    from pipeline.phantom_dicom import draw_scanner

    seen = set()
    for seed in range(60):
        sc = draw_scanner(np.random.default_rng(seed))
        seen.add((sc.pixel_representation, sc.rescale_intercept, sc.padding_value is not None))
        lo, hi = sc.stored_range
        assert lo + sc.rescale_intercept <= -1000 and hi + sc.rescale_intercept >= 3000
        assert 3.0 <= sc.noise_sigma <= 8.0
    assert {pr for pr, _, _ in seen} == {0, 1}
    assert {icpt for _, icpt, _ in seen} == {-1024.0, -1000.0, 0.0}
    assert (1, -1024.0, True) in seen
    st = P.generate_volume(3, shape=(20, 64, 64), subtypes=[])
    hu_lo, hu_hi = st.scanner.hu_range
    inside = st.hu != st.scanner.outside_hu
    assert st.hu[inside].min() >= hu_lo and st.hu.max() <= hu_hi
    assert np.array_equal(st.hu, np.rint(st.hu))


def test_rsna_csv(written: tuple[Path, list[P.StudySummary]]) -> None:
    out, summaries = written
    rows = list(csv.reader(open(out / "rsna_labels.csv", encoding="ascii")))
    assert rows[0] == ["ID", "Label"]
    assert len(rows) - 1 == 6 * sum(s.n_slices for s in summaries)
    pat = re.compile(r"^ID_([0-9.]+)_(epidural|intraparenchymal|intraventricular|subarachnoid|subdural|any)$")
    by_uid: dict[str, dict[str, int]] = {}
    for rid, val in rows[1:]:
        m = pat.match(rid)
        assert m and val in ("0", "1"), rid
        by_uid.setdefault(m.group(1), {})[m.group(2)] = int(val)
    uids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p
            for s in summaries for p in s.image_path.glob("*.dcm")}
    assert set(by_uid) == set(uids)
    for labels in by_uid.values():
        assert labels["any"] == max(v for k, v in labels.items() if k != "any")
    assert any(v["subdural"] for v in by_uid.values()) and any(v["intraventricular"] for v in by_uid.values())
    per_study = list(csv.reader(open(summaries[0].study_dir / "labels.csv", encoding="ascii")))
    assert per_study[0] == ["ID", "Label"] and len(per_study) == 1 + 6 * summaries[0].n_slices


def test_nifti_mask_geometry_matches_the_series(written: tuple[Path, list[P.StudySummary]]) -> None:
    _, summaries = written
    s = summaries[0]
    img = sitk.ReadImage(str(s.study_dir / "mask.nii.gz"))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(s.image_path)))
    ct = reader.Execute()
    assert img.GetSize() == ct.GetSize()
    np.testing.assert_allclose(img.GetSpacing(), ct.GetSpacing(), rtol=1e-5)
    np.testing.assert_allclose(img.GetOrigin(), ct.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(img.GetDirection(), ct.GetDirection(), atol=1e-6)
    labels = sitk.GetArrayFromImage(img)
    assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 3, 5}
    ml = labels.astype(bool).sum() * float(np.prod(img.GetSpacing())) / 1000.0
    assert math.isclose(ml, sum(s.volume_ml.values()), rel_tol=0.01)
    # nibabel sees the RAS affine of the same LPS geometry.
    nii = nib.load(str(s.study_dir / "mask.nii.gz"))
    assert isinstance(nii, nib.Nifti1Image)
    aff = nii.affine
    dx, dy, dz = img.GetSpacing()
    ox, oy, oz = img.GetOrigin()
    np.testing.assert_allclose(aff[:3, :3], np.diag([-dx, -dy, dz]), atol=1e-5)
    np.testing.assert_allclose(aff[:3, 3], [-ox, -oy, oz], atol=1e-3)


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (dicom3tools) is not installed")
def test_dciodvfy_reports_no_errors(tmp_path: Path) -> None:
    profiles: dict[str, P.PhantomStudy] = {}
    for seed in range(30):
        st = _small(seed, ["epidural:2"], slices=20,
                    patient_name="山田^太郎" if not profiles else None)
        profiles.setdefault(st.scanner.manufacturer, st)
        if len(profiles) >= 4:
            break
    assert len(profiles) >= 4
    for name, st in profiles.items():
        paths = P.write_dicom_series(st, tmp_path / re.sub(r"\W", "_", name))
        for path in (paths[0], paths[len(paths) // 2]):
            res = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=60)
            report = res.stdout + res.stderr
            assert "Error" not in report, f"{name}: {report}"


def test_ctich_layout(tmp_path: Path) -> None:
    summaries = P.write_studies(tmp_path, n=2, seed=9, subtypes=["intraparenchymal:8"], slices=20, matrix=128,
                                layout="ctich")
    rows = list(csv.DictReader(open(tmp_path / "hemorrhage_diagnosis_raw_ct.csv", encoding="ascii")))
    assert list(rows[0].keys()) == list(P.CTICH_COLUMNS)
    assert len(rows) == sum(s.n_slices for s in summaries)
    for i, s in enumerate(summaries):
        number = P.CTICH_FIRST_PATIENT + i
        ct = nib.load(str(tmp_path / "ct_scans" / f"{number:03d}.nii"))
        mnii = nib.load(str(tmp_path / "masks" / f"{number:03d}.nii"))
        assert isinstance(ct, nib.Nifti1Image) and isinstance(mnii, nib.Nifti1Image)
        mask = np.asarray(mnii.dataobj)
        assert ct.shape == mask.shape == (128, 128, s.n_slices)
        assert set(np.unique(mask)) == {0, 1}
        mine = [r for r in rows if int(r["PatientNumber"]) == number]
        assert [int(r["SliceNumber"]) for r in mine] == list(range(1, s.n_slices + 1))
        for r in mine:
            k = int(r["SliceNumber"]) - 1
            assert int(r["Intraparenchymal"]) == int(mask[:, :, k].any())
            assert int(r["No_Hemorrhage"]) == 1 - int(r["Intraparenchymal"])
            assert r["Fracture_Yes_No"] == "0"
    assert all(s.subtypes == ("intraparenchymal",) for s in summaries)


def test_full_matrix_study() -> None:
    st = P.generate_study(2, subtypes=["epidural:25"], slices=40, matrix=512)
    assert st.hu.shape == (40, 512, 512) and st.hu.dtype == np.float32
    assert 0.4 < st.spacing_mm[1] < 0.5 and st.spacing_mm[1] == st.spacing_mm[2]
    assert abs(st.volume_ml()["epidural"] - 25.0) < 0.01
    # Epidural blood is lens shaped: much thicker than a crescent of the same volume, and it
    # stays on a limited stretch of the convexity.
    k = int(np.argmax((st.labels == 1).sum(axis=(1, 2))))
    ys, xs = np.nonzero(st.labels[k] == 1)
    extent_mm = max(np.ptp(ys), np.ptp(xs)) * st.spacing_mm[1]
    assert 20.0 < extent_mm < 110.0


def test_in_memory_volume_and_tissue_stats() -> None:
    st = P.generate_volume(np.random.default_rng(4), shape=(28, 192, 192), subtypes=["intraparenchymal:20"],
                           tissue_map=True)
    assert st.hu.shape == st.labels.shape == (28, 192, 192)
    assert st.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    stats = P.tissue_stats(st)
    for name in ("grey matter", "white matter", "csf", "cortical bone", "diploe", "soft tissue", "acute blood"):
        lo, hi = P.PUBLISHED_HU[name]
        assert name in stats
        assert lo - 8 <= stats[name]["mean"] <= hi + 8, (name, stats[name])
    assert stats["grey matter"]["mean"] > stats["white matter"]["mean"] + 4
    assert 20 < stats["oedema"]["mean"] < 30 if "oedema" in stats else True
    with pytest.raises(ValueError, match="tissue_map=True"):
        P.tissue_stats(P.generate_volume(1, shape=(20, 32, 32), subtypes=[]))


def test_identity_uid_root_and_names() -> None:
    st = _small(1, [], uid_root="1.2.3.4.", patient_name="Ünal^Şebnem")
    ident = st.identity
    assert ident.study_instance_uid.startswith("1.2.3.4.")
    assert all(u.startswith("1.2.3.4.") and len(u) <= 64 for u in ident.sop_instance_uids)
    assert len(set(ident.sop_instance_uids)) == len(ident.sop_instance_uids)
    assert ident.character_set == "ISO_IR 192"
    default = _small(1, [])
    assert default.identity.study_instance_uid.startswith(pydicom.uid.PYDICOM_ROOT_UID)
    assert default.identity.patient_name == "PHANTOM^0001"
    assert default.identity.character_set == "ISO_IR 100"
    with pytest.raises(ValueError, match="UID root"):
        _small(1, [], uid_root="1.2.3.4")


def test_requests_are_validated() -> None:
    assert P.LesionRequest.parse("Subdural:25") == P.LesionRequest("subdural", 25.0)
    assert P.LesionRequest.parse("epidural") == P.LesionRequest("epidural", None)
    with pytest.raises(ValueError, match="subtype must be one of"):
        P.LesionRequest.parse("chronic")
    with pytest.raises(ValueError, match="slices"):
        P.generate_study(1, slices=5, matrix=64)
    with pytest.raises(ValueError, match="layout"):
        P.write_studies(Path("/nonexistent"), n=1, seed=1, layout="nrrd")


def test_lesion_boxes_that_are_too_small_are_regrown(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lesions are sized while the anatomy renders, in a box guessed from the requested volume; a
    box that proves too small is grown and collected again, with the same result."""
    import pipeline.phantom_lesions as L

    subs = ["epidural:8", "subdural:6", "intraparenchymal:5", "intraventricular:2", "subarachnoid:3"]
    one = _small(44, subs, tissue_map=True)
    monkeypatch.setattr(L, "_BOX_FACTOR", dict.fromkeys(L._BOX_FACTOR, 0.3))
    two = _small(44, subs, tissue_map=True)
    assert np.array_equal(one.labels, two.labels)
    assert np.array_equal(one.hu, two.hu)
    assert one.tissue is not None and two.tissue is not None and np.array_equal(one.tissue, two.tissue)
