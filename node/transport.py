"""Transport tuning and hardening of the listener (pynetdicom's request handler and socket).

Speed (``bench/ingest.py``, BENCHMARKS.md): every short path below ends where
pynetdicom's own path would, with the same bytes and statuses, and falls back to
pynetdicom's code for anything it does not cover (``tests/node/test_transport.py``).
These classes replace pynetdicom's on each accepted association (``__class__``), so they
follow pynetdicom 3.0.x's internals: ``setup.cfg`` pins ``pynetdicom<3.1``.

- :class:`FastAssociationSocket`: pynetdicom's ``recv`` reads at most 4 KiB per system
  call and grows a bytearray; a 256 KiB P-DATA PDU cost 64 calls. This one reads into a
  buffer of the PDU's size.
- :class:`PromptDUL`: waits in ``select`` instead of polling, and hands a P-DATA-TF in
  Sta6 straight to the DIMSE provider (DT-2) without copying and queueing it.
- :class:`GuardedDIMSEServiceProvider`: decodes a C-STORE-RQ command set by hand.
- :class:`PromptAssociation`: wakes when a message is queued instead of sleeping 1 ms per
  look, and serves a plain C-STORE without pynetdicom's Storage Service Class, its
  response encoded by hand (:func:`encode_c_store_rsp`).

These rules protect the node from malformed or hostile peers (``docs/fuzzing.md``):

- Every accepted socket gets ``dicom.network_timeout_s`` as its socket timeout. Python's
  ``accept()`` returns a blocking socket without the listener's timeout, so a peer that
  sent a PDU header (or a stray byte after an unknown PDU) and then went silent held
  its association thread, and a ``dicom.max_associations`` slot, until it closed the
  connection. Now the read times out and pynetdicom ends the association.
- A PDU whose length field exceeds :func:`pdu_length_limit` is answered with an
  A-ABORT (PS3.8 9.3.8: service provider, invalid PDU parameter value) and the
  connection is closed: a 6-byte header claiming 0xFFFFFFFF bytes made the buffer above
  allocate, and zero, 4 GiB. Buffers are also allocated as data arrives (at most
  :data:`RECV_CHUNK_BYTES` ahead of it), so memory follows what a peer really sends.

- A P-DATA whose DIMSE command set does not decode (e.g. a CommandField of the wrong
  length) made pynetdicom 3.0.4's decoder raise inside its state machine, outside the
  reactor's error handling: the DUL thread died and the connection closed without an
  A-ABORT. :class:`GuardedDIMSEServiceProvider` turns that into an invalid-PDU event
  (Evt19), which sends the A-ABORT (PS3.8 9.2, AA-8) as pynetdicom does for the other
  undecodable messages.

- When a peer's malformed PDU makes pynetdicom abort (Sta13, awaiting the close) while
  the association thread is still answering the A-ASSOCIATE-RQ or a request, the late
  local primitive (Evt7, Evt8, ...) raised InvalidEventError and killed the DUL thread
  with a traceback on stderr. :class:`AbortTolerantStateMachine` drops such local
  primitives in Sta13, as PS3.8's state table leaves nothing to do there but close. It
  also turns a failing action on a received PDU (a P-DATA with an even presentation
  context ID raised ValueError in ``to_primitive``) into an A-ABORT.

TLS: pynetdicom's server wraps each accepted socket and runs the TLS handshake on the
one thread that accepts connections, with no time limit, and drops a failed handshake
without a word. :class:`NodeAssociationServer` defers the handshake to the
connection's own thread, with ``dicom.tls.handshake_timeout_s``, and reports each
failure (a log line and a metric) through ``on_tls_failure``.

Behaviour is otherwise pynetdicom's own.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from io import BytesIO
from typing import Any, cast

from pynetdicom import AE, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.fsm import TRANSITION_TABLE, StateMachine
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer
from pynetdicom.utils import make_target

from node.dsheader import TAG_LENGTH, U16, U32
from node.metrics import NodeMetrics
from node.tls import describe_peer

LOGGER = logging.getLogger(__name__)

DUL_IDLE_SLEEP_S = 0.0002
DUL_IDLE_WAIT_S = 0.005  # an idle DUL loop blocks in select() at most this long
REACTOR_IDLE_WAIT_S = 0.001  # pynetdicom's association reactor sleeps this long per loop
MIN_PDU_LENGTH_LIMIT = 1024 * 1024  # bytes; an A-ASSOCIATE-RQ may be larger than max_pdu_bytes
RECV_CHUNK_BYTES = 1024 * 1024  # a receive buffer grows by at most this much ahead of the data
# A-ABORT, PS3.8 9.3.8: source 2 = DICOM UL service-provider, reason 6 = invalid PDU
# parameter value.
ABORT_SOURCE_PROVIDER = 0x02
ABORT_INVALID_PDU_PARAMETER = 0x06
C_STORE_RQ_COMMAND_FIELD = 0x0001  # PS3.7 E.1
C_STORE_RSP_COMMAND_FIELD = 0x8001
NO_DATA_SET = 0x0101  # CommandDataSetType: no data set follows
LAST_COMMAND_FRAGMENT = b"\x03"  # PDV message control header: command, last fragment
COMMAND_FRAGMENT = b"\x01"  # PDV message control header: command, more fragments follow
HANDLER_FAILED = 0xC211  # pynetdicom's status when the EVT_C_STORE handler raises
P_DATA_TF_TYPE = 0x04  # PS3.8 9.3.1
PDV_OVERHEAD_BYTES = 6  # PDV item length (4) + context ID (1) + control header (1)


def pdu_length_limit(max_pdu_bytes: int) -> int | None:
    """The longest PDU we read, bytes: ``dicom.max_pdu_bytes`` (what we announce as
    Maximum Length Received, PS3.8 D.1), at least :data:`MIN_PDU_LENGTH_LIMIT` so that
    association requests and peers that slightly exceed the announced size still pass;
    None (no limit) when ``max_pdu_bytes`` is 0 (unlimited)."""
    return max(max_pdu_bytes, MIN_PDU_LENGTH_LIMIT) if max_pdu_bytes else None


class PDUTooLarge(OSError):
    """A PDU length field exceeds :func:`pdu_length_limit`. An OSError, so that pynetdicom's
    reader treats it as a lost connection (Evt17) and ends the association."""


class FastAssociationSocket(AssociationSocket):
    """An AssociationSocket whose ``recv`` fills one buffer with as few calls as the
    kernel allows, and refuses PDUs longer than ``max_pdu_length``."""

    max_pdu_length: int | None = None  # set per connection by NodeRequestHandler
    metrics: NodeMetrics | None = None

    def recv(self, nr_bytes: int) -> bytearray:
        """Read *nr_bytes*; fewer only when the peer closed the connection. Raises
        :class:`PDUTooLarge` (after sending an A-ABORT) when *nr_bytes* exceeds
        ``max_pdu_length``, TimeoutError when the peer is silent for the socket timeout."""
        assert self.socket is not None
        if self.max_pdu_length is not None and nr_bytes > self.max_pdu_length:
            self._abort_too_large(nr_bytes)
        buffer = bytearray(min(nr_bytes, RECV_CHUNK_BYTES))
        nr_read = 0
        while nr_read < nr_bytes:
            if nr_read == len(buffer):  # grow only as the data arrives
                buffer.extend(bytes(min(nr_bytes - nr_read, RECV_CHUNK_BYTES)))
            with memoryview(buffer) as view:
                try:
                    count = self.socket.recv_into(view[nr_read:], len(buffer) - nr_read)
                except TimeoutError:
                    self._count("read_timeout")
                    LOGGER.warning("protocol error from %s: silent for %s s with %d of %d "
                                   "bytes read (dicom.network_timeout_s); closing", self._peer(),
                                   self.socket.gettimeout(), nr_read, nr_bytes)
                    raise
            if count == 0:  # connection closed: return what arrived, as pynetdicom does
                del buffer[nr_read:]
                return buffer
            nr_read += count
        return buffer

    def _peer(self) -> str:
        return str(self.assoc.requestor.address) if self.assoc is not None else "?"

    def _count(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.protocol_errors.labels(reason=reason).inc()

    def _abort_too_large(self, nr_bytes: int) -> None:
        assert self.socket is not None
        peer = self._peer()
        self._count("pdu_too_large")
        LOGGER.warning("protocol error from %s: PDU length field says %d bytes, more than the "
                       "%d we accept (dicom.max_pdu_bytes); sending A-ABORT and closing",
                       peer, nr_bytes, self.max_pdu_length)
        pdu = A_ABORT_RQ()
        pdu.source = ABORT_SOURCE_PROVIDER
        pdu.reason_diagnostic = ABORT_INVALID_PDU_PARAMETER
        try:
            self.socket.sendall(pdu.encode())
        except OSError as exc:  # the peer may be gone already; the connection ends anyway
            LOGGER.info("A-ABORT to %s not sent: %s", peer, exc)
        raise PDUTooLarge(f"PDU length {nr_bytes} exceeds the limit of {self.max_pdu_length} "
                          "bytes")


def _element(tag: int, value: bytes) -> bytes:
    """One command-set element, Implicit VR Little Endian (PS3.7 6.3.1)."""
    return TAG_LENGTH.pack(0x0000, tag, len(value)) + value


def _uid_value(uid: str) -> bytes:
    value = uid.encode("ascii")
    return value + b"\0" if len(value) % 2 else value


def encode_c_store_rsp(sop_class_uid: str, sop_instance_uid: str, message_id: int,
                       status: int) -> bytes:
    """The command set of a C-STORE-RSP without data set or error elements (PS3.7 9.3.1.2),
    the bytes pynetdicom's pydicom-based encoder writes (tests/node/test_transport.py)."""
    body = b"".join((
        _element(0x0002, _uid_value(sop_class_uid)),
        _element(0x0100, U16.pack(C_STORE_RSP_COMMAND_FIELD)),
        _element(0x0120, U16.pack(message_id)),
        _element(0x0800, U16.pack(NO_DATA_SET)),
        _element(0x0900, U16.pack(status)),
        _element(0x1000, _uid_value(sop_instance_uid)),
    ))
    return _element(0x0000, U32.pack(len(body))) + body


