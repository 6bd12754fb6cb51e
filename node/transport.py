"""Transport tuning of the listener (pynetdicom's request handler and socket).

pynetdicom's ``AssociationSocket.recv`` reads at most 4 KiB per system call and grows a
bytearray as it goes; a 256 KiB P-DATA PDU costs 64 calls. :class:`FastAssociationSocket`
reads straight into a buffer of the PDU's size. Measured with ``bench/ingest.py``
(BENCHMARKS.md). Behaviour is otherwise pynetdicom's own.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

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


class NodeRequestHandler(RequestHandler):
    """pynetdicom's request handler, with a :class:`FastAssociationSocket`."""

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


def start_listener(ae: AE, address: tuple[str, int], evt_handlers: Sequence[Any]
                   ) -> ThreadedAssociationServer:
    """``AE.start_server(block=False)`` with our request handler."""
    server = ae.make_server(address, evt_handlers=list(evt_handlers),
                            server_class=ThreadedAssociationServer,
                            request_handler=NodeRequestHandler)
    stamp = datetime.now().strftime("%Y%m%d%H%M%S")
    thread = threading.Thread(target=server.serve_forever, name=f"AcceptorServer@{stamp}",
                              daemon=True)
    thread.start()
    ae._servers.append(server)  # as start_server does; server.shutdown() removes it
    return server
