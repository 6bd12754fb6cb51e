"""``read_sr`` gives back what the SR writer was given (read from the saved file)."""

from __future__ import annotations

import pytest
from pydicom import dcmread

from pipeline.findings import LABELS
from sr_writer import wording
from sr_writer.readback import ReadbackError, read_sr
from tests.sr_writer.conftest import Case


@pytest.mark.parametrize("case_name", ["positive", "negative"])
def test_read_sr_returns_the_findings_written(case_name: str,
                                              request: pytest.FixtureRequest) -> None:
    case: Case = request.getfixturevalue(case_name)
    reported = read_sr(dcmread(case.file_of("SR")))
    for label in LABELS:
        written = case.findings.labels[label]
        assert reported.labels[label].probability == pytest.approx(written.probability, abs=1e-6)
        assert reported.labels[label].present == written.positive
    assert reported.positive == case.findings.positive
    assert reported.urgent == case.findings.positive
    expected = {s: v for s, v in case.findings.volumes_ml().items() if v > 0}
    assert reported.volumes_ml == pytest.approx(expected)
    assert reported.impression == wording.impression(case.findings)
    assert reported.demo_warning == wording.DEMO_WARNING
    ranked = reported.top_subtypes(5)
    assert sorted(s for s, _ in ranked) == sorted(LABELS[1:])
    assert [p for _, p in ranked] == sorted((p for _, p in ranked), reverse=True)


def test_read_sr_names_a_missing_label(positive: Case) -> None:
    sr = dcmread(positive.file_of("SR"))
    measurements = next(item for item in sr.ContentSequence
                        if item.ConceptNameCodeSequence[0].CodeValue == "126010")
    del measurements.ContentSequence[0]  # the "any" classification group
    with pytest.raises(ReadbackError, match="no classification group for \\['any'\\]"):
        read_sr(sr)
