"""dicom3tools' dciodvfy finds no IOD errors in any result (warnings are allowed)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.sr_writer.conftest import Case

DCIODVFY = shutil.which("dciodvfy")


def dciodvfy_errors(path: str) -> list[str]:
    proc = subprocess.run([str(DCIODVFY), path], capture_output=True, text=True, timeout=60)
    lines = (proc.stdout + proc.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (Debian package dicom3tools) is not "
                    "installed")
@pytest.mark.parametrize("case_name", ["positive", "negative"])
def test_dciodvfy_reports_no_errors(case_name: str, request: pytest.FixtureRequest) -> None:
    case: Case = request.getfixturevalue(case_name)
    assert case.files
    for path, ds in zip(case.files, case.results, strict=True):
        assert dciodvfy_errors(str(path)) == [], f"{ds.Modality} {path.name}"
