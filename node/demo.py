"""``ich-node demo``: the whole node on one machine, no PACS needed.

In a working folder it starts a node (the real pipeline, a short quiet period) and a local
result receiver (a Storage SCP that writes what it gets to disk: the "PACS"), generates
phantom head CT studies with known truth (a negative one and one per hemorrhage subtype),
sends each over a real DICOM association, waits until every SR, SEG and preview has
arrived at the receiver, and prints a table of the findings, read back from the received
SRs, against the truth, and where the files are.

Exit status: 0 when the demo ran (a finding that does not match the truth is shown, not
fatal: the shipped weights are demo weights); 1 when something failed (a job failed,
results did not arrive in time).
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from node.config import Destination, NodeConfig
from node.spool import safe_name

LOGGER = logging.getLogger(__name__)

# case name -> phantom request (None: negative). Sizes are typical of what a triage
# tool must catch; the truth is what the phantom actually painted (measured volume).
CASES: dict[str, str | None] = {
    "negative": None,
    "epidural": "epidural:30",
    "subdural": "subdural:30",
    "subarachnoid": "subarachnoid:15",
    "intraparenchymal": "intraparenchymal:20",
    "intraventricular": "intraventricular:8",
}
STATUS_OUT_OF_RESOURCES = 0xA700  # PS3.4 B.2.3: Refused, out of resources
RECEIVER_AE = "DEMO_PACS"
SCANNER_AE = "DEMO_CT"


class DemoError(Exception):
    """The demo could not run to the end (a job failed, results did not arrive)."""


@dataclass
class Received:
    """One object the receiver stored."""

    study_uid: str
    modality: str
    sop_class_uid: str
    path: Path


@dataclass
class ResultReceiver:
    """A Storage SCP on 127.0.0.1 that writes every object it gets under *folder*
    (``<study>/<modality>_<sop>.dcm``): the demo's stand-in for PACS."""

    folder: Path
    ae_title: str = RECEIVER_AE
    received: list[Received] = field(default_factory=list)
    _server: ThreadedAssociationServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _on_store(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        study, sop = str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)
        path = self.folder / safe_name(study) / f"{ds.Modality}_{safe_name(sop)}.dcm"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(path, enforce_file_format=True)
        except OSError as exc:
            LOGGER.error("receiver: cannot write %s from %s: %s", sop,
                         event.assoc.requestor.ae_title, exc)
            return STATUS_OUT_OF_RESOURCES
        with self._lock:
            self.received.append(Received(study, str(ds.Modality), str(ds.SOPClassUID), path))
        return 0x0000

    def start(self) -> int:
        """Listen on a free port; return it."""
        ae = AE(ae_title=self.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)
        server = ae.start_server(("127.0.0.1", 0), block=False,
                                 evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        assert server is not None, "start_server(block=False) returns the server"
        self._server = server
        return int(server.server_address[1])

    def stop(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def of_study(self, study_uid: str) -> list[Received]:
        """What arrived for one study."""
        with self._lock:
            return [r for r in self.received if r.study_uid == study_uid]


@dataclass
class DemoStudy:
    """One generated study and its truth."""

    name: str
    study_uid: str
    files: list[Path]
    truth_ml: dict[str, float]  # subtype -> painted volume; empty for a negative


def demo_config(base: NodeConfig, workdir: Path, receiver_port: int, quiet_s: float,
                verbose: bool) -> NodeConfig:
    """The node's config for the demo: *base* (file, environment) with a spool in
    *workdir*, loopback on a free port, no HTTP endpoint, the receiver as only destination."""
    data = base.model_dump(mode="json")
    overrides: dict[str, dict[str, Any]] = {
        "dicom": {"host": "127.0.0.1", "port": 0, "allowed_calling_aes": [],
                  "allowed_networks": []},
        "spool": {"path": str(workdir / "spool"), "min_free_mb": 64},
        "http": {"port": 0},
        "assembly": {"quiet_seconds": quiet_s, "quiet_seconds_by_ae": {}},
        "outbound": {"backoff_initial_s": 1.0, "calling_ae_title": None},
        "worker": {"poll_interval_s": 0.2},
        "logging": {"level": "INFO" if verbose else "WARNING"},
    }
    for section, values in overrides.items():
        data[section] = {**data[section], **values}
    data["destinations"] = [{"name": "demo_pacs", "ae_title": RECEIVER_AE, "host": "127.0.0.1",
                             "port": receiver_port}]
    return NodeConfig.model_validate(data)


def make_study(folder: Path, name: str, seed: int, slices: int, matrix: int) -> DemoStudy:
    """Generate the phantom study of case *name* and write its CT series into *folder*."""
    from pipeline.phantom import generate_study, write_dicom_series

    request = CASES[name]
    study = generate_study(seed, subtypes=[request] if request else [], slices=slices,
                           matrix=matrix)
    files = write_dicom_series(study, folder / name)
    return DemoStudy(name, study.identity.study_instance_uid, files,
                     {k: round(v, 1) for k, v in study.volume_ml().items()})


def send_study(config: NodeConfig, node_port: int, study: DemoStudy) -> None:
    """C-STORE one study to the node over one association, as a scanner would."""
    from node.sender import SendError, send_files

    scanner = config.model_copy(update={"outbound": config.outbound.model_copy(
        update={"calling_ae_title": SCANNER_AE})})
    node = Destination(name="node", ae_title=config.dicom.ae_title, host="127.0.0.1",
                       port=node_port)
    try:
        send_files(scanner, node, [str(p) for p in study.files])
    except SendError as exc:
        raise DemoError(f"sending study {study.name} to the node failed: {exc}") from exc


def wait_for_results(node: Any, expected_jobs: int, timeout_s: float) -> None:
    """Until every job is done and its results sent; DemoError on a failed job, a dead
    letter or the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        jobs, outbound = node.jobs.counts(), node.outbound.counts()
        if jobs.get("failed"):
            raise DemoError(f"{jobs['failed']} job(s) failed: see `ich-node status --spool "
                            f"{node.config.spool.path}` and the job reports in "
                            f"{node.config.spool.path / 'jobs'}")
        if outbound.get("dead"):
            raise DemoError(f"{outbound['dead']} result set(s) could not be delivered")
        if jobs.get("done") == expected_jobs and outbound.get("sent") == expected_jobs:
            return
        if time.monotonic() > deadline:
            raise DemoError(f"results did not arrive within {timeout_s:.0f} s (jobs {jobs}, "
                            f"outbound {outbound})")
        time.sleep(0.2)


def judge(truth_ml: dict[str, float], positive: bool, top: str) -> str:
    """``yes``: right call and, for a bleed, the true subtype has the highest probability;
    ``partly``: bleed found but another subtype ranks first; ``NO``: wrong call."""
    if not truth_ml:
        return "NO" if positive else "yes"
    if not positive:
        return "NO"
    return "yes" if top in truth_ml else "partly"


def result_rows(studies: Sequence[DemoStudy], receiver: ResultReceiver
                ) -> tuple[list[dict[str, Any]], str | None]:
    """One row per study from the SR that arrived, and the SR's demo-weights statement."""
    from sr_writer.readback import read_sr

    rows: list[dict[str, Any]] = []
    warning: str | None = None
    for study in studies:
        got = receiver.of_study(study.study_uid)
        srs = [r for r in got if r.modality == "SR"]
        if len(srs) != 1:
            raise DemoError(f"study {study.name}: {len(srs)} SR(s) arrived, expected 1")
        reported = read_sr(dcmread(srs[0].path))
        warning = warning or reported.demo_warning
        top = reported.top_subtypes(2)
        rows.append({
            "study": study.name,
            "truth": ", ".join(f"{s} {v:g} mL" for s, v in study.truth_ml.items()) or "negative",
            "finding": "POSITIVE" if reported.positive else "negative",
            "top": ", ".join(f"{s} {p:.2f}" for s, p in top),
            "volume": sum(reported.volumes_ml.values()),
            "match": judge(study.truth_ml, reported.positive, top[0][0]),
            "sr": srs[0].path,
            "seg": [r.path for r in got if r.modality == "SEG"],
            "previews": [r.path for r in got if r.modality not in ("SR", "SEG")],
        })
    return rows, warning


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The findings table and the result files."""
    header = (f"{'study':<17} {'truth':<23} {'AI finding':<10} {'top subtypes (p)':<42} "
              f"{'vol mL':>6}  match")
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(f"{row['study']:<17} {row['truth']:<23} {row['finding']:<10} "
                     f"{row['top']:<42} {row['volume']:>6.1f}  {row['match']}")
    lines += ["", "DICOM results received (SR, SEG, previews) per study:"]
    for row in rows:
        seg = str(row["seg"][0]) if row["seg"] else "(no SEG: nothing segmented)"
        folder = Path(row["sr"]).parent
        lines += [f"  {row['study']}: {folder}/",
                  f"      SR   {Path(row['sr']).name}",
                  f"      SEG  {Path(seg).name if row['seg'] else seg}",
                  f"      preview images: {len(row['previews'])}"]
    return "\n".join(lines)


def run_demo(base: NodeConfig, workdir: Path | None, cases: Sequence[str], seed: int,
             slices: int, matrix: int, quiet_s: float, timeout_s: float,
             verbose: bool = False) -> int:
    """Run the demo and print its report; 0 when it ran, 1 when something failed."""
    from node.app import Node
    from node.logs import setup_logging
    from pipeline.analyze import model_identity

    started = time.monotonic()
    workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="ich-node-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    receiver = ResultReceiver(workdir / "received")
    config = demo_config(base, workdir, receiver.start(), quiet_s, verbose)
    setup_logging(config.logging)
    model = model_identity(config.pipeline)
    print(f"ich-node demo in {workdir}")
    if model is None or model.demo:
        print("WARNING: DEMO WEIGHTS trained on synthetic phantom data only - not for "
              "clinical use.")
    node = Node(config)
    try:
        node.start()
        print(f"node {config.dicom.ae_title} listening on 127.0.0.1:{node.port} (quiet "
              f"period {quiet_s:g} s); result receiver {RECEIVER_AE} on 127.0.0.1:"
              f"{config.destinations[0].port}")
        print(f"generating {len(cases)} phantom studies ({slices} slices of {matrix} x "
              f"{matrix}) in {workdir / 'studies'} and sending each as {SCANNER_AE} ...")
        studies: list[DemoStudy] = []
        for index, name in enumerate(cases):  # the node analyses one while the next is made
            studies.append(make_study(workdir / "studies", name, seed + index, slices, matrix))
            send_study(config, node.port, studies[-1])
        print(f"sent; waiting for {len(studies)} results ...")
        wait_for_results(node, len(studies), timeout_s)
        rows, warning = result_rows(studies, receiver)
    except DemoError as exc:
        print(f"ich-node demo FAILED: {exc}")
        return 1
    finally:
        node.stop()
        receiver.stop()
    print()
    print(format_table(rows))
    matched = sum(row["match"] == "yes" for row in rows)
    partly = sum(row["match"] == "partly" for row in rows)
    print(f"\n{matched} of {len(rows)} match the truth, {partly} partly (bleed found, another "
          f"subtype ranked first), {len(rows) - matched - partly} wrong.")
    print(f"SR statement: {warning or '(none)'}")
    print(f"spool (state, job reports): {config.spool.path}; `ich-node status --spool "
          f"{config.spool.path}` lists the jobs.")
    print(f"finished in {time.monotonic() - started:.1f} s")
    return 0
