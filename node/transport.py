"""Transport tuning and hardening of the listener (pynetdicom's request handler and socket).

pynetdicom's ``AssociationSocket.recv`` reads at most 4 KiB per system call and grows a
bytearray as it goes; a 256 KiB P-DATA PDU costs 64 calls. :class:`FastAssociationSocket`
reads straight into a buffer of the PDU's size. Measured with ``bench/ingest.py``
(BENCHMARKS.md).

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
import socket
import ssl
import threading
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, cast

from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.fsm import TRANSITION_TABLE, StateMachine
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from node.metrics import NodeMetrics
from node.tls import describe_peer

LOGGER = logging.getLogger(__name__)

DUL_IDLE_SLEEP_S = 0.0002
MIN_PDU_LENGTH_LIMIT = 1024 * 1024  # bytes; an A-ASSOCIATE-RQ may be larger than max_pdu_bytes
RECV_CHUNK_BYTES = 1024 * 1024  # a receive buffer grows by at most this much ahead of the data
# A-ABORT, PS3.8 9.3.8: source 2 = DICOM UL service-provider, reason 6 = invalid PDU
# parameter value.
ABORT_SOURCE_PROVIDER = 0x02
ABORT_INVALID_PDU_PARAMETER = 0x06


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


class GuardedDIMSEServiceProvider(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider; a message that does not decode aborts the association
    instead of killing the DUL thread."""

    metrics: NodeMetrics | None = None

    def receive_primitive(self, primitive: P_DATA) -> None:
        """Collect a P-DATA fragment; Evt19 (A-ABORT) when the message does not decode."""
        try:
            super().receive_primitive(primitive)
        except Exception as exc:  # pynetdicom's decoder raises many types on malformed input
            self.message = None
            if self.metrics is not None:
                self.metrics.protocol_errors.labels(reason="bad_dimse_message").inc()
            LOGGER.warning("protocol error from %s: DIMSE message does not decode (%s: %s); "
                           "sending A-ABORT", self.assoc.requestor.address,
                           type(exc).__name__, exc)
            self.dul.event_queue.put("Evt19")  # invalid PDU: AA-8 sends the A-ABORT


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
        # The DUL thread sleeps this long when no PDU is waiting (pynetdicom: 1 ms); a
        # shorter nap answers each C-STORE sooner for a little more idle CPU.
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
