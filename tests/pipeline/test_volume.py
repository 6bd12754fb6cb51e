"""Volume reconstruction: GDCM parity on clean series, properties on damaged ones."""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom import uid as dcm_uid

from pipeline.config import PipelineConfig, VolumeConfig
from pipeline.errors import VolumeError
from pipeline.volume import build_volume, load_volume, volume_command
from tests.pipeline.ctfactory import (
    SeriesSpec,
    clean_dir,
    copy_as_duplicate,
    expected_on_grid,
    expected_volume,
    head_hu,
    write_enhanced_ct,
    write_series,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# Shrinking re-writes series for minutes on a 2-core machine: report the first failure as is.
NO_SHRINK = (Phase.explicit, Phase.reuse, Phase.generate)

LOSSLESS = [
    dcm_uid.ExplicitVRLittleEndian,
    dcm_uid.ImplicitVRLittleEndian,
    dcm_uid.ExplicitVRBigEndian,
    dcm_uid.DeflatedExplicitVRLittleEndian,
    dcm_uid.RLELossless,
    dcm_uid.JPEGLSLossless,
    dcm_uid.JPEGLosslessSV1,
]


def gdcm_read(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def assert_same_geometry(a: sitk.Image, b: sitk.Image) -> None:
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), rtol=0, atol=1e-9)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=1e-9)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=1e-9)


CLEAN = {
    "signed16": SeriesSpec(),
    "unsigned12": SeriesSpec(storage="unsigned", bits_stored=12, hu_fn=head_hu),
    "slope": SeriesSpec(storage="unsigned", slope=0.25, intercept=-1024.0),
    "oblique": SeriesSpec(col_cosine=(0.0, 0.9659258262890683, -0.25881904510252074)),
    "descending-ipp": SeriesSpec(row_cosine=(1.0, 0.0, 0.0), col_cosine=(0.0, -1.0, 0.0)),
    "thin-1mm": SeriesSpec(slice_spacing=1.0, thickness=1.0, n_slices=12),
    "rle": SeriesSpec(transfer_syntax=dcm_uid.RLELossless, hu_fn=head_hu),
    "jpegls": SeriesSpec(transfer_syntax=dcm_uid.JPEGLSLossless, hu_fn=head_hu),
    "jpeg-lossless": SeriesSpec(transfer_syntax=dcm_uid.JPEGLosslessSV1, hu_fn=head_hu),
    "j2k-lossless": SeriesSpec(transfer_syntax=dcm_uid.JPEG2000Lossless, rows=32, cols=32),
    "deflated": SeriesSpec(transfer_syntax=dcm_uid.DeflatedExplicitVRLittleEndian),
}


@pytest.mark.parametrize("name", sorted(CLEAN))
def test_clean_series_equals_gdcm(tmp_path: Path, name: str) -> None:
    spec = CLEAN[name]
    files = write_series(tmp_path, spec)
    vol = build_volume(files, VolumeConfig())
    ref = gdcm_read(tmp_path)
    np.testing.assert_array_equal(vol.hu, sitk.GetArrayFromImage(ref).astype(np.float32))
    assert_same_geometry(vol.image, ref)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(vol.image), vol.hu)
    assert vol.hu.dtype == np.float32
    np.testing.assert_array_equal(vol.hu, expected_volume(spec))
    assert vol.report.dropped == [] and not vol.report.resampled and not vol.report.tilt_corrected
    uids = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files]
    assert sorted(u for u in vol.source_sop_uids if u) == sorted(uids)
    assert vol.series_uid == spec.series_uid and vol.study_uid == spec.study_uid
    assert vol.frame_of_reference_uid == spec.frame_of_reference_uid


def test_descending_positions_are_sorted_by_normal_not_instance_number(tmp_path: Path) -> None:
    spec = SeriesSpec(n_slices=8)
    files = write_series(tmp_path, spec)
    for k, path in enumerate(files):  # InstanceNumber now runs against the geometry
        ds = dcmread(path)
        ds.InstanceNumber = 100 - k
        ds.save_as(path)
    vol = build_volume(list(reversed(files)), VolumeConfig())
    np.testing.assert_array_equal(vol.hu, expected_volume(spec))
    assert vol.image.GetOrigin() == pytest.approx(spec.origin)


