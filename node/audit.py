"""The audit log: one JSON object per line, appended by every process of the node.

What happened to each series, for the person who must later answer "did the node see this
study, what did it find, and where did the result go?": ``received`` (the series became a
job), ``selected`` (the worker took the job), ``analysed`` (the worker finished it, done or
failed), ``sent`` (one delivery attempt to one destination) and ``notified`` (recorded by
the notification code through :meth:`AuditLog.record`).

No PHI: only UIDs, AE titles, destination names, outcomes, counts and timings. Field
names are checked against :data:`AUDIT_FIELDS`, so a caller cannot slip a patient name in
under a new key; free-text error messages are never written, only the error's kind (its
exception class), and the full reason stays in the job report and the state database.

Several processes (the node and its worker) append to the same file. Each line is written
with one ``write`` on a descriptor opened with ``O_APPEND``, so lines never interleave. When
the file reaches ``audit.max_mb`` it is renamed to ``audit.jsonl.1`` (older ones shift up to
``audit.keep``) under an ``flock`` on ``audit.jsonl.lock``; the file is created owner-only
(0600).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path

from node.config import NodeConfig
from node.db import StateDB, now

LOGGER = logging.getLogger(__name__)

AuditValue = str | int | float | bool | None
ErrorHook = Callable[[str], None]

AUDIT_NAME = "audit.jsonl"
MAX_LINE_BYTES = 4096

EVENTS = ("received", "selected", "analysed", "sent", "notified")

#: Every key a line may carry besides ``ts``, ``event`` and ``pid``. Add a key here (with
#: what it holds) rather than writing a free-form field: none of these may hold PHI.
AUDIT_FIELDS: dict[str, str] = {
    "job_id": "the job (one analysis of one series)",
    "study_uid": "Study Instance UID",
    "series_uid": "Series Instance UID",
    "calling_ae": "AE title that sent the series",
    "instances": "instances in the series when it became a job",
    "priority": "job priority (higher first)",
    "attempt": "attempt number of this job or delivery",
    "outcome": "done/failed (analysed), sent/retry/dead (sent), or the notifier's outcome",
    "seconds": "duration of the step, seconds",
    "wait_seconds": "time from job creation to the worker taking it, seconds",
    "latency_seconds": "time from the series' last received instance to this event, seconds",
    "positive": "whether the analysis called the series positive",
    "top_label": "the subtype with the highest probability",
    "results": "number of result objects",
    "error_kind": "error class (the message stays in the job report / state database)",
    "destination": "destination name from the configuration",
    "destination_ae": "destination AE title",
    "channel": "notification channel (e.g. email, webhook, hl7)",
    "target": "notification target name from the configuration (never a patient contact)",
}


class AuditError(ValueError):
    """A caller tried to write an event or field the audit log does not allow."""


def audit_path(config: NodeConfig) -> Path:
    """``audit.path``, or ``<spool>/audit.jsonl`` when it is null."""
    return config.audit.path if config.audit.path is not None else (
        Path(config.spool.path) / AUDIT_NAME)


class AuditLog:
    """Appends audit events to one JSON-lines file; safe across threads and processes.

    A failed write (disk full, permissions) is logged and passed to *on_error* (the node
    counts it in ``ich_node_audit_write_failures_total``); it never fails the analysis or
    the delivery that it describes.
    """

    def __init__(self, path: Path, max_bytes: int, keep: int, fsync: bool = True,
                 on_error: ErrorHook | None = None) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, not {keep}")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.keep = keep
        self.fsync = fsync
        self.on_error = on_error
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            mode = stat.S_IMODE(self.path.stat().st_mode)
            if mode & 0o077:
                LOGGER.warning("audit log %s had mode %o: setting it to 600", self.path, mode)
                os.chmod(self.path, 0o600)

    @classmethod
    def from_config(cls, config: NodeConfig, on_error: ErrorHook | None = None) -> AuditLog:
        """The audit log that *config* describes."""
        return cls(audit_path(config), config.audit.max_mb * 1024 * 1024, config.audit.keep,
                   config.spool.fsync, on_error)

    def record(self, event: str, **fields: AuditValue) -> None:
        """Append one *event* line with *fields* (keys from :data:`AUDIT_FIELDS`; values
        str, int, float, bool or None). Raises AuditError for an unknown event or key (a
        programming error); I/O failures are logged and reported, not raised."""
        if event not in EVENTS:
            raise AuditError(f"unknown audit event {event!r} (known: {', '.join(EVENTS)})")
        unknown = sorted(set(fields) - set(AUDIT_FIELDS))
        if unknown:
            raise AuditError(f"audit fields {unknown} are not in node.audit.AUDIT_FIELDS")
        for key, value in fields.items():
            if value is not None and not isinstance(value, (str, int, float, bool)):
                raise AuditError(f"audit field {key!r} must be a str, number, bool or None, "
                                 f"not {type(value).__name__}")
        line = {"ts": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
                "event": event, "pid": os.getpid(),
                **{k: round(v, 3) if isinstance(v, float) else v for k, v in fields.items()}}
        data = (json.dumps(line, separators=(",", ":"), ensure_ascii=True) + "\n").encode()
        if len(data) > MAX_LINE_BYTES:
            raise AuditError(f"audit line of {len(data)} bytes is over {MAX_LINE_BYTES}")
        try:
            with self._lock:
                self._rotate_if_full()
                self._append(data)
        except OSError as exc:
            reason = f"{type(exc).__name__}: {exc}"
            LOGGER.error("cannot write %s event to the audit log %s: %s", event, self.path,
                         reason)
            if self.on_error is not None:
                self.on_error(type(exc).__name__)

    def _append(self, data: bytes) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            written = os.write(fd, data)
            if written != len(data):  # a regular file takes it whole or raises (ENOSPC)
                raise OSError(f"short write to the audit log: {written} of {len(data)} bytes")
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def _rotate_if_full(self) -> None:
        try:
            if self.path.stat().st_size < self.max_bytes:
                return
        except FileNotFoundError:
            return
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:  # another process may have rotated while we waited for the lock
                if self.path.stat().st_size < self.max_bytes:
                    return
            except FileNotFoundError:
                return
            for index in range(self.keep - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{index}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{self.path.name}.{index + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
            LOGGER.info("audit log %s rotated at %d bytes (keeping %d old files)", self.path,
                        self.max_bytes, self.keep)
        finally:
            os.close(fd)  # releases the flock


def error_kind(reason: str | None) -> str | None:
    """The kind of a stored error reason (``"SeriesRejected: ..."`` -> ``SeriesRejected``)."""
    if not reason:
        return None
    head = reason.split(":", 1)[0].strip()
    if head.isidentifier():
        return head
    first = head.split(" ", 1)[0]
    return first if first.isidentifier() else "error"


def audit_received(audit: AuditLog, db: StateDB, job_id: int) -> None:
    """Record ``received`` for a series that just became job *job_id*."""
    rows = db.query("SELECT series_uid, study_uid, calling_ae, instance_count, priority,"
                    " last_received_at FROM jobs WHERE id = ?", (job_id,))
    if not rows:
        raise LookupError(f"job {job_id} is not in the state database")
    row = rows[0]
    audit.record("received", job_id=job_id, series_uid=row["series_uid"],
                 study_uid=row["study_uid"], calling_ae=row["calling_ae"],
                 instances=row["instance_count"], priority=row["priority"],
                 latency_seconds=now() - row["last_received_at"])
