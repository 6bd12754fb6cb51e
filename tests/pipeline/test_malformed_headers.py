"""Regression tests for what fuzzing found in selection, sorting and volume building
(docs/fuzzing.md): every malformed header ends as a PipelineError naming the rule (the
worker's failed-job reason), never as another exception."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from node.filemeta import PREAMBLE, encode_file_meta
from pipeline.errors import SeriesRejected, UnreadableDicom, VolumeError
from pipeline.headers import read_dicom
from pipeline.selection import select_series
from pipeline.volume import MAX_SOURCE_VOXELS, load_volume
from tests.helpers import fuzzing


def _file(ds: Dataset, data: bytes | None = None, syntax: str = ExplicitVRLittleEndian) -> bytes:
    meta = encode_file_meta(str(ds.SOPClassUID), str(ds.SOPInstanceUID), syntax,
                            fuzzing.FUZZ_ROOT + "0", "TEST")
    return PREAMBLE + meta + (fuzzing.encode(ds, syntax) if data is None else data)


def _write_series(folder: Path, change: Callable[[int, Dataset], bytes | None]) -> Path:
    """The 4-slice fuzz series; *change* may return other bytes for slice i's data set."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(fuzzing.SERIES_SLICES):
        ds = fuzzing.seed_dataset(i)
        data = change(i, ds)
        (folder / f"{i:02d}.dcm").write_bytes(_file(ds, data))
    return folder


def _replace(ds: Dataset, old: bytes, new: bytes) -> bytes:
    data = fuzzing.encode(ds, ExplicitVRLittleEndian)
    assert old in data
    return data.replace(old, new)


# Crash classes found by bench/fuzz.py before the fixes, each as one malformed data set.
UNREADABLE: dict[str, Callable[[Dataset], bytes]] = {
    # zlib.error escaped dcmread (selection caught only InvalidDicomError, OSError, ValueError)
    "broken deflate stream": lambda ds: b"\x00\x01\x02garbage",
    # RecursionError escaped dcmread
    "sequences nested 3000 deep": lambda ds: fuzzing.encode(ds, ExplicitVRLittleEndian)[:0]
    + fuzzing._nested(3000, little=True, defined=True, end=True)
    + fuzzing.encode(ds, ExplicitVRLittleEndian),
    # NotImplementedError (unknown VR) escaped on first access
    "unknown VR": lambda ds: _replace(ds, b"\x20\x00\x0e\x00UI", b"\x20\x00\x0e\x00TI"),
    # BytesLengthException escaped on first access
    "wrong VR for the length": lambda ds: _replace(ds, b"\x20\x00\x11\x00IS\x02\x002 ",
                                                   b"\x20\x00\x11\x00FL\x02\x002 "),
}


@pytest.mark.parametrize("name", sorted(UNREADABLE))
def test_unreadable_file_is_named_and_skipped(tmp_path: Path, name: str) -> None:
    syntax = DeflatedExplicitVRLittleEndian if name.startswith("broken deflate") else (
        ExplicitVRLittleEndian)
    ds = fuzzing.seed_dataset(0)
    path = tmp_path / "bad.dcm"
    path.write_bytes(_file(ds, UNREADABLE[name](ds), syntax))
    with pytest.raises(UnreadableDicom, match="bad.dcm"):
        read_dicom(path)
    # one bad file among good ones: skipped with a note; all bad: rejected with the reason
    folder = _write_series(tmp_path / "one", lambda i, ds: UNREADABLE[name](ds) if i == 0
                           else None)
    if syntax == DeflatedExplicitVRLittleEndian:
        (folder / "00.dcm").write_bytes(_file(ds, UNREADABLE[name](ds), syntax))
    selection = select_series(folder, fuzzing.pipeline_config().selection)
    assert selection.unreadable == ["00.dcm"] and len(selection.files) == 3
    for i in range(fuzzing.SERIES_SLICES):
        (tmp_path / "all").mkdir(exist_ok=True)
        other = fuzzing.seed_dataset(i)
        (tmp_path / "all" / f"{i}.dcm").write_bytes(_file(other, UNREADABLE[name](other),
                                                          syntax))
    with pytest.raises(SeriesRejected, match="not readable DICOM, e.g."):
        select_series(tmp_path / "all", fuzzing.pipeline_config().selection)


