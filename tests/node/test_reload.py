"""Configuration reload (SIGHUP): new destinations, rules and allowlists apply without a
restart, open associations keep working, an invalid file changes nothing."""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from node.app import Node
from node.config import NodeConfig, load_config
from node.reload import plan
from tests.conftest import node_config
from tests.helpers.net import _nodelay, free_port, wait_until
from tests.helpers.receiver import Receiver
from tests.node.test_restart import NodeProcess
from tests.node.test_triage import ct_series, send


def _dest(name: str, port: int) -> dict[str, Any]:
    return {"name": name, "ae_title": "RESULTS", "host": "127.0.0.1", "port": port}


def test_plan_applies_what_it_can_and_names_what_needs_a_restart() -> None:
    running = load_config(None, {"dicom": {"port": 104}, "destinations": [_dest("a", 1)]},
                          environ={})
    loaded = load_config(None, {
        "dicom": {"port": 11112, "ae_title": "OTHER", "allowed_calling_aes": ["CT_B"]},
        "spool": {"path": "/elsewhere"},
        "destinations": [_dest("b", 2)],
        "outbound": {"max_attempts": 3},
        "triage": {"default_priority": 7},
    }, environ={})
    new = plan(running, loaded)
    assert new.applied == ["destinations", "dicom.allowed_calling_aes", "outbound.max_attempts",
                           "triage.default_priority"]
    assert new.needs_restart == ["dicom.ae_title", "dicom.port", "spool.path"]
    assert (new.config.dicom.port, new.config.dicom.ae_title) == (104, "ICH_NODE")
    assert new.config.spool == running.spool
    assert [d.name for d in new.config.destinations] == ["b"]
    assert new.config.triage.default_priority == 7
    assert plan(running, running).applied == plan(running, running).needs_restart == []


@pytest.fixture
def receivers() -> Iterator[tuple[Receiver, Receiver]]:
    first, second = Receiver(free_port()).start(), Receiver(free_port()).start()
    yield first, second
    first.stop()
    second.stop()


def _open(port: int, calling_ae: str) -> Association:
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(CTImageStorage)
    return ae.associate("127.0.0.1", port, ae_title="ICH_NODE",
                        evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)])


def _destinations_of(node: Node, series: list[Dataset]) -> list[str]:
    assert node.db is not None
    return [r["destination"] for r in node.db.query(
        "SELECT o.destination FROM outbound o JOIN jobs j ON j.id = o.job_id"
        " WHERE j.series_uid = ? ORDER BY o.id", (str(series[0].SeriesInstanceUID),))]


def test_reload_applies_destinations_and_allowlists_while_an_association_stays_open(
        make_node: Callable[..., Node], tmp_path: Path, receivers: tuple[Receiver, Receiver],
        caplog: pytest.LogCaptureFixture) -> None:
    first, second = receivers
    node = make_node(dicom={"allowed_calling_aes": ["CT_A"]},
                     destinations=[_dest("first", first.port)])
    sources: dict[str, Any] = {"dicom": {"allowed_calling_aes": ["CT_B"]},
                               "destinations": [_dest("second", second.port)]}

    def loader() -> NodeConfig:
        return node_config(tmp_path / "spool", **sources)

    node.loader = loader
    series = ct_series("across-reload")
    assoc = _open(node.port, "CT_A")
    assert assoc.is_established
    try:
        assert assoc.send_c_store(series[0]).Status == 0
        assert node.reload()
        assert assoc.send_c_store(series[1]).Status == 0  # the same association, after it
    finally:
        assoc.release()
    refused = _open(node.port, "CT_A")
    assert refused.is_rejected
    send(node.port, ct_series("after"), calling_ae="CT_B")
    wait_until(lambda: second.total() == 2, what="both results at the new destination")
    assert _destinations_of(node, series) == ["second"]
    assert first.total() == 0

    sources["destinations"] = [{**_dest("second", second.port), "port": 70000}]
    with caplog.at_level(logging.ERROR, logger="node.app"):
        assert not node.reload()
    assert "destinations.0.port" in caplog.text
    assert 'ich_node_config_reloads_total{outcome="invalid"} 1.0' in node.metrics.render().decode()
    assert [d.name for d in node.config.destinations] == ["second"]
    assert node.config.dicom.allowed_calling_aes == ["CT_B"]


def _rewrite(path: Path, **changes: Any) -> None:
    data = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        section, _, sub = key.partition("__")
        if sub:
            data.setdefault(section, {})[sub] = value
        else:
            data[section] = value
    path.write_text(yaml.safe_dump(data))


@pytest.fixture
def node_proc(tmp_path: Path, receivers: tuple[Receiver, Receiver]) -> Iterator[NodeProcess]:
    node = NodeProcess(tmp_path, receivers[0].port)
    yield node
    if node.proc is not None and node.proc.poll() is None:
        node.kill9()


def test_sighup_reloads_a_running_node_process(node_proc: NodeProcess,
                                               receivers: tuple[Receiver, Receiver]) -> None:
    first, second = receivers
    node_proc.start()
    assert node_proc.proc is not None
    send(node_proc.port, ct_series("before"), calling_ae="CT_A")
    wait_until(lambda: first.total() == 1, what=f"first result\n{node_proc.log_text()}")

    series = ct_series("across-sighup")
    assoc = _open(node_proc.port, "CT_A")
    assert assoc.is_established
    try:
        assert assoc.send_c_store(series[0]).Status == 0
        _rewrite(node_proc.config, destinations=[_dest("second", second.port)],
                 dicom__ae_title="RENAMED")
        node_proc.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "configuration reloaded" in node_proc.log_text(),
                   what=f"the reload\n{node_proc.log_text()}")
        assert assoc.send_c_store(series[1]).Status == 0
    finally:
        assoc.release()
    wait_until(lambda: second.total() == 1, what=f"result at the new destination\n"
               f"{node_proc.log_text()}")
    log = node_proc.log_text()
    assert "dicom.ae_title changed but needs restart" in log
    assert node_proc.query("SELECT o.destination FROM outbound o JOIN jobs j ON j.id = o.job_id"
                           f" WHERE j.series_uid = '{series[0].SeriesInstanceUID}'") == \
        [("second",)]

    _rewrite(node_proc.config, destinations=[{**_dest("second", second.port), "port": 0}])
    node_proc.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "reload refused" in node_proc.log_text(),
               what=f"the refusal\n{node_proc.log_text()}")
    assert "destinations.0.port" in node_proc.log_text()
    # The old configuration stays: the listener answers as before, results go to "second".
    send(node_proc.port, ct_series("after"), calling_ae="CT_A")
    wait_until(lambda: second.total() == 2, what=f"second result\n{node_proc.log_text()}")
    assert first.total() == 1
    assert node_proc.terminate() == 0
