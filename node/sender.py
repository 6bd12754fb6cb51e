"""The durable outbound queue and the C-STORE sender.

One outbound row is the results of one job for one destination, so retries and
the retry cap count per study, not per file. States:
``queued -> sending -> sent``; a failed attempt goes back to ``queued`` with an
exponential backoff, and to ``dead`` after ``outbound.max_attempts``.
``ich-node resend STUDY_UID`` puts a study's rows back to ``queued``.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.audit import AuditLog
from node.config import ConfigError, Destination, NodeConfig
from node.db import RetryQueueTable, now
from node.metrics import NodeMetrics
from node.monitoring import job_origin
from node.tls import tls_args

LOGGER = logging.getLogger(__name__)

OUTBOUND_STATES = ("queued", "sending", "sent", "dead")


class SendError(Exception):
    """A destination did not take our results; the message says which and why, ``kind``
    names the failure for metrics and the audit log (association, timeout, status,
    files_missing)."""

    def __init__(self, message: str, kind: str = "send") -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class OutboundItem:
    """The results of one job for one destination."""

    id: int
    job_id: int
    study_uid: str
    destination: str
    files: list[str]
    attempts: int


class OutboundQueue(Protocol):
    """The outbound queue interface (embedded default: :class:`SqliteOutboundQueue`)."""

    def claim_due(self, limit: int = 8) -> list[OutboundItem]:
        """Take the items whose retry time has come."""
        ...

    def mark_sent(self, item_id: int) -> None:
        """The destination took every file."""
        ...

    def mark_failed(self, item_id: int, error: str) -> str:
        """Record a failed attempt; returns the new state (queued or dead)."""
        ...


def set_nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler: turn Nagle off (small PDUs otherwise stall at ~20/s)."""
    sock = event.assoc.dul.socket
    if sock is not None and sock.socket is not None:
        sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class SqliteOutboundQueue(RetryQueueTable):
    """Outbound rows in the node's state database."""

    table = "outbound"

    def claim_due(self, limit: int = 8) -> list[OutboundItem]:
        """Take the items whose retry time has come (state becomes ``sending``): urgent
        (positive) results first, then by job priority, then the longest waiting."""
        with self.db.transaction() as cur:
            rows = cur.execute("SELECT * FROM outbound WHERE state = 'queued' AND next_attempt_at"
                               " <= ? ORDER BY urgent DESC, priority DESC, next_attempt_at, id"
                               " LIMIT ?", (now(), limit)).fetchall()
            for row in rows:
                cur.execute("UPDATE outbound SET state = 'sending' WHERE id = ?", (row["id"],))
        return [OutboundItem(r["id"], r["job_id"], r["study_uid"], r["destination"],
                             json.loads(r["files"]), r["attempts"]) for r in rows]

    def resend_study(self, study_uid: str) -> int:
        """Queue every result of *study_uid* again with a fresh retry budget."""
        with self.db.transaction() as cur:
            cur.execute("UPDATE outbound SET state = 'queued', attempts = 0, next_attempt_at = ?,"
                        " last_error = NULL WHERE study_uid = ? AND state != 'sending'",
                        (now(), study_uid))
            return cur.rowcount

    def counts(self) -> dict[str, int]:
        """Outbound rows per state."""
        return self.db.count_by_state("outbound", OUTBOUND_STATES)


def _contexts_for(files: list[str]) -> list[tuple[str, list[str]]]:
    """Presentation contexts: each file's SOP class with its own syntax plus the
    uncompressed ones, so any SCP can accept."""
    wanted: dict[str, list[str]] = {}
    for path in files:
        meta = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"]).file_meta
        syntaxes = wanted.setdefault(str(meta.MediaStorageSOPClassUID), [])
        for ts in (str(meta.TransferSyntaxUID), ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            if ts not in syntaxes:
                syntaxes.append(ts)
    return list(wanted.items())


@contextmanager
def _association(config: NodeConfig, dest: Destination,
                 contexts: list[tuple[str, list[str]]],
                 ext_neg: list[Any] | None = None) -> Iterator[Association]:
    """An established association to *dest* (Nagle off; TLS when ``dest.tls`` says so),
    released afterwards; SendError when it cannot be established. *ext_neg*: extended
    negotiation items (e.g. SCP/SCU role selection)."""
    ae = AE(ae_title=config.outbound.calling_ae_title or config.dicom.ae_title)
    ae.acse_timeout = config.dicom.acse_timeout_s
    ae.dimse_timeout = config.dicom.dimse_timeout_s
    ae.network_timeout = config.dicom.network_timeout_s
    ae.maximum_pdu_size = config.dicom.max_pdu_bytes
    for sop_class, syntaxes in contexts:
        ae.add_requested_context(sop_class, syntaxes)
    handlers: list[Any] = [(evt.EVT_CONN_OPEN, set_nodelay)] if config.dicom.tcp_nodelay else []
    try:
        tls = tls_args(dest, f"{dest.name}.tls")
    except ConfigError as exc:  # checked at start; a certificate file went away since
        raise SendError(f"{dest.name}: {exc}") from exc
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, evt_handlers=handlers,
                         ext_neg=ext_neg, tls_args=tls)
    if not assoc.is_established:
        raise SendError(f"{dest.name} ({dest.ae_title}@{dest.host}:{dest.port}"
                        f"{', TLS' if tls else ''}): association "
                        f"{'rejected' if assoc.is_rejected else 'failed'}", "association")
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


REACTOR_RESUME_TIMEOUT_S = 1.0


