"""Fuzzing inputs and targets, shared by ``bench/fuzz.py`` (atheris, coverage-guided) and
the quick fixed-seed loop of ``tests/faults/test_fuzz_quick.py`` (docs/fuzzing.md).

Inputs are made from small valid CT instances (:func:`seed_datasets`) by
*structure-aware* mutations (:func:`mutate_instance`): wrong values in the image pixel
and plane modules, wrong VRs, wrong, odd, undefined or huge length fields, oversized
values, deleted, duplicated or reordered elements, deeply nested sequences, items that
never end, truncation and byte flips. Every choice is read from a :class:`Choices`
(atheris' FuzzedDataProvider, or a seeded ``random.Random``), so the coverage-guided
fuzzer explores the mutations themselves.

A target runs one input through the node's own code and enforces its contract; a
*crash* is any exception that escapes the target (the contract is broken), see
``docs/fuzzing.md``:

- :class:`StoreTarget`: ``node.handlers.handle_store`` with a real ``DiskSpool``; the
  status must be one of the documented C-STORE statuses, and a Success must leave the
  received bytes in the spool under a safe name, readable by ``read_header``.
- :class:`PipelineTarget`: ``pipeline.volume.load_volume`` (selection, sorting, volume)
  on a small series with mutated files; it returns a volume or raises a
  ``PipelineError`` naming the rule (the worker's failed-job reason). Anything else
  escaping is a crash.
- :class:`PduTarget`: raw PDU byte streams sent to a running node; the node must answer
  or close the connection, free the association, and still answer a C-ECHO.
"""

from __future__ import annotations

import io
import random
import shutil
import socket
import struct
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pydicom import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from tests.helpers.ctseries import make_ct_slice

FUZZ_ROOT = "1.2.826.0.1.3680043.8.498.96."
STUDY_UID = FUZZ_ROOT + "1"
SERIES_UID = FUZZ_ROOT + "2"
FRAME_UID = FUZZ_ROOT + "3"
SERIES_SLICES = 4
ROWS = 8

SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
            ExplicitVRBigEndian)


class FuzzContractError(AssertionError):
    """A target's contract was broken (a crash, as docs/fuzzing.md defines it)."""


class Choices(Protocol):
    """Where the mutators read their decisions from."""

    def int(self, below: int) -> int:
        """An integer in ``[0, below)``."""
        ...

    def bytes(self, count: int) -> bytes:
        """Up to *count* bytes."""
        ...


class RandomChoices:
    """Choices from a seeded ``random.Random`` (the quick loop in the test suite)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def int(self, below: int) -> int:
        return self.rng.randrange(below) if below > 1 else 0

    def bytes(self, count: int) -> bytes:
        return self.rng.randbytes(self.rng.randrange(count + 1))


class ProviderChoices:
    """Choices from atheris' FuzzedDataProvider (coverage-guided)."""

    def __init__(self, provider: Any) -> None:
        self.fdp = provider

    def int(self, below: int) -> int:
        return int(self.fdp.ConsumeIntInRange(0, below - 1)) if below > 1 else 0

    def bytes(self, count: int) -> bytes:
        return bytes(self.fdp.ConsumeBytes(self.fdp.ConsumeIntInRange(0, count)))


# --------------------------------------------------------------------------- seeds


def seed_dataset(index: int = 0, n: int = SERIES_SLICES) -> Dataset:
    """One valid tiny CT slice (8x8, 16 bit) of the fuzz series."""
    ds = make_ct_slice(STUDY_UID, SERIES_UID, FRAME_UID, index, n, rows=ROWS)
    ds["PixelData"].VR = "OW"  # resolved here: mutations may delete BitsAllocated
    return ds


def encode(ds: Dataset, syntax: str) -> bytes:
    """The data set as a C-STORE carries it: no preamble or file meta, in *syntax*."""
    uid = ExplicitVRLittleEndian if syntax == DeflatedExplicitVRLittleEndian else syntax
    fp = DicomBytesIO()
    fp.is_little_endian = uid != ExplicitVRBigEndian
    fp.is_implicit_VR = uid == ImplicitVRLittleEndian
    write_dataset(fp, ds)
    raw = fp.getvalue()
    if syntax == DeflatedExplicitVRLittleEndian:
        compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        raw = compressor.compress(raw) + compressor.flush()
        raw += b"\x00" * (len(raw) % 2)
    return raw


