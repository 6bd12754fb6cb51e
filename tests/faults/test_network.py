"""A network cut on the inbound association: the peer's connection dies in the middle of an
instance, between two P-DATA PDUs of its data set or inside a PDU. The node keeps what it
acknowledged, drops the partial instance (it was never acknowledged, nothing of it is on
disk), and keeps serving: the peer's re-send completes the series, analysed once."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE, evt
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from node.app import Node
from tests.helpers.ctseries import write_series
from tests.helpers.net import _nodelay, pynetdicom_send, wait_until


class Cutter:
    """EVT_PDU_SENT handler of the peer: once armed, shuts the socket down right after the
    first P-DATA PDU that carries a data set fragment that is not the last."""

    def __init__(self) -> None:
        self.armed = False
        self.cut = False

    def on_pdu_sent(self, event: evt.Event) -> None:
        pdu = event.pdu  # type: ignore[attr-defined]
        if not self.armed or self.cut or not isinstance(pdu, P_DATA_TF):
            return
        for item in pdu.presentation_data_value_items:
            header = item.presentation_data_value[0]
            if not header & 0x01 and not header & 0x02:  # data set, more fragments follow
                self.cut = True
                event.assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)
                return


@pytest.mark.parametrize("where", ["between-pdus", "inside-a-pdu"])
def test_cut_mid_instance_keeps_the_acknowledged_and_drops_the_partial(
        make_node: Callable[..., Node], tmp_path: Path, where: str) -> None:
    node = make_node(assembly={"quiet_seconds": 5.0, "release_grace_seconds": 0.3})
    # 512 x 512 x 2 bytes: each data set spans several 256 KiB PDUs
    series = write_series(tmp_path / "in", 6, rows=512, seed=81)
    cutter = Cutter()
    ae = AE(ae_title="CUT_CT")
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="ICH_NODE", evt_handlers=[
        (evt.EVT_CONN_OPEN, _nodelay), (evt.EVT_PDU_SENT, cutter.on_pdu_sent)])
    assert assoc.is_established
    acked = []
    for path in series.files[:3]:
        assert assoc.send_c_store(path).Status == 0
        acked.append(str(dcmread(path, stop_before_pixels=True).SOPInstanceUID))
    if where == "between-pdus":
        cutter.armed = True
        status = assoc.send_c_store(series.files[3])
        assert cutter.cut and not getattr(status, "Status", None)
    else:  # a P-DATA-TF header announcing 200000 bytes, 1000 of them, then the cut
        raw = assoc.dul.socket.socket
        raw.sendall(b"\x04\x00" + (200000).to_bytes(4, "big") + bytes(1000))
        raw.shutdown(socket.SHUT_RDWR)
    wait_until(lambda: not assoc.is_established, 10, what="the peer to see the cut")
    wait_until(lambda: not [a for a in node.ae.active_associations if a.is_acceptor], 20,
               what="the node to end the cut association")
    rows = {r["sop_uid"] for r in node.db.query("SELECT sop_uid FROM instances")}
    assert rows == set(acked)
    assert not list(node.spool.tmp_dir.iterdir())
    assert len(list(node.spool.instances_dir.rglob("*.dcm"))) == 3
    # still serving; the peer sends the series again, as a PACS does after a failure
    assert pynetdicom_send(node.port, series.files, calling_ae="CUT_CT") == [0] * 6
    wait_until(lambda: [tuple(r) for r in node.db.query(
        "SELECT state, instance_count FROM jobs")] == [("done", 6)], 30, what="one job of 6")
    assert node.db.query("SELECT runs FROM series")[0]["runs"] == 1
