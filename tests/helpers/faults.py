"""Fault trials shared by ``tests/faults/`` (a few quick ones) and ``bench/faults.py`` (many).

One kill trial: a node in its own process (:class:`NodeProcess`, ledger analyzer), two
result destinations, several peers (dcmtk's storescu and pynetdicom SCUs) sending a series
each on their own association at the same time; the node gets ``kill -9`` at a point chosen by *phase* and a seeded random
delay; the node restarts on the same spool; every peer sends its whole series again (as a
PACS does after a failed transfer); once the node is idle, :func:`check_invariants` holds
it to its promises:

- acknowledged = durable: every instance a peer got Success for is in the spool
  (file and row), right after the kill and after the restart;
- exactly-once analysis: each series has exactly one ``done`` job, over all its instances;
  an analysis the kill interrupted ran again from the start (the ledger shows it) and
  left nothing behind;
- delivery: each result reached each destination; twice only when the kill hit while
  results were being sent (at-least-once: the kill fell between the destination's
  Success and our ``sent`` mark);
- consistent state: nothing left ``ready``, ``processing``, ``queued`` or ``sending``, no
  partial file in ``tmp/``, every row has its file and every file its row.

Phases: ``receive`` (after a random number of acknowledgements), ``fsync`` (while a node
thread is inside fsync(2), seen in ``/proc/PID/task/*/syscall``), ``assembly`` (peers done,
series not yet a job), ``inference`` (a job running; the analyzer sleeps) and ``sending``
(an outbound row ``sending``; the destination answers slowly). What was going on at the
moment of the kill (read from the frozen state database right after it) is recorded in
:attr:`TrialResult.observed`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from node.sender import await_reactor_resumed
from tests.helpers.ctseries import SeriesOnDisk, write_series
from tests.helpers.net import _nodelay, free_port, pynetdicom_send, wait_until
from tests.helpers.nodeproc import NodeProcess
from tests.helpers.receiver import Receiver

LEDGER_ANALYZER = "tests.helpers.analyzers:ledger"
PHASES = ("receive", "fsync", "assembly", "inference", "sending")
DESTINATIONS = ("a", "b")
FSYNC_SYSCALLS = {"74", "75"}  # x86_64 fsync, fdatasync
ANALYZER_DELAY_S = 1.5
SLOW_DESTINATION_S = 0.8
PEER_TIMEOUT_S = 3.0
STORESCU = "/usr/bin/storescu"


class Peer(threading.Thread):
    """A modality: sends *files* in one association; records which got Success."""

    def __init__(self, name: str, port: int, files: Sequence[Path], pause_s: float = 0.0
                 ) -> None:
        super().__init__(name=f"peer-{name}", daemon=True)
        self.ae_title = name
        self.port = port
        self.files = list(files)
        self.pause_s = pause_s
        self.acked: set[str] = set()
        self.statuses: Counter[str] = Counter()
        self.sent = 0
        self.error = ""

    def run(self) -> None:
        ae = AE(ae_title=self.ae_title)
        # A modality notices a dead node by its DIMSE timeout (pynetdicom does not always
        # see the closed connection); the files' own syntax, so a re-send is byte-equal.
        ae.dimse_timeout = ae.network_timeout = ae.acse_timeout = PEER_TIMEOUT_S
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", self.port, ae_title="ICH_NODE",
                             evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)])
        if not assoc.is_established:
            self.error = "association not established"
            return
        try:
            for path in self.files:
                if not assoc.is_established:
                    self.error = "association lost"
                    return
                if self.sent:
                    await_reactor_resumed(assoc)  # pynetdicom's requestor race (node.sender)
                try:
                    status = assoc.send_c_store(path)
                except RuntimeError:  # the association died since the check (the kill)
                    self.error = "association lost"
                    return
                self.sent += 1
                code = getattr(status, "Status", None)
                self.statuses["none" if code is None else f"0x{int(code):04X}"] += 1
                if code == 0x0000:
                    self.acked.add(str(dcmread(path, stop_before_pixels=True,
                                               specific_tags=["SOPInstanceUID"]).SOPInstanceUID))
                if self.pause_s:
                    time.sleep(self.pause_s)
        finally:
            if assoc.is_established:
                assoc.release()


class DcmtkPeer(threading.Thread):
    """A modality that is dcmtk's ``storescu`` (one association for all *files*); what got
    Success is read from its verbose log, file by file."""

    def __init__(self, name: str, port: int, files: Sequence[Path]) -> None:
        super().__init__(name=f"dcmtk-{name}", daemon=True)
        self.ae_title = name
        self.port = port
        self.files = list(files)
        self.acked: set[str] = set()
        self.statuses: Counter[str] = Counter()
        self.error = ""

    def run(self) -> None:
        timeout = str(int(PEER_TIMEOUT_S))
        proc = subprocess.Popen(
            [STORESCU, "-v", "-aet", self.ae_title, "-aec", "ICH_NODE", "-to", timeout,
             "-ta", timeout, "-td", timeout, "127.0.0.1", str(self.port),
             *map(str, self.files)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=dict(os.environ, TCP_NODELAY="1"))
        assert proc.stdout is not None
        current: Path | None = None
        for line in proc.stdout:
            if line.startswith("I: Sending file: "):
                current = Path(line.removeprefix("I: Sending file: ").strip())
            elif line.startswith("I: Received Store Response (") and current is not None:
                status = line.split("(", 1)[1].rstrip(")\n")
                self.statuses[status] += 1
                if status == "Success":
                    self.acked.add(str(dcmread(current, stop_before_pixels=True,
                                               specific_tags=["SOPInstanceUID"]).SOPInstanceUID))
        self.error = f"storescu exited with {proc.wait()}"


def resend(port: int, files: Sequence[Path], calling_ae: str, dcmtk: bool) -> list[int | None]:
    """Send *files* again with the same tool (so the bytes, and so the duplicate check, are
    the same as the first time); pynetdicom's statuses, or storescu's as all 0 / None."""
    if not dcmtk:
        return pynetdicom_send(port, files, calling_ae=calling_ae)
    done = subprocess.run([STORESCU, "-aet", calling_ae, "-aec", "ICH_NODE", "127.0.0.1",
                           str(port), *map(str, files)], capture_output=True, text=True,
                          env=dict(os.environ, TCP_NODELAY="1"), timeout=120)
    return [0 if done.returncode == 0 else None] * len(files)


@dataclass
class TrialResult:
    """What one kill trial did and found (JSON-serialisable with :meth:`as_dict`)."""

    seed: int
    phase: str
    observed: list[str] = field(default_factory=list)
    kill_after_s: float = 0.0
    acked_before_kill: int = 0
    acked_total: int = 0
    lost: int = 0
    series: int = 0
    done_jobs: int = 0
    analyses_started: int = 0
    analyses_finished: int = 0
    duplicate_analyses: int = 0
    early_analyses: int = 0
    results_expected: int = 0
    results_missing: int = 0
    results_duplicated: int = 0
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """The result as a plain dict."""
        return dict(self.__dict__)


def _syscalls(pids: Sequence[int]) -> set[str]:
    """The system call numbers the threads of *pids* are in right now."""
    numbers: set[str] = set()
    for pid in pids:
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                numbers.add((task / "syscall").read_text().split(" ", 1)[0])
            except OSError:
                continue  # the thread ended, or no permission: we just do not see it
    return numbers


def observe(node: NodeProcess, peers: Sequence[Peer | DcmtkPeer]) -> list[str]:
    """What the node was doing when it was killed, from its state database (which the kill
    froze) and the *peers* that were still sending just before it: receive, assembly,
    inference, sending."""
    seen: list[str] = []
    if any(p.is_alive() for p in peers):
        seen.append("receive")
    states = {str(s) for (s,) in node.query("SELECT state FROM series")}
    if "receiving" in states:
        seen.append("assembly")
    jobs = {str(s) for (s,) in node.query("SELECT state FROM jobs")}
    if "processing" in jobs:
        seen.append("inference")
    if ("sending",) in node.query("SELECT state FROM outbound"):
        seen.append("sending")
    return seen


def _wait_for_phase(phase: str, node: NodeProcess, peers: Sequence[Peer | DcmtkPeer],
                    rng: random.Random,
                    total: int, timeout_s: float = 60.0) -> bool:
    """Return at the moment the kill should fall for *phase*; True when a node thread is
    inside fsync(2) at that moment (the kill must follow at once)."""
    deadline = time.monotonic() + timeout_s

    def acked() -> int:
        return sum(len(p.acked) for p in peers)

    def until(cond: Any, what: str) -> None:
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f"phase {phase}: timed out waiting for {what}")
            time.sleep(0.002)

    if phase == "receive":
        target = rng.randint(max(1, total // 10), max(2, total * 8 // 10))
        until(lambda: acked() >= target or not any(p.is_alive() for p in peers),
              f"{target} acknowledgements")
    elif phase == "fsync":
        target = rng.randint(1, max(2, total // 2))
        until(lambda: acked() >= target, f"{target} acknowledgements")
        pids = node.pids()
        # Chase an fsync; a short series may end first: then it is a receive-phase kill.
        until(lambda: bool(FSYNC_SYSCALLS & _syscalls(pids))
              or not any(p.is_alive() for p in peers), "an fsync")
        return any(p.is_alive() for p in peers)
    elif phase == "assembly":
        until(lambda: not any(p.is_alive() for p in peers), "the peers to finish")
        time.sleep(rng.uniform(0.0, 0.4))
    elif phase == "inference":
        until(lambda: ("processing",) in node.query("SELECT state FROM jobs"), "a running job")
        time.sleep(rng.uniform(0.0, ANALYZER_DELAY_S * 1.2))
    elif phase == "sending":
        until(lambda: ("sending",) in node.query("SELECT state FROM outbound"), "a send")
        time.sleep(rng.uniform(0.0, SLOW_DESTINATION_S * 1.3))
    else:
        raise ValueError(f"unknown phase {phase!r}; one of {PHASES}")
    return False


def read_ledger(path: Path) -> list[dict[str, Any]]:
    """The ledger analyzer's lines."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def node_is_idle(node: NodeProcess, n_series: int) -> bool:
    """Every series analysed and every result sent (or dead)."""
    series = node.query("SELECT state FROM series")
    if len(series) < n_series or any(s not in ("done", "failed") for (s,) in series):
        return False
    if node.query("SELECT 1 FROM jobs WHERE state IN ('ready', 'processing')"):
        return False
    return not node.query("SELECT 1 FROM outbound WHERE state IN ('queued', 'sending')")


