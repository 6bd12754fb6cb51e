"""Training and evaluation data: RSNA 2019, CT-ICH and the synthetic phantom as :class:`Study`.

Every reader yields the same thing: a (z, y, x) HU volume with its geometry, per-slice
labels in :data:`pipeline.findings.LABELS` order and, where the data has one, a subtype
mask (codes 0..5, :data:`UNKNOWN_SUBTYPE` where a voxel is blood of unknown subtype).

* **RSNA 2019** (``stage_2_train.csv`` + a folder of DICOM files): rows
  ``ID_<SOPInstanceUID>_<label>,<0|1>`` (the real data's SOPInstanceUIDs already start
  with ``ID_``; both spellings are matched). Files are grouped into series by
  StudyInstanceUID/SeriesInstanceUID from their headers and assembled with
  :func:`pipeline.volume.build_volume`, i.e. the same sorting (ImagePositionPatient
  projected on the slice normal), gap filling and Modality LUT as in production.
  Slices filled across a gap take the OR of the labels of their nearest source slices.
  No masks.
* **CT-ICH** (PhysioNet "Computed Tomography Images for Intracranial Hemorrhage
  Detection and Segmentation"): ``ct_scans/NNN.nii``, ``masks/NNN.nii`` and
  ``hemorrhage_diagnosis_raw_ct.csv`` (PatientNumber, SliceNumber (1-based, = NIfTI k + 1),
  Intraventricular, Intraparenchymal, Subarachnoid, Epidural, Subdural, No_Hemorrhage,
  Fracture_Yes_No). Its masks are binary: on a slice with exactly one subtype label the
  mask voxels get that subtype's code; on slices with several (or no) subtype labels they
  get :data:`UNKNOWN_SUBTYPE` (blood, subtype unknown) and training ignores their subtype.
* **Phantom** (:mod:`pipeline.phantom`): generated in memory (``data=None``), or files it
  wrote in the RSNA-like DICOM layout (with NIfTI masks) or the CT-ICH layout.
"""

from __future__ import annotations

import csv
import logging
import re
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from pipeline.config import VolumeConfig
from pipeline.errors import PipelineError
from pipeline.findings import LABELS, SUBTYPE_CODE, SUBTYPES
from pipeline.volume import build_volume

LOGGER = logging.getLogger(__name__)

DataFormat = Literal["phantom", "rsna", "ctich"]
UNKNOWN_SUBTYPE = 255  # mask code: hemorrhage whose subtype the data does not say
CTICH_CSV = "hemorrhage_diagnosis_raw_ct.csv"
CTICH_COLUMNS: dict[str, str] = {  # CSV column -> LABELS name
    "Epidural": "epidural", "Intraparenchymal": "intraparenchymal",
    "Intraventricular": "intraventricular", "Subarachnoid": "subarachnoid",
    "Subdural": "subdural"}
_RSNA_ID = re.compile(r"^(?P<uid>.+)_(?P<label>" + "|".join(LABELS) + r")$")


class DatasetError(PipelineError):
    """A dataset folder does not have the layout its format requires."""


@dataclass
class Study:
    """One series of a dataset with its reference labels."""

    study_id: str
    hu: np.ndarray  # (z, y, x) float32 HU
    image: sitk.Image  # the same grid with spacing, origin and direction (LPS)
    slice_labels: np.ndarray  # (z, 6) uint8, LABELS order
    mask: np.ndarray | None = None  # (z, y, x) uint8 codes 0..5 / UNKNOWN_SUBTYPE
    notes: list[str] = field(default_factory=list)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """(z, y, x) mm."""
        x, y, z = self.image.GetSpacing()
        return (z, y, x)

    @property
    def series_labels(self) -> np.ndarray:
        """(6,) uint8: a label is present in the series when it is on any slice."""
        out: np.ndarray = self.slice_labels.max(axis=0) if len(self.slice_labels) else \
            np.zeros(len(LABELS), np.uint8)
        return out


def image_for(hu: np.ndarray, spacing_zyx: Sequence[float],
              origin_xyz: Sequence[float] = (0.0, 0.0, 0.0),
              direction: Sequence[float] = (1, 0, 0, 0, 1, 0, 0, 0, 1)) -> sitk.Image:
    """A SimpleITK image carrying the geometry of a (z, y, x) array."""
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((float(spacing_zyx[2]), float(spacing_zyx[1]), float(spacing_zyx[0])))
    image.SetOrigin(tuple(float(v) for v in origin_xyz))
    image.SetDirection(tuple(float(v) for v in direction))
    return image


