"""Networking helpers for tests: free ports, waiting, a pynetdicom SCU, dcmtk tools."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pydicom import Dataset
from pynetdicom import AE, evt

from node.sender import await_reactor_resumed

DCMTK_BIN = Path("/usr/bin")


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(condition: Callable[[], bool], timeout: float = 30.0, interval: float = 0.1,
               what: str = "condition") -> None:
    """Poll *condition* until true; AssertionError after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def dcmtk(tool: str) -> str:
    """Path of a dcmtk tool by its system location (pynetdicom puts same-named scripts in
    the venv); skips the test if dcmtk is not installed."""
    import pytest

    path = DCMTK_BIN / tool
    if not path.exists():
        pytest.skip(f"dcmtk's {tool} is not installed (Debian package dcmtk)")
    return str(path)


def storescu(port: int, files: Sequence[Path], calling_ae: str = "DCMTK_SCU",
             called_ae: str = "ICH_NODE", extra: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    """Send *files* with dcmtk's storescu (Nagle off, as a well-configured peer)."""
    env = dict(os.environ, TCP_NODELAY="1")
    return subprocess.run([dcmtk("storescu"), "-aet", calling_ae, "-aec", called_ae, *extra,
                           "127.0.0.1", str(port), *map(str, files)],
                          capture_output=True, text=True, env=env, timeout=300)


def _nodelay(event: evt.Event) -> None:
    sock = event.assoc.dul.socket
    if sock is not None and sock.socket is not None:
        sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def pynetdicom_send(port: int, items: Sequence[Path | Dataset], calling_ae: str = "PYNETDICOM",
                    called_ae: str = "ICH_NODE", sop_classes: Sequence[str] | None = None,
                    transfer_syntaxes: Sequence[str] | None = None) -> list[int | None]:
    """Send *items* in one association; return each C-STORE status (None: no response).
    Raises AssertionError when the association is not accepted."""
    from pydicom import dcmread

    ae = AE(ae_title=calling_ae)
    classes: dict[str, list[str]] = {}
    for item in items:
        ds = item if isinstance(item, Dataset) else dcmread(item, stop_before_pixels=True)
        ts = str(ds.file_meta.TransferSyntaxUID)
        classes.setdefault(str(ds.SOPClassUID), [])
        if ts not in classes[str(ds.SOPClassUID)]:
            classes[str(ds.SOPClassUID)].append(ts)
    for uid, syntaxes in classes.items():
        if sop_classes is None or uid in sop_classes:
            ae.add_requested_context(uid, list(transfer_syntaxes or syntaxes))
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae,
                         evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)])
    assert assoc.is_established, f"association to port {port} not established"
    statuses: list[int | None] = []
    try:
        for index, item in enumerate(items):
            if index:
                await_reactor_resumed(assoc)  # pynetdicom's requestor race (node.sender)
            status = assoc.send_c_store(item)
            statuses.append(getattr(status, "Status", None))
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses


def have(binary: str) -> bool:
    """Whether *binary* is on PATH or in /usr/sbin."""
    return shutil.which(binary) is not None or Path("/usr/sbin", binary).exists()
