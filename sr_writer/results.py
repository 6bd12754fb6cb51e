"""``write_results``: Findings of one series -> the DICOM objects the node sends back.

Returns ``[SR, SEG (only when something was segmented), preview images...]``; every object
belongs to the source study, carries the source patient identity and character set, and
has UIDs that depend only on the input (see :mod:`sr_writer.identity`).
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Sequence

from pydicom.dataset import Dataset

from pipeline.errors import PipelineError
from pipeline.findings import LABELS, Findings
from pipeline.volume import Volume
from sr_writer import wording
from sr_writer.config import ResultsConfig
from sr_writer.identity import ResultUids, patched_header
from sr_writer.preview import SeriesInfo, build_previews
from sr_writer.seg import build_segmentation, select_planes
from sr_writer.sr import build_sr

LOGGER = logging.getLogger(__name__)


class ResultsError(PipelineError):
    """The findings cannot be written as DICOM results (inconsistent input)."""


def _check(source_datasets: Sequence[Dataset], volume: Volume, findings: Findings) -> None:
    if not source_datasets:
        raise ResultsError("At least one source CT dataset is required to write results.")
    if findings.mask.shape != volume.hu.shape:
        raise ResultsError(f"the findings mask is {findings.mask.shape} but the volume is "
                           f"{volume.hu.shape}: they must share the volume's grid")
    missing = [label for label in LABELS if label not in findings.labels]
    if missing:
        raise ResultsError(f"findings have no result for label(s) {missing}")
    for lesion in findings.lesions:
        if not 0 <= lesion.largest_slice < volume.hu.shape[0]:
            raise ResultsError(f"lesion largest_slice {lesion.largest_slice} is outside the "
                               f"volume's {volume.hu.shape[0]} slices")
    studies = {str(ds.get("StudyInstanceUID", "")) for ds in source_datasets}
    if studies != {volume.study_uid}:
        raise ResultsError(f"the source datasets belong to study/studies {sorted(studies)}, "
                           f"the volume to {volume.study_uid}")


def write_results(source_datasets: Sequence[Dataset], volume: Volume, findings: Findings,
                  config: ResultsConfig, now: datetime.datetime | None = None
                  ) -> list[Dataset]:
    """The SR, the SEG (only if a hemorrhage was segmented) and the preview images.

    ``source_datasets`` are the headers (``stop_before_pixels=True`` is enough) of the CT
    instances of the analysed series. ``now`` sets ContentDate/Time, SeriesDate/Time and
    InstanceCreationDate/Time of every object (default: the wall clock); the UIDs do not
    depend on it. Raises :class:`ResultsError` when the inputs do not belong together.
    """
    t0 = time.perf_counter()
    _check(source_datasets, volume, findings)
    now = now or datetime.datetime.now()
    planes, plane_notes = select_planes(source_datasets, volume)
    ct_headers: list[Dataset] = []
    seen: set[str] = set()
    for plane in planes:
        if plane.sop_uid not in seen:
            seen.add(plane.sop_uid)
            ct_headers.append(plane.dataset)
    if not ct_headers:
        raise ResultsError(f"none of the {len(source_datasets)} source dataset(s) is an "
                           f"analysed instance of series {volume.series_uid}")
    uids = ResultUids.for_analysis(volume, findings, config, sorted(seen))
    seg = build_segmentation(source_datasets, volume, findings, config, uids, now)
    notes = [n for n in plane_notes if n not in seg.notes]
    sr = build_sr(planes, volume, findings, seg, config, uids, now, notes)
    first = ct_headers[0]
    series = SeriesInfo(description=str(first.get("SeriesDescription", "") or ""),
                        number=str(first.get("SeriesNumber", "") or "?"),
                        slices=int(volume.hu.shape[0]))
    summary_notes = [*wording.reconstruction_notes(volume), *findings.warnings, *seg.notes,
                     *notes]
    previews = build_previews(patched_header(first), planes, volume, findings, series, config,
                              uids, now, summary_notes)
    out: list[Dataset] = [sr]
    if seg.dataset is not None:
        out.append(seg.dataset)
    out.extend(previews)
    LOGGER.info("results for series %s: SR %s, SEG %s, %d preview(s) in %.2f s",
                volume.series_uid, sr.SOPInstanceUID,
                seg.dataset.SOPInstanceUID if seg.dataset is not None else "none",
                len(previews), time.perf_counter() - t0)
    return out