def any_from_subtypes(slice_labels: np.ndarray) -> np.ndarray:
    """Set column 0 ('any') to the OR of itself and the subtype columns."""
    out = slice_labels.copy()
    out[:, 0] = np.maximum(out[:, 0], out[:, 1:].max(axis=1))
    return out


# --------------------------------------------------------------------------- RSNA 2019


def read_rsna_csv(path: Path) -> dict[str, np.ndarray]:
    """``ID_<uid>_<label>,<0|1>`` rows -> {uid as written before the label: (6,) uint8}.

    Duplicate rows (the real stage-2 file has some) are OR-ed; a row whose ID does not
    end in one of the six labels raises :class:`DatasetError`.
    """
    out: dict[str, np.ndarray] = {}
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        for lineno, row in enumerate(reader, start=1):
            if not row or (lineno == 1 and row[0].strip().upper() == "ID"):
                continue
            if len(row) < 2:
                raise DatasetError(f"{path.name}:{lineno}: expected 'ID,Label', got {row!r}")
            m = _RSNA_ID.match(row[0].strip())
            if not m:
                raise DatasetError(f"{path.name}:{lineno}: ID {row[0]!r} does not end in "
                                   f"_<label> with a label of {', '.join(LABELS)}")
            labels = out.setdefault(m["uid"], np.zeros(len(LABELS), np.uint8))
            value = row[1].strip()
            if value not in ("0", "1"):
                raise DatasetError(f"{path.name}:{lineno}: Label must be 0 or 1, got {value!r}")
            labels[LABELS.index(m["label"])] |= np.uint8(value == "1")
    return out


def _lookup(labels: dict[str, np.ndarray], sop_uid: str) -> np.ndarray | None:
    hit = labels.get(sop_uid)
    if hit is None:
        hit = labels.get(f"ID_{sop_uid}")
    return hit


@dataclass
class RsnaSeries:
    """The files of one series of an RSNA-layout folder, with their labels by SOP UID."""

    study_uid: str
    series_uid: str
    files: list[Path]
    labels: dict[str, np.ndarray]
    mask_file: Path | None = None


def find_rsna_csv(root: Path) -> Path:
    """``stage_2_train.csv`` (or ``stage_1_train.csv``, or the only CSV) under ``root``."""
    for name in ("stage_2_train.csv", "stage_1_train.csv", "rsna_labels.csv", "labels.csv"):
        if (root / name).is_file():
            return root / name
    found = sorted(root.glob("*.csv"))
    if len(found) == 1:
        return found[0]
    raise DatasetError(f"{root}: no stage_2_train.csv (found {len(found)} CSV files)")