def _set_raw(keyword_bytes: bytes, new_value: bytes, vr: bytes) -> Callable[[int, Dataset], bytes]:
    """Replace one element (found by its tag bytes) with *vr* and *new_value*."""
    def change(i: int, ds: Dataset) -> bytes:
        data = fuzzing.encode(ds, ExplicitVRLittleEndian)
        at = data.index(keyword_bytes)
        length = struct.unpack("<H", data[at + 6:at + 8])[0]
        return (data[:at] + keyword_bytes + vr + struct.pack("<H", len(new_value)) + new_value
                + data[at + 8 + length:])
    return change


def test_malformed_geometry_values_name_the_attribute(tmp_path: Path) -> None:
    """sorting.slices_from_dataset raised TypeError (int() of a two-valued Rows) and
    ValueError (float() of a text RescaleSlope); selection reports them per series."""
    config = fuzzing.pipeline_config()
    rows = _write_series(tmp_path / "rows", _set_raw(b"\x28\x00\x10\x00",
                                                     b"\x08\x00\x08\x00", b"US"))
    with pytest.raises(SeriesRejected, match="Rows is not a single number"):
        load_volume(rows, config)
    slope = _write_series(tmp_path / "slope", _set_raw(b"\x28\x00\x53\x10", b"x ", b"LO"))
    with pytest.raises(SeriesRejected, match="RescaleSlope is not a single number"):
        load_volume(slope, config)


def test_pixel_padding_value_that_is_not_an_integer(tmp_path: Path) -> None:
    """volume._pixel_header raised ValueError (int() of a text PixelPaddingValue)."""
    def change(i: int, ds: Dataset) -> bytes:
        ds.PixelPaddingValue = 0
        ds["PixelPaddingValue"].VR = "SS"
        data = fuzzing.encode(ds, ExplicitVRLittleEndian)
        return data.replace(b"\x28\x00\x20\x01SS\x02\x00\x00\x00",
                            b"\x28\x00\x20\x01SH\x02\x00\x01 ")
    folder = _write_series(tmp_path / "s", change)
    with pytest.raises(VolumeError, match="PixelPaddingValue is not an integer"):
        load_volume(folder, fuzzing.pipeline_config())


def test_pixel_data_longer_than_the_header_says(tmp_path: Path) -> None:
    def change(i: int, ds: Dataset) -> None:
        ds.Rows = ds.Columns = 4  # the data holds 8 x 8
        return None
    folder = _write_series(tmp_path / "s", change)
    with pytest.raises(VolumeError, match="Pixel Data has 128 bytes, the header implies 32"):
        load_volume(folder, fuzzing.pipeline_config())


def test_empty_pixel_data_element(tmp_path: Path) -> None:
    """Found by bench/fuzz.py in the length check itself: an empty Pixel Data reads as None."""
    def change(i: int, ds: Dataset) -> None:
        ds.PixelData = b""
        return None
    folder = _write_series(tmp_path / "s", change)
    with pytest.raises(VolumeError, match="Pixel Data has 0 bytes, the header implies 128"):
        load_volume(folder, fuzzing.pipeline_config())


def test_volume_too_large_for_memory_is_refused_before_allocating(tmp_path: Path) -> None:
    def change(i: int, ds: Dataset) -> None:
        ds.Rows = ds.Columns = 65535
        return None
    folder = _write_series(tmp_path / "s", change)
    assert fuzzing.SERIES_SLICES * 65535 * 65535 > MAX_SOURCE_VOXELS
    with pytest.raises(VolumeError, match="is not a volume we can build"):
        load_volume(folder, fuzzing.pipeline_config())


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns on every malformed value
def test_quick_fuzz_loop_raises_only_pipeline_errors() -> None:
    """A fixed-seed sample of bench/fuzz.py's pipeline harness (the full run is 10,000)."""
    with fuzzing.PipelineTarget() as target:
        for choices in fuzzing.iterate(seed=8, count=150):
            target.run(fuzzing.mutate_series(choices))
        assert sum(target.outcomes.values()) == 150
        assert set(target.outcomes) <= {"volume", "SeriesRejected", "VolumeError"}
        assert target.outcomes.get("volume", 0) and target.outcomes.get("SeriesRejected", 0)