_TS = st.sampled_from(LOSSLESS + [dcm_uid.JPEGLSNearLossless])
_STORAGE = st.sampled_from(["signed", "unsigned", "wrapped12"])


@settings(max_examples=14, deadline=None, phases=NO_SHRINK,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ts=_TS,
    storage=_STORAGE,
    monochrome1=st.booleans(),
    seed=st.integers(0, 2**16),
    n_dups=st.integers(0, 2),
    drop=st.lists(st.integers(1, 8), max_size=2, unique=True),
)
def test_damaged_series_give_the_same_volume(
    tmp_path: Path, ts: str, storage: str, monochrome1: bool, seed: int, n_dups: int,
    drop: list[int],
) -> None:
    """Shuffled files, duplicates (older copies with other pixels, newer identical copies),
    dropped slices, MONOCHROME1, signed/unsigned/wrapped storage, any lossless syntax:
    the volume is the analytic field (gaps filled exactly, since the field is linear)."""
    if storage == "wrapped12" and ts not in (dcm_uid.ExplicitVRLittleEndian,
                                             dcm_uid.ImplicitVRLittleEndian,
                                             dcm_uid.JPEGLosslessSV1):
        storage = "unsigned"  # encoders refuse values beyond BitsStored
    out = clean_dir(tmp_path / "series")
    spec = SeriesSpec(n_slices=10, transfer_syntax=ts, storage=storage,  # type: ignore[arg-type]
                      bits_stored=12 if storage != "signed" else 16, monochrome1=monochrome1)
    files = write_series(out, spec)
    rng = random.Random(seed)
    kept_uids = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files]
    for k in sorted(drop, reverse=True):
        files[k].unlink()
        del files[k]
        kept_uids[k] = None  # type: ignore[call-overload]
    dups = []
    for i in range(n_dups):
        src = rng.choice(files)
        dups.append(copy_as_duplicate(src, out / f"dup_old_{i}.dcm", newer=False))
    all_files = files + dups
    rng.shuffle(all_files)

    vol = build_volume(all_files, VolumeConfig())
    expected = expected_volume(spec)
    tol = spec.jls_error * spec.slope if ts == dcm_uid.JPEGLSNearLossless else 0.0
    assert vol.hu.shape == expected.shape
    np.testing.assert_allclose(vol.hu, expected, rtol=0, atol=tol + 1e-3)
    assert vol.report.duplicates_dropped == n_dups
    assert vol.report.filled_slices == sorted(drop)
    assert vol.source_sop_uids == kept_uids
    assert len(vol.report.gaps) == len(drop) - (1 if len(drop) == 2 and abs(drop[0] - drop[1]) == 1
                                                else 0)
    json.dumps(vol.report.to_dict())


def test_lossy_syntaxes_are_close(tmp_path: Path) -> None:
    spec = SeriesSpec(rows=32, cols=32, n_slices=3, transfer_syntax=dcm_uid.JPEG2000,
                      hu_fn=head_hu, storage="unsigned", bits_stored=12)
    vol = build_volume(write_series(tmp_path / "j2k", spec), VolumeConfig())
    err = np.abs(vol.hu - expected_volume(spec))
    assert float(err.mean()) < 10.0  # PSNR 80 dB of the 16-bit range
    spec8 = SeriesSpec(n_slices=3, transfer_syntax=dcm_uid.JPEGBaseline8Bit, storage="unsigned",
                       intercept=0.0, hu_fn=lambda x, y, z: 100.0 + 4.0 * x + 0 * y + z)
    vol8 = build_volume(write_series(tmp_path / "jpeg8", spec8), VolumeConfig())
    assert float(np.abs(vol8.hu - expected_volume(spec8)).max()) <= 4.0
    assert vol8.report.wrapped_unsigned_fixed == 0


