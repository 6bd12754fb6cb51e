"""Notifications: a positive study reaches a real HTTP server and a real HL7 MLLP server
exactly once, a negative one reaches neither; targets that are down, answer 500 or AR are
retried and dead-lettered at the cap; queued notifications survive ``kill -9``."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hl7
import pytest
import yaml

from node import oru, webhook
from node.app import Node
from node.config import ConfigError, Hl7Target, NotifyWhen, WebhookTarget, load_config
from node.db import SCHEMA_VERSION, StateDB
from node.jobs import Job
from node.notify import DEMO_WARNING, NodeIdentity, Notification, NotifyError, in_window, plan
from tests.helpers.ctseries import write_series
from tests.helpers.net import free_port, pynetdicom_send, wait_until
from tests.helpers.notify_servers import MllpServer, WebhookServer

REPO = Path(__file__).resolve().parents[2]
BLEED = "tests.helpers.analyzers:bleed_if_named"


def _targets(web_port: int, ris_port: int, **extra: Any) -> dict[str, Any]:
    return {
        "webhooks": [{"name": "er-hook", "url": f"http://127.0.0.1:{web_port}/ich",
                      "headers": {"Authorization": "Bearer ${ICH_TEST_WEBHOOK_TOKEN}"},
                      "timeout_s": 5}],
        "hl7": [{"name": "ris", "host": "127.0.0.1", "port": ris_port,
                 "receiving_application": "TEST_RIS", "receiving_facility": "HOSP",
                 "timeout_s": 5}],
        "backoff_initial_s": 0.2, "backoff_max_s": 0.5, **extra,
    }


def _notes(db: StateDB | Path) -> list[dict[str, Any]]:
    sql = "SELECT * FROM notifications ORDER BY kind"
    if isinstance(db, StateDB):
        return [dict(r) for r in db.query(sql)]
    with sqlite3.connect(db / "state.db") as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute(sql).fetchall()]


def _states(db: StateDB | Path) -> list[tuple[str, str]]:
    return [(n["kind"], n["state"]) for n in _notes(db)]


def _window_around_now() -> str:
    now = dt.datetime.now()
    return (f"{(now - dt.timedelta(hours=2)):%H:%M}-{(now + dt.timedelta(hours=2)):%H:%M}")


@pytest.fixture
def servers() -> Iterator[tuple[WebhookServer, MllpServer]]:
    """Both receivers, not started: tests start them when they should be up."""
    web, ris = WebhookServer(free_port()), MllpServer(free_port())
    yield web, ris
    web.stop()
    ris.stop()


def _f(segment: hl7.Segment, field: int, component: int = 1) -> str:
    """A field's component, unescaped (python-hl7's accessor rules)."""
    return str(segment.extract_field(1, field, 1, component))


def _obx(message: hl7.Message, code: str) -> hl7.Segment:
    matches = [s for s in message.segments("OBX") if _f(s, 3, 1) == code]
    assert len(matches) == 1, f"one OBX {code} expected"
    return matches[0]


def test_positive_study_notifies_webhook_and_hl7_once_and_a_negative_one_neither(
        make_node: Callable[..., Node], tmp_path: Path,
        servers: tuple[WebhookServer, MllpServer], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ICH_TEST_WEBHOOK_TOKEN", "s3cret")
    web, ris = servers[0].start(), servers[1].start()
    node = make_node(analyzer=BLEED, notifications=_targets(
        web.port, ris.port, when={"hours": _window_around_now()}))
    pos = write_series(tmp_path / "pos", 3, rows=32, seed=41, patient_name="BLEED^Zoë")
    neg = write_series(tmp_path / "neg", 3, rows=32, seed=42, patient_name="CALM^Ann")
    assert pynetdicom_send(node.port, pos.files) == [0] * 3
    assert pynetdicom_send(node.port, neg.files) == [0] * 3
    wait_until(lambda: [r["state"] for r in node.db.query("SELECT state FROM jobs")]
               == ["done", "done"] and _states(node.db) == [("hl7", "sent"),
                                                             ("webhook", "sent")],
               60, what="both jobs done and both notifications sent")
    rows = {n["kind"]: n for n in _notes(node.db)}
    assert {n["study_uid"] for n in rows.values()} == {pos.study_uid}
    assert len(web.requests) == 1 and len(ris.received()) == 1

    path, headers, body = web.requests[0]
    assert path == "/ich"
    assert headers["Authorization"] == "Bearer s3cret"
    assert headers["Idempotency-Key"] == body["notification_id"] == rows["webhook"]["uid"]
    assert body["study"] == {"study_uid": pos.study_uid, "series_uid": pos.series_uid,
                             "accession_number": "ACC0001", "study_date": "20260101",
                             "study_description": "CT HEAD WO CONTRAST"}
    assert body["event"] == "positive" and body["priority"] == 0
    result = body["result"]
    assert result["decision"] == "POSITIVE" and result["positive"] is True
    assert result["labels"]["subdural"] == {"probability": 0.91, "positive": True}
    assert result["labels"]["epidural"]["positive"] is False
    assert result["volumes_ml"]["subdural"] == 12.5
    assert [les["subtype"] for les in result["lesions"]] == ["subdural"]
    assert body["node"] == {"ae_title": "ICH_NODE", "version": body["node"]["version"],
                            "hostname": socket.gethostname()}
    assert body["model"]["name"] == "ich-test" and body["model"]["sha256"] == "ab" * 32
    assert body["model"]["demo"] is True and body["model"]["warning"] == DEMO_WARNING
    assert "Zoë" not in json.dumps(body, ensure_ascii=False)  # include_patient is off

    message = ris.received()[0]
    msh = message.segment("MSH")
    assert [_f(msh, 9, c) for c in (1, 2, 3)] == ["ORU", "R01", "ORU_R01"]
    assert _f(msh, 12) == "2.5"
    assert _f(msh, 3) == "ICH_NODE" and _f(msh, 5) == "TEST_RIS" and _f(msh, 6) == "HOSP"
    assert _f(msh, 18) == "UNICODE UTF-8"
    assert _f(msh, 10) == rows["hl7"]["uid"].replace("-", "")[:20].upper()
    pid = message.segment("PID")
    assert _f(pid, 3, 1) == "ID0001"
    assert _f(pid, 5, 1) == "BLEED" and _f(pid, 5, 2) == "Zoë"
    assert _f(pid, 7) == "19600101" and _f(pid, 8) == "O"
    obr = message.segment("OBR")
    assert _f(obr, 2) == _f(obr, 3) == "ACC0001"
    assert _f(obr, 7) == "20260101030000" and _f(obr, 25) == "P"
    assert _f(_obx(message, "110180"), 5) == pos.study_uid
    assert _f(_obx(message, "112002"), 5) == pos.series_uid
    decision = _obx(message, "ICH")
    assert _f(decision, 5, 1) == "POS" and _f(decision, 8) == "A"
    subdural = _obx(message, "SUBDURAL_P")
    assert float(_f(subdural, 5)) == 0.91 and _f(subdural, 8) == "A"
    epidural = _obx(message, "EPIDURAL_P")
    assert float(_f(epidural, 5)) == 0.02 and _f(epidural, 8) == "N"
    volume = _obx(message, "SUBDURAL_VOL")
    assert float(_f(volume, 5)) == 12.5 and _f(volume, 6, 1) == "mL"
    impression = _f(_obx(message, "IMPRESSION"), 5)
    assert impression.startswith("AI TRIAGE: suspected intracranial hemorrhage (subdural 12.5")
    assert "not a diagnosis" in impression
    assert _f(_obx(message, "MODEL"), 5) == f"ich-test 0.0 {'ab' * 32}"
    assert _f(_obx(message, "DEMO"), 5) == DEMO_WARNING.upper()
    assert all(_f(obx, 11) == "P" for obx in message.segments("OBX"))

    metric = node.metrics.registry.get_sample_value
    assert metric("ich_node_notifications_sent_total", {"target": "ris", "kind": "hl7"}) == 1
    assert metric("ich_node_notifications_sent_total",
                  {"target": "er-hook", "kind": "webhook"}) == 1
    assert metric("ich_node_notifications", {"state": "sent"}) == 2

    def notified() -> list[tuple[str, str, str, str]]:
        audit = [json.loads(line) for line in
                 (node.config.spool.path / "audit.jsonl").read_text().splitlines()]
        return sorted((a["channel"], a["target"], a["outcome"], a["study_uid"])
                      for a in audit if a["event"] == "notified")

    wait_until(lambda: len(notified()) >= 2, 10, what="two 'notified' audit lines")
    assert notified() == [("hl7", "ris", "sent", pos.study_uid),
                          ("webhook", "er-hook", "sent", pos.study_uid)]


def test_targets_that_are_down_get_the_notification_once_they_are_up(
        make_node: Callable[..., Node], tmp_path: Path,
        servers: tuple[WebhookServer, MllpServer], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ICH_TEST_WEBHOOK_TOKEN", "t")
    web, ris = servers
    node = make_node(analyzer=BLEED, notifications=_targets(web.port, ris.port,
                                                            max_attempts=50))
    pos = write_series(tmp_path / "pos", 2, rows=32, seed=43, patient_name="BLEED^A")
    assert pynetdicom_send(node.port, pos.files) == [0] * 2
    wait_until(lambda: len(_notes(node.db)) == 2 and
               all(n["attempts"] >= 2 for n in _notes(node.db)), 60,
               what="two failed attempts per target")
    assert all(n["state"] in ("queued", "sending") for n in _notes(node.db))
    assert all("refused" in (n["last_error"] or "").lower() or n["state"] == "sending"
               for n in _notes(node.db))
    failures = node.metrics.registry.get_sample_value(
        "ich_node_notification_failures_total", {"target": "ris", "kind": "hl7"})
    assert failures is not None and failures >= 2
    web.start()
    ris.start()
    wait_until(lambda: _states(node.db) == [("hl7", "sent"), ("webhook", "sent")], 60,
               what="delivery after the outage")
    assert len(web.requests) == 1 and len(ris.received()) == 1
    assert web.bodies()[0]["study"]["study_uid"] == pos.study_uid


def test_500_and_ar_are_retried_to_the_cap_then_status_shows_and_resend_delivers(
        make_node: Callable[..., Node], tmp_path: Path,
        servers: tuple[WebhookServer, MllpServer], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ICH_TEST_WEBHOOK_TOKEN", "t")
    web, ris = servers
    web.status, ris.ack_code = 500, "AR"
    web.start()
    ris.start()
    node = make_node(analyzer=BLEED, notifications=_targets(web.port, ris.port,
                                                            max_attempts=2))
    pos = write_series(tmp_path / "pos", 2, rows=32, seed=44, patient_name="BLEED^B")
    assert pynetdicom_send(node.port, pos.files) == [0] * 2
    wait_until(lambda: _states(node.db) == [("hl7", "dead"), ("webhook", "dead")], 60,
               what="both notifications dead after 2 attempts")
    rows = {n["kind"]: n for n in _notes(node.db)}
    assert rows["webhook"]["attempts"] == rows["hl7"]["attempts"] == 2
    assert rows["webhook"]["last_error"] == "er-hook: HTTP 500 Internal Server Error"
    assert rows["hl7"]["last_error"] == "ris: ACK AR"
    # The same notification each time: receivers can de-duplicate on its id.
    assert [b["notification_id"] for b in web.bodies()] == [rows["webhook"]["uid"]] * 2
    assert len({str(m.segment("MSH")(10)) for m in ris.received()}) == 1
    assert len(ris.received()) == 2

    spool = str(node.config.spool.path)
    status = subprocess.run([sys.executable, "-m", "node.cli", "status", "--spool", spool,
                             "--json"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    assert data["notifications"] == {"queued": 0, "sending": 0, "sent": 0, "dead": 2}
    assert {(d["kind"], d["target"], d["study_uid"]) for d in data["dead_notifications"]} == {
        ("webhook", "er-hook", pos.study_uid), ("hl7", "ris", pos.study_uid)}
    text = subprocess.run([sys.executable, "-m", "node.cli", "status", "--spool", spool],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert "notify:   queued=0  sending=0  sent=0  dead=2" in text.stdout
    assert "-> hl7 ris: dead 1  last error: ris: ACK AR" in text.stdout

    web.status, ris.ack_code = 204, "AA"
    resend = subprocess.run([sys.executable, "-m", "node.cli", "resend", pos.study_uid,
                             "--spool", spool], capture_output=True, text=True, cwd=REPO,
                            timeout=60)
    assert resend.returncode == 0, resend.stderr
    assert "2 dead notifications" in resend.stdout
    wait_until(lambda: _states(node.db) == [("hl7", "sent"), ("webhook", "sent")], 60,
               what="resent notifications")
    assert len(web.requests) == 3 and len(ris.received()) == 3


def _node_config_file(tmp: Path, web_port: int, ris_port: int) -> tuple[Path, int]:
    port = free_port()
    path = tmp / "node.yaml"
    path.write_text(yaml.safe_dump({
        "dicom": {"host": "127.0.0.1", "port": port},
        "spool": {"path": str(tmp / "spool"), "min_free_mb": 1},
        "http": {"port": 0},
        "assembly": {"quiet_seconds": 1.0, "release_grace_seconds": 0.3},
        "worker": {"poll_interval_s": 0.1},
        "notifications": _targets(web_port, ris_port, max_attempts=50),
    }, allow_unicode=True))
    return path, port


def test_queued_notifications_survive_kill9_of_the_node(
        tmp_path: Path, servers: tuple[WebhookServer, MllpServer]) -> None:
    web, ris = servers
    config, port = _node_config_file(tmp_path, web.port, ris.port)
    env = dict(os.environ, PYTHONPATH=str(REPO), ICH_TEST_WEBHOOK_TOKEN="t")
    log = tmp_path / "node.log"

    def start() -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "tests.helpers.run_node", str(config),
                                     BLEED], cwd=REPO, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: _listening(port) or proc.poll() is not None, 60,
                   what="node listening")
        assert proc.poll() is None, log.read_text()
        return proc

    proc = start()
    try:
        pos = write_series(tmp_path / "pos", 2, rows=32, seed=45, patient_name="BLEED^C")
        assert pynetdicom_send(port, pos.files) == [0] * 2
        spool = tmp_path / "spool"
        wait_until(lambda: (spool / "state.db").exists() and len(_notes(spool)) == 2 and
                   all(n["attempts"] >= 1 for n in _notes(spool)), 60,
                   what=f"failed first attempts\n{log.read_text()}")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        web.start()
        ris.start()
        proc = start()
        wait_until(lambda: _states(spool) == [("hl7", "sent"), ("webhook", "sent")], 60,
                   what=f"delivery after restart\n{log.read_text()}")
        assert len(web.requests) == 1 and len(ris.received()) == 1
        assert _f(ris.received()[0].segment("OBR"), 3) == "ACC0001"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


# --- parts, without a node ---------------------------------------------------------------

def _note(findings: dict[str, Any], context: dict[str, str] | None) -> Notification:
    return Notification(7, "1b4e28ba-2fa1-11d2-883f-0016d3cca427", 3, "1.2.3", "1.2.3.4",
                        "hl7", "ris", 0, 5, findings, context, 0.0)


def test_time_windows_span_midnight() -> None:
    assert in_window("22:00-07:00", dt.time(23, 30)) and in_window("22:00-07:00", dt.time(6, 59))
    assert not in_window("22:00-07:00", dt.time(7, 0))
    assert not in_window("22:00-07:00", dt.time(12, 0))
    assert in_window("08:00-17:00", dt.time(8, 0)) and not in_window("08:00-17:00", dt.time(17))
    with pytest.raises(ConfigError, match="notifications.when.hours"):
        load_config(None, {"notifications": {"when": {"hours": "24:00-07:00"}}}, environ={})
    with pytest.raises(ConfigError, match="same time"):
        load_config(None, {"notifications": {"when": {"hours": "07:00-07:00"}}}, environ={})
    with pytest.raises(ConfigError, match="unique"):
        load_config(None, {"notifications": {"webhooks": [{"name": "a", "url": "http://x"}],
                                             "hl7": [{"name": "a", "host": "h", "port": 1}]}},
                    environ={})


def test_plan_follows_the_when_filter(tmp_path: Path) -> None:
    series = write_series(tmp_path / "s", 1, rows=16, seed=46)
    job = Job(1, series.series_uid, series.study_uid, "CT", str(series.files[0].parent), 0, 1,
              1, 0.0)
    cfg = load_config(None, {"notifications": {
        "webhooks": [{"name": "w", "url": "http://127.0.0.1:9/"}],
        "when": {"hours": "22:00-07:00"}}}, environ={})
    night, noon = dt.datetime(2026, 1, 1, 3, 0), dt.datetime(2026, 1, 1, 12, 0)
    assert plan(cfg, job, {"positive": True}, night) is not None
    assert plan(cfg, job, {"positive": True}, noon) is None
    assert plan(cfg, job, {"positive": False}, night) is None
    every = cfg.model_copy(update={"notifications": cfg.notifications.model_copy(
        update={"when": NotifyWhen(findings="all")})})
    assert plan(every, job, {"positive": False}, noon) is not None
    assert plan(load_config(None, {}, environ={}), job, {"positive": True}, night) is None


def test_oru_escapes_separators_and_keeps_utf8_names() -> None:
    findings = {"positive": False, "labels": {"any": {"probability": 0.01, "positive": False}},
                "volumes_ml": {}, "model": {"name": "m", "version": "1", "sha256": "x",
                                            "demo": False}}
    context = {"patient_id": "P|1", "issuer_of_patient_id": "HOSP", "accession_number": "A&1^2",
               "patient_name": "Ødegård^Zoë^^Dr^Jr", "study_date": "", "study_time": ""}
    text = oru.build(_note(findings, context), Hl7Target(name="ris", host="h", port=1),
                     NodeIdentity("ICH_NODE", "1", "host"), dt.datetime(2026, 1, 1, 3, 5))
    message = hl7.parse(text)
    assert _f(message.segment("PID"), 3, 1) == "P|1"
    assert _f(message.segment("PID"), 3, 4) == "HOSP"
    assert [_f(message.segment("PID"), 5, c) for c in range(1, 6)] == [
        "Ødegård", "Zoë", "", "Jr", "Dr"]
    assert _f(message.segment("OBR"), 3) == "A&1^2"
    assert _f(_obx(message, "ICH"), 5, 1) == "NEG"
    assert "DEMO" not in text
    assert _f(_obx(message, "IMPRESSION"), 5).startswith("AI TRIAGE: no intracranial")


def test_hl7_send_needs_a_positive_ack() -> None:
    findings = {"positive": True, "labels": {}, "model": {}}
    note = _note(findings, {})
    ris = MllpServer(free_port()).start()
    target = Hl7Target(name="ris", host="127.0.0.1", port=ris.port, timeout_s=5)
    text = oru.build(note, target, NodeIdentity("ICH_NODE", "1", "host"))
    try:
        assert oru.send(target, text) == "AA"
        ris.ack_code = "AE"
        with pytest.raises(NotifyError, match="ris: ACK AE"):
            oru.send(target, text)
        ris.ack_code = None
        with pytest.raises(NotifyError, match="closed without an ACK"):
            oru.send(target, text)
    finally:
        ris.stop()
    with pytest.raises(NotifyError, match="ris: ConnectionRefusedError"):
        oru.send(target, text)


def test_webhook_failures_name_the_status(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ICH_TEST_UNSET_TOKEN", raising=False)
    web = WebhookServer(free_port(), status=302).start()
    body = {"notification_id": "n1"}
    try:
        hook = WebhookTarget(name="w", url=f"http://127.0.0.1:{web.port}/x")
        with pytest.raises(NotifyError, match="w: HTTP 302"):
            webhook.post(hook, body, "test")
        web.status = 201
        assert webhook.post(hook, body, "test") == 201
        secret = WebhookTarget(name="w", url=hook.url,
                               headers={"Authorization": "Bearer ${ICH_TEST_UNSET_TOKEN}"})
        with pytest.raises(NotifyError, match="ICH_TEST_UNSET_TOKEN, which is not set"):
            webhook.post(secret, body, "test")
        assert len(web.requests) == 2
    finally:
        web.stop()


def test_a_schema_1_state_db_is_migrated_and_a_newer_one_refused(tmp_path: Path) -> None:
    StateDB(tmp_path).close()
    with sqlite3.connect(tmp_path / "state.db") as conn:  # what a schema 1 node wrote
        conn.execute("DROP TABLE notifications")
        conn.execute("UPDATE meta SET value = '1'")
    db = StateDB(tmp_path, create=False)
    try:
        assert db.count_by_state("notifications", ("queued",)) == {"queued": 0}
        assert db.query("SELECT value FROM meta")[0]["value"] == str(SCHEMA_VERSION)
    finally:
        db.close()
    with sqlite3.connect(tmp_path / "state.db") as conn:
        conn.execute("UPDATE meta SET value = '99'")
    with pytest.raises(RuntimeError, match="schema version 99, newer"):
        StateDB(tmp_path)
