"""``ich-node demo`` as a subprocess: node, result receiver and phantom studies on this
machine; its table agrees with the SRs it received, and a failed job makes it exit 1.

Two small studies (24 slices of 128 x 128) instead of the six of the default demo keep
the test short; the default run is timed in README.md.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom import dcmread

from sr_writer.readback import read_sr

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[2]
SMALL = ["--slices", "24", "--matrix", "128", "--quiet-seconds", "1"]


def _demo(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node.cli", "demo", *SMALL, *args],
                          capture_output=True, text=True, cwd=REPO, timeout=280,
                          env=dict(os.environ, **(env or {})))


def test_demo_prints_findings_against_truth_and_keeps_the_results(tmp_path: Path) -> None:
    result = _demo("--workdir", str(tmp_path / "demo"), "--cases", "negative",
                   "intraparenchymal")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "DEMO WEIGHTS" in out
    rows = {m["study"]: m for m in re.finditer(
        r"^(?P<study>negative|intraparenchymal)\s+(?P<truth>negative|intraparenchymal [\d.]+ mL)"
        r"\s+(?P<finding>POSITIVE|negative)\s+.*?\s(?P<volume>[\d.]+)\s+(?P<match>yes|partly|NO)$",
        out, re.MULTILINE)}
    assert sorted(rows) == ["intraparenchymal", "negative"], out
    assert rows["negative"]["truth"] == "negative"

    folders = {m[1]: Path(m[2]) for m in re.finditer(r"^  (\w+): (.+)/$", out, re.MULTILINE)}
    assert sorted(folders) == sorted(rows), out
    assert sorted(folders.values()) == sorted(p for p in (tmp_path / "demo" / "received")
                                              .iterdir())
    for name, folder in folders.items():
        [sr_path] = folder.glob("SR_*.dcm")
        segs = list(folder.glob("SEG_*.dcm"))
        previews = list(folder.glob("OT_*.dcm"))
        listing = "\n".join(out.split(f"{folder}/\n")[1].splitlines()[:3])  # SR, SEG, previews
        assert sr_path.name in listing and f"preview images: {len(previews)}" in listing
        assert previews, f"no preview image in {folder}"
        reported = read_sr(dcmread(sr_path))
        row = rows[name]
        assert row["finding"] == ("POSITIVE" if reported.positive else "negative")
        assert float(row["volume"]) == pytest.approx(sum(reported.volumes_ml.values()), abs=0.06)
        assert bool(segs) == bool(reported.volumes_ml), (segs, reported.volumes_ml)
        if segs:
            assert segs[0].name in listing
        truth_positive = name != "negative"
        expected = "NO" if truth_positive != reported.positive else row["match"]
        assert row["match"] == expected
    assert (tmp_path / "demo" / "spool" / "state.db").exists()
    assert "finished in" in out


def test_demo_exits_1_when_a_job_fails(tmp_path: Path) -> None:
    result = _demo("--workdir", str(tmp_path / "demo"), "--cases", "negative",
                   env={"ICH_NODE__PIPELINE__SELECTION__MIN_SLICES": "100"})
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED: 1 job(s) failed" in result.stdout
    assert str(tmp_path / "demo" / "spool") in result.stdout