def test_missing_slices_rejected_when_configured(tmp_path: Path) -> None:
    files = write_series(tmp_path, SeriesSpec(n_slices=8))
    files[4].unlink()
    with pytest.raises(VolumeError, match="missing slices"):
        build_volume(files[:4] + files[5:], VolumeConfig(missing_slices="reject"))


def test_non_uniform_spacing_is_resampled(tmp_path: Path) -> None:
    z = (0.0, 5.0, 10.3, 14.8, 20.0, 25.0, 30.4, 35.0)
    spec = SeriesSpec(z_mm=z)
    vol = build_volume(write_series(tmp_path, spec), VolumeConfig())
    assert vol.report.resampled and vol.report.filled_slices == []
    assert vol.spacing[0] == pytest.approx(5.0)
    grid = [k * 5.0 for k in range(8)]
    np.testing.assert_allclose(vol.hu, expected_on_grid(spec, grid), atol=0.51)
    assert all(u is not None for u in vol.source_sop_uids)  # nearest source kept


@pytest.mark.parametrize("tilt", [12.0, -20.0])
def test_gantry_tilt_is_sheared_onto_an_orthogonal_grid(tmp_path: Path, tilt: float) -> None:
    spec = SeriesSpec(tilt_deg=tilt, n_slices=8, rows=40, cols=20, pixel_spacing=(1.0, 1.0),
                      origin=(-10.0, -20.0, 0.0), gantry_tilt_tag=tilt)
    vol = build_volume(write_series(tmp_path, spec), VolumeConfig())
    assert vol.report.tilt_corrected
    assert vol.report.tilt_deg == pytest.approx(abs(tilt), abs=0.01)
    assert vol.spacing[0] == pytest.approx(5.0)
    assert vol.image.GetOrigin() == pytest.approx(spec.origin)
    expected = expected_on_grid(spec, [k * 5.0 for k in range(8)])
    shift = int(np.ceil(np.tan(np.radians(abs(tilt))) * 35.0)) + 1
    inner = slice(shift, -shift)
    np.testing.assert_allclose(vol.hu[:, inner], expected[:, inner], atol=1.01)
    assert np.all(vol.hu[-1, :shift - 1] == -1000.0) or np.all(vol.hu[-1, -shift + 1:] == -1000.0)


def test_mixed_matrix_and_orientation(tmp_path: Path) -> None:
    spec = SeriesSpec(n_slices=8)
    files = write_series(tmp_path, spec)
    odd = replace(spec, rows=16, cols=16, n_slices=2, origin=(-5.0, -6.0, 12.5))
    cor = replace(spec, n_slices=1, row_cosine=(1.0, 0.0, 0.0), col_cosine=(0.0, 0.0, -1.0))
    extra = write_series(tmp_path / "odd", odd) + write_series(tmp_path / "cor", cor)
    vol = build_volume(files + extra, VolumeConfig())
    np.testing.assert_array_equal(vol.hu, expected_volume(spec))
    assert len(vol.report.dropped) == 3
    assert any("mixes 3 orientations or matrix sizes" in w for w in vol.report.warnings)
    with pytest.raises(VolumeError, match="mixes 3"):
        build_volume(files + extra, VolumeConfig(mixed_geometry="reject"))


def test_duplicate_keeps_higher_acquisition_number(tmp_path: Path) -> None:
    spec = SeriesSpec(n_slices=6)
    files = write_series(tmp_path / "a", spec)
    repeat = replace(spec, acquisition_number=2, hu_fn=lambda x, y, z: 0 * x + 0 * y + 0 * z + 7)
    files2 = write_series(tmp_path / "b", repeat)[2:4]  # a re-scan of two positions
    vol = build_volume(files + files2, VolumeConfig())
    assert vol.report.duplicates_dropped == 2
    assert np.all(vol.hu[2:4] == 7.0)
    np.testing.assert_array_equal(vol.hu[[0, 1, 4, 5]], expected_volume(spec)[[0, 1, 4, 5]])


