"""The offline twin: ``ich-node analyze`` and the node give the same findings and the same
DICOM results for the same series.

One phantom series goes (a) through ``python -m node.cli analyze DIR --out OUT --json`` as a
subprocess and (b) over a real association (pynetdicom SCU) to a node with the real
analyzer, whose destination is a result receiver. Compared:

* the findings JSON (the CLI's stdout against the node's job report): every key except
  ``timings_s`` (wall times) and ``outputs`` (file paths in one, UIDs in the other; the
  UIDs are compared through the objects below); probabilities to within 1e-6, every
  decision, volume, lesion, warning, the model identity and the series block equal;
* the DICOM objects: the same SOP Instance UIDs (they depend on the input and the weights
  only), and every data element of every object equal, recursively through sequences and
  including the SR content tree and the SEG's pixel data and segment descriptions,
  except the date and time elements that say when the objects were made (``WHEN_MADE``:
  content, series, instance creation, secondary capture and contribution date/time).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, dcmread
from pydicom.sequence import Sequence as DicomSequence

from node.app import Node
from node.worker import REAL_ANALYZER
from pipeline.phantom import generate_study, write_dicom_series
from tests.helpers.net import free_port, pynetdicom_send, wait_until
from tests.helpers.receiver import Receiver

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[2]
WHEN_MADE = {"ContentDate", "ContentTime", "SeriesDate", "SeriesTime", "InstanceCreationDate",
             "InstanceCreationTime", "DateOfSecondaryCapture", "TimeOfSecondaryCapture",
             "ContributionDateTime"}


def comparable(ds: Dataset) -> dict[str, Any]:
    """Every data element of *ds* as ``{keyword or tag: value}``, sequences recursively,
    without the ``WHEN_MADE`` elements."""
    out: dict[str, Any] = {}
    for element in ds:
        name = element.keyword or str(element.tag)
        if name in WHEN_MADE:
            continue
        if isinstance(element.value, DicomSequence):
            out[name] = [comparable(item) for item in element.value]
        else:
            out[name] = element.value
    return out


def _analyze_offline(series_dir: Path, out_dir: Path) -> dict[str, Any]:
    result = subprocess.run([sys.executable, "-m", "node.cli", "analyze", str(series_dir),
                             "--out", str(out_dir), "--json"],
                            capture_output=True, text=True, cwd=REPO, timeout=240)
    assert result.returncode == 0, result.stderr
    findings: dict[str, Any] = json.loads(result.stdout)
    return findings


def _strip(findings: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in findings.items() if k not in ("timings_s", "outputs")}


def test_analyze_and_the_node_give_the_same_findings_and_objects(
        tmp_path: Path, make_node: Callable[..., Node]) -> None:
    study = generate_study(3, subtypes=["subdural:30"], slices=24, matrix=128)
    files = write_dicom_series(study, tmp_path / "series")
    offline = _analyze_offline(tmp_path / "series", tmp_path / "offline")
    offline_files = sorted((tmp_path / "offline").glob("*.dcm"))
    assert offline["positive"] and offline["outputs"]["seg"], offline  # a SEG to compare

    receiver = Receiver(free_port()).start()
    try:
        node = make_node(analyzer=REAL_ANALYZER,
                         destinations=[{"name": "results", "ae_title": receiver.ae_title,
                                        "host": "127.0.0.1", "port": receiver.port}])
        assert pynetdicom_send(node.port, files, calling_ae="TWIN_SCU") == [0] * len(files)
        wait_until(lambda: node.outbound.counts()["sent"] == 1, timeout=240, interval=0.5,
                   what="the node's results at the receiver")
    finally:
        receiver.stop()
    [report_path] = (node.config.spool.path / "jobs").glob("*.json")
    online = json.loads(report_path.read_text())["findings"]

    # findings: equal up to float noise in the probabilities
    a, b = _strip(offline), _strip(online)
    for label in a["labels"]:
        assert a["labels"][label]["positive"] == b["labels"][label]["positive"], label
        assert a["labels"][label]["probability"] == pytest.approx(
            b["labels"][label]["probability"], abs=1e-6), label
    a.pop("labels"), b.pop("labels")
    assert a == b

    # DICOM objects: same UIDs, same content apart from when they were made
    offline_by_uid = {str(ds.SOPInstanceUID): ds for ds in map(dcmread, offline_files)}
    online_by_uid: dict[str, Dataset] = dict(receiver.datasets)  # type: ignore[arg-type]
    assert sorted(offline_by_uid) == sorted(online_by_uid)
    assert sum(receiver.received.values()) == len(offline_files), "each object sent once"
    assert online["outputs"]["sr"] in online_by_uid and online["outputs"]["seg"] in online_by_uid
    kinds = sorted(str(ds.Modality) for ds in online_by_uid.values())
    assert kinds.count("SR") == 1 and kinds.count("SEG") == 1 and "OT" in kinds, kinds
    for uid, offline_ds in offline_by_uid.items():
        online_ds = online_by_uid[uid]
        assert "PixelData" in offline_ds or offline_ds.Modality == "SR"
        assert comparable(offline_ds) == comparable(online_ds), \
            f"{offline_ds.Modality} {uid} differs"