def state_summary(node: NodeProcess) -> dict[str, Any]:
    """Series, jobs and outbound rows by state (for failure messages and reports)."""
    return {table: dict(node.query(f"SELECT state, COUNT(*) FROM {table} GROUP BY state"))
            for table in ("series", "jobs", "outbound")}


def check_invariants(node: NodeProcess, series: Sequence[SeriesOnDisk], acked: set[str],
                     receivers: dict[str, Receiver], ledger: Path, result: TrialResult,
                     duplicates_allowed: bool) -> None:
    """Hold the idle node to its promises; append what is broken to ``result.problems``."""
    problems = result.problems
    rows = {str(uid): str(path) for uid, path in node.query(
        "SELECT sop_uid, path FROM instances")}
    lost = sorted(acked - rows.keys())
    result.lost = len(lost)
    if lost:
        problems.append(f"{len(lost)} acknowledged instances lost, e.g. {lost[0]}")
    for uid, path in rows.items():
        if not Path(path).is_file():
            problems.append(f"row without file: {uid}")
    files = {str(p) for p in (node.spool / "instances").rglob("*.dcm")}
    orphans = files - set(rows.values())
    if orphans:
        problems.append(f"{len(orphans)} spooled files without a row")
    partial = list((node.spool / "tmp").iterdir())
    if partial:
        problems.append(f"{len(partial)} partial writes left in tmp/")
    stuck = node.query("SELECT 'series', state FROM series WHERE state NOT IN ('done', 'failed')"
                       " UNION ALL SELECT 'job', state FROM jobs WHERE state NOT IN"
                       " ('done', 'failed') UNION ALL SELECT 'outbound', state FROM outbound"
                       " WHERE state != 'sent'")
    if stuck:
        problems.append(f"rows not in a final state: {stuck}")

    entries = read_ledger(ledger)
    result.analyses_started = sum(1 for e in entries if e["event"] == "start")
    result.analyses_finished = sum(1 for e in entries if e["event"] == "end")
    result.series = len(series)
    for s in series:
        n = len(s.files)
        jobs = node.query("SELECT id, state, instance_count FROM jobs WHERE series_uid = ?",
                          (s.series_uid,))
        done = [j for j in jobs if j[1] == "done" and j[2] == n]
        result.done_jobs += len(done)
        # A series cut by the kill and quiet for longer than assembly.quiet_seconds before
        # the re-send is analysed as it was, then again whole (a late-instance re-run).
        result.early_analyses += sum(1 for j in jobs if j[1] == "done" and j[2] < n)
        if len(done) != 1:
            problems.append(f"series {s.series_uid}: done jobs {done}, expected one of {n} "
                            f"instances (all jobs: {jobs})")
            continue
        job_id = done[0][0]
        report = node.spool / "jobs" / f"{job_id}.json"
        if not report.is_file() or json.loads(report.read_text())["state"] != "done":
            problems.append(f"job {job_id}: no done report")
        finished = [e for e in entries if e["event"] == "end" and e["instances"] == n
                    and e["series_dir"].endswith(s.series_uid)]
        if not finished:
            problems.append(f"series {s.series_uid}: the ledger shows no finished analysis")
        result.duplicate_analyses += max(0, len(finished) - 1)
        outbound = node.query("SELECT destination, files FROM outbound WHERE job_id = ?",
                              (job_id,))
        if sorted(d for d, _ in outbound) != sorted(receivers):
            problems.append(f"job {job_id}: outbound rows {outbound}, expected one per "
                            f"destination")
        for dest, files_json in outbound:
            for path in json.loads(files_json):
                uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
                result.results_expected += 1
                got = receivers[dest].received.get(uid, 0)
                if got == 0:
                    result.results_missing += 1
                    problems.append(f"result {uid} never reached {dest}")
                elif got > 1:
                    result.results_duplicated += got - 1
    if result.duplicate_analyses and "inference" not in result.observed:
        problems.append(f"{result.duplicate_analyses} series analysed to the end twice, though "
                        f"the kill did not hit an analysis ({result.observed})")
    if result.results_duplicated and not duplicates_allowed:
        problems.append(f"{result.results_duplicated} results delivered twice, though the kill "
                        f"did not hit a send ({result.observed})")


