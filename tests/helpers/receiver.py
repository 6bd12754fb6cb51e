"""A result receiver for tests: a pynetdicom Storage SCP that records what it got."""

from __future__ import annotations

import ssl
import threading
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
    _server: ThreadedAssociationServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _on_store(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self._lock:
            self.received[str(ds.SOPInstanceUID)] += 1
            self.datasets[str(ds.SOPInstanceUID)] = ds
        return self.status

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