def seed_datasets() -> list[tuple[str, bytes]]:
    """(transfer syntax, encoded data set) seeds: one valid slice in every syntax we
    fuzz, and one with a sequence (nested items exercise the sequence reader)."""
    seeds = [(str(ts), encode(seed_dataset(), ts)) for ts in SYNTAXES]
    with_seq = seed_dataset(1)
    item = Dataset()
    item.ReferencedSOPClassUID = CTImageStorage
    item.ReferencedSOPInstanceUID = FUZZ_ROOT + "9"
    with_seq.ReferencedImageSequence = [item]
    seeds.append((str(ExplicitVRLittleEndian), encode(with_seq, ExplicitVRLittleEndian)))
    return seeds


# --------------------------------------------------------------------------- mutators

# Semantic values: right VR and encoding, wrong meaning (the cases issue 8 lists).
_SEMANTIC: dict[str, list[Any]] = {
    "Rows": [0, 1, 65535, ROWS + 1, ROWS // 2],
    "Columns": [0, 1, 65535, ROWS * 3],
    "BitsAllocated": [0, 1, 7, 8, 12, 32, 64, 65535],
    "BitsStored": [0, 1, 17, 64, 65535],
    "HighBit": [0, 31, 65535],
    "PixelRepresentation": [0, 1, 2, 65535],
    "SamplesPerPixel": [0, 3, 65535],
    "NumberOfFrames": ["-1", "0", "2", "4294967296", "1e9", "abc", ""],
    "PhotometricInterpretation": ["MONOCHROME1", "RGB", "PALETTE COLOR", "", "YBR_FULL"],
    "ImagePositionPatient": [[0, 0], [0, 0, 0, 0], ["nan", 0, 0], [1e308, -1e308, 0], []],
    "ImageOrientationPatient": [[0, 0, 0, 0, 0, 0], [1, 0, 0, 1, 0, 0], [1, 0, 0],
                                [0, 0, 1, 0, 1, 0], ["inf", 0, 0, 0, 1, 0]],
    "PixelSpacing": [[0, 0], [-1, -1], [1], ["nan", 1], [1e-300, 1e300]],
    "SliceThickness": [0, -5, "nan", 1e308],
    "RescaleSlope": [0, -1, "nan", "inf", 1e308],
    "RescaleIntercept": ["nan", 1e308, -1e308],
    "PixelPaddingValue": [0, 65535, -1],
    "SeriesNumber": ["-1", "99999999999", "x"],
    "InstanceNumber": ["-1", "2147483648", "1.5"],
    "SOPClassUID": ["1.2.840.10008.5.1.4.1.1.7", "", "1.2.3"],
    "Modality": ["MR", "", "SR"],
    "ImageType": [["DERIVED", "SECONDARY", "LOCALIZER"], [], "ORIGINAL"],
    "PatientName": ["A" * (1024 * 1024), "^^^^", "=" * 64],
    "SpecificCharacterSet": ["ISO 2022 IR 87", "NOT_A_CHARSET", "ISO_IR 100\\ISO 2022 IR 149"],
    "GantryDetectorTilt": [90, -45, "nan"],
}
_DELETABLE = ("Rows", "Columns", "BitsAllocated", "PixelData", "ImagePositionPatient",
              "ImageOrientationPatient", "PixelSpacing", "SOPInstanceUID", "StudyInstanceUID",
              "SeriesInstanceUID", "SOPClassUID", "SamplesPerPixel", "RescaleSlope",
              "FrameOfReferenceUID", "PixelRepresentation", "PhotometricInterpretation")
_VRS = (b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT",
        b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST",
        b"SV", b"TM", b"UC", b"UI", b"UL", b"UN", b"UR", b"US", b"UT", b"UV", b"\x00\x00",
        b"zz")
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                       b"UR", b"UT", b"UV"})
_LENGTHS = (0, 1, 2, 3, 0xFFFE, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFE, 0xFFFFFFFF)


