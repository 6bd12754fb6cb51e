"""Prometheus metrics of one node, on a registry of its own (no module globals).

Counters are kept by the process that sees the event (the node process: the
association threads, assembler and sender). Queue depths and job outcomes are
read from the state database at scrape time, so they include the worker
process's work and survive restarts.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from node.audit import error_kind
from node.db import StateDB
from node.monitoring import DestinationHealth

PREFIX = "ich_node"


class StateCollector(Collector):
    """Gauges read from the state database: series, jobs and outbound items per state,
    failed jobs per reason kind, and the spool's free space."""

    def __init__(self, db: StateDB, spool_dir: Path) -> None:
        self.db = db
        self.spool_dir = spool_dir

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for table, help_text in (("series", "Series by state"), ("jobs", "Jobs by state"),
                                 ("outbound", "Outbound result sets by state"),
                                 ("notifications", "Notifications by state")):
            family = GaugeMetricFamily(f"{PREFIX}_{table}", help_text, labels=["state"])
            for row in self.db.query(f"SELECT state, COUNT(*) AS n FROM {table} GROUP BY state"):
                family.add_metric([row["state"]], row["n"])
            yield family
        failed = GaugeMetricFamily(f"{PREFIX}_failed_jobs", "Failed jobs by error kind",
                                   labels=["kind"])
        kinds: dict[str, int] = {}
        for row in self.db.query("SELECT error, COUNT(*) AS n FROM jobs WHERE state = 'failed'"
                                 " GROUP BY error"):
            kind = error_kind(row["error"]) or "unknown"
            kinds[kind] = kinds.get(kind, 0) + row["n"]
        for kind, n in sorted(kinds.items()):
            failed.add_metric([kind], n)
        yield failed
        free = GaugeMetricFamily(f"{PREFIX}_spool_free_bytes", "Free space of the spool")
        free.add_metric([], shutil.disk_usage(self.spool_dir).free)
        yield free


