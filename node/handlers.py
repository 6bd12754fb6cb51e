"""Event handlers bound to the AE: association policy, C-ECHO and C-STORE.

The C-STORE handler only spools (STYLE): it reads the header of the received
data set (no pixel decoding), writes the encoded bytes durably, records the
arrival and returns a status. Everything heavy happens in the worker process.
Dependencies are passed when the handlers are bound, never through globals.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import shutil
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import cast

from pydicom import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt
from pynetdicom.dimse_primitives import C_STORE

from node.assembler import SeriesAssembler
from node.config import DicomConfig
from node.dsheader import PIXEL_TAGS, UNDEFINED, WANTED, scan_header
from node.filemeta import PREAMBLE, encode_file_meta
from node.metrics import NodeMetrics
from node.spool import InstanceHeader, Spool, StoreOutcome

LOGGER = logging.getLogger(__name__)

# C-STORE response statuses, PS3.4 Annex B.2.3 (Table B.2-1) and PS3.7 Annex C.
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # Refused: Out of Resources
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900  # Error: Data Set does not match SOP Class
CANNOT_UNDERSTAND_UNDECODABLE = 0xC210  # Error: Cannot understand (the data set does not parse)
CANNOT_UNDERSTAND_MISSING_UID = 0xC211  # Error: Cannot understand (a required UID is missing)
CANNOT_UNDERSTAND_PIXEL_DATA = 0xC212  # Error: Cannot understand (pixel data absent or wrong size)
CANNOT_UNDERSTAND_UID_MISMATCH = 0xC213  # Error: Cannot understand (UIDs differ from the command)
CANNOT_UNDERSTAND_INVALID_UID = 0xC214  # Error: Cannot understand (a UID is not a UID, PS3.5 9.1)

# PS3.5 9.1: digits and dots, no empty component, at most 64 characters. Leading zeros
# (a common modality bug) are tolerated; anything else could never name a file safely.
_UID_SHAPE = re.compile(r"^[0-9]+(\.[0-9]+)*$")

# A-ASSOCIATE-RJ (result, source, reason), PS3.8 9.3.4.
REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # permanent, service user, calling AE not recognised
REJECT_NOT_ALLOWED = (0x01, 0x01, 0x01)  # permanent, service user, no reason given
REJECT_CONGESTION = (0x02, 0x03, 0x01)  # transient, service provider (presentation), congestion
REJECT_LIMIT = (0x02, 0x03, 0x02)  # transient, service provider, local limit exceeded

def printable_uid(value: object) -> str:
    """A received UID for a log line: as is when it has a UID's shape, else its ``ascii()``
    form, cut short (no control characters or forged log lines from a peer)."""
    text = str(value)
    if len(text) <= 64 and _UID_SHAPE.match(text):
        return text
    return ascii(text)[:100]


class StoreRejected(Exception):
    """A received instance cannot be accepted; carries the status to answer with."""

    def __init__(self, status: int, reason: str, metric: str) -> None:
        super().__init__(reason)
        self.status = status
        self.metric = metric


@dataclass(frozen=True)
class AssociationPolicy:
    """Who may associate, checked on A-ASSOCIATE-RQ (PS3.8 7.1)."""

    allowed_calling_aes: frozenset[str]
    allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    max_associations: int
    spool_dir: Path
    min_free_mb: int

    @classmethod
    def from_config(cls, dicom: DicomConfig, spool_dir: Path, min_free_mb: int
                    ) -> AssociationPolicy:
        """Build the policy from the ``dicom`` and ``spool`` sections."""
        return cls(frozenset(dicom.allowed_calling_aes),
                   tuple(ipaddress.ip_network(n, strict=False) for n in dicom.allowed_networks),
                   dicom.max_associations, spool_dir, min_free_mb)

    def check(self, calling_ae: str, address: str, active: int
              ) -> tuple[tuple[int, int, int], str, str] | None:
        """None if allowed, else (A-ASSOCIATE-RJ triple, metric label, reason)."""
        if self.allowed_networks:
            ip = ipaddress.ip_address(address.split("%")[0])
            if not any(ip in net for net in self.allowed_networks):
                return REJECT_NOT_ALLOWED, "ip_not_allowed", (
                    f"source address {address} is not in dicom.allowed_networks")
        if self.allowed_calling_aes and calling_ae not in self.allowed_calling_aes:
            return REJECT_CALLING_AE, "calling_ae_not_allowed", (
                f"calling AE {calling_ae!r} is not in dicom.allowed_calling_aes")
        if active > self.max_associations:
            return REJECT_LIMIT, "too_many_associations", (
                f"{active - 1} associations already active (dicom.max_associations="
                f"{self.max_associations})")
        free_mb = shutil.disk_usage(self.spool_dir).free // (1024 * 1024)
        if free_mb < self.min_free_mb:
            return REJECT_CONGESTION, "disk_low", (
                f"spool has {free_mb} MB free, below spool.min_free_mb={self.min_free_mb}")
        return None


def handle_requested(event: evt.Event, policy: AssociationPolicy, metrics: NodeMetrics) -> None:
    """EVT_REQUESTED: reject associations the policy does not allow (pynetdicom lets
    this handler send the A-ASSOCIATE-RJ itself)."""
    assoc = event.assoc
    primitive = assoc.requestor.primitive
    calling_ae = str(primitive.calling_ae_title if primitive else "").strip()
    address = str(assoc.requestor.address)
    active = sum(1 for a in assoc.ae.active_associations if a.is_acceptor)
    verdict = policy.check(calling_ae, address, active)
    if verdict is None:
        return
    triple, label, reason = verdict
    LOGGER.warning("association from %s at %s rejected: %s", calling_ae, address, reason)
    metrics.associations.labels(outcome=label).inc()
    assoc.acse.send_reject(*triple)
    assoc.kill()  # as pynetdicom's own rejections do: waits until the A-ASSOCIATE-RJ is sent


def handle_accepted(event: evt.Event, metrics: NodeMetrics) -> None:
    """EVT_ACCEPTED: count it and log contexts we refused (SOP classes we do not take)."""
    assoc = event.assoc
    metrics.associations.labels(outcome="accepted").inc()
    refused = sorted({UID(str(cx.abstract_syntax)).name for cx in assoc.rejected_contexts})
    if refused:
        metrics.contexts_refused.inc(len(assoc.rejected_contexts))
        LOGGER.info("association from %s at %s: %d of %d presentation contexts refused "
                    "(SOP classes we do not store; dicom.other_sop_classes=refuse)",
                    assoc.requestor.ae_title, assoc.requestor.address, len(refused),
                    len(refused) + len(assoc.accepted_contexts))
        LOGGER.debug("refused SOP classes: %s", ", ".join(refused))


def handle_echo(event: evt.Event) -> int:
    """EVT_C_ECHO: Verification SCP, PS3.4 Annex A."""
    return SUCCESS


HeaderValues = Mapping[str, object]  # keyword -> value, the keywords of dsheader.WANTED


def _header(values: HeaderValues, request: C_STORE) -> InstanceHeader:
    missing = [k for k in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID",
                           "SeriesInstanceUID") if not str(values.get(k, "") or "").strip()]
    if missing:
        raise StoreRejected(CANNOT_UNDERSTAND_MISSING_UID,
                            f"data set has no {', '.join(missing)}", "missing_uid")
    header = InstanceHeader(str(values["SOPInstanceUID"]).strip(),
                            str(values["SOPClassUID"]).strip(),
                            str(values["StudyInstanceUID"]).strip(),
                            str(values["SeriesInstanceUID"]).strip())
    invalid = [k for k, v in (("SOPInstanceUID", header.sop_uid),
                              ("StudyInstanceUID", header.study_uid),
                              ("SeriesInstanceUID", header.series_uid))
               if len(v) > 64 or not _UID_SHAPE.match(v)]
    if invalid:
        raise StoreRejected(CANNOT_UNDERSTAND_INVALID_UID,
                            f"{', '.join(invalid)} not a valid UID (digits and dots, at most 64 "
                            "characters)", "invalid_uid")
    if header.sop_class_uid != str(request.AffectedSOPClassUID):
        raise StoreRejected(DATASET_DOES_NOT_MATCH_SOP_CLASS,
                            f"data set SOP class {header.sop_class_uid} differs from the "
                            f"command's {request.AffectedSOPClassUID}", "sop_class_mismatch")
    if header.sop_uid != str(request.AffectedSOPInstanceUID):
        raise StoreRejected(CANNOT_UNDERSTAND_UID_MISMATCH,
                            "data set SOP Instance UID differs from the command's",
                            "sop_instance_mismatch")
    return header


def _parse_header(event: evt.Event) -> tuple[HeaderValues, int | None]:
    """The values the handler checks (:data:`node.dsheader.WANTED`) and the pixel data's
    encoded length (None when there is none). Reads the received bytes in place; pixel
    data is neither copied nor decoded (STYLE: the association thread only spools). The
    short scan of :mod:`node.dsheader` first, pydicom when it declines."""
    request = cast(C_STORE, event.request)
    syntax = event.context.transfer_syntax
    stream = cast(BytesIO, request.DataSet)
    if syntax.is_little_endian and not syntax.is_deflated:
        with stream.getbuffer() as buffer:
            scan = scan_header(buffer, syntax.is_implicit_VR)
        if scan is not None:
            return scan.values, scan.pixel_length
    if syntax.is_deflated:  # the whole stream must be inflated first
        ds = event.dataset
        return _values(ds), (len(ds.PixelData) if "PixelData" in ds else None)
    stream.seek(0)
    found: list[int] = []

    def at_pixels(tag: int, vr: str | None, length: int) -> bool:
        if tag in PIXEL_TAGS:
            found.append(length)
            return True
        return False

    ds = read_dataset(stream, syntax.is_implicit_VR, syntax.is_little_endian,
                      stop_when=at_pixels)
    return _values(ds), (found[0] if found else None)


def _values(ds: Dataset) -> dict[str, object]:
    """The :data:`node.dsheader.WANTED` values of a pydicom data set."""
    return {keyword: ds.get(keyword) for keyword, _ in WANTED.values() if keyword in ds}


def _check_pixel_data(values: HeaderValues, pixel_length: int | None,
                      transfer_syntax: str) -> None:
    """Pixel data must exist and, for native syntaxes, have the size the header implies.
    Nothing is decoded."""
    if pixel_length is None:
        raise StoreRejected(CANNOT_UNDERSTAND_PIXEL_DATA, "data set has no Pixel Data",
                            "no_pixel_data")
    if UID(transfer_syntax).is_encapsulated:
        return
    if pixel_length == UNDEFINED:
        raise StoreRejected(CANNOT_UNDERSTAND_PIXEL_DATA,
                            "encapsulated Pixel Data in a native transfer syntax",
                            "pixel_data_size")
    absent = [k for k in ("Rows", "Columns", "BitsAllocated") if values.get(k) is None]
    if absent:
        raise StoreRejected(CANNOT_UNDERSTAND_PIXEL_DATA,
                            f"image pixel module incomplete: no {', '.join(absent)}",
                            "bad_pixel_module")
    try:
        expected = (_int(values["Rows"]) * _int(values["Columns"])
                    * _int(values.get("SamplesPerPixel", 1))
                    * _int(values.get("NumberOfFrames", 1) or 1)
                    * _int(values["BitsAllocated"])) // 8
    except (TypeError, ValueError) as exc:
        raise StoreRejected(CANNOT_UNDERSTAND_PIXEL_DATA,
                            f"image pixel module incomplete: {exc}", "bad_pixel_module") from exc
    if pixel_length < expected:
        raise StoreRejected(CANNOT_UNDERSTAND_PIXEL_DATA,
                            f"Pixel Data has {pixel_length} bytes, the header implies {expected}",
                            "pixel_data_size")


def _int(value: object) -> int:
    return int(value)  # type: ignore[call-overload]  # TypeError for None or a list: caught


def handle_store(event: evt.Event, spool: Spool, assembler: SeriesAssembler,
                 metrics: NodeMetrics, accepted_sop_classes: frozenset[str]) -> int:
    """EVT_C_STORE: spool the instance, return a Storage Service status (PS3.4 B.2.3)."""
    started = time.perf_counter()
    assoc = event.assoc
    request = cast(C_STORE, event.request)
    calling_ae = str(assoc.requestor.ae_title).strip()
    sop_class = str(request.AffectedSOPClassUID)
    if sop_class not in accepted_sop_classes:
        metrics.instances_received.labels(outcome="ignored").inc()
        LOGGER.info("ignored instance of %s from %s (dicom.other_sop_classes is "
                    "accept_and_ignore)", UID(sop_class).name, calling_ae)
        return SUCCESS
    try:
        try:
            values, pixel_length = _parse_header(event)
            header = _header(values, request)
            _check_pixel_data(values, pixel_length, str(event.context.transfer_syntax))
        except StoreRejected:
            raise
        except Exception as exc:  # pydicom raises many types on malformed input
            raise StoreRejected(CANNOT_UNDERSTAND_UNDECODABLE,
                                f"data set does not parse: {type(exc).__name__}: {exc}",
                                "undecodable") from exc
    except StoreRejected as exc:
        metrics.store_failures.labels(reason=exc.metric).inc()
        LOGGER.warning("C-STORE from %s refused with 0x%04X: %s (command SOP instance %s)",
                       calling_ae, exc.status, exc, printable_uid(request.AffectedSOPInstanceUID))
        return exc.status
    try:
        meta = encode_file_meta(header.sop_class_uid, header.sop_uid,
                                 str(event.context.transfer_syntax), PYNETDICOM_IMPLEMENTATION_UID,
                                 PYNETDICOM_IMPLEMENTATION_VERSION, calling_ae or None)
        chunks = (PREAMBLE, meta, cast(BytesIO, request.DataSet).getbuffer())
        result = spool.store(header, chunks, calling_ae)
    except (OSError, sqlite3.Error) as exc:  # disk full, I/O error, database locked or full
        metrics.store_failures.labels(reason="out_of_resources").inc()
        LOGGER.error("C-STORE from %s refused with 0x%04X: cannot write sop=%s to the spool: "
                     "%s: %s", calling_ae, OUT_OF_RESOURCES, header.sop_uid,
                     type(exc).__name__, exc)
        return OUT_OF_RESOURCES
    metrics.instances_received.labels(outcome=result.outcome.value).inc()
    if result.late:
        metrics.late_instances.inc()
    if result.outcome is not StoreOutcome.DUPLICATE:
        assembler.instance_arrived(header.series_uid, calling_ae, id(assoc))
    metrics.store_seconds.observe(time.perf_counter() - started)
    return SUCCESS


def handle_released(event: evt.Event, assembler: SeriesAssembler) -> None:
    """EVT_RELEASED: the sender said it is done; check its series early."""
    assembler.association_ended(id(event.assoc), released=True)


def handle_aborted(event: evt.Event, assembler: SeriesAssembler,
                   metrics: NodeMetrics | None = None) -> None:
    """EVT_ABORTED / EVT_CONN_CLOSE: no early check; the quiet period decides. An A-ABORT
    (from the peer, or pynetdicom's answer to a malformed PDU or DIMSE message) is counted
    when *metrics* is given (the EVT_ABORTED binding)."""
    if metrics is not None and event.event is evt.EVT_ABORTED:
        metrics.protocol_errors.labels(reason="aborted").inc()
        LOGGER.warning("association from %s at %s aborted", event.assoc.requestor.ae_title,
                       event.assoc.requestor.address)
    assembler.association_ended(id(event.assoc), released=False)
