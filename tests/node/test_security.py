"""Spool permissions after a real run, crafted UIDs over a real association, and the
logging set-up that keeps pynetdicom's dataset dumps out of the logs."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydicom import config as pydicom_config

from node import handlers
from node.app import Node
from node.config import LoggingConfig
from node.logs import setup_logging
from node.spool import safe_name
from tests.helpers.ctseries import make_ct_slice, write_series
from tests.helpers.net import free_port, pynetdicom_send, wait_until
from tests.helpers.receiver import Receiver

ROOT = "1.2.826.0.1.3680043.8.498.95."


@pytest.fixture
def loose_umask() -> Iterator[None]:
    """Run with umask 022, so that only the node's own modes can make files private."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def _modes(root: Path) -> dict[str, str]:
    """Every path under *root* that is not owner-only: {relative path: mode}."""
    loose = {}
    for path in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        want = 0o700 if path.is_dir() else 0o600
        if mode != want:
            loose[str(path.relative_to(root))] = oct(mode)
    return loose


def test_spool_is_owner_only_after_a_run(make_node: Callable[..., Node], tmp_path: Path,
                                         loose_umask: None) -> None:
    """Instances, results, job reports, tmp, state.db and its WAL files: folders 0700,
    files 0600, even with umask 022 and a spool folder that existed with mode 0755."""
    receiver = Receiver(free_port()).start()
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o755)
    try:
        node = make_node(spool_dir=spool, destinations=[{
            "name": "pacs", "ae_title": "RESULTS", "host": "127.0.0.1",
            "port": receiver.port}])
        series = write_series(tmp_path / "in", 4, rows=32, seed=91)
        assert pynetdicom_send(node.port, series.files) == [0] * 4
        wait_until(lambda: receiver.total() == 1, 30, what="the result delivered")
        wait_until(lambda: any((spool / "jobs").iterdir()), 10, what="the job report")
    finally:
        receiver.stop()
    names = {p.name for p in spool.rglob("*")}
    assert {"state.db", "state.db-wal", "tmp", "instances", "results", "jobs"} <= names
    assert len(list((spool / "instances").rglob("*.dcm"))) == 4
    assert any((spool / "results").rglob("*.dcm"))
    assert _modes(spool) == {}


@pytest.fixture
def lenient_pydicom() -> Iterator[None]:
    """Let pydicom write data sets with broken UIDs (what a hostile peer sends)."""
    old = pydicom_config.settings.writing_validation_mode
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    yield
    pydicom_config.settings.writing_validation_mode = old


CRAFTED = {
    "sop ../ escape": ("SOPInstanceUID", "../../../../../../escaped"),
    "sop absolute": ("SOPInstanceUID", "/tmp/ich-node-escaped"),
    "study ../": ("StudyInstanceUID", "../../../.."),
    "study dots only": ("StudyInstanceUID", ".."),
    "series slash": ("SeriesInstanceUID", "1.2/../../../../escaped"),
    "series NUL": ("SeriesInstanceUID", "1.2.3\x00/../../escaped"),
    "series 200 chars": ("SeriesInstanceUID", "1." * 99 + "1"),
    "study newline": ("StudyInstanceUID", "1.2\nCRITICAL forged log line"),
}


def test_crafted_uids_are_refused_and_nothing_leaves_the_spool(
        make_node: Callable[..., Node], tmp_path: Path, lenient_pydicom: None,
        caplog: pytest.LogCaptureFixture) -> None:
    node = make_node()
    before = {p for p in tmp_path.rglob("*") if "spool" not in p.parts}
    datasets = []
    for index, (keyword, value) in enumerate(CRAFTED.values()):
        ds = make_ct_slice(ROOT + "1", ROOT + "2", ROOT + "3", index, len(CRAFTED), rows=16)
        setattr(ds, keyword, value)
        if keyword == "SOPInstanceUID":
            ds.file_meta.MediaStorageSOPInstanceUID = value
        datasets.append(ds)
    good = make_ct_slice(ROOT + "1", ROOT + "2", ROOT + "3", 99, 100, rows=16)
    with caplog.at_level(logging.WARNING):
        statuses = pynetdicom_send(node.port, [*datasets, good])
    assert statuses == [handlers.CANNOT_UNDERSTAND_INVALID_UID] * len(CRAFTED) + [0]
    assert node.metrics.registry.get_sample_value(
        "ich_node_store_failures_total", {"reason": "invalid_uid"}) == len(CRAFTED)
    # Nothing new outside the spool; inside, only the good instance, where it belongs.
    after = {p for p in tmp_path.rglob("*") if "spool" not in p.parts}
    assert after == before
    assert not Path("/tmp/ich-node-escaped").exists()
    spooled = list(node.spool.root.rglob("*.dcm"))
    assert spooled == [node.spool.instances_dir / (ROOT + "1") / (ROOT + "2") /
                       f"{good.SOPInstanceUID}.dcm"]
    # A peer cannot forge log lines through a UID.
    assert not any(line.startswith("CRITICAL") for line in caplog.text.splitlines())


@given(st.text(max_size=300))
def test_safe_name_never_leaves_its_folder(value: str) -> None:
    name = safe_name(value)
    assert name not in ("", ".", "..")
    assert "/" not in name and "\x00" not in name and len(name) <= 64
    base = Path("/spool/instances")
    assert (base / name).resolve().parent == base


def test_pynetdicom_dataset_dumps_stay_out_of_debug_logs() -> None:
    """At DEBUG, pynetdicom would print every PDU and data set (patient names included);
    ``setup_logging`` keeps its logger at WARNING or above whatever the level."""
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    try:
        setup_logging(LoggingConfig(level="DEBUG", format="json"))
        assert logging.getLogger("pynetdicom").getEffectiveLevel() >= logging.WARNING
        assert not logging.getLogger("pynetdicom.dsutils").isEnabledFor(logging.INFO)
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[1]:
            root.addHandler(handler)
        root.setLevel(saved[0])


def test_library_messages_that_quote_values_are_withheld(
        capsys: pytest.CaptureFixture[str]) -> None:
    """pydicom quotes the offending value when it breaks its VR, through its logger and
    through ``warnings``; both reach the log with the value withheld."""
    import warnings

    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    try:
        # An earlier test may have left logging's capture half on (its saved showwarning set
        # while pytest restored its own): start from a clean state, as a node process does.
        logging.captureWarnings(False)
        setup_logging(LoggingConfig(level="DEBUG", format="text"))
        logging.getLogger("pydicom").warning("Invalid value for VR DA: '1937-04-12'.")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("Invalid value for VR PN: 'Kowalczykowna^Wilhelmina'", UserWarning,
                          stacklevel=1)
        logging.getLogger("node.test").info("series 1.2.3 from 'CT_1'")
    finally:
        logging.captureWarnings(False)
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[1]:
            root.addHandler(handler)
        root.setLevel(saved[0])
    err = capsys.readouterr().err
    assert "1937-04-12" not in err and "Kowalczykowna" not in err
    assert "VR DA: '<withheld>'" in err and "VR PN: '<withheld>'" in err
    assert "from 'CT_1'" in err  # our own messages are written as they are
