"""The read-only status page served at ``/`` by the node's HTTP endpoint.

For the radiology IT admin who opens ``http://127.0.0.1:9110/`` on the node's host: recent
series with their state, findings, priority, delivery and preview image; queue depths;
destinations and their health. One HTML page with inline CSS, no script and no external
asset; it reloads itself every ``http.page_refresh_s``. Every value from the database is
HTML-escaped. The page shows UIDs and AE titles, never patient names or IDs (the preview
images carry no burned-in identifiers, see :mod:`sr_writer.preview`).

Routes: ``/`` (overview), ``/studies/<job id>`` (one job: every label, lesions, warnings,
timings, delivery, all preview images) and ``/preview/<job id>.png`` (the job's key image,
else its summary page) or ``/preview/<job id>/<instance number>.png``: the preview
Secondary Capture decoded with pydicom and written as PNG with Pillow.
"""

from __future__ import annotations

import datetime as dt
import functools
import html
import io
import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom import dcmread

from node import __version__
from node.config import NodeConfig
from node.db import StateDB, now
from node.http import Reply
from node.jobs import JOB_STATES
from node.monitoring import DestinationHealth, FindingsSummary, summarize_findings
from node.sender import OUTBOUND_STATES

LOGGER = logging.getLogger(__name__)

HTML_TYPE = "text/html; charset=utf-8"
_SC_PREFIX = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage and its family
_PREVIEW_CACHE = 64

_CSS = """
*{box-sizing:border-box}
body{margin:0;font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;
 color:#1d2733;background:#f3f5f8}
header{background:#1d2b3a;color:#fff;padding:12px 24px;display:flex;align-items:baseline;
 gap:18px;flex-wrap:wrap}
header h1{font-size:18px;margin:0;font-weight:600}
header .meta{color:#b9c6d3;font-size:13px}
main{padding:16px 24px 32px}
h2{font-size:15px;margin:22px 0 8px;color:#34475a;text-transform:uppercase;letter-spacing:.04em}
.cards{display:flex;gap:12px;flex-wrap:wrap}
.card{background:#fff;border:1px solid #dde3ea;border-radius:6px;padding:8px 14px;min-width:120px}
.card .n{font-size:22px;font-weight:600}
.card .l{font-size:12px;color:#5d6d7e}
.card.warn .n{color:#b42318}
table{border-collapse:collapse;width:100%;background:#fff;border:1px solid #dde3ea}
th,td{text-align:left;padding:6px 10px;border-bottom:1px solid #e8edf2;vertical-align:top}
th{background:#eef2f6;font-size:12px;color:#45576a;font-weight:600;white-space:nowrap}
tr:last-child td{border-bottom:0}
td.num{text-align:right;font-variant-numeric:tabular-nums}
td.nw{white-space:nowrap}
.uid{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:12px;white-space:nowrap}
.time{white-space:nowrap;font-variant-numeric:tabular-nums}
.muted{color:#6b7b8c;font-size:12px}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600;
 white-space:nowrap}
.s-receiving{background:#e3ecf7;color:#1f4e84}.s-queued{background:#fff1d6;color:#8a5300}
.s-processing{background:#dcebff;color:#0b4fae}.s-done{background:#dff3e4;color:#17663a}
.s-failed,.s-dead,.h-failing{background:#fde4e1;color:#a4190f}
.s-sent,.h-ok{background:#dff3e4;color:#17663a}.s-sending{background:#dcebff;color:#0b4fae}
.h-unknown{background:#eceff3;color:#4a5a6b}
.pos{background:#b42318;color:#fff}.neg{background:#e6ece9;color:#2d5b3f}
.prio{background:#7a2e0e;color:#fff}
.err{color:#a4190f;font-size:12px;max-width:260px;overflow-wrap:anywhere}
img.thumb{height:128px;border-radius:3px;background:#000;display:block;image-rendering:auto}
img.full{max-width:100%;border:1px solid #dde3ea;margin:6px 8px 6px 0;vertical-align:top}
table.fit{width:auto;min-width:560px}
a{color:#0b4fae;text-decoration:none}a:hover{text-decoration:underline}
.empty{padding:16px;color:#6b7b8c;background:#fff;border:1px solid #dde3ea}
dl{display:grid;grid-template-columns:max-content 1fr;gap:4px 16px;background:#fff;
 border:1px solid #dde3ea;padding:10px 14px;margin:0}
dt{color:#5d6d7e}dd{margin:0}
footer{color:#6b7b8c;font-size:12px;padding:0 24px 24px}
"""


