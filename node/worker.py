"""The analysis worker: a separate process fed by the durable job queue.

It never runs on an association thread (STYLE: the association thread only
spools). It keeps no state between jobs: everything it needs is in the job
record and the spool, so several workers, here or on other hosts, can share one
queue. The analyzer is named by an import path (``module:function``) so that the
worker process can load it; ``ich-node run`` always uses the real pipeline.
"""

from __future__ import annotations

import ctypes
import errno
import importlib
import json
import logging
import multiprocessing
import multiprocessing.synchronize
import os
import signal
import sqlite3
import time
import traceback
from collections.abc import Callable
from datetime import datetime
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import Dataset

from node.audit import AuditLog
from node.config import NodeConfig
from node.db import StateDB
from node.jobs import Job, SqliteJobQueue
from node.logs import setup_logging, withhold_values
from node.monitoring import summarize_findings
from node.notify import plan as plan_notifications
from node.spool import safe_name, write_durably
from node.triage import is_positive, route, series_header
from pipeline.errors import PipelineError

LOGGER = logging.getLogger(__name__)

REAL_ANALYZER = "pipeline.analyze:Analyzer"

Analyzer = Callable[[Path, Any], Any]


def load_analyzer(path: str, config: NodeConfig) -> Analyzer:
    """Import ``module:name``. A class is instantiated once with the pipeline config (so a
    worker loads its models once); a function is used as it is."""
    module_name, _, attr = path.partition(":")
    if not attr:
        raise ValueError(f"analyzer {path!r} must be 'module:name'")
    target = getattr(importlib.import_module(module_name), attr)
    if isinstance(target, type):
        return target(config.pipeline)
    if not callable(target):
        raise TypeError(f"analyzer {path!r} is not callable")
    return target


def job_report_path(spool_dir: Path, job_id: int) -> Path:
    """Where the report of *job_id* is written."""
    return Path(spool_dir) / "jobs" / f"{job_id}.json"


def write_results(spool_dir: Path, job_id: int, datasets: list[Dataset], fsync: bool) -> list[str]:
    """Write each result durably under ``results/<job id>/``; return the paths."""
    out_dir = Path(spool_dir) / "results" / str(job_id)
    tmp_dir = Path(spool_dir) / "tmp"
    paths: list[str] = []
    for index, ds in enumerate(datasets):
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        path = out_dir / f"{index:03d}_{safe_name(str(ds.SOPInstanceUID))}.dcm"
        write_durably(path, buffer.getvalue(), tmp_dir, fsync)
        paths.append(str(path))
    return paths


def run_job(job: Job, analyzer: Analyzer, config: NodeConfig, queue: SqliteJobQueue,
            audit: AuditLog | None = None) -> bool:
    """Analyse one job, write its results and report, queue the results. True if done.
    With *audit*, records ``selected`` now and ``analysed`` at the end."""
    started = time.monotonic()
    if audit is not None:
        audit.record("selected", job_id=job.id, series_uid=job.series_uid,
                     study_uid=job.study_uid, calling_ae=job.calling_ae, priority=job.priority,
                     attempt=job.attempts, instances=job.instance_count,
                     latency_seconds=time.time() - job.last_received_at)
    spool_dir = config.spool.path
    report: dict[str, Any] = {"job": job.to_dict(), "worker_pid": os.getpid()}
    LOGGER.info("job %d: analysing series %s (%d instances, attempt %d)",
                job.id, job.series_uid, job.instance_count, job.attempts)
    try:
        results = analyzer(Path(job.series_dir), config.pipeline)
        files = write_results(spool_dir, job.id, list(results.datasets), config.spool.fsync)
        findings = dict(results.findings)
    except Exception as exc:  # the job boundary: every failure becomes a failed job
        if out_of_space(exc):
            raise  # not the series' fault: run_job_or_requeue puts the job back
        reason = f"{type(exc).__name__}: {exc}"
        trace = traceback.format_exc()
        if not isinstance(exc, PipelineError):  # a library's message may quote patient data
            reason, trace = withhold_values(reason), withhold_values(trace)
        report.update(state="failed", error=reason, traceback=trace,
                      seconds=round(time.monotonic() - started, 3))
        _write_report(spool_dir, job.id, report, config.spool.fsync)
        queue.fail(job.id, reason)
        LOGGER.error("job %d failed for series %s: %s", job.id, job.series_uid, reason)
        if audit is not None:
            audit.record("analysed", job_id=job.id, series_uid=job.series_uid,
                         study_uid=job.study_uid, outcome="failed",
                         seconds=time.monotonic() - started, error_kind=type(exc).__name__)
        return False
    seconds = time.monotonic() - started
    urgent = is_positive(findings)
    names = route(config, urgent, job.calling_ae, lambda: series_header(Path(job.series_dir)),
                  datetime.now())
    report.update(state="done", findings=findings, files=files, seconds=round(seconds, 3),
                  urgent=urgent, destinations=names)
    _write_report(spool_dir, job.id, report, config.spool.fsync)
    outbound = [(name, files) for name in names] if files else []
    queue.finish(job.id, findings, outbound, urgent=urgent,
                 also=plan_notifications(config, job, findings))
    LOGGER.info("job %d done in %.2f s: series %s, %d result objects for %d destinations%s",
                job.id, seconds, job.series_uid, len(files), len(outbound),
                f" (URGENT: positive, to {', '.join(names)})" if urgent else "")
    if audit is not None:
        headline = summarize_findings(findings)
        audit.record("analysed", job_id=job.id, series_uid=job.series_uid,
                     study_uid=job.study_uid, outcome="done", seconds=seconds,
                     positive=headline.positive, top_label=headline.top_label,
                     results=len(files))
    return True


