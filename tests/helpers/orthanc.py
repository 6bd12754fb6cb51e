"""A real Orthanc for tests: the Debian binary with its own config file, not the service.

:class:`OrthancServer` writes a JSON configuration into a folder of its own (storage,
index, log), starts ``/usr/sbin/Orthanc`` on free DICOM and HTTP ports, waits until
``GET /system`` answers and drives the REST API with ``urllib`` only. Use it as a
context manager; :meth:`OrthancServer.stop` terminates the process (kill after a
timeout) and prints Orthanc's log when something went wrong.

Orthanc 1.10 has no bind-address option: both ports listen on every interface, and
``RemoteAccessAllowed: false`` makes the HTTP server answer loopback clients only.
Nagle: ``TcpNoDelay`` covers the HTTP server; the DICOM sockets are DCMTK's, which
turn Nagle off when the environment has ``TCP_NODELAY=1`` (DCMTK >= 3.6.3 leaves it on
by default), so the process is started with that variable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.helpers.net import free_port

ORTHANC_BIN = Path("/usr/sbin/Orthanc")


class OrthancError(Exception):
    """Orthanc did not start, or a REST call failed; the message has the URL and body."""


def require_orthanc() -> Path:
    """The Orthanc binary; skips the calling test when it is not installed."""
    if not ORTHANC_BIN.exists():
        import pytest

        pytest.skip(f"{ORTHANC_BIN} is missing (Debian package orthanc)")
    return ORTHANC_BIN


class OrthancServer:
    """One Orthanc process with its own configuration under *workdir*.

    *modalities* maps a symbolic name to ``(aet, host, port)``; *extra_config* is
    merged last into the configuration (for benchmarks: ``MaximumPduLength``...).
    """

    def __init__(self, workdir: Path, modalities: Mapping[str, tuple[str, str, int]] | None = None,
                 aet: str = "ORTHANC", extra_config: Mapping[str, Any] | None = None,
                 start_timeout_s: float = 30.0) -> None:
        self.binary = require_orthanc()
        self.workdir = Path(workdir)
        self.aet = aet
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.config_path = self.workdir / "orthanc.json"
        self.log_path = self.workdir / "orthanc.log"
        self.start_timeout_s = start_timeout_s
        self._process: subprocess.Popen[bytes] | None = None
        self._failed = False
        self.config: dict[str, Any] = {
            "Name": "ich-node-tests",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "TemporaryDirectory": str(self.workdir / "tmp"),
            "Plugins": [],
            "LuaScripts": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "TcpNoDelay": True,
            "KeepAlive": True,
            "DicomServerEnabled": True,
            "DicomAet": aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomModalitiesInDatabase": False,
            "DicomModalities": {name: [a, h, p] for name, (a, h, p) in (modalities or {}).items()},
            "SaveJobs": False,
            "StableAge": 1,
            "HttpThreadsCount": 8,
            "DicomThreadsCount": 4,
            "ConcurrentJobs": 2,
        }
        self.config.update(extra_config or {})

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> OrthancServer:
        """Write the config, start Orthanc, wait until ``GET /system`` answers."""
        for sub in ("storage", "index", "tmp"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config, indent=2), encoding="utf-8")
        env = dict(os.environ, TCP_NODELAY="1")
        self._process = subprocess.Popen(
            [str(self.binary), f"--logfile={self.log_path}", "--no-jobs", str(self.config_path)],
            cwd=self.workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._fail(f"Orthanc exited with code {self._process.returncode} at start")
            try:
                system = self.get("/system")
            except (OSError, OrthancError):
                time.sleep(0.1)
                continue
            if system.get("DicomPort") == self.dicom_port:
                return self
            self._fail(f"Orthanc answered on {self.url} with another DICOM port: {system}")
        self._fail(f"Orthanc did not answer GET {self.url}/system within "
                   f"{self.start_timeout_s:.0f} s")
        raise AssertionError("unreachable")

    def stop(self, timeout_s: float = 10.0) -> None:
        """Terminate Orthanc; kill it after *timeout_s*; print its log if anything failed."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._failed = True
                process.kill()
                process.wait(timeout_s)
        elif process.returncode != 0:
            self._failed = True
        if self._failed:
            self.print_log()

    def print_log(self) -> None:
        """Copy Orthanc's log file to stderr (pytest shows it with a failing test)."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else "(no log)"
        print(f"---- Orthanc log {self.log_path} ----\n{text}\n---- end of log ----",
              file=sys.stderr)

    def _fail(self, message: str) -> None:
        self._failed = True
        self.stop()
        raise OrthancError(message)

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            self._failed = True
        self.stop()

    # -- REST -----------------------------------------------------------------------

    def request(self, method: str, path: str, body: bytes | str | Any = None,
                content_type: str = "application/json", timeout_s: float = 60.0) -> Any:
        """One REST call; JSON answers are decoded. Raises OrthancError on HTTP errors."""
        if body is None:
            data = None
        elif isinstance(body, bytes):
            data = body
        elif isinstance(body, str):
            data = body.encode("utf-8")
        else:
            data = json.dumps(body).encode("utf-8")
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as response:
                raw = response.read()
                kind = response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")
            self._failed = True
            raise OrthancError(f"{method} {path}: HTTP {exc.code}: {detail}") from exc
        if "json" in kind:
            return json.loads(raw) if raw else None
        return raw

    def get(self, path: str) -> Any:
        """``GET path``."""
        return self.request("GET", path)

    def upload(self, path: Path) -> dict[str, Any]:
        """``POST /instances`` with the bytes of a DICOM file; returns Orthanc's answer
        (``ID``, ``ParentStudy``, ``Status``...)."""
        answer: dict[str, Any] = self.request("POST", "/instances", Path(path).read_bytes(),
                                              content_type="application/dicom")
        return answer

    def study_ids(self) -> list[str]:
        """Orthanc identifiers of every study."""
        return list(self.get("/studies"))

    def series_of_study(self, study_id: str) -> list[dict[str, Any]]:
        """The series resources (with ``MainDicomTags``) of an Orthanc study."""
        return list(self.get(f"/studies/{study_id}/series"))

    def instances_of_series(self, series_id: str) -> list[dict[str, Any]]:
        """The instance resources of an Orthanc series."""
        return list(self.get(f"/series/{series_id}/instances"))

    def simplified_tags(self, instance_id: str) -> dict[str, Any]:
        """``/instances/{id}/simplified-tags`` (keywords to values, decoded by Orthanc)."""
        return dict(self.get(f"/instances/{instance_id}/simplified-tags"))

    def find_study(self, study_instance_uid: str) -> str | None:
        """The Orthanc identifier of a study by its StudyInstanceUID (``/tools/lookup``)."""
        for hit in self.request("POST", "/tools/lookup", study_instance_uid,
                                content_type="text/plain"):
            if hit.get("Type") == "Study":
                return str(hit["ID"])
        return None

    def add_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Register a DICOM modality at runtime (``PUT /modalities/{name}``)."""
        self.request("PUT", f"/modalities/{name}", {"AET": aet, "Host": host, "Port": port})

    def modalities(self) -> dict[str, Any]:
        """``GET /modalities?expand``."""
        return dict(self.get("/modalities?expand"))

    def store_to_modality(self, modality: str, resource_ids: Iterable[str],
                          timeout_s: float = 120.0) -> dict[str, Any]:
        """C-STORE resources (any level) to a modality, synchronously; returns the job
        summary. Raises OrthancError when Orthanc reports a failure."""
        answer: dict[str, Any] = self.request(
            "POST", f"/modalities/{modality}/store",
            {"Resources": list(resource_ids), "Synchronous": True}, timeout_s=timeout_s)
        return answer

    def statistics(self) -> dict[str, Any]:
        """``GET /statistics`` (counts and disk size)."""
        return dict(self.get("/statistics"))

    def delete_all(self) -> None:
        """Delete every patient (and so every study, series and instance)."""
        for patient in self.get("/patients"):
            self.request("DELETE", f"/patients/{patient}")