def _set(ds: Dataset, keyword: str, value: Any, raw: dict[int, bytes]) -> None:
    """Set *keyword*; a value pydicom refuses (e.g. 'x' for an IS) goes in *raw*, to be
    written as bytes after encoding."""
    try:
        setattr(ds, keyword, value)
    except (ValueError, TypeError, OverflowError):
        setattr(ds, keyword, None)
        text = "\\".join(map(str, value)) if isinstance(value, list) else str(value)
        raw[int(ds[keyword].tag)] = text.encode() + b" " * (len(text) % 2)
        return
    if " or " in ds[keyword].VR:  # e.g. PixelPaddingValue 'US or SS'
        ds[keyword].VR = "SS" if isinstance(value, int) and value < 0 else "US"


def mutate_semantics(ds: Dataset, choices: Choices, raw: dict[int, bytes]) -> None:
    """Right encoding, wrong meaning: one to four image module values changed or deleted,
    pixel data shortened or removed, the dimensions made to disagree. Values pydicom
    refuses to set are put in *raw* (tag: value bytes)."""
    for _ in range(1 + choices.int(4)):
        action = choices.int(4)
        if action == 0:
            keyword = sorted(_SEMANTIC)[choices.int(len(_SEMANTIC))]
            values = _SEMANTIC[keyword]
            _set(ds, keyword, values[choices.int(len(values))], raw)
        elif action == 1:
            keyword = _DELETABLE[choices.int(len(_DELETABLE))]
            if keyword in ds:
                del ds[keyword]
        elif action == 2 and "PixelData" in ds:
            data = ds.PixelData
            cut = choices.int(len(data) + 1)
            ds.PixelData = data[:cut] + b"\x00" * (cut % 2)
        elif action == 3:
            ds.NumberOfFrames = str([2, 3, 0, 100000][choices.int(4)])
            if choices.int(2):
                ds.PerFrameFunctionalGroupsSequence = [Dataset() for _ in range(choices.int(3))]


@dataclass
class _Element:
    tag: int
    raw: bytes  # the whole encoded element: tag, VR (explicit), length, value


def _split(ds: Dataset, little: bool, implicit: bool, raw: dict[int, bytes]) -> list[_Element]:
    """The encoded elements of *ds*; the values in *raw* replace theirs (length fixed)."""
    out = []
    for elem in ds:
        fp = DicomBytesIO()
        fp.is_little_endian = little
        fp.is_implicit_VR = implicit
        write_data_element(fp, elem)
        data = fp.getvalue()
        if int(elem.tag) in raw:
            head = _header_size(data, implicit)
            value = raw[int(elem.tag)]
            fmt = "<" if little else ">"
            data = (data[:head - 4] + struct.pack(fmt + "I", len(value)) if head == 12 or implicit
                    else data[:head - 2] + struct.pack(fmt + "H", len(value))) + value
        out.append(_Element(int(elem.tag), data))
    return out


def _header_size(raw: bytes, implicit: bool) -> int:
    if implicit:
        return 8
    return 12 if raw[4:6] in _LONG_VRS else 8


def _nested(depth: int, little: bool, defined: bool, end: bool) -> bytes:
    """A sequence element nested *depth* levels deep (explicit VR): defined or undefined
    lengths; with ``end=False`` the undefined-length items are never delimited."""
    fmt = "<" if little else ">"
    inner = b""
    for _ in range(depth):
        item_body = struct.pack(fmt + "HH2s2xI", 0x0008, 0x1140, b"SQ",
                                len(inner) if defined else 0xFFFFFFFF) + inner
        if not defined and end:
            item_body += struct.pack(fmt + "HHI", 0xFFFE, 0xE0DD, 0)
        item = struct.pack(fmt + "HHI", 0xFFFE, 0xE000,
                           len(item_body) if defined else 0xFFFFFFFF) + item_body
        if not defined and end:
            item += struct.pack(fmt + "HHI", 0xFFFE, 0xE00D, 0)
        inner = item
    return struct.pack(fmt + "HH2s2xI", 0x0008, 0x1140, b"SQ",
                       len(inner) if defined else 0xFFFFFFFF) + inner


