"""Patient names in non-ASCII character sets survive into every result, with the source's
Specific Character Set copied verbatim."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from pipeline.findings import Findings
from pipeline.volume import Volume
from sr_writer.config import ResultsConfig
from sr_writer.results import write_results
from tests.sr_writer.conftest import NOW
from tests.sr_writer.factory import positive_case, reencode

CASES = [
    ("ISO_IR 100", "Müller^Jürgen"),
    ("ISO_IR 192", "Müller^Jürgen"),
    ("ISO_IR 192", "Ångström^Zoë=山田^太郎"),
    (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう"),
    (["ISO 2022 IR 6", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう"),
]


@dataclass
class Analysis:
    headers: list[Dataset]
    volume: Volume
    findings: Findings


@pytest.fixture(scope="module")
def analysis(tmp_path_factory: pytest.TempPathFactory) -> Analysis:
    headers, volume, findings = positive_case(tmp_path_factory.mktemp("charset") / "series")
    return Analysis(headers, volume, findings)


def renamed(headers: list[Dataset], charset: str | list[str], name: str) -> list[Dataset]:
    """The headers as a scanner with this character set would have written them."""
    out = []
    for header in headers:
        ds = reencode(header)
        ds.SpecificCharacterSet = charset
        ds.PatientName = name
        out.append(reencode(ds))
    return out


@pytest.mark.parametrize(("charset", "name"), CASES)
def test_patient_name_survives(analysis: Analysis, charset: str | list[str], name: str,
                               tmp_path: Path) -> None:
    headers = renamed(analysis.headers, charset, name)
    assert str(headers[0].PatientName) == name
    results = write_results(headers, analysis.volume, analysis.findings, ResultsConfig(),
                            now=NOW)
    assert [ds.Modality for ds in results] == ["SR", "SEG", "OT", "OT", "OT"]
    for k, ds in enumerate(results):
        path = tmp_path / f"{k}.dcm"
        ds.save_as(path, enforce_file_format=True)
        back = dcmread(path)
        assert str(back.PatientName) == name, ds.Modality
        expected = charset if isinstance(charset, str) else list(charset)
        got = back.SpecificCharacterSet
        assert (got if isinstance(got, str) else list(got)) == expected, ds.Modality


def test_raw_bytes_use_the_source_encoding(analysis: Analysis) -> None:
    """Latin-1 on disk is Latin-1 in the result (not UTF-8 relabelled)."""
    headers = renamed(analysis.headers, "ISO_IR 100", "Müller^Jürgen")
    results = write_results(headers, analysis.volume, analysis.findings, ResultsConfig(),
                            now=NOW)
    buf = io.BytesIO()
    results[0].save_as(buf, enforce_file_format=True)
    assert "Müller^Jürgen".encode("latin-1") in buf.getvalue()
