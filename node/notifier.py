"""The notifier: a thread in the node process that delivers due notifications.

Each notification is one webhook POST (:mod:`node.webhook`) or one HL7 ORU^R01 over
MLLP (:mod:`node.oru`); the outcome goes to the queue (:mod:`node.notify`), a metric by
target and kind, and a log line with the study UID (never patient fields).
"""

from __future__ import annotations

import logging
import threading
import time

from node import oru, webhook
from node.audit import AuditLog
from node.config import NodeConfig
from node.metrics import NodeMetrics
from node.notify import NodeIdentity, Notification, NotifyError, SqliteNotificationQueue

LOGGER = logging.getLogger(__name__)


def deliver(config: NodeConfig, node: NodeIdentity, note: Notification) -> str:
    """Send *note* to its target; returns a short outcome ("HTTP 200", "ACK AA"), raises
    NotifyError when the target did not take it."""
    if note.context is None:
        raise NotifyError("the study's patient and order fields were removed by retention; "
                          "the message cannot be built")
    if note.kind == "webhook":
        hook = next((t for t in config.notifications.webhooks if t.name == note.target), None)
        if hook is None:
            raise NotifyError(f"no webhook named {note.target!r} in notifications.webhooks")
        body = webhook.payload(note, node, hook.include_patient)
        return f"HTTP {webhook.post(hook, body, f'ich-node/{node.version}')}"
    if note.kind == "hl7":
        target = next((t for t in config.notifications.hl7 if t.name == note.target), None)
        if target is None:
            raise NotifyError(f"no HL7 target named {note.target!r} in notifications.hl7")
        return f"ACK {oru.send(target, oru.build(note, target, node))}"
    raise NotifyError(f"unknown notification kind {note.kind!r}")


class Notifier:
    """Delivers due notifications one at a time; also scrubs patient fields past retention."""

    def __init__(self, config: NodeConfig, queue: SqliteNotificationQueue,
                 metrics: NodeMetrics, poll_interval_s: float = 0.5,
                 audit: AuditLog | None = None) -> None:
        self.config = config
        self.audit = audit
        self.queue = queue
        self.metrics = metrics
        self.node = NodeIdentity.of(config)
        self.poll_interval_s = poll_interval_s
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_scrub = 0.0

    def start(self) -> None:
        """Start the delivery thread."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="ich-node-notifier",
                                        daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Look for due notifications now."""
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the current notification."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._scrub_if_due()
            items = self.queue.claim_due()
            for item in items:
                self.send_one(item)
            if not items:
                self._wake.wait(self.poll_interval_s)
                self._wake.clear()

    def _scrub_if_due(self) -> None:
        if time.monotonic() < self._next_scrub:
            return
        retention = self.config.retention
        self._next_scrub = time.monotonic() + retention.sweep_interval_s
        t = time.time()
        scrubbed = self.queue.scrub(t - retention.done_hours * 3600,
                                    t - retention.failed_days * 86400)
        if scrubbed:
            LOGGER.info("retention: removed patient fields from %d notifications", scrubbed)

    def send_one(self, note: Notification) -> None:
        """Deliver one notification and record the outcome (never raises for a failure)."""
        started = time.monotonic()
        try:
            outcome = deliver(self.config, self.node, note)
        except NotifyError as exc:
            error = str(exc)
        except Exception as exc:  # the item boundary: any failure is a failed attempt
            error = f"{type(exc).__name__}: {exc}"
            LOGGER.exception("unexpected error delivering notification %s (%s %s)", note.uid,
                             note.kind, note.target)
        else:
            error = ""
        labels = {"target": note.target, "kind": note.kind}
        # Metrics first, then the row: whoever sees the new state also sees the count.
        if error:
            self.metrics.notification_failures.labels(**labels).inc()
            state = self.queue.mark_failed(note.id, error)
            log = LOGGER.error if state == "dead" else LOGGER.warning
            log("%s notification %s of study %s (job %d) to %s failed (attempt %d, now %s): %s",
                note.kind, note.uid, note.study_uid, note.job_id, note.target,
                note.attempts + 1, state, error)
            self._audit(note, "retry" if state == "queued" else state, started)
            return
        self.metrics.notifications_sent.labels(**labels).inc()
        self._audit(note, "sent", started)
        self.queue.mark_sent(note.id)
        LOGGER.info("%s notification %s of study %s (job %d, priority %d) to %s: %s in %.2f s",
                    note.kind, note.uid, note.study_uid, note.job_id, note.priority,
                    note.target, outcome, time.monotonic() - started)

    def _audit(self, note: Notification, outcome: str, started: float) -> None:
        """The ``notified`` audit line of one delivery attempt (no patient data)."""
        if self.audit is None:
            return
        self.audit.record("notified", job_id=note.job_id, study_uid=note.study_uid,
                          series_uid=note.series_uid, channel=note.kind, target=note.target,
                          attempt=note.attempts + 1, outcome=outcome,
                          seconds=round(time.monotonic() - started, 3))