def index_rsna(root: Path, csv_path: Path | None = None) -> list[RsnaSeries]:
    """Group the DICOM files under ``root`` into labelled series (headers only).

    Files without labels in the CSV are skipped (logged); series are returned sorted by
    (StudyInstanceUID, SeriesInstanceUID) so that splits are reproducible. A NIfTI mask
    ``<SeriesInstanceUID>.nii[.gz]`` anywhere under ``root`` (the phantom writes one) is
    attached to its series.
    """
    labels = read_rsna_csv(csv_path or find_rsna_csv(root))
    groups: dict[tuple[str, str], list[Path]] = defaultdict(list)
    unlabelled = 0
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower()
                       in (".dcm", "")):
        try:
            ds = dcmread(path, stop_before_pixels=True,
                         specific_tags=["StudyInstanceUID", "SeriesInstanceUID",
                                        "SOPInstanceUID"])
        except (InvalidDicomError, OSError):
            continue
        sop = str(ds.get("SOPInstanceUID", ""))
        if _lookup(labels, sop) is None:
            unlabelled += 1
            continue
        groups[(str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", "")))
               ].append(path)
    if unlabelled:
        LOGGER.warning("%s: %d DICOM file(s) have no labels in the CSV and were skipped",
                       root, unlabelled)
    masks = {p.name.split(".nii")[0]: p for p in root.rglob("*.nii*")}
    out = []
    for (study, series), files in sorted(groups.items()):
        mask = masks.get(series)
        if mask is None:  # the phantom's layout: study_NNNN/dicom/*.dcm + study_NNNN/mask.nii.gz
            near = sorted(files[0].parent.parent.glob("mask.nii*"))
            mask = near[0] if near else None
        out.append(RsnaSeries(study, series, files, labels, mask))
    return out


def load_rsna_series(series: RsnaSeries, volume_config: VolumeConfig | None = None) -> Study:
    """Build the HU volume of one indexed series and attach its slice labels (and mask)."""
    volume = build_volume(series.files, volume_config or VolumeConfig())
    z = volume.hu.shape[0]
    slice_labels = np.zeros((z, len(LABELS)), np.uint8)
    have = np.zeros(z, bool)
    for k, sop in enumerate(volume.source_sop_uids):
        hit = _lookup(series.labels, sop) if sop else None
        if hit is not None:
            slice_labels[k] = hit
            have[k] = True
    notes = []
    if not have.all():
        known = np.flatnonzero(have)
        if known.size == 0:
            raise DatasetError(f"series {series.series_uid}: no slice of the volume has labels")
        for j in np.flatnonzero(~have).tolist():
            below = known[known < j]
            above = known[known > j]
            near = [int(a[i]) for a, i in ((below, -1), (above, 0)) if a.size]
            slice_labels[j] = slice_labels[near].max(axis=0)
        notes.append(f"{int((~have).sum())} filled slice(s) labelled from their neighbours")
    mask = None
    if series.mask_file is not None:
        mask = _read_mask_on(volume.image, series.mask_file)
    return Study(series.series_uid, volume.hu, volume.image, any_from_subtypes(slice_labels),
                 mask, notes + list(volume.report.warnings))


def _read_mask_on(image: sitk.Image, path: Path) -> np.ndarray:
    """A label NIfTI resampled (nearest neighbour) onto ``image``'s grid."""
    mask = sitk.ReadImage(str(path))
    same = (mask.GetSize() == image.GetSize()
            and np.allclose(mask.GetSpacing(), image.GetSpacing(), atol=1e-3)
            and np.allclose(mask.GetOrigin(), image.GetOrigin(), atol=1e-2)
            and np.allclose(mask.GetDirection(), image.GetDirection(), atol=1e-4))
    if not same:
        mask = sitk.Resample(mask, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(mask).astype(np.uint8)


def rsna_studies(root: Path, volume_config: VolumeConfig | None = None) -> Iterator[Study]:
    """Every labelled series of an RSNA-layout folder; unbuildable series are logged and
    skipped (the reason names the series)."""
    for series in index_rsna(root):
        try:
            yield load_rsna_series(series, volume_config)
        except PipelineError as exc:
            LOGGER.warning("series %s skipped: %s", series.series_uid, exc)


# --------------------------------------------------------------------------- CT-ICH


def read_ctich_csv(path: Path) -> dict[int, dict[int, np.ndarray]]:
    """{PatientNumber: {SliceNumber: (6,) uint8 LABELS order}}."""
    out: dict[int, dict[int, np.ndarray]] = defaultdict(dict)
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        needed = {"PatientNumber", "SliceNumber", "No_Hemorrhage", *CTICH_COLUMNS}
        missing = needed - set(reader.fieldnames or [])
        if missing:
            raise DatasetError(f"{path.name}: missing column(s) {sorted(missing)}")
        for row in reader:
            labels = np.zeros(len(LABELS), np.uint8)
            for column, name in CTICH_COLUMNS.items():
                labels[LABELS.index(name)] = int(float(row[column] or 0)) > 0
            labels[0] = bool(labels[1:].max()) or int(float(row["No_Hemorrhage"] or 1)) == 0
            out[int(row["PatientNumber"])][int(row["SliceNumber"])] = labels
    return dict(out)


def _nifti_zyx(path: Path) -> tuple[np.ndarray, sitk.Image]:
    """A NIfTI volume as a (z, y, x) array (z = the file's third axis, k) and its LPS
    geometry (the RAS affine of the file flipped in x and y)."""
    img: Any = nib.load(str(path))
    data = np.asarray(img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DatasetError(f"{path.name}: expected a 3D volume, got shape {data.shape}")
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(img.affine, dtype=float)
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    direction = (affine[:3, :3] / zooms).ravel()
    arr = np.ascontiguousarray(np.transpose(data, (2, 1, 0)))
    image = sitk.GetImageFromArray(arr.astype(np.float32))
    image.SetSpacing(tuple(float(v) for v in zooms))
    image.SetOrigin(tuple(float(v) for v in affine[:3, 3]))
    image.SetDirection(tuple(float(v) for v in direction))
    return arr, image


def ctich_subtype_mask(binary: np.ndarray, slice_labels: np.ndarray) -> np.ndarray:
    """Binary CT-ICH mask -> subtype codes: the single subtype of a slice where the CSV
    names exactly one, :data:`UNKNOWN_SUBTYPE` elsewhere."""
    out = np.zeros(binary.shape, np.uint8)
    for k in range(binary.shape[0]):
        fg = binary[k] > 0
        if not fg.any():
            continue
        present = [SUBTYPES[i] for i in np.flatnonzero(slice_labels[k, 1:])]
        out[k][fg] = SUBTYPE_CODE[present[0]] if len(present) == 1 else UNKNOWN_SUBTYPE
    return out


def ctich_studies(root: Path) -> Iterator[Study]:
    """Every patient of a CT-ICH-layout folder, by PatientNumber."""
    csv_path = root / CTICH_CSV
    if not csv_path.is_file():
        found = sorted(root.rglob(CTICH_CSV))
        if not found:
            raise DatasetError(f"{root}: no {CTICH_CSV}")
        csv_path = found[0]
    base = csv_path.parent
    table = read_ctich_csv(csv_path)
    for patient in sorted(table):
        scans = sorted((base / "ct_scans").glob(f"{patient:03d}.nii*"))
        if not scans:
            LOGGER.warning("CT-ICH patient %d: no ct_scans/%03d.nii, skipped", patient, patient)
            continue
        hu, image = _nifti_zyx(scans[0])
        z = hu.shape[0]
        slice_labels = np.zeros((z, len(LABELS)), np.uint8)
        for number, labels in table[patient].items():
            if not 1 <= number <= z:
                raise DatasetError(f"{csv_path.name}: patient {patient} SliceNumber {number} "
                                   f"is outside 1..{z}")
            slice_labels[number - 1] = labels
        mask = None
        masks = sorted((base / "masks").glob(f"{patient:03d}.nii*"))
        if masks:
            binary, _ = _nifti_zyx(masks[0])
            if binary.shape != hu.shape:
                raise DatasetError(f"patient {patient}: mask shape {binary.shape} differs from "
                                   f"the scan {hu.shape}")
            mask = ctich_subtype_mask(binary, slice_labels)
        yield Study(f"{patient:03d}", hu.astype(np.float32), image, slice_labels, mask)


# --------------------------------------------------------------------------- phantom


def phantom_version() -> int:
    """:data:`pipeline.phantom.PHANTOM_VERSION`: what a seed gives changes with it, so
    records of phantom data (caches, weights, fusion, metrics) carry it."""
    from pipeline.phantom import PHANTOM_VERSION  # not needed to read RSNA or CT-ICH data

    return PHANTOM_VERSION


def phantom_studies(n: int, seed: int, matrix: int = 128,
                    slices: tuple[int, int] = (24, 40), **options: Any) -> Iterator[Study]:
    """``n`` phantom studies generated in memory; study ``i`` comes from seed ``seed + i``
    and has ``matrix`` x ``matrix`` pixels and a slice count drawn from ``slices``
    (inclusive range; the phantom picks the spacing that covers the head).

    ``options`` go to :func:`pipeline.phantom.generate_volume` (``subtypes``,
    ``negative_fraction``, ``hard_negatives``, ``spacing``).
    """
    import importlib  # the phantom is not needed to read RSNA or CT-ICH data

    phantom: Any = importlib.import_module("pipeline.phantom")
    for i in range(n):
        nz = int(np.random.default_rng([seed + i, 1]).integers(slices[0], slices[1] + 1))
        study = phantom.generate_volume(seed + i, shape=(nz, matrix, matrix), **options)
        yield phantom_to_study(study, f"phantom-{seed + i}")


def phantom_to_study(study: Any, study_id: str) -> Study:
    """A :class:`pipeline.phantom.PhantomStudy` as a :class:`Study` (LPS geometry kept)."""
    hu = np.asarray(study.hu, dtype=np.float32)
    image = image_for(hu, tuple(float(s) for s in study.spacing_mm), study.origin,
                      study.direction)
    labels = np.asarray(study.slice_labels, dtype=np.uint8)
    return Study(study_id, hu, image, any_from_subtypes(labels),
                 np.asarray(study.labels, dtype=np.uint8))


def detect_layout(root: Path) -> Literal["rsna", "ctich"]:
    """'ctich' when ``root`` holds the CT-ICH CSV, else 'rsna' (DICOM + labels CSV)."""
    if (root / CTICH_CSV).is_file() or any(root.rglob(CTICH_CSV)):
        return "ctich"
    return "rsna"


def iter_studies(data: Path | None, fmt: DataFormat, *, n: int = 0, seed: int = 0,
                 matrix: int = 128, **phantom_options: Any) -> Iterator[Study]:
    """Studies of a dataset folder, or ``n`` in-memory phantom studies when ``data`` is
    None and ``fmt`` is 'phantom' (a phantom folder is read in the layout it was written)."""
    if data is None:
        if fmt != "phantom":
            raise DatasetError(f"format {fmt!r} needs a data folder")
        yield from phantom_studies(n, seed, matrix, **phantom_options)
        return
    if not data.is_dir():
        raise DatasetError(f"{data} is not a folder")
    layout = detect_layout(data) if fmt == "phantom" else fmt
    if layout == "ctich":
        yield from ctich_studies(data)
    else:
        yield from rsna_studies(data)