class NodeMetrics:
    """The counters and histograms of a node."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.instances_received = Counter(
            f"{PREFIX}_instances_received", "Instances received, by outcome "
            "(stored, duplicate, replaced, ignored)", ["outcome"], registry=r)
        self.store_failures = Counter(
            f"{PREFIX}_store_failures", "C-STORE requests answered with a failure status, by "
            "reason", ["reason"], registry=r)
        self.associations = Counter(
            f"{PREFIX}_associations", "Inbound associations by outcome (accepted, or the "
            "rejection reason)", ["outcome"], registry=r)
        self.contexts_refused = Counter(
            f"{PREFIX}_presentation_contexts_refused", "Presentation contexts refused at "
            "negotiation (SOP classes we do not store)", registry=r)
        self.protocol_errors = Counter(
            f"{PREFIX}_protocol_errors", "Inbound connections ended by a protocol error, by "
            "reason: pdu_too_large, read_timeout (a silent peer in the middle of a PDU), "
            "bad_dimse_message (a command set that does not decode), bad_pdu (a PDU that "
            "pynetdicom cannot process), aborted (an established "
            "association ended in A-ABORT)", ["reason"], registry=r)
        self.late_instances = Counter(
            f"{PREFIX}_late_instances", "Instances for a series already queued or analysed",
            registry=r)
        self.series_completed = Counter(
            f"{PREFIX}_series_completed", "Series turned into jobs", registry=r)
        self.assembly_errors = Counter(
            f"{PREFIX}_assembly_errors", "Series checks that could not write their job (disk "
            "full, database error); retried after the quiet period", registry=r)
        self.results_sent = Counter(
            f"{PREFIX}_results_sent", "Result objects delivered, by destination",
            ["destination"], registry=r)
        self.outbound_failures = Counter(
            f"{PREFIX}_outbound_failures", "Failed delivery attempts, by destination",
            ["destination"], registry=r)
        self.notifications_sent = Counter(
            f"{PREFIX}_notifications_sent", "Notifications delivered, by target and kind "
            "(webhook, hl7)", ["target", "kind"], registry=r)
        self.notification_failures = Counter(
            f"{PREFIX}_notification_failures", "Failed notification attempts, by target and "
            "kind", ["target", "kind"], registry=r)
        self.config_reloads = Counter(
            f"{PREFIX}_config_reloads", "Configuration reloads (SIGHUP) by outcome (applied, "
            "invalid, no_source)", ["outcome"], registry=r)
        self.commitment_requests = Counter(
            f"{PREFIX}_commitment_requests", "Storage commitment N-ACTION requests, by outcome "
            "(accepted, or the refusal reason)", ["outcome"], registry=r)
        self.commitment_reports = Counter(
            f"{PREFIX}_commitment_reports", "Storage commitment N-EVENT-REPORTs delivered, by "
            "result (all_committed, some_failed) and association (same_association, "
            "new_association)", ["result", "via"], registry=r)
        self.commitment_delivery_failures = Counter(
            f"{PREFIX}_commitment_delivery_failures", "Failed N-EVENT-REPORT delivery attempts",
            registry=r)
        self.store_seconds = Histogram(
            f"{PREFIX}_store_seconds", "Time to make one received instance durable",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0), registry=r)
        # Observability (issue 7): latency, analysis time, errors by kind; see README.
        self.result_latency = Histogram(
            f"{PREFIX}_result_latency_seconds", "From the last received instance of a series "
            "to its results sent, by destination", ["destination"],
            buckets=(5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1800, 3600), registry=r)
        self.job_seconds = Histogram(
            f"{PREFIX}_job_seconds", "Worker time per job (analysis and writing results), by "
            "outcome", ["outcome"],
            buckets=(0.5, 1, 2, 5, 10, 15, 20, 30, 60, 120, 300, 600), registry=r)
        self.inference_seconds = Histogram(
            f"{PREFIX}_inference_seconds", "Pipeline stage time per job (volume, preprocess, "
            "classifier, segmenter, lesions, total), by stage", ["stage"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 60, 120), registry=r)
        self.job_failures = Counter(
            f"{PREFIX}_job_failures", "Jobs that failed, by error kind", ["kind"], registry=r)
        self.outbound_errors = Counter(
            f"{PREFIX}_outbound_errors", "Failed delivery attempts, by destination and kind "
            "(association, timeout, status, files_missing, unknown_destination, unexpected)",
            ["destination", "kind"], registry=r)
        self.audit_failures = Counter(
            f"{PREFIX}_audit_write_failures", "Audit lines that could not be written (node "
            "process), by error", ["kind"], registry=r)
        self.http_requests = Counter(
            f"{PREFIX}_http_requests", "Requests to the HTTP endpoint, by page and status code",
            ["page", "code"], registry=r)
        self.worker_restarts = Counter(
            f"{PREFIX}_worker_restarts", "Worker processes restarted after they died",
            registry=r)
        self.destinations = DestinationHealth()
        r.register(self.destinations)
        self._before_scrape: list[Callable[[], object]] = []

    def add_state(self, db: StateDB, spool_dir: Path) -> None:
        """Also export the gauges read from the state database."""
        self.registry.register(StateCollector(db, spool_dir))

    def observe_job(self, outcome: str, seconds: float | None, kind: str | None,
                    stages: dict[str, float]) -> None:
        """A job the worker finished (see :class:`node.monitoring.FinishedJobs`)."""
        if seconds is not None:
            self.job_seconds.labels(outcome=outcome).observe(seconds)
        for stage, value in stages.items():
            self.inference_seconds.labels(stage=stage).observe(value)
        if outcome == "failed":
            self.job_failures.labels(kind=kind or "unknown").inc()

    def before_scrape(self, hook: Callable[[], object]) -> None:
        """Call *hook* before each render (e.g. to observe jobs finished by the worker)."""
        self._before_scrape.append(hook)

    def render(self) -> bytes:
        """The text exposition format."""
        for hook in self._before_scrape:
            hook()
        return generate_latest(self.registry)
