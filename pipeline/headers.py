"""Reading DICOM files that arrived from the network, where anything may be malformed.

pydicom parses values lazily: ``dcmread`` succeeds on a file whose elements carry a
wrong VR, a wrong length or an unparsable value, and the error surfaces later, at the
first access, as one of many exception types (``ValueError``, ``TypeError``,
``NotImplementedError``, ``struct.error``, ``zlib.error``, ``BytesLengthException``,
``RecursionError`` for sequences nested thousands deep, ...). :func:`read_dicom` parses
every element, in sequences too, at once and turns any of these into one
:class:`~pipeline.errors.UnreadableDicom` that names the file and the cause, so that
selection can skip the file with a reason and volume building can fail the series
with one (``docs/fuzzing.md``).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread

from pipeline.errors import UnreadableDicom

LOGGER = logging.getLogger(__name__)


def read_dicom(path: Path, stop_before_pixels: bool = False) -> Dataset:
    """The data set of *path*, every element parsed; raises UnreadableDicom."""
    try:
        ds = dcmread(path, stop_before_pixels=stop_before_pixels)
        for _ in ds.iterall():  # converts every raw element, nested ones included
            pass
    except RecursionError as exc:
        raise UnreadableDicom(f"{path.name}: sequences nested too deeply to read") from exc
    except Exception as exc:  # pydicom raises many types on malformed input (see above)
        raise UnreadableDicom(f"{path.name}: not a readable DICOM file "
                              f"({type(exc).__name__}: {_short(exc)})") from exc
    return ds


def _short(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return text if len(text) <= limit else text[:limit] + "..."


def header_int(ds: Dataset, keyword: str, default: int | None = None) -> int | None:
    """An integer attribute, or *default* when absent, empty, multi-valued or not an
    integer (the caller decides whether that breaks a rule)."""
    value: Any = ds.get(keyword)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return default


def header_float(ds: Dataset, keyword: str, default: float | None = None) -> float | None:
    """A finite number attribute, or *default* (as :func:`header_int`)."""
    value: Any = ds.get(keyword)
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return default
    return number if math.isfinite(number) else default
