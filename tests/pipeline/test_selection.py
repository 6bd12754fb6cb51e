"""Series selection on synthetic studies (headers only)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from pydicom import uid as dcm_uid

from pipeline.config import SelectionConfig
from pipeline.errors import SeriesRejected
from pipeline.selection import select_series
from tests.pipeline.ctfactory import (
    SeriesSpec,
    make_uid,
    write_dose_capture,
    write_dose_sr,
    write_enhanced_ct,
    write_localizer,
    write_series,
)

SMALL = {"rows": 8, "cols": 8, "n_slices": 10}


def _study(tmp_path: Path) -> tuple[Path, dict[str, SeriesSpec]]:
    base = SeriesSpec(**SMALL)  # type: ignore[arg-type]
    specs = {
        "soft": replace(base, series_description="Head 5mm H30s", kernel="H30s", series_number=2),
        "bone": replace(base, series_description="Head 5mm bone", kernel="H70h", series_number=3,
                        series_uid=make_uid()),
        "scout": replace(base, series_uid=make_uid(), series_number=1),
        "dose": replace(base, series_uid=make_uid(), series_number=99),
        "dose_sc": replace(base, series_uid=make_uid(), series_number=98),
    }
    write_series(tmp_path, specs["soft"])
    write_series(tmp_path, specs["bone"])
    write_localizer(tmp_path, specs["scout"])
    write_dose_sr(tmp_path, specs["dose"])
    write_dose_capture(tmp_path, specs["dose_sc"])
    (tmp_path / "README.txt").write_text("not DICOM")
    return tmp_path, specs


def test_study_selects_soft_tissue_and_explains_the_rest(tmp_path: Path) -> None:
    folder, specs = _study(tmp_path)
    result = select_series(folder, SelectionConfig())
    assert result.series_uid == specs["soft"].series_uid
    assert len(result.files) == 10
    reasons = {s.series_uid: s.reason for s in result.skipped}
    assert set(reasons) == {specs[k].series_uid for k in ("bone", "scout", "dose", "dose_sc")}
    assert "soft-tissue kernel preferred" in reasons[specs["bone"].series_uid]
    assert "LOCALIZER" in reasons[specs["scout"].series_uid]
    assert "X-Ray Radiation Dose SR" in reasons[specs["dose"].series_uid]
    assert "Secondary Capture" in reasons[specs["dose_sc"].series_uid]
    assert result.unreadable == ["README.txt"]
    assert result.to_dict()["files"][0].endswith(".dcm")


def test_ranking_original_thickness_and_slices(tmp_path: Path) -> None:
    base = SeriesSpec(**SMALL)  # type: ignore[arg-type]
    derived = replace(base, image_type=("DERIVED", "SECONDARY", "MPR"), series_uid=make_uid())
    thin = replace(base, thickness=0.625, slice_spacing=0.625, n_slices=40,
                   series_uid=make_uid())
    five = replace(base, series_uid=make_uid())
    for s in (derived, thin, five):
        write_series(tmp_path, s)
    result = select_series(tmp_path, SelectionConfig())
    assert result.series_uid == five.series_uid
    reasons = {s.series_uid: s.reason for s in result.skipped}
    assert "ORIGINAL is preferred" in reasons[derived.series_uid]
    assert "thickness closer to 5 mm" in reasons[thin.series_uid]
    thin_pref = select_series(tmp_path, SelectionConfig(preferred_slice_thickness_mm=0.6))
    assert thin_pref.series_uid == thin.series_uid


def test_rules_skip_with_reasons(tmp_path: Path) -> None:
    base = SeriesSpec(**SMALL)  # type: ignore[arg-type]
    bad = {
        "coronal": replace(base, row_cosine=(1.0, 0.0, 0.0), col_cosine=(0.0, 0.0, -1.0),
                           series_uid=make_uid()),
        "chest": replace(base, body_part="CHEST", study_description="CT THORAX",
                         series_description="Lung 5mm", series_uid=make_uid()),
        "thick": replace(base, thickness=12.0, slice_spacing=12.0, series_uid=make_uid()),
        "few": replace(base, n_slices=4, series_uid=make_uid()),
        "ours": replace(base, manufacturer="ICH-Node", series_uid=make_uid()),
        "mr": replace(base, modality="MR", series_uid=make_uid()),
    }
    for s in bad.values():
        write_series(tmp_path, s)
    with pytest.raises(SeriesRejected) as err:
        select_series(tmp_path, SelectionConfig())
    msg = str(err.value)
    assert "not axial: coronal" in msg
    assert "not recognised as a head CT" in msg and "CHEST" in msg
    assert "slice thickness 12 mm outside" in msg
    assert "only 4 slice(s)" in msg
    assert "our own result" in msg
    assert "modality 'MR'" in msg
    assert "PHANTOM" not in msg and "Phantom" not in msg  # no patient identifiers


def test_head_policy_and_tilted_series(tmp_path: Path) -> None:
    anon = SeriesSpec(body_part="", study_description="", series_description="", tilt_deg=20.0,
                      col_cosine=(0.0, 0.9396926207859084, 0.3420201433256687), **SMALL)  # type: ignore[arg-type]
    write_series(tmp_path, anon)
    assert select_series(tmp_path, SelectionConfig()).series_uid == anon.series_uid
    with pytest.raises(SeriesRejected, match="no body part or description"):
        select_series(tmp_path, SelectionConfig(head_policy="require"))


def test_mixed_stacks_in_one_series_choose_the_axial_one(tmp_path: Path) -> None:
    base = SeriesSpec(**SMALL)  # type: ignore[arg-type]
    axial = write_series(tmp_path, base)
    write_series(tmp_path / "cor", replace(base, row_cosine=(1.0, 0.0, 0.0),
                                           col_cosine=(0.0, 0.0, -1.0)))
    result = select_series(tmp_path, SelectionConfig())
    assert result.files == sorted(axial)
    assert any("stack 2 of 2" in s.reason and "not axial" in s.reason for s in result.skipped)


def test_enhanced_ct_and_localizer_inside_series(tmp_path: Path) -> None:
    base = SeriesSpec(**SMALL)  # type: ignore[arg-type]
    path = write_enhanced_ct(tmp_path, base)
    write_localizer(tmp_path, base)  # same series UID: left out instance by instance
    result = select_series(tmp_path, SelectionConfig())
    assert result.files == [path]
    assert any("LOCALIZER" in n for n in result.notes)


def test_dose_only_study_is_rejected(tmp_path: Path) -> None:
    base = SeriesSpec(**SMALL)  # type: ignore[arg-type]
    write_localizer(tmp_path, base)
    write_dose_sr(tmp_path, replace(base, series_uid=make_uid()))
    with pytest.raises(SeriesRejected, match="no series qualifies"):
        select_series(tmp_path, SelectionConfig())
    with pytest.raises(SeriesRejected, match="no DICOM instances"):
        select_series(tmp_path / "nothing", SelectionConfig())


@pytest.mark.parametrize(("kernel", "kind"), [
    ("BONE", "bone"), ("H70h", "bone"), ("FC30", "bone"), ("YC", "bone"), ("Br64", "bone"),
    ("STANDARD", "soft"), ("SOFT", "soft"), ("H30s", "soft"), ("J40s", "soft"),
    ("FC21", "soft"), ("UB", "soft"), ("Hr38\\3", "soft"), ("XYZ", "unknown"),
])
def test_kernel_patterns(tmp_path: Path, kernel: str, kind: str) -> None:
    spec = SeriesSpec(kernel=kernel, transfer_syntax=dcm_uid.ExplicitVRLittleEndian, **SMALL)  # type: ignore[arg-type]
    write_series(tmp_path, spec)
    result = select_series(tmp_path, SelectionConfig())
    assert f"{kind} kernel" in result.reasons[0]