def test_enhanced_ct_multiframe(tmp_path: Path) -> None:
    spec = SeriesSpec(n_slices=9, slope=0.5, storage="unsigned", intercept=-1024.0, bits_stored=12)
    path = write_enhanced_ct(tmp_path, spec)
    vol = build_volume([path], VolumeConfig())
    np.testing.assert_array_equal(vol.hu, expected_volume(spec))
    assert vol.report.frames_read == 9 and vol.report.files_read == 1
    assert vol.image.GetSpacing() == pytest.approx((0.5, 0.5, 5.0))
    assert set(vol.source_sop_uids) == {str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)}


def test_padding_value_becomes_air_or_minimum(tmp_path: Path) -> None:
    spec = SeriesSpec(n_slices=3, padding_value=-2000, hu_fn=head_hu)
    files = write_series(tmp_path, spec)
    vol = build_volume(files, VolumeConfig())
    assert np.all(vol.hu[:, :2, :2] == -1000.0)
    assert vol.report.padding_pixels == 3 * 4
    vol_min = build_volume(files, VolumeConfig(padding_fill="minimum"))
    assert np.all(vol_min.hu[:, :2, :2] == vol_min.hu[:, 2:, 2:].min())


def test_rsna_wrapped_unsigned_matches_the_kaggle_fix(tmp_path: Path) -> None:
    """PixelRepresentation 0, BitsStored 12, intercept 0 and two's-complement values."""
    spec = SeriesSpec(n_slices=3, storage="wrapped12", hu_fn=head_hu)
    files = write_series(tmp_path, spec)
    vol = build_volume(files, VolumeConfig())
    np.testing.assert_array_equal(vol.hu, expected_volume(spec))
    assert vol.report.wrapped_unsigned_fixed == 3
    # The fix from the RSNA 2019 Kaggle forum, applied to the raw uint16 pixels.
    ds = dcmread(files[0])
    px = ds.pixel_array.astype(np.int32)  # pydicom masks to BitsStored
    assert int(ds.RescaleIntercept) > -100 and ds.BitsStored == 12
    px = px + 1000
    px[px >= 4096] -= 4096
    kaggle = px - 1000.0
    np.testing.assert_array_equal(vol.hu[0], kaggle)


def test_stray_high_bits_are_masked_to_bits_stored(tmp_path: Path) -> None:
    """Unsigned 12-bit data with junk above BitsStored (PS3.5 8.1.1: ignore those bits)."""
    spec = SeriesSpec(n_slices=3, storage="unsigned", bits_stored=12, hu_fn=head_hu)
    files = write_series(tmp_path, spec)
    for path in files:
        ds = dcmread(path)
        raw = np.frombuffer(ds.PixelData, dtype=np.uint16).copy()
        raw[::3] |= 0xF000
        ds.PixelData = raw.tobytes()
        ds.save_as(path)
    vol = build_volume(files, VolumeConfig())
    np.testing.assert_array_equal(vol.hu, expected_volume(spec))
    assert vol.report.wrapped_unsigned_fixed == 0


@settings(max_examples=6, deadline=None, phases=NO_SHRINK,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tilt=st.floats(-25.0, 25.0).filter(lambda t: abs(t) > 1.0), seed=st.integers(0, 99),
       extra=st.sampled_from(["none", "matrix", "coronal"]), drop=st.booleans())
