"""Observability end to end: a real node with an analyzer that writes real SR/SEG/previews,
a real SCU, one destination up and one down. Then: the audit log tells each series' story
without PHI, the metrics count latency, analysis time and errors by kind, and headless
Chromium shows the status page with the study row, its state and its preview image.

``ICH_UPDATE_SCREENSHOT=1`` also writes the screenshot to ``docs/status_page.png``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from pydicom import dcmread

from node.app import Node
from pipeline.phantom import generate_study, write_dicom_series
from tests.helpers.ctseries import write_series
from tests.helpers.net import free_port, pynetdicom_send, wait_until
from tests.helpers.receiver import Receiver

REPO = Path(__file__).resolve().parents[2]
ANALYZER = "tests.helpers.analyzers:with_previews"
PATIENT_NAME = "ZZPROBE^SECRET^MARIE"


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("headless Chromium is not installed (Debian package chromium; `make test` "
                "installs it as root)")


def _get(port: int, path: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as reply:
            return reply.status, reply.headers["Content-Type"], reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


def _metric(node: Node, name: str, **labels: str) -> float:
    node.metrics.render()  # scrape: also observes the jobs the worker finished
    return node.metrics.registry.get_sample_value(name, labels) or 0.0


def _audit_by_series(path: Path) -> dict[str, list[dict[str, Any]]]:
    events: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for line in path.read_text(encoding="ascii").splitlines():
        record = json.loads(line)
        events[record["series_uid"]].append(record)
    return events


@pytest.fixture
def observed_node(make_node: Callable[..., Node], tmp_path: Path
                  ) -> tuple[Node, Receiver, Any, Any, str]:
    """A node that analysed one phantom series (positive, sent to the destination that is
    up, given up for the one that is down) and rejected one short series."""
    receiver = Receiver(free_port()).start()
    down = free_port()
    node = make_node(analyzer=ANALYZER, dicom={"ae_title": "ICH_OBSERVE"},
                     http={"port": free_port()},
                     destinations=[
                         {"name": "pacs", "ae_title": "RESULTS", "host": "127.0.0.1",
                          "port": receiver.port},
                         {"name": "archive", "ae_title": "ARCHIVE", "host": "127.0.0.1",
                          "port": down}],
                     outbound={"max_attempts": 2, "backoff_initial_s": 0.2})
    study = generate_study(23, subtypes=["intraparenchymal:15"], slices=20, matrix=128,
                           patient_name=PATIENT_NAME)
    files = write_dicom_series(study, tmp_path / "phantom")
    patient_id = str(dcmread(files[0], stop_before_pixels=True).PatientID)
    rejected = write_series(tmp_path / "short", 3, rows=32, seed=71, patient_name=PATIENT_NAME)
    try:
        assert pynetdicom_send(node.port, files, calling_ae="CT_SCANNER_1") == [0] * len(files)
        assert pynetdicom_send(node.port, rejected.files, calling_ae="CT_SCANNER_2") == [0] * 3

        def settled() -> bool:
            rows = node.db.query("SELECT state FROM outbound ORDER BY destination")
            return [r["state"] for r in rows] == ["dead", "sent"] and node.db.query(
                "SELECT COUNT(*) AS n FROM jobs WHERE state = 'failed'")[0]["n"] == 1

        wait_until(settled, 120, 0.2, what="results sent to pacs, archive given up, "
                                           "short series failed")
        yield node, receiver, study, rejected, patient_id
    finally:
        receiver.stop()


def test_audit_metrics_and_status_page(observed_node: tuple[Node, Receiver, Any, Any, str],
                                       tmp_path: Path) -> None:
    node, receiver, study, rejected, patient_id = observed_node
    series_uid = study.identity.series_instance_uid
    assert receiver.total() >= 3  # SR, SEG and the previews reached pacs

    # -- audit log: one story per series, owner-only, no PHI ------------------------------
    audit = node.config.spool.path / "audit.jsonl"
    assert stat.S_IMODE(audit.stat().st_mode) == 0o600
    text = audit.read_text(encoding="ascii")
    for secret in (PATIENT_NAME, "ZZPROBE", "SECRET", patient_id):
        assert secret not in text
    by_series = _audit_by_series(audit)
    good = by_series[series_uid]
    assert [e["event"] for e in good[:3]] == ["received", "selected", "analysed"]
    assert good[0]["calling_ae"] == "CT_SCANNER_1" and good[0]["instances"] == 20
    assert good[0]["study_uid"] == study.identity.study_instance_uid
    assert good[2]["outcome"] == "done" and good[2]["positive"] is True
    assert good[2]["top_label"] == "intraparenchymal"
    sends = {(e["destination"], e["outcome"]) for e in good[3:]}
    assert all(e["event"] == "sent" for e in good[3:])
    assert ("pacs", "sent") in sends and ("archive", "dead") in sends
    archive = [e for e in good[3:] if e["destination"] == "archive"]
    assert [e["outcome"] for e in archive] == ["retry", "dead"]
    assert {e["error_kind"] for e in archive} == {"association"}
    bad = by_series[rejected.series_uid]
    assert [e["event"] for e in bad] == ["received", "selected", "analysed"]
    assert bad[2]["outcome"] == "failed" and bad[2]["error_kind"] == "SeriesRejected"
    assert len({e["job_id"] for e in good}) == 1

    # -- metrics -------------------------------------------------------------------------
    assert _metric(node, "ich_node_result_latency_seconds_count", destination="pacs") == 1
    assert _metric(node, "ich_node_result_latency_seconds_count", destination="archive") == 0
    assert _metric(node, "ich_node_job_seconds_count", outcome="done") == 1
    assert _metric(node, "ich_node_job_seconds_count", outcome="failed") == 1
    assert _metric(node, "ich_node_inference_seconds_count", stage="total") == 1
    assert _metric(node, "ich_node_job_failures_total", kind="SeriesRejected") == 1
    assert _metric(node, "ich_node_outbound_errors_total", destination="archive",
                   kind="association") == 2
    assert _metric(node, "ich_node_destination_consecutive_failures", destination="archive") == 2
    assert _metric(node, "ich_node_destination_last_success_timestamp_seconds",
                   destination="pacs") > 0
    # a second scrape observes nothing twice
    assert _metric(node, "ich_node_job_seconds_count", outcome="done") == 1

    # -- the preview endpoint ------------------------------------------------------------
    http = node.http_port
    assert http is not None
    job_id = good[0]["job_id"]
    code, ctype, png = _get(http, f"/preview/{job_id}.png")
    assert code == 200 and ctype == "image/png" and png.startswith(b"\x89PNG\r\n\x1a\n")
    image = Image.open(io.BytesIO(png))
    assert image.mode == "RGB" and min(image.size) >= 128
    assert _get(http, f"/preview/{job_id}/1.png")[0] == 200  # the summary page
    assert _get(http, "/preview/999.png")[0] == 404
    code, _, page = _get(http, f"/studies/{job_id}")
    assert code == 200 and b"intraparenchymal" in page and b"0.930" in page

    # -- the status page in headless Chromium --------------------------------------------
    chromium = _chromium()
    shot = tmp_path / "status_page.png"
    url = f"http://127.0.0.1:{http}/"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1280,900"]
    done = subprocess.run([chromium, *flags, f"--screenshot={shot}", url],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    assert Image.open(shot).size == (1280, 900)
    dom = subprocess.run([chromium, *flags, "--dump-dom", url], capture_output=True,
                         text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert series_uid[-20:] in html and rejected.series_uid[-20:] in html
    assert f'src="/preview/{job_id}.png"' in html
    assert "POSITIVE" in html and "SeriesRejected" in html
    assert ">done<" in html and ">failed<" in html and ">failing<" in html
    for secret in (PATIENT_NAME, "ZZPROBE", "SECRET", patient_id):
        assert secret not in html
    # the browser fetched the preview image and got it
    assert _metric(node, "ich_node_http_requests_total", page="preview", code="200") >= 2
    if os.environ.get("ICH_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(shot, REPO / "docs" / "status_page.png")


def test_status_page_escapes_what_it_shows(make_node: Callable[..., Node]) -> None:
    """Values from the database are HTML-escaped (an error text with markup in it)."""
    node = make_node(http={"port": free_port(), "page_refresh_s": 5})
    with node.db.transaction() as cur:
        cur.execute("INSERT INTO series (series_uid, study_uid, calling_ae, series_dir, state,"
                    " instance_count, first_received_at, last_received_at, last_error)"
                    " VALUES ('1.2.3', '1.2', '<b>AE</b>', '/x', 'failed', 1, 0, 0,"
                    " '<script>alert(1)</script>')")
    http = node.http_port
    assert http is not None
    code, ctype, body = _get(http, "/")
    page = body.decode()
    assert code == 200 and ctype.startswith("text/html")
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;b&gt;AE&lt;/b&gt;" in page
    assert '<meta http-equiv="refresh" content="5">' in page
    assert _get(http, "/studies/12345")[0] == 404
    assert _get(http, "/../../etc/passwd")[0] == 404