def mutate_structure(elements: list[_Element], choices: Choices, little: bool,
                     implicit: bool) -> None:
    """Wrong VRs, lengths and values; deleted, duplicated and reordered elements; nested
    sequences; applied to the element list in place."""
    fmt = "<" if little else ">"
    for _ in range(1 + choices.int(3)):
        if not elements:
            return
        k = choices.int(len(elements))
        raw = elements[k].raw
        action = choices.int(8)
        if action == 0 and not implicit:  # wrong VR (header size may change too)
            vr = _VRS[choices.int(len(_VRS))]
            elements[k].raw = raw[:4] + vr + raw[6:]
        elif action == 1:  # wrong length field
            length = _LENGTHS[choices.int(len(_LENGTHS))]
            if implicit or _header_size(raw, implicit) == 12:
                pos = 4 if implicit else 8
                elements[k].raw = raw[:pos] + struct.pack(fmt + "I", length) + raw[pos + 4:]
            else:
                elements[k].raw = raw[:6] + struct.pack(fmt + "H", length & 0xFFFF) + raw[8:]
        elif action == 2:  # oversized or odd value, same header
            head = raw[:_header_size(raw, implicit)]
            value = [b"9" * (1024 * 1024), choices.bytes(64), b"", b"\\" * 64,
                     b"1e999", b"-0"][choices.int(6)]
            elements[k].raw = head + value
        elif action == 3:
            del elements[k]
        elif action == 4:
            elements.insert(choices.int(len(elements) + 1), _Element(elements[k].tag, raw))
        elif action == 5:  # out of order
            j = choices.int(len(elements))
            elements[k], elements[j] = elements[j], elements[k]
        elif action == 6 and not implicit:  # deep or never-ending sequences
            depth = [1, 10, 200, 1000, 3000][choices.int(5)]
            nested = _nested(depth, little, defined=bool(choices.int(2)),
                             end=bool(choices.int(2)))
            elements.insert(choices.int(len(elements) + 1), _Element(0x00081140, nested))
        elif action == 7:  # private or unknown tag, random VR and value
            tag = struct.pack(fmt + "HH", [0x0009, 0x7FE1, 0xFFFF, 0x0003][choices.int(4)],
                              choices.int(0x10000))
            value = choices.bytes(32)
            head = tag + struct.pack(fmt + "I", len(value)) if implicit else (
                tag + b"UN\x00\x00" + struct.pack(fmt + "I", len(value)))
            elements.insert(choices.int(len(elements) + 1), _Element(0, head + value))


def mutate_bytes(data: bytes, choices: Choices) -> bytes:
    """Truncation, byte flips, random bytes spliced in."""
    buf = bytearray(data)
    for _ in range(1 + choices.int(3)):
        action = choices.int(3)
        if action == 0 and buf:
            del buf[choices.int(len(buf)):]
        elif action == 1 and buf:
            for _ in range(1 + choices.int(8)):
                buf[choices.int(len(buf))] = choices.int(256)
        else:
            pos = choices.int(len(buf) + 1)
            buf[pos:pos] = choices.bytes(64)
    return bytes(buf)


def mutate_instance(choices: Choices, index: int = 0) -> tuple[str, bytes]:
    """One malformed instance of the fuzz series: (transfer syntax, data set bytes)."""
    ds = seed_dataset(index)
    raw: dict[int, bytes] = {}
    if choices.int(2):
        mutate_semantics(ds, choices, raw)
    syntax = str(SYNTAXES[choices.int(len(SYNTAXES))])
    little = syntax != ExplicitVRBigEndian
    implicit = syntax == ImplicitVRLittleEndian
    elements = _split(ds, little, implicit, raw)
    kind = choices.int(3)
    if kind:
        mutate_structure(elements, choices, little, implicit)
    data = b"".join(e.raw for e in elements)
    if syntax == DeflatedExplicitVRLittleEndian:
        compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        data = compressor.compress(data) + compressor.flush()
    if kind == 2 or choices.int(4) == 0:
        data = mutate_bytes(data, choices)
    return syntax, data