def send_command(dimse: DIMSEServiceProvider, command: bytes, context_id: int) -> None:
    """Send a command set without data set as P-DATA, in one PDV when it fits the peer's
    maximum PDU (a response always does), else fragmented as pynetdicom does."""
    max_pdu = dimse.maximum_pdu_size
    if max_pdu and len(command) + PDV_OVERHEAD_BYTES > max_pdu:
        for start in range(0, len(command), max_pdu - PDV_OVERHEAD_BYTES):
            fragment = command[start:start + max_pdu - PDV_OVERHEAD_BYTES]
            last = start + len(fragment) >= len(command)
            pdata = P_DATA()
            pdata.presentation_data_value_list.append(
                (context_id, (LAST_COMMAND_FRAGMENT if last else COMMAND_FRAGMENT) + fragment))
            dimse.dul.send_pdu(pdata)
        return
    pdata = P_DATA()
    pdata.presentation_data_value_list.append((context_id, LAST_COMMAND_FRAGMENT + command))
    dimse.dul.send_pdu(pdata)


class GuardedDIMSEServiceProvider(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider; a message that does not decode aborts the association
    instead of killing the DUL thread."""

    metrics: NodeMetrics | None = None
    _store: _IncomingStore | None = None  # a C-STORE-RQ on the short path, data to come

    def receive_primitive(self, primitive: P_DATA) -> None:
        """Collect a P-DATA fragment; Evt19 (A-ABORT) when the message does not decode.

        A C-STORE request whose command set arrives whole in one fragment and holds only
        the elements of PS3.7 9.3.1.1 is decoded by :func:`decode_c_store_rq` and its data
        set collected here, into the same C-STORE primitive pynetdicom would queue. Any
        other message, or a handler bound to received DIMSE messages, takes pynetdicom's
        path."""
        try:
            if self._store is not None or (self.message is None and self._start_store(primitive)):
                self._collect_store(primitive)
                return
            super().receive_primitive(primitive)
        except Exception as exc:  # pynetdicom's decoder raises many types on malformed input
            self.message = None
            self._store = None
            if self.metrics is not None:
                self.metrics.protocol_errors.labels(reason="bad_dimse_message").inc()
            LOGGER.warning("protocol error from %s: DIMSE message does not decode (%s: %s); "
                           "sending A-ABORT", self.assoc.requestor.address,
                           type(exc).__name__, exc)
            self.dul.event_queue.put("Evt19")  # invalid PDU: AA-8 sends the A-ABORT

    def _start_store(self, primitive: P_DATA) -> bool:
        """Begin the short path when *primitive* starts with a whole C-STORE-RQ command."""
        pdvs = primitive.presentation_data_value_list
        if (not pdvs or self.assoc.get_handlers(evt.EVT_DIMSE_RECV)
                or pynetdicom_config.STORE_RECV_CHUNKED_DATASET):
            return False
        context_id, data = pdvs[0]
        if len(data) < 2 or data[0] != LAST_COMMAND_FRAGMENT[0]:
            return False
        fields = decode_c_store_rq(data[1:])
        if fields is None:
            return False
        request = C_STORE()
        request.MessageID = fields.message_id
        request.AffectedSOPClassUID = fields.sop_class_uid
        request.AffectedSOPInstanceUID = fields.sop_instance_uid
        request.Priority = fields.priority
        if fields.move_originator_aet is not None:
            request.MoveOriginatorApplicationEntityTitle = fields.move_originator_aet
        if fields.move_originator_message_id is not None:
            request.MoveOriginatorMessageID = fields.move_originator_message_id
        self._store = _IncomingStore(request, context_id, BytesIO(), first_pdv=1)
        return True

    def _collect_store(self, primitive: P_DATA) -> None:
        """Append the data set fragments of the short-path C-STORE; queue it when whole."""
        store = self._store
        assert store is not None
        pdvs = primitive.presentation_data_value_list
        for index in range(store.first_pdv, len(pdvs)):
            data = pdvs[index][1]
            if not data or data[0] & 1:  # a command fragment inside a data set
                raise ValueError("command fragment where data set fragments were expected")
            store.data.write(data[1:])
            if data[0] & 2:  # the last fragment
                if index != len(pdvs) - 1:
                    raise ValueError("PDVs after the last fragment of a data set")
                request = store.request
                request.DataSet = store.data
                request._context_id = store.context_id
                self._store = None
                self.msg_queue.put((store.context_id, request))
                return
        store.first_pdv = 0


@dataclass
class _IncomingStore:
    """A C-STORE request on the short path while its data set arrives."""

    request: C_STORE
    context_id: int
    data: BytesIO
    first_pdv: int  # PDVs of the current P-DATA before this index were the command


@dataclass(frozen=True)
class CStoreRequestFields:
    """The command set of a C-STORE-RQ (PS3.7 9.3.1.1)."""

    sop_class_uid: str
    sop_instance_uid: str
    message_id: int
    priority: int
    move_originator_aet: str | None
    move_originator_message_id: int | None


_C_STORE_RQ_UI = {0x0002: "sop_class_uid", 0x1000: "sop_instance_uid"}
_C_STORE_RQ_US = {0x0100: "command_field", 0x0110: "message_id", 0x0700: "priority",
                  0x0800: "data_set_type", 0x1031: "move_originator_message_id"}


def decode_c_store_rq(command: bytes | memoryview) -> CStoreRequestFields | None:
    """The fields of an Implicit VR Little Endian C-STORE-RQ command set that carries a
    data set; None for anything else (another command, another element, a bad length),
    which pynetdicom then decodes (``tests/node/test_transport.py``)."""
    view = memoryview(command)
    uids: dict[str, str] = {}
    shorts: dict[str, int] = {}
    aet: str | None = None
    pos = 0
    while pos < len(view):
        if len(view) - pos < 8:
            return None
        group, element, length = TAG_LENGTH.unpack_from(view, pos)
        pos += 8
        if group != 0x0000 or pos + length > len(view):
            return None
        value = view[pos:pos + length]
        pos += length
        if element == 0x0000:
            continue  # Command Group Length: the PDV length already delimits the set
        if element in _C_STORE_RQ_UI:
            try:
                uids[_C_STORE_RQ_UI[element]] = bytes(value).decode("ascii").rstrip("\0 ")
            except UnicodeDecodeError:
                return None
        elif element in _C_STORE_RQ_US:
            if length != 2:
                return None
            shorts[_C_STORE_RQ_US[element]] = U16.unpack_from(value)[0]
        elif element == 0x1030:  # Move Originator Application Entity Title
            try:
                aet = bytes(value).decode("ascii").strip()
            except UnicodeDecodeError:
                return None
        else:
            return None
    if (shorts.get("command_field") != C_STORE_RQ_COMMAND_FIELD
            or shorts.get("data_set_type", NO_DATA_SET) == NO_DATA_SET
            or "message_id" not in shorts or "priority" not in shorts
            or not uids.get("sop_class_uid") or not uids.get("sop_instance_uid")):
        return None
    return CStoreRequestFields(uids["sop_class_uid"], uids["sop_instance_uid"],
                               shorts["message_id"], shorts["priority"], aet,
                               shorts.get("move_originator_message_id"))



# Local user primitives (PS3.8 Table 9-10): A-ASSOCIATE response accept/reject, P-DATA
# request, A-RELEASE request/response, A-ABORT request.
_LOCAL_EVENTS = frozenset({"Evt7", "Evt8", "Evt9", "Evt11", "Evt14", "Evt15"})


# Events raised by a PDU received from the peer (PS3.8 Table 9-10).
_PEER_EVENTS = frozenset({"Evt3", "Evt4", "Evt6", "Evt10", "Evt12", "Evt13", "Evt16"})


class AbortTolerantStateMachine(StateMachine):
    """pynetdicom's state machine; a local primitive that arrives after the association
    was aborted (Sta13) is dropped, and a received PDU whose action fails (e.g. a P-DATA
    with an even presentation context ID) aborts the association, instead of killing the
    DUL thread."""

    metrics: NodeMetrics | None = None

    def do_action(self, event: str) -> None:
        """Execute the action of *event*; see the class docstring for the exceptions."""
        if (self.current_state == "Sta13" and event in _LOCAL_EVENTS
                and (event, "Sta13") not in TRANSITION_TABLE):
            LOGGER.info("association already aborted: late local %s dropped", event)
            return
        try:
            super().do_action(event)
        except Exception as exc:  # pynetdicom raises many types on malformed PDUs
            if event not in _PEER_EVENTS:
                raise
            self._abort(event, exc)

    def _abort(self, event: str, exc: Exception) -> None:
        """What pynetdicom's reactor does for its own errors: A-ABORT, end the association
        (the state machine has already stopped the DUL thread)."""
        assoc = self.dul.assoc
        if self.metrics is not None:
            self.metrics.protocol_errors.labels(reason="bad_pdu").inc()
        LOGGER.warning("protocol error from %s: a received PDU (%s in %s) could not be "
                       "processed (%s: %s); sending A-ABORT", assoc.requestor.address, event,
                       self.current_state, type(exc).__name__, exc)
        pdu = A_ABORT_RQ()
        pdu.source = ABORT_SOURCE_PROVIDER
        pdu.reason_diagnostic = ABORT_INVALID_PDU_PARAMETER
        try:
            if self.dul.socket is not None:
                self.dul.socket.send(pdu.encode())
        except OSError as send_error:  # the peer may be gone; the association ends anyway
            LOGGER.info("A-ABORT to %s not sent: %s", assoc.requestor.address, send_error)
        assoc.is_aborted = True
        assoc.is_established = False
        assoc._kill = True


class PromptDUL(DULServiceProvider):
    """pynetdicom's DUL provider; when idle it waits for the socket or for a primitive to
    send instead of polling.

    pynetdicom 3.0.4's DUL reactor sleeps ``_run_loop_delay`` between looks at the socket
    and at its outgoing queue: a short delay costs a core's worth of polling per idle
    association, a long one delays every C-STORE-RSP. Here an idle loop blocks in
    ``select`` on the socket and on a wake-up pipe that :meth:`send_pdu` and
    :meth:`kill_dul` write to, for at most :data:`DUL_IDLE_WAIT_S` (the ARTIM timer and
    the other checks still run that often). The loop is pynetdicom's otherwise, statement
    for statement; over TLS (buffered bytes that ``select`` cannot see) it keeps
    pynetdicom's sleep.
    """

    _wake_r: int = -1
    _wake_w: int = -1
    _wake_lock: threading.Lock  # guards _wake_w: never write to a closed (reused) fd

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        self._wake()

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake()

    def _wake(self) -> None:
        lock = getattr(self, "_wake_lock", None)
        if lock is None:  # the reactor has not started
            return
        with lock:
            if self._wake_w >= 0:
                try:
                    os.write(self._wake_w, b"w")
                except BlockingIOError:  # the pipe is full: a wake-up is already pending
                    pass

    def _read_pdu_data(self) -> None:
        """Read one PDU; a P-DATA-TF in Sta6 goes straight to the DIMSE provider.

        That is what pynetdicom's own path ends in (Evt10 in Sta6 is DT-2, which hands
        the P-DATA indication to the DIMSE provider and stays in Sta6), without copying
        the PDU three times, decoding it into item objects and queueing it for the state
        machine. Any other PDU, any other state, pending state-machine events, a handler
        bound to the raw PDU events, TLS, or a PDU whose items do not add up: pynetdicom's
        path, unchanged."""
        header = self._peek_header()
        if header is None:
            super()._read_pdu_data()
            return
        sock = cast(AssociationSocket, self.socket)
        pdu_length = int.from_bytes(header[2:6], "big")
        try:
            sock.recv(6)
            body = sock.recv(pdu_length)
        except (OSError, TimeoutError) as exc:  # as pynetdicom: Evt17, connection closed
            LOGGER.error("Connection closed before the entire PDU was received: %s", exc)
            self.event_queue.put("Evt17")
            return
        if len(body) != pdu_length:
            LOGGER.error("The received PDU is shorter than expected (%d of %d bytes received)",
                         6 + len(body), 6 + pdu_length)
            self.event_queue.put("Evt17")
            return
        primitive = P_DATA()
        view = memoryview(body)
        offset = 0
        while offset < pdu_length:
            item_length = int.from_bytes(view[offset:offset + 4], "big")
            end = offset + 4 + item_length
            if item_length < 2 or end > pdu_length:  # no context ID and control header
                LOGGER.error("Unable to decode the received P-DATA-TF PDU: a PDV item of "
                             "%d bytes at offset %d of %d", item_length, offset, pdu_length)
                self.event_queue.put("Evt19")  # invalid PDU: A-ABORT
                return
            # A view, not a copy: the DIMSE decoder only indexes, slices and writes it.
            primitive.presentation_data_value_list.append(
                (view[offset + 4], cast(bytes, view[offset + 5:end])))
            offset = end
        self.assoc.dimse.receive_primitive(primitive)

    def _peek_header(self) -> bytes | None:
        """The 6-byte header of a waiting P-DATA-TF PDU when the short path applies
        (see :meth:`_read_pdu_data`), else None."""
        sock = self.socket.socket if self.socket is not None else None
        if (sock is None or isinstance(sock, ssl.SSLSocket)
                or self.state_machine.current_state != "Sta6"
                or not self.event_queue.empty()
                or self.assoc.get_handlers(evt.EVT_DATA_RECV)
                or self.assoc.get_handlers(evt.EVT_PDU_RECV)):
            return None
        try:
            header = sock.recv(6, socket.MSG_PEEK)
        except (OSError, ValueError):  # pynetdicom's path reads it again and reports
            return None
        if len(header) < 6 or header[0] != P_DATA_TF_TYPE:
            return None
        return header

    def _wait_idle(self) -> None:
        """Block until the socket is readable, a primitive is queued, or the idle wait ends."""
        sock = self.socket.socket if self.socket is not None else None
        if (self._wake_r < 0 or sock is None or isinstance(sock, ssl.SSLSocket)
                or not self.socket._is_connected):  # type: ignore[union-attr]
            time.sleep(self._run_loop_delay)
            return
        try:
            readable, _, _ = select.select([sock.fileno(), self._wake_r], [], [],
                                           DUL_IDLE_WAIT_S)
        except (OSError, ValueError):  # the socket closed under us: the next loop's
            return  # transport check reports it (Evt17), as pynetdicom's own loop does
        if self._wake_r in readable:
            try:
                os.read(self._wake_r, 4096)
            except BlockingIOError:
                pass

    def run_reactor(self) -> None:
        self._wake_lock = threading.Lock()
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        with self._wake_lock:
            self._wake_r, self._wake_w = wake_r, wake_w
        try:
            self._run_prompt_reactor()
        finally:
            with self._wake_lock:
                self._wake_r = self._wake_w = -1
                os.close(wake_r)
                os.close(wake_w)

    def _run_prompt_reactor(self) -> None:
        self._idle_timer.start()
        self.socket = cast(AssociationSocket, self.socket)
        idle = False
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
            if idle:
                self._wait_idle()
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:
                LOGGER.error("Exception in DUL.run(), aborting association")
                LOGGER.exception(exc)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                self.socket.send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                idle = True
                continue
            self.state_machine.do_action(event)
            idle = False


class PromptAssociation(Association):
    """pynetdicom's association; its reactor wakes as soon as a DIMSE message is queued.

    pynetdicom 3.0.4's acceptor reactor sleeps 1 ms before every look at its message
    queue, so each C-STORE waited half a millisecond on average (more with the kernel's
    timer slack) before its handler ran. This loop is pynetdicom's, statement for
    statement, except that the sleep is a wait on the queue's condition that ends when a
    message arrives (at most the same 1 ms, so release, abort and timeouts are seen as
    soon as before). The message is still taken after the pause checkpoint, so the
    ``send_*`` methods that pause the reactor keep their guarantee.

    A C-STORE request is served by :meth:`_serve_store` where pynetdicom's Storage
    Service Class would do nothing more than call the EVT_C_STORE handler and answer
    with the status it returns: the same handler call and the same response bytes,
    without building and validating a response primitive (a quarter of the receiving
    thread's time per instance, ``bench/ingest.py``).
    """

    def _serve_request(self, msg: Any, context_id: int) -> None:
        if not self._serve_store(msg, context_id):
            super()._serve_request(msg, context_id)

    def _serve_store(self, msg: Any, context_id: int) -> bool:
        """Serve a plain C-STORE request; False (nothing done) when anything is unusual:
        not a C-STORE request, a release under way, an unknown context, extended
        negotiation, pynetdicom's unrestricted or chunked storage modes, a SOP class that
        is not a storage class, or a handler bound to sent DIMSE messages."""
        if (type(msg) is not C_STORE or self._sent_release or not msg.is_valid_request
                or context_id not in self._accepted_cx
                or self.acceptor.accepted_common_extended
                or pynetdicom_config.UNRESTRICTED_STORAGE_SERVICE
                or pynetdicom_config.STORE_RECV_CHUNKED_DATASET
                or self.get_handlers(evt.EVT_DIMSE_SENT)):
            return False
        sop_class, sop_instance = msg.AffectedSOPClassUID, msg.AffectedSOPInstanceUID
        message_id = msg.MessageID
        if (not sop_class or not sop_instance or message_id is None
                or uid_to_service_class(sop_class) is not StorageServiceClass):
            return False
        context = self._accepted_cx[context_id]
        self.dimse.cancel_req = {}
        self._is_paused = True
        try:
            try:
                status = evt.trigger(self, evt.EVT_C_STORE,
                                     {"request": msg, "context": context.as_tuple})
            except Exception as exc:  # as pynetdicom: logged, answered with 0xC211
                LOGGER.error("Exception in handler bound to 'evt.EVT_C_STORE'")
                LOGGER.exception(exc)
                status = HANDLER_FAILED
                metrics = getattr(self.dimse, "metrics", None)
                if metrics is not None:
                    metrics.store_failures.labels(reason="handler_error").inc()
            if not self.is_established:
                return True
            if type(status) is not int:  # a Dataset or a bad value: pynetdicom's rules
                rsp = C_STORE()
                rsp.MessageIDBeingRespondedTo = message_id
                rsp.AffectedSOPInstanceUID = sop_instance
                rsp.AffectedSOPClassUID = sop_class
                rsp = StorageServiceClass(self).validate_status(cast(Any, status), rsp)
                self.dimse.send_msg(rsp, context_id)
                return True
            command = encode_c_store_rsp(sop_class, sop_instance, message_id, status)
            send_command(self.dimse, command, context_id)
        finally:
            self._is_paused = False
            self.dimse.cancel_req = {}
        return True

    def _wait_for_message(self, timeout_s: float) -> None:
        """Return when the DIMSE queue holds a message, or after *timeout_s*."""
        msg_queue = self.dimse.msg_queue
        with msg_queue.not_empty:  # holds msg_queue.mutex: qsize() would deadlock
            if not msg_queue.queue:
                msg_queue.not_empty.wait(timeout_s)

    def _run_reactor(self) -> None:
        self._is_paused = False
        while not self._kill:
            self._wait_for_message(REACTOR_IDLE_WAIT_S)

            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, cast(int, context_id))

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                LOGGER.info("Association Released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                log_msg = "Association Aborted"
                if self.acse.is_aborted("a-p-abort"):
                    log_msg += " (A-P-ABORT)"
                LOGGER.info(log_msg)
                self.dul.receive_pdu(wait=False)  # EVT_ACSE_RECV for subscribers
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                LOGGER.error("Network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


TlsFailureHandler = Callable[[str, str], None]  # (peer address, reason)


class NodeAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server; with an SSL context, the handshake runs on the
    connection's thread (see the module docstring)."""

    handshake_timeout_s: float = 10.0
    on_tls_failure: TlsFailureHandler | None = None
    node_metrics: NodeMetrics | None = None

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client, address = self.socket.accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True,
                                                  do_handshake_on_connect=False)
        return client, address


