"""The durable job queue: one job per completed series.

States: ``ready -> processing -> done | failed``. A job is a small serialisable
record (:class:`Job`); the worker that runs it keeps no state of its own, so a
future distributed backend can hand jobs to a pool of workers on other hosts.
Ordering is by priority (higher first), then age.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from node.db import StateDB, now

LOGGER = logging.getLogger(__name__)

JOB_STATES = ("ready", "processing", "done", "failed")


@dataclass(frozen=True)
class Job:
    """What a worker needs to analyse one series."""

    id: int
    series_uid: str
    study_uid: str
    calling_ae: str
    series_dir: str
    priority: int
    attempts: int
    instance_count: int
    last_received_at: float
    priority_reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return asdict(self)


class JobQueue(Protocol):
    """The job queue interface (embedded default: :class:`SqliteJobQueue`)."""

    def create_for_series(self, series_uid: str, priority: int = 0,
                          reason: str | None = None) -> int | None:
        """Turn a ``receiving`` series into a ``ready`` job; None if it is not receiving."""
        ...

    def claim(self, worker_pid: int) -> Job | None:
        """Take the next ready job (highest priority, oldest first)."""
        ...

    def finish(self, job_id: int, findings: dict[str, Any],
               outbound: list[tuple[str, list[str]]], urgent: bool = False,
               also: Callable[[sqlite3.Cursor], None] | None = None) -> None:
        """Mark *job_id* done (and *urgent*) and queue its results: one (destination, files)
        per entry; *also* writes more rows (notifications) in the same transaction."""
        ...

    def fail(self, job_id: int, reason: str) -> None:
        """Mark *job_id* failed with its *reason*."""
        ...


class SqliteJobQueue:
    """Jobs in the node's state database."""

    def __init__(self, db: StateDB, max_attempts: int = 3) -> None:
        self.db = db
        self.max_attempts = max_attempts

    def create_for_series(self, series_uid: str, priority: int = 0,
                          reason: str | None = None) -> int | None:
        """Turn a ``receiving`` series into a ``ready`` job with *priority* (and the
        *reason*, a triage rule name); None if it is not receiving."""
        with self.db.transaction() as cur:
            row = cur.execute("SELECT * FROM series WHERE series_uid = ?", (series_uid,)).fetchone()
            if row is None or row["state"] != "receiving":
                return None
            cur.execute(
                "INSERT INTO jobs (series_uid, study_uid, calling_ae, series_dir, state, priority,"
                " priority_reason, instance_count, last_received_at, created_at)"
                " VALUES (?,?,?,?, 'ready', ?,?,?,?,?)",
                (series_uid, row["study_uid"], row["calling_ae"], row["series_dir"], priority,
                 reason, row["instance_count"], row["last_received_at"], now()),
            )
            job_id = int(cur.lastrowid or 0)
            cur.execute("UPDATE series SET state = 'queued', job_id = ?, runs = runs + 1"
                        " WHERE series_uid = ?", (job_id, series_uid))
        LOGGER.info("series %s complete (%d instances from %s): job %d queued with priority %d"
                    " (%s)", series_uid, row["instance_count"], row["calling_ae"], job_id,
                    priority, reason or "no rule")
        return job_id

    def claim(self, worker_pid: int) -> Job | None:
        """Take the next ready job (highest priority, oldest first)."""
        with self.db.transaction() as cur:
            row = cur.execute("SELECT * FROM jobs WHERE state = 'ready'"
                              " ORDER BY priority DESC, created_at, id LIMIT 1").fetchone()
            if row is None:
                return None
            cur.execute("UPDATE jobs SET state = 'processing', attempts = attempts + 1,"
                        " started_at = ?, worker_pid = ? WHERE id = ?",
                        (now(), worker_pid, row["id"]))
            cur.execute("UPDATE series SET state = 'processing' WHERE series_uid = ?"
                        " AND job_id = ? AND state = 'queued'", (row["series_uid"], row["id"]))
        return Job(id=row["id"], series_uid=row["series_uid"], study_uid=row["study_uid"],
                   calling_ae=row["calling_ae"], series_dir=row["series_dir"],
                   priority=row["priority"], attempts=row["attempts"] + 1,
                   instance_count=row["instance_count"],
                   last_received_at=row["last_received_at"],
                   priority_reason=row["priority_reason"])

    def finish(self, job_id: int, findings: dict[str, Any],
               outbound: list[tuple[str, list[str]]], urgent: bool = False,
               also: Callable[[sqlite3.Cursor], None] | None = None) -> None:
        """Mark *job_id* done (and *urgent*) and queue its results, in one transaction; the
        outbound rows carry the job's priority and urgency (the sender's order). *also* (e.g.
        :func:`node.notify.plan`'s rows) writes in that same transaction, so a crash keeps
        all of it or none."""
        t = now()
        with self.db.transaction() as cur:
            row = cur.execute("SELECT study_uid, series_uid, priority FROM jobs WHERE id = ?",
                              (job_id,)).fetchone()
            cur.execute("UPDATE jobs SET state = 'done', finished_at = ?, findings = ?, error = NULL,"
                        " urgent = ? WHERE id = ?", (t, json.dumps(findings), int(urgent), job_id))
            cur.execute("UPDATE series SET state = 'done', last_error = NULL"
                        " WHERE series_uid = ? AND job_id = ? AND state = 'processing'",
                        (row["series_uid"], job_id))
            for destination, files in outbound:
                cur.execute(
                    "INSERT INTO outbound (job_id, study_uid, destination, files, state,"
                    " next_attempt_at, created_at, priority, urgent)"
                    " VALUES (?,?,?,?, 'queued', ?,?,?,?)",
                    (job_id, row["study_uid"], destination, json.dumps(files), t, t,
                     row["priority"], int(urgent)),
                )
            if also is not None:
                also(cur)

    def fail(self, job_id: int, reason: str) -> None:
        """Mark *job_id* failed with its *reason* (the series too)."""
        with self.db.transaction() as cur:
            row = cur.execute("SELECT series_uid FROM jobs WHERE id = ?", (job_id,)).fetchone()
            cur.execute("UPDATE jobs SET state = 'failed', finished_at = ?, error = ? WHERE id = ?",
                        (now(), reason, job_id))
            cur.execute("UPDATE series SET state = 'failed', last_error = ?"
                        " WHERE series_uid = ? AND job_id = ? AND state = 'processing'",
                        (reason, row["series_uid"], job_id))

    def requeue_interrupted(self) -> tuple[int, int]:
        """Start-up and shutdown: jobs left ``processing`` go back to ``ready``, unless they
        already used ``max_attempts`` (a job that keeps killing its worker fails instead).
        Returns (requeued, failed)."""
        requeued = failed = 0
        with self.db.transaction() as cur:
            rows = cur.execute("SELECT id, series_uid, attempts FROM jobs"
                               " WHERE state = 'processing'").fetchall()
            for row in rows:
                if row["attempts"] >= self.max_attempts:
                    reason = (f"interrupted {row['attempts']} times (worker.max_job_attempts="
                              f"{self.max_attempts}): the job may crash its worker")
                    cur.execute("UPDATE jobs SET state = 'failed', finished_at = ?, error = ?"
                                " WHERE id = ?", (now(), reason, row["id"]))
                    cur.execute("UPDATE series SET state = 'failed', last_error = ?"
                                " WHERE job_id = ? AND state = 'processing'", (reason, row["id"]))
                    failed += 1
                else:
                    cur.execute("UPDATE jobs SET state = 'ready', worker_pid = NULL WHERE id = ?",
                                (row["id"],))
                    cur.execute("UPDATE series SET state = 'queued' WHERE job_id = ?"
                                " AND state = 'processing'", (row["id"],))
                    requeued += 1
        if requeued or failed:
            LOGGER.warning("interrupted jobs: %d re-queued, %d failed", requeued, failed)
        return requeued, failed

    def requeue_job(self, job_id: int) -> None:
        """Put one interrupted job back to ``ready`` (shutdown while it ran)."""
        with self.db.transaction() as cur:
            cur.execute("UPDATE jobs SET state = 'ready', worker_pid = NULL, attempts = attempts - 1"
                        " WHERE id = ? AND state = 'processing'", (job_id,))
            cur.execute("UPDATE series SET state = 'queued' WHERE job_id = ?"
                        " AND state = 'processing'", (job_id,))

    def counts(self) -> dict[str, int]:
        """Jobs per state."""
        return self.db.count_by_state("jobs", JOB_STATES)
