"""Storage Commitment Push Model SCP (PS3.4 Annex J): a modality asks whether its
instances are safely stored here, and is told the truth.

Flow (J.3.2, J.3.3):

1. N-ACTION-RQ (Action Type 1) with a Transaction UID and the Referenced SOP Sequence
   arrives. :func:`handle_commitment_request` checks its shape, commits the request to
   the state database (``commitments`` table, ``pending``) and answers Success. Nothing
   else runs on the association thread.
2. :class:`CommitmentService` (one thread in the node process) takes pending requests,
   checks every reference against the ``instances`` table *and* the spooled file (it
   exists and has the recorded size), and sends N-EVENT-REPORT: Event Type 1 when every
   instance is committed, 2 with the Failed SOP Sequence otherwise.
3. The report goes on the requesting association while it is still open
   (``commitment.same_association``; the requester first gets
   ``commitment.same_association_grace_s`` to release it), else on a new association
   to the requester's entry in ``commitment.peers`` (we propose the SCP role, J.3.3).
   A failed delivery is retried every ``commitment.retry_interval_s`` up to
   ``commitment.max_attempts``; then the request is ``dead``. Pending requests survive a restart: the new process
   answers them on a new association.

"Committed" means: the bytes acknowledged by C-STORE are on this node's disk now.
Retention (``retention.*``) deletes them later; this node is not an archive.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from pydicom import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_role, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import N_ACTION
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StorageCommitmentPushModel,
    StorageCommitmentPushModelInstance,
)

from node.config import NodeConfig
from node.db import StateDB, now
from node.metrics import NodeMetrics
from node.sender import SendError, _association

LOGGER = logging.getLogger(__name__)

COMMITMENT_STATES = ("pending", "reported", "dead")

ACTION_REQUEST_COMMIT = 1  # PS3.4 J.3.2.1.1 Action Type ID
EVENT_ALL_COMMITTED = 1  # PS3.4 J.3.3.1 Event Type IDs
EVENT_SOME_FAILED = 2
GRACE_POLL_S = 0.01  # how often the grace wait looks at the requesting association

# N-ACTION response statuses, PS3.7 Annex C.
SUCCESS = 0x0000
PROCESSING_FAILURE = 0x0110
NO_SUCH_OBJECT_INSTANCE = 0x0112
INVALID_ARGUMENT_VALUE = 0x0115
MISSING_ATTRIBUTE = 0x0120
NO_SUCH_ACTION_TYPE = 0x0123

# Failure Reason (0008,1197) in the Failed SOP Sequence, PS3.3 C.14.1.1.
FAILURE_PROCESSING = 0x0110  # Processing failure
FAILURE_NO_SUCH_INSTANCE = 0x0112  # No such object instance
FAILURE_CLASS_NOT_SUPPORTED = 0x0122  # Referenced SOP Class not supported
FAILURE_CLASS_INSTANCE_CONFLICT = 0x0119  # Class / Instance conflict

_MAX_UID = 64


class CommitmentRejected(Exception):
    """An N-ACTION we cannot take; carries the status and the metric label."""

    def __init__(self, status: int, reason: str, metric: str) -> None:
        super().__init__(reason)
        self.status = status
        self.metric = metric


@dataclass(frozen=True)
class Reference:
    """One item of the Referenced SOP Sequence."""

    sop_class_uid: str
    sop_uid: str


@dataclass(frozen=True)
class Verdict:
    """What is committed and what failed (with its Failure Reason)."""

    committed: list[Reference]
    failed: list[tuple[Reference, int]]

    @property
    def event_type(self) -> int:
        return EVENT_SOME_FAILED if self.failed else EVENT_ALL_COMMITTED


def _valid_uid(value: str) -> bool:
    return 0 < len(value) <= _MAX_UID and UID(value).is_valid


def parse_request(action_type: int | None, info: Dataset | None
                  ) -> tuple[str, list[Reference]]:
    """Transaction UID and references of an N-ACTION (PS3.4 J.3.2.1.1), or
    CommitmentRejected naming what is wrong."""
    if action_type != ACTION_REQUEST_COMMIT:
        raise CommitmentRejected(NO_SUCH_ACTION_TYPE,
                                 f"Action Type ID {action_type} is not 1 (Request Storage "
                                 "Commitment)", "no_such_action")
    if info is None:
        raise CommitmentRejected(MISSING_ATTRIBUTE, "no Action Information", "missing_attribute")
    transaction = str(info.get("TransactionUID", "") or "").strip()
    if not transaction:
        raise CommitmentRejected(MISSING_ATTRIBUTE, "no Transaction UID", "missing_attribute")
    if not _valid_uid(transaction):
        raise CommitmentRejected(INVALID_ARGUMENT_VALUE, "Transaction UID is not a valid UID",
                                 "invalid_argument")
    items = info.get("ReferencedSOPSequence")
    if not items:
        raise CommitmentRejected(MISSING_ATTRIBUTE, "no Referenced SOP Sequence items",
                                 "missing_attribute")
    refs = []
    for index, item in enumerate(items):
        sop_class = str(item.get("ReferencedSOPClassUID", "") or "").strip()
        sop_uid = str(item.get("ReferencedSOPInstanceUID", "") or "").strip()
        if not sop_class or not sop_uid:
            raise CommitmentRejected(MISSING_ATTRIBUTE,
                                     f"Referenced SOP Sequence item {index + 1} lacks its SOP "
                                     "Class or Instance UID", "missing_attribute")
        refs.append(Reference(sop_class, sop_uid))
    return transaction, refs


def check_references(db: StateDB, refs: Sequence[Reference],
                     stored_classes: frozenset[str]) -> Verdict:
    """Each reference against the spool: committed when its row exists with the same SOP
    class and its file is on disk with the recorded size."""
    rows: dict[str, tuple[str, str, int]] = {}
    uids = sorted({r.sop_uid for r in refs})
    for start in range(0, len(uids), 500):
        chunk = uids[start:start + 500]
        marks = ",".join("?" * len(chunk))
        for row in db.query(f"SELECT sop_uid, sop_class_uid, path, size FROM instances "
                            f"WHERE sop_uid IN ({marks})", tuple(chunk)):
            rows[row["sop_uid"]] = (row["sop_class_uid"], row["path"], row["size"])
    committed: list[Reference] = []
    failed: list[tuple[Reference, int]] = []
    for ref in refs:
        known = rows.get(ref.sop_uid)
        if known is None:
            reason = (FAILURE_NO_SUCH_INSTANCE if ref.sop_class_uid in stored_classes
                      else FAILURE_CLASS_NOT_SUPPORTED)
            failed.append((ref, reason))
            continue
        sop_class, path, size = known
        if sop_class != ref.sop_class_uid:
            failed.append((ref, FAILURE_CLASS_INSTANCE_CONFLICT))
            continue
        try:
            on_disk = Path(path).stat().st_size == size
        except FileNotFoundError:
            on_disk = False
        except OSError as exc:
            LOGGER.error("storage commitment: cannot check %s of sop=%s: %s", path,
                         ref.sop_uid, exc)
            failed.append((ref, FAILURE_PROCESSING))
            continue
        if on_disk:
            committed.append(ref)
        else:
            LOGGER.warning("storage commitment: sop=%s is recorded but its file is gone or "
                           "has another size", ref.sop_uid)
            failed.append((ref, FAILURE_NO_SUCH_INSTANCE))
    return Verdict(committed, failed)


def event_information(transaction_uid: str, verdict: Verdict, ae_title: str) -> Dataset:
    """The N-EVENT-REPORT Event Information (PS3.4 J.3.3.1.1, J.3.3.1.2)."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    ds.RetrieveAETitle = ae_title
    if verdict.committed:
        ds.ReferencedSOPSequence = []
        for ref in verdict.committed:
            item = Dataset()
            item.ReferencedSOPClassUID = ref.sop_class_uid
            item.ReferencedSOPInstanceUID = ref.sop_uid
            ds.ReferencedSOPSequence.append(item)
    if verdict.failed:
        ds.FailedSOPSequence = []
        for ref, reason in verdict.failed:
            item = Dataset()
            item.ReferencedSOPClassUID = ref.sop_class_uid
            item.ReferencedSOPInstanceUID = ref.sop_uid
            item.FailureReason = reason
            ds.FailedSOPSequence.append(item)
    return ds