OUT_OF_SPACE_PAUSE_S = 5.0


def out_of_space(exc: BaseException) -> bool:
    """Whether *exc* says the disk is full (ENOSPC, EDQUOT, or SQLite's "database or disk
    is full"): a transient condition, not a reason to fail the series."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(exc, sqlite3.OperationalError) and "full" in str(exc)


def run_job_or_requeue(job: Job, analyzer: Analyzer, config: NodeConfig,
                       queue: SqliteJobQueue, stop: multiprocessing.synchronize.Event,
                       audit: AuditLog | None = None) -> None:
    """:func:`run_job`; when the spool is full the job goes back to ``ready`` (its attempt
    not counted) instead of failing, as soon as the database can record it."""
    try:
        run_job(job, analyzer, config, queue, audit)
        return
    except (OSError, sqlite3.Error) as exc:
        if not out_of_space(exc):
            raise
        LOGGER.error("job %d (series %s): the spool is full (%s: %s); the job goes back to "
                     "the queue", job.id, job.series_uid, type(exc).__name__, exc)
    while True:
        try:
            queue.requeue_job(job.id)
        except (OSError, sqlite3.Error) as exc:  # the database cannot write either
            if not out_of_space(exc):
                raise
            LOGGER.error("job %d: cannot put it back yet (%s); trying again in %.0f s",
                         job.id, exc, OUT_OF_SPACE_PAUSE_S)
            if stop.wait(OUT_OF_SPACE_PAUSE_S):
                return  # left processing: the node's stop or next start re-queues it
            continue
        stop.wait(OUT_OF_SPACE_PAUSE_S)
        return


def _claim(queue: SqliteJobQueue, stop: multiprocessing.synchronize.Event) -> Job | None:
    """The next job; None also while the spool is too full to record a claim (after a
    pause, so that a full disk does not fill the log)."""
    try:
        return queue.claim(os.getpid())
    except sqlite3.OperationalError as exc:
        if not out_of_space(exc):
            raise
        LOGGER.error("worker %d: cannot claim jobs, the spool is full (%s); trying again in "
                     "%.0f s", os.getpid(), exc, OUT_OF_SPACE_PAUSE_S)
        stop.wait(OUT_OF_SPACE_PAUSE_S)
        return None


def _write_report(spool_dir: Path, job_id: int, report: dict[str, Any], fsync: bool) -> None:
    data = json.dumps(report, indent=2, default=str).encode("utf-8")
    write_durably(job_report_path(spool_dir, job_id), data, Path(spool_dir) / "tmp", fsync)


def _die_with_parent() -> None:
    """Linux: ask the kernel to SIGKILL us when the node process dies (kill -9 included),
    so that no orphaned worker runs beside the next node."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        LOGGER.warning("cannot load libc: the worker will notice a dead parent by polling only")
        return
    pr_set_pdeathsig = 1
    if libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0) != 0:
        LOGGER.warning("prctl(PR_SET_PDEATHSIG) failed with errno %d", ctypes.get_errno())


