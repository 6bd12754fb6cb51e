"""Series assembly: a series is complete after a quiet period.

Each arrival (re)schedules an apscheduler date job for its series at
``now + quiet period`` (per calling AE). When it fires and the series has been
quiet long enough, the series becomes one job in the durable queue. An
association release may schedule an earlier check (``release_grace_seconds``)
for the series it delivered, once no other association is delivering to them;
it is never the only signal. After a restart, :meth:`SeriesAssembler.resume`
schedules every series that was still receiving.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime, timedelta

from apscheduler.schedulers.base import BaseScheduler

from node.config import AssemblyConfig
from node.db import now
from node.jobs import SqliteJobQueue
from node.metrics import NodeMetrics
from node.triage import Triage

LOGGER = logging.getLogger(__name__)

_EPSILON_S = 0.005
CLOSED_KEEP = 256  # closed associations whose release may still be reported


class SeriesAssembler:
    """Keeps one completion timer per receiving series."""

    def __init__(self, scheduler: BaseScheduler, jobs: SqliteJobQueue, config: AssemblyConfig,
                 metrics: NodeMetrics, on_job: Callable[[int], None] | None = None,
                 triage: Triage | None = None) -> None:
        self.scheduler = scheduler
        self.triage = triage
        self.jobs = jobs
        self.config = config
        self.metrics = metrics
        self.on_job = on_job
        self._lock = threading.Lock()
        self._delivering: dict[str, set[int]] = {}
        self._by_assoc: dict[int, set[str]] = {}
        # Series of associations whose connection closed before their release was seen:
        # EVT_CONN_CLOSE runs on the DUL thread and can overtake EVT_RELEASED.
        self._closed: OrderedDict[int, set[str]] = OrderedDict()
        self._armed: set[str] = set()  # series with a pending check; check() re-arms itself

    def instance_arrived(self, series_uid: str, calling_ae: str, assoc_id: int) -> None:
        """An instance of *series_uid* was spooled. The quiet period runs from the last
        arrival recorded in the database, so a pending check is left as it is: when it
        fires too early it re-arms itself for the rest of the period."""
        with self._lock:
            self._closed.pop(assoc_id, None)  # an id of a closed association, reused
            self._delivering.setdefault(series_uid, set()).add(assoc_id)
            self._by_assoc.setdefault(assoc_id, set()).add(series_uid)
            if series_uid in self._armed:
                return
            self._armed.add(series_uid)
        self._schedule(series_uid, self.config.quiet_for(calling_ae), early=False)

    def association_ended(self, assoc_id: int, released: bool) -> None:
        """An association ended; on a release, check its idle series early.

        The connection's close (``released=False``) may be reported before the release
        of the same association: the peer closes as soon as it has our A-RELEASE-RP,
        and that event comes from another thread. Its series are then kept (the last
        :data:`CLOSED_KEEP` associations) so that the release still earns the early
        check."""
        with self._lock:
            series = self._by_assoc.pop(assoc_id, None)
            if series is None:
                series = self._closed.pop(assoc_id, set()) if released else set()
            elif not released:
                self._closed[assoc_id] = series
                while len(self._closed) > CLOSED_KEEP:
                    self._closed.popitem(last=False)
            idle = []
            for uid in series:
                senders = self._delivering.get(uid, set())
                senders.discard(assoc_id)
                if not senders:
                    self._delivering.pop(uid, None)
                    idle.append(uid)
        grace = self.config.release_grace_seconds
        if released and grace is not None:
            for uid in idle:
                self._schedule(uid, grace, early=True)

    def resume(self) -> int:
        """Start-up: schedule a check for every series left ``receiving``, a whole quiet
        period from now. Silence while the node was down says nothing about whether the
        series is complete (its sender could not reach us); counting the downtime made a
        series cut by a crash into a job before the sender could send the rest."""
        rows = self.jobs.db.query("SELECT series_uid, calling_ae FROM series"
                                  " WHERE state = 'receiving'")
        for row in rows:
            with self._lock:
                self._armed.add(row["series_uid"])
            self._schedule(row["series_uid"], self.config.quiet_for(row["calling_ae"]),
                           early=False)
        if rows:
            LOGGER.info("resumed assembly of %d series", len(rows))
        return len(rows)

    def _disarm(self, series_uid: str) -> None:
        with self._lock:
            self._armed.discard(series_uid)

    def _schedule(self, series_uid: str, delay_s: float, early: bool) -> None:
        self.scheduler.add_job(
            self.check, "date", run_date=datetime.now() + timedelta(seconds=delay_s),
            args=[series_uid, early], id=f"series:{series_uid}", replace_existing=True,
            misfire_grace_time=None, coalesce=True,
        )

    def check(self, series_uid: str, early: bool = False) -> int | None:
        """Turn the series into a job if it has been quiet long enough; else re-arm."""
        with self._lock:
            self._armed.add(series_uid)  # armed until this check decides
        rows = self.jobs.db.query("SELECT state, calling_ae, last_received_at FROM series"
                                  " WHERE series_uid = ?", (series_uid,))
        if not rows or rows[0]["state"] != "receiving":
            self._disarm(series_uid)
            return None
        row = rows[0]
        quiet = self.config.quiet_for(row["calling_ae"])
        idle = now() - row["last_received_at"]
        with self._lock:
            busy = bool(self._delivering.get(series_uid))
        grace = self.config.release_grace_seconds
        if early and (busy or grace is None):
            early = False
        threshold = grace if (early and grace is not None) else quiet
        if idle + _EPSILON_S < threshold:
            self._schedule(series_uid, threshold - idle, early)
            return None
        try:
            priority, reason = 0, None
            if self.triage is not None:
                decision = self.triage.for_series(series_uid, row["calling_ae"])
                priority, reason = decision.priority, decision.reason
            job_id = self.jobs.create_for_series(series_uid, priority, reason)
        except (sqlite3.Error, OSError) as exc:
            # E.g. a full disk: the series stays receiving and is checked again (nothing else
            # would arm it when every instance is already here).
            self.metrics.assembly_errors.inc()
            LOGGER.error("series %s: cannot queue its job (%s: %s); trying again in %.1f s",
                         series_uid, type(exc).__name__, exc, quiet)
            self._schedule(series_uid, quiet, early=False)
            return None
        self._disarm(series_uid)
        if job_id is not None:
            self.metrics.series_completed.inc()
            LOGGER.info("series %s quiet for %.1f s (%s): job %d", series_uid, idle,
                        "after release" if early else "quiet period", job_id)
            if self.on_job is not None:
                self.on_job(job_id)
        return job_id
