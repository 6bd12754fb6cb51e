"""Metrics derived in the node process: jobs finished by the worker are observed once, and
never replayed after a restart; the findings headline; destination health."""

from __future__ import annotations

import json
from pathlib import Path

from node.db import StateDB
from node.metrics import NodeMetrics
from node.monitoring import DestinationState, FinishedJobs, summarize_findings


def _job(db: StateDB, state: str, started: float, finished: float,
         error: str | None = None, findings: dict[str, object] | None = None) -> int:
    with db.transaction() as cur:
        cur.execute("INSERT INTO jobs (series_uid, study_uid, calling_ae, series_dir, state,"
                    " instance_count, last_received_at, created_at, started_at, finished_at,"
                    " error, findings) VALUES ('1.2.3', '1.2', 'CT', '/x', ?, 1, 0, 0, ?, ?,"
                    " ?, ?)", (state, started, finished, error,
                               json.dumps(findings) if findings is not None else None))
        return int(cur.lastrowid or 0)


def test_finished_jobs_are_observed_once_and_never_replayed(tmp_path: Path) -> None:
    db = StateDB(tmp_path)
    metrics = NodeMetrics()
    _job(db, "done", 90.0, 95.0)  # finished before the node (re)started at t=100
    watcher = FinishedJobs(db, metrics, since=100.0)

    def value(name: str, **labels: str) -> float:
        return metrics.registry.get_sample_value(name, labels) or 0.0

    assert watcher.poll() == 0
    _job(db, "done", 101.0, 104.5, findings={"timings_s": {"classifier": 0.4, "total": 3.0}})
    _job(db, "failed", 105.0, 105.5, error="SeriesRejected: too few slices")
    _job(db, "processing", 106.0, 0.0)
    assert watcher.poll() == 2
    assert watcher.poll() == 0
    assert value("ich_node_job_seconds_count", outcome="done") == 1
    assert value("ich_node_job_seconds_sum", outcome="done") == 3.5
    assert value("ich_node_inference_seconds_sum", stage="classifier") == 0.4
    assert value("ich_node_job_failures_total", kind="SeriesRejected") == 1
    # a job that committed late with an earlier finish time is still seen, once
    _job(db, "done", 102.0, 103.0)
    metrics.before_scrape(watcher.poll)
    metrics.render()
    metrics.render()
    assert value("ich_node_job_seconds_count", outcome="done") == 2
    db.close()


def test_findings_headline() -> None:
    public = {"positive": True, "volumes_ml": {"subdural": 12.0, "epidural": 0.5},
              "labels": {"any": {"probability": 0.97, "positive": True},
                         "subdural": {"probability": 0.91, "positive": True},
                         "epidural": {"probability": 0.2, "positive": False}}}
    s = summarize_findings(public)
    assert (s.positive, s.top_label, s.top_probability, s.any_probability, s.volume_ml) == (
        True, "subdural", 0.91, 0.97, 12.5)
    other = summarize_findings({"instances": 4})  # a test analyzer's findings
    assert other.positive is None and other.top_label is None and other.volume_ml is None


def test_destination_health() -> None:
    assert DestinationState().health == "unknown"
    assert DestinationState(last_success=10.0).health == "ok"
    assert DestinationState(last_success=10.0, last_failure=12.0,
                            consecutive_failures=1).health == "failing"
    assert DestinationState(last_success=13.0, last_failure=12.0).health == "ok"
