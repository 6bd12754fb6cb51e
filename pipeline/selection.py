"""Series selection: which series of a study is the head CT to analyse.

Headers only (``stop_before_pixels=True``). Instances are first filtered one by one
(SOP class, modality, ImageType, our own results), then every series is split into
stacks of one orientation and matrix size (PS3.3 C.7.6.2 Image Plane), and every stack
is checked (axial, head, thickness, number of slices). Of the stacks that pass, the best
is chosen by this order (each criterion only breaks ties of the previous ones):

1. ImageType ORIGINAL before DERIVED (``prefer_original``);
2. soft-tissue kernel, then unknown kernel, then bone/sharp kernel;
3. SliceThickness closest to ``preferred_slice_thickness_mm``;
4. more slices (more coverage);
5. lower SeriesNumber, then SeriesInstanceUID (determinism).

Every series or stack not chosen gets a :class:`SkippedSeries` with a plain reason.
"""

from __future__ import annotations

import logging
import math
import re
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from pipeline.config import SelectionConfig
from pipeline.errors import PipelineError, SeriesRejected, UnreadableDicom
from pipeline.headers import header_int, read_dicom
from pipeline.sorting import (
    SliceInfo,
    describe_stack,
    orientation_name,
    slices_from_dataset,
    split_stacks,
)

LOGGER = logging.getLogger(__name__)

_SOP_NAMES = {
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture (e.g. a dose screen)",
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation",
    "1.2.840.10008.5.1.4.1.1.88.67": "X-Ray Radiation Dose SR",
    "1.2.840.10008.5.1.4.1.1.11.1": "Grayscale Softcopy Presentation State",
}


@dataclass(frozen=True)
class SkippedSeries:
    """A series (or one stack of it) that was not chosen, and why."""

    series_uid: str
    description: str
    reason: str


@dataclass
class SelectionResult:
    """The chosen series: its files (the chosen stack only) and the reasons for the choice."""

    study_uid: str
    series_uid: str
    description: str
    files: list[Path]
    skipped: list[SkippedSeries] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)  # why this one was preferred
    notes: list[str] = field(default_factory=list)  # e.g. instances left out of the chosen one
    unreadable: list[str] = field(default_factory=list)  # file names that are not DICOM

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only."""
        d = asdict(self)
        d["files"] = [str(p) for p in self.files]
        return d


@dataclass
class _Instance:
    path: Path
    ds: Dataset


@dataclass
class _Candidate:
    series_uid: str
    study_uid: str
    description: str
    series_number: int
    stack: list[SliceInfo]
    instances: dict[Path, _Instance]
    original: bool
    kernel: str  # "soft", "bone" or "unknown"
    kernel_name: str
    thickness: float

    def rank(self, config: SelectionConfig) -> tuple[int, int, float, int, int, str]:
        return (
            0 if (self.original or not config.prefer_original) else 1,
            {"soft": 0, "unknown": 1, "bone": 2}[self.kernel],
            round(abs(self.thickness - config.preferred_slice_thickness_mm), 2),
            -len(self.stack),
            self.series_number,
            self.series_uid,
        )

    def summary(self) -> str:
        return (f"{'ORIGINAL' if self.original else 'DERIVED'}, {self.kernel} kernel "
                f"'{self.kernel_name}', {self.thickness:g} mm, {len(self.stack)} slices")


def _iter_files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.name.startswith(".") and path.name.upper() != "DICOMDIR":
            yield path


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    try:
        return "\\".join(str(v) for v in value)
    except TypeError:
        return str(value)


def _image_type(ds: Dataset) -> list[str]:
    value = ds.get("ImageType") or []
    values = [value] if isinstance(value, str) else list(value)
    return [str(v).upper() for v in values]


def _kernel(ds: Dataset) -> str:
    kernel = _text(ds, "ConvolutionKernel")
    if not kernel:
        recon = ds.get("SharedFunctionalGroupsSequence")
        item = recon[0].get("CTReconstructionSequence") if recon else None
        if item:
            kernel = _text(item[0], "ConvolutionKernel")
    return kernel


def _instance_rejection(ds: Dataset, config: SelectionConfig) -> str | None:
    """Why a single instance can never be part of the analysed volume, or None."""
    sop = str(ds.get("SOPClassUID", ""))
    manufacturer = _text(ds, "Manufacturer")
    description = _text(ds, "SeriesDescription")
    if config.own_manufacturer and manufacturer.startswith(config.own_manufacturer):
        return f"our own result (Manufacturer '{manufacturer}')"
    if (config.own_series_description_prefix
            and description.startswith(config.own_series_description_prefix)):
        return f"our own result (SeriesDescription '{description}')"
    if sop not in config.sop_classes:
        name = _SOP_NAMES.get(sop)
        if name is None and sop.startswith("1.2.840.10008.5.1.4.1.1.88."):
            name = "Structured Report"
        if name is None and sop.startswith("1.2.840.10008.5.1.4.1.1.7"):
            name = "Secondary Capture"
        return f"SOP class {name or sop} is not a CT image"
    modality = _text(ds, "Modality")
    if modality not in config.modalities:
        return f"modality '{modality}' is not one of {list(config.modalities)}"
    excluded = set(_image_type(ds)) & {v.upper() for v in config.exclude_image_types}
    if excluded:
        return f"ImageType {'/'.join(sorted(excluded))} (scout or non-diagnostic image)"
    if ds.get("Rows") is None:  # pixels are not read here: Rows stands for an image
        return "not an image (no Rows)"
    return None


def _read_headers(root: Path) -> tuple[list[_Instance], list[str], str]:
    """Instances, names of unreadable files, and the first unreadable file's reason."""
    instances, unreadable, first_reason = [], [], ""
    for path in _iter_files(root):
        try:
            ds = read_dicom(path, stop_before_pixels=True)
        except UnreadableDicom as exc:
            LOGGER.info("skipping %s", exc)
            unreadable.append(path.name)
            first_reason = first_reason or str(exc)
            continue
        if not ds.get("SeriesInstanceUID"):
            unreadable.append(path.name)
            continue
        instances.append(_Instance(path, ds))
    return instances, unreadable, first_reason


