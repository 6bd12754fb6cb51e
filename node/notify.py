"""The durable notification queue: alerts for finished studies (webhook, HL7 ORU^R01).

When a job finishes and the ``notifications.when`` filter matches (default: positive
studies, any time), :func:`plan` reads the patient and order fields from one spooled
header and returns the rows to insert, one per configured target; the worker inserts
them in the transaction that marks the job done (:meth:`node.jobs.SqliteJobQueue.finish`),
so an alert is never lost once the job is done, ``kill -9`` included.

States, as the outbound queue (:mod:`node.sender`): ``queued -> sending -> sent``; a
failed attempt goes back to ``queued`` with an exponential backoff, and to ``dead``
after ``notifications.max_attempts``. The thread that delivers them is
:class:`node.notifier.Notifier`; the messages are built by :mod:`node.webhook` and
:mod:`node.oru`. Delivery is at least once: a crash between a receiver's answer and our
commit sends the same notification again, with the same id.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import socket
import sqlite3
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from node import __version__
from node.config import NodeConfig, NotifyWhen
from node.db import RetryQueueTable, StateDB, now
from node.jobs import Job

LOGGER = logging.getLogger(__name__)

NOTIFICATION_STATES = ("queued", "sending", "sent", "dead")
KINDS = ("webhook", "hl7")
DEMO_WARNING = "demo weights: not for clinical use"
AI_NOTICE = ("AI triage result for prioritisation only, not a diagnosis; a radiologist "
             "reads every study.")

# DICOM keyword -> context key: what the messages need from the source header (PHI).
HEADER_FIELDS = {
    "PatientID": "patient_id",
    "IssuerOfPatientID": "issuer_of_patient_id",
    "PatientName": "patient_name",
    "PatientBirthDate": "patient_birth_date",
    "PatientSex": "patient_sex",
    "AccessionNumber": "accession_number",
    "StudyDate": "study_date",
    "StudyTime": "study_time",
    "StudyDescription": "study_description",
    "StudyID": "study_id",
}

InsertRows = Callable[[sqlite3.Cursor], None]


class NotifyError(Exception):
    """A notification target did not take a notification; the message says which and why."""


@dataclass(frozen=True)
class NodeIdentity:
    """Who sends: our AE title, software version and host name."""

    ae_title: str
    version: str
    hostname: str

    @classmethod
    def of(cls, config: NodeConfig) -> NodeIdentity:
        """The identity of the node that runs *config*."""
        return cls(config.dicom.ae_title, __version__, socket.gethostname())

    def to_dict(self) -> dict[str, str]:
        """JSON form."""
        return {"ae_title": self.ae_title, "version": self.version, "hostname": self.hostname}


@dataclass(frozen=True)
class Notification:
    """One notification of one finished job for one target, with what its message needs."""

    id: int
    uid: str  # stable across retries: receivers de-duplicate on it
    job_id: int
    study_uid: str
    series_uid: str
    kind: str
    target: str
    attempts: int
    priority: int
    findings: dict[str, Any]
    context: dict[str, str] | None  # None once retention scrubbed it
    created_at: float


def in_window(hours: str, at: dt.time) -> bool:
    """Whether *at* lies in ``"HH:MM-HH:MM"`` (start inclusive, end exclusive; a window
    whose end is before its start spans midnight)."""
    start, end = (dt.time.fromisoformat(part) for part in hours.split("-"))
    moment = at.replace(second=0, microsecond=0)
    if start < end:
        return start <= moment < end
    return moment >= start or moment < end


def wanted(when: NotifyWhen, findings: Mapping[str, Any], at: dt.datetime) -> bool:
    """Whether a job with *findings*, finished at local time *at*, notifies."""
    if when.findings == "positive" and findings.get("positive") is not True:
        return False
    return when.hours is None or in_window(when.hours, at.time())


def header_context(series_dir: Path) -> dict[str, str]:
    """The patient and order fields of the first readable spooled instance of the series
    (empty strings where absent; ``error`` says why when no header could be read)."""
    context = dict.fromkeys(HEADER_FIELDS.values(), "")
    problems: list[str] = []
    for path in sorted(Path(series_dir).glob("*.dcm")):
        try:
            ds = dcmread(path, stop_before_pixels=True,
                         specific_tags=["SpecificCharacterSet", *HEADER_FIELDS])
        except (OSError, InvalidDicomError) as exc:
            problems.append(f"{path.name}: {type(exc).__name__}")
            continue
        for keyword, key in HEADER_FIELDS.items():
            value = ds.get(keyword)
            context[key] = "" if value is None else str(value)
        return context
    context["error"] = "; ".join(problems) or f"no instances left in {series_dir}"
    return context


def plan(config: NodeConfig, job: Job, findings: Mapping[str, Any],
         at: dt.datetime | None = None) -> InsertRows | None:
    """The notification rows of a finished *job*, as a function that inserts them with the
    job's transaction cursor; None when no target is configured or the filter says no."""
    cfg = config.notifications
    targets = [("webhook", t.name) for t in cfg.webhooks] + [("hl7", t.name) for t in cfg.hl7]
    if not targets or not wanted(cfg.when, findings, at or dt.datetime.now()):
        return None
    context = header_context(Path(job.series_dir))
    if "error" in context:
        LOGGER.warning("job %d: no readable header for the notifications of study %s (%s); "
                       "they go out without patient and order fields", job.id, job.study_uid,
                       context["error"])
    text = json.dumps(context)

    def insert(cur: sqlite3.Cursor) -> None:
        t = now()
        for kind, name in targets:
            cur.execute("INSERT INTO notifications (uid, job_id, study_uid, kind, target,"
                        " context, state, next_attempt_at, created_at)"
                        " VALUES (?,?,?,?,?,?, 'queued', ?, ?)",
                        (str(uuid.uuid4()), job.id, job.study_uid, kind, name, text, t, t))

    LOGGER.info("job %d: study %s notifies %s", job.id, job.study_uid,
                ", ".join(f"{kind} {name}" for kind, name in targets))
    return insert


