"""End-to-end latency benchmark (issue 7): last C-STORE in, SR stored in PACS.

Orthanc (``tests/helpers/orthanc.py``, its own config) is the PACS and the node's only
destination; the node runs as ``ich-node run`` in a subprocess with the real pipeline and
the shipped weights. For each repetition a fresh 40-slice 512 x 512 phantom study (a
20 mL intraparenchymal bleed, so the node writes SR, SEG and previews) is sent by a
pynetdicom SCU in one association. The clock starts when the last C-STORE response
arrives and stops when Orthanc's REST API lists an SR in the study (polled every 50 ms).

Where the time goes comes from the node's state database (wall-clock timestamps on the
same machine): assembly wait (last instance -> job created: the quiet period, or the
release grace when the sender releases its association), queue pickup, analysis
(selection, volume, both models, writing SR/SEG/previews), and delivery (job finished
-> SR listed by Orthanc: outbound poll, association, C-STORE of the SR, Orthanc's index).

Two assembly modes: ``release``: the defaults (quiet period 5 s, an association release
triggers a check after ``release_grace_seconds`` = 1 s); ``quiet``: the release check off
(``release_grace_seconds: null``), so the full quiet period applies, as with a sender that
keeps its association open. The first study after start is reported apart (cold worker).

Run: ``.venv/bin/python bench/latency.py`` (about 3 minutes on two cores); ``--reps N``,
``--modes release quiet``, ``--slices``, ``--matrix``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.ingest import machine  # noqa: E402
from tests.helpers.net import free_port  # noqa: E402
from tests.helpers.orthanc import OrthancServer  # noqa: E402

QUIET_S = 5.0  # node.config.AssemblyConfig.quiet_seconds default
PHASES = ("assembly", "pickup", "analysis", "delivery")
# Inside the analysis, from the job report (findings.timings_s); "results" is the rest:
# headers, SR, SEG and preview objects, and writing them to the spool.
STEPS = ("volume", "preprocess", "classifier", "segmenter", "lesions", "results")


@dataclass
class Run:
    """One study: the phases (s) and the total from the last C-STORE to the SR in PACS."""

    mode: str
    total: float
    phases: dict[str, float]
    steps: dict[str, float]
    cold: bool

    @property
    def after_assembly(self) -> float:
        """What the node adds on top of the assembly wait."""
        return self.total - self.phases["assembly"]


def write_study(folder: Path, seed: int, slices: int, matrix: int) -> tuple[str, list[Path]]:
    """A phantom study with a 20 mL intraparenchymal bleed; returns (study UID, files)."""
    from pipeline.phantom import generate_study, write_dicom_series

    study = generate_study(seed, subtypes=["intraparenchymal:20"], slices=slices, matrix=matrix)
    return study.identity.study_instance_uid, write_dicom_series(study, folder)


class NodeProcess:
    """``ich-node run`` in a subprocess with the real pipeline, Orthanc as destination."""

    def __init__(self, workdir: Path, orthanc: OrthancServer, mode: str) -> None:
        self.port = free_port()
        self.spool = workdir / "spool"
        config: dict[str, Any] = {
            "dicom": {"host": "127.0.0.1", "port": self.port},
            "spool": {"path": str(self.spool), "min_free_mb": 64},
            "http": {"port": 0},
            "assembly": {"quiet_seconds": QUIET_S,
                         "release_grace_seconds": 1.0 if mode == "release" else None},
            "destinations": [{"name": "orthanc", "ae_title": orthanc.aet, "host": "127.0.0.1",
                              "port": orthanc.dicom_port}],
            "logging": {"level": "WARNING"},
        }
        self.config_path = workdir / "node.yaml"
        self.config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "node.cli", "run", "--config", str(self.config_path)],
            cwd=REPO, stdin=subprocess.DEVNULL)
        self._wait_listening()

    def _wait_listening(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the node exited with {self.process.returncode} at start")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"the node did not listen on {self.port} within {timeout_s:.0f} s")

    def phases(self, study_uid: str, t_last: float, t_sr: float
               ) -> tuple[dict[str, float], dict[str, float]]:
        """The phases of the (only) job of *study_uid*, from the state database, and the
        steps of its analysis, from its job report."""
        with sqlite3.connect(f"file:{self.spool / 'state.db'}?mode=ro", uri=True) as db:
            job = db.execute("SELECT id, created_at, started_at, finished_at FROM jobs "
                             "WHERE study_uid = ? AND state = 'done'", (study_uid,)).fetchone()
        if job is None:
            raise RuntimeError(f"no finished job for study {study_uid}")
        job_id, created, started, finished = job
        report = json.loads((self.spool / "jobs" / f"{job_id}.json").read_text())
        timings = report["findings"]["timings_s"]
        steps = {k: float(timings.get(k, 0.0)) for k in STEPS[:-1]}
        steps["results"] = (finished - started) - sum(steps.values())
        return ({"assembly": created - t_last, "pickup": started - created,
                 "analysis": finished - started, "delivery": t_sr - finished}, steps)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def sr_listed(orthanc: OrthancServer, study_uid: str) -> bool:
    """Whether Orthanc lists an SR series in the study."""
    study_id = orthanc.find_study(study_uid)
    if study_id is None:
        return False
    return any(s["MainDicomTags"].get("Modality") == "SR"
               for s in orthanc.series_of_study(study_id))


def send_study(port: int, files: Sequence[Path]) -> float:
    """C-STORE *files* in one association (Nagle off); return the wall-clock time at which
    the response to the last C-STORE arrived. Raises RuntimeError on a failed store."""
    from pydicom import dcmread
    from pynetdicom import AE, evt

    from node.sender import set_nodelay

    ae = AE(ae_title="BENCH_CT")
    meta = dcmread(files[0], stop_before_pixels=True).file_meta
    ae.add_requested_context(str(meta.MediaStorageSOPClassUID), [str(meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", port, ae_title="ICH_NODE",
                         evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)])
    if not assoc.is_established:
        raise RuntimeError(f"association to the node on port {port} failed")
    try:
        for path in files:
            status = assoc.send_c_store(path)
            if getattr(status, "Status", None) != 0x0000:
                raise RuntimeError(f"C-STORE of {path.name} failed: {status}")
        return time.time()
    finally:
        assoc.release()


def measure(node: NodeProcess, orthanc: OrthancServer, study_uid: str, files: list[Path],
            mode: str, cold: bool, timeout_s: float = 300.0) -> Run:
    """Send one study and time it until Orthanc lists the SR."""
    t_last = send_study(node.port, files)
    deadline = time.monotonic() + timeout_s
    while not sr_listed(orthanc, study_uid):
        if time.monotonic() > deadline:
            raise RuntimeError(f"no SR in Orthanc for {study_uid} after {timeout_s:.0f} s")
        time.sleep(0.05)
    t_sr = time.time()
    phases, steps = node.phases(study_uid, t_last, t_sr)
    return Run(mode, t_sr - t_last, phases, steps, cold)


def table(runs: Sequence[Run]) -> str:
    """Markdown: per mode the median of the warm runs, every run, and the cold one."""
    lines = ["| mode | runs | assembly wait s | pickup s | analysis s | delivery s | "
             "total s | total - assembly s | target: total - assembly <= 10 s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for mode in dict.fromkeys(r.mode for r in runs):
        warm = [r for r in runs if r.mode == mode and not r.cold]
        for label, group in (("median", warm), ("cold", [r for r in runs
                                                         if r.mode == mode and r.cold])):
            if not group:
                continue
            med = {p: statistics.median(r.phases[p] for r in group) for p in PHASES}
            total = statistics.median(r.total for r in group)
            rest = statistics.median(r.after_assembly for r in group)
            verdict = "met" if rest <= 10 else "MISSED"
            lines.append(f"| {mode} ({label}) | {len(group)} | {med['assembly']:.2f} | "
                         f"{med['pickup']:.2f} | {med['analysis']:.2f} | "
                         f"{med['delivery']:.2f} | {total:.2f} | {rest:.2f} | {verdict} |")
    lines += ["", "Inside the analysis (medians, s):", "",
              "| mode | " + " | ".join(STEPS) + " |", "|---|" + "---:|" * len(STEPS)]
    for mode in dict.fromkeys(r.mode for r in runs):
        for label, cold in (("median", False), ("cold", True)):
            group = [r for r in runs if r.mode == mode and r.cold == cold]
            if group:
                lines.append(f"| {mode} ({label}) | " + " | ".join(
                    f"{statistics.median(r.steps[k] for r in group):.2f}" for k in STEPS)
                    + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="warm runs per mode (default 3)")
    parser.add_argument("--modes", nargs="+", choices=("release", "quiet"),
                        default=["release", "quiet"])
    parser.add_argument("--slices", type=int, default=40)
    parser.add_argument("--matrix", type=int, default=512)
    args = parser.parse_args(argv)

    base = Path(tempfile.mkdtemp(prefix="ich-latency-"))
    runs: list[Run] = []
    seed = 7000
    print(f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {machine()}, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    for mode in args.modes:
        studies = []
        t0 = time.perf_counter()
        for k in range(args.reps + 1):
            seed += 1
            studies.append(write_study(base / mode / f"study{k}", seed, args.slices,
                                       args.matrix))
        print(f"{mode}: wrote {len(studies)} studies of {args.slices} x {args.matrix}^2 in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        with OrthancServer(base / mode / "orthanc") as orthanc:
            node = NodeProcess(base / mode, orthanc, mode)
            try:
                for k, (study_uid, files) in enumerate(studies):
                    run = measure(node, orthanc, study_uid, files, mode, cold=k == 0)
                    runs.append(run)
                    print(f"{mode} {'cold' if run.cold else 'warm'}: total {run.total:.2f} s; "
                          + ", ".join(f"{p} {run.phases[p]:.2f}" for p in PHASES)
                          + " (" + ", ".join(f"{k} {run.steps[k]:.2f}" for k in STEPS) + ")"
                          + f"; load {os.getloadavg()[0]:.1f}", flush=True)
            finally:
                node.stop()
    print()
    print(table(runs))
    print(f"\nload average after the runs: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
