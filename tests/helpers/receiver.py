"""A result receiver for tests: a pynetdicom Storage SCP that records what it got.

It can misbehave on purpose (fault tests): answer slowly (``delay_s`` before each
response), or end the association after ``fail_after`` objects, with an A-ABORT
(``fail_mode="abort"``) or by closing the TCP connection without a word (``"drop"``), for
the first ``failures`` associations that get that far.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer


@dataclass
class Receiver:
    """Start with :meth:`start`; ``received`` counts SOP Instance UIDs (duplicates show)."""

    port: int
    ae_title: str = "RESULTS"
    status: int = 0x0000
    ssl_context: ssl.SSLContext | None = None  # DICOM over TLS when set
    received: Counter[str] = field(default_factory=Counter)
    datasets: dict[str, object] = field(default_factory=dict)
    delay_s: float = 0.0
    fail_after: int | None = None
    fail_mode: str = "abort"
    failures: int = 1
    failed: int = 0
    _per_assoc: Counter[int] = field(default_factory=Counter)
    _server: ThreadedAssociationServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _on_store(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self._lock:
            self.received[str(ds.SOPInstanceUID)] += 1
            self.datasets[str(ds.SOPInstanceUID)] = ds
            self._per_assoc[id(event.assoc)] += 1
            fail = (self.fail_after is not None and self.failed < self.failures
                    and self._per_assoc[id(event.assoc)] >= self.fail_after)
            if fail:
                self.failed += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        if fail:
            self._fail(event)
        return self.status

    def _fail(self, event: evt.Event) -> None:
        """End the association before the response goes out."""
        if self.fail_mode == "drop":
            sock = event.assoc.dul.socket
            if sock is not None and sock.socket is not None:
                sock.socket.shutdown(socket.SHUT_RDWR)
        else:
            event.assoc.abort(block=False)

    def start(self) -> Receiver:
        ae = AE(ae_title=self.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       ssl_context=self.ssl_context, evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def total(self) -> int:
        with self._lock:
            return sum(self.received.values())
