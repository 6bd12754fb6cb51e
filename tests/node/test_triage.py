"""Triage rules (unit, fixed clock), the priority queue and urgent routing over real
associations, and the schema migration that stores them."""

from __future__ import annotations

import json
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset
from pydicom.uid import generate_uid

from node.app import Node
from node.config import ConfigError, NodeConfig, TriageConfig, load_config
from node.db import SCHEMA_VERSION, StateDB
from node.jobs import SqliteJobQueue
from node.sender import SqliteOutboundQueue
from node.triage import Decision, Triage, in_window, prioritize, route
from tests.helpers.ctseries import TEST_ROOT, make_ct_slice
from tests.helpers.net import free_port, storescu, wait_until
from tests.helpers.receiver import Receiver

NIGHT = datetime(2026, 1, 1, 23, 30)
DAY = datetime(2026, 1, 1, 12, 0)


def triage(**section: Any) -> TriageConfig:
    return load_config(None, {"triage": section}, environ={}).triage


def header(**attrs: Any) -> Dataset:
    ds = Dataset()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


def ct_series(name: str, n: int = 2, **attrs: Any) -> list[Dataset]:
    """A small CT series (16 x 16 pixels) with extra header attributes."""
    study = generate_uid(TEST_ROOT, entropy_srcs=["triage-study", name])
    series = generate_uid(TEST_ROOT, entropy_srcs=["triage-series", name])
    frame = generate_uid(TEST_ROOT, entropy_srcs=["triage-frame", name])
    slices = []
    for index in range(n):
        ds = make_ct_slice(study, series, frame, index, n, rows=16)
        for keyword, value in attrs.items():
            setattr(ds, keyword, value)
        slices.append(ds)
    return slices


def send(port: int, series: list[Dataset], calling_ae: str) -> None:
    """Send *series* in one association with dcmtk's storescu (pynetdicom's SCU has a rare
    race that loses a C-STORE response on a loaded machine)."""
    with tempfile.TemporaryDirectory() as folder:
        files = []
        for index, ds in enumerate(series):
            files.append(Path(folder) / f"{index:03d}.dcm")
            ds.save_as(files[-1], enforce_file_format=True)
        result = storescu(port, files, calling_ae=calling_ae)
    assert result.returncode == 0, result.stderr


# --- rules, with a fixed clock -------------------------------------------------------------

@pytest.mark.parametrize(("window", "hour", "minute", "inside"), [
    ("22:00-07:00", 22, 0, True), ("22:00-07:00", 23, 59, True), ("22:00-07:00", 0, 0, True),
    ("22:00-07:00", 6, 59, True), ("22:00-07:00", 7, 0, False), ("22:00-07:00", 12, 0, False),
    ("22:00-07:00", 21, 59, False), ("08:00-17:30", 8, 0, True), ("08:00-17:30", 17, 29, True),
    ("08:00-17:30", 17, 30, False), ("08:00-17:30", 7, 59, False),
])
def test_time_window_in_local_time_wraps_midnight(window: str, hour: int, minute: int,
                                                  inside: bool) -> None:
    assert in_window(window, datetime(2026, 3, 1, hour, minute)) is inside


def test_default_rules_put_stat_and_high_first() -> None:
    cfg = NodeConfig().triage
    assert prioritize(cfg, header(RequestedProcedurePriority="STAT"), "CT", DAY) == \
        Decision(100, "stat")
    assert prioritize(cfg, header(RequestedProcedurePriority="high"), "CT", DAY) == \
        Decision(50, "high")
    assert prioritize(cfg, header(RequestedProcedurePriority="ROUTINE"), "CT", DAY) == \
        Decision(0, "default")
    assert prioritize(cfg, header(), "CT", DAY) == Decision(0, "default")
    assert prioritize(cfg, None, "CT", DAY) == Decision(0, "default")


def test_priority_is_also_read_inside_request_attributes_sequence() -> None:
    item = header(RequestedProcedureID="RP1", RequestedProcedurePriority="STAT")
    ds = header(RequestAttributesSequence=[header(RequestedProcedureID="RP0"), item])
    assert prioritize(NodeConfig().triage, ds, "CT", DAY) == Decision(100, "stat")


