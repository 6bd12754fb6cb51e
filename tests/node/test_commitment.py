"""Storage commitment (PS3.4 Annex J, push model) over real associations: a pynetdicom
modality stores, asks, and gets an N-EVENT-REPORT that lists exactly what is committed
and what failed, on the same association or on a new one, also across a restart."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    MRImageStorage,
    StorageCommitmentPushModel,
    StorageCommitmentPushModelInstance,
)
from pynetdicom.transport import ThreadedAssociationServer

from node import commitment
from node.app import Node
from tests.helpers.ctseries import write_series
from tests.helpers.net import free_port, wait_until

MODALITY = "CT_MODALITY"
ROOT = "1.2.826.0.1.3680043.8.498.96."


@dataclass
class Reports:
    """N-EVENT-REPORTs received by the modality: (event type, event information)."""

    items: list[tuple[int, Dataset]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_report(self, event: evt.Event) -> tuple[int, None]:
        with self.lock:
            self.items.append((int(event.event_type or 0), event.event_information))
        return 0x0000, None

    def count(self) -> int:
        with self.lock:
            return len(self.items)


def _modality_ae() -> AE:
    ae = AE(ae_title=MODALITY)
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(StorageCommitmentPushModel)
    return ae


def _action(transaction: str, refs: Sequence[tuple[str, str]]) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = transaction
    ds.ReferencedSOPSequence = []
    for sop_class, sop_uid in refs:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_uid
        ds.ReferencedSOPSequence.append(item)
    return ds


def _request(assoc: Association, transaction: str, refs: Sequence[tuple[str, str]],
             action_type: int = 1) -> int | None:
    status, _ = assoc.send_n_action(_action(transaction, refs), action_type,
                                    StorageCommitmentPushModel,
                                    StorageCommitmentPushModelInstance)
    return getattr(status, "Status", None)


def _sequence(ds: Dataset, keyword: str) -> list[tuple[str, str, int | None]]:
    return sorted((str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID),
                   int(i.FailureReason) if "FailureReason" in i else None)
                  for i in ds.get(keyword, []))


def _sop(path: Path) -> tuple[str, str]:
    ds = dcmread(path, stop_before_pixels=True)
    return str(ds.SOPClassUID), str(ds.SOPInstanceUID)


def _store(assoc: Association, files: Sequence[Path]) -> None:
    for path in files:
        assert getattr(assoc.send_c_store(dcmread(path)), "Status", None) == 0


def _commitments(node: Node) -> list[dict[str, Any]]:
    return [dict(r) for r in node.db.query("SELECT * FROM commitments")]


def test_report_on_the_same_association_lists_committed_and_failed_exactly(
        make_node: Callable[..., Node], tmp_path: Path) -> None:
    node = make_node(commitment={"same_association_grace_s": 0.2})  # the modality waits
    series = write_series(tmp_path / "in", 5, rows=32, seed=81)
    stored = [_sop(p) for p in series.files]
    reports = Reports()
    assoc = _modality_ae().associate("127.0.0.1", node.port, ae_title="ICH_NODE",
                                     evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.on_report)])
    assert assoc.is_established
    try:
        _store(assoc, series.files)
        # One stored instance loses its file (e.g. someone cleaned the disk): not committed.
        gone = stored[4]
        path = node.db.query("SELECT path FROM instances WHERE sop_uid = ?", (gone[1],))
        Path(path[0]["path"]).unlink()
        never = (str(CTImageStorage), generate_uid(ROOT))
        wrong_class = (str(MRImageStorage), stored[0][1])
        other_class = (str(MRImageStorage), generate_uid(ROOT))
        asked = [*stored[:4], never, wrong_class, other_class, gone]
        transaction = generate_uid(ROOT)
        assert _request(assoc, transaction, asked) == 0x0000
        wait_until(lambda: reports.count() == 1, 20, what="the N-EVENT-REPORT")
        event_type, info = reports.items[0]
        assert event_type == commitment.EVENT_SOME_FAILED
        assert info.TransactionUID == transaction
        assert _sequence(info, "ReferencedSOPSequence") == sorted(
            (c, i, None) for c, i in stored[:4])
        assert _sequence(info, "FailedSOPSequence") == sorted([
            (*never, commitment.FAILURE_NO_SUCH_INSTANCE),
            (*wrong_class, commitment.FAILURE_CLASS_INSTANCE_CONFLICT),
            (*other_class, commitment.FAILURE_CLASS_NOT_SUPPORTED),
            (*gone, commitment.FAILURE_NO_SUCH_INSTANCE),
        ])
        # All present: Event Type 1 and no Failed SOP Sequence.
        second = generate_uid(ROOT)
        assert _request(assoc, second, stored[:4]) == 0x0000
        wait_until(lambda: reports.count() == 2, 20, what="the second N-EVENT-REPORT")
        event_type, info = reports.items[1]
        assert event_type == commitment.EVENT_ALL_COMMITTED
        assert info.TransactionUID == second
        assert "FailedSOPSequence" not in info
        assert _sequence(info, "ReferencedSOPSequence") == sorted(
            (c, i, None) for c, i in stored[:4])
    finally:
        assoc.release()
    rows = {r["transaction_uid"]: r for r in _commitments(node)}
    assert (rows[transaction]["state"], rows[transaction]["committed"],
            rows[transaction]["failed"]) == ("reported", 4, 4)
    assert rows[second]["state"] == "reported"
    sample = node.metrics.registry.get_sample_value
    assert sample("ich_node_commitment_reports_total",
                  {"result": "some_failed", "via": "same_association"}) == 1
    assert sample("ich_node_commitment_reports_total",
                  {"result": "all_committed", "via": "same_association"}) == 1


@pytest.fixture
def modality_scp() -> Iterator[tuple[int, Reports]]:
    """The modality's own listener, which takes N-EVENT-REPORTs on new associations
    (the node proposes the SCP role, PS3.4 J.3.3)."""
    port = free_port()
    reports = Reports()
    servers: list[ThreadedAssociationServer] = []

    def start() -> None:
        ae = AE(ae_title=MODALITY)
        ae.add_supported_context(StorageCommitmentPushModel, scu_role=False, scp_role=True)
        server = ae.start_server(("127.0.0.1", port), block=False,
                                 evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.on_report)])
        assert server is not None
        servers.append(server)

    reports.start = start  # type: ignore[attr-defined]
    yield port, reports
    for server in servers:
        server.shutdown()


# A modality that releases right after the N-ACTION-RSP: a long grace lets its release
# win the race with the report even on a loaded CI machine (a prompt release ends the
# grace at once). Should the report still cross the release, the node aborts (correct),
# but pynetdicom's requestor, as the test modality, answers the report in Sta7, loses
# its DUL thread and hangs in release() for its ACSE timeout.
RELEASING = {"same_association_grace_s": 5.0, "same_association_timeout_s": 0.5}


def _peers(port: int) -> dict[str, Any]:
    return {"peers": [{"name": "ct", "ae_title": MODALITY, "host": "127.0.0.1", "port": port}],
            "retry_interval_s": 0.2, **RELEASING}


def _ask_and_release(node: Node, files: Sequence[Path], refs: Sequence[tuple[str, str]]
                     ) -> str:
    assoc = _modality_ae().associate("127.0.0.1", node.port, ae_title="ICH_NODE")
    assert assoc.is_established
    transaction = generate_uid(ROOT)
    try:
        _store(assoc, files)
        assert _request(assoc, transaction, refs) == 0x0000
    finally:
        assoc.release()
    # The node gave the modality time to release (commitment.same_association_grace_s)
    # instead of sending the report across its A-RELEASE-RQ and aborting.
    assert assoc.is_released and not assoc.is_aborted
    return transaction


def test_report_on_a_new_association_when_the_modality_hung_up(
        make_node: Callable[..., Node], tmp_path: Path,
        modality_scp: tuple[int, Reports]) -> None:
    port, reports = modality_scp
    reports.start()  # type: ignore[attr-defined]
    node = make_node(commitment={**_peers(port), "same_association": False})
    series = write_series(tmp_path / "in", 3, rows=32, seed=82)
    stored = [_sop(p) for p in series.files]
    never = (str(CTImageStorage), generate_uid(ROOT))
    transaction = _ask_and_release(node, series.files, [*stored, never])
    wait_until(lambda: reports.count() == 1, 20, what="the N-EVENT-REPORT on a new association")
    event_type, info = reports.items[0]
    assert (event_type, info.TransactionUID) == (commitment.EVENT_SOME_FAILED, transaction)
    assert _sequence(info, "ReferencedSOPSequence") == sorted((c, i, None) for c, i in stored)
    assert _sequence(info, "FailedSOPSequence") == [
        (*never, commitment.FAILURE_NO_SUCH_INSTANCE)]
    # The modality has the report as soon as it answered it; the node counts it after that
    # answer comes back, so the counter may lag the report by a moment.
    wait_until(lambda: node.metrics.registry.get_sample_value(
        "ich_node_commitment_reports_total",
        {"result": "some_failed", "via": "new_association"}) == 1, 10,
        what="the report counted as sent on a new association")


def test_pending_request_is_answered_after_a_restart(
        make_node: Callable[..., Node], tmp_path: Path,
        modality_scp: tuple[int, Reports]) -> None:
    """The modality's listener is down, so the report cannot go out; the node stops; the
    next node process on the same spool answers the request."""
    port, reports = modality_scp
    spool = tmp_path / "spool"
    first = make_node(spool_dir=spool, commitment=_peers(port))
    series = write_series(tmp_path / "in", 2, rows=32, seed=83)
    stored = [_sop(p) for p in series.files]
    transaction = _ask_and_release(first, series.files, stored)
    wait_until(lambda: _commitments(first)[0]["attempts"] >= 2, 20,
               what="failed delivery attempts")
    row = _commitments(first)[0]
    assert row["state"] == "pending"
    assert "no entry" not in row["last_error"] and "association" in row["last_error"]
    first.stop()
    reports.start()  # type: ignore[attr-defined]
    second = make_node(spool_dir=spool, commitment=_peers(port))
    wait_until(lambda: reports.count() == 1, 20, what="the report after the restart")
    event_type, info = reports.items[0]
    assert (event_type, info.TransactionUID) == (commitment.EVENT_ALL_COMMITTED, transaction)
    assert _sequence(info, "ReferencedSOPSequence") == sorted((c, i, None) for c, i in stored)
    assert _commitments(second)[0]["state"] == "reported"


def test_unknown_requester_without_peer_entry_is_retried_then_dead(
        make_node: Callable[..., Node], tmp_path: Path) -> None:
    node = make_node(commitment={"retry_interval_s": 0.1, "max_attempts": 3, **RELEASING})
    series = write_series(tmp_path / "in", 1, rows=32, seed=84)
    _ask_and_release(node, series.files, [_sop(series.files[0])])
    wait_until(lambda: _commitments(node)[0]["state"] == "dead", 20, what="dead request")
    row = _commitments(node)[0]
    assert row["attempts"] == 3
    assert f"commitment.peers has no entry for AE '{MODALITY}'" in row["last_error"]
    assert node.metrics.registry.get_sample_value(
        "ich_node_commitment_delivery_failures_total") == 3


@pytest.mark.parametrize(("action_type", "dataset", "status"), [
    (2, _action("1.2.3.4", [(str(CTImageStorage), "1.2.3.5")]), commitment.NO_SUCH_ACTION_TYPE),
    (1, _action("", [(str(CTImageStorage), "1.2.3.5")]), commitment.MISSING_ATTRIBUTE),
    (1, _action("1.2.3.4", []), commitment.MISSING_ATTRIBUTE),
    (1, _action("1.02.3", [(str(CTImageStorage), "1.2.3.5")]),
     commitment.INVALID_ARGUMENT_VALUE),
])
def test_malformed_requests_are_refused_with_a_status(
        make_node: Callable[..., Node], action_type: int, dataset: Dataset, status: int) -> None:
    node = make_node()
    assoc = _modality_ae().associate("127.0.0.1", node.port, ae_title="ICH_NODE")
    assert assoc.is_established
    try:
        rsp, _ = assoc.send_n_action(dataset, action_type, StorageCommitmentPushModel,
                                     StorageCommitmentPushModelInstance)
        assert getattr(rsp, "Status", None) == status
    finally:
        assoc.release()
    assert _commitments(node) == []
