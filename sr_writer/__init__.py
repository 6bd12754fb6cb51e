"""DICOM results: TID 1500 SR, SEG and preview series (highdicom).

The node calls :func:`write_results` with the analysed series' headers, its
:class:`~pipeline.volume.Volume` and :class:`~pipeline.findings.Findings`; see
``docs/results.md``.
"""

from sr_writer.config import ResultsConfig
from sr_writer.results import ResultsError, write_results

__all__ = ["ResultsConfig", "ResultsError", "write_results"]
