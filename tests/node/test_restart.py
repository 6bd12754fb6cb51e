"""Restart safety: ``kill -9`` of the node mid-transfer and mid-analysis, then restart.

Every instance that got Success is on disk and analysed; the rest is re-sent by the peer;
results are delivered exactly once (the same SOP Instance UIDs, never two copies)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from pydicom import dcmread
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from node.sender import await_reactor_resumed
from tests.helpers.ctseries import write_series
from tests.helpers.net import _nodelay, free_port, pynetdicom_send, wait_until
from tests.helpers.nodeproc import NodeProcess
from tests.helpers.receiver import Receiver


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver(free_port()).start()
    yield rec
    rec.stop()


@pytest.fixture
def node_proc(tmp_path: Path, receiver: Receiver) -> Iterator[NodeProcess]:
    node = NodeProcess(tmp_path, receiver.port)
    yield node
    if node.proc is not None and node.proc.poll() is None:
        node.kill9()


def _send_until_killed(node: NodeProcess, files: list[Path], kill_after: int) -> dict[str, int]:
    """Send in one association; SIGKILL the node after *kill_after* successes.
    Returns {sop_uid: status} of the instances that got a response."""
    ae = AE(ae_title="CT_KILL")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="ICH_NODE",
                         evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)])
    assert assoc.is_established
    answered: dict[str, int] = {}
    for index, path in enumerate(files):
        if not assoc.is_established or node.proc is None or node.proc.poll() is not None:
            break
        if index:
            await_reactor_resumed(assoc)  # pynetdicom's requestor race (node.sender)
        status = assoc.send_c_store(path)
        code = getattr(status, "Status", None)
        if code is not None:
            answered[str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)] = int(code)
        if sum(1 for c in answered.values() if c == 0) == kill_after:
            node.kill9()
    if assoc.is_established:
        assoc.abort()
    return answered


@pytest.mark.slow
def test_kill9_mid_transfer_loses_nothing_acknowledged(
        tmp_path: Path, node_proc: NodeProcess, receiver: Receiver) -> None:
    series = write_series(tmp_path / "in", 120, rows=64, seed=21)
    node_proc.start()
    answered = _send_until_killed(node_proc, series.files, kill_after=45)
    acknowledged = {uid for uid, code in answered.items() if code == 0}
    assert len(acknowledged) == 45
    node_proc.start()  # restart on the same spool
    on_disk = {str(r[0]) for r in node_proc.query("SELECT sop_uid FROM instances")}
    assert acknowledged <= on_disk, "an acknowledged instance was lost"
    for (path,) in node_proc.query("SELECT path FROM instances"):
        assert dcmread(str(path)).PixelData  # complete, readable files
    # The peer re-sends the whole series, as a PACS retrying a failed transfer does.
    assert pynetdicom_send(node_proc.port, series.files, calling_ae="CT_KILL") == [0] * 120
    wait_until(lambda: node_proc.query("SELECT state FROM jobs") == [("done",)] and
               receiver.total() == 1, 60, what=f"one job and one result\n{node_proc.log_text()}")
    assert node_proc.query("SELECT instance_count FROM jobs") == [(120,)]
    assert list(receiver.received.values()) == [1]
    assert node_proc.terminate() == 0
    assert "stopped" in node_proc.log_text()


@pytest.mark.slow
def test_kill9_during_analysis_reruns_the_job_and_sends_results_once(
        tmp_path: Path, receiver: Receiver) -> None:
    node = NodeProcess(tmp_path, receiver.port, analyzer_delay=4.0)
    try:
        series = write_series(tmp_path / "in", 20, rows=32, seed=22)
        node.start()
        assert pynetdicom_send(node.port, series.files) == [0] * 20
        wait_until(lambda: node.query("SELECT state FROM jobs") == [("processing",)], 30,
                   what="the job to start")
        node.kill9()
        assert node.query("SELECT state FROM jobs") == [("processing",)]
        node.env["ICH_TEST_ANALYZER_DELAY"] = "0"
        node.start()
        wait_until(lambda: receiver.total() >= 1 and
                   node.query("SELECT state FROM outbound") == [("sent",)], 60,
                   what=f"results after restart\n{node.log_text()}")
        assert node.query("SELECT state, attempts FROM jobs") == [("done", 2)]
        assert list(receiver.received.values()) == [1]
        assert "re-queued" in node.log_text()
    finally:
        if node.proc is not None and node.proc.poll() is None:
            node.kill9()


def test_sigterm_stops_cleanly_and_requeues_the_running_job(tmp_path: Path,
                                                            receiver: Receiver) -> None:
    node = NodeProcess(tmp_path, receiver.port, analyzer_delay=30.0)
    cfg = yaml.safe_load(node.config.read_text())
    cfg["worker"]["shutdown_grace_s"] = 1
    node.config.write_text(yaml.safe_dump(cfg))
    try:
        series = write_series(tmp_path / "in", 5, rows=32, seed=23)
        node.start()
        assert pynetdicom_send(node.port, series.files) == [0] * 5
        wait_until(lambda: node.query("SELECT state FROM jobs") == [("processing",)], 30,
                   what="the job to start")
        assert node.terminate() == 0
        assert node.query("SELECT state FROM jobs") == [("ready",)]
        assert "re-queued" in node.log_text() or "terminating it" in node.log_text()
        assert not node._echo_ok()  # no longer listening
    finally:
        if node.proc is not None and node.proc.poll() is None:
            node.kill9()