# --------------------------------------------------------------------------- store target


def _command_uid(data: bytes, syntax: str) -> str:
    """The SOP Instance UID an SCU would put in the command (as pynetdicom's send_c_store
    does: from the data set), or the seed's when the data set does not say."""
    from pydicom.filereader import read_dataset

    fallback = str(seed_dataset().SOPInstanceUID)
    if syntax == DeflatedExplicitVRLittleEndian:
        return fallback
    try:
        ds = read_dataset(io.BytesIO(data), syntax == ImplicitVRLittleEndian,
                          syntax != ExplicitVRBigEndian,
                          stop_when=lambda tag, vr, length: int(tag) > 0x00080018)
        value = str(ds.get("SOPInstanceUID", "") or "").strip()
    except Exception:  # noqa: BLE001 - harness side: the SCU just uses the seed's UID
        return fallback
    return value if value.isascii() and 0 < len(value) <= 64 else fallback


class StoreTarget:
    """``handle_store`` as pynetdicom calls it, with a real DiskSpool, state database,
    assembler (quiet period one hour: no jobs) and metrics, in a temporary folder."""

    STATUSES = frozenset({0x0000, 0xA700, 0xA900, 0xC210, 0xC211, 0xC212, 0xC213, 0xC214})

    def __init__(self, root: Path | None = None) -> None:
        from apscheduler.schedulers.background import BackgroundScheduler
        from pynetdicom import AE
        from pynetdicom.association import Association

        from node.assembler import SeriesAssembler
        from node.config import AssemblyConfig
        from node.db import StateDB
        from node.jobs import SqliteJobQueue
        from node.metrics import NodeMetrics
        from node.spool import DiskSpool

        self._tmp = None if root else tempfile.mkdtemp(prefix="ich-fuzz-store-")
        self.root = Path(root or self._tmp or ".")
        self.db = StateDB(self.root)
        self.spool = DiskSpool(self.root, self.db, fsync=False)
        self.metrics = NodeMetrics()
        self.scheduler = BackgroundScheduler()
        self.scheduler.start(paused=True)
        self.assembler = SeriesAssembler(self.scheduler, SqliteJobQueue(self.db, 3),
                                         AssemblyConfig(quiet_seconds=3600), self.metrics)
        ae = AE(ae_title="ICH_NODE")
        self.assoc = Association(ae, "acceptor")
        self.assoc.requestor.ae_title = "FUZZ_SCU"
        self.statuses: dict[int, int] = {}

    def close(self) -> None:
        """Stop the scheduler, close the database, delete the temporary folder."""
        self.scheduler.shutdown(wait=False)
        self.db.close()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> StoreTarget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, syntax: str, data: bytes) -> int:
        """C-STORE *data* (encoded in *syntax*); return the status. Raises on a broken
        contract; any other exception escaping is a crash of the handler."""
        from pynetdicom import evt
        from pynetdicom.dimse_primitives import C_STORE
        from pynetdicom.presentation import PresentationContextTuple

        from node.handlers import handle_store
        from node.scp import CT_SOP_CLASSES
        from node.spool import read_header

        req = C_STORE()
        req.MessageID = 1
        req.AffectedSOPClassUID = CTImageStorage
        req.AffectedSOPInstanceUID = _command_uid(data, syntax)
        req.DataSet = io.BytesIO(data)
        event = evt.Event(self.assoc, evt.EVT_C_STORE, {
            "request": req, "context": PresentationContextTuple(1, CTImageStorage, UID(syntax))})
        status = handle_store(event, self.spool, self.assembler, self.metrics,
                              CT_SOP_CLASSES)
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if status not in self.STATUSES:
            raise FuzzContractError(f"undocumented C-STORE status 0x{status:04X}")
        if status == 0x0000:
            rows = self.db.query("SELECT path FROM instances WHERE sop_uid = ?",
                                 (str(req.AffectedSOPInstanceUID),))
            if len(rows) != 1:
                raise FuzzContractError("Success without a spooled instance row")
            path = Path(rows[0]["path"]).resolve()
            if self.spool.instances_dir.resolve() not in path.parents:
                raise FuzzContractError(f"spooled outside the spool: {path}")
            if not path.read_bytes().endswith(data):
                raise FuzzContractError("spooled bytes differ from the received data set")
            header = read_header(path)  # the recovery path must read what was stored
            if header.sop_uid != str(req.AffectedSOPInstanceUID):
                raise FuzzContractError("spooled file's SOP Instance UID differs")
        return status


