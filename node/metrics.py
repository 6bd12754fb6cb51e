"""Prometheus metrics of one node, on a registry of its own (no module globals).

Counters are kept by the process that sees the event (the node process: the
association threads, assembler and sender). Queue depths and job outcomes are
read from the state database at scrape time, so they include the worker
process's work and survive restarts.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from node.db import StateDB

PREFIX = "ich_node"


class StateCollector(Collector):
    """Gauges read from the state database: series, jobs and outbound items per state,
    failed jobs per reason kind, and the spool's free space."""

    def __init__(self, db: StateDB, spool_dir: Path) -> None:
        self.db = db
        self.spool_dir = spool_dir

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for table, help_text in (("series", "Series by state"), ("jobs", "Jobs by state"),
                                 ("outbound", "Outbound result sets by state")):
            family = GaugeMetricFamily(f"{PREFIX}_{table}", help_text, labels=["state"])
            for row in self.db.query(f"SELECT state, COUNT(*) AS n FROM {table} GROUP BY state"):
                family.add_metric([row["state"]], row["n"])
            yield family
        failed = GaugeMetricFamily(f"{PREFIX}_failed_jobs", "Failed jobs by error kind",
                                   labels=["kind"])
        for row in self.db.query("SELECT substr(error, 1, instr(error || ':', ':') - 1) AS kind,"
                                 " COUNT(*) AS n FROM jobs WHERE state = 'failed' GROUP BY kind"):
            failed.add_metric([row["kind"] or "unknown"], row["n"])
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
        self.store_seconds = Histogram(
            f"{PREFIX}_store_seconds", "Time to make one received instance durable",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0), registry=r)

    def add_state(self, db: StateDB, spool_dir: Path) -> None:
        """Also export the gauges read from the state database."""
        self.registry.register(StateCollector(db, spool_dir))

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