def worker_main(config_json: str, analyzer_path: str,
                stop: multiprocessing.synchronize.Event) -> None:
    """Entry point of the worker process: claim and run jobs until *stop* is set."""
    parent = os.getppid()
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the node reloads; see WorkerProcess.reload
    config = NodeConfig.model_validate_json(config_json)
    setup_logging(config.logging)
    db = StateDB(config.spool.path)
    queue = SqliteJobQueue(db, config.worker.max_job_attempts)
    audit = AuditLog.from_config(config)
    try:
        analyzer = load_analyzer(analyzer_path, config)
    except Exception:  # e.g. weights missing or refused: the node must say so, loudly
        LOGGER.exception("worker %d cannot load analyzer %s; jobs wait in the queue",
                         os.getpid(), analyzer_path)
        db.close()
        raise
    LOGGER.info("worker %d started with analyzer %s", os.getpid(), analyzer_path)
    try:
        while not stop.is_set() and os.getppid() == parent:
            job = _claim(queue, stop)
            if job is None:
                stop.wait(config.worker.poll_interval_s)
                continue
            run_job_or_requeue(job, analyzer, config, queue, stop, audit)
    finally:
        db.close()
        LOGGER.info("worker %d stopped", os.getpid())


class WorkerProcess:
    """Starts and stops the worker process (spawned, never forked from threads)."""

    def __init__(self, config: NodeConfig, analyzer_path: str, queue: SqliteJobQueue) -> None:
        self.config = config
        self.analyzer_path = analyzer_path
        self.queue = queue
        self._ctx = multiprocessing.get_context("spawn")
        self._stop = self._ctx.Event()
        self._process: multiprocessing.process.BaseProcess | None = None
        # Workers finishing their last job after a reload, with their stop events (an event
        # must live until its process has unpickled it).
        self._retiring: list[tuple[multiprocessing.process.BaseProcess,
                                   multiprocessing.synchronize.Event]] = []
        self._restarts = 0
        self._next_restart = 0.0

    @property
    def restarts(self) -> int:
        """How often the worker was restarted after it died."""
        return self._restarts

    def start(self) -> None:
        """Spawn the worker. Each process gets its own stop event: a process killed while
        waiting on an event would leave it blocking every later ``set()``."""
        self._stop = self._ctx.Event()
        self._process = self._ctx.Process(
            target=worker_main, name="ich-node-worker",
            args=(self.config.model_dump_json(), self.analyzer_path, self._stop), daemon=True,
        )
        self._process.start()

    def is_alive(self) -> bool:
        """Whether the worker process runs."""
        return self._process is not None and self._process.is_alive()

    def reload(self, config: NodeConfig) -> None:
        """Run the next jobs with *config*: a new worker starts now, the running one finishes
        its current job, claims nothing more and exits. Call it from a thread that outlives
        the worker (the main thread): the worker's parent-death signal follows the thread
        that started it."""
        self.config = config
        old = self._process
        if old is not None and old.is_alive():
            self._stop.set()
            self._retiring.append((old, self._stop))
            LOGGER.info("worker %s finishes its current job and exits (configuration reloaded)",
                        old.pid)
        self.start()

    def ensure_running(self) -> None:
        """Restart a worker that died (its job is re-queued by attempt count). A worker
        that keeps dying is restarted less and less often (up to every 5 minutes)."""
        self._retiring = [(p, e) for p, e in self._retiring if p.is_alive()]
        if self._process is None or self._process.is_alive() or self._stop.is_set():
            return
        now = time.monotonic()
        if now < self._next_restart:
            return
        self._restarts += 1
        delay = min(300.0, 2.0 ** self._restarts)
        self._next_restart = now + delay
        LOGGER.error("worker process exited with code %s; restarting it (restart %d; next "
                     "one no sooner than %.0f s)", self._process.exitcode, self._restarts, delay)
        self.queue.requeue_interrupted()
        self.start()

    def stop(self) -> None:
        """Let the current job finish within ``worker.shutdown_grace_s``, else kill the
        worker and put its job back to ready (also a worker still retiring after a reload)."""
        processes = [p for p, _ in self._retiring]
        if self._process is not None:
            processes.append(self._process)
        if not processes:
            return
        self._stop.set()
        deadline = time.monotonic() + self.config.worker.shutdown_grace_s
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                LOGGER.warning("worker %s still busy after %.0f s: terminating it, its job is "
                               "re-queued", process.pid, self.config.worker.shutdown_grace_s)
                process.kill()
                process.join(10)
                for row in self.queue.db.query("SELECT id FROM jobs WHERE state = 'processing'"
                                               " AND worker_pid = ?", (process.pid,)):
                    self.queue.requeue_job(row["id"])
        self._process = None
        self._retiring = []
