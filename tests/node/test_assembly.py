"""Series assembly: quiet period per calling AE, early check on release, late instances."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

from node.app import Node
from node.assembler import SeriesAssembler
from node.config import AssemblyConfig
from node.db import StateDB
from node.jobs import SqliteJobQueue
from node.metrics import NodeMetrics
from node.spool import DiskSpool, InstanceHeader
from tests.helpers.ctseries import write_series
from tests.helpers.net import pynetdicom_send, wait_until


def _jobs(node: Node) -> list[tuple[str, int]]:
    return [(r["state"], r["instance_count"]) for r in
            node.db.query("SELECT state, instance_count FROM jobs ORDER BY id")]


def test_quiet_period_per_calling_ae_without_release_signal(
        make_node: Callable[..., Node], tmp_path: Path) -> None:
    node = make_node(assembly={"quiet_seconds": 0.5, "quiet_seconds_by_ae": {"SLOW_CT": 3.0},
                               "release_grace_seconds": None})
    fast = write_series(tmp_path / "fast", 3, rows=32, seed=41)
    slow = write_series(tmp_path / "slow", 3, rows=32, seed=42)
    pynetdicom_send(node.port, fast.files, calling_ae="FAST_CT")
    pynetdicom_send(node.port, slow.files, calling_ae="SLOW_CT")
    sent_at = time.monotonic()
    wait_until(lambda: len(_jobs(node)) == 1, 10, what="the fast series' job")
    assert node.db.query("SELECT series_uid FROM jobs")[0]["series_uid"] == fast.series_uid
    wait_until(lambda: len(_jobs(node)) == 2, 10, what="the slow series' job")
    assert time.monotonic() - sent_at >= 2.5  # the slow AE's quiet period was respected


def test_series_over_two_associations_is_one_job(make_node: Callable[..., Node],
                                                 tmp_path: Path) -> None:
    node = make_node(assembly={"quiet_seconds": 2.0, "release_grace_seconds": 0.5})
    series = write_series(tmp_path / "in", 10, rows=32, seed=43)
    pynetdicom_send(node.port, series.files[:5])
    pynetdicom_send(node.port, series.files[5:])  # within the release grace
    wait_until(lambda: _jobs(node) == [("done", 10)], 20, what="one job of 10")
    time.sleep(2.5)
    assert _jobs(node) == [("done", 10)]


def test_release_triggers_an_early_check(make_node: Callable[..., Node], tmp_path: Path) -> None:
    node = make_node(assembly={"quiet_seconds": 30.0, "release_grace_seconds": 0.2})
    series = write_series(tmp_path / "in", 3, rows=32, seed=44)
    started = time.monotonic()
    pynetdicom_send(node.port, series.files)
    wait_until(lambda: len(_jobs(node)) == 1, 10, what="job after release")
    assert time.monotonic() - started < 10


def test_release_reported_after_the_close_still_triggers_the_early_check(
        make_node: Callable[..., Node], tmp_path: Path) -> None:
    """The peer closes the connection as soon as it has the A-RELEASE-RP, so the node's
    connection-closed event (DUL thread) can come before its released event (association
    thread). The release must still bring the early check."""
    node = make_node(assembly={"quiet_seconds": 30.0, "release_grace_seconds": 0.2})
    series = write_series(tmp_path / "in", 3, rows=32, seed=46)
    other = 0x5EED  # a second association delivering the same series, ended by hand
    node.assembler.instance_arrived(series.series_uid, "PYNETDICOM", other)
    pynetdicom_send(node.port, series.files)  # its release finds the series still busy
    time.sleep(0.5)
    assert _jobs(node) == []
    started = time.monotonic()
    node.assembler.association_ended(other, released=False)  # the close, reported first
    node.assembler.association_ended(other, released=True)  # then the release
    wait_until(lambda: len(_jobs(node)) == 1, 10, what="job after the late release")
    assert time.monotonic() - started < 10


def test_late_instance_after_analysis_causes_a_rerun(make_node: Callable[..., Node],
                                                     tmp_path: Path) -> None:
    node = make_node()
    series = write_series(tmp_path / "in", 6, rows=32, seed=45)
    pynetdicom_send(node.port, series.files[:5])
    wait_until(lambda: _jobs(node) == [("done", 5)], 20, what="first run")
    pynetdicom_send(node.port, series.files[5:])
    wait_until(lambda: _jobs(node) == [("done", 5), ("done", 6)], 20, what="re-run with 6")
    row = node.db.query("SELECT runs, state FROM series")[0]
    assert (row["runs"], row["state"]) == (2, "done")
    late = node.metrics.registry.get_sample_value("ich_node_late_instances_total")
    assert late == 1


def test_late_instance_without_rerun_is_stored_and_logged(
        make_node: Callable[..., Node], tmp_path: Path, caplog: object) -> None:
    import pytest

    assert isinstance(caplog, pytest.LogCaptureFixture)
    node = make_node(assembly={"rerun_on_late_instances": False})
    series = write_series(tmp_path / "in", 3, rows=32, seed=46)
    pynetdicom_send(node.port, series.files[:2])
    wait_until(lambda: _jobs(node) == [("done", 2)], 20, what="first run")
    with caplog.at_level("WARNING"):
        assert pynetdicom_send(node.port, series.files[2:]) == [0]
    time.sleep(2.0)
    assert _jobs(node) == [("done", 2)]
    assert "stored but not analysed" in caplog.text
    assert len(node.db.query("SELECT * FROM instances")) == 3


class _RecordingScheduler:
    """Stands in for apscheduler: records when each check would run."""

    def __init__(self) -> None:
        self.run_dates: dict[str, datetime] = {}

    def add_job(self, func: object, trigger: str, run_date: datetime, id: str,
                **kwargs: object) -> None:
        self.run_dates[id] = run_date


def test_resume_after_downtime_waits_a_whole_quiet_period(tmp_path: Path) -> None:
    """Regression (fault trials): a series cut by a crash was made a job at once on restart
    when the downtime exceeded the quiet period, before its sender could send the rest."""
    db = StateDB(tmp_path)
    spool = DiskSpool(tmp_path, db)
    spool.record(InstanceHeader("1.2.3.4.1", "1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.3.4"),
                 tmp_path / "x.dcm", 1, "CT", received_at=time.time() - 3600)
    scheduler = _RecordingScheduler()
    assembler = SeriesAssembler(scheduler, SqliteJobQueue(db),  # type: ignore[arg-type]
                                AssemblyConfig(quiet_seconds=20.0), NodeMetrics())
    before = datetime.now()
    assert assembler.resume() == 1
    assert scheduler.run_dates["series:1.2.3.4"] >= before + timedelta(seconds=20)


class _FullDiskJobs(SqliteJobQueue):
    """A job queue whose first job insert fails as SQLite does on a full disk."""

    failures = 1

    def create_for_series(self, series_uid: str, priority: int = 0,
                          reason: str | None = None) -> int | None:
        if self.failures:
            self.failures -= 1
            raise sqlite3.OperationalError("database or disk is full")
        return super().create_for_series(series_uid, priority, reason)


def test_a_series_whose_job_cannot_be_written_is_checked_again(tmp_path: Path) -> None:
    """Regression (fault trials): a failed job insert left the series receiving and unarmed;
    with every instance already received nothing checked it again until a restart."""
    db = StateDB(tmp_path)
    spool = DiskSpool(tmp_path, db)
    spool.record(InstanceHeader("1.2.3.5.1", "1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.3.5"),
                 tmp_path / "x.dcm", 1, "CT", received_at=time.time() - 60)
    scheduler = _RecordingScheduler()
    metrics = NodeMetrics()
    assembler = SeriesAssembler(scheduler, _FullDiskJobs(db),  # type: ignore[arg-type]
                                AssemblyConfig(quiet_seconds=2.0), metrics)
    assert assembler.check("1.2.3.5") is None
    assert "series:1.2.3.5" in scheduler.run_dates  # armed again
    assert metrics.registry.get_sample_value("ich_node_assembly_errors_total") == 1
    assert db.query("SELECT state FROM series")[0]["state"] == "receiving"
    assert assembler.check("1.2.3.5") == 1  # the retry makes the job
