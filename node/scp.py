"""The AE: presentation contexts, timeouts and handler binding (pynetdicom).

CT Image Storage and Enhanced CT Image Storage are accepted in every transfer
syntax that pydicom can decode here (with pylibjpeg and pyjpegls installed).
Other storage SOP classes are refused at negotiation, or accepted and ignored,
as ``dicom.other_sop_classes`` says. Storage Commitment Push Model is offered when
``commitment.enabled`` (:mod:`node.commitment`).

Listeners: plain TCP on ``dicom.port`` and, with ``dicom.tls.enabled``, DICOM over TLS
on ``dicom.tls.port``; both share one AE, one policy and the same handlers.
``dicom.tls.plain_listener: false`` leaves only the TLS one.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from typing import Any

from pydicom.pixels import get_decoder
from pydicom.uid import UID, AllTransferSyntaxes
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    EnhancedCTImageStorage,
    StorageCommitmentPushModel,
    Verification,
)

from node import handlers
from node.assembler import SeriesAssembler
from node.commitment import CommitmentService, handle_commitment_request
from node.config import NodeConfig
from node.metrics import NodeMetrics
from node.sender import set_nodelay
from node.spool import Spool
from node.tls import server_context
from node.transport import NodeAssociationServer, TlsFailureHandler, start_listener

LOGGER = logging.getLogger(__name__)

CT_SOP_CLASSES = frozenset({str(CTImageStorage), str(EnhancedCTImageStorage)})


def decodable_transfer_syntaxes() -> list[str]:
    """Transfer syntaxes whose pixel data pydicom can decode with the installed plugins."""
    usable = []
    for uid in AllTransferSyntaxes:
        try:
            if get_decoder(UID(uid)).is_available:
                usable.append(str(uid))
        except NotImplementedError:
            continue  # no decoder exists for this syntax (video, JPIP, multi-component J2K)
    return usable


def build_ae(config: NodeConfig) -> AE:
    """An AE with our title, timeouts, PDU size and supported contexts."""
    ae = AE(ae_title=config.dicom.ae_title)
    ae.acse_timeout = config.dicom.acse_timeout_s
    ae.dimse_timeout = config.dicom.dimse_timeout_s
    ae.network_timeout = config.dicom.network_timeout_s
    ae.maximum_pdu_size = config.dicom.max_pdu_bytes
    # Our EVT_REQUESTED handler enforces dicom.max_associations with a logged rejection;
    # pynetdicom's own limit is only a backstop above it.
    ae.maximum_associations = config.dicom.max_associations + 4
    syntaxes = decodable_transfer_syntaxes()
    ae.add_supported_context(Verification)
    for sop_class in (CTImageStorage, EnhancedCTImageStorage):
        ae.add_supported_context(sop_class, syntaxes)
    if config.dicom.other_sop_classes == "accept_and_ignore":
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is not None and cx.abstract_syntax not in CT_SOP_CLASSES:
                ae.add_supported_context(cx.abstract_syntax, syntaxes)
    if config.commitment.enabled:
        ae.add_supported_context(StorageCommitmentPushModel)
    return ae


@dataclass
class Listeners:
    """The AE and its listening servers (plain, TLS, or both)."""

    ae: AE
    plain: NodeAssociationServer | None
    tls: NodeAssociationServer | None

    @property
    def servers(self) -> list[NodeAssociationServer]:
        return [s for s in (self.plain, self.tls) if s is not None]

    def shutdown(self) -> None:
        """Stop accepting on every listener (active associations go on)."""
        for server in self.servers:
            server.shutdown()


def _count_tls_failure(metrics: NodeMetrics) -> TlsFailureHandler:
    def on_failure(address: str, reason: str) -> None:
        metrics.associations.labels(outcome="tls_handshake_failed").inc()
    return on_failure


def start_server(config: NodeConfig, spool: Spool, assembler: SeriesAssembler,
                 metrics: NodeMetrics, commitment: CommitmentService | None = None
                 ) -> Listeners:
    """Build the AE, bind the handlers with their dependencies, listen (non-blocking).
    A bad TLS certificate or key raises ConfigError before anything listens."""
    ae = build_ae(config)
    tls = config.dicom.tls
    ssl_context = server_context(tls) if tls.enabled else None
    policy = handlers.AssociationPolicy.from_config(config.dicom, config.spool.path,
                                                    config.spool.min_free_mb)
    bindings: list[Any] = [
        (evt.EVT_REQUESTED, handlers.handle_requested, [policy, metrics]),
        (evt.EVT_ACCEPTED, handlers.handle_accepted, [metrics]),
        (evt.EVT_C_ECHO, handlers.handle_echo),
        (evt.EVT_C_STORE, handlers.handle_store, [spool, assembler, metrics, CT_SOP_CLASSES]),
        (evt.EVT_RELEASED, handlers.handle_released, [assembler]),
        (evt.EVT_ABORTED, handlers.handle_aborted, [assembler, metrics]),
        (evt.EVT_CONN_CLOSE, handlers.handle_aborted, [assembler]),
    ]
    if commitment is not None:
        bindings.append((evt.EVT_N_ACTION, handle_commitment_request, [commitment, metrics]))
    if config.dicom.tcp_nodelay:
        bindings.append((evt.EVT_CONN_OPEN, set_nodelay))
    listeners = Listeners(ae, None, None)
    try:
        if tls.plain_listener or not tls.enabled:
            listeners.plain = start_listener(ae, (config.dicom.host, config.dicom.port), bindings,
                                             metrics=metrics)
        if ssl_context is not None:
            listeners.tls = start_listener(ae, (config.dicom.host, tls.port), bindings,
                                           ssl_context, tls.handshake_timeout_s,
                                           _count_tls_failure(metrics), metrics)
    except BaseException:
        listeners.shutdown()
        raise
    for server in listeners.servers:
        assert server.socket is not None
        if config.dicom.tcp_nodelay:
            server.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return listeners
