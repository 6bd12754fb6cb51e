"""node.dsheader: the short header scan gives pydicom's values, or declines.

The C-STORE handler trusts :func:`node.dsheader.scan_header` for the UIDs that name a
spooled file and for the pixel-data size check, so every answer it gives must equal
what pydicom reads from the same bytes; where the bytes are unusual it must answer None
(the handler then parses with pydicom).
"""

from __future__ import annotations

import random
from io import BytesIO

import pytest
from pydicom import Dataset
from pydicom.filereader import read_dataset
from pydicom.sequence import Sequence
from pynetdicom.dsutils import encode

from node.dsheader import PIXEL_TAGS, WANTED, scan_header


def _pydicom_view(data: bytes, implicit: bool) -> tuple[dict[str, object], int | None]:
    """What the handler's pydicom path reads: the wanted values and the pixel length."""
    found: list[int] = []

    def at_pixels(tag: int, vr: str | None, length: int) -> bool:
        if tag in PIXEL_TAGS:
            found.append(length)
            return True
        return False

    ds = read_dataset(BytesIO(data), implicit, True, stop_when=at_pixels)
    values: dict[str, object] = {}
    for keyword, kind in WANTED.values():
        if keyword not in ds:
            continue
        value = ds.get(keyword)
        if kind == "ui":
            values[keyword] = str(value).strip()
        elif kind == "is":
            values[keyword] = None if value in (None, "") else int(value)
        else:
            values[keyword] = int(value)
    return values, (found[0] if found else None)


def _item(depth: int, undefined: bool) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    item.ReferencedSOPInstanceUID = f"1.2.3.{depth}"
    # A nested element with a wanted tag must not be taken for the top-level one.
    item.SOPInstanceUID = "9.9.9.9"
    item.Rows = 7
    if depth < 3:
        item.ReferencedImageSequence = Sequence([_item(depth + 1, undefined)])
        item["ReferencedImageSequence"].is_undefined_length = undefined
        for sub in item.ReferencedImageSequence:
            sub.is_undefined_length_sequence_item = undefined
    return item


def _dataset(*, undefined: bool = False, frames: str | None = "1", pixels: bool = True,
             private: bool = True) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.2.1125.7.1"  # odd length: padded with \0
    ds.StudyDate = "20261122"
    ds.PatientName = "TEST^HEADER"
    ds.ReferencedImageSequence = Sequence([_item(1, undefined), _item(2, undefined)])
    ds["ReferencedImageSequence"].is_undefined_length = undefined
    for item in ds.ReferencedImageSequence:
        item.is_undefined_length_sequence_item = undefined
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.2.1125.7.2"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.2.1125.7.30"
    if private:
        block = ds.private_block(0x0009, "ICH TEST", create=True)
        block.add_new(0x01, "LO", "private value")
        block.add_new(0x02, "OB", b"\x01\x02\x03\x04")
    ds.SamplesPerPixel = 1
    if frames is not None:
        ds.NumberOfFrames = frames
    ds.Rows = 16
    ds.Columns = 12
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    if pixels:
        ds.PixelData = b"\x00\x01" * (16 * 12)
    return ds


CASES = {
    "defined lengths": {},
    "undefined-length sequences, nested": {"undefined": True},
    "empty NumberOfFrames": {"frames": ""},
    "no NumberOfFrames": {"frames": None},
    "no pixel data": {"pixels": False},
    "no private block": {"private": False},
}


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
@pytest.mark.parametrize("case", list(CASES))
def test_scan_equals_pydicom(case: str, implicit: bool) -> None:
    data = encode(_dataset(**CASES[case]), implicit, True)
    assert data is not None
    scan = scan_header(data, implicit)
    assert scan is not None, "a plain data set must not need pydicom"
    values, pixel_length = _pydicom_view(data, implicit)
    assert scan.values == values
    assert scan.pixel_length == pixel_length
    assert scan.values["SOPInstanceUID"] == "1.2.826.0.1.3680043.2.1125.7.1"
    assert scan.values["Rows"] == 16


def test_encapsulated_pixel_data_reports_undefined_length() -> None:
    ds = _dataset()
    del ds.PixelData
    data = encode(ds, False, True)
    assert data is not None
    # (7FE0,0010) OB, undefined length, then an empty offset table item and a delimiter.
    data += (b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff"
             b"\xfe\xff\x00\xe0\x00\x00\x00\x00\xfe\xff\xdd\xe0\x00\x00\x00\x00")
    scan = scan_header(data, False)
    assert scan is not None and scan.pixel_length == 0xFFFFFFFF


def test_unusual_bytes_are_left_to_pydicom() -> None:
    base = encode(_dataset(undefined=True, pixels=False), False, True)
    assert base is not None
    assert scan_header(base, False) is not None
    # A value length that runs past the end, an unknown VR, a stray item tag, a
    # multi-valued US: the scan declines each.
    assert scan_header(base + b"\x10\x00\x10\x00PN\xff\x7f", False) is None
    assert scan_header(b"\x08\x00\x18\x00ZZ\x02\x001.", False) is None
    assert scan_header(b"\xfe\xff\x00\xe0\x00\x00\x00\x00", False) is None
    assert scan_header(b"\x28\x00\x10\x00US\x04\x00\x10\x00\x10\x00", False) is None


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
def test_damaged_bytes_never_give_a_wrong_answer(implicit: bool) -> None:
    """Truncate and flip bytes at random: the scan declines, or agrees with pydicom
    wherever pydicom reads the same bytes without error."""
    base = encode(_dataset(undefined=True), implicit, True)
    assert base is not None
    rng = random.Random(20261122)
    answered = 0
    for _ in range(400):
        data = bytearray(base)
        if rng.random() < 0.5:
            del data[rng.randrange(1, len(data)):]
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        scan = scan_header(bytes(data), implicit)
        if scan is None:
            continue
        try:
            values, pixel_length = _pydicom_view(bytes(data), implicit)
        except Exception:  # pydicom refuses bytes the scan read: the scan's values stand
            continue  # alone, and the handler's own checks (UID shape, sizes) still apply
        answered += 1
        assert scan.values == values
        assert scan.pixel_length == pixel_length
    assert answered > 50  # most damage lands in values the scan skips
