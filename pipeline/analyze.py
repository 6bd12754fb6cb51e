"""The one call the node makes: ``analyze(series_dir, config) -> Results``.

The node's worker process calls :func:`analyze` on the folder of one completed
series and sends ``Results.datasets`` to its destinations. It must be
deterministic for the same input (same findings, same result UIDs), so that a
job re-run after a crash does not create duplicate results in PACS.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import Dataset

from pipeline.config import PipelineConfig
from pipeline.errors import InferenceError

LOGGER = logging.getLogger(__name__)


@dataclass
class Results:
    """What one analysis produced: DICOM objects to send and JSON-serialisable findings."""

    datasets: list[Dataset] = field(default_factory=list)
    findings: dict[str, Any] = field(default_factory=dict)


def model_identity() -> dict[str, str] | None:
    """Name, version and sha256 of the installed model weights; None while none ship."""
    return None


def analyze(series_dir: Path, config: PipelineConfig) -> Results:
    """Analyse the CT series in *series_dir*.

    Not wired to models yet: the classifier, segmenter and DICOM writers are
    separate issues. Until they land every job fails with this message, so that
    nothing pretends to have been analysed.
    """
    raise InferenceError(
        "the ICH models and result writers are not installed in this build "
        "(no classifier or segmenter weights); the series was stored but not analysed"
    )