def test_tilted_mixed_gapped_series(tmp_path: Path, tilt: float, seed: int, extra: str,
                                    drop: bool) -> None:
    """Tilt + foreign slices in the series + a missing slice + shuffled order."""
    out = clean_dir(tmp_path / "series")
    spec = SeriesSpec(tilt_deg=tilt, n_slices=7, rows=36, cols=12, pixel_spacing=(1.0, 1.0),
                      origin=(-6.0, -18.0, 0.0))
    files = write_series(out, spec)
    if drop:
        files.pop(3).unlink()
    if extra == "matrix":
        files += write_series(out, replace(spec, rows=20, n_slices=2, tilt_deg=0.0))
    elif extra == "coronal":
        files += write_series(out, replace(spec, n_slices=1, col_cosine=(0.0, 0.0, -1.0)))
    random.Random(seed).shuffle(files)
    vol = build_volume(files, VolumeConfig())
    assert vol.report.tilt_corrected and vol.report.tilt_deg == pytest.approx(abs(tilt), abs=0.01)
    assert vol.report.filled_slices == ([3] if drop else [])
    assert len(vol.report.dropped) == {"none": 0, "matrix": 2, "coronal": 1}[extra]
    expected = expected_on_grid(spec, [k * 5.0 for k in range(7)])
    margin = int(np.ceil(np.tan(np.radians(abs(tilt))) * 30.0)) + 1
    np.testing.assert_allclose(vol.hu[:, margin:-margin], expected[:, margin:-margin], atol=1.01)


def test_monochrome1_policies(tmp_path: Path) -> None:
    spec = SeriesSpec(n_slices=4, monochrome1=True)
    files = write_series(tmp_path, spec)
    vol = build_volume(files, VolumeConfig())
    np.testing.assert_array_equal(vol.hu, expected_volume(spec))
    assert vol.report.monochrome1_slices == 4
    inverted = build_volume(files, VolumeConfig(monochrome1="invert_stored"))
    np.testing.assert_array_equal(inverted.hu, sitk.GetArrayFromImage(gdcm_read(tmp_path)))


def test_errors_name_the_rule(tmp_path: Path) -> None:
    a = write_series(tmp_path / "a", SeriesSpec(n_slices=3))
    b = write_series(tmp_path / "b", SeriesSpec(n_slices=3))
    with pytest.raises(VolumeError, match="2 series"):
        build_volume(a + b, VolumeConfig())
    with pytest.raises(VolumeError, match="at least 4"):
        build_volume(a, VolumeConfig(min_slices=4))
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom")
    with pytest.raises(VolumeError, match="not a readable DICOM"):
        build_volume([junk], VolumeConfig())


def test_volume_command_writes_nifti_and_reports(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    spec = SeriesSpec(n_slices=9, hu_fn=head_hu)
    write_series(tmp_path / "in", spec)
    out = tmp_path / "out" / "vol.nii.gz"
    assert volume_command(tmp_path / "in", out, True, PipelineConfig()) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["selection"]["series_uid"] == spec.series_uid
    assert report["volume"]["shape_zyx"] == [9, 24, 20]
    img = nib.load(out)
    assert isinstance(img, nib.Nifti1Image)
    data = np.asarray(img.dataobj)  # (x, y, z)
    np.testing.assert_array_equal(np.transpose(data, (2, 1, 0)), expected_volume(spec))
    # LPS origin (-5, -6, 10) is RAS (5, 6, 10); x and y axes flip sign.
    np.testing.assert_allclose(img.affine[:3, 3], [5.0, 6.0, 10.0])
    np.testing.assert_allclose(np.diag(img.affine)[:3], [-0.5, -0.5, 5.0])
    assert volume_command(tmp_path / "in", out, False, PipelineConfig()) == 0
    text = capsys.readouterr().out
    assert "Selected series" in text and "Volume 20x24x9" in text
    shutil.rmtree(tmp_path / "in")
    (tmp_path / "in").mkdir()
    assert volume_command(tmp_path / "in", out, False, PipelineConfig()) == 1
    assert "SeriesRejected" in capsys.readouterr().err


def test_load_volume_uses_selection(tmp_path: Path) -> None:
    spec = SeriesSpec(n_slices=9)
    write_series(tmp_path, spec)
    vol, sel = load_volume(tmp_path, PipelineConfig())
    assert sel.series_uid == vol.series_uid == spec.series_uid
    np.testing.assert_array_equal(vol.hu, expected_volume(spec))