def run_kill_trial(workdir: Path, phase: str, seed: int, peers: int = 3, slices: int = 20,
                   rows: int = 64, settle_timeout_s: float = 90.0,
                   keep_log: Path | None = None, dcmtk_peers: int = 1) -> TrialResult:
    """One kill -9 trial in *workdir*; see the module docstring. The first *dcmtk_peers*
    peers are dcmtk's storescu (when installed), the others pynetdicom. The node's log is
    copied into *keep_log* when the trial found a problem or failed."""
    started = time.monotonic()
    rng = random.Random(seed)
    result = TrialResult(seed=seed, phase=phase)
    series = [write_series(workdir / "in" / f"peer{i}", slices, rows=rows, seed=seed * 100 + i)
              for i in range(peers)]
    receivers = {name: Receiver(free_port()) for name in DESTINATIONS}
    if phase == "sending":
        for rec in receivers.values():
            rec.delay_s = SLOW_DESTINATION_S
    ledger = workdir / "ledger.jsonl"
    node = NodeProcess(
        workdir, analyzer=LEDGER_ANALYZER,
        analyzer_delay=ANALYZER_DELAY_S if phase == "inference" else 0.0,
        destinations={name: rec.port for name, rec in receivers.items()},
        # After a restart a series still receiving waits a whole quiet period for the rest
        # (node.assembler.resume); the release of the re-send ends it early.
        overrides={"assembly": {"quiet_seconds": 5.0, "release_grace_seconds": 0.5}},
        env={"ICH_TEST_LEDGER": str(ledger)})
    for rec in receivers.values():
        rec.start()
    try:
        node.start()
        n_dcmtk = dcmtk_peers if Path(STORESCU).exists() else 0
        senders: list[Peer | DcmtkPeer] = [
            (DcmtkPeer if i < n_dcmtk else Peer)(f"CT{i}", node.port, s.files)
            for i, s in enumerate(series)]
        kill_at = time.monotonic()
        for peer in senders:
            peer.start()
        in_fsync = _wait_for_phase(phase, node, senders, rng, total=peers * slices)
        receiving = [p for p in senders if p.is_alive()]
        node.kill9()
        result.observed = (["fsync"] if in_fsync else []) + observe(node, receiving)
        result.kill_after_s = round(time.monotonic() - kill_at, 3)
        # Durable before any recovery: the files are the truth (node.db). A peer still
        # waiting for a response got none, so what it holds acknowledged is final now.
        on_disk = {p.stem for p in (node.spool / "instances").rglob("*.dcm")}
        acked = set().union(*(p.acked for p in senders))
        if acked - on_disk:
            result.problems.append(f"{len(acked - on_disk)} acknowledged instances have no "
                                   f"file right after the kill")
        node.env["ICH_TEST_ANALYZER_DELAY"] = "0"
        for rec in receivers.values():
            rec.delay_s = 0.0
        node.start()
        for peer in senders:
            peer.join(PEER_TIMEOUT_S * 3)
        acked = set().union(*(p.acked for p in senders))
        result.acked_before_kill = len(acked)
        for i, s in enumerate(series):
            for attempt in (1, 2):  # a PACS retries a failed transfer; the first must not fail
                try:
                    statuses = resend(node.port, s.files, f"CT{i}", i < n_dcmtk)
                except (RuntimeError, AssertionError) as exc:  # association lost or refused
                    statuses = [None]
                    result.problems.append(f"re-send {attempt} of series {i}: {exc}")
                if statuses == [0] * len(s.files):
                    break
                result.problems.append(f"re-send {attempt} of series {i}: statuses "
                                       f"{Counter(statuses)}")
        acked_all = acked | {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID)
                             for s in series for f in s.files}
        result.acked_total = len(acked_all)
        try:
            wait_until(lambda: node_is_idle(node, len(series)), settle_timeout_s,
                       what="the node to finish after the restart")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; state: {state_summary(node)}\n"
                                 f"{node.log_text()[-3000:]}") from None
        check_invariants(node, series, acked_all, receivers, ledger, result,
                         duplicates_allowed="sending" in result.observed)
    finally:
        node.stop()
        for rec in receivers.values():
            rec.stop()
        if keep_log is not None and (result.problems or sys.exc_info()[0] is not None):
            keep_log.mkdir(parents=True, exist_ok=True)
            shutil.copy(node.log, keep_log / f"trial-{seed}-{phase}.log")
    result.seconds = round(time.monotonic() - started, 2)
    return result
