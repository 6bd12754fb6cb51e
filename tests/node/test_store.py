"""Receiving over real associations: dcmtk and pynetdicom peers, every instance spooled,
one job per series, bad input answered with the right status, the node keeps serving."""

from __future__ import annotations

import errno
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    MRImageStorage,
)

from node import handlers
from node.app import Node
from tests.helpers.ctseries import make_ct_slice, write_series
from tests.helpers.net import pynetdicom_send, storescu, wait_until

UID_ROOT = "1.2.826.0.1.3680043.8.498.97."


def _spooled(node: Node, series_uid: str) -> list[Path]:
    rows = node.db.query("SELECT path FROM instances WHERE series_uid = ?", (series_uid,))
    return [Path(r["path"]) for r in rows]


def _jobs_for(node: Node, series_uid: str) -> list[dict[str, object]]:
    rows = node.db.query("SELECT * FROM jobs WHERE series_uid = ?", (series_uid,))
    return [dict(r) for r in rows]


def _metric(node: Node, name: str, **labels: str) -> float:
    value = node.metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


def _assert_received_once(node: Node, series: object, n: int) -> None:
    series_uid = series.series_uid  # type: ignore[attr-defined]
    wait_until(lambda: len(_jobs_for(node, series_uid)) == 1 and
               _jobs_for(node, series_uid)[0]["state"] == "done", 60, what="one finished job")
    spooled = _spooled(node, series_uid)
    assert len(spooled) == n
    # Every spooled file holds exactly the bytes of a sent instance's data set.
    sent = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID): f
            for f in series.files}  # type: ignore[attr-defined]
    for path in spooled:
        ds = dcmread(path)
        assert str(ds.SOPInstanceUID) in sent
        assert ds.PixelData == dcmread(sent[str(ds.SOPInstanceUID)]).PixelData
    job = _jobs_for(node, series_uid)[0]
    assert job["instance_count"] == n
    assert len(_jobs_for(node, series_uid)) == 1


@pytest.mark.dcmtk
@pytest.mark.parametrize(("n", "compress"), [(40, False), (40, True), (300, False), (300, True)])
def test_dcmtk_storescu_series_is_spooled_and_becomes_one_job(
        make_node: Callable[..., Node], tmp_path: Path, n: int, compress: bool) -> None:
    node = make_node()
    series = write_series(tmp_path / "in", n, rows=64, seed=n, compress=compress)
    result = storescu(node.port, series.files, calling_ae="CT_DCMTK",
                      extra=["-xt"] if compress else [])
    assert result.returncode == 0, result.stderr
    _assert_received_once(node, series, n)
    if compress:
        assert all(dcmread(p).file_meta.TransferSyntaxUID == JPEGLSLossless
                   for p in _spooled(node, series.series_uid)[:3])


@pytest.mark.parametrize(("n", "compress"), [(40, False), (40, True), (300, False), (300, True)])
def test_pynetdicom_series_is_spooled_and_becomes_one_job(
        make_node: Callable[..., Node], tmp_path: Path, n: int, compress: bool) -> None:
    node = make_node()
    series = write_series(tmp_path / "in", n, rows=64, seed=1000 + n, compress=compress)
    statuses = pynetdicom_send(node.port, series.files)
    assert statuses == [0x0000] * n
    _assert_received_once(node, series, n)
    assert _metric(node, "ich_node_instances_received_total", outcome="stored") == n


