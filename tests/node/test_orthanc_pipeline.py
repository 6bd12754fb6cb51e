"""End to end with the REAL pipeline and a real PACS.

Orthanc holds two phantom studies (an intraparenchymal bleed and a negative head). Like a
PACS auto-routing rule, it pushes them to the node over DICOM (REST
``/modalities/{id}/store``); the node analyses them with the shipped demo weights in its
worker process and sends the SR, SEG and preview series back. Everything is then read
through Orthanc's REST API: the results are listed under the SAME study (no new study),
the SR states the phantom's truth, the SEG exists for the positive study only, the
preview series exists for both.

Studies are small (24 slices of 128 x 128) to keep CPU inference short; the demo weights
find a 20 mL intraparenchymal bleed reliably (held-out intraparenchymal Dice 0.96 in
MODEL_CARD.md), which is why it is the positive case here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, dcmread

from node.app import Node
from node.worker import REAL_ANALYZER
from pipeline.phantom import PhantomStudy, generate_study, write_dicom_series
from sr_writer.readback import read_sr
from tests.helpers.net import wait_until
from tests.helpers.orthanc import OrthancServer

pytestmark = [pytest.mark.orthanc, pytest.mark.timeout(300)]

SLICES, MATRIX = 24, 128
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancServer]:
    with OrthancServer(tmp_path / "orthanc") as server:
        yield server


def _upload(orthanc: OrthancServer, study: PhantomStudy, folder: Path) -> str:
    parents = {orthanc.upload(path)["ParentStudy"] for path in write_dicom_series(study, folder)}
    assert len(parents) == 1, parents
    return parents.pop()


def _by_modality(orthanc: OrthancServer, study_id: str) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for series in orthanc.series_of_study(study_id):
        found.setdefault(series["MainDicomTags"].get("Modality", ""), []).append(series)
    return found


def _instance(orthanc: OrthancServer, series: dict[str, Any]) -> Dataset:
    """The first instance of an Orthanc series, downloaded as a Part 10 file."""
    raw = orthanc.get(f"/instances/{series['Instances'][0]}/file")
    return dcmread(BytesIO(raw))


def test_orthanc_routes_phantom_studies_through_the_real_pipeline(
        tmp_path: Path, orthanc: OrthancServer, make_node: Callable[..., Node]) -> None:
    node = make_node(analyzer=REAL_ANALYZER,
                     destinations=[{"name": "pacs", "ae_title": orthanc.aet,
                                    "host": "127.0.0.1", "port": orthanc.dicom_port}])
    orthanc.add_modality("ichnode", node.config.dicom.ae_title, "127.0.0.1", node.port)
    bleed = generate_study(17, subtypes=["intraparenchymal:20"], slices=SLICES, matrix=MATRIX)
    negative = generate_study(3, subtypes=[], slices=SLICES, matrix=MATRIX)
    assert bleed.subtypes == ("intraparenchymal",) and negative.subtypes == ()
    bleed_id = _upload(orthanc, bleed, tmp_path / "bleed")
    negative_id = _upload(orthanc, negative, tmp_path / "negative")

    answer = orthanc.store_to_modality("ichnode", [bleed_id, negative_id])
    assert answer.get("FailedInstancesCount", 0) == 0, answer
    wait_until(lambda: node.outbound.counts()["sent"] == 2, timeout=240, interval=0.5,
               what="both studies' results sent back to Orthanc")
    assert node.jobs.counts()["done"] == 2, node.jobs.counts()

    assert sorted(orthanc.study_ids()) == sorted([bleed_id, negative_id]), \
        "results must go into the source studies, not open new ones"
    for study_id, study in ((bleed_id, bleed), (negative_id, negative)):
        tags = orthanc.get(f"/studies/{study_id}")["MainDicomTags"]
        assert tags["StudyInstanceUID"] == study.identity.study_instance_uid

    # the positive study: SR with the truth, SEG with the bleed, previews
    series = _by_modality(orthanc, bleed_id)
    assert sorted(series) == ["CT", "OT", "SEG", "SR"], sorted(series)
    assert len(series["CT"][0]["Instances"]) == SLICES
    sr = _instance(orthanc, series["SR"][0])
    assert sr.SOPClassUID == SR_CLASS
    assert sr.StudyInstanceUID == bleed.identity.study_instance_uid
    reported = read_sr(sr)
    assert reported.positive and reported.urgent
    assert reported.labels["intraparenchymal"].present
    truth_ml = bleed.volume_ml()["intraparenchymal"]
    assert 0.5 * truth_ml <= reported.volumes_ml["intraparenchymal"] <= 1.5 * truth_ml, \
        (reported.volumes_ml, truth_ml)
    assert reported.demo_warning is not None
    seg = _instance(orthanc, series["SEG"][0])
    assert seg.SOPClassUID == SEG_CLASS
    assert seg.StudyInstanceUID == bleed.identity.study_instance_uid
    assert "Intraparenchymal hemorrhage" in [s.SegmentLabel for s in seg.SegmentSequence]
    referenced = seg.ReferencedSeriesSequence[0].SeriesInstanceUID
    assert referenced == bleed.identity.series_instance_uid
    preview = _instance(orthanc, series["OT"][0])
    assert preview.SOPClassUID == SECONDARY_CAPTURE
    assert preview.StudyInstanceUID == bleed.identity.study_instance_uid

    # the negative study: SR says negative, no SEG, a preview
    series = _by_modality(orthanc, negative_id)
    assert sorted(series) == ["CT", "OT", "SR"], sorted(series)
    reported = read_sr(_instance(orthanc, series["SR"][0]))
    assert not reported.positive and not reported.urgent
    assert not any(label.present for label in reported.labels.values())
    assert reported.volumes_ml == {}
    assert _instance(orthanc, series["OT"][0]).StudyInstanceUID == \
        negative.identity.study_instance_uid
