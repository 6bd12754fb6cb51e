"""DICOM over TLS: dcmtk and pynetdicom senders with and without the right client
certificate, plain TCP to the TLS port, outbound to a TLS receiver, and start-up
refusal when a certificate file is missing."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE

from node.app import Node
from node.config import ConfigError, Destination, DestinationTls
from node.sender import SendError, echo
from tests.conftest import node_config
from tests.helpers.ctseries import write_series
from tests.helpers.net import free_port, storescu, wait_until
from tests.helpers.receiver import Receiver
from tests.helpers.tls import Pki, make_pki

HANDSHAKE_FAILED = {"outcome": "tls_handshake_failed"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _tls(pki: Pki, **extra: Any) -> dict[str, Any]:
    return {"tls": {"enabled": True, "port": 0, "cert_file": str(pki.server_cert),
                    "key_file": str(pki.server_key), "ca_file": str(pki.ca),
                    "require_client_cert": True, **extra}}


def _stored(node: Node) -> int:
    return int(node.db.query("SELECT COUNT(*) AS n FROM instances")[0]["n"])


def _metric(node: Node, name: str, labels: dict[str, str]) -> float:
    return node.metrics.registry.get_sample_value(name, labels) or 0.0


def _dcmtk_tls(pki: Pki, cert: Path | None = None, key: Path | None = None) -> list[str]:
    """storescu options: TLS with our client certificate (or anonymous), trusting our CA."""
    auth = ["+tls", str(key), str(cert), "-pw"] if cert and key else ["+tla"]
    return [*auth, "+cf", str(pki.ca)]


@pytest.mark.dcmtk
def test_dcmtk_storescu_over_tls_with_client_certificate_is_stored(
        make_node: Callable[..., Node], pki: Pki, tmp_path: Path) -> None:
    node = make_node(dicom=_tls(pki, plain_listener=False))
    assert node.tls_port is not None and node.port == node.tls_port
    series = write_series(tmp_path / "in", 12, rows=32, seed=71)
    result = storescu(node.tls_port, series.files, calling_ae="CT_TLS",
                      extra=_dcmtk_tls(pki, pki.client_cert, pki.client_key))
    assert result.returncode == 0, result.stderr
    assert _stored(node) == 12
    assert _metric(node, "ich_node_associations_total", HANDSHAKE_FAILED) == 0


@pytest.mark.dcmtk
def test_tls_port_refuses_no_certificate_foreign_certificate_and_plain_tcp(
        make_node: Callable[..., Node], pki: Pki, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    node = make_node(dicom=_tls(pki))
    assert node.tls_port is not None and node.tls_port != node.port
    series = write_series(tmp_path / "in", 3, rows=32, seed=72)
    attempts = {
        "anonymous TLS": _dcmtk_tls(pki),
        "certificate from another CA": _dcmtk_tls(pki, pki.rogue_cert, pki.rogue_key),
        "plain TCP": [],
    }
    for what, extra in attempts.items():
        result = storescu(node.tls_port, series.files, calling_ae="CT_TLS", extra=extra)
        assert result.returncode != 0, f"{what} was accepted: {result.stdout}"
    wait_until(lambda: _metric(node, "ich_node_associations_total", HANDSHAKE_FAILED) == 3,
               10, what="three failed handshakes counted")
    assert _stored(node) == 0
    assert _metric(node, "ich_node_associations_total", {"outcome": "accepted"}) == 0
    failures = [r.getMessage() for r in caplog.records
                if r.getMessage().startswith("TLS handshake from 127.0.0.1 failed")]
    assert len(failures) == 3, failures
    # The plain listener is still there and still works.
    assert storescu(node.port, series.files, calling_ae="CT_PLAIN").returncode == 0
    assert _stored(node) == 3


def _client_context(pki: Pki, with_cert: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    if with_cert:
        ctx.load_cert_chain(pki.client_cert, pki.client_key)
    return ctx


def _pynetdicom_store(port: int, files: list[Path], tls: ssl.SSLContext | None
                      ) -> list[int | None] | None:
    from pydicom import dcmread

    ae = AE(ae_title="PY_TLS")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2")
    assoc = ae.associate("127.0.0.1", port, ae_title="ICH_NODE",
                         tls_args=(tls, "127.0.0.1") if tls else None)
    if not assoc.is_established:
        return None
    try:
        return [getattr(assoc.send_c_store(dcmread(f)), "Status", None) for f in files]
    finally:
        assoc.release()


def test_pynetdicom_over_tls(make_node: Callable[..., Node], pki: Pki, tmp_path: Path) -> None:
    node = make_node(dicom=_tls(pki))
    assert node.tls_port is not None
    series = write_series(tmp_path / "in", 4, rows=32, seed=73)
    assert _pynetdicom_store(node.tls_port, series.files, _client_context(pki)) == [0] * 4
    assert _pynetdicom_store(node.tls_port, series.files,
                             _client_context(pki, with_cert=False)) is None
    assert _stored(node) == 4
    wait_until(lambda: _metric(node, "ich_node_associations_total", HANDSHAKE_FAILED) == 1,
               10, what="the certificate-less handshake counted")


def test_optional_client_certificate(make_node: Callable[..., Node], pki: Pki,
                                     tmp_path: Path) -> None:
    """Without require_client_cert a client may come without a certificate."""
    node = make_node(dicom=_tls(pki, require_client_cert=False))
    assert node.tls_port is not None
    series = write_series(tmp_path / "in", 2, rows=32, seed=74)
    assert _pynetdicom_store(node.tls_port, series.files,
                             _client_context(pki, with_cert=False)) == [0] * 2


def _tls_receiver(pki: Pki) -> Receiver:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.server_cert, pki.server_key)
    ctx.load_verify_locations(cafile=str(pki.ca))
    ctx.verify_mode = ssl.CERT_REQUIRED
    return Receiver(free_port(), ssl_context=ctx).start()


def test_results_go_out_over_tls(make_node: Callable[..., Node], pki: Pki,
                                 tmp_path: Path) -> None:
    receiver = _tls_receiver(pki)
    try:
        dest = {"name": "pacs", "ae_title": "RESULTS", "host": "127.0.0.1",
                "port": receiver.port, "tls": {"ca_file": str(pki.ca),
                                               "cert_file": str(pki.client_cert),
                                               "key_file": str(pki.client_key)}}
        node = make_node(destinations=[dest])
        series = write_series(tmp_path / "in", 3, rows=32, seed=75)
        result = storescu(node.port, series.files, calling_ae="CT_PLAIN")
        assert result.returncode == 0, result.stderr
        wait_until(lambda: receiver.total() == 1, 30, what="the result over TLS")
    finally:
        receiver.stop()


def test_outbound_tls_verifies_the_receiver(pki: Pki, tmp_path: Path) -> None:
    """Echo over TLS works with the right CA; a receiver whose certificate does not chain
    to the configured CA, or a client without the certificate it requires, fails."""
    receiver = _tls_receiver(pki)
    cfg = node_config(tmp_path / "spool")
    try:
        def dest(**tls: Any) -> Destination:
            return Destination(name="pacs", ae_title="RESULTS", host="127.0.0.1",
                               port=receiver.port, tls=DestinationTls(**tls))

        good = dest(ca_file=pki.ca, cert_file=pki.client_cert, key_file=pki.client_key)
        assert echo(cfg, good) == 0
        with pytest.raises(SendError, match="TLS"):
            echo(cfg, dest(ca_file=pki.rogue_ca, cert_file=pki.client_cert,
                           key_file=pki.client_key))
        with pytest.raises(SendError, match="TLS"):
            echo(cfg, dest(ca_file=pki.ca))
    finally:
        receiver.stop()


def test_missing_or_bad_certificate_stops_the_node(pki: Pki, tmp_path: Path) -> None:
    missing = _tls(pki, cert_file=str(tmp_path / "nope.pem"))
    node = Node(node_config(tmp_path / "spool", dicom=missing), analyzer="tests.helpers."
                "analyzers:summary")
    with pytest.raises(ConfigError, match=r"dicom\.tls\.cert_file: cannot read .*nope\.pem"):
        node.start()
    swapped = _tls(pki, key_file=str(pki.client_key))
    node = Node(node_config(tmp_path / "spool", dicom=swapped),
                analyzer="tests.helpers.analyzers:summary")
    with pytest.raises(ConfigError, match=r"dicom\.tls\.cert_file/dicom\.tls\.key_file"):
        node.start()
    with pytest.raises(ConfigError, match=r"dicom\.tls.*cert_file and key_file are required"):
        node_config(tmp_path / "spool", dicom={"tls": {"enabled": True}})
    bad_dest = [{"name": "pacs", "ae_title": "RESULTS", "host": "127.0.0.1", "port": 104,
                 "tls": {"ca_file": str(tmp_path / "none.pem")}}]
    node = Node(node_config(tmp_path / "spool", destinations=bad_dest),
                analyzer="tests.helpers.analyzers:summary")
    with pytest.raises(ConfigError, match=r"destinations\[0\]\.tls\.ca_file: cannot read"):
        node.start()


def test_a_silent_connection_does_not_block_the_tls_port(
        make_node: Callable[..., Node], pki: Pki, tmp_path: Path) -> None:
    """The handshake runs on the connection's thread (pynetdicom runs it on the accepting
    thread, with no time limit): a peer that connects and sends nothing delays no one,
    and is dropped after dicom.tls.handshake_timeout_s."""
    node = make_node(dicom=_tls(pki, handshake_timeout_s=1.0))
    assert node.tls_port is not None
    series = write_series(tmp_path / "in", 2, rows=32, seed=76)
    with socket.create_connection(("127.0.0.1", node.tls_port)) as silent:
        assert _pynetdicom_store(node.tls_port, series.files, _client_context(pki)) == [0, 0]
        wait_until(lambda: _metric(node, "ich_node_associations_total", HANDSHAKE_FAILED) == 1,
                   10, what="the silent connection dropped")
        silent.settimeout(5)
        assert silent.recv(1) == b""  # closed by the node