# --------------------------------------------------------------------------- pipeline target


def pipeline_config() -> Any:
    """The default pipeline config with a small series allowed (4 slices of 8x8)."""
    from pipeline.config import PipelineConfig, SelectionConfig, VolumeConfig

    return PipelineConfig(selection=SelectionConfig(min_slices=3),
                          volume=VolumeConfig(read_threads=1))


def mutate_series(choices: Choices) -> dict[str, bytes]:
    """A 4-slice series as file bytes (preamble, file meta, data set), one to all of its
    files mutated."""
    from node.filemeta import PREAMBLE, encode_file_meta

    files: dict[str, bytes] = {}
    mutated = {choices.int(SERIES_SLICES) for _ in range(1 + choices.int(SERIES_SLICES))}
    for index in range(SERIES_SLICES):
        if index in mutated:
            syntax, data = mutate_instance(choices, index)
        else:
            syntax = str(ExplicitVRLittleEndian)
            data = encode(seed_dataset(index), syntax)
        sop = str(seed_dataset(index).SOPInstanceUID)
        meta = encode_file_meta(str(CTImageStorage), sop, syntax, FUZZ_ROOT + "0", "FUZZ")
        files[f"{index:02d}.dcm"] = PREAMBLE + meta + data
    return files


class PipelineTarget:
    """``load_volume`` (selection, sorting, volume) on a series folder, as the worker's
    analyzer calls it before the models run."""

    def __init__(self) -> None:
        self._tmp = Path(tempfile.mkdtemp(prefix="ich-fuzz-pipeline-"))
        self.config = pipeline_config()
        self.outcomes: dict[str, int] = {}

    def close(self) -> None:
        """Delete the temporary folder."""
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> PipelineTarget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, files: dict[str, bytes]) -> str:
        """'volume', or the PipelineError's class name. Any other exception escaping is a
        crash (the job would fail without a named rule)."""
        from pipeline.errors import PipelineError
        from pipeline.volume import load_volume

        folder = self._tmp / "series"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        for name, data in files.items():
            (folder / name).write_bytes(data)
        try:
            volume, _ = load_volume(folder, self.config)
        except PipelineError as exc:
            outcome = type(exc).__name__
            if not str(exc):
                raise FuzzContractError(f"{outcome} without a reason") from exc
        else:
            outcome = "volume"
            if volume.hu.ndim != 3 or 0 in volume.hu.shape:
                raise FuzzContractError(f"volume of shape {volume.hu.shape}")
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        return outcome


# --------------------------------------------------------------------------- PDU target


def _item(item_type: int, body: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(body)) + body


def associate_rq(calling: bytes = b"FUZZ_SCU", called: bytes = b"ICH_NODE",
                 abstract: str = "1.2.840.10008.1.1") -> bytes:
    """A valid A-ASSOCIATE-RQ PDU (PS3.8 9.3.2) with one presentation context."""
    app = _item(0x10, b"1.2.840.10008.3.1.1.1")
    ctx = _item(0x20, bytes([1, 0, 0, 0]) + _item(0x30, abstract.encode())
                + _item(0x40, str(ImplicitVRLittleEndian).encode()))
    user = _item(0x50, _item(0x51, struct.pack(">I", 16384))
                 + _item(0x52, b"1.2.826.0.1.3680043.8.498.96.0"))
    body = (struct.pack(">HH", 1, 0) + called.ljust(16) + calling.ljust(16) + b"\x00" * 32
            + app + ctx + user)
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def p_data(context_id: int, control: int, fragment: bytes) -> bytes:
    """One P-DATA-TF PDU with one PDV (control 0x03: last command fragment, 0x02: last
    data fragment)."""
    pdv = struct.pack(">IBB", len(fragment) + 2, context_id, control) + fragment
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


