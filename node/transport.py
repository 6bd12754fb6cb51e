"""Transport tuning of the listener (pynetdicom's request handler and socket).

pynetdicom's ``AssociationSocket.recv`` reads at most 4 KiB per system call and grows a
bytearray as it goes; a 256 KiB P-DATA PDU costs 64 calls. :class:`FastAssociationSocket`
reads straight into a buffer of the PDU's size. Measured with ``bench/ingest.py``
(BENCHMARKS.md). Behaviour is otherwise pynetdicom's own.

TLS: pynetdicom's server wraps each accepted socket and runs the TLS handshake on the
one thread that accepts connections, with no time limit, and drops a failed handshake
without a word. :class:`NodeAssociationServer` defers the handshake to the
connection's own thread, with ``dicom.tls.handshake_timeout_s``, and reports each
failure (a log line and a metric) through ``on_tls_failure``.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from node.tls import describe_peer

LOGGER = logging.getLogger(__name__)

DUL_IDLE_SLEEP_S = 0.0002


class FastAssociationSocket(AssociationSocket):
    """An AssociationSocket whose ``recv`` fills one buffer with as few calls as the
    kernel allows."""

    def recv(self, nr_bytes: int) -> bytearray:
        """Read *nr_bytes*; fewer only when the peer closed the connection."""
        assert self.socket is not None
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        nr_read = 0
        try:
            while nr_read < nr_bytes:
                count = self.socket.recv_into(view[nr_read:], nr_bytes - nr_read)
                if count == 0:  # connection closed: return what arrived, as pynetdicom does
                    return bytearray(view[:nr_read])
                nr_read += count
        finally:
            view.release()
        return buffer


TlsFailureHandler = Callable[[str, str], None]  # (peer address, reason)


class NodeAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server; with an SSL context, the handshake runs on the
    connection's thread (see the module docstring)."""

    handshake_timeout_s: float = 10.0
    on_tls_failure: TlsFailureHandler | None = None

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client, address = self.socket.accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True,
                                                  do_handshake_on_connect=False)
        return client, address


class NodeRequestHandler(RequestHandler):
    """pynetdicom's request handler, with a :class:`FastAssociationSocket` and the TLS
    handshake done here, on the connection's own thread."""

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
        return assoc


def start_listener(ae: AE, address: tuple[str, int], evt_handlers: Sequence[Any],
                   ssl_context: ssl.SSLContext | None = None,
                   handshake_timeout_s: float = 10.0,
                   on_tls_failure: TlsFailureHandler | None = None
                   ) -> NodeAssociationServer:
    """``AE.start_server(block=False)`` with our server and request handler; TLS when
    *ssl_context* is given."""
    server = ae.make_server(address, evt_handlers=list(evt_handlers),
                            ssl_context=ssl_context, server_class=NodeAssociationServer,
                            request_handler=NodeRequestHandler)
    assert isinstance(server, NodeAssociationServer)
    server.handshake_timeout_s = handshake_timeout_s
    server.on_tls_failure = on_tls_failure
    stamp = datetime.now().strftime("%Y%m%d%H%M%S")
    thread = threading.Thread(target=server.serve_forever, name=f"AcceptorServer@{stamp}",
                              daemon=True)
    thread.start()
    ae._servers.append(server)  # as start_server does; server.shutdown() removes it
    return server