def _e(value: object) -> str:
    """HTML-escape anything (None becomes an empty string)."""
    return "" if value is None else html.escape(str(value), quote=True)


def _short_uid(uid: str | None) -> str:
    """A UID shortened to its distinguishing tail, the full UID as a tooltip."""
    if not uid:
        return ""
    text = uid if len(uid) <= 22 else "…" + uid[-18:]
    return f'<span class="uid" title="{_e(uid)}">{_e(text)}</span>'


def _ago(seconds: float) -> str:
    if seconds < 90:
        return f"{max(0, int(seconds))} s ago"
    if seconds < 5400:
        return f"{int(seconds // 60)} min ago"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h ago"
    return f"{int(seconds // 86400)} d ago"


def _when(t: float | None, at: float) -> str:
    """Local time (with the date when it is not today), how long ago underneath."""
    if t is None:
        return '<span class="muted">—</span>'
    local = dt.datetime.fromtimestamp(t).astimezone()
    today = dt.datetime.fromtimestamp(at).astimezone().date()
    shown = local.strftime("%H:%M:%S" if local.date() == today else "%Y-%m-%d %H:%M")
    return (f'<span class="time" title="{_e(local.isoformat(timespec="seconds"))}">'
            f'{_e(shown)}</span><br><span class="muted">{_e(_ago(at - t))}</span>')


def _badge(text: str, css: str) -> str:
    return f'<span class="badge {css}">{_e(text)}</span>'


def _error(text: str | None, limit: int = 160) -> str:
    if not text:
        return ""
    short = text if len(text) <= limit else text[:limit - 1] + "…"
    return f'<div class="err" title="{_e(text)}">{_e(short)}</div>'


def _finding_cell(summary: FindingsSummary) -> str:
    if summary.positive is None:
        return '<span class="muted">—</span>'
    parts = [_badge("POSITIVE", "pos") if summary.positive else _badge("negative", "neg")]
    if summary.positive and summary.top_label is not None and summary.top_probability is not None:
        parts.append(f"{_e(summary.top_label)} {summary.top_probability:.2f}")
    elif summary.any_probability is not None:
        parts.append(f'<span class="muted">any {summary.any_probability:.2f}</span>')
    if summary.positive and summary.volume_ml:
        parts.append(f"{summary.volume_ml:.1f} mL")
    return "<br>".join(parts)


@dataclass(frozen=True)
class PreviewFile:
    """One preview Secondary Capture of a job."""

    path: Path
    instance: int


def preview_files(spool_dir: Path, job_id: int) -> list[PreviewFile]:
    """The Secondary Capture results of *job_id*, by instance number (none once purged)."""
    out_dir = Path(spool_dir) / "results" / str(job_id)
    if not out_dir.is_dir():
        return []
    found = []
    for path in sorted(out_dir.glob("*.dcm")):
        ds = dcmread(path, stop_before_pixels=True,
                     specific_tags=["SOPClassUID", "InstanceNumber"])
        if str(ds.get("SOPClassUID", "")).startswith(_SC_PREFIX):
            found.append(PreviewFile(path, int(ds.get("InstanceNumber", 0) or 0)))
    return sorted(found, key=lambda p: p.instance)


def default_preview(previews: list[PreviewFile]) -> PreviewFile | None:
    """The first key image (instance 2 on), else the summary page (instance 1)."""
    keys = [p for p in previews if p.instance >= 2]
    return keys[0] if keys else (previews[0] if previews else None)


@functools.lru_cache(maxsize=_PREVIEW_CACHE)
def _png(path: str, mtime_ns: int) -> bytes:
    """PNG bytes of a DICOM image (first frame; grey levels stretched to 8 bits)."""
    ds = dcmread(path)
    pixels = np.asarray(ds.pixel_array)
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        pixels = pixels[0]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if pixels.ndim == 3 and photometric == "RGB" and pixels.dtype == np.uint8:
        image = Image.fromarray(pixels, "RGB")
    elif pixels.ndim == 2:
        grey = pixels.astype(np.float64)
        low, high = float(grey.min()), float(grey.max())
        scaled = (grey - low) / (high - low) * 255.0 if high > low else np.zeros_like(grey)
        if photometric == "MONOCHROME1":
            scaled = 255.0 - scaled
        image = Image.fromarray(scaled.round().astype(np.uint8), "L")
    else:
        raise ValueError(f"cannot show {photometric} pixels of shape {pixels.shape} as PNG")
    buffer = io.BytesIO()
    image.save(buffer, "PNG", optimize=False)
    return buffer.getvalue()