def echo_command(message_id: int = 1) -> bytes:
    """A C-ECHO-RQ command set, implicit VR little endian (PS3.7 9.3.5)."""
    ds = Dataset()
    ds.AffectedSOPClassUID = "1.2.840.10008.1.1"
    ds.CommandField = 0x0030
    ds.MessageID = message_id
    ds.CommandDataSetType = 0x0101
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = True
    write_dataset(fp, ds)
    body = fp.getvalue()
    group_length = struct.pack("<HHII", 0x0000, 0x0000, 4, len(body))
    return group_length + body


def pdu_streams() -> list[bytes]:
    """Seed byte streams: an association with a C-ECHO and a release, and pieces."""
    release = struct.pack(">BBI", 0x05, 0, 4) + b"\x00" * 4
    return [associate_rq() + p_data(1, 0x03, echo_command()) + release,
            associate_rq(), p_data(1, 0x03, echo_command()), release]


def mutate_pdus(choices: Choices) -> bytes:
    """A malformed PDU stream: a seed stream with length fields, item lengths and bytes
    mutated, PDUs dropped or repeated, garbage spliced in."""
    stream = pdu_streams()[choices.int(4)]
    buf = bytearray(stream)
    for _ in range(1 + choices.int(4)):
        action = choices.int(4)
        if action == 0 and len(buf) >= 6:  # a PDU length field
            pos = 2 if not choices.int(3) else choices.int(len(buf) - 3)
            value = [0, 1, 4, 0x44, 0xFFFF, 0x100000, 0x7FFFFFFF, 0xFFFFFFFF][choices.int(8)]
            buf[pos:pos + 4] = struct.pack(">I", value)
        elif action == 1 and len(buf) >= 4:  # a 2-byte item length inside the PDU
            pos = choices.int(len(buf) - 1)
            buf[pos:pos + 2] = struct.pack(">H", [0, 1, 0xFFFF, 0x8000][choices.int(4)])
        elif action == 2 and buf:  # PDU type byte or any byte
            pos = 0 if not choices.int(3) else choices.int(len(buf))
            buf[pos] = choices.int(256)
        else:
            buf = bytearray(mutate_bytes(bytes(buf), choices))
    return bytes(buf)


def _first_pdu(stream: bytes) -> tuple[bytes, bytes]:
    """(the first PDU, the rest) when *stream* starts with a whole A-ASSOCIATE-RQ; else
    (stream, b"")."""
    if len(stream) < 6 or stream[0] != 0x01:
        return stream, b""
    end = 6 + struct.unpack(">I", stream[2:6])[0]
    return (stream[:end], stream[end:]) if end < len(stream) else (stream, b"")


@dataclass
class PduOutcome:
    """What the node did with one PDU stream."""

    answer: bytes  # the first bytes the node sent back
    closed: bool  # the node closed the connection (else we gave up waiting)