def _head_check(ds: Dataset, config: SelectionConfig) -> str | None:
    if config.head_policy == "ignore":
        return None
    fields = {k: _text(ds, k) for k in
              ("BodyPartExamined", "StudyDescription", "SeriesDescription", "ProtocolName")}
    pattern = re.compile(config.head_pattern, re.IGNORECASE)
    if any(pattern.search(v) for v in fields.values() if v):
        return None
    filled = {k: v for k, v in fields.items() if v}
    if not filled and config.head_policy == "if_present":
        return None
    shown = ", ".join(f"{k} '{v}'" for k, v in filled.items()) or "no body part or description"
    return f"not recognised as a head CT ({shown} do not match head_pattern)"


def select_series(instances_dir: Path, config: SelectionConfig) -> SelectionResult:
    """Choose the series to analyse in ``instances_dir`` (searched recursively).

    Raises :class:`SeriesRejected` naming every series and its reason when none qualifies.
    """
    instances, unreadable, first_reason = _read_headers(instances_dir)
    if not instances:
        raise SeriesRejected(f"no DICOM instances found in {instances_dir}" + (
            f" ({len(unreadable)} file(s) are not readable DICOM, e.g. {first_reason})"
            if unreadable else ""))
    by_series: dict[str, list[_Instance]] = defaultdict(list)
    for inst in instances:
        by_series[str(inst.ds.SeriesInstanceUID)].append(inst)

    skipped: list[SkippedSeries] = []
    candidates: list[_Candidate] = []
    partial_notes: dict[str, list[str]] = defaultdict(list)
    bone = re.compile(config.bone_kernel_pattern, re.IGNORECASE)
    soft = re.compile(config.soft_kernel_pattern, re.IGNORECASE)
    exclude_desc = re.compile(config.exclude_description_pattern, re.IGNORECASE)
    studies = {str(i.ds.get("StudyInstanceUID", "")) for i in instances}

    for series_uid, members in sorted(by_series.items(), key=lambda kv: kv[0]):
        first = members[0].ds
        description = _text(first, "SeriesDescription")

        rejected: dict[str, int] = defaultdict(int)
        usable: list[_Instance] = []
        for inst in members:
            why = _instance_rejection(inst.ds, config)
            if why is None:
                usable.append(inst)
            else:
                rejected[why] += 1
        if not usable:
            why_all = "; ".join(f"{why} ({n} instance{'s' if n > 1 else ''})"
                                for why, n in rejected.items())
            skipped.append(SkippedSeries(series_uid, description, why_all))
            continue
        for why, n in rejected.items():
            partial_notes[series_uid].append(f"{n} instance(s) left out: {why}")
        first = usable[0].ds
        description = _text(first, "SeriesDescription")

        def skip(reason: str, description: str = description, uid: str = series_uid) -> None:
            skipped.append(SkippedSeries(uid, description, reason))

        if description and exclude_desc.search(description):
            skip(f"SeriesDescription '{description}' matches exclude_description_pattern")
            continue
        head = _head_check(first, config)
        if head:
            skip(head)
            continue
        slices: list[SliceInfo] = []
        try:
            for inst in usable:
                slices.extend(slices_from_dataset(inst.ds, inst.path))
        except PipelineError as exc:
            skip(f"geometry cannot be read: {exc}")
            continue
        stacks = split_stacks(slices, config.orientation_tolerance)
        by_path = {inst.path: inst for inst in usable}
        for n, stack in enumerate(stacks):
            label = describe_stack(stack)
            where = f"stack {n + 1} of {len(stacks)} ({label}): " if len(stacks) > 1 else ""
            reason = _stack_rejection(stack, config)
            if reason:
                skip(where + reason)
                continue
            ds0 = by_path[stack[0].path].ds
            kernel_name = _kernel(ds0)
            kind = ("bone" if kernel_name and bone.search(kernel_name) else
                    "soft" if kernel_name and soft.search(kernel_name) else "unknown")
            itype = _image_type(ds0)
            candidates.append(_Candidate(
                series_uid=series_uid,
                study_uid=str(ds0.get("StudyInstanceUID", "")),
                description=description,
                series_number=header_int(ds0, "SeriesNumber", 0) or 0,
                stack=stack,
                instances={s.path: by_path[s.path] for s in stack},
                original=bool(itype) and itype[0] == "ORIGINAL",
                kernel=kind,
                kernel_name=kernel_name,
                thickness=_thickness(stack),
            ))

    if not candidates:
        details = "; ".join(f"{s.series_uid} ({s.description or 'no description'}): {s.reason}"
                            for s in skipped)
        raise SeriesRejected(f"no series qualifies for analysis: {details}")
    candidates.sort(key=lambda c: c.rank(config))
    best = candidates[0]
    reasons = [f"chosen: {best.summary()}"]
    for other in candidates[1:]:
        why = _why_lost(best, other, config)
        skipped.append(SkippedSeries(other.series_uid, other.description,
                                     f"a better candidate exists: {why}"))
    notes = list(partial_notes.get(best.series_uid, []))
    if len(studies) > 1:
        notes.append(f"the folder holds {len(studies)} studies; the best series of all was chosen")
    if unreadable:
        notes.append(f"{len(unreadable)} file(s) are not readable DICOM and were ignored")
    files = sorted({s.path for s in best.stack})
    LOGGER.info("selected series %s (%s) of %d series; %d skipped", best.series_uid,
                best.summary(), len(by_series), len(skipped))
    return SelectionResult(
        study_uid=best.study_uid,
        series_uid=best.series_uid,
        description=best.description,
        files=files,
        skipped=skipped,
        reasons=reasons,
        notes=notes,
        unreadable=unreadable,
    )


