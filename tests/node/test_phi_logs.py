"""No patient name or ID in any log line: ``ich-node run`` (real pipeline) at DEBUG, text
and JSON, receives series whose patient attributes are distinctive strings (analysed, or
failing in the SR writer on a birth date that is not a DA value; rejected by selection;
undecodable; refused at negotiation; refused with a status; storage commitment), and
every byte it printed is searched for them."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from pydicom import Dataset, dcmread
from pydicom import config as pydicom_config
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StorageCommitmentPushModel,
    StorageCommitmentPushModelInstance,
)

from tests.helpers.ctseries import make_ct_slice, write_series
from tests.helpers.net import free_port, pynetdicom_send, wait_until
from tests.helpers.receiver import Receiver

REPO = Path(__file__).resolve().parents[2]
ROOT = "1.2.826.0.1.3680043.8.498.94."

PHI = {
    "PatientName": "Kowalczykowna^Wilhelmina^Xanthippe",
    "PatientID": "PID-8675309-QX",
    "PatientBirthDate": "19370412",
    "AccessionNumber": "ACC-4242-QZ",
    "OtherPatientIDs": "OPID-271828-QW",
}
# Every string that must not appear (each name component alone, too).
NEEDLES = [*PHI.values(), *PHI["PatientName"].split("^"), "Kowalczykowna Wilhelmina",
           "1937-04-12"]
SLOPPY_BIRTH_DATE = "1937-04-12"  # not a DA value: pydicom quotes it in its messages


def _with_phi(ds: Dataset, birth_date: str = PHI["PatientBirthDate"]) -> Dataset:
    for keyword, value in PHI.items():
        setattr(ds, keyword, value)
    ds.PatientBirthDate = birth_date
    return ds


def _rewrite(files: list[Path], birth_date: str = PHI["PatientBirthDate"]) -> None:
    for path in files:
        _with_phi(dcmread(path), birth_date).save_as(path, enforce_file_format=True)


@pytest.fixture(autouse=True)
def _sloppy_sender() -> Iterator[None]:
    """Let this process write the non-conformant birth date (as a sloppy sender does)."""
    old = pydicom_config.settings.writing_validation_mode
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    yield
    pydicom_config.settings.writing_validation_mode = old


def _garbage_after_phi(tmp: Path) -> Path:
    """A data set whose patient module is intact and whose next element is nonsense."""
    ds = _with_phi(make_ct_slice(ROOT + "1", ROOT + "2", ROOT + "3", 0, 1, rows=16))
    path = tmp / "garbage.dcm"
    ds.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    cut = data.index(b"\x10\x00\x30\x00")  # (0010,0030) Patient's Birth Date, after the name
    path.write_bytes(data[:cut] + b"\x10\x00\x40\x00UI\xff\xff" + PHI["PatientID"].encode()
                     + bytes(range(256)) * 4)
    return path


def _send_raw(port: int, path: Path, sop_uid: str) -> int | None:
    from pynetdicom import _config

    ae = AE(ae_title="PHI_TEST")
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="ICH_NODE")
    assert assoc.is_established
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        return getattr(assoc.send_c_store(path), "Status", None)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
        assoc.release()


def _commit(port: int, refs: list[tuple[str, str]]) -> int | None:
    ae = AE(ae_title="PHI_TEST")
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate("127.0.0.1", port, ae_title="ICH_NODE")
    assert assoc.is_established
    info = Dataset()
    info.TransactionUID = generate_uid(ROOT)
    info.ReferencedSOPSequence = []
    for sop_class, sop_uid in refs:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop_uid
        info.ReferencedSOPSequence.append(item)
    try:
        status, _ = assoc.send_n_action(info, 1, StorageCommitmentPushModel,
                                        StorageCommitmentPushModelInstance)
        return getattr(status, "Status", None)
    finally:
        assoc.release()


def _jobs(spool: Path) -> list[str]:
    """Job states, read from the state database (no second process per poll)."""
    if not (spool / "state.db").exists():
        return []
    with sqlite3.connect(spool / "state.db", timeout=10) as conn:
        return sorted(r[0] for r in conn.execute("SELECT state FROM jobs"))


@pytest.mark.parametrize(("fmt", "birth_date", "jobs"), [
    ("text", SLOPPY_BIRTH_DATE, ["failed", "failed"]),  # the SR writer fails on the date
    ("json", PHI["PatientBirthDate"], ["done", "failed"]),
])
def test_no_patient_data_in_any_log_line(tmp_path: Path, fmt: str, birth_date: str,
                                         jobs: list[str]) -> None:
    from pipeline.phantom import write_studies

    port = free_port()
    receiver = Receiver(free_port()).start()
    spool = tmp_path / "spool"
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump({
        "dicom": {"host": "127.0.0.1", "port": port,
                  "allowed_calling_aes": ["PHI_TEST", "PYNETDICOM"]},
        "spool": {"path": str(spool), "min_free_mb": 1},
        "http": {"port": 0},
        "assembly": {"quiet_seconds": 1.0, "release_grace_seconds": 0.3},
        "logging": {"level": "DEBUG", "format": fmt},
        "destinations": [{"name": "pacs", "ae_title": "RESULTS", "host": "127.0.0.1",
                          "port": receiver.port}],
    }))
    log = tmp_path / "node.log"
    [study] = write_studies(tmp_path / "ph", 1, seed=23, subtypes=["subdural:20"], slices=20,
                            matrix=64)
    good = sorted((study.study_dir / "dicom").glob("*.dcm"))
    _rewrite(good, birth_date)
    short = write_series(tmp_path / "short", 3, rows=32, seed=62)  # rejected: < min_slices
    _rewrite(short.files)
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "node.cli", "run", "--config",
                                 str(config)], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONWARNINGS="default"))
    try:
        wait_until(lambda: _listening(port), 60, what="node listening")
        assert pynetdicom_send(port, good, calling_ae="PHI_TEST") == [0] * len(good)
        assert pynetdicom_send(port, short.files, calling_ae="PHI_TEST") == [0] * 3
        garbage = _send_raw(port, _garbage_after_phi(tmp_path), ROOT + "9")
        assert garbage is not None and 0xC000 <= garbage <= 0xCFFF
        bad_uid = _with_phi(make_ct_slice(ROOT + "1", ROOT + "2", ROOT + "3", 1, 2, rows=16))
        bad_uid.SeriesInstanceUID = "1.2.3.bad"
        assert pynetdicom_send(port, [bad_uid], calling_ae="PHI_TEST") == [0xC214]
        with pytest.raises(AssertionError, match="not established"):
            pynetdicom_send(port, good[:1], calling_ae="STRANGER")
        first = dcmread(good[0], stop_before_pixels=True)
        assert _commit(port, [(str(first.SOPClassUID), str(first.SOPInstanceUID)),
                              (str(CTImageStorage), generate_uid(ROOT))]) == 0
        wait_until(lambda: len(_jobs(spool)) == 2 and
                   set(_jobs(spool)) <= {"done", "failed"}, 180, what="both jobs finished")
        if "done" in jobs:
            wait_until(lambda: receiver.total() >= 3, 60, what="results delivered")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        receiver.stop()
    assert proc.returncode == 0
    text = log.read_text(errors="replace")
    leaks = [(needle, line) for line in text.splitlines() for needle in NEEDLES
             if needle.lower() in line.lower()]
    assert leaks == []
    # The run did log, at DEBUG, about each of these events.
    for expected in ("listening as", "refused with 0xC2", "rejected", "storage commitment",
                     "failed", "DEBUG", *(["results of study"] if "done" in jobs else [])):
        assert expected in text, expected
    assert _jobs(spool) == jobs, text[-3000:]
    # Job reports (not logs, but text the node writes) carry no patient data either.
    for report in (spool / "jobs").glob("*.json"):
        body = report.read_text()
        assert not [n for n in NEEDLES if n.lower() in body.lower()], report.name


def _listening(port: int) -> bool:
    ae = AE(ae_title="PHI_TEST")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="ICH_NODE")
    if not assoc.is_established:
        return False
    assoc.release()
    return True
