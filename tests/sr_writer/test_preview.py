"""Preview images: readable banner, visible outlines, PNG-renderable pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import dcmread

from pipeline.findings import SUBTYPE_CODE
from sr_writer.config import ResultsConfig
from sr_writer.preview import key_slices, orientation_letter
from tests.sr_writer.conftest import Case

BANNER_RED = (150, 0, 0)
BANNER_GREEN = (20, 70, 20)


def pixels(path: Path) -> np.ndarray:
    ds = dcmread(path)
    assert ds.PhotometricInterpretation == "RGB" and ds.SamplesPerPixel == 3
    arr = ds.pixel_array
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
    return np.asarray(arr)


def as_png(arr: np.ndarray, path: Path) -> Path:
    Image.fromarray(arr, mode="RGB").save(path)
    return path


def test_key_images_show_banner_and_outlines(positive: Case, tmp_path: Path) -> None:
    cfg = ResultsConfig()
    paths = [p for p, ds in zip(positive.files, positive.results, strict=True)
             if ds.Modality == "OT"]
    slices = key_slices(positive.findings, cfg.max_key_images)
    assert len(paths) == 1 + len(slices)
    for path, k in zip(paths[1:], slices, strict=True):
        arr = pixels(path)
        assert arr.shape[1] == cfg.preview_width_px
        assert tuple(arr[2, 2]) == BANNER_RED
        banner = arr[:40]
        assert np.count_nonzero(np.all(banner == 255, axis=-1)) > 500  # white text
        for subtype, code in SUBTYPE_CODE.items():
            color = np.asarray(cfg.segment_colors[subtype], dtype=np.uint8)
            outline = np.count_nonzero(np.all(arr == color, axis=-1))
            if np.any(positive.findings.mask[k] == code):
                assert outline > 100, subtype  # a visible outline (plus the legend swatch)
            else:
                assert outline == 0, subtype
        png = as_png(arr, tmp_path / f"key_{k}.png")
        assert Image.open(png).size == (arr.shape[1], arr.shape[0])


def test_summary_pages(positive: Case, negative: Case, tmp_path: Path) -> None:
    pos = pixels(positive.file_of("OT"))
    neg = pixels(negative.file_of("OT"))
    assert tuple(pos[2, 2]) == BANNER_RED
    assert tuple(neg[2, 2]) == BANNER_GREEN
    for arr, name in ((pos, "positive"), (neg, "negative")):
        assert arr.shape[1] == ResultsConfig().preview_width_px
        assert arr.shape[0] >= arr.shape[1]
        as_png(arr, tmp_path / f"summary_{name}.png")


def test_preview_header(positive: Case) -> None:
    for ds in positive.by_modality("OT"):
        back = dcmread(positive.files[positive.results.index(ds)])
        assert back.BurnedInAnnotation == "YES"
        assert back.ConversionType == "WSD"
        assert list(back.PatientOrientation) == ["L", "P"]
        assert back.BodyPartExamined == "HEAD"
        assert "Not for diagnostic use" in back.ImageComments


def test_orientation_letters() -> None:
    assert orientation_letter((1.0, 0.0, 0.0)) == "L"
    assert orientation_letter((-1.0, 0.0, 0.0)) == "R"
    assert orientation_letter((0.0, 0.9, -0.1)) == "P"
    assert orientation_letter((0.1, 0.0, -1.0)) == "F"
