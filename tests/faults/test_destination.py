"""Destinations that misbehave: slow past the DIMSE timeout, or ending the association
(A-ABORT, or a dropped TCP connection) before answering. The node neither hangs nor loses
the result: the attempt fails with its reason, the result goes again, and arrives once the
destination behaves. A destination that stored the object but never answered gets it
twice (same SOP Instance UID): delivery is at-least-once. (Down, then back:
tests/node/test_outbound.py.)"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from node.app import Node
from tests.helpers.ctseries import write_series
from tests.helpers.net import free_port, pynetdicom_send, wait_until
from tests.helpers.receiver import Receiver


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver(free_port())
    yield rec
    rec.stop()


def _node(make_node: Callable[..., Node], port: int, **sections: object) -> Node:
    return make_node(destinations=[{"name": "pacs", "ae_title": "RESULTS",
                                    "host": "127.0.0.1", "port": port}],
                     outbound={"max_attempts": 10, "backoff_initial_s": 0.2,
                               "backoff_max_s": 0.5}, **sections)


def _outbound(node: Node) -> list[tuple[str, int, str | None]]:
    return [(r["state"], r["attempts"], r["last_error"])
            for r in node.db.query("SELECT * FROM outbound")]


def test_slow_destination_times_out_and_gets_the_result_when_fast_again(
        make_node: Callable[..., Node], receiver: Receiver, tmp_path: Path) -> None:
    receiver.delay_s = 3.0  # longer than the node's DIMSE timeout below
    receiver.start()
    node = _node(make_node, receiver.port, dicom={"dimse_timeout_s": 1.0})
    series = write_series(tmp_path / "in", 3, rows=32, seed=71)
    assert pynetdicom_send(node.port, series.files) == [0] * 3
    wait_until(lambda: bool(_outbound(node)) and _outbound(node)[0][1] >= 1, 30,
               what="a timed-out attempt")
    state, attempts, error = _outbound(node)[0]
    assert state in ("queued", "sending") and "no response" in str(error)
    receiver.delay_s = 0.0
    wait_until(lambda: _outbound(node)[0][0] == "sent", 30, what="delivery once fast")
    [(uid, count)] = receiver.received.items()
    assert count >= 1  # the slow attempts stored it too: a duplicate with the same UID
    # inbound kept working while the sender waited
    other = write_series(tmp_path / "in2", 2, rows=32, seed=72)
    assert pynetdicom_send(node.port, other.files) == [0, 0]


@pytest.mark.parametrize("mode", ["abort", "drop"])
def test_destination_ending_the_association_mid_send_is_retried(
        make_node: Callable[..., Node], receiver: Receiver, tmp_path: Path, mode: str) -> None:
    receiver.fail_after, receiver.fail_mode, receiver.failures = 1, mode, 2
    receiver.start()
    node = _node(make_node, receiver.port)
    series = write_series(tmp_path / "in", 3, rows=32, seed=73)
    assert pynetdicom_send(node.port, series.files) == [0] * 3
    wait_until(lambda: bool(_outbound(node)) and _outbound(node)[0][0] == "sent", 30,
               what=f"delivery after two associations ended by {mode}")
    state, attempts, error = _outbound(node)[0]
    assert (state, attempts, error) == ("sent", 3, None)
    assert receiver.failed == 2
    [(uid, count)] = receiver.received.items()
    assert count == 3  # each ended association had received it: at-least-once, same UID
    failures = node.metrics.registry.get_sample_value("ich_node_outbound_failures_total",
                                                      {"destination": "pacs"})
    assert failures == 2