def preview_png(path: Path) -> bytes:
    """The PNG of one preview file (cached by path and modification time)."""
    return _png(str(path), path.stat().st_mtime_ns)


class StatusPage:
    """Renders the pages from the state database; :meth:`route` plugs into HttpEndpoint."""

    def __init__(self, config: NodeConfig, db: StateDB, destinations: DestinationHealth) -> None:
        self.config = config
        self.db = db
        self.destinations = destinations
        self.dicom_port = config.dicom.port  # the node sets the bound port once it listens

    def route(self, path: str) -> Reply | None:
        """The reply for *path*, or None (404)."""
        if path in ("/", "/index.html"):
            return Reply(200, self.index().encode(), HTML_TYPE)
        match = re.fullmatch(r"/studies/(\d{1,12})", path)
        if match:
            page = self.study(int(match.group(1)))
            return Reply(200, page.encode(), HTML_TYPE) if page is not None else None
        match = re.fullmatch(r"/preview/(\d{1,12})(?:/(\d{1,6}))?\.png", path)
        if match:
            return self.preview(int(match.group(1)),
                                int(match.group(2)) if match.group(2) else None)
        return None

    def preview(self, job_id: int, instance: int | None) -> Reply | None:
        """The PNG of a job's preview (results are immutable per job: cacheable)."""
        previews = preview_files(self.config.spool.path, job_id)
        chosen = (default_preview(previews) if instance is None
                  else next((p for p in previews if p.instance == instance), None))
        if chosen is None:
            return None
        return Reply(200, preview_png(chosen.path), "image/png", cache_seconds=300)

    # -- pages -----------------------------------------------------------------------------

    def _page(self, title: str, body: str, refresh: bool) -> str:
        cfg = self.config
        t = dt.datetime.now().astimezone()
        meta = (f'<meta http-equiv="refresh" content="{cfg.http.page_refresh_s}">'
                if refresh and cfg.http.page_refresh_s else "")
        return (
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width\">{meta}"
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
            f"<header><h1>{_e(title)}</h1>"
            f"<span class=\"meta\">DICOM {_e(cfg.dicom.ae_title)}@{_e(cfg.dicom.host)}:"
            f"{_e(self.dicom_port)} · ich-node {_e(__version__)}</span>"
            f"<span class=\"meta\">{_e(t.strftime('%Y-%m-%d %H:%M:%S %Z'))}"
            + (f" · reloads every {cfg.http.page_refresh_s} s" if meta else "")
            + "</span></header>"
            f"<main>{body}</main>"
            "<footer>Read-only view of the node's state database. AI triage results are not "
            "a diagnosis. <a href=\"/metrics\">metrics</a> · <a href=\"/healthz\">health</a>"
            "</footer></body></html>\n")

    def index(self) -> str:
        """The overview: queues, destinations, recent series."""
        at = now()
        body = [self._queues(), self._destinations(at), self._series(at)]
        return self._page(f"ICH node · {self.config.dicom.ae_title}", "".join(body),
                          refresh=True)

    def _queues(self) -> str:
        series = self.db.count_by_state("series", ("receiving",))
        jobs = self.db.count_by_state("jobs", JOB_STATES)
        outbound = self.db.count_by_state("outbound", OUTBOUND_STATES)
        free_gb = shutil.disk_usage(self.config.spool.path).free / 1e9
        cards = [("receiving", series["receiving"], "series receiving", False),
                 ("ready", jobs["ready"], "jobs waiting", False),
                 ("processing", jobs["processing"], "jobs running", False),
                 ("done", jobs["done"], "jobs done", False),
                 ("failed", jobs["failed"], "jobs failed", jobs["failed"] > 0),
                 ("queued", outbound["queued"] + outbound["sending"], "results to send", False),
                 ("dead", outbound["dead"], "deliveries given up", outbound["dead"] > 0)]
        html_cards = "".join(
            f'<div class="card{" warn" if warn else ""}"><div class="n">{n}</div>'
            f'<div class="l">{_e(label)}</div></div>' for _, n, label, warn in cards)
        html_cards += (f'<div class="card"><div class="n">{free_gb:.1f}</div>'
                       '<div class="l">GB free on the spool</div></div>')
        return f"<h2>Queues</h2><div class=\"cards\">{html_cards}</div>"

    def _destinations(self, at: float) -> str:
        counts: dict[str, dict[str, int]] = {}
        for row in self.db.query("SELECT destination, state, COUNT(*) AS n FROM outbound"
                                 " GROUP BY destination, state"):
            counts.setdefault(row["destination"], {})[row["state"]] = row["n"]
        configured = {d.name: d for d in self.config.destinations}
        names = list(configured) + sorted(set(counts) - set(configured))
        if not names:
            return ("<h2>Destinations</h2><div class=\"empty\">No destinations configured: "
                    "results stay in the spool.</div>")
        rows = []
        for name in names:
            dest = configured.get(name)
            state = self.destinations.get(name)
            c = counts.get(name, {})
            address = (f"{_e(dest.ae_title)}@{_e(dest.host)}:{dest.port}" if dest is not None
                       else '<span class="muted">no longer configured</span>')
            rows.append(
                f"<tr><td><b>{_e(name)}</b></td><td class=\"uid\">{address}</td>"
                f"<td>{_badge(state.health, 'h-' + state.health)}"
                + (f"<br><span class=\"muted\">{state.consecutive_failures} failed in a row"
                   "</span>" if state.consecutive_failures else "")
                + f"</td><td>{_when(state.last_success, at)}</td>"
                f"<td>{_when(state.last_failure, at)}{_error(state.last_error)}</td>"
                f"<td class=\"num\">{c.get('sent', 0)}</td>"
                f"<td class=\"num\">{c.get('queued', 0) + c.get('sending', 0)}</td>"
                f"<td class=\"num\">{c.get('dead', 0)}</td></tr>")
        return ("<h2>Destinations</h2><table><tr><th>Name</th><th>Address</th><th>Health</th>"
                "<th>Last success</th><th>Last failure</th><th>Sent</th><th>Waiting</th>"
                "<th>Given up</th></tr>" + "".join(rows) + "</table>")

    def _series(self, at: float) -> str:
        rows = self.db.query(
            "SELECT s.series_uid, s.study_uid, s.calling_ae, s.state, s.instance_count,"
            " s.first_received_at, s.last_received_at, s.job_id, s.runs, s.last_error,"
            " s.purged_at, j.priority, j.started_at, j.finished_at, j.error, j.findings"
            " FROM series s LEFT JOIN jobs j ON j.id = s.job_id"
            " ORDER BY s.last_received_at DESC LIMIT ?", (self.config.http.page_series,))
        if not rows:
            return "<h2>Recent series</h2><div class=\"empty\">No series received yet.</div>"
        delivery: dict[int, list[str]] = {}
        job_ids = [r["job_id"] for r in rows if r["job_id"] is not None]
        if job_ids:
            marks = ",".join("?" * len(job_ids))
            for o in self.db.query(f"SELECT job_id, destination, state, attempts FROM outbound"
                                   f" WHERE job_id IN ({marks}) ORDER BY id", tuple(job_ids)):
                label = o["state"] if o["state"] != "queued" or not o["attempts"] else (
                    f"retry {o['attempts']}")
                delivery.setdefault(o["job_id"], []).append(
                    f"{_e(o['destination'])} {_badge(label, 's-' + o['state'])}")
        body = []
        for r in rows:
            job_id = r["job_id"]
            summary = summarize_findings(json.loads(r["findings"]) if r["findings"] else None)
            job_link = (f'<a href="/studies/{job_id}">job {job_id}</a>' if job_id is not None
                        else '<span class="muted">no job yet</span>')
            analysis = (f"{r['finished_at'] - r['started_at']:.1f} s"
                        if r["finished_at"] is not None and r["started_at"] is not None else "")
            priority = r["priority"]
            prio = ("" if priority is None else _badge(f"priority {priority}", "prio")
                    if priority > 0 else f'<span class="muted">{priority}</span>')
            if r["purged_at"] is not None:
                thumb = '<span class="muted">purged</span>'
            elif r["state"] == "done" and job_id is not None:
                thumb = (f'<a href="/studies/{job_id}"><img class="thumb" loading="lazy" '
                         f'alt="preview of job {job_id}" src="/preview/{job_id}.png"></a>')
            else:
                thumb = ""
            body.append(
                f"<tr><td class=\"nw\">{_when(r['last_received_at'], at)}</td>"
                f"<td class=\"nw\"><span class=\"muted\">study</span> {_short_uid(r['study_uid'])}<br>"
                f"<span class=\"muted\">series</span> {_short_uid(r['series_uid'])}"
                f"<br><span class=\"muted\">from {_e(r['calling_ae'])} · {job_link}</span></td>"
                f"<td class=\"num\">{r['instance_count']}</td>"
                f"<td>{_badge(r['state'], 's-' + r['state'])}"
                + (f"<br><span class=\"muted\">run {r['runs']}</span>" if r["runs"] > 1 else "")
                + f"{_error(r['last_error'] or r['error'])}</td>"
                f"<td>{_finding_cell(summary)}</td><td>{prio}</td>"
                f"<td class=\"nw\">"
                f"{'<br>'.join(delivery.get(job_id, [])) if job_id is not None else ''}</td>"
                f"<td class=\"nw\">{_when(r['finished_at'], at) if r['finished_at'] else ''}"
                + (f"<br><span class=\"muted\">analysis {analysis}</span>" if analysis else "")
                + f"</td><td>{thumb}</td></tr>")
        return ("<h2>Recent series</h2><table><tr><th>Last received</th><th>Study / series</th>"
                "<th>Images</th><th>State</th><th>Finding</th><th>Priority</th>"
                "<th>Results to</th><th>Finished</th><th>Preview</th></tr>"
                + "".join(body) + "</table>")

    def study(self, job_id: int) -> str | None:
        """One job in full, or None if there is no such job."""
        rows = self.db.query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            return None
        job = rows[0]
        at = now()
        findings: dict[str, Any] = json.loads(job["findings"]) if job["findings"] else {}
        summary = summarize_findings(findings)
        facts = [("Study UID", f'<span class="uid">{_e(job["study_uid"])}</span>'),
                 ("Series UID", f'<span class="uid">{_e(job["series_uid"])}</span>'),
                 ("From", _e(job["calling_ae"])), ("Images", _e(job["instance_count"])),
                 ("State", _badge(job["state"], "s-" + job["state"])),
                 ("Priority", _e(job["priority"])), ("Attempts", _e(job["attempts"])),
                 ("Last instance", _when(job["last_received_at"], at)),
                 ("Started", _when(job["started_at"], at)),
                 ("Finished", _when(job["finished_at"], at)),
                 ("Finding", _finding_cell(summary))]
        if job["error"]:
            facts.append(("Error", f'<div class="err">{_e(job["error"])}</div>'))
        parts = ["<p><a href=\"/\">← all series</a></p><h2>Job</h2><dl>"
                 + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts) + "</dl>"]
        parts.append(self._labels(findings, summary))
        warnings = findings.get("warnings")
        if isinstance(warnings, list) and warnings:
            parts.append("<h2>Warnings</h2><ul>" + "".join(f"<li>{_e(w)}</li>" for w in warnings)
                         + "</ul>")
        outbound = self.db.query("SELECT * FROM outbound WHERE job_id = ? ORDER BY id",
                                 (job_id,))
        if outbound:
            parts.append("<h2>Delivery</h2><table class=\"fit\"><tr><th>Destination</th><th>State</th>"
                         "<th>Attempts</th><th>Sent</th><th>Last error</th></tr>" + "".join(
                             f"<tr><td>{_e(o['destination'])}</td>"
                             f"<td>{_badge(o['state'], 's-' + o['state'])}</td>"
                             f"<td class=\"num\">{o['attempts']}</td>"
                             f"<td>{_when(o['sent_at'], at)}</td>"
                             f"<td>{_error(o['last_error'], 400)}</td></tr>" for o in outbound)
                         + "</table>")
        previews = preview_files(self.config.spool.path, job_id)
        if previews:
            parts.append("<h2>Preview images</h2>" + "".join(
                f'<img class="full" alt="preview {p.instance} of job {job_id}" '
                f'src="/preview/{job_id}/{p.instance}.png">' for p in previews))
        return self._page(f"Job {job_id}", "".join(parts), refresh=False)

    @staticmethod
    def _labels(findings: dict[str, Any], summary: FindingsSummary) -> str:
        labels = findings.get("labels")
        if not isinstance(labels, dict):
            return ""
        rows = []
        for name, value in labels.items():
            if not isinstance(value, dict):
                continue
            p = value.get("probability")
            prob = f"{p:.3f}" if isinstance(p, (int, float)) else ""
            call = (_badge("positive", "pos") if value.get("positive")
                    else '<span class="muted">negative</span>')
            volume = summary.volume_ml if name == "any" else summary.volumes_ml.get(name)
            rows.append(f"<tr><td>{_e(name)}</td><td class=\"num\">{prob}</td><td>{call}</td>"
                        f"<td class=\"num\">{'' if volume is None else f'{volume:.2f}'}</td></tr>")
        return ("<h2>Findings</h2><table class=\"fit\"><tr><th>Label</th><th>Probability</th><th>Call</th>"
                "<th>Volume mL</th></tr>" + "".join(rows) + "</table>")
