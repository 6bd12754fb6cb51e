"""The AE: presentation contexts, timeouts and handler binding (pynetdicom).

CT Image Storage and Enhanced CT Image Storage are accepted in every transfer
syntax that pydicom can decode here (with pylibjpeg and pyjpegls installed).
Other storage SOP classes are refused at negotiation, or accepted and ignored,
as ``dicom.other_sop_classes`` says.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from pydicom.pixels import get_decoder
from pydicom.uid import UID, AllTransferSyntaxes
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    EnhancedCTImageStorage,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from node import handlers
from node.assembler import SeriesAssembler
from node.config import NodeConfig
from node.metrics import NodeMetrics
from node.sender import set_nodelay
from node.spool import Spool
from node.transport import start_listener

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
    return ae


def start_server(config: NodeConfig, spool: Spool, assembler: SeriesAssembler,
                 metrics: NodeMetrics) -> tuple[AE, ThreadedAssociationServer]:
    """Build the AE, bind the handlers with their dependencies, listen (non-blocking)."""
    ae = build_ae(config)
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
    if config.dicom.tcp_nodelay:
        bindings.append((evt.EVT_CONN_OPEN, set_nodelay))
    server = start_listener(ae, (config.dicom.host, config.dicom.port), bindings, metrics)
    assert server.socket is not None
    if config.dicom.tcp_nodelay:
        server.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return ae, server