def test_calling_ae_and_time_rules_first_match_wins() -> None:
    cfg = triage(rules=[
        {"name": "er-night", "priority": 90, "calling_aes": ["ER_CT"],
         "time_of_day": "22:00-07:00"},
        {"name": "er", "priority": 70, "calling_aes": ["ER_CT", "ER_CT2"]},
        {"name": "overnight", "priority": 10, "time_of_day": "22:00-07:00"},
    ], default_priority=-5)
    assert prioritize(cfg, None, "ER_CT", NIGHT) == Decision(90, "er-night")
    assert prioritize(cfg, None, "ER_CT", DAY) == Decision(70, "er")
    assert prioritize(cfg, None, "ER_CT2", NIGHT) == Decision(70, "er")
    assert prioritize(cfg, None, "WARD_CT", NIGHT) == Decision(10, "overnight")
    assert prioritize(cfg, None, "WARD_CT", DAY) == Decision(-5, "default")
    assert prioritize(cfg, None, "er_ct", DAY) == Decision(-5, "default")  # AE titles: exact


def test_dicom_conditions_are_anded_case_insensitive_lists_and_wildcards() -> None:
    cfg = triage(rules=[{"name": "stroke", "priority": 60, "dicom": {
        "CurrentPatientLocation": ["stroke*", "ED ?"], "StudyDescription": "CT HEAD*"}}])
    hit = header(CurrentPatientLocation="Stroke Unit 3", StudyDescription="ct head wo")
    assert prioritize(cfg, hit, "X", DAY).reason == "stroke"
    assert prioritize(cfg, header(CurrentPatientLocation="ED 4", StudyDescription="CT HEAD"),
                      "X", DAY).reason == "stroke"
    assert prioritize(cfg, header(CurrentPatientLocation="ED 44", StudyDescription="CT HEAD"),
                      "X", DAY).reason == "default"
    assert prioritize(cfg, header(CurrentPatientLocation="Stroke Unit"), "X", DAY).reason \
        == "default"
    multi = header(CurrentPatientLocation="W", StudyDescription="CT HEAD",
                   ImageType=["ORIGINAL", "PRIMARY"])
    cfg2 = triage(rules=[{"name": "primary", "priority": 1, "dicom": {"ImageType": "primary"}}])
    assert prioritize(cfg2, multi, "X", DAY).reason == "primary"


@pytest.mark.parametrize(("section", "key"), [
    ({"rules": [{"name": "a", "priority": 1, "dicom": {"NoSuchKeyword": "x"}}]},
     "triage.rules.0.dicom"),
    ({"rules": [{"name": "a", "priority": 1, "time_of_day": "22:00-7"}]},
     "triage.rules.0.time_of_day"),
    ({"rules": [{"name": "a", "priority": 1, "time_of_day": "24:00-07:00"}]},
     "triage.rules.0.time_of_day"),
    ({"rules": [{"name": "a", "priority": 1, "time_of_day": "07:00-07:00"}]},
     "triage.rules.0.time_of_day"),
    ({"rules": [{"name": "a", "priority": 1}, {"name": "a", "priority": 2}]}, "triage.rules"),
    ({"rules": [{"name": "a", "priority": 1, "calling_ae": ["X"]}]}, "triage.rules.0.calling_ae"),
    ({"urgent_destinations": ["nowhere"]}, "triage.urgent_destinations"),
])
def test_invalid_triage_config_names_the_key(section: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, {"triage": section}, environ={})
    assert key in str(err.value)


def _dest(name: str) -> dict[str, Any]:
    return {"name": name, "ae_title": name.upper()[:16], "host": "127.0.0.1", "port": 104}


def test_positive_results_also_go_to_urgent_destinations_negative_never() -> None:
    cfg = load_config(None, {
        "destinations": [_dest("pacs"), _dest("worklist"), _dest("neuro"), _dest("archive")],
        "triage": {"urgent_destinations": [
            "worklist", {"destination": "neuro", "calling_aes": ["ER_CT"]}]},
    }, environ={})

    def no_header() -> Dataset | None:
        pytest.fail("the header was read though no condition needs it")

    assert route(cfg, False, "ER_CT", no_header, DAY) == ["pacs", "archive"]
    assert route(cfg, True, "WARD_CT", no_header, DAY) == ["pacs", "archive", "worklist"]
    assert route(cfg, True, "ER_CT", no_header, DAY) == ["pacs", "archive", "worklist", "neuro"]


def test_urgent_destination_with_dicom_condition_reads_the_header() -> None:
    cfg = load_config(None, {
        "destinations": [_dest("pacs"), _dest("stroke")],
        "triage": {"urgent_destinations": [
            {"destination": "stroke", "dicom": {"CurrentPatientLocation": "STROKE*"},
             "time_of_day": "22:00-07:00"}]},
    }, environ={})
    on_ward = header(CurrentPatientLocation="Stroke unit")
    assert route(cfg, True, "X", lambda: on_ward, NIGHT) == ["pacs", "stroke"]
    assert route(cfg, True, "X", lambda: on_ward, DAY) == ["pacs"]
    assert route(cfg, True, "X", lambda: None, NIGHT) == ["pacs"]


# --- state: migration and the sender's order -------------------------------------------------