@dataclass(frozen=True)
class PendingCommitment:
    """A request whose N-EVENT-REPORT has not been delivered yet."""

    transaction_uid: str
    calling_ae: str
    refs: list[Reference]
    attempts: int


class CommitmentQueue:
    """Commitment requests in the state database: ``pending -> reported | dead``."""

    def __init__(self, db: StateDB, max_attempts: int, retry_interval_s: float) -> None:
        self.db = db
        self.max_attempts = max_attempts
        self.retry_interval_s = retry_interval_s

    def add(self, transaction_uid: str, calling_ae: str, refs: Sequence[Reference]) -> None:
        """Record a request (a repeated Transaction UID starts over)."""
        t = now()
        with self.db.transaction() as cur:
            cur.execute("INSERT OR REPLACE INTO commitments (transaction_uid, calling_ae, refs,"
                        " state, attempts, next_attempt_at, created_at) VALUES (?,?,?,"
                        " 'pending', 0, ?, ?)",
                        (transaction_uid, calling_ae,
                         json.dumps([[r.sop_class_uid, r.sop_uid] for r in refs]), t, t))

    def due(self, limit: int = 16) -> list[PendingCommitment]:
        """Pending requests whose (next) attempt is due, oldest first."""
        rows = self.db.query("SELECT * FROM commitments WHERE state = 'pending' AND "
                             "next_attempt_at <= ? ORDER BY next_attempt_at LIMIT ?",
                             (now(), limit))
        return [PendingCommitment(r["transaction_uid"], r["calling_ae"],
                                  [Reference(c, i) for c, i in json.loads(r["refs"])],
                                  r["attempts"]) for r in rows]

    def mark_reported(self, transaction_uid: str, verdict: Verdict) -> None:
        """The requester acknowledged the N-EVENT-REPORT."""
        with self.db.transaction() as cur:
            cur.execute("UPDATE commitments SET state = 'reported', reported_at = ?, attempts ="
                        " attempts + 1, committed = ?, failed = ?, last_error = NULL WHERE"
                        " transaction_uid = ?", (now(), len(verdict.committed),
                                                  len(verdict.failed), transaction_uid))

    def mark_failed(self, transaction_uid: str, error: str) -> str:
        """A delivery attempt failed; returns the new state (pending or dead)."""
        with self.db.transaction() as cur:
            row = cur.execute("SELECT attempts FROM commitments WHERE transaction_uid = ?",
                              (transaction_uid,)).fetchone()
            attempts = row["attempts"] + 1
            state = "dead" if attempts >= self.max_attempts else "pending"
            cur.execute("UPDATE commitments SET state = ?, attempts = ?, next_attempt_at = ?,"
                        " last_error = ? WHERE transaction_uid = ?",
                        (state, attempts, now() + self.retry_interval_s, error,
                         transaction_uid))
        return state

    def counts(self) -> dict[str, int]:
        """Requests per state."""
        counts = dict.fromkeys(COMMITMENT_STATES, 0)
        counts.update({r["state"]: r["n"] for r in self.db.query(
            "SELECT state, COUNT(*) AS n FROM commitments GROUP BY state")})
        return counts


