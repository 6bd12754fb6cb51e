"""The SEG: read back by highdicom and dcmqi, voxel for voxel equal to the input mask."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.findings import SUBTYPE_CODE
from sr_writer import codes as result_codes
from sr_writer.config import ResultsConfig
from sr_writer.results import write_results
from tests.sr_writer.conftest import NOW, Case
from tests.sr_writer.factory import positive_case

SEGIMAGE2ITKIMAGE = Path(sys.executable).parent / "segimage2itkimage"


def subtype_of(seg: hd.seg.Segmentation, number: int) -> str:
    code = seg.get_segment_description(number).segmented_property_type
    for subtype, concept in result_codes.LABEL_CODES.items():
        if concept.value == code.value and concept.scheme_designator == code.scheme_designator:
            return subtype
    raise LookupError(code)


def test_segments_and_descriptions(positive: Case) -> None:
    seg = hd.seg.segread(positive.file_of("SEG"))
    assert seg.SegmentationType == "BINARY"
    assert seg.number_of_segments == 2
    assert [subtype_of(seg, n) for n in (1, 2)] == ["intraparenchymal", "subdural"]
    desc = seg.get_segment_description(2)
    assert desc.segmented_property_category.value == "49755003"
    assert desc.algorithm_type.value == "AUTOMATIC"
    assert desc.algorithm_identification is not None
    algo = desc.algorithm_identification[0]
    assert algo.AlgorithmName == "ich-demo"
    assert positive.findings.model.sha256[:12] in algo.AlgorithmVersion
    assert algo.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"
    lab = desc.RecommendedDisplayCIELabValue
    rgb = hd.color.CIELabColor.from_dicom_value(lab).to_rgb()
    assert np.allclose(rgb, ResultsConfig().segment_colors["subdural"], atol=2)
    assert seg.ContentCreatorName == "ICH^AI^NODE"
    assert seg.FrameOfReferenceUID == positive.headers[0].FrameOfReferenceUID


def test_frames_equal_mask_on_source_slices(positive: Case) -> None:
    """Every SEG frame is the mask of the CT slice it references; no segmented slice is
    missing."""
    seg = hd.seg.segread(positive.file_of("SEG"))
    pixels = seg.pixel_array  # (frames, rows, cols)
    slice_of = {uid: k for k, uid in enumerate(positive.volume.source_sop_uids)}
    seen = set()
    for f, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        src = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = slice_of[src]
        code = SUBTYPE_CODE[subtype_of(seg, number)]
        np.testing.assert_array_equal(pixels[f] > 0, positive.findings.mask[k] == code)
        seen.add((k, code))
    mask = positive.findings.mask
    expected = {(k, int(c)) for k in range(mask.shape[0]) for c in np.unique(mask[k]) if c}
    assert seen == expected


@pytest.mark.skipif(not SEGIMAGE2ITKIMAGE.exists(), reason="dcmqi (pip dcmqi) not installed")
def test_dcmqi_converts_seg_to_the_input_mask(positive: Case, tmp_path: Path) -> None:
    """dcmqi's segimage2itkimage reads the SEG; each segment, resampled onto the analysed
    grid in patient space, equals the input mask voxel for voxel."""
    proc = subprocess.run([str(SEGIMAGE2ITKIMAGE), "--inputDICOM", str(positive.file_of("SEG")),
                           "--outputDirectory", str(tmp_path), "--outputType", "nifti"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    meta = json.loads((tmp_path / "meta.json").read_text())
    labels = {}
    for group in meta["segmentAttributes"]:
        for attrs in group:
            labels[attrs["SegmentLabel"]] = attrs
    assert set(labels) == {"Intraparenchymal hemorrhage", "Subdural hemorrhage"}
    assert labels["Subdural hemorrhage"]["recommendedDisplayRGBValue"] == [255, 0, 255]
    reference = positive.volume.image
    for number, subtype in ((1, "intraparenchymal"), (2, "subdural")):
        nifti = sitk.ReadImage(str(tmp_path / f"{number}.nii.gz"))  # RAS on disk, LPS here
        on_grid = sitk.Resample(nifti, reference, sitk.Transform(), sitk.sitkNearestNeighbor,
                                0, sitk.sitkUInt8)
        got = sitk.GetArrayFromImage(on_grid) > 0
        np.testing.assert_array_equal(got, positive.findings.mask == SUBTYPE_CODE[subtype])


def test_tilted_series_seg_lies_on_the_source_frames(tmp_path: Path) -> None:
    """After gantry-tilt correction the SEG still references the source instances and
    every segmented pixel sits, in patient space, on a voxel of the analysed mask."""
    headers, volume, findings = positive_case(tmp_path / "series", tilt_deg=15.0,
                                              gantry_tilt_tag=15.0)
    assert volume.report.tilt_corrected
    results = write_results(headers, volume, findings, ResultsConfig(), now=NOW)
    seg = next(ds for ds in results if ds.Modality == "SEG")
    seg_path = tmp_path / "seg.dcm"
    seg.save_as(seg_path, enforce_file_format=True)
    seg = hd.seg.segread(seg_path)
    sources = {h.SOPInstanceUID: h for h in headers}
    image = volume.image
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    to_index = np.linalg.inv(direction * np.asarray(image.GetSpacing())[None, :])
    pixels = seg.pixel_array
    checked = 0
    for f, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        src = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        ipp = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        np.testing.assert_allclose(ipp, np.asarray(sources[src].ImagePositionPatient, float))
        code = SUBTYPE_CODE[subtype_of(seg, int(
            item.SegmentIdentificationSequence[0].ReferencedSegmentNumber))]
        rows, cols = np.nonzero(pixels[f])
        iop = np.asarray(sources[src].ImageOrientationPatient, dtype=float)
        dy, dx = (float(v) for v in sources[src].PixelSpacing)
        pts = ipp + cols[:, None] * dx * iop[:3] + rows[:, None] * dy * iop[3:]
        idx = np.rint((pts - np.asarray(image.GetOrigin())) @ to_index.T).astype(int)
        assert np.all(findings.mask[idx[:, 2], idx[:, 1], idx[:, 0]] == code)
        checked += len(rows)
    assert checked > 0
    sr = results[0]
    texts = [getattr(item, "TextValue", "") for item in sr.ContentSequence[-1].ContentSequence]
    assert any("tilt" in t.lower() for t in texts)


def test_negative_writes_no_seg(negative: Case) -> None:
    assert not negative.by_modality("SEG")



def dcmqi_segments(seg_path: Path, out_dir: Path) -> dict[int, sitk.Image]:
    """segimage2itkimage's NIfTI per segment number."""
    out_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([str(SEGIMAGE2ITKIMAGE), "--inputDICOM", str(seg_path),
                           "--outputDirectory", str(out_dir), "--outputType", "nifti"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {int(p.name.split(".")[0]): sitk.ReadImage(str(p))
            for p in out_dir.glob("*.nii.gz")}


@pytest.mark.skipif(not SEGIMAGE2ITKIMAGE.exists(), reason="dcmqi (pip dcmqi) not installed")
def test_enhanced_ct_source_gets_a_multiframe_reference(tmp_path: Path) -> None:
    """One Enhanced CT instance (frames stored top-down): the SEG references its frames by
    number and dcmqi still reproduces the mask."""
    from pydicom import dcmread

    from pipeline.config import VolumeConfig
    from pipeline.volume import build_volume
    from tests.pipeline.ctfactory import write_enhanced_ct
    from tests.sr_writer.factory import bleed_mask, findings_for, head_spec, with_blood

    path = write_enhanced_ct(tmp_path / "series", head_spec())
    volume = build_volume([path], VolumeConfig())
    mask = bleed_mask(volume)
    findings = findings_for(volume, mask)
    results = write_results([dcmread(path, stop_before_pixels=True)],
                            with_blood(volume, mask), findings, ResultsConfig(), now=NOW)
    assert [ds.Modality for ds in results] == ["SR", "SEG", "OT", "OT", "OT"]
    seg_path = tmp_path / "seg.dcm"
    results[1].save_as(seg_path, enforce_file_format=True)
    seg = hd.seg.segread(seg_path)
    n = volume.hu.shape[0]
    pixels = seg.pixel_array
    for f, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        src = item.DerivationImageSequence[0].SourceImageSequence[0]
        k = n - int(src.ReferencedFrameNumber)  # the factory stores frames top-down
        code = SUBTYPE_CODE[subtype_of(seg, int(
            item.SegmentIdentificationSequence[0].ReferencedSegmentNumber))]
        np.testing.assert_array_equal(pixels[f] > 0, mask[k] == code)
    for number, image in dcmqi_segments(seg_path, tmp_path / "dcmqi").items():
        on_grid = sitk.Resample(image, volume.image, sitk.Transform(),
                                sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        code = SUBTYPE_CODE[subtype_of(seg, number)]
        np.testing.assert_array_equal(sitk.GetArrayFromImage(on_grid) > 0, mask == code)
    key = results[3]
    frame = int(key.SourceImageSequence[0].ReferencedFrameNumber)
    assert n - frame == min(les.largest_slice for les in findings.lesions)


def test_gap_filled_series_without_slice_thickness(tmp_path: Path) -> None:
    """A gap filled by interpolation and no SliceThickness: the SEG references only real
    instances, the SR says what was done, and dciodvfy finds no error."""
    z_mm = (0, 5, 10, 15, 20, 30, 35, 40, 45, 50, 55)
    headers, volume, findings = positive_case(tmp_path / "series", z_mm=z_mm, thickness=None)
    assert volume.report.filled_slices == [5]
    results = write_results(headers, volume, findings, ResultsConfig(), now=NOW)
    seg = results[1]
    referenced = {item.DerivationImageSequence[0].SourceImageSequence[0]
                  .ReferencedSOPInstanceUID for item in seg.PerFrameFunctionalGroupsSequence}
    assert referenced <= {h.SOPInstanceUID for h in headers}
    texts = [str(getattr(item, "TextValue", ""))
             for item in results[0].ContentSequence[-1].ContentSequence]
    assert any("filled by linear interpolation" in t for t in texts)
    assert any("SliceThickness" in t for t in texts)
    from tests.sr_writer.test_validators import DCIODVFY, dciodvfy_errors
    if DCIODVFY is None:
        pytest.skip("dciodvfy is not installed")
    for k, ds in enumerate(results):
        path = tmp_path / f"{k}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(str(path)) == [], ds.Modality