_V1_TABLES = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES ('schema_version', '1');
CREATE TABLE jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, series_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL, calling_ae TEXT NOT NULL, series_dir TEXT NOT NULL,
    state TEXT NOT NULL, priority INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0, instance_count INTEGER NOT NULL,
    last_received_at REAL NOT NULL, created_at REAL NOT NULL, started_at REAL,
    finished_at REAL, worker_pid INTEGER, error TEXT, findings TEXT);
CREATE TABLE outbound (id INTEGER PRIMARY KEY AUTOINCREMENT, job_id INTEGER NOT NULL,
    study_uid TEXT NOT NULL, destination TEXT NOT NULL, files TEXT NOT NULL,
    state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at REAL NOT NULL,
    created_at REAL NOT NULL, sent_at REAL, last_error TEXT);
INSERT INTO jobs (series_uid, study_uid, calling_ae, series_dir, state, priority,
    instance_count, last_received_at, created_at) VALUES ('1.2', '1.1', 'CT', '/x', 'ready',
    0, 3, 1.0, 1.0);
INSERT INTO outbound (job_id, study_uid, destination, files, state, next_attempt_at,
    created_at) VALUES (1, '1.1', 'pacs', '[]', 'queued', 1.0, 1.0);
"""


def test_a_version_1_state_db_is_migrated_in_place(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "state.db") as conn:
        conn.executescript(_V1_TABLES)
    db = StateDB(tmp_path)
    try:
        assert db.query("SELECT value FROM meta WHERE key = 'schema_version'")[0][0] == \
            str(SCHEMA_VERSION)
        job = db.query("SELECT * FROM jobs")[0]
        assert (job["series_uid"], job["priority_reason"], job["urgent"]) == ("1.2", None, 0)
        row = db.query("SELECT * FROM outbound")[0]
        assert (row["destination"], row["priority"], row["urgent"]) == ("pacs", 0, 0)
    finally:
        db.close()
    StateDB(tmp_path).close()  # a second open finds nothing to do


def test_sender_takes_urgent_results_first_then_by_job_priority(tmp_path: Path) -> None:
    db = StateDB(tmp_path)
    try:
        jobs = SqliteJobQueue(db)
        outbound = SqliteOutboundQueue(db, 3, 1.0, 1.0)
        for uid, priority in (("routine", 0), ("stat", 100), ("positive", 0)):
            with db.transaction() as cur:
                cur.execute("INSERT INTO jobs (series_uid, study_uid, calling_ae, series_dir,"
                            " state, priority, instance_count, last_received_at, created_at)"
                            " VALUES (?, ?, 'CT', '/x', 'processing', ?, 1, 1.0, 1.0)",
                            (uid, uid, priority))
        jobs.finish(1, {"positive": False}, [("pacs", ["a.dcm"])])
        jobs.finish(2, {"positive": False}, [("pacs", ["b.dcm"])])
        jobs.finish(3, {"positive": True}, [("pacs", ["c.dcm"]), ("urgent", ["c.dcm"])],
                    urgent=True)
        order = [item.study_uid for item in outbound.claim_due(limit=10)]
        assert order == ["positive", "positive", "stat", "routine"]
        assert [r["urgent"] for r in db.query("SELECT urgent FROM jobs ORDER BY id")] == [0, 0, 1]
    finally:
        db.close()


# --- over real associations ------------------------------------------------------------------

def _job_rows(node: Node) -> list[Any]:
    assert node.db is not None
    return node.db.query("SELECT * FROM jobs ORDER BY id")


def test_stat_series_sent_after_ten_routine_ones_is_analysed_before_them(
        make_node: Callable[..., Node], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = tmp_path / "gate"
    gate.write_text("closed: the worker waits until every series is queued")
    monkeypatch.setenv("ICH_TEST_GATE", str(gate))
    node = make_node(analyzer="tests.helpers.analyzers:gated")
    # The worker takes a first series and is held there: it is busy while the rest queue up.
    send(node.port, ct_series("busy"), calling_ae="WARD_CT")
    wait_until(lambda: [r["state"] for r in _job_rows(node)] == ["processing"],
               what="the worker to be busy with the first job")
    routine_uids = []
    for i in range(10):
        series = ct_series(f"routine-{i}", RequestedProcedurePriority="ROUTINE")
        routine_uids.append(str(series[0].SeriesInstanceUID))
        send(node.port, series, calling_ae="WARD_CT")
    wait_until(lambda: len(_job_rows(node)) == 11, what="ten routine jobs")
    stat = ct_series("stat", RequestAttributesSequence=[
        header(RequestedProcedureID="RP1", RequestedProcedurePriority="STAT")])
    send(node.port, stat, calling_ae="WARD_CT")
    wait_until(lambda: len(_job_rows(node)) == 12, what="the STAT job")
    gate.unlink()
    wait_until(lambda: all(r["state"] == "done" for r in _job_rows(node)), timeout=60,
               what="all twelve jobs done")

    rows = _job_rows(node)
    by_uid = {r["series_uid"]: r for r in rows}
    stat_job = by_uid[str(stat[0].SeriesInstanceUID)]
    assert (stat_job["priority"], stat_job["priority_reason"]) == (100, "stat")
    assert {(by_uid[u]["priority"], by_uid[u]["priority_reason"]) for u in routine_uids} == \
        {(0, "default")}
    started = [r["series_uid"] for r in sorted(rows, key=lambda r: r["started_at"])]
    assert started[1] == str(stat[0].SeriesInstanceUID), started
    # Then the routine ones, oldest job first.
    assert started[2:] == [r["series_uid"] for r in rows if r["series_uid"] in routine_uids]
    assert stat_job["id"] == max(r["id"] for r in rows)  # it really came last


@pytest.fixture
def receivers() -> Iterator[tuple[Receiver, Receiver]]:
    normal = Receiver(free_port(), ae_title="PACS").start()
    urgent = Receiver(free_port(), ae_title="URGENT_READ").start()
    yield normal, urgent
    normal.stop()
    urgent.stop()


def test_positive_result_reaches_the_urgent_destination_negative_does_not(
        make_node: Callable[..., Node], receivers: tuple[Receiver, Receiver]) -> None:
    normal, urgent = receivers
    node = make_node(
        analyzer="tests.helpers.analyzers:bleed",
        destinations=[
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": normal.port},
            {"name": "urgent-read", "ae_title": "URGENT_READ", "host": "127.0.0.1",
             "port": urgent.port}],
        triage={"urgent_destinations": ["urgent-read"]})
    negative = ct_series("negative", SeriesDescription="HEAD 5mm")
    positive = ct_series("positive", SeriesDescription="HEAD 5mm BLEED")
    send(node.port, negative, calling_ae="WARD_CT")
    send(node.port, positive, calling_ae="WARD_CT")
    assert node.db is not None
    db = node.db
    wait_until(lambda: [r["state"] for r in db.query("SELECT state FROM outbound")]
               == ["sent"] * 3, timeout=30, what="three result sets sent")

    jobs = {r["series_uid"]: r for r in _job_rows(node)}
    pos_job = jobs[str(positive[0].SeriesInstanceUID)]
    neg_job = jobs[str(negative[0].SeriesInstanceUID)]
    assert (pos_job["urgent"], neg_job["urgent"]) == (1, 0)
    assert json.loads(pos_job["findings"])["positive"] is True
    rows = db.query("SELECT job_id, destination, urgent FROM outbound ORDER BY id")
    assert sorted((r["job_id"], r["destination"], r["urgent"]) for r in rows) == sorted([
        (neg_job["id"], "pacs", 0), (pos_job["id"], "pacs", 1),
        (pos_job["id"], "urgent-read", 1)])
    # What arrived: both results at PACS, only the positive one at the urgent worklist.
    pos_results = {str(ds.StudyInstanceUID) for ds in urgent.datasets.values()}
    assert pos_results == {str(positive[0].StudyInstanceUID)}
    assert urgent.total() == 1
    assert normal.total() == 2


def test_triage_rules_apply_in_the_running_node_with_a_fixed_clock(
        make_node: Callable[..., Node]) -> None:
    node = make_node(triage={"rules": [
        {"name": "er-night", "priority": 90, "calling_aes": ["ER_CT"],
         "time_of_day": "22:00-07:00"}]})
    node.triage.clock = lambda: NIGHT
    send(node.port, ct_series("er"), calling_ae="ER_CT")
    send(node.port, ct_series("ward"), calling_ae="WARD_CT")
    wait_until(lambda: len(_job_rows(node)) == 2, what="two jobs")
    reasons = {r["calling_ae"]: (r["priority"], r["priority_reason"]) for r in _job_rows(node)}
    assert reasons == {"ER_CT": (90, "er-night"), "WARD_CT": (0, "default")}


def test_triage_object_reads_one_header_only_when_a_rule_needs_it(tmp_path: Path) -> None:
    db = StateDB(tmp_path)
    try:
        t = Triage(triage(rules=[{"name": "er", "priority": 5, "calling_aes": ["ER"]}]), db,
                   clock=lambda: DAY)
        assert t.for_series("1.2.3", "ER") == Decision(5, "er")  # no instance, no read
        t.update(NodeConfig().triage)
        assert t.for_series("1.2.3", "ER") == Decision(0, "default (header unreadable)")
    finally:
        db.close()
