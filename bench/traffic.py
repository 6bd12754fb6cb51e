"""Shared parts of ``bench/load.py`` and ``bench/soak.py``: studies with fresh UIDs for every
send, senders, a node under test in its own process, and process-tree sampling.

The node runs as ``python -m tests.helpers.run_node`` (:class:`tests.helpers.nodeproc.NodeProcess`)
with either the real pipeline (``--analyzer real``: ``pipeline.analyze:Analyzer`` with the
shipped demo weights, on phantom head CTs) or the test analyzer (``--analyzer test``: one
8×8 Secondary Capture per series, no models, on synthetic CT slices): the second measures
the node (receive, spool, queue, send) without the models' CPU time.
"""

from __future__ import annotations

import datetime
import logging
import os
import platform
import sys
import threading
import time
from collections.abc import Sequence
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import psutil  # noqa: E402
from pydicom import Dataset, dcmread  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402
from pynetdicom import AE, evt  # noqa: E402

from node.sender import await_reactor_resumed  # noqa: E402
from tests.helpers.net import _nodelay  # noqa: E402
from tests.helpers.receiver import Receiver  # noqa: E402

LOGGER = logging.getLogger("bench.traffic")
ANALYZERS = {"real": "pipeline.analyze:Analyzer", "test": "tests.helpers.analyzers:summary"}
BENCH_ROOT = "1.2.826.0.1.3680043.8.498.97."


def templates(kind: str, workdir: Path, n: int, slices: int, rows: int, seed: int = 0
              ) -> list[list[Dataset]]:
    """*n* template studies in memory: phantom head CTs for the real analyzer, synthetic
    slices for the test analyzer."""
    if kind == "real":
        from pipeline.phantom import write_studies

        studies = write_studies(workdir / "phantom", n, seed=seed, slices=slices, matrix=rows)
        return [[dcmread(p) for p in sorted((s.study_dir / "dicom").glob("*.dcm"))]
                for s in studies]
    from tests.helpers.ctseries import write_series

    return [[dcmread(p) for p in write_series(workdir / f"t{i}", slices, rows=rows,
                                              seed=seed + i).files] for i in range(n)]


def renamed(study: Sequence[Dataset], tag: str) -> list[Dataset]:
    """A copy of *study* with new Study, Series, SOP Instance and Frame of Reference UIDs
    derived from *tag* (so each send is a new study for the node)."""
    first = study[0]
    study_uid = generate_uid(BENCH_ROOT, entropy_srcs=[tag, "study"])
    series_uid = generate_uid(BENCH_ROOT, entropy_srcs=[tag, str(first.SeriesInstanceUID)])
    frame_uid = generate_uid(BENCH_ROOT, entropy_srcs=[tag, "frame"])
    out = []
    for ds in study:
        copy = deepcopy(ds)  # Dataset.copy() shares its elements: the template would change
        sop = generate_uid(BENCH_ROOT, entropy_srcs=[tag, str(ds.SOPInstanceUID)])
        copy.StudyInstanceUID, copy.SeriesInstanceUID = study_uid, series_uid
        copy.SOPInstanceUID = copy.file_meta.MediaStorageSOPInstanceUID = sop
        if "FrameOfReferenceUID" in copy:
            copy.FrameOfReferenceUID = frame_uid
        out.append(copy)
    return out


@dataclass
class Sent:
    """One study sent: its UID, statuses, when the last response came, and why the
    association ended early (empty when it did not)."""

    study_uid: str
    statuses: list[int | None]
    started: float
    finished: float
    error: str = ""


