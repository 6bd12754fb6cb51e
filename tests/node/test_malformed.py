"""Malformed input against a running node (issue 8): PDUs over raw sockets and malformed
DICOM headers over real associations. For each: the node does not crash, the connection
gets an A-ABORT or is closed (or the C-STORE the documented failure status, or the series
job fails with a reason), the log and a metric say so, no association slot is left
behind, and a normal association from another SCU still succeeds."""

from __future__ import annotations

import json
import socket
import struct
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from node import handlers
from node.app import Node
from node.filemeta import PREAMBLE, encode_file_meta
from tests.helpers import fuzzing
from tests.helpers.ctseries import make_ct_slice
from tests.helpers.net import pynetdicom_send, wait_until

UID_ROOT = "1.2.826.0.1.3680043.8.498.95."
FAST = {"network_timeout_s": 1.0, "acse_timeout_s": 1.0, "max_associations": 2}
A_ABORT = 0x07
RELEASE_RQ = struct.pack(">BBI", 0x05, 0, 4) + b"\x00" * 4


def _metric(node: Node, name: str, **labels: str) -> float:
    value = node.metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


def _active(node: Node) -> int:
    return sum(1 for a in node.ae.active_associations if a.is_acceptor)


def _raw(port: int, payload: bytes, half_close: bool, wait_s: float = 15.0
         ) -> tuple[bytes, bool]:
    """Send *payload* on a fresh connection (then half-close, or stay silent); return what
    the node sent and whether it closed the connection within *wait_s*."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as sock:
        sock.sendall(payload)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        answer = bytearray()
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return bytes(answer), False
            except ConnectionResetError:
                return bytes(answer), True
            if not chunk:
                return bytes(answer), True
            answer += chunk
        return bytes(answer), False


def _assert_still_serving(node: Node) -> None:
    """Every slot is free again and another SCU gets a C-ECHO answered."""
    wait_until(lambda: _active(node) == 0, 15, what="no active association")
    ae = AE(ae_title="OTHER_SCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="ICH_NODE")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    wait_until(lambda: _active(node) == 0, 15, what="no active association after the echo")


def _rq_with_length(length: int) -> bytes:
    rq = fuzzing.associate_rq()
    return rq[:2] + struct.pack(">I", length) + rq[6:]


def _rq_with_bad_context_item() -> bytes:
    rq = bytearray(fuzzing.associate_rq())
    pos = rq.index(b"\x20\x00", 74)  # the presentation context item, after the fixed fields
    rq[pos + 2:pos + 4] = b"\xff\xff"  # its item length runs past the PDU
    return bytes(rq)


# (name, payload, half-close after sending)
PDU_CASES = [
    ("truncated A-ASSOCIATE-RQ", fuzzing.associate_rq()[:40], True),
    ("truncated A-ASSOCIATE-RQ, then silence", fuzzing.associate_rq()[:40], False),
    ("PDU length too small", _rq_with_length(10), True),
    ("PDU length 0xFFFFFFFF", _rq_with_length(0xFFFFFFFF), False),
    ("unknown PDU type, then silence", b"\x09\x00\x00\x00\x00\x04abcd", False),
    ("P-DATA before association", fuzzing.p_data(1, 0x03, fuzzing.echo_command()), False),
    ("item length past the PDU", _rq_with_bad_context_item(), False),
    ("PDU header, then silence", b"\x01\x00\x00\x00\x01\x00", False),
    ("garbage", bytes(range(256)) * 16, True),
]


@pytest.mark.parametrize(("name", "payload", "half_close"), PDU_CASES,
                         ids=[c[0] for c in PDU_CASES])
def test_malformed_pdu_is_aborted_or_closed_and_node_keeps_serving(
        make_node: Callable[..., Node], name: str, payload: bytes, half_close: bool) -> None:
    node = make_node(dicom=FAST)
    answer, closed = _raw(node.port, payload, half_close)
    assert closed, f"{name}: the node kept the connection open"
    assert not answer or answer[0] in (A_ABORT, 0x03), f"{name}: answered {answer[:10]!r}"
    _assert_still_serving(node)


def test_huge_pdu_length_gets_provider_abort_without_allocating(
        make_node: Callable[..., Node], caplog: pytest.LogCaptureFixture) -> None:
    node = make_node(dicom=FAST)
    with caplog.at_level("WARNING", logger="node.transport"):
        answer, closed = _raw(node.port, _rq_with_length(0xFFFFFFFF), half_close=False)
    # A-ABORT PDU: source 2 (service provider), reason 6 (invalid PDU parameter value)
    assert answer[:10] == b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x06"
    assert closed
    assert "PDU length field says 4294967295 bytes" in caplog.text
    assert _metric(node, "ich_node_protocol_errors_total", reason="pdu_too_large") == 1
    _assert_still_serving(node)


def test_silent_peers_do_not_keep_association_slots(
        make_node: Callable[..., Node], caplog: pytest.LogCaptureFixture) -> None:
    """max_associations=2: two peers that send a PDU header and go silent are cut off after
    dicom.network_timeout_s, and their slots serve others again."""
    node = make_node(dicom=FAST)
    silent = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(2)]
    try:
        with caplog.at_level("WARNING", logger="node.transport"):
            for sock in silent:
                sock.sendall(b"\x01\x00\x00\x00\x01\x00")
            wait_until(lambda: _metric(node, "ich_node_protocol_errors_total",
                                       reason="read_timeout") == 2, 15, what="two timeouts")
        assert "silent for 1.0 s" in caplog.text
        _assert_still_serving(node)
    finally:
        for sock in silent:
            sock.close()


def test_malformed_command_set_aborts_the_association(make_node: Callable[..., Node]) -> None:
    node = make_node(dicom=FAST)
    with socket.create_connection(("127.0.0.1", node.port), timeout=15) as sock:
        sock.sendall(fuzzing.associate_rq())
        accept = sock.recv(6)
        assert accept[0] == 0x02  # A-ASSOCIATE-AC
        sock.recv(struct.unpack(">I", accept[2:6])[0], socket.MSG_WAITALL)
        command = fuzzing.echo_command()
        broken = command[:12] + b"\x00\x00\x00\x01\xff\xff\xff\x7f" + command[20:]
        sock.sendall(fuzzing.p_data(1, 0x03, broken))
        answer = sock.recv(10)
    assert answer[:1] == bytes([A_ABORT])
    wait_until(lambda: _metric(node, "ich_node_protocol_errors_total", reason="aborted") == 1,
               15, what="the abort counted")
    _assert_still_serving(node)


def test_even_presentation_context_id_aborts_the_association(
        make_node: Callable[..., Node]) -> None:
    """Found by the PDU fuzz harness: an A-ASSOCIATE-RQ whose presentation context ID is
    even made pynetdicom raise ValueError inside its state machine; the DUL thread died
    with a traceback and no A-ABORT was sent."""
    node = make_node(dicom=FAST)
    rq = bytearray(fuzzing.associate_rq())
    pos = rq.index(b"\x20\x00", 74)  # the presentation context item
    rq[pos + 4] = 0x60  # context ID 96: PS3.8 9.3.2.2 wants an odd number
    answer, closed = _raw(node.port, bytes(rq), half_close=False)
    assert answer[:10] == b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x06" and closed
    assert _metric(node, "ich_node_protocol_errors_total", reason="bad_pdu") == 1
    _assert_still_serving(node)


# ----------------------------------------------------------------- C-STORE of odd data sets


def _slice(index: int = 0, n: int = 1, series: str = "2") -> Dataset:
    ds = make_ct_slice(UID_ROOT + "1", UID_ROOT + series, UID_ROOT + "3", index, n, rows=16)
    ds["PixelData"].VR = "OW"
    return ds


def _send_bytes(port: int, ds: Dataset, data: bytes) -> int | None:
    """C-STORE *data* as the data set (explicit VR little endian), as it is: pynetdicom's
    chunked mode sends a file's bytes without parsing them."""
    file = BytesIO()
    file.write(PREAMBLE + encode_file_meta(CTImageStorage, str(ds.SOPInstanceUID),
                                           ExplicitVRLittleEndian, UID_ROOT + "0", "TEST"))
    file.write(data)
    ae = AE(ae_title="ODD_SCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="ICH_NODE")
    assert assoc.is_established
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    path = Path(f"/tmp/ich-malformed-{time.monotonic_ns()}.dcm")
    path.write_bytes(file.getvalue())
    try:
        status = assoc.send_c_store(path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
        path.unlink()
        assoc.release()
    return getattr(status, "Status", None)


def _with_element(ds: Dataset, element: bytes, before_tag: int) -> bytes:
    """The encoded data set with raw *element* bytes inserted before *before_tag*."""
    elements = fuzzing._split(ds, True, False, {})
    at = next(i for i, e in enumerate(elements) if e.tag >= before_tag)
    return b"".join(e.raw for e in elements[:at]) + element + b"".join(
        e.raw for e in elements[at:])


def test_deeply_nested_sequences_of_defined_length_fail_the_job_with_a_reason(
        make_node: Callable[..., Node]) -> None:
    """1000 levels of nested sequences of defined length: the handler skips over them (it
    reads the header up to Pixel Data without recursing), so they are stored; the
    worker's reader names them and the job fails with that reason."""
    node = make_node(analyzer="tests.helpers.analyzers:volume_only", dicom=FAST,
                     pipeline={"selection": {"min_slices": 3}})
    nested = fuzzing._nested(1000, little=True, defined=True, end=True)
    for i in range(4):
        ds = _slice(i, 4, "20")
        assert _send_bytes(node.port, ds, _with_element(ds, nested, 0x00081140)) == 0x0000
    job = _wait_job(node, UID_ROOT + "20")
    assert job["state"] == "failed", job
    assert "sequences nested too deeply to read" in str(job["error"]), job["error"]
    assert node.worker is not None and node.worker.is_alive()
    _assert_still_serving(node)


def test_deeply_nested_sequences_of_undefined_length_are_refused(
        make_node: Callable[..., Node]) -> None:
    """Undefined lengths must be parsed to find their end: 1000 levels do not parse."""
    node = make_node(dicom=FAST)
    ds = _slice()
    nested = fuzzing._nested(1000, little=True, defined=False, end=True)
    status = _send_bytes(node.port, ds, _with_element(ds, nested, 0x00081140))
    assert status == handlers.CANNOT_UNDERSTAND_UNDECODABLE
    assert _metric(node, "ich_node_store_failures_total", reason="undecodable") == 1
    assert not list(node.spool.instances_dir.rglob("*.dcm"))
    _assert_still_serving(node)


def test_undefined_length_item_that_never_ends_is_refused(
        make_node: Callable[..., Node]) -> None:
    node = make_node(dicom=FAST)
    ds = _slice()
    never_ends = fuzzing._nested(3, little=True, defined=False, end=False)
    status = _send_bytes(node.port, ds, _with_element(ds, never_ends, 0x00081140))
    # the open item swallows everything after it, Pixel Data included
    assert status in (handlers.CANNOT_UNDERSTAND_UNDECODABLE, handlers.CANNOT_UNDERSTAND_PIXEL_DATA)
    assert not list(node.spool.instances_dir.rglob("*.dcm"))
    _assert_still_serving(node)


def _explicit(ds: Dataset) -> bytes:
    return fuzzing.encode(ds, ExplicitVRLittleEndian)


def _wrong_vr(ds: Dataset) -> bytes:
    """SeriesNumber (IS) sent with VR FL and a 2-byte value."""
    return _explicit(ds).replace(b"\x20\x00\x11\x00IS\x02\x002 ", b"\x20\x00\x11\x00FL\x02\x002 ")


def _no_pixels(ds: Dataset) -> Dataset:
    del ds.PixelData
    return ds


def _set(**values: object) -> Callable[[Dataset], Dataset]:
    def change(ds: Dataset) -> Dataset:
        for key, value in values.items():
            setattr(ds, key, value)
        return ds
    return change


REFUSED = [
    ("missing pixel data", _no_pixels, handlers.CANNOT_UNDERSTAND_PIXEL_DATA, "no_pixel_data"),
    ("Rows x Columns larger than the pixel data", _set(Rows=64, Columns=64),
     handlers.CANNOT_UNDERSTAND_PIXEL_DATA, "pixel_data_size"),
    ("huge NumberOfFrames", _set(NumberOfFrames="2147483647"),
     handlers.CANNOT_UNDERSTAND_PIXEL_DATA, "pixel_data_size"),
]


@pytest.mark.parametrize(("name", "change", "status", "reason"), REFUSED,
                         ids=[c[0] for c in REFUSED])
def test_malformed_header_gets_documented_status(
        make_node: Callable[..., Node], name: str, change: Callable[[Dataset], Dataset],
        status: int, reason: str) -> None:
    node = make_node(dicom=FAST)
    ds = change(_slice())
    assert _send_bytes(node.port, ds, _explicit(ds)) == status
    assert _metric(node, "ich_node_store_failures_total", reason=reason) == 1
    _assert_still_serving(node)


def test_one_megabyte_patient_name_is_stored(make_node: Callable[..., Node]) -> None:
    """A huge value is not an error at the network edge: stored as received."""
    node = make_node(dicom=FAST)
    ds = _slice()
    ds.PatientName = "A" * (1024 * 1024)
    assert pynetdicom_send(node.port, [ds]) == [0x0000]
    stored = list(node.spool.instances_dir.rglob("*.dcm"))
    assert len(stored) == 1 and b"A" * (1024 * 1024) in stored[0].read_bytes()


def _series(change: Callable[[Dataset], Dataset], series: str, n: int = 4) -> list[bytes]:
    return [_explicit(change(_slice(i, n, series))) for i in range(n)]


STORED_THEN_FAILED = [
    # (name, change, the words the job's failure reason must contain)
    ("wrong VR", None, "BytesLengthException"),
    ("BitsAllocated 0", _set(BitsAllocated=0), "must be positive integers"),
    ("negative NumberOfFrames", _set(NumberOfFrames="-1"), "must be positive integers"),
    ("missing ImagePositionPatient", _set(ImagePositionPatient=None), "ImagePositionPatient"),
    ("Rows x Columns smaller than the pixel data", _set(Rows=8, Columns=8),
     "Pixel Data has 512 bytes, the header implies 128"),
]


@pytest.mark.parametrize(("name", "change", "words"), STORED_THEN_FAILED,
                         ids=[c[0] for c in STORED_THEN_FAILED])
def test_stored_malformed_series_fails_its_job_with_a_reason(
        make_node: Callable[..., Node], name: str, change: Callable[[Dataset], Dataset] | None,
        words: str) -> None:
    """Accepted at the edge (the header is consistent enough), rejected by the real
    selection and volume code in the worker: a failed job with the rule, no worker crash."""
    node = make_node(analyzer="tests.helpers.analyzers:volume_only", dicom=FAST,
                     pipeline={"selection": {"min_slices": 3}})
    series = str(10 + [c[0] for c in STORED_THEN_FAILED].index(name))
    if change is None:
        datasets = [_slice(i, 4, series) for i in range(4)]
        payloads = [_wrong_vr(ds) for ds in datasets]
    else:
        datasets = [change(_slice(i, 4, series)) for i in range(4)]
        payloads = [_explicit(ds) for ds in datasets]
    for ds, data in zip(datasets, payloads, strict=True):
        assert _send_bytes(node.port, ds, data) == 0x0000
    job = _wait_job(node, UID_ROOT + series)
    assert job["state"] == "failed", job
    assert words in job["error"], job["error"]
    report = json.loads((node.spool.jobs_dir / f"{job['id']}.json").read_text())
    assert report["state"] == "failed" and report["error"] == job["error"]
    assert node.worker is not None and node.worker.is_alive()
    _assert_still_serving(node)


def _wait_job(node: Node, series_uid: str) -> dict[str, object]:
    def finished() -> bool:
        rows = node.db.query("SELECT state FROM jobs WHERE series_uid = ?", (series_uid,))
        return bool(rows) and rows[0]["state"] in ("done", "failed")

    wait_until(finished, 60, what=f"the job of {series_uid}")
    return dict(node.db.query("SELECT * FROM jobs WHERE series_uid = ?", (series_uid,))[0])


@pytest.mark.slow
def test_real_analyzer_fails_the_job_of_a_malformed_series_and_goes_on(
        make_node: Callable[..., Node]) -> None:
    """The worker with the real pipeline (models loaded): a series whose Pixel Data is
    longer than its header says fails with the rule; the worker stays up."""
    node = make_node(analyzer="pipeline.analyze:Analyzer", dicom=FAST,
                     pipeline={"selection": {"min_slices": 3}})
    for i in range(4):
        ds = _set(Rows=8, Columns=8)(_slice(i, 4, "40"))
        assert _send_bytes(node.port, ds, _explicit(ds)) == 0x0000
    job = _wait_job(node, UID_ROOT + "40")
    assert job["state"] == "failed", job
    assert str(job["error"]).startswith("VolumeError: ") and "Pixel Data has 512 bytes" in str(
        job["error"])
    assert node.worker is not None and node.worker.is_alive()
    _assert_still_serving(node)


def test_late_local_primitive_after_abort_is_dropped() -> None:
    """Found by the PDU fuzz harness: the association thread's A-ASSOCIATE-AC (Evt7) came
    after a malformed follow-up PDU had aborted the association (Sta13), and
    pynetdicom's InvalidEventError killed the DUL thread."""
    from pynetdicom.fsm import InvalidEventError, StateMachine

    from node.transport import AbortTolerantStateMachine

    plain = StateMachine(dul=None)  # type: ignore[arg-type]
    plain.current_state = "Sta13"
    with pytest.raises(InvalidEventError):
        plain.do_action("Evt7")
    tolerant = AbortTolerantStateMachine(dul=None)  # type: ignore[arg-type]
    tolerant.current_state = "Sta13"
    for event in ("Evt7", "Evt8", "Evt9", "Evt11", "Evt14", "Evt15"):
        tolerant.do_action(event)
    assert tolerant.current_state == "Sta13"
    tolerant.current_state = "Sta1"
    with pytest.raises(InvalidEventError):  # elsewhere pynetdicom's rules apply
        tolerant.do_action("Evt7")