def test_duplicate_same_bytes_is_ignored_different_bytes_replace(
        make_node: Callable[..., Node], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    node = make_node(assembly={"quiet_seconds": 30, "release_grace_seconds": None})
    series = write_series(tmp_path / "in", 3, rows=32, seed=7)
    assert pynetdicom_send(node.port, series.files) == [0] * 3
    assert pynetdicom_send(node.port, series.files[:1]) == [0]
    assert _metric(node, "ich_node_instances_received_total", outcome="duplicate") == 1
    changed = dcmread(series.files[0])
    changed.SeriesDescription = "HEAD 5mm corrected"
    with caplog.at_level("WARNING"):
        assert pynetdicom_send(node.port, [changed]) == [0]
    assert "replaced by newer bytes" in caplog.text
    path = _spooled(node, series.series_uid)
    assert len(path) == 3
    stored = [dcmread(p) for p in path if dcmread(p).SOPInstanceUID == changed.SOPInstanceUID]
    assert stored[0].SeriesDescription == "HEAD 5mm corrected"


def _send_raw(port: int, sop_class: str, sop_uid: str, payload_file: Path,
              calling_ae: str = "FUZZ") -> int | None:
    """C-STORE a file's data set bytes as they are (chunked: pynetdicom does not parse them)."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="ICH_NODE")
    assert assoc.is_established
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        status = assoc.send_c_store(payload_file)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
        assoc.release()
    return getattr(status, "Status", None)


def test_garbage_bytes_get_cannot_understand(make_node: Callable[..., Node],
                                             tmp_path: Path) -> None:
    node = make_node()
    good = make_ct_slice(UID_ROOT + "1", UID_ROOT + "2", UID_ROOT + "3", 0, 1, rows=16)
    path = tmp_path / "garbage.dcm"
    good.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    meta_end = data.index(b"\x08\x00")  # first tag after the file meta (group 0008)
    path.write_bytes(data[:meta_end] + b"\x08\x00\x16\x00UI\xff\xff" + bytes(range(256)) * 8)
    status = _send_raw(node.port, CTImageStorage, str(good.SOPInstanceUID), path)
    assert status is not None and 0xC000 <= status <= 0xCFFF
    assert sum(_metric(node, "ich_node_store_failures_total", reason=r)
               for r in ("undecodable", "missing_uid", "no_pixel_data")) == 1
    assert not list((node.spool.instances_dir).rglob("*.dcm"))


def test_dataset_missing_its_uids_is_refused(make_node: Callable[..., Node],
                                             caplog: pytest.LogCaptureFixture) -> None:
    node = make_node()
    ds = make_ct_slice(UID_ROOT + "1", UID_ROOT + "2", UID_ROOT + "3", 0, 1, rows=16)
    del ds.SeriesInstanceUID
    with caplog.at_level("WARNING"):
        assert pynetdicom_send(node.port, [ds]) == [handlers.CANNOT_UNDERSTAND_MISSING_UID]
    assert "SeriesInstanceUID" in caplog.text
    assert _metric(node, "ich_node_store_failures_total", reason="missing_uid") == 1


def test_pixel_data_shorter_than_header_is_refused(make_node: Callable[..., Node]) -> None:
    node = make_node()
    ds = make_ct_slice(UID_ROOT + "1", UID_ROOT + "2", UID_ROOT + "3", 0, 1, rows=16)
    ds.Rows = 512
    assert pynetdicom_send(node.port, [ds]) == [handlers.CANNOT_UNDERSTAND_PIXEL_DATA]


def _mr_instance() -> object:
    ds = make_ct_slice(UID_ROOT + "1", UID_ROOT + "4", UID_ROOT + "3", 0, 1, rows=16)
    ds.SOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.Modality = "MR"
    return ds


def test_non_ct_sop_class_is_refused_at_negotiation(make_node: Callable[..., Node]) -> None:
    node = make_node()
    ae = AE(ae_title="MR_SCANNER")
    ae.add_requested_context(MRImageStorage)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="ICH_NODE")
    assert assoc.is_established
    try:
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        assert accepted == {CTImageStorage}
        with pytest.raises(ValueError, match="presentation context"):
            assoc.send_c_store(_mr_instance())
    finally:
        assoc.release()
    assert _metric(node, "ich_node_presentation_contexts_refused_total") == 1


def test_non_ct_sop_class_accepted_and_ignored_when_configured(
        make_node: Callable[..., Node], caplog: pytest.LogCaptureFixture) -> None:
    node = make_node(dicom={"other_sop_classes": "accept_and_ignore"})
    with caplog.at_level("INFO"):
        assert pynetdicom_send(node.port, [_mr_instance()]) == [0x0000]  # type: ignore[list-item]
    assert "ignored instance of MR Image Storage" in caplog.text
    assert _metric(node, "ich_node_instances_received_total", outcome="ignored") == 1
    assert not list(node.spool.instances_dir.rglob("*.dcm"))


def _associate(port: int, calling_ae: str) -> object:
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(CTImageStorage)
    return ae.associate("127.0.0.1", port, ae_title="ICH_NODE")


def _reject_reason(assoc: object) -> tuple[int, int, int]:
    rsp = assoc.acceptor.primitive  # type: ignore[attr-defined]
    return (rsp.result, rsp.result_source, rsp.diagnostic)


def test_unknown_calling_ae_is_rejected(make_node: Callable[..., Node]) -> None:
    node = make_node(dicom={"allowed_calling_aes": ["CT_ER"]})
    assoc = _associate(node.port, "STRANGER")
    assert assoc.is_rejected  # type: ignore[attr-defined]
    assert _reject_reason(assoc) == handlers.REJECT_CALLING_AE
    assert _metric(node, "ich_node_associations_total", outcome="calling_ae_not_allowed") == 1
    ok = _associate(node.port, "CT_ER")
    assert ok.is_established  # type: ignore[attr-defined]
    ok.release()  # type: ignore[attr-defined]


def test_source_ip_not_on_the_list_is_rejected(make_node: Callable[..., Node]) -> None:
    node = make_node(dicom={"allowed_networks": ["10.0.0.0/8"]})
    assoc = _associate(node.port, "ANY")
    assert assoc.is_rejected  # type: ignore[attr-defined]
    assert _reject_reason(assoc) == handlers.REJECT_NOT_ALLOWED
    assert _metric(node, "ich_node_associations_total", outcome="ip_not_allowed") == 1


def test_low_disk_refuses_new_associations(make_node: Callable[..., Node]) -> None:
    node = make_node(spool={"min_free_mb": 1 << 40})
    assoc = _associate(node.port, "CT")
    assert assoc.is_rejected  # type: ignore[attr-defined]
    assert _reject_reason(assoc) == handlers.REJECT_CONGESTION
    assert _metric(node, "ich_node_associations_total", outcome="disk_low") == 1


def test_association_limit(make_node: Callable[..., Node]) -> None:
    node = make_node(dicom={"max_associations": 1})
    first = _associate(node.port, "ONE")
    assert first.is_established  # type: ignore[attr-defined]
    second = _associate(node.port, "TWO")
    assert second.is_rejected  # type: ignore[attr-defined]
    assert _reject_reason(second) == handlers.REJECT_LIMIT
    first.release()  # type: ignore[attr-defined]


def test_disk_error_returns_out_of_resources_and_node_keeps_serving(
        make_node: Callable[..., Node], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    node = make_node()
    series = write_series(tmp_path / "in", 4, rows=32, seed=11)
    real_store = node.spool.store
    calls = {"n": 0}

    def flaky_store(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        if calls["n"] == 3:
            raise sqlite3.OperationalError("database or disk is full")
        return real_store(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(node.spool, "store", flaky_store)
    statuses = pynetdicom_send(node.port, series.files)
    assert statuses == [0, handlers.OUT_OF_RESOURCES, handlers.OUT_OF_RESOURCES, 0]
    assert _metric(node, "ich_node_store_failures_total", reason="out_of_resources") == 2
    # the peer re-sends what failed; nothing acknowledged was lost
    assert pynetdicom_send(node.port, series.files[1:3]) == [0, 0]
    _assert_received_once(node, series, 4)


def test_real_full_disk_write_fails_cleanly(make_node: Callable[..., Node], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The write path itself raises (as on a full file system): 0xA700, no partial file left."""
    import node.spool as spool_module

    node = make_node()
    series = write_series(tmp_path / "in", 1, rows=32, seed=12)
    real_write_all = spool_module._write_all
    written: list[int] = []

    def full_write_all(fd: int, chunk: object) -> None:
        real_write_all(fd, b"\0" * 100)  # a part of the file made it, then the disk is full
        written.append(fd)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool_module, "_write_all", full_write_all)
    assert pynetdicom_send(node.port, series.files) == [handlers.OUT_OF_RESOURCES]
    assert written, "the injected write failure was not reached"
    assert not list(node.spool.tmp_dir.iterdir())
    assert not list(node.spool.instances_dir.rglob("*.dcm"))