def send_study(port: int, study: Sequence[Dataset], calling_ae: str) -> Sent:
    """C-STORE *study* in one association (Nagle off); statuses of every instance."""
    ae = AE(ae_title=calling_ae)
    # A short DIMSE timeout and a re-send (counted) keep the benchmark moving if a response
    # is lost anyway (pynetdicom's requestor race: node.sender.await_reactor_resumed).
    ae.dimse_timeout = 15
    ae.network_timeout = 60
    syntax = str(study[0].file_meta.TransferSyntaxUID)
    ae.add_requested_context(str(study[0].SOPClassUID),
                             [syntax] if syntax == ExplicitVRLittleEndian
                             else [syntax, ExplicitVRLittleEndian])
    started = time.time()
    assoc = ae.associate("127.0.0.1", port, ae_title="ICH_NODE",
                         evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)])
    statuses: list[int | None] = []
    error = "" if assoc.is_established else "association not established"
    if assoc.is_established:
        try:
            for index, ds in enumerate(study):
                if index:
                    await_reactor_resumed(assoc)  # pynetdicom's requestor race (node.sender)
                if not assoc.is_established:
                    error = (f"association ended after {len(statuses)} of {len(study)} "
                             f"instances ({'aborted' if assoc.is_aborted else 'closed'})")
                    LOGGER.error("%s: study %s", error, study[0].StudyInstanceUID)
                    break
                statuses.append(getattr(assoc.send_c_store(ds), "Status", None))
        finally:
            if assoc.is_established:
                assoc.release()
    return Sent(str(study[0].StudyInstanceUID), statuses, started, time.time(), error)


def send_until_stored(port: int, study: Sequence[Dataset], calling_ae: str,
                      attempts: int = 3) -> tuple[Sent, list[str]]:
    """:func:`send_study`, the whole study again (as a PACS retries a failed transfer) while
    an association ends early or an instance is refused; the last try and the errors."""
    errors: list[str] = []
    for _ in range(attempts):
        sent = send_study(port, study, calling_ae)
        if not sent.error and sent.statuses == [0] * len(study):
            break
        errors.append(sent.error or f"statuses {sorted(set(map(str, sent.statuses)))}")
    return sent, errors


def log_to(path: Path) -> None:
    """Send this process's log (pynetdicom's INFO lines included: aborts, timeouts) to
    *path*, for the diagnosis of a lost association."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(threadName)s "
                                           "%(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("pynetdicom").setLevel(logging.INFO)


class TimedReceiver(Receiver):
    """A :class:`Receiver` that keeps, per study, when its first result arrived, and
    forgets the data sets (a long soak would hold them all)."""

    def __init__(self, port: int) -> None:
        super().__init__(port)
        self.first_result: dict[str, float] = {}

    def _on_store(self, event: evt.Event) -> int:
        ds = event.dataset
        with self._lock:
            self.received[str(ds.SOPInstanceUID)] += 1
            self.first_result.setdefault(str(ds.StudyInstanceUID), time.time())
        return 0


@dataclass
class Sample:
    """Memory and descriptors of the node's process tree at one moment."""

    t: float
    rss_mib: dict[str, float] = field(default_factory=dict)
    fds: dict[str, int] = field(default_factory=dict)

    @property
    def total_rss_mib(self) -> float:
        """RSS of node and worker together, MiB."""
        return sum(self.rss_mib.values())

    @property
    def total_fds(self) -> int:
        """Open file descriptors of node and worker together."""
        return sum(self.fds.values())


def sample_tree(pid: int) -> Sample:
    """RSS and open file descriptors of *pid* ("node") and its children ("worker", ...)."""
    sample = Sample(time.time())
    try:
        root = psutil.Process(pid)
        procs = [("node", root)] + [(f"worker{i or ''}", c) for i, c in
                                    enumerate(root.children(recursive=True))]
        for name, proc in procs:
            sample.rss_mib[name] = round(proc.memory_info().rss / 2**20, 1)
            sample.fds[name] = proc.num_fds()
    except psutil.NoSuchProcess:
        pass  # the tree changed under us (a worker restart): a partial sample
    return sample


class Sampler(threading.Thread):
    """Samples the node's process tree every *interval_s* until stopped."""

    def __init__(self, pid: int, interval_s: float) -> None:
        super().__init__(name="sampler", daemon=True)
        self.pid = pid
        self.interval_s = interval_s
        self.samples: list[Sample] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while True:
            self.samples.append(sample_tree(self.pid))
            if self._stop_event.wait(self.interval_s):
                return

    def stop(self) -> None:
        self._stop_event.set()
        self.join(10)


def machine() -> dict[str, Any]:
    """Where and when a benchmark ran."""
    return {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "host": platform.node(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "python": platform.python_version(),
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def percentile(values: Sequence[float], q: float) -> float:
    """The *q*-quantile (0..1) of *values*, nearest rank."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]