def await_reactor_resumed(assoc: Association, timeout_s: float = REACTOR_RESUME_TIMEOUT_S
                          ) -> None:
    """Wait until the association's reactor thread has woken up after a C-STORE.

    Works around a race in pynetdicom's requestor (3.0; cf. pynetdicom#435):
    ``send_c_store`` pauses the reactor thread while it waits for its response and resumes
    it afterwards. When the next ``send_c_store`` pauses it again before that thread has
    actually woken up, ``_is_paused`` still reads True, so the call does not wait; the thread
    then wakes anyway, takes the next response off the queue ("Received unexpected C-STORE
    service message") and the call waits for the whole DIMSE timeout: a failed attempt and a
    duplicate at the destination. Seen under load (bench/load.py, RELIABILITY.md).
    """
    deadline = time.monotonic() + timeout_s
    while (getattr(assoc, "_is_paused", False) and assoc.is_established
           and time.monotonic() < deadline):
        time.sleep(0.0005)


def send_files(config: NodeConfig, dest: Destination, files: list[str]) -> None:
    """C-STORE every file to *dest* in one association; raise SendError on any failure."""
    with _association(config, dest, _contexts_for(files)) as assoc:
        for index, path in enumerate(files):
            if index:
                await_reactor_resumed(assoc)
            status = assoc.send_c_store(Path(path))
            code = getattr(status, "Status", None)
            if code is None:
                raise SendError(f"{dest.name}: no response to C-STORE of {Path(path).name} "
                                "(timeout or aborted)", "timeout")
            if code != 0x0000 and not 0xB000 <= code <= 0xBFFF:
                raise SendError(f"{dest.name}: C-STORE of {Path(path).name} failed with status "
                                f"0x{code:04X}", "status")


def echo(config: NodeConfig, dest: Destination) -> int:
    """C-ECHO *dest*; returns the status (raises SendError if no association)."""
    with _association(config, dest, [(str(Verification), [ImplicitVRLittleEndian])]) as assoc:
        code = getattr(assoc.send_c_echo(), "Status", None)
        if code is None:
            raise SendError(f"{dest.name}: no response to C-ECHO", "timeout")
        return int(code)


class Sender:
    """A thread that sends due outbound items, one destination association at a time."""

    def __init__(self, config: NodeConfig, queue: SqliteOutboundQueue,
                 metrics: NodeMetrics, poll_interval_s: float = 0.5,
                 audit: AuditLog | None = None) -> None:
        self.config = config
        self.queue = queue
        self.metrics = metrics
        self.audit = audit
        self.poll_interval_s = poll_interval_s
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the sending thread."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="ich-node-sender", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Look for due items now."""
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the current item."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            items = self.queue.claim_due()
            for item in items:
                self.send_one(item)
            if not items:
                self._wake.wait(self.poll_interval_s)
                self._wake.clear()

    def send_one(self, item: OutboundItem) -> None:
        """Send one item and record the outcome (never raises for a send failure)."""
        started = time.monotonic()
        try:
            dest = self.config.destination(item.destination)
            missing = [f for f in item.files if not Path(f).exists()]
            if missing:
                raise SendError(f"{len(missing)} result files are gone from the spool "
                                f"(retention?): {Path(missing[0]).name}", "files_missing")
            send_files(self.config, dest, item.files)
        except SendError as exc:
            error, kind = str(exc), exc.kind
        except KeyError as exc:
            error, kind = str(exc), "unknown_destination"
        except Exception as exc:  # the item boundary: any failure is a failed attempt
            error, kind = f"{type(exc).__name__}: {exc}", "unexpected"
            LOGGER.exception("unexpected error sending job %d to %s", item.job_id,
                             item.destination)
        else:
            error = kind = ""
        seconds = time.monotonic() - started
        # Metrics first, then the row: whoever sees the new state also sees the count.
        if error:
            self.metrics.outbound_failures.labels(destination=item.destination).inc()
            self.metrics.outbound_errors.labels(destination=item.destination, kind=kind).inc()
            self.metrics.destinations.failed(item.destination, error)
            state = self.queue.mark_failed(item.id, error)
            log = LOGGER.error if state == "dead" else LOGGER.warning
            log("sending results of study %s (job %d) to %s failed (attempt %d, now %s): %s",
                item.study_uid, item.job_id, item.destination, item.attempts + 1, state, error)
            self._record_attempt(item, "dead" if state == "dead" else "retry", seconds, kind)
            return
        self.metrics.results_sent.labels(destination=item.destination).inc(len(item.files))
        self.metrics.destinations.succeeded(item.destination)
        self._record_attempt(item, "sent", seconds, None)
        self.queue.mark_sent(item.id)
        LOGGER.info("sent %d results of study %s (job %d) to %s in %.2f s", len(item.files),
                    item.study_uid, item.job_id, item.destination, seconds)

    def _record_attempt(self, item: OutboundItem, outcome: str, seconds: float,
                        kind: str | None) -> None:
        """The latency metric (when sent) and the audit line of one delivery attempt."""
        origin = job_origin(self.queue.db, item.job_id)
        latency = now() - origin.last_received_at if origin is not None else None
        if outcome == "sent" and latency is not None:
            self.metrics.result_latency.labels(destination=item.destination).observe(latency)
        if self.audit is None:
            return
        self.audit.record("sent", job_id=item.job_id, study_uid=item.study_uid,
                          series_uid=origin.series_uid if origin is not None else None,
                          destination=item.destination, outcome=outcome,
                          attempt=item.attempts + 1, results=len(item.files), seconds=seconds,
                          latency_seconds=latency, error_kind=kind)
