"""Slice ordering and geometry checks on header records (no files, fast)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from pipeline.config import VolumeConfig
from pipeline.errors import VolumeError
from pipeline.sorting import SliceInfo, plan_stack, slices_from_dataset, split_stacks

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def make_slice(z: float, k: int = 0, *, x: float = 0.0, y: float = 0.0,
               orientation: tuple[float, ...] = AXIAL, rows: int = 4, **kw: object) -> SliceInfo:
    base = SliceInfo(
        path=Path(f"s{k}.dcm"), frame=None, sop_uid=f"1.2.3.{k}", position=(x, y, z),
        orientation=orientation,  # type: ignore[arg-type]
        pixel_spacing=(0.5, 0.5), rows=rows, cols=4, slope=1.0, intercept=0.0, thickness=5.0,
        acquisition_number=1, instance_number=k + 1, created="", content="",
        frame_of_reference_uid="1.2.3", gantry_tilt_deg=None)
    return replace(base, **kw)  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 30), spacing=st.floats(0.5, 10.0), data=st.data())
def test_order_depends_on_positions_only(n: int, spacing: float, data: st.DataObject) -> None:
    slices = [make_slice(10.0 + k * spacing, k) for k in range(n)]
    perm = data.draw(st.permutations(slices))
    numbers = data.draw(st.lists(st.integers(1, 999), min_size=n, max_size=n))
    shuffled = [replace(s, instance_number=i) for s, i in zip(perm, numbers, strict=True)]
    plan = plan_stack(shuffled, VolumeConfig())
    assert [s.sop_uid for s in plan.sources] == [s.sop_uid for s in slices]
    assert plan.spacing[2] == pytest.approx(spacing)
    assert not plan.resampled and not plan.sheared and plan.dropped == []


def test_normal_follows_the_cross_product() -> None:
    # Column cosine (0, -1, 0): normal is (0, 0, -1); ascending along it = descending z.
    ori = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0)
    plan = plan_stack([make_slice(5.0 * k, k, orientation=ori) for k in range(5)], VolumeConfig())
    assert [s.position[2] for s in plan.sources] == [20.0, 15.0, 10.0, 5.0, 0.0]
    assert plan.direction[8] == -1.0 and plan.origin[2] == 20.0


def test_duplicate_rules() -> None:
    base = [make_slice(5.0 * k, k, created="20240601120000") for k in range(4)]
    older = make_slice(5.0, 10, created="20240101000000")
    newer = make_slice(10.0, 11, created="20991231235959")
    later_acq = make_slice(15.0, 12, acquisition_number=2, instance_number=1)
    same = make_slice(0.0, 0, created="20240601120000")
    plan = plan_stack(base + [older, newer, later_acq, same], VolumeConfig())
    assert [s.sop_uid for s in plan.sources] == ["1.2.3.0", "1.2.3.1", "1.2.3.11", "1.2.3.12"]
    reasons = {d.sop_uid: d.reason for d in plan.dropped}
    assert reasons["1.2.3.10"].startswith("duplicate position 5.000 mm; kept 1.2.3.1")
    assert "same instance received twice" in reasons["1.2.3.0"]
    assert len(plan.dropped) == 4


def test_gaps_filled_or_rejected() -> None:
    z = [0.0, 5.0, 10.0, 25.0, 30.0]  # 15 mm gap: two slices missing
    slices = [make_slice(v, k) for k, v in enumerate(z)]
    plan = plan_stack(slices, VolumeConfig())
    assert [t.kind for t in plan.targets] == ["source"] * 3 + ["filled"] * 2 + ["source"] * 2
    assert [t.sop_uid for t in plan.targets][3:5] == [None, None]
    assert plan.gaps[0].gap_mm == pytest.approx(15.0) and plan.gaps[0].filled == 2
    assert plan.targets[4].weight == pytest.approx(2 / 3)
    with pytest.raises(VolumeError, match="missing slices.*15.00 mm after 1.2.3.2"):
        plan_stack(slices, VolumeConfig(missing_slices="reject"))


@pytest.mark.parametrize("tilt", [5.0, 25.0, -15.0])
def test_tilt_detected_from_geometry(tilt: float) -> None:
    t = math.tan(math.radians(tilt))
    slices = [make_slice(5.0 * k, k, y=5.0 * k * t) for k in range(6)]
    plan = plan_stack(slices, VolumeConfig())
    assert plan.tilt_deg == pytest.approx(abs(tilt))
    np.testing.assert_allclose(plan.shifts_px[:, 0], [10.0 * k * t for k in range(6)])
    np.testing.assert_allclose(plan.shifts_px[:, 1], 0.0, atol=1e-12)
    assert any("GantryDetectorTilt is absent" in n for n in plan.notes)
    with pytest.raises(VolumeError, match="max_tilt_deg"):
        plan_stack(slices, VolumeConfig(max_tilt_deg=abs(tilt) / 2))


def test_tilt_tag_without_shear_is_only_noted() -> None:
    slices = [make_slice(5.0 * k, k, gantry_tilt_deg=12.0) for k in range(4)]
    plan = plan_stack(slices, VolumeConfig())
    assert not plan.sheared
    assert any("already on an orthogonal grid" in n for n in plan.notes)


def test_mixed_stacks_and_bad_cosines() -> None:
    axial = [make_slice(5.0 * k, k) for k in range(5)]
    coronal = [make_slice(0.0, 20 + k, y=float(k), orientation=(1.0, 0, 0, 0, 0, -1.0))
               for k in range(2)]
    big = [make_slice(2.5, 30, rows=8)]
    assert [len(s) for s in split_stacks(axial + coronal + big, 1e-3)] == [5, 2, 1]
    plan = plan_stack(axial + coronal + big, VolumeConfig())
    assert len(plan.sources) == 5 and len(plan.dropped) == 3
    with pytest.raises(VolumeError, match="mixes 3"):
        plan_stack(axial + coronal + big, VolumeConfig(mixed_geometry="reject"))
    skew = [make_slice(5.0 * k, k, orientation=(1.0, 0, 0, 0.5, 0.5, 0)) for k in range(3)]
    with pytest.raises(VolumeError, match="not unit and orthogonal"):
        plan_stack(skew, VolumeConfig())
    with pytest.raises(VolumeError, match="at least 2"):
        plan_stack([make_slice(0.0), make_slice(0.0)], VolumeConfig())
    single = plan_stack([make_slice(0.0)], VolumeConfig(min_slices=1))
    assert single.spacing[2] == 5.0


def test_enhanced_headers_per_frame_and_shared() -> None:
    ds = Dataset()
    ds.SOPInstanceUID = "1.2.3.9"
    ds.Rows, ds.Columns, ds.NumberOfFrames = 4, 4, 2
    shared = Dataset()
    ori, meas, pvt = Dataset(), Dataset(), Dataset()
    ori.ImageOrientationPatient = list(AXIAL)
    meas.PixelSpacing = [0.7, 0.6]
    meas.SliceThickness = 2.0
    pvt.RescaleSlope, pvt.RescaleIntercept = 1, -1024
    shared.PlaneOrientationSequence = DicomSequence([ori])
    shared.PixelMeasuresSequence = DicomSequence([meas])
    shared.PixelValueTransformationSequence = DicomSequence([pvt])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    frames = []
    for z in (4.0, 2.0):
        item, pos = Dataset(), Dataset()
        pos.ImagePositionPatient = [0.0, 0.0, z]
        item.PlanePositionSequence = DicomSequence([pos])
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    infos = slices_from_dataset(ds, Path("mf.dcm"))
    assert [i.position[2] for i in infos] == [4.0, 2.0]
    assert infos[1].frame == 1 and infos[1].intercept == -1024.0
    assert infos[0].pixel_spacing == (0.7, 0.6) and infos[0].thickness == 2.0
    plan = plan_stack(infos, VolumeConfig())
    assert [s.frame for s in plan.sources] == [1, 0]
    del frames[1].PlanePositionSequence
    with pytest.raises(VolumeError, match="frame 2: Plane Position"):
        slices_from_dataset(ds, Path("mf.dcm"))
    plain = Dataset()
    plain.SOPInstanceUID = "1.2.3.10"
    plain.ImageOrientationPatient = list(AXIAL)
    plain.PixelSpacing = [0.5, 0.5]
    with pytest.raises(VolumeError, match="ImagePositionPatient is missing"):
        slices_from_dataset(plain, Path("x.dcm"))