class CommitmentService:
    """The thread that checks pending requests and delivers their N-EVENT-REPORTs."""

    def __init__(self, config: NodeConfig, db: StateDB, metrics: NodeMetrics,
                 stored_classes: frozenset[str]) -> None:
        self.config = config
        self.db = db
        self.metrics = metrics
        self.stored_classes = stored_classes
        self.queue = CommitmentQueue(db, config.commitment.max_attempts,
                                     config.commitment.retry_interval_s)
        self._open: dict[str, Association] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._message_id = 0

    def start(self) -> None:
        """Start the delivery thread (it first answers what a previous run left pending)."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="ich-node-commitment",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the current delivery; pending requests stay in the database."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def accept(self, transaction_uid: str, calling_ae: str, refs: Sequence[Reference],
               assoc: Association) -> None:
        """Record a request durably and remember its association (association thread)."""
        self.queue.add(transaction_uid, calling_ae, refs)
        if self.config.commitment.same_association:
            with self._lock:
                self._open[transaction_uid] = assoc
        self._wake.set()

    def _run(self) -> None:
        poll = min(1.0, self.config.commitment.retry_interval_s)
        while not self._stop.is_set():
            for item in self.queue.due():
                if self._stop.is_set():
                    return
                self.deliver(item)
            self._wake.wait(poll)
            self._wake.clear()

    def deliver(self, item: PendingCommitment) -> None:
        """Check *item* against the spool and report it; never raises for a failed delivery."""
        started = time.monotonic()
        with self._lock:
            assoc = self._open.pop(item.transaction_uid, None)
        try:
            verdict = check_references(self.db, item.refs, self.stored_classes)
            info = event_information(item.transaction_uid, verdict,
                                     self.config.dicom.ae_title)
            via = self._send(item, assoc, verdict.event_type, info)
        except SendError as exc:
            error = str(exc)
        except Exception as exc:  # the request boundary: any failure is a failed attempt
            error = f"{type(exc).__name__}: {exc}"
            LOGGER.exception("unexpected error answering storage commitment %s",
                             item.transaction_uid)
        else:
            # Counted before the row changes, so that whoever sees the new state (tests,
            # the status page) also sees the count.
            self.metrics.commitment_reports.labels(
                result="all_committed" if not verdict.failed else "some_failed",
                via=via).inc()
            self.queue.mark_reported(item.transaction_uid, verdict)
            LOGGER.info("storage commitment %s from %s answered on the %s association in "
                        "%.2f s: %d committed, %d failed%s", item.transaction_uid,
                        item.calling_ae, via.replace("_association", ""),
                        time.monotonic() - started, len(verdict.committed),
                        len(verdict.failed), _failures(verdict))
            return
        self.metrics.commitment_delivery_failures.inc()
        state = self.queue.mark_failed(item.transaction_uid, error)
        log = LOGGER.error if state == "dead" else LOGGER.warning
        log("storage commitment %s from %s: N-EVENT-REPORT not delivered (attempt %d, now "
            "%s): %s", item.transaction_uid, item.calling_ae, item.attempts + 1, state, error)

    def _open_after_grace(self, assoc: Association, item: PendingCommitment) -> bool:
        """Whether *assoc* is still open once the requester had
        ``commitment.same_association_grace_s`` to release it.

        A requester that releases right after the N-ACTION-RSP (PS3.4 J.3.3 allows it)
        sends its A-RELEASE-RQ within moments. An N-EVENT-REPORT-RQ sent before that
        arrives crosses it on the wire: the requester, waiting for the A-RELEASE-RP,
        cannot answer (PS3.8 has no P-DATA request in Sta7), and the node has to abort an
        association that was being released cleanly. Waiting a moment first turns that
        race into the rare case; the abort still handles what is left of it."""
        deadline = time.monotonic() + self.config.commitment.same_association_grace_s
        while assoc.is_established and not assoc.acse.is_release_requested():
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            time.sleep(min(left, GRACE_POLL_S))
        LOGGER.info("storage commitment %s: the requesting association was released; "
                    "answering on a new association", item.transaction_uid)
        return False

    def _next_id(self) -> int:
        self._message_id = self._message_id % 65535 + 1
        return self._message_id

    def _send(self, item: PendingCommitment, assoc: Association | None, event_type: int,
              info: Dataset) -> str:
        """Send on *assoc* if it is open, else on a new association; returns how."""
        if assoc is not None and self._open_after_grace(assoc, item):
            # A requester that releases right after the N-ACTION-RSP does not answer; a
            # short DIMSE timeout (pynetdicom then aborts) bounds the wait.
            previous = assoc.dimse_timeout
            assoc.dimse_timeout = self.config.commitment.same_association_timeout_s
            try:
                status, _ = assoc.send_n_event_report(info, event_type,
                                                      StorageCommitmentPushModel,
                                                      StorageCommitmentPushModelInstance,
                                                      msg_id=self._next_id())
            except RuntimeError as exc:  # released between the check and the send
                status = None
                LOGGER.info("storage commitment %s: requesting association closed (%s)",
                            item.transaction_uid, exc)
            finally:
                assoc.dimse_timeout = previous
            code = getattr(status, "Status", None)
            if code == SUCCESS:
                return "same_association"
            LOGGER.info("storage commitment %s: no success on the requesting association "
                        "(%s); trying a new association", item.transaction_uid,
                        "no response" if code is None else f"status 0x{code:04X}")
        peer = self.config.commitment.peer(item.calling_ae)
        if peer is None:
            raise SendError(f"the requesting association is closed and commitment.peers has "
                            f"no entry for AE {item.calling_ae!r}")
        contexts = [(str(StorageCommitmentPushModel),
                     [str(ImplicitVRLittleEndian), str(ExplicitVRLittleEndian)])]
        roles = [build_role(StorageCommitmentPushModel, scp_role=True)]
        with _association(self.config, peer, contexts, roles) as new:
            status, _ = new.send_n_event_report(info, event_type, StorageCommitmentPushModel,
                                                StorageCommitmentPushModelInstance,
                                                msg_id=self._next_id())
        code = getattr(status, "Status", None)
        if code != SUCCESS:
            raise SendError(f"{peer.ae_title}@{peer.host}:{peer.port} answered the "
                            f"N-EVENT-REPORT with "
                            f"{'nothing' if code is None else f'status 0x{code:04X}'}")
        return "new_association"


def _failures(verdict: Verdict) -> str:
    if not verdict.failed:
        return ""
    shown = ", ".join(f"{ref.sop_uid} (0x{reason:04X})" for ref, reason in verdict.failed[:5])
    more = f" and {len(verdict.failed) - 5} more" if len(verdict.failed) > 5 else ""
    return f"; failed: {shown}{more}"


def handle_commitment_request(event: evt.Event, service: CommitmentService,
                              metrics: NodeMetrics) -> tuple[int, Dataset | None]:
    """EVT_N_ACTION: record a storage commitment request and answer (PS3.4 J.3.2).

    The check and the N-EVENT-REPORT happen on :class:`CommitmentService`'s thread."""
    assoc = event.assoc
    request = cast(N_ACTION, event.request)
    calling_ae = str(assoc.requestor.ae_title).strip()
    try:
        if str(request.RequestedSOPClassUID) != str(StorageCommitmentPushModel):
            raise CommitmentRejected(PROCESSING_FAILURE,
                                     f"N-ACTION for SOP class {request.RequestedSOPClassUID}",
                                     "wrong_sop_class")
        if str(request.RequestedSOPInstanceUID) != str(StorageCommitmentPushModelInstance):
            raise CommitmentRejected(NO_SUCH_OBJECT_INSTANCE,
                                     "Requested SOP Instance is not the well-known "
                                     "1.2.840.10008.1.20.1.1", "no_such_instance")
        try:
            info = event.action_information
        except Exception as exc:  # pydicom raises many types on malformed input
            raise CommitmentRejected(PROCESSING_FAILURE,
                                     f"Action Information does not parse: "
                                     f"{type(exc).__name__}", "undecodable") from exc
        transaction, refs = parse_request(event.action_type, info)
        service.accept(transaction, calling_ae, refs, assoc)
    except CommitmentRejected as exc:
        metrics.commitment_requests.labels(outcome=exc.metric).inc()
        LOGGER.warning("storage commitment request from %s refused with 0x%04X: %s",
                       calling_ae, exc.status, exc)
        return exc.status, None
    except (OSError, sqlite3.Error) as exc:  # the request could not be recorded
        metrics.commitment_requests.labels(outcome="processing_failure").inc()
        LOGGER.error("storage commitment request from %s refused with 0x%04X: cannot record "
                     "it: %s: %s", calling_ae, PROCESSING_FAILURE, type(exc).__name__, exc)
        return PROCESSING_FAILURE, None
    metrics.commitment_requests.labels(outcome="accepted").inc()
    LOGGER.info("storage commitment request %s from %s: %d instances", transaction,
                calling_ae, len(refs))
    return SUCCESS, None
