"""Acceptance with a real PACS: Orthanc, started by the tests with its own config file
(not the Debian service), pushes a series to the node through its REST API
(``/modalities/{id}/store``); the node's results arrive back in Orthanc in the same study."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from node.app import Node
from tests.helpers.ctseries import SeriesOnDisk, write_series
from tests.helpers.net import wait_until
from tests.helpers.orthanc import OrthancServer

pytestmark = [pytest.mark.orthanc, pytest.mark.timeout(60)]

RESULT_DESCRIPTION = "TEST ANALYZER"  # tests.helpers.analyzers.summary


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancServer]:
    """Orthanc on free ports with its storage under tmp_path."""
    with OrthancServer(tmp_path / "orthanc") as server:
        yield server


def _node_for(make_node: Callable[..., Node], orthanc: OrthancServer) -> Node:
    """A node that sends its results to *orthanc*, registered there as ``ichnode``."""
    node = make_node(destinations=[{"name": "orthanc", "ae_title": orthanc.aet,
                                    "host": "127.0.0.1", "port": orthanc.dicom_port}])
    orthanc.add_modality("ichnode", node.config.dicom.ae_title, "127.0.0.1", node.port)
    return node


def _upload(orthanc: OrthancServer, series: SeriesOnDisk) -> str:
    """Upload every file over REST; return the Orthanc study id."""
    parents = {orthanc.upload(path)["ParentStudy"] for path in series.files}
    assert len(parents) == 1, parents
    return parents.pop()


def _series_by_description(orthanc: OrthancServer, study_id: str) -> dict[str, dict[str, Any]]:
    return {s["MainDicomTags"].get("SeriesDescription", ""): s
            for s in orthanc.series_of_study(study_id)}


def _push_and_wait_for_result(orthanc: OrthancServer, node: Node, study_id: str
                              ) -> dict[str, Any]:
    """Orthanc pushes the study to the node; wait until the result series is back."""
    answer = orthanc.store_to_modality("ichnode", [study_id])
    assert answer.get("FailedInstancesCount", 0) == 0, answer
    wait_until(lambda: len(orthanc.series_of_study(study_id)) == 2, timeout=20,
               what="the node's result series in Orthanc's study")
    found = _series_by_description(orthanc, study_id)
    assert RESULT_DESCRIPTION in found, sorted(found)
    wait_until(lambda: node.outbound.counts()["sent"] == 1, timeout=5,
               what="the outbound row to be marked sent")
    return found[RESULT_DESCRIPTION]


def test_orthanc_pushes_series_and_receives_results_in_same_study(
        tmp_path: Path, orthanc: OrthancServer, make_node: Callable[..., Node]) -> None:
    node = _node_for(make_node, orthanc)
    series = write_series(tmp_path / "series", 40, rows=64, seed=11)
    study_id = _upload(orthanc, series)
    assert orthanc.find_study(series.study_uid) == study_id

    result = _push_and_wait_for_result(orthanc, node, study_id)

    assert orthanc.study_ids() == [study_id], "results must not open a new study"
    assert result["ParentStudy"] == study_id
    assert orthanc.get(f"/studies/{study_id}")["MainDicomTags"]["StudyInstanceUID"] == \
        series.study_uid
    instances = orthanc.instances_of_series(result["ID"])
    assert len(instances) == 1
    tags = orthanc.simplified_tags(instances[0]["ID"])
    assert tags["StudyInstanceUID"] == series.study_uid
    assert tags["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
    source = _series_by_description(orthanc, study_id)["HEAD 5mm"]
    assert len(orthanc.instances_of_series(source["ID"])) == 40

    jobs = node.jobs.counts()
    assert jobs["done"] == 1 and sum(jobs.values()) == 1, f"one job for the series: {jobs}"
    outbound = node.outbound.counts()
    assert outbound["sent"] == 1 and sum(outbound.values()) == 1, outbound


def test_non_ascii_patient_name_survives_round_trip(
        tmp_path: Path, orthanc: OrthancServer, make_node: Callable[..., Node]) -> None:
    name = "Müller^Jürgen"
    node = _node_for(make_node, orthanc)
    series = write_series(tmp_path / "series", 8, rows=64, seed=12, patient_name=name)
    study_id = _upload(orthanc, series)
    source_instance = orthanc.instances_of_series(
        orthanc.series_of_study(study_id)[0]["ID"])[0]["ID"]
    assert orthanc.simplified_tags(source_instance)["PatientName"] == name

    result = _push_and_wait_for_result(orthanc, node, study_id)

    instance = orthanc.instances_of_series(result["ID"])[0]["ID"]
    tags = orthanc.simplified_tags(instance)
    assert tags["PatientName"] == name
    assert tags["SpecificCharacterSet"] == "ISO_IR 192"
    assert orthanc.study_ids() == [study_id]
    assert node.jobs.counts()["done"] == 1, node.jobs.counts()
