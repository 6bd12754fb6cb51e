"""A real full disk: the spool on a 16 MiB tmpfs, filled by a ballast file while a series
arrives. The node answers 0xA700 (Refused: Out of Resources) for what it cannot make durable,
or refuses the association while the spool is below ``spool.min_free_mb``; everything it
acknowledged stays; nothing partial is left; once space returns, the peer's re-send
completes the series, which is analysed once and delivered.

Needs ``mount -t tmpfs`` (root with CAP_SYS_ADMIN, as on this project's CI machine); skipped
otherwise. ``tests/node/test_store.py`` covers the same path with an injected ENOSPC.
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from node import handlers
from node.app import Node
from node.db import StateDB
from node.jobs import SqliteJobQueue
from node.spool import DiskSpool, InstanceHeader
from node.worker import run_job_or_requeue
from tests.conftest import node_config
from tests.helpers.ctseries import write_series
from tests.helpers.net import free_port, pynetdicom_send, wait_until
from tests.helpers.receiver import Receiver

SIZE_MB = 16


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs mounted on a temp folder; skips when mounting is not permitted."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE_MB}m,mode=0700", "tmpfs",
                           str(mount_point)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode})")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


def _fill(path: Path, leave_mb: float) -> None:
    """Write a ballast file until only *leave_mb* MiB are free."""
    free = os.statvfs(path.parent)
    size = int(free.f_bavail * free.f_frsize - leave_mb * 2**20)
    with open(path, "wb") as fh:
        fh.write(bytes(size))


def test_full_disk_refuses_keeps_the_acknowledged_and_recovers(
        small_disk: Path, make_node: Callable[..., Node], tmp_path: Path) -> None:
    receiver = Receiver(free_port()).start()
    try:
        node = make_node(spool_dir=small_disk / "spool", spool={"min_free_mb": 1},
                         assembly={"quiet_seconds": 8.0, "release_grace_seconds": None},
                         destinations=[{"name": "pacs", "ae_title": "RESULTS",
                                        "host": "127.0.0.1", "port": receiver.port}])
        series = write_series(tmp_path / "in", 30, rows=256, seed=91)  # 30 x 128 KiB
        ballast = small_disk / "ballast"
        _fill(ballast, leave_mb=2.0)
        statuses = pynetdicom_send(node.port, series.files)
        acked = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID)
                 for f, s in zip(series.files, statuses, strict=True) if s == 0}
        assert 0 < len(acked) < 30, statuses
        assert set(statuses) == {0, handlers.OUT_OF_RESOURCES}
        rows = {r["sop_uid"]: r["path"] for r in node.db.query("SELECT * FROM instances")}
        assert acked <= rows.keys()
        assert all(Path(p).is_file() for p in rows.values())
        assert not list(node.spool.tmp_dir.iterdir())
        # below spool.min_free_mb now: a new association is refused (congestion)
        with pytest.raises(AssertionError, match="not established"):
            pynetdicom_send(node.port, series.files[:1])
        ballast.unlink()  # space returns
        assert pynetdicom_send(node.port, series.files) == [0] * 30
        wait_until(lambda: [tuple(r) for r in node.db.query(
            "SELECT state, instance_count FROM jobs")] == [("done", 30)]
            and node.db.query("SELECT state FROM outbound")[0]["state"] == "sent"
            if node.db.query("SELECT state FROM outbound") else False, 60,
            what="one job of 30, its result sent")
        assert receiver.total() == 1
        out_of_resources = node.metrics.registry.get_sample_value(
            "ich_node_store_failures_total", {"reason": "out_of_resources"})
        assert out_of_resources == 30 - len(acked)
    finally:
        receiver.stop()


def test_disk_full_during_analysis_puts_the_job_back_until_space_returns(
        small_disk: Path, make_node: Callable[..., Node], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression (fault trials): a job whose results could not be written on a full disk
    failed for good (or crashed its worker until max_job_attempts): the series was never
    analysed. Now it waits in the queue and runs once space returns."""
    from tests.helpers.faults import read_ledger

    ledger = tmp_path / "ledger.jsonl"
    monkeypatch.setenv("ICH_TEST_LEDGER", str(ledger))  # the worker inherits these
    monkeypatch.setenv("ICH_TEST_ANALYZER_DELAY", "2.0")
    receiver = Receiver(free_port()).start()
    try:
        node = make_node(analyzer="tests.helpers.analyzers:ledger",
                         spool_dir=small_disk / "spool", spool={"min_free_mb": 0},
                         assembly={"quiet_seconds": 2.0, "release_grace_seconds": None},
                         destinations=[{"name": "pacs", "ae_title": "RESULTS",
                                        "host": "127.0.0.1", "port": receiver.port}])
        series = write_series(tmp_path / "in", 5, rows=64, seed=92)
        assert pynetdicom_send(node.port, series.files) == [0] * 5
        wait_until(lambda: bool(read_ledger(ledger)), 30, what="the analysis to start")
        ballast = small_disk / "ballast"
        _fill(ballast, leave_mb=0)  # full while the analysis runs: its results cannot be written
        wait_until(lambda: any(e["event"] == "end" for e in read_ledger(ledger)), 60,
                   what="an analysis whose results do not fit")
        time.sleep(1.0)  # the worker meets the full disk and waits (nothing can be recorded)
        ballast.unlink()
        wait_until(lambda: [r["state"] for r in node.db.query("SELECT state FROM outbound")]
                   == ["sent"], 60, what="the result sent once space returned")
        jobs = [tuple(r) for r in node.db.query(
            "SELECT state, instance_count, attempts FROM jobs")]
        assert jobs == [("done", 5, 1)]  # put back uncounted; no worker crash, no 2nd attempt
        assert receiver.total() == 1
    finally:
        receiver.stop()


def test_out_of_space_in_a_job_puts_it_back_instead_of_failing_it(tmp_path: Path) -> None:
    """Regression: ENOSPC while writing results made the job ``failed`` for good."""
    import multiprocessing

    db = StateDB(tmp_path)
    DiskSpool(tmp_path, db).record(InstanceHeader("1.2.3.6.1", "1.2.840.10008.5.1.4.1.1.2",
                                                  "1.2.3", "1.2.3.6"), tmp_path / "x.dcm", 1,
                                   "CT")
    queue = SqliteJobQueue(db)
    queue.create_for_series("1.2.3.6")
    job = queue.claim(worker_pid=1)
    assert job is not None

    def full(series_dir: Path, config: object) -> object:
        raise OSError(errno.ENOSPC, "No space left on device")

    stop = multiprocessing.get_context("spawn").Event()
    stop.set()  # no pause after putting it back
    run_job_or_requeue(job, full, node_config(tmp_path), queue, stop)
    row = db.query("SELECT state, attempts, error FROM jobs")[0]
    assert (row["state"], row["attempts"], row["error"]) == ("ready", 0, None)
    assert db.query("SELECT state FROM series")[0]["state"] == "queued"
