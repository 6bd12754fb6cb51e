"""Outbound: a destination that is down gets the results once it is back; the retry cap
holds (dead letter); ``ich-node resend`` queues a study again."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from node.app import Node
from tests.helpers.ctseries import write_series
from tests.helpers.net import free_port, pynetdicom_send, wait_until
from tests.helpers.receiver import Receiver

REPO = Path(__file__).resolve().parents[2]


def _dest(port: int) -> list[dict[str, object]]:
    return [{"name": "pacs", "ae_title": "RESULTS", "host": "127.0.0.1", "port": port}]


def _outbound(node: Node) -> list[tuple[str, int]]:
    return [(r["state"], r["attempts"]) for r in node.db.query("SELECT * FROM outbound")]


def test_results_are_delivered_once_the_destination_is_back(
        make_node: Callable[..., Node], tmp_path: Path) -> None:
    port = free_port()
    node = make_node(destinations=_dest(port), outbound={"max_attempts": 50,
                                                         "backoff_initial_s": 0.2,
                                                         "backoff_max_s": 0.5})
    series = write_series(tmp_path / "in", 5, rows=32, seed=31)
    assert pynetdicom_send(node.port, series.files) == [0] * 5
    wait_until(lambda: bool(_outbound(node)) and _outbound(node)[0][1] >= 3, 30,
               what="three failed delivery attempts")
    assert _outbound(node)[0][0] in ("queued", "sending")
    failures = node.metrics.registry.get_sample_value("ich_node_outbound_failures_total",
                                                      {"destination": "pacs"})
    assert failures is not None and failures >= 3
    receiver = Receiver(port).start()
    try:
        wait_until(lambda: _outbound(node)[0][0] == "sent", 30, what="delivery after outage")
        assert receiver.total() == 1
        sc = next(iter(receiver.datasets.values()))
        assert sc.StudyInstanceUID == series.study_uid  # type: ignore[attr-defined]
    finally:
        receiver.stop()


def test_retry_cap_dead_letters_and_resend_cli_delivers(
        make_node: Callable[..., Node], tmp_path: Path) -> None:
    port = free_port()
    node = make_node(destinations=_dest(port), outbound={"max_attempts": 3,
                                                         "backoff_initial_s": 0.1,
                                                         "backoff_max_s": 0.2})
    series = write_series(tmp_path / "in", 3, rows=32, seed=32)
    assert pynetdicom_send(node.port, series.files) == [0] * 3
    wait_until(lambda: _outbound(node) == [("dead", 3)], 30, what="dead letter after 3 attempts")
    status = subprocess.run(
        [sys.executable, "-m", "node.cli", "status", "--spool", str(node.config.spool.path),
         "--json"], capture_output=True, text=True, cwd=REPO, env=dict(os.environ), timeout=60)
    assert status.returncode == 0, status.stderr
    assert '"dead": 1' in status.stdout and series.study_uid in status.stdout
    receiver = Receiver(port).start()
    try:
        resend = subprocess.run(
            [sys.executable, "-m", "node.cli", "resend", series.study_uid, "--spool",
             str(node.config.spool.path)], capture_output=True, text=True, cwd=REPO, timeout=60)
        assert resend.returncode == 0, resend.stderr
        assert "queued again" in resend.stdout
        wait_until(lambda: _outbound(node) == [("sent", 1)], 30, what="resent results")
        assert receiver.total() == 1
    finally:
        receiver.stop()
    unknown = subprocess.run(
        [sys.executable, "-m", "node.cli", "resend", "1.2.3.4", "--spool",
         str(node.config.spool.path)], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert unknown.returncode == 1 and "no results for study 1.2.3.4" in unknown.stderr


def test_destination_refusing_with_a_failure_status_is_retried(
        make_node: Callable[..., Node], tmp_path: Path) -> None:
    receiver = Receiver(free_port(), status=0xA700).start()
    try:
        node = make_node(destinations=_dest(receiver.port), outbound={"max_attempts": 2})
        series = write_series(tmp_path / "in", 2, rows=32, seed=33)
        assert pynetdicom_send(node.port, series.files) == [0] * 2
        wait_until(lambda: _outbound(node) == [("dead", 2)], 30, what="dead after 2 refusals")
        row = node.db.query("SELECT last_error FROM outbound")[0]
        assert "0xA700" in row["last_error"]
    finally:
        receiver.stop()


def test_failed_analysis_is_a_failed_job_with_its_reason_on_disk(
        make_node: Callable[..., Node], tmp_path: Path) -> None:
    node = make_node(analyzer="tests.helpers.analyzers:failing")
    series = write_series(tmp_path / "in", 2, rows=32, seed=34)
    assert pynetdicom_send(node.port, series.files) == [0] * 2
    wait_until(lambda: [r["state"] for r in node.db.query("SELECT state FROM jobs")] == ["failed"],
               30, what="failed job")
    job = node.db.query("SELECT * FROM jobs")[0]
    assert job["error"].startswith("SeriesRejected: test analyzer")
    report = (node.config.spool.path / "jobs" / f"{job['id']}.json").read_text()
    assert "SeriesRejected" in report and "Traceback" in report
    series_row = node.db.query("SELECT state, last_error FROM series")[0]
    assert series_row["state"] == "failed" and "SeriesRejected" in series_row["last_error"]
    text = node.metrics.render().decode()
    assert 'ich_node_failed_jobs{kind="SeriesRejected"} 1.0' in text
    assert not node.db.query("SELECT * FROM outbound")
