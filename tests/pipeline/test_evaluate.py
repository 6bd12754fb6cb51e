"""``ich-node evaluate`` end to end: generated CT-ICH files in, metrics and plots out."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from node.cli import main
from pipeline.evaluate import brier, reliability, roc_auc
from pipeline.findings import LABELS
from pipeline.models.config import WEIGHTS_DIR

PNG = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG, f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def test_brier_and_reliability() -> None:
    y = np.array([0, 0, 1, 1])
    assert brier(y, y.astype(float)) == 0.0
    assert brier(y, np.array([1.0, 1.0, 0.0, 0.0])) == 1.0
    assert brier(y, np.full(4, 0.5)) == 0.25
    p = np.array([0.05, 0.1, 0.12, 0.9, 0.95, 0.97, 0.5])
    xs, fr = reliability(np.array([0, 0, 1, 1, 1, 0, 1]), p, bins=10, least=2)
    # bins 0.0-0.1 (0.05) and 0.5-0.6 have one sample each and are left out.
    assert xs == pytest.approx([0.11, 0.94])
    assert fr == pytest.approx([0.5, 2 / 3])


@pytest.fixture(scope="module")
def ctich(tmp_path_factory: pytest.TempPathFactory) -> Path:
    phantom = pytest.importorskip("pipeline.phantom")
    data = tmp_path_factory.mktemp("ctich")
    summaries = phantom.write_studies(data, n=6, seed=11, slices=20, matrix=128, layout="ctich")
    positive = [bool(s.subtypes) for s in summaries]
    assert any(positive) and not all(positive), "the seed must give positive and negative studies"
    return data


def test_evaluate_writes_metrics_series_and_plots(ctich: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report"
    rc = main(["evaluate", "--data", str(ctich), "--format", "ctich", "--out", str(out),
               "--weights", str(WEIGHTS_DIR / "classifier.pt"), "--no-fusion"])
    assert rc == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    series = json.loads((out / "series.json").read_text())
    assert metrics["series"] == len(series) == 6
    assert list(metrics["labels"]) == list(LABELS)
    # --no-fusion: the bundle is the two networks only.
    assert "fusion" not in metrics["model"]["name"]
    assert metrics["data"]["format"] == "ctich" and metrics["data"]["phantom_version"] is None
    y = np.array([s["labels"] for s in series])
    p = np.array([s["probabilities"] for s in series])
    assert y[:, 0].any() and not y[:, 0].all()
    anyl = metrics["labels"]["any"]
    assert anyl["auc_series"] == pytest.approx(roc_auc(y[:, 0], p[:, 0]), abs=1e-6)
    assert anyl["brier_series"] == pytest.approx(float(np.mean((p[:, 0] - y[:, 0]) ** 2)),
                                                 abs=1e-6)
    assert 0.0 <= anyl["brier_slice"] <= 1.0
    assert anyl["series_positive"] == int(y[:, 0].sum())
    assert metrics["segmentation"]["series_with_reference"] == 6
    for name in ("roc_series", "roc_slice", "calibration", "bland_altman"):
        assert (out / f"{name}.png").stat().st_size > 1000
    width, height = png_size(out / "calibration.png")
    assert width == 2 * height  # series and slice panels side by side


def test_evaluate_refuses_weights_without_metadata(ctich: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    lone = tmp_path / "lone.pt"
    shutil.copy(WEIGHTS_DIR / "classifier.pt", lone)
    rc = main(["evaluate", "--data", str(ctich), "--format", "ctich",
               "--out", str(tmp_path / "r1"), "--weights", str(lone)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "lone.json is missing" in err
    assert not (tmp_path / "r1" / "metrics.json").exists()

    rc = main(["evaluate", "--data", str(ctich), "--format", "ctich",
               "--out", str(tmp_path / "r2"), "--weights", str(WEIGHTS_DIR / "classifier.pt"),
               "--weights", str(WEIGHTS_DIR / "classifier.pt")])
    assert rc == 2
    assert "names two classifier files" in capsys.readouterr().err