class SqliteNotificationQueue(RetryQueueTable):
    """Notification rows in the node's state database."""

    table = "notifications"

    @classmethod
    def from_config(cls, db: StateDB, config: NodeConfig) -> SqliteNotificationQueue:
        """The queue with the retry settings of ``notifications``."""
        cfg = config.notifications
        return cls(db, cfg.max_attempts, cfg.backoff_initial_s, cfg.backoff_max_s)

    def claim_due(self, limit: int = 8) -> list[Notification]:
        """Take the notifications whose retry time has come (state becomes ``sending``),
        higher job priority first."""
        with self.db.transaction() as cur:
            rows = cur.execute(
                "SELECT n.*, j.series_uid, j.priority, j.findings FROM notifications n"
                " JOIN jobs j ON j.id = n.job_id WHERE n.state = 'queued'"
                " AND n.next_attempt_at <= ? ORDER BY j.priority DESC, n.next_attempt_at, n.id"
                " LIMIT ?", (now(), limit)).fetchall()
            for row in rows:
                cur.execute("UPDATE notifications SET state = 'sending' WHERE id = ?",
                            (row["id"],))
        return [Notification(
            id=r["id"], uid=r["uid"], job_id=r["job_id"], study_uid=r["study_uid"],
            series_uid=r["series_uid"], kind=r["kind"], target=r["target"],
            attempts=r["attempts"], priority=r["priority"],
            findings=json.loads(r["findings"] or "{}"),
            context=None if r["context"] is None else json.loads(r["context"]),
            created_at=r["created_at"]) for r in rows]

    def resend_dead(self, study_uid: str) -> int:
        """Queue the dead notifications of *study_uid* again with a fresh retry budget (sent
        ones stay sent: a second alert for the same study would be noise)."""
        with self.db.transaction() as cur:
            cur.execute("UPDATE notifications SET state = 'queued', attempts = 0,"
                        " next_attempt_at = ?, last_error = NULL"
                        " WHERE study_uid = ? AND state = 'dead'", (now(), study_uid))
            return cur.rowcount

    def scrub(self, sent_before: float, dead_before: float) -> int:
        """Retention: drop the patient and order fields of notifications sent before
        *sent_before* and dead since before *dead_before*. Returns the rows scrubbed."""
        with self.db.transaction() as cur:
            cur.execute("UPDATE notifications SET context = NULL WHERE context IS NOT NULL AND"
                        " ((state = 'sent' AND sent_at < ?) OR (state = 'dead' AND"
                        " next_attempt_at < ?))", (sent_before, dead_before))
            return cur.rowcount

    def counts(self) -> dict[str, int]:
        """Notifications per state."""
        return self.db.count_by_state("notifications", NOTIFICATION_STATES)
