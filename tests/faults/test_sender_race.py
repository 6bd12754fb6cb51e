"""The node's outbound sender and pynetdicom's requestor race (node.sender.await_reactor_resumed).

Under load, pynetdicom 3.0's requestor can hand a C-STORE response to its own reactor thread
("Received unexpected C-STORE service message") when C-STOREs follow each other closely; the
call then waits for the DIMSE timeout, the attempt fails and the destination gets duplicates.
Seen in bench/load.py with the real pipeline (several result objects per association), and
in a stress of send_files: 9 of 320 associations of 30 objects failed without the
work-around, 0 with it (RELIABILITY.md)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import node.sender as sender
from node.config import Destination
from tests.conftest import node_config
from tests.helpers.ctseries import write_series
from tests.helpers.net import free_port
from tests.helpers.receiver import Receiver


class _ReactorStub:
    """An association whose reactor wakes up 50 ms after each C-STORE returns."""

    is_established = True

    def __init__(self) -> None:
        self._is_paused = False
        self.paused_at_call: list[bool] = []

    def send_c_store(self, path: Path) -> Any:
        self.paused_at_call.append(self._is_paused)
        self._is_paused = True  # as pynetdicom: paused for the call, woken later
        threading.Timer(0.05, setattr, (self, "_is_paused", False)).start()

        class Status:
            Status = 0x0000
        return Status()


def test_send_files_waits_for_the_reactor_between_stores(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stub = _ReactorStub()

    @contextmanager
    def fake_association(*args: object) -> Iterator[_ReactorStub]:
        yield stub

    monkeypatch.setattr(sender, "_association", fake_association)
    monkeypatch.setattr(sender, "_contexts_for", lambda files: [])
    dest = Destination(name="r", ae_title="R", host="127.0.0.1", port=104)
    sender.send_files(node_config(tmp_path), dest, ["a", "b", "c"])
    assert stub.paused_at_call == [False, False, False]  # never sent into a sleeping reactor


@pytest.mark.slow
def test_many_objects_per_association_under_concurrency_lose_no_response(
        tmp_path: Path) -> None:
    receiver = Receiver(free_port()).start()
    try:
        cfg = node_config(tmp_path / "spool", dicom={"host": "127.0.0.1", "port": 0,
                                                     "dimse_timeout_s": 5.0})
        dest = Destination(name="r", ae_title="RESULTS", host="127.0.0.1", port=receiver.port)
        files = [str(f) for f in write_series(tmp_path / "s", 30, rows=16, seed=5).files]
        errors: list[str] = []

        def run() -> None:
            for _ in range(10):
                try:
                    sender.send_files(cfg, dest, files)
                except sender.SendError as exc:
                    errors.append(str(exc))

        threads = [threading.Thread(target=run) for _ in range(4)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        assert errors == [], f"{len(errors)} of 40 associations lost a response"
        assert receiver.total() == 40 * 30, time.monotonic() - started
    finally:
        receiver.stop()
