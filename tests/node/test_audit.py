"""The audit log: one JSON object per line, owner-only, whole lines under concurrent
appends from several processes, size-capped rotation, no free-form fields."""

from __future__ import annotations

import json
import multiprocessing
import stat
from pathlib import Path

import pytest

from node.audit import AUDIT_FIELDS, AuditError, AuditLog, error_kind

WRITERS = 4
LINES_PER_WRITER = 250


def _lines(directory: Path) -> list[dict[str, object]]:
    records = []
    for path in sorted(directory.glob("audit.jsonl*")):
        if path.name.endswith(".lock"):
            continue
        for line in path.read_text(encoding="ascii").splitlines():
            records.append(json.loads(line))  # a torn or interleaved line fails here
    return records


def test_one_json_object_per_line_owner_only(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl", max_bytes=1 << 20, keep=3, fsync=False)
    log.record("received", job_id=7, series_uid="1.2.3.4", study_uid="1.2.3",
               calling_ae="CT_1", instances=40, latency_seconds=1.23456)
    log.record("notified", job_id=7, channel="webhook", target="on-call", outcome="delivered")
    assert stat.S_IMODE((tmp_path / "audit.jsonl").stat().st_mode) == 0o600
    first, second = _lines(tmp_path)
    assert first["event"] == "received" and first["job_id"] == 7
    assert first["latency_seconds"] == 1.235 and isinstance(first["pid"], int)
    assert str(first["ts"]).endswith("+00:00")
    assert second["event"] == "notified" and second["target"] == "on-call"


def test_unknown_events_fields_and_values_are_refused(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl", max_bytes=1 << 20, keep=3, fsync=False)
    with pytest.raises(AuditError, match="unknown audit event"):
        log.record("viewed", job_id=1)
    with pytest.raises(AuditError, match="patient_name"):
        log.record("received", job_id=1, patient_name="DOE^JOHN")  # type: ignore[arg-type]
    with pytest.raises(AuditError, match="must be a str"):
        log.record("received", job_id=1, series_uid=["1.2"])  # type: ignore[arg-type]
    assert not (tmp_path / "audit.jsonl").exists()
    assert not any("patient" in key or "name" in key for key in AUDIT_FIELDS)


def test_existing_file_is_made_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_text("")
    path.chmod(0o644)
    AuditLog(path, max_bytes=1 << 20, keep=3, fsync=False)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_rotation_keeps_the_configured_number_of_files(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl", max_bytes=2000, keep=2, fsync=False)
    for i in range(200):
        log.record("sent", job_id=i, destination="pacs", outcome="sent", attempt=1)
    names = sorted(p.name for p in tmp_path.glob("audit.jsonl*") if not p.name.endswith(".lock"))
    assert names == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    ids = [r["job_id"] for r in _lines(tmp_path)]
    assert max(ids) == 199  # the newest lines are kept, the oldest dropped
    for name in names:
        assert (tmp_path / name).stat().st_size < 2000 + 200


def test_a_failed_write_is_reported_not_raised(tmp_path: Path) -> None:
    (tmp_path / "audit.jsonl").mkdir()  # cannot be opened for writing
    errors: list[str] = []
    log = AuditLog(tmp_path / "audit.jsonl", max_bytes=1 << 20, keep=3, fsync=False,
                   on_error=errors.append)
    log.record("analysed", job_id=1, outcome="done")
    assert errors == ["IsADirectoryError"]


def _writer(path: str, writer: int) -> None:
    log = AuditLog(Path(path), max_bytes=64 * 1024, keep=1000, fsync=False)
    for i in range(LINES_PER_WRITER):
        log.record("analysed", job_id=writer * 100000 + i, outcome="done",
                   series_uid="1.2.826.0.1.3680043.8.498." + str(i) * 40,
                   target="x" * 600)


def test_processes_append_whole_lines_through_rotations(tmp_path: Path) -> None:
    """Several processes write ~900-byte lines at once into a file that rotates every
    64 KiB: every line parses and none is lost or doubled."""
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path / "audit.jsonl"), w))
             for w in range(WRITERS)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
        assert proc.exitcode == 0
    records = _lines(tmp_path)
    ids = sorted(int(str(r["job_id"])) for r in records)
    assert ids == sorted(w * 100000 + i for w in range(WRITERS) for i in range(LINES_PER_WRITER))
    assert len(list(tmp_path.glob("audit.jsonl.*[0-9]"))) >= 3  # it did rotate


def test_error_kind_of_stored_reasons() -> None:
    assert error_kind("SeriesRejected: only 3 slice(s)") == "SeriesRejected"
    assert error_kind("interrupted 3 times (worker.max_job_attempts=3): ...") == "interrupted"
    assert error_kind(None) is None
    assert error_kind("1.2.3 broke") == "error"
