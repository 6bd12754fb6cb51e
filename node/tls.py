"""TLS contexts for DICOM over TLS (PS3.15 Annex B.1; BCP 195: TLS 1.2 or newer).

The listener's context comes from ``dicom.tls``; each outbound peer's from its own
``tls`` section (``destinations[i].tls``, ``commitment.peers[i].tls``). Outbound
connections always verify the server's certificate chain and name. Every file is read
when the node starts, so a missing or unreadable certificate stops it with a message
that names the key (exit 2), never at the first association.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from typing import cast

from node.config import ConfigError, Destination, DestinationTls, NodeConfig, TlsConfig

LOGGER = logging.getLogger(__name__)

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def _readable(key: str, path: Path | None) -> Path:
    """*path* if it is a readable file; ConfigError naming *key* otherwise."""
    if path is None:
        raise ConfigError(f"{key}: a file is required")
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from exc
    return path


def _load_chain(ctx: ssl.SSLContext, prefix: str, cert: Path | None, key: Path | None) -> None:
    cert_path = _readable(f"{prefix}.cert_file", cert)
    key_path = _readable(f"{prefix}.key_file", key)
    try:
        ctx.load_cert_chain(cert_path, key_path)
    except ssl.SSLError as exc:
        raise ConfigError(f"{prefix}.cert_file/{prefix}.key_file: {cert_path} and {key_path} "
                          f"are not a matching PEM certificate and unencrypted key: "
                          f"{exc.reason or exc}") from exc


def _load_cas(ctx: ssl.SSLContext, key: str, path: Path | None) -> None:
    ca_path = _readable(key, path)
    try:
        ctx.load_verify_locations(cafile=str(ca_path))
    except ssl.SSLError as exc:
        raise ConfigError(f"{key}: {ca_path} holds no PEM CA certificate: "
                          f"{exc.reason or exc}") from exc


def server_context(tls: TlsConfig, prefix: str = "dicom.tls") -> ssl.SSLContext:
    """The listener's context: our certificate, the minimum version, and client
    certificates checked against ``ca_file`` (required with ``require_client_cert``)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[tls.min_version]
    _load_chain(ctx, prefix, tls.cert_file, tls.key_file)
    if tls.ca_file is not None:
        _load_cas(ctx, f"{prefix}.ca_file", tls.ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def client_context(tls: DestinationTls, prefix: str) -> ssl.SSLContext:
    """An outbound context: the peer is verified (chain and name) against ``ca_file`` or
    the system CAs; our client certificate is presented when configured."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = _VERSIONS[tls.min_version]
    if tls.ca_file is not None:
        _load_cas(ctx, f"{prefix}.ca_file", tls.ca_file)
    if tls.cert_file is not None or tls.key_file is not None:
        _load_chain(ctx, prefix, tls.cert_file, tls.key_file)
    return ctx


def tls_args(dest: Destination, prefix: str = "destination") -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's ``tls_args`` for an association to *dest*, or None for plain TCP."""
    if dest.tls is None:
        return None
    return client_context(dest.tls, prefix), dest.tls.server_name or dest.host


def check_tls(config: NodeConfig) -> None:
    """Start-up: build every configured context once, so that bad files stop the node."""
    if config.dicom.tls.enabled:
        server_context(config.dicom.tls)
    for index, dest in enumerate(config.destinations):
        tls_args(dest, f"destinations[{index}].tls")
    for index, peer in enumerate(config.commitment.peers):
        tls_args(peer, f"commitment.peers[{index}].tls")


def describe_peer(sock: ssl.SSLSocket) -> str:
    """The TLS version and the client certificate's subject, for a log line."""
    cert = sock.getpeercert()
    subject = ""
    if cert:
        rdns = cast(tuple[tuple[tuple[str, str], ...], ...], cert.get("subject", ()))
        parts = [f"{key}={value}" for rdn in rdns for key, value in rdn]
        subject = ", client certificate " + ",".join(parts)
    return f"{sock.version()}{subject or ', no client certificate'}"
