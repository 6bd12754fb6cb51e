"""Fixtures: one positive and one negative analysis, their results written to disk."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from pipeline.findings import Findings
from pipeline.volume import Volume
from sr_writer.config import ResultsConfig
from sr_writer.results import write_results
from tests.sr_writer.factory import findings_for, positive_case

NOW = datetime.datetime(2024, 1, 2, 3, 4, 5)


@dataclass
class Case:
    """One analysis and its written results."""

    headers: list[Dataset]
    volume: Volume
    findings: Findings
    results: list[Dataset]
    files: list[Path]  # results saved as Part 10 files, same order

    def by_modality(self, modality: str) -> list[Dataset]:
        """The results of one Modality (SR, SEG, OT)."""
        return [ds for ds in self.results if ds.Modality == modality]

    def file_of(self, modality: str) -> Path:
        """The file of the first result of ``modality``."""
        for ds, path in zip(self.results, self.files, strict=True):
            if ds.Modality == modality:
                return path
        raise LookupError(modality)


def save_all(results: list[Dataset], directory: Path) -> list[Path]:
    """Write every result as a DICOM Part 10 file."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, ds in enumerate(results):
        path = directory / f"{k:02d}_{ds.Modality}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@pytest.fixture(scope="package")
def positive(tmp_path_factory: pytest.TempPathFactory) -> Case:
    """Subdural crescent and intraparenchymal blob on a 64 x 64 x 12 head series."""
    root = tmp_path_factory.mktemp("positive")
    headers, volume, findings = positive_case(root / "series")
    results = write_results(headers, volume, findings, ResultsConfig(), now=NOW)
    return Case(headers, volume, findings, results, save_all(results, root / "out"))


@pytest.fixture(scope="package")
def negative(tmp_path_factory: pytest.TempPathFactory) -> Case:
    """The same series, nothing found."""
    root = tmp_path_factory.mktemp("negative")
    headers, volume, _ = positive_case(root / "series")
    findings = findings_for(volume, None)
    results = write_results(headers, volume, findings, ResultsConfig(), now=NOW)
    return Case(headers, volume, findings, results, save_all(results, root / "out"))