class PduTarget:
    """Byte streams sent over TCP to a node listening on *port*; the node must close the
    connection within *wait_s* after we stop sending, no thread of the node may die of an
    uncaught exception, its active associations must return to zero and it must keep
    answering C-ECHO (checked every *echo_every* inputs). Call :meth:`close` at the end."""

    def __init__(self, port: int, active: Callable[[], int], wait_s: float = 10.0,
                 echo_every: int = 50) -> None:
        self.port = port
        self.active = active
        self.wait_s = wait_s
        self.echo_every = echo_every
        self.count = 0
        self.answers: dict[str, int] = {}
        self.thread_errors: list[str] = []
        self._previous_hook = threading.excepthook
        threading.excepthook = self._thread_died

    def _thread_died(self, args: threading.ExceptHookArgs) -> None:
        name = args.thread.name if args.thread else "?"
        self.thread_errors.append(f"thread {name}: {args.exc_type.__name__}: {args.exc_value}")

    def close(self) -> None:
        """Restore the thread exception hook."""
        threading.excepthook = self._previous_hook

    def run(self, stream: bytes) -> PduOutcome:
        """Send *stream*, half-close, read until the node closes. Raises on a broken
        contract."""
        first, rest = _first_pdu(stream)
        with socket.create_connection(("127.0.0.1", self.port), timeout=self.wait_s) as sock:
            early = b""
            try:
                sock.sendall(first)
                if rest:  # as a requestor does: wait for the A-ASSOCIATE answer first
                    early = self._answer(sock)
                    if early[:1] == b"\x02":
                        sock.sendall(rest)
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the node may close on a bad first PDU before we finish: fine
            outcome = self._read(sock)
            if early:
                outcome = PduOutcome(early[:64], outcome.closed or early[:1] != b"\x02")
        if not outcome.closed:
            raise FuzzContractError(f"connection still open {self.wait_s} s after the peer "
                                    "stopped sending")
        if self.thread_errors:
            raise FuzzContractError("; ".join(self.thread_errors))
        kind = {0x02: "A-ASSOCIATE-AC", 0x03: "A-ASSOCIATE-RJ", 0x04: "P-DATA",
                0x06: "A-RELEASE-RP", 0x07: "A-ABORT"}.get(
                    outcome.answer[0] if outcome.answer else -1, "closed")
        self.answers[kind] = self.answers.get(kind, 0) + 1
        self.count += 1
        if self.count % self.echo_every == 0:
            self.check_serving()
        return outcome

    def _answer(self, sock: socket.socket) -> bytes:
        """The node's first PDU (b"" when it closes first)."""
        head = b""
        while len(head) < 6:
            chunk = sock.recv(6 - len(head))
            if not chunk:
                return head
            head += chunk
        length = struct.unpack(">I", head[2:6])[0]
        return head + sock.recv(min(length, 65536), socket.MSG_WAITALL)

    def _read(self, sock: socket.socket) -> PduOutcome:
        answer = bytearray()
        deadline = time.monotonic() + self.wait_s
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return PduOutcome(bytes(answer[:64]), False)
            except ConnectionResetError:
                return PduOutcome(bytes(answer[:64]), True)
            if not chunk:
                return PduOutcome(bytes(answer[:64]), True)
            if len(answer) < 64:
                answer += chunk
            if len(answer) >= 10 and answer[0] in (0x03, 0x07):
                # A-ASSOCIATE-RJ or A-ABORT: the node waits (ARTIM) for us to close (PS3.8
                # 9.2, Sta13), as a well-behaved peer does; check_serving() then checks that
                # the association is gone
                return PduOutcome(bytes(answer[:64]), True)
        return PduOutcome(bytes(answer[:64]), False)

    def check_serving(self) -> None:
        """No association left behind, and a normal C-ECHO succeeds."""
        deadline = time.monotonic() + self.wait_s
        while self.active() and time.monotonic() < deadline:
            time.sleep(0.01)
        if self.active():
            raise FuzzContractError(f"{self.active()} associations still active")
        if self.thread_errors:
            raise FuzzContractError("; ".join(self.thread_errors))
        from pynetdicom import AE
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        ae = AE(ae_title="FUZZ_CHECK")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", self.port, ae_title="ICH_NODE")
        if not assoc.is_established:
            raise FuzzContractError("the node refused a normal association")
        status = assoc.send_c_echo()
        assoc.release()
        if getattr(status, "Status", None) != 0x0000:
            raise FuzzContractError("the node did not answer a normal C-ECHO")


def iterate(seed: int, count: int) -> Iterator[RandomChoices]:
    """*count* independent choice streams derived from *seed* (the quick loop)."""
    for i in range(count):
        yield RandomChoices(seed * 1_000_003 + i)

