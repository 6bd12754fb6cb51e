"""``ich-node status``: what the node holds, read from its state database.

Works whether or not the node is running (SQLite WAL lets a reader in beside it).
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from node.db import StateDB
from node.jobs import JOB_STATES
from node.notify import NOTIFICATION_STATES
from node.sender import OUTBOUND_STATES


def _iso(t: float | None) -> str | None:
    return None if t is None else dt.datetime.fromtimestamp(t, dt.UTC).isoformat(
        timespec="seconds")


def collect(spool_dir: Path, limit: int = 50) -> dict[str, Any]:
    """Queue depths, recent series and outbound state as a JSON-serialisable dict."""
    db = StateDB(spool_dir, create=False)
    try:
        jobs = db.count_by_state("jobs", JOB_STATES)
        outbound = db.count_by_state("outbound", OUTBOUND_STATES)
        series = [{
            "series_uid": r["series_uid"], "study_uid": r["study_uid"],
            "calling_ae": r["calling_ae"], "instances": r["instance_count"], "state": r["state"],
            "first_received": _iso(r["first_received_at"]),
            "last_received": _iso(r["last_received_at"]), "job_id": r["job_id"],
            "runs": r["runs"], "last_error": r["last_error"], "purged": r["purged_at"] is not None,
        } for r in db.query("SELECT * FROM series ORDER BY last_received_at DESC LIMIT ?",
                            (limit,))]
        destinations = [{
            "destination": r["destination"], "state": r["state"], "count": r["n"],
            "last_error": r["last_error"],
        } for r in db.query("SELECT destination, state, COUNT(*) AS n, MAX(last_error)"
                            " AS last_error FROM outbound GROUP BY destination, state"
                            " ORDER BY destination, state")]
        dead = [{"study_uid": r["study_uid"], "destination": r["destination"],
                 "attempts": r["attempts"], "last_error": r["last_error"]}
                for r in db.query("SELECT * FROM outbound WHERE state = 'dead' ORDER BY id")]
        notifications = db.count_by_state("notifications", NOTIFICATION_STATES)
        notify_targets = [{
            "kind": r["kind"], "target": r["target"], "state": r["state"], "count": r["n"],
            "last_error": r["last_error"],
        } for r in db.query("SELECT kind, target, state, COUNT(*) AS n, MAX(last_error)"
                            " AS last_error FROM notifications GROUP BY kind, target, state"
                            " ORDER BY kind, target, state")]
        dead_notifications = [{
            "study_uid": r["study_uid"], "kind": r["kind"], "target": r["target"],
            "notification_id": r["uid"], "attempts": r["attempts"],
            "last_error": r["last_error"],
        } for r in db.query("SELECT * FROM notifications WHERE state = 'dead' ORDER BY id")]
    finally:
        db.close()
    return {"spool": str(spool_dir), "jobs": jobs, "outbound": outbound,
            "destinations": destinations, "dead_letters": dead,
            "notifications": notifications, "notification_targets": notify_targets,
            "dead_notifications": dead_notifications, "series": series}


def render_text(status: dict[str, Any]) -> str:
    """A terminal view of :func:`collect`'s result."""
    lines = [f"spool: {status['spool']}",
             "jobs:     " + "  ".join(f"{k}={v}" for k, v in status["jobs"].items()),
             "outbound: " + "  ".join(f"{k}={v}" for k, v in status["outbound"].items())]
    for d in status["destinations"]:
        err = f"  last error: {d['last_error']}" if d["last_error"] else ""
        lines.append(f"  -> {d['destination']}: {d['state']} {d['count']}{err}")
    lines.append("notify:   " + "  ".join(f"{k}={v}" for k, v in status["notifications"].items()))
    for t in status["notification_targets"]:
        err = f"  last error: {t['last_error']}" if t["last_error"] else ""
        lines.append(f"  -> {t['kind']} {t['target']}: {t['state']} {t['count']}{err}")
    lines.append("")
    lines.append(f"{'series':<44} {'from':<16} {'inst':>5} {'state':<10} {'last received':<25} "
                 f"{'job':>5}  error")
    for s in status["series"]:
        lines.append(f"{s['series_uid'][-44:]:<44} {s['calling_ae']:<16} {s['instances']:>5} "
                     f"{s['state']:<10} {s['last_received'] or '':<25} "
                     f"{s['job_id'] if s['job_id'] is not None else '':>5}  "
                     f"{s['last_error'] or ''}")
    if not status["series"]:
        lines.append("(no series received yet)")
    return "\n".join(lines)


def to_json(status: dict[str, Any]) -> str:
    """JSON for scripts."""
    return json.dumps(status, indent=2)