class NodeRequestHandler(RequestHandler):
    """pynetdicom's request handler, with a :class:`FastAssociationSocket`, the socket
    timeout of ``dicom.network_timeout_s`` and the TLS handshake done here, on the
    connection's own thread."""

    server: NodeAssociationServer

    def handle(self) -> None:
        if isinstance(self.request, ssl.SSLSocket) and not self._handshake(self.request):
            return
        super().handle()

    def _handshake(self, sock: ssl.SSLSocket) -> bool:
        """Complete the TLS handshake within the server's timeout; False (reported) if not."""
        address = str(self.client_address[0])
        try:
            sock.settimeout(self.server.handshake_timeout_s)
            sock.do_handshake()
            sock.settimeout(None)  # pynetdicom polls with select(); the socket blocks again
        except (OSError, ValueError) as exc:  # ssl.SSLError, timeout, reset by the peer
            if isinstance(exc, ssl.SSLError):
                reason = str(exc.reason or type(exc).__name__)
            else:
                reason = f"{type(exc).__name__}: {exc}"
            LOGGER.warning("TLS handshake from %s failed: %s", address, reason)
            if self.server.on_tls_failure is not None:
                self.server.on_tls_failure(address, reason)
            return False
        LOGGER.debug("TLS connection from %s: %s", address, describe_peer(sock))
        return True

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        if type(assoc) is Association:  # noqa: E721 - exactly the base class
            assoc.__class__ = PromptAssociation
        if type(assoc.dul) is DULServiceProvider:  # noqa: E721 - exactly the base class
            assoc.dul.__class__ = PromptDUL
            # Thread.__init__ bound the thread's target to pynetdicom's run_reactor; bind it
            # again, the same way (make_target: contextvars, as pynetdicom does), to ours.
            assoc.dul._target = make_target(assoc.dul.run_reactor)  # type: ignore[attr-defined]
        # pynetdicom's idle nap (1 ms), still used where PromptDUL cannot wait in select()
        # (TLS) and by pynetdicom's own waits on the DUL: shorter answers sooner.
        assoc.dul._run_loop_delay = DUL_IDLE_SLEEP_S
        sock = assoc.dul.socket
        if type(sock) is AssociationSocket:  # noqa: E721 - exactly the base class
            # Same object and state, one overridden method: no second socket, no second
            # transport-connected event in the state machine.
            sock.__class__ = FastAssociationSocket
            fast = cast(FastAssociationSocket, sock)
            fast.max_pdu_length = pdu_length_limit(self.ae.maximum_pdu_size)
            fast.metrics = getattr(self.server, "node_metrics", None)
        if type(assoc.dul.state_machine) is StateMachine:  # noqa: E721 - exactly the base
            assoc.dul.state_machine.__class__ = AbortTolerantStateMachine
            cast(AbortTolerantStateMachine, assoc.dul.state_machine).metrics = getattr(
                self.server, "node_metrics", None)
        if type(assoc.dimse) is DIMSEServiceProvider:  # noqa: E721 - exactly the base class
            assoc.dimse.__class__ = GuardedDIMSEServiceProvider
            cast(GuardedDIMSEServiceProvider, assoc.dimse).metrics = getattr(
                self.server, "node_metrics", None)
        if sock is not None and sock.socket is not None:
            # accept() drops the listener's timeout: without this a silent peer blocks the
            # DUL thread in recv() for as long as it keeps the connection open.
            sock.socket.settimeout(self.ae.network_timeout)
        return assoc


def start_listener(ae: AE, address: tuple[str, int], evt_handlers: Sequence[Any],
                   ssl_context: ssl.SSLContext | None = None,
                   handshake_timeout_s: float = 10.0,
                   on_tls_failure: TlsFailureHandler | None = None,
                   metrics: NodeMetrics | None = None) -> NodeAssociationServer:
    """``AE.start_server(block=False)`` with our server and request handler; TLS when
    *ssl_context* is given; *metrics* counts the protocol errors that the sockets detect."""
    server = ae.make_server(address, evt_handlers=list(evt_handlers),
                            ssl_context=ssl_context, server_class=NodeAssociationServer,
                            request_handler=NodeRequestHandler)
    assert isinstance(server, NodeAssociationServer)
    server.handshake_timeout_s = handshake_timeout_s
    server.on_tls_failure = on_tls_failure
    server.node_metrics = metrics  # read by NodeRequestHandler
    stamp = datetime.now().strftime("%Y%m%d%H%M%S")
    thread = threading.Thread(target=server.serve_forever, name=f"AcceptorServer@{stamp}",
                              daemon=True)
    thread.start()
    ae._servers.append(server)  # as start_server does; server.shutdown() removes it
    return server
