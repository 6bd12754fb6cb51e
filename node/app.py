"""The node's lifecycle: start everything, resume unfinished work, stop cleanly.

Start order: state database, recovery (spool, jobs, outbound), scheduler and
assembler, worker process, sender, notifier, HTTP endpoint, and the DICOM listener last,
so that nothing is accepted before it can be kept. Stop order is the reverse:
stop accepting first, then let the worker finish or re-queue its job.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from pynetdicom import evt

from node import __version__, handlers
from node.assembler import SeriesAssembler
from node.audit import AuditLog, audit_received
from node.commitment import CommitmentService
from node.config import ConfigError, NodeConfig, check_runtime
from node.db import StateDB
from node.http import HttpEndpoint
from node.jobs import SqliteJobQueue
from node.logs import setup_logging
from node.metrics import NodeMetrics
from node.monitoring import FinishedJobs
from node.notifier import Notifier
from node.notify import SqliteNotificationQueue
from node.reload import plan
from node.retention import sweep
from node.scp import CT_SOP_CLASSES, Listeners, start_server
from node.sender import Sender, SqliteOutboundQueue
from node.spool import DiskSpool
from node.statuspage import StatusPage
from node.tls import check_tls
from node.triage import Triage
from node.worker import REAL_ANALYZER, WorkerProcess
from pipeline.analyze import check_models
from pipeline.errors import PipelineError
from pipeline.findings import ModelIdentity

LOGGER = logging.getLogger(__name__)


ConfigLoader = Callable[[], NodeConfig]


def _resolve_spool(config: NodeConfig) -> NodeConfig:
    return config.model_copy(update={"spool": config.spool.model_copy(
        update={"path": config.spool.path.resolve()})})


class Node:
    """One running node. ``analyzer`` is an import path; ``ich-node run`` uses the real one.
    ``loader`` re-reads the configuration from the sources used at start (for SIGHUP)."""

    def __init__(self, config: NodeConfig, analyzer: str = REAL_ANALYZER,
                 loader: ConfigLoader | None = None) -> None:
        self.config = _resolve_spool(config)
        self.loader = loader
        self.analyzer = analyzer
        self.metrics = NodeMetrics()
        self._stopped = threading.Event()
        self._listeners: Listeners | None = None
        self.commitment: CommitmentService | None = None
        self._http: HttpEndpoint | None = None
        self.db: StateDB | None = None
        self._spool_db: StateDB | None = None
        self.scheduler: BackgroundScheduler | None = None
        self.worker: WorkerProcess | None = None
        self.sender: Sender | None = None
        self.notifier: Notifier | None = None
        self.status_page: StatusPage | None = None

    def start(self) -> None:
        """Start every part; return once the DICOM port listens. Refuses to start (a
        ConfigError naming the key) when the spool is unusable or the real pipeline's
        weights are missing or do not match their metadata; on any other failure the parts
        already started are stopped again."""
        cfg = self.config
        check_runtime(cfg)
        check_tls(cfg)
        model: ModelIdentity | None = None
        if self.analyzer == REAL_ANALYZER:
            try:
                model = check_models(cfg.pipeline)
            except PipelineError as exc:
                raise ConfigError(f"pipeline.models: {exc}") from exc
        try:
            self._start_parts(model)
        except BaseException:
            self.stop()
            raise

    def _start_parts(self, model: ModelIdentity | None) -> None:
        cfg = self.config
        self.db = db = StateDB(cfg.spool.path)
        # The files are the spool's truth (fsynced before the row is committed): see node.db.
        self._spool_db = StateDB(cfg.spool.path, synchronous="NORMAL")
        self.spool = DiskSpool(cfg.spool.path, self._spool_db, cfg.spool.fsync,
                               cfg.assembly.rerun_on_late_instances)
        self.jobs = SqliteJobQueue(db, cfg.worker.max_job_attempts)
        self.outbound = SqliteOutboundQueue(db, cfg.outbound.max_attempts,
                                            cfg.outbound.backoff_initial_s,
                                            cfg.outbound.backoff_max_s)
        self.metrics.add_state(db, cfg.spool.path)
        self.audit = AuditLog.from_config(cfg, on_error=lambda kind: self.metrics.audit_failures
                                          .labels(kind=kind).inc())
        self.metrics.before_scrape(FinishedJobs(db, self.metrics).poll)
        self.metrics.destinations.load(db)
        recovered = self.spool.recover()
        requeued, failed = self.jobs.requeue_interrupted()
        resent = self.outbound.requeue_interrupted()
        self.notifications = SqliteNotificationQueue.from_config(db, cfg)
        renotify = self.notifications.requeue_interrupted()

        self.scheduler = BackgroundScheduler(executors={"default": ThreadPoolExecutor(4)},
                                             job_defaults={"misfire_grace_time": None})
        self.triage = Triage(cfg.triage, db)
        self.assembler = SeriesAssembler(self.scheduler, self.jobs, cfg.assembly, self.metrics,
                                         on_job=lambda job_id: audit_received(self.audit, db,
                                                                              job_id),
                                         triage=self.triage)
        self.scheduler.start()
        resumed = self.assembler.resume()
        self.scheduler.add_job(self._housekeeping, "interval", seconds=2.0, id="housekeeping")
        self.scheduler.add_job(self._retention, "interval", seconds=cfg.retention.sweep_interval_s,
                               id="retention")

        self.worker = WorkerProcess(cfg, self.analyzer, self.jobs)
        self.worker.start()
        self.sender = Sender(cfg, self.outbound, self.metrics, audit=self.audit)
        self.sender.start()
        self.notifier = Notifier(cfg, self.notifications, self.metrics, audit=self.audit)
        self.notifier.start()
        if cfg.http.port:
            self.status_page = StatusPage(cfg, db, self.metrics.destinations)
            self._http = HttpEndpoint(cfg.http.host, cfg.http.port, self.metrics, self.healthy,
                                      self.status_page.route)
            self._http.start()
        if cfg.commitment.enabled:
            self.commitment = CommitmentService(cfg, db, self.metrics, CT_SOP_CLASSES)
            self.commitment.start()
        self._listeners = start_server(cfg, self.spool, self.assembler, self.metrics,
                                       self.commitment)
        self.ae = self._listeners.ae
        if self.status_page is not None:
            self.status_page.dicom_port = self.port
        self._requested_handler: Callable[..., Any] = handlers.handle_requested
        LOGGER.info(
            "ich-node %s listening as %s on %s:%d; spool %s; %d destinations; analyzer %s; "
            "TLS port %s; model %s; recovered %d files, re-queued %d jobs (%d failed), "
            "%d outbound, resumed %d series, %d notifications", __version__,
            cfg.dicom.ae_title, cfg.dicom.host, self.port,
            cfg.spool.path, len(cfg.destinations), self.analyzer, self.tls_port or "off",
            f"{model.name} {model.version} sha256 {model.sha256[:16]}"
            + (" (DEMO weights, not for clinical use)" if model.demo else "") if model
            else "none (test analyzer)",
            recovered, requeued, failed, resent, resumed, renotify)

    @property
    def port(self) -> int:
        """The DICOM port actually bound (useful with port 0 in tests); the TLS port when
        there is no plain listener."""
        assert self._listeners is not None, "node not started"
        return int(self._listeners.servers[0].server_address[1])

    @property
    def tls_port(self) -> int | None:
        """The DICOM-over-TLS port actually bound, if TLS is enabled."""
        if self._listeners is None or self._listeners.tls is None:
            return None
        return int(self._listeners.tls.server_address[1])

    @property
    def http_port(self) -> int | None:
        """The HTTP port actually bound, if enabled."""
        return self._http.port if self._http else None

    def healthy(self) -> tuple[bool, str]:
        """Liveness: the worker runs and the listener is up."""
        if self._listeners is None:
            return False, "DICOM listener not running"
        if self.worker is None or not self.worker.is_alive():
            return False, "worker process not running"
        return True, "ok"

    def _housekeeping(self) -> None:
        if self.worker is not None:
            before = self.worker.restarts
            self.worker.ensure_running()
            self.metrics.worker_restarts.inc(self.worker.restarts - before)

    def _retention(self) -> None:
        assert self.db is not None
        sweep(self.db, self.config.retention, self.config.spool.path)

    def stop(self) -> None:
        """Stop accepting, finish or re-queue the current job, stop everything (also the
        parts of a start that failed half-way)."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        LOGGER.info("stopping: no new associations")
        if self._listeners is not None:
            self._listeners.shutdown()
            self._listeners = None
            self._drain_associations()
        if self.commitment is not None:
            self.commitment.stop()
        if self.scheduler is not None and self.scheduler.running:
            self.scheduler.shutdown(wait=True)
        if self.worker is not None:
            self.worker.stop()
        if self.sender is not None:
            self.sender.stop()
        if self.notifier is not None:
            self.notifier.stop()
        if self._http is not None:
            self._http.stop()
        for db in (self.db, self._spool_db):
            if db is not None:
                db.close()
        LOGGER.info("stopped")

    def _drain_associations(self) -> None:
        """Let active inbound associations finish (the assembler still runs), then abort the
        rest: what they had not got Success for, the peer sends again."""
        deadline = time.monotonic() + self.config.dicom.drain_timeout_s
        while True:
            active = [a for a in self.ae.active_associations if a.is_acceptor]
            if not active:
                return
            if time.monotonic() >= deadline:
                LOGGER.warning("aborting %d associations still active after %.0f s",
                               len(active), self.config.dicom.drain_timeout_s)
                for assoc in active:
                    assoc.abort()
                return
            time.sleep(0.1)

    def reload(self) -> bool:
        """Re-read the configuration (SIGHUP) and apply what a running node can apply
        (:mod:`node.reload`) without touching the DICOM listener or its associations. An
        invalid configuration is refused with a log line naming the key, and the running
        one stays. Returns whether the new configuration was taken."""
        if self.loader is None:
            LOGGER.error("reload: this node was started without a configuration source")
            self.metrics.config_reloads.labels(outcome="no_source").inc()
            return False
        try:
            loaded = _resolve_spool(self.loader())
        except ConfigError as exc:
            LOGGER.error("configuration reload refused, the running configuration stays: %s",
                         "; ".join(line.strip() for line in str(exc).splitlines()))
            self.metrics.config_reloads.labels(outcome="invalid").inc()
            return False
        new = plan(self.config, loaded)
        if new.needs_restart:
            LOGGER.warning("reload: %s changed but needs restart; the running values stay "
                           "until then", ", ".join(new.needs_restart))
        self._apply(new.config, new.applied)
        self.metrics.config_reloads.labels(outcome="applied").inc()
        LOGGER.info("configuration reloaded: %s; destinations now: %s",
                    "changed " + ", ".join(new.applied) if new.applied else "nothing changed",
                    ", ".join(d.name for d in new.config.destinations) or "none")
        return True

    def _apply(self, cfg: NodeConfig, applied: list[str]) -> None:
        sections = {key.split(".")[0] for key in applied}
        if not sections:
            return
        old, self.config = self.config, cfg
        if cfg.logging != old.logging:
            setup_logging(cfg.logging)
        self.triage.update(cfg.triage)
        self.assembler.config = cfg.assembly
        self.jobs.max_attempts = cfg.worker.max_job_attempts
        self.outbound.max_attempts = cfg.outbound.max_attempts
        self.outbound.backoff_initial_s = cfg.outbound.backoff_initial_s
        self.outbound.backoff_max_s = cfg.outbound.backoff_max_s
        if self.sender is not None:
            self.sender.config = cfg
        if self.notifier is not None:
            self.notifier.config = cfg
        if self.status_page is not None:
            self.status_page.config = cfg
        if self.scheduler is not None and \
                cfg.retention.sweep_interval_s != old.retention.sweep_interval_s:
            self.scheduler.reschedule_job("retention", trigger="interval",
                                          seconds=cfg.retention.sweep_interval_s)
        if self._listeners is not None and "dicom" in sections:
            # Bind the new policy before unbinding the old: no association is ever unchecked.
            handler = functools.partial(handlers.handle_requested)
            policy = handlers.AssociationPolicy.from_config(cfg.dicom, cfg.spool.path,
                                                            cfg.spool.min_free_mb)
            for server in self._listeners.servers:
                server.bind(evt.EVT_REQUESTED, handler, [policy, self.metrics])
                server.unbind(evt.EVT_REQUESTED, self._requested_handler)
            self._requested_handler = handler
        if self.worker is not None and sections & {"destinations", "triage", "worker",
                                                   "logging", "notifications"}:
            self.worker.reload(cfg)

    def serve_forever(self) -> None:
        """Start, then run until SIGTERM or SIGINT; SIGHUP reloads the configuration."""
        wake = threading.Event()
        stop = threading.Event()
        hup = threading.Event()

        def _on_signal(signum: int, frame: FrameType | None) -> None:
            if signum == signal.SIGHUP:
                hup.set()
            else:
                LOGGER.info("received %s", signal.Signals(signum).name)
                stop.set()
            wake.set()

        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
        signal.signal(signal.SIGHUP, _on_signal)
        os.umask(0o077)  # whatever this process and its worker write is the owner's only
        self.start()
        try:
            while not stop.is_set():
                wake.wait(1.0)
                wake.clear()
                if hup.is_set() and not stop.is_set():
                    hup.clear()
                    LOGGER.info("received SIGHUP: reloading the configuration")
                    self.reload()
        finally:
            self.stop()
