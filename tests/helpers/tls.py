"""A throwaway PKI for TLS tests, made with the ``openssl`` command line (Debian's
``openssl`` package): a CA, a server certificate for 127.0.0.1/localhost, a client
certificate, and a client certificate from another CA (which must be refused)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pki:
    """PEM files: ``ca``, ``server_cert``/``server_key``, ``client_cert``/``client_key``,
    ``rogue_cert``/``rogue_key`` (signed by ``rogue_ca``, which the node does not trust)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path
    rogue_cert: Path
    rogue_key: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _key(path: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-out", str(path))
    path.chmod(0o600)


def _ca(folder: Path, name: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}.key", folder / f"{name}.pem"
    _key(key)
    _openssl("req", "-x509", "-new", "-key", str(key), "-out", str(cert), "-days", "2",
             "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return cert, key


def _leaf(folder: Path, name: str, ca: tuple[Path, Path], usage: str) -> tuple[Path, Path]:
    key, csr, cert = folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.pem"
    ext = folder / f"{name}.ext"
    ext.write_text("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyAgreement\n"
                   f"extendedKeyUsage={usage}\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _key(key)
    _openssl("req", "-new", "-key", str(key), "-out", str(csr), "-subj", f"/CN={name}")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
             "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext))
    return cert, key


def make_pki(folder: Path) -> Pki:
    """Create the PKI in *folder*; skips the test when ``openssl`` is missing."""
    if shutil.which("openssl") is None:
        import pytest

        pytest.skip("the openssl command line is not installed (Debian package openssl)")
    folder.mkdir(parents=True, exist_ok=True)
    ca = _ca(folder, "test-ca")
    rogue = _ca(folder, "rogue-ca")
    server = _leaf(folder, "ich-node", ca, "serverAuth")
    client = _leaf(folder, "ct-scanner", ca, "clientAuth")
    rogue_client = _leaf(folder, "intruder", rogue, "clientAuth")
    return Pki(ca[0], server[0], server[1], client[0], client[1], rogue[0], rogue_client[0],
               rogue_client[1])
