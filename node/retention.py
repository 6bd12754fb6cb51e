"""Retention: delete processed instances and results after a configured age.

Finished series (done, results sent or no destinations) go after
``retention.done_hours``; failed series and dead-lettered results are kept for
``retention.failed_days`` for inspection. Rows stay in the state database (for
``ich-node status``) with ``purged_at`` set; the bytes go.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from node.config import RetentionConfig
from node.db import StateDB, now

LOGGER = logging.getLogger(__name__)


def sweep(db: StateDB, config: RetentionConfig, spool_dir: Path, at: float | None = None) -> int:
    """Delete what is past retention; returns the number of series purged."""
    t = now() if at is None else at
    done_before = t - config.done_hours * 3600
    failed_before = t - config.failed_days * 86400
    rows = db.query(
        "SELECT s.series_uid, s.series_dir, s.state, s.job_id, s.last_received_at,"
        " (SELECT COUNT(*) FROM outbound o WHERE o.job_id = s.job_id AND o.state != 'sent')"
        " AS unsent, (SELECT COUNT(*) FROM outbound o WHERE o.job_id = s.job_id"
        " AND o.state = 'dead') AS dead"
        " FROM series s WHERE s.purged_at IS NULL AND s.state IN ('done', 'failed')")
    purged = 0
    for row in rows:
        failed = row["state"] == "failed" or row["dead"] > 0
        if failed:
            if row["last_received_at"] > failed_before:
                continue
        elif row["unsent"] > 0 or row["last_received_at"] > done_before:
            continue
        _purge_series(db, spool_dir, row["series_uid"], Path(row["series_dir"]))
        purged += 1
    if purged:
        LOGGER.info("retention: purged %d series", purged)
    return purged


def _purge_series(db: StateDB, spool_dir: Path, series_uid: str, series_dir: Path) -> None:
    jobs = db.query("SELECT id FROM jobs WHERE series_uid = ?", (series_uid,))
    with db.transaction() as cur:
        cur.execute("UPDATE series SET purged_at = ? WHERE series_uid = ?", (now(), series_uid))
        cur.execute("DELETE FROM instances WHERE series_uid = ?", (series_uid,))
    if series_dir.exists():
        shutil.rmtree(series_dir)
    for job in jobs:
        results = spool_dir / "results" / str(job["id"])
        if results.exists():
            shutil.rmtree(results)
    LOGGER.info("retention: purged series %s (jobs %s)", series_uid, [j["id"] for j in jobs])
