"""The spool: safe file names, durable writes, recovery at start-up, retention."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from node.config import RetentionConfig
from node.db import StateDB
from node.jobs import SqliteJobQueue
from node.retention import sweep
from node.spool import DiskSpool, InstanceHeader, safe_name
from tests.helpers.ctseries import write_series


@pytest.mark.parametrize("uid", ["../../etc/passwd", "1.2/../../x", "/abs", "1.2.3\x00",
                                 "a" * 200, "..", "1.2.3 ", ""])
def test_crafted_uids_cannot_name_a_path(uid: str) -> None:
    name = safe_name(uid)
    assert "/" not in name and name not in ("", ".", "..") and "\x00" not in name
    assert len(name) <= 64


def test_valid_uids_name_their_files() -> None:
    assert safe_name("1.2.840.113619.2.55.3") == "1.2.840.113619.2.55.3"


def test_crafted_uids_stay_inside_the_spool(tmp_path: Path) -> None:
    db = StateDB(tmp_path)
    spool = DiskSpool(tmp_path, db)
    header = InstanceHeader("../../../../tmp/evil", "1.2.840.10008.5.1.4.1.1.2", "../..", "/etc")
    result = spool.store(header, [b"data"], "AE")
    assert result.path.resolve().is_relative_to((tmp_path / "instances").resolve())


def test_recover_registers_spooled_files_and_drops_partial_writes(tmp_path: Path) -> None:
    db = StateDB(tmp_path)
    spool = DiskSpool(tmp_path, db)
    series = write_series(tmp_path / "in", 2, rows=16, seed=51)
    # a crash after the rename but before the commit: the file is there, the row is not
    from pydicom import dcmread

    ds = dcmread(series.files[0])
    target = spool.series_dir(series.study_uid, series.series_uid) / f"{ds.SOPInstanceUID}.dcm"
    target.parent.mkdir(parents=True)
    target.write_bytes(series.files[0].read_bytes())
    (spool.tmp_dir / "abc.part").write_bytes(b"half")
    assert spool.recover() == 1
    assert not list(spool.tmp_dir.iterdir())
    rows = db.query("SELECT sop_uid, series_uid FROM instances")
    assert [(r["sop_uid"], r["series_uid"]) for r in rows] == [(ds.SOPInstanceUID,
                                                                 series.series_uid)]
    assert db.query("SELECT state FROM series")[0]["state"] == "receiving"


def test_instance_joining_a_queued_series_is_counted_in_its_job(tmp_path: Path) -> None:
    """Regression (fault trials): an instance that arrives while its series' job waits in
    the queue is analysed with it, and the job row must say so (it said the old count)."""
    db = StateDB(tmp_path)
    spool = DiskSpool(tmp_path, db)
    jobs = SqliteJobQueue(db)
    headers = [InstanceHeader(f"1.2.3.9.{i}", "1.2.840.10008.5.1.4.1.1.2", "1.2.3",
                              "1.2.3.9") for i in range(3)]
    for header in headers[:2]:
        spool.store(header, [b"x"], "AE")
    job_id = jobs.create_for_series("1.2.3.9")
    assert spool.store(headers[2], [b"x"], "AE").late is False
    assert db.query("SELECT state, instance_count FROM series")[0][:] == ("queued", 3)
    job = jobs.claim(worker_pid=1)
    assert job is not None and job.id == job_id and job.instance_count == 3
    late = InstanceHeader("1.2.3.9.7", "1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.3.9")
    assert spool.store(late, [b"x"], "AE").late is True  # now it is a re-run, not a join
    assert db.query("SELECT instance_count FROM jobs")[0][0] == 3


def test_retention_purges_done_series_and_keeps_failed_ones_longer(tmp_path: Path) -> None:
    db = StateDB(tmp_path)
    spool = DiskSpool(tmp_path, db)
    kinds = {}
    for index, state in enumerate(("done", "failed")):
        header = InstanceHeader(f"1.2.3.{index}.1", "1.2.840.10008.5.1.4.1.1.2",
                                f"1.2.3.{index}", f"1.2.3.{index}.9")
        spool.store(header, [b"x"], "AE")
        with db.transaction() as cur:
            cur.execute("UPDATE series SET state = ? WHERE series_uid = ?",
                        (state, header.series_uid))
        kinds[state] = spool.series_dir(header.study_uid, header.series_uid)
    config = RetentionConfig(done_hours=1, failed_days=1)
    assert sweep(db, config, tmp_path) == 0  # too young
    assert sweep(db, config, tmp_path, at=time.time() + 2 * 3600) == 1
    assert not kinds["done"].exists() and kinds["failed"].exists()
    assert sweep(db, config, tmp_path, at=time.time() + 2 * 86400) == 1
    assert not kinds["failed"].exists()
    assert all(r["purged_at"] for r in db.query("SELECT purged_at FROM series"))
