"""Metrics that the node process derives from work done elsewhere, and destination health.

* :class:`FinishedJobs`: the worker is another process, so its timings reach Prometheus
  through the state database. At each scrape the node looks for jobs that finished since
  it last looked (``finished_at`` after the node started) and observes each one once: the
  job's duration (``finished_at - started_at``), the stage timings of the pipeline
  (``findings.timings_s``) and, for a failed job, its error kind. A job is never observed
  twice (ids seen are remembered for a window), and jobs that finished before this node
  process started are never observed, so a restart does not replay old jobs into a fresh
  histogram.
* :class:`DestinationHealth`: per destination, when the last delivery succeeded and failed
  and with what error, kept by the sender (in memory; the last success is read back from
  the outbound table at start). The status page shows it and ``/metrics`` exports it.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, Protocol

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from node.audit import error_kind
from node.db import StateDB, now

LOGGER = logging.getLogger(__name__)

PREFIX = "ich_node"

# A job committed late (several workers, clock skew) is still seen if it finished no more
# than this long before the newest job already observed.
_WINDOW_S = 600.0


class JobObservations(Protocol):
    """What :class:`FinishedJobs` observes into (the histograms and counter of NodeMetrics)."""

    def observe_job(self, outcome: str, seconds: float | None, kind: str | None,
                    stages: dict[str, float]) -> None:
        """One finished job: done or failed, its duration, its failure kind, its stages."""
        ...


class FinishedJobs:
    """Observes each job that finishes after *since* (default: now), exactly once."""

    def __init__(self, db: StateDB, sink: JobObservations, since: float | None = None) -> None:
        self.db = db
        self.sink = sink
        self._started = now() if since is None else since
        self._newest = self._started
        self._seen: dict[int, float] = {}
        self._lock = threading.Lock()

    def poll(self) -> int:
        """Observe jobs that finished since the last poll; returns how many."""
        with self._lock:
            floor = max(self._started, self._newest - _WINDOW_S)
            rows = self.db.query(
                "SELECT id, state, started_at, finished_at, error, findings FROM jobs"
                " WHERE state IN ('done', 'failed') AND finished_at > ? ORDER BY finished_at",
                (floor,))
            count = 0
            for row in rows:
                if row["id"] in self._seen:
                    continue
                self._seen[row["id"]] = row["finished_at"]
                self._newest = max(self._newest, row["finished_at"])
                seconds = (row["finished_at"] - row["started_at"]
                           if row["started_at"] is not None else None)
                self.sink.observe_job(row["state"], seconds, error_kind(row["error"]),
                                      _stages(row["findings"]))
                count += 1
            self._seen = {i: t for i, t in self._seen.items() if t > self._newest - _WINDOW_S}
            return count


def _stages(findings: str | None) -> dict[str, float]:
    """``timings_s`` of the findings JSON (the real pipeline's stage timings), if any."""
    if not findings:
        return {}
    timings = json.loads(findings).get("timings_s")
    if not isinstance(timings, dict):
        return {}
    return {str(k): float(v) for k, v in timings.items() if isinstance(v, (int, float))}


@dataclass(frozen=True)
class DestinationState:
    """The delivery health of one destination."""

    last_success: float | None = None
    last_failure: float | None = None
    last_error: str | None = None
    consecutive_failures: int = 0

    @property
    def health(self) -> str:
        """``ok`` (last attempt succeeded), ``failing`` or ``unknown`` (no attempt yet)."""
        if self.last_failure is None and self.last_success is None:
            return "unknown"
        if self.consecutive_failures and (self.last_success is None
                                          or (self.last_failure or 0) >= self.last_success):
            return "failing"
        return "ok"


class DestinationHealth(Collector):
    """Last success and failure per destination; also a Prometheus collector."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._states: dict[str, DestinationState] = {}

    def load(self, db: StateDB) -> None:
        """Start-up: the last successful delivery per destination from the outbound table."""
        rows = db.query("SELECT destination, MAX(sent_at) AS t FROM outbound"
                        " WHERE state = 'sent' GROUP BY destination")
        with self._lock:
            for row in rows:
                old = self._states.get(row["destination"], DestinationState())
                self._states[row["destination"]] = replace(old, last_success=row["t"])

    def succeeded(self, destination: str, at: float | None = None) -> None:
        """A delivery to *destination* succeeded."""
        with self._lock:
            old = self._states.get(destination, DestinationState())
            self._states[destination] = replace(old, last_success=now() if at is None else at,
                                                consecutive_failures=0)

    def failed(self, destination: str, error: str, at: float | None = None) -> None:
        """A delivery attempt to *destination* failed with *error*."""
        with self._lock:
            old = self._states.get(destination, DestinationState())
            self._states[destination] = replace(
                old, last_failure=now() if at is None else at, last_error=error,
                consecutive_failures=old.consecutive_failures + 1)

    def get(self, destination: str) -> DestinationState:
        """The state of *destination* (``unknown`` if never tried)."""
        with self._lock:
            return self._states.get(destination, DestinationState())

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            states = dict(self._states)
        success = GaugeMetricFamily(
            f"{PREFIX}_destination_last_success_timestamp_seconds",
            "Unix time of the last successful delivery, by destination", labels=["destination"])
        failure = GaugeMetricFamily(
            f"{PREFIX}_destination_last_failure_timestamp_seconds",
            "Unix time of the last failed delivery attempt (since the node started), by "
            "destination", labels=["destination"])
        streak = GaugeMetricFamily(
            f"{PREFIX}_destination_consecutive_failures",
            "Failed delivery attempts since the last success, by destination",
            labels=["destination"])
        for name, state in sorted(states.items()):
            if state.last_success is not None:
                success.add_metric([name], state.last_success)
            if state.last_failure is not None:
                failure.add_metric([name], state.last_failure)
            streak.add_metric([name], state.consecutive_failures)
        yield success
        yield failure
        yield streak


@dataclass(frozen=True)
class JobOrigin:
    """The series a job analysed and when its last instance arrived."""

    series_uid: str
    last_received_at: float


def job_origin(db: StateDB, job_id: int) -> JobOrigin | None:
    """The series of *job_id* and the arrival time of its last instance (None if gone)."""
    rows = db.query("SELECT series_uid, last_received_at FROM jobs WHERE id = ?", (job_id,))
    if not rows:
        return None
    return JobOrigin(str(rows[0]["series_uid"]), float(rows[0]["last_received_at"]))


@dataclass(frozen=True)
class FindingsSummary:
    """The headline of a job's findings JSON (the shape of ``Findings.to_json``)."""

    positive: bool | None
    top_label: str | None  # the subtype with the highest probability
    top_probability: float | None
    any_probability: float | None
    volume_ml: float | None  # total segmented volume
    volumes_ml: dict[str, float]


def summarize_findings(findings: dict[str, Any] | None) -> FindingsSummary:
    """Positive, top subtype and volumes of a findings dict; None where the analyzer did not
    say (test analyzers write other shapes)."""
    findings = findings or {}
    positive = findings.get("positive")
    labels = findings.get("labels")
    top_label = top_p = any_p = None
    if isinstance(labels, dict):
        probs = {name: float(v["probability"]) for name, v in labels.items()
                 if isinstance(v, dict) and isinstance(v.get("probability"), (int, float))}
        any_p = probs.pop("any", None)
        if probs:
            top_label = max(probs, key=lambda name: probs[name])
            top_p = probs[top_label]
    raw_volumes = findings.get("volumes_ml")
    volumes = ({str(k): float(v) for k, v in raw_volumes.items() if isinstance(v, (int, float))}
               if isinstance(raw_volumes, dict) else {})
    return FindingsSummary(positive if isinstance(positive, bool) else None, top_label, top_p,
                           any_p, round(sum(volumes.values()), 3) if volumes else None, volumes)
