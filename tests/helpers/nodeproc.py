"""A node in its own process group, killable with SIGKILL (kill -9 tests, fault benchmarks).

:class:`NodeProcess` writes a config into a folder of its own, runs
``python -m tests.helpers.run_node CONFIG ANALYZER`` (a test analyzer; ``ich-node run`` always
uses the real pipeline) and reads the state database beside the running node (SQLite WAL).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pynetdicom import AE

from tests.helpers.net import free_port, wait_until

REPO = Path(__file__).resolve().parents[2]
SUMMARY_ANALYZER = "tests.helpers.analyzers:summary"


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


class NodeProcess:
    """A node in its own process group (the worker is in the same group), killable with
    SIGKILL. *destinations* maps a name to a port on 127.0.0.1 (AE title ``RESULTS``);
    *overrides* are merged into the config; *env* is added to the environment."""

    def __init__(self, tmp: Path, receiver_port: int | None = None,
                 analyzer_delay: float = 0.0, analyzer: str = SUMMARY_ANALYZER,
                 destinations: Mapping[str, int] | None = None,
                 overrides: Mapping[str, Any] | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        self.port = free_port()
        self.analyzer = analyzer
        self.spool = tmp / "spool"
        self.log = tmp / "node.log"
        self.config = tmp / "node.yaml"
        dests = dict(destinations or {})
        if receiver_port is not None:
            dests.setdefault("results", receiver_port)
        config: dict[str, Any] = {
            "dicom": {"host": "127.0.0.1", "port": self.port},
            "spool": {"path": str(self.spool), "min_free_mb": 1},
            "http": {"port": 0},
            "assembly": {"quiet_seconds": 1.5, "release_grace_seconds": 0.5},
            "worker": {"poll_interval_s": 0.1},
            "outbound": {"backoff_initial_s": 0.2, "backoff_max_s": 1.0},
            "destinations": [{"name": name, "ae_title": "RESULTS", "host": "127.0.0.1",
                              "port": port} for name, port in dests.items()],
        }
        self.config.write_text(yaml.safe_dump(_merge(config, overrides or {})))
        self.env = dict(os.environ, PYTHONPATH=str(REPO),
                        ICH_TEST_ANALYZER_DELAY=str(analyzer_delay), **(env or {}))
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, timeout_s: float = 60.0) -> None:
        """Start the node and wait until it answers C-ECHO."""
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.helpers.run_node", str(self.config), self.analyzer],
                cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        self.starts += 1
        wait_until(self._started, timeout_s,
                   what=f"node on port {self.port}\n{self.log_text()[-4000:]}")

    def alive(self) -> bool:
        """Whether the node process runs."""
        return self.proc is not None and self.proc.poll() is None

    def _started(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"node exited with {self.proc.returncode} at start\n"
                                 f"{self.log_text()[-4000:]}")
        return self._echo_ok()

    def _echo_ok(self) -> bool:
        ae = AE(ae_title="PROBE")
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", self.port, ae_title="ICH_NODE")
        if not assoc.is_established:
            return False
        assoc.release()
        return True

    def pids(self) -> list[int]:
        """The node's pid and its children's (the worker)."""
        if self.proc is None:
            return []
        pids = [self.proc.pid]
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        if children.exists():
            pids += [int(p) for p in children.read_text().split()]
        return pids

    def kill9(self) -> None:
        """SIGKILL the whole process group (node and worker) and reap the node."""
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # already gone (it died on its own): the caller asserts on what is on disk
        self.proc.wait(10)

    def terminate(self) -> int:
        """SIGTERM; the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)

    def stop(self) -> None:
        """Teardown: SIGTERM, then SIGKILL if it does not stop."""
        if not self.alive():
            return
        try:
            self.terminate()
        except subprocess.TimeoutExpired:
            self.kill9()

    def log_text(self) -> str:
        """The node's log so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run *sql* on the node's state database (beside the running node)."""
        conn = sqlite3.connect(self.spool / "state.db", timeout=30)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()