def _thickness(stack: Sequence[SliceInfo]) -> float:
    """SliceThickness (most common value), else the median spacing of the positions."""
    values = [s.thickness for s in stack if s.thickness]
    if values:
        uniq, counts = np.unique(np.round(values, 3), return_counts=True)
        return float(uniq[np.argmax(counts)])
    if len(stack) < 2:
        return 0.0
    n = stack[0].normal
    d = np.sort([float(np.dot(s.position, n)) for s in stack])
    return float(np.median(np.diff(d)))


def _stack_rejection(stack: Sequence[SliceInfo], config: SelectionConfig) -> str | None:
    normal = stack[0].normal
    angle = math.degrees(math.acos(min(1.0, abs(float(normal[2])) / max(
        float(np.linalg.norm(normal)), 1e-9))))
    if angle > config.axial_max_angle_deg:
        return (f"not axial: {orientation_name(normal)} slices, normal {angle:.0f} degrees from "
                f"the feet-head axis (axial_max_angle_deg={config.axial_max_angle_deg:g})")
    if len(stack) < config.min_slices:
        return f"only {len(stack)} slice(s); at least {config.min_slices} required (min_slices)"
    thickness = _thickness(stack)
    if not config.min_slice_thickness_mm <= thickness <= config.max_slice_thickness_mm:
        return (f"slice thickness {thickness:g} mm outside "
                f"[{config.min_slice_thickness_mm:g}, {config.max_slice_thickness_mm:g}] mm")
    return None


def _why_lost(best: _Candidate, other: _Candidate, config: SelectionConfig) -> str:
    """Name the first ranking criterion that separates ``other`` from ``best``."""
    a, b = best.rank(config), other.rank(config)
    texts = [
        "ORIGINAL is preferred over DERIVED",
        f"soft-tissue kernel preferred ('{best.kernel_name}' over '{other.kernel_name}')",
        f"thickness closer to {config.preferred_slice_thickness_mm:g} mm preferred "
        f"({best.thickness:g} over {other.thickness:g} mm)",
        f"more slices preferred ({len(best.stack)} over {len(other.stack)})",
        "lower SeriesNumber preferred",
        "tie broken by SeriesInstanceUID",
    ]
    for x, y, text in zip(a, b, texts, strict=True):
        if x != y:
            return f"{text}; it is {other.summary()}"
    return "identical ranking"