def test_echo(make_node: Callable[..., Node]) -> None:
    node = make_node()
    ae = AE(ae_title="ECHO")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="ICH_NODE")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()


def test_spooled_file_is_the_received_encoding(make_node: Callable[..., Node],
                                               tmp_path: Path) -> None:
    """The spool keeps the bytes as received (no re-encoding): same data set hash."""
    node = make_node()
    series = write_series(tmp_path / "in", 1, rows=32, seed=13)
    assert pynetdicom_send(node.port, series.files) == [0]
    wait_until(lambda: bool(_spooled(node, series.series_uid)), 10, what="spooled")
    spooled = _spooled(node, series.series_uid)[0]
    original = dcmread(series.files[0])
    received = dcmread(spooled)
    assert received == original
    row = node.db.query("SELECT size FROM instances")[0]
    assert row["size"] == spooled.stat().st_size
    assert spooled.read_bytes()[128:132] == b"DICM"


def test_tcp_nodelay_is_set_on_inbound_sockets(make_node: Callable[..., Node]) -> None:
    import socket as socket_module

    node = make_node()
    seen: list[int] = []

    def check(event: evt.Event) -> None:
        sock = event.assoc.dul.socket.socket
        seen.append(sock.getsockopt(socket_module.IPPROTO_TCP, socket_module.TCP_NODELAY))

    server = node._listeners.plain if node._listeners else None  # noqa: SLF001 - the listener
    assert server is not None
    server.bind(evt.EVT_ESTABLISHED, check)
    assoc = _associate(node.port, "CT")
    assoc.release()  # type: ignore[attr-defined]
    wait_until(lambda: bool(seen), 5, what="EVT_ESTABLISHED")
    assert seen[0] != 0


@pytest.mark.dcmtk
def test_phantom_study_goes_through_the_node(make_node: Callable[..., Node],
                                             tmp_path: Path) -> None:
    """A realistic phantom series (scanner-like headers, signed/unsigned storage) is
    spooled complete and becomes one job."""
    from pipeline.phantom import write_studies

    [study] = write_studies(tmp_path / "ph", 1, seed=9, subtypes=["subdural"], slices=30,
                            matrix=128)
    files = sorted((study.study_dir / "dicom").glob("*.dcm"))
    node = make_node()
    result = storescu(node.port, files, calling_ae="PHANTOM_CT")
    assert result.returncode == 0, result.stderr
    wait_until(lambda: [r["state"] for r in node.db.query("SELECT state FROM jobs")] == ["done"],
               30, what="one job")
    assert node.db.query("SELECT instance_count FROM jobs")[0]["instance_count"] == 30
    assert len(_spooled(node, study.series_instance_uid)) == 30
