"""node.transport's short paths give pynetdicom's answers.

The node answers a C-STORE without pynetdicom's Storage Service Class and response
primitive (``PromptAssociation._serve_store``, ``encode_c_store_rsp``) and hands P-DATA
straight to the DIMSE provider (``PromptDUL``). These tests hold the short paths to the
bytes and statuses pynetdicom's own paths produce, over real associations on loopback.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, dcmread
from pynetdicom import AE, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import decode
from pynetdicom.sop_class import CTImageStorage

from node.metrics import NodeMetrics
from node.transport import (
    PromptAssociation,
    PromptDUL,
    decode_c_store_rq,
    encode_c_store_rsp,
    send_command,
    start_listener,
)
from tests.helpers.ctseries import write_series
from tests.helpers.net import pynetdicom_send


@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xC211, 0xB000])
@pytest.mark.parametrize("instance_uid", ["1.2.3.4", "1.2.826.0.1.3680043.2.1125.1.12345"])
def test_c_store_rsp_bytes_equal_pynetdicom(status: int, instance_uid: str) -> None:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = 7
    primitive.AffectedSOPClassUID = CTImageStorage
    primitive.AffectedSOPInstanceUID = instance_uid
    primitive.Status = status
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    [pdata] = list(message.encode_msg(1, 16384))
    [(context_id, pdv)] = pdata.presentation_data_value_list
    assert context_id == 1 and pdv[0] == 0x03
    assert encode_c_store_rsp(CTImageStorage, instance_uid, 7, status) == pdv[1:]


@pytest.mark.parametrize("move", [False, True], ids=["plain", "move-originator"])
def test_c_store_rq_decodes_as_pynetdicom_does(move: bool) -> None:
    primitive = C_STORE()
    primitive.MessageID = 513
    primitive.AffectedSOPClassUID = CTImageStorage
    primitive.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.2.1125.1.123"
    primitive.Priority = 1
    if move:
        primitive.MoveOriginatorApplicationEntityTitle = "MOVER"
        primitive.MoveOriginatorMessageID = 9
    primitive.DataSet = BytesIO(b"\x08\x00\x18\x00UI\x02\x001\x00")
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    command = next(iter(message.encode_msg(1, 0))).presentation_data_value_list[0][1][1:]
    fields = decode_c_store_rq(command)
    assert fields is not None
    assert (fields.sop_class_uid, fields.sop_instance_uid, fields.message_id,
            fields.priority) == (CTImageStorage, "1.2.826.0.1.3680043.2.1125.1.123", 513, 1)
    assert fields.move_originator_aet == ("MOVER" if move else None)
    assert fields.move_originator_message_id == (9 if move else None)


def test_other_commands_are_left_to_pynetdicom() -> None:
    echo = C_ECHO()
    echo.MessageID = 1
    echo.AffectedSOPClassUID = "1.2.840.10008.1.1"
    message = C_ECHO_RQ()
    message.primitive_to_message(echo)
    command = next(iter(message.encode_msg(1, 0))).presentation_data_value_list[0][1][1:]
    assert decode_c_store_rq(command) is None
    store = encode_c_store_rsp(CTImageStorage, "1.2.3", 1, 0)  # a response, not a request
    assert decode_c_store_rq(store) is None
    assert decode_c_store_rq(b"\x00\x00\x02\x00\xff\x00\x00\x001.2") is None  # runs past


class _FakeDUL:
    def __init__(self) -> None:
        self.sent: list[Any] = []

    def send_pdu(self, primitive: Any) -> None:
        self.sent.append(primitive)


class _FakeDIMSE:
    def __init__(self, max_pdu: int) -> None:
        self.maximum_pdu_size = max_pdu
        self.dul = _FakeDUL()


@pytest.mark.parametrize("max_pdu", [0, 16384, 40])
def test_send_command_fragments_like_pynetdicom(max_pdu: int) -> None:
    command = encode_c_store_rsp(CTImageStorage, "1.2.3.4.5.6.7.8.9", 3, 0)
    dimse = _FakeDIMSE(max_pdu)
    send_command(dimse, command, 5)  # type: ignore[arg-type]
    pdvs = [p.presentation_data_value_list[0] for p in dimse.dul.sent]
    assert all(cx == 5 for cx, _ in pdvs)
    assert b"".join(pdv[1:] for _, pdv in pdvs) == command
    assert [pdv[0] for _, pdv in pdvs] == [0x01] * (len(pdvs) - 1) + [0x03]
    if max_pdu:
        assert all(len(pdv) + 4 <= max_pdu for _, pdv in pdvs)
    assert len(pdvs) == (1 if max_pdu != 40 else -(-len(command) // 34))
    decoded = decode(BytesIO(command), True, True)
    assert decoded.CommandField == 0x8001 and decoded.Status == 0


LISTENER_METRICS = NodeMetrics()


@pytest.fixture
def listener(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Callable[[evt.Event], Any]],
                                                                   int]]:
    """Start a node transport listener with a given EVT_C_STORE handler; yields a
    function that takes the handler and returns the port. pynetdicom's standard log
    handlers are off, as ``node.logs.setup_logging`` leaves them (a bound DIMSE handler
    sends every message down pynetdicom's own path)."""
    monkeypatch.setattr(pynetdicom_config, "LOG_HANDLER_LEVEL", "none")
    started: list[AE] = []

    def start(handler: Callable[[evt.Event], Any]) -> int:
        ae = AE(ae_title="TRANSPORT")
        ae.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        server = start_listener(ae, ("127.0.0.1", 0), [(evt.EVT_C_STORE, handler)],
                                metrics=LISTENER_METRICS)
        started.append(ae)
        return int(server.server_address[1])

    yield start
    for ae in started:
        ae.shutdown()


def test_short_paths_in_use_and_statuses_arrive(
        listener: Callable[[Callable[[evt.Event], Any]], int], tmp_path: Path) -> None:
    """Each returned status reaches the peer, and the association and its DUL are the
    node's classes (so the short paths are what this test exercised)."""
    series = write_series(tmp_path / "in", 4, rows=32, seed=3)
    statuses = iter([0x0000, 0xA700, 0xC212, 0x0000])
    seen: list[tuple[type, type, str]] = []
    lock = threading.Lock()

    def handler(event: evt.Event) -> int:
        with lock:
            seen.append((type(event.assoc), type(event.assoc.dul),
                         str(event.request.AffectedSOPInstanceUID)))
            return next(statuses)

    port = listener(handler)
    assert pynetdicom_send(port, series.files, called_ae="TRANSPORT") == [0, 0xA700, 0xC212, 0]
    assert {(a, d) for a, d, _ in seen} == {(PromptAssociation, PromptDUL)}
    assert [uid for _, _, uid in seen] == [
        str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in series.files]


def test_handler_exception_answers_c211(
        listener: Callable[[Callable[[evt.Event], Any]], int], tmp_path: Path) -> None:
    series = write_series(tmp_path / "in", 2, rows=32, seed=4)
    calls: list[int] = []

    def handler(event: evt.Event) -> int:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("handler failed")
        return 0

    port = listener(handler)
    before = LISTENER_METRICS.registry.get_sample_value(
        "ich_node_store_failures_total", {"reason": "handler_error"}) or 0.0
    assert pynetdicom_send(port, series.files, called_ae="TRANSPORT") == [0xC211, 0]
    assert LISTENER_METRICS.registry.get_sample_value(
        "ich_node_store_failures_total", {"reason": "handler_error"}) == before + 1


def test_dataset_status_takes_pynetdicoms_path(
        listener: Callable[[Callable[[evt.Event], Any]], int], tmp_path: Path) -> None:
    """A status data set (with an Error Comment) is answered through pynetdicom's
    response primitive: the comment reaches the peer."""
    series = write_series(tmp_path / "in", 1, rows=32, seed=5)

    def handler(event: evt.Event) -> Dataset:
        status = Dataset()
        status.Status = 0xC210
        status.ErrorComment = "cannot understand"
        return status

    port = listener(handler)
    ae = AE(ae_title="PEER")
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="TRANSPORT")
    assert assoc.is_established
    try:
        response = assoc.send_c_store(dcmread(series.files[0]))
    finally:
        assoc.release()
    assert response.Status == 0xC210
    assert response.ErrorComment == "cannot understand"
